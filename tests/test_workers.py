"""`workers = N`: the ports' traffic shared over N forwarding loops by flow
(PACKET_FANOUT_HASH), each loop with its own rings and counters.

In the quiet classic lab (nothing crosses but the test's frames), with the
real C helper: a burst of many flows' frames sent as fast as Python sends
them crosses two workers; within each flow the frames leave in the order
sent; both workers carry some; the per-worker counters add up to the
totals; and every frame gw1 sent is delivered to gw2 or in a drop counter.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import assert_balance, assert_consistent, port_drops
from rawsock import ETH_P_ALL, SOL_PACKET, Port, netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from wire import ends

from tpb import lab as labmod

pytestmark = pytest.mark.netns
LAB_SUFFIX = "w"

FLOWS = 16
PER_FLOW = 1500
FENCE = 1 << 31  # fences' seqs start here, past every frame's


@pytest.fixture(scope="module")
def quiet_lab():
    """The classic lab with IPv6 off on the gateways' ports facing TPB."""
    with labmod.classic(f"tpbt{LAB_SUFFIX}q") as lb:
        for node, ifname in (("gw1", "eth1"), ("gw2", "eth0")):
            lb.sysctl(node, f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
        yield lb


def _stat(lab: labmod.Lab, node: str, ifname: str, what: str) -> int:
    out = lab.run(node, ["cat", f"/sys/class/net/{ifname}/statistics/{what}"]).stdout
    return int(out)


def test_two_workers_keep_each_flow_in_order_and_count_every_frame(quiet_lab, start_tpb):
    tpb = start_tpb(quiet_lab, extra=("--workers", "2"))
    e = ends(quiet_lab)
    src, dst = e["gw1"], e["gw2"]
    tag = os.urandom(8)

    def frame(flow: int, seq: int) -> bytes:
        # flows differ in their UDP source port: the fanout hash spreads them
        return bytes(
            Ether(src=src.mac, dst=dst.mac)
            / IP(src="192.0.2.1", dst="198.51.100.9")
            / UDP(sport=20000 + flow, dport=9)
            / Raw(tag + struct.pack("!HI", flow, seq))
        )

    # built beforehand, so that the sending loop is as tight as it can be
    frames = [frame(i % FLOWS, i // FLOWS) for i in range(FLOWS * PER_FLOW)]
    arrived: dict[int, list[int]] = {f: [] for f in range(FLOWS)}
    fenced: set[int] = set()
    fences_sent = 0
    done = threading.Event()

    sent0 = _stat(quiet_lab, "gw1", "eth1", "tx_packets")
    got0 = _stat(quiet_lab, "gw2", "eth0", "rx_packets")
    with (
        Port(quiet_lab.ns(src.node), src.ifname) as tx,
        Port(quiet_lab.ns(dst.node), dst.ifname, capture=True) as rx,
    ):

        def receive() -> None:
            while not done.is_set():
                f = rx.recv(0.2)
                if f is None or tag not in f.data:
                    continue
                at = f.data.index(tag) + len(tag)
                flow, seq = struct.unpack("!HI", f.data[at : at + 6])
                if seq >= FENCE:
                    fenced.add(flow)
                arrived[flow].append(seq)

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        try:
            for f in frames:
                tx.send(f)
            # A fence of a flow comes after all of that flow's frames: once
            # one of every flow's is through, every worker has emptied its
            # rings.  A full ring (or the capture) may lose a fence: each
            # flow not fenced yet gets another, until all are.
            deadline = time.monotonic() + 20
            n = 0
            while len(fenced) < FLOWS:
                assert time.monotonic() < deadline, f"fences through TPB: {sorted(fenced)}"
                for flow in set(range(FLOWS)) - fenced:
                    tx.send(frame(flow, FENCE + n))
                    fences_sent += 1
                n += 1
                # poll the receiver for up to 0.3 s before fencing again
                until = time.monotonic() + 0.3
                while len(fenced) < FLOWS and time.monotonic() < until:
                    done.wait(0.01)
        finally:
            done.set()
            t.join()
    # the frames gw2's kernel counted: settled once TPB has sent them all
    deadline = time.monotonic() + 5
    got = _stat(quiet_lab, "gw2", "eth0", "rx_packets") - got0
    while time.monotonic() < deadline:
        again = _stat(quiet_lab, "gw2", "eth0", "rx_packets") - got0
        if again == got:
            break
        got = again
    sent = _stat(quiet_lab, "gw1", "eth1", "tx_packets") - sent0
    c = tpb.stop()

    for flow, seqs in arrived.items():
        # fences included: each flow's come after its frames, in order too
        assert seqs == sorted(seqs), f"flow {flow}: frames left TPB out of order"
        assert len(set(seqs)) == len(seqs), f"flow {flow}: a frame forwarded twice"
    assert sent == len(frames) + fences_sent, sent
    assert_balance(sent, port_drops(c["in"]), got)
    assert_consistent(c, ring_full_ok=True)

    workers = c["workers"]
    assert len(workers) == 2, workers
    for port in ("in", "out"):
        for key in ("rx_frames", "tx_frames", "kernel_packets", "kernel_drops"):
            assert sum(w[port][key] for w in workers) == c[port][key], (port, key, workers)
    assert all(w["in"]["rx_frames"] > 0 for w in workers), (
        "one worker carried every flow",
        [w["in"]["rx_frames"] for w in workers],
    )



def _send_numbered(tx: Port, src, dst, tag: bytes, n: int) -> None:
    """n UDP frames src -> dst of FLOWS flows, each carrying tag and its
    number."""
    for i in range(n):
        tx.send(bytes(Ether(src=src.mac, dst=dst.mac)
                      / IP(src="192.0.2.1", dst="198.51.100.9")
                      / UDP(sport=20000 + i % FLOWS, dport=9)
                      / Raw(tag + struct.pack("!I", i))))


def _numbers_seen(port: Port, tag: bytes, seconds: float) -> list[int]:
    """The numbers of _send_numbered's frames the port sees in `seconds`."""
    seen, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        f = port.recv(0.1)
        # UDP only: gw2 routes these frames on (to a host that never answers
        # ARP) and its ICMP errors quote them, tag and all; those are not
        # TPB's doing
        if f is not None and f.data[23:24] == b"\x11" and tag in f.data:
            at = f.data.index(tag) + len(tag)
            seen.append(struct.unpack("!I", f.data[at : at + 4])[0])
    return seen


def test_workers_behind_a_queuing_qdisc_never_take_back_what_tpb_sent(quiet_lab, start_tpb):
    """Behind a qdisc that queues TPB sends through it, and the kernel shows
    every frame sent there to the port's packet taps.  A socket in a fanout
    group is reached through the group's hook, which ignores outgoing
    frames only with PACKET_FANOUT_FLAG_IGNORE_OUTGOING: without it a
    worker took in TPB's own sends and forwarded them back, so each frame
    reached gw2 twice and came back to gw1."""
    for ifname in ("eth2", "eth3"):
        quiet_lab.run("tpb", ["tc", "qdisc", "replace", "dev", ifname, "root", "pfifo"])
    try:
        tpb = start_tpb(quiet_lab, extra=("--workers", "2"))
        e = ends(quiet_lab)
        src, dst = e["gw1"], e["gw2"]
        tag = os.urandom(8)
        n = 400
        with (
            Port(quiet_lab.ns(src.node), src.ifname, capture=True) as tx,
            Port(quiet_lab.ns(dst.node), dst.ifname, capture=True) as rx,
        ):
            time.sleep(1.5)  # TPB's qdisc watch has seen pfifo: sends go through it
            _send_numbered(tx, src, dst, tag, n)
            at_gw2 = _numbers_seen(rx, tag, 2.0)
            back_at_gw1 = _numbers_seen(tx, tag, 0.5)
        tpb.stop()
        assert sorted(at_gw2) == list(range(n)), (len(at_gw2), len(set(at_gw2)))
        assert back_at_gw1 == [], f"{len(back_at_gw1)} of gw1's frames came back"
    finally:
        for ifname in ("eth2", "eth3"):
            quiet_lab.run("tpb", ["tc", "qdisc", "del", "dev", ifname, "root"], check=False)


PACKET_FANOUT = 18
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000


def _new_fanout_group() -> tuple[socket.socket, int]:
    """A socket alone in a new hash group whose id the kernel picks."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind(("lo", ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_FANOUT, PACKET_FANOUT_FLAG_UNIQUEID << 16)
    (arg,) = struct.unpack("I", s.getsockopt(SOL_PACKET, PACKET_FANOUT, 4))
    return s, arg & 0xFFFF


def _next_unique_fanout_id_zero(ns: str) -> None:
    """Moves the kernel's counter of unique fanout group ids (one 16-bit
    counter for all namespaces) on until the next group it makes is 0, as
    it is for the first group after boot.  Groups are made in batches and
    closed in parallel: each close waits for an RCU grace period.  A batch
    stays well under the process's limit of open files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    size = max(64, min(4000, soft - 256))
    with netns(ns), ThreadPoolExecutor(64) as pool:
        while True:
            batch = []
            try:
                while len(batch) < size:
                    batch.append(_new_fanout_group())
                    if batch[-1][1] == 0xFFFF:
                        return
            finally:
                list(pool.map(lambda g: g[0].close(), batch))


def test_two_workers_in_fanout_group_zero_forward_each_frame_once(quiet_lab, start_tpb):
    """The kernel numbers unique fanout groups from 0, so a TPB started
    first after boot makes group 0, and a worker joining it must not take
    0 for "no group": it would get every frame of the port besides its
    share, and forward each a second time."""
    quiet_lab.run("tpb", ["ip", "link", "set", "lo", "up"])
    _next_unique_fanout_id_zero(quiet_lab.ns("tpb"))
    tpb = start_tpb(quiet_lab, extra=("--workers", "2"))
    with netns(quiet_lab.ns("tpb")):
        probe, after = _new_fanout_group()
        probe.close()
    # TPB's first worker made the groups from 0 on, one per ring
    assert 0 < after <= 2 * 5, after
    e = ends(quiet_lab)
    src, dst = e["gw1"], e["gw2"]
    tag = os.urandom(8)
    n = 320
    with (
        Port(quiet_lab.ns(src.node), src.ifname) as tx,
        Port(quiet_lab.ns(dst.node), dst.ifname, capture=True) as rx,
    ):
        _send_numbered(tx, src, dst, tag, n)
        seen = _numbers_seen(rx, tag, 2.0)
    c = tpb.stop()
    assert sorted(seen) == list(range(n)), (len(seen), len(set(seen)))
    assert all(w["in"]["rx_frames"] > 0 for w in c["workers"]), c["workers"]
