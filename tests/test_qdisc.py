"""TPB behind a qdisc that queues, as every NIC has one (mq, fq_codel,
pfifo_fast) and operators add shapers: the frames of one flow leave in the
order they came, and all of them pass through the qdisc.

TPB sends super-packets through the qdisc (only there does the kernel
segment them) and other frames past it (PACKET_QDISC_BYPASS), which on a
veth's noqueue changes nothing.  Behind a qdisc that queues, a frame sent
past it would overtake the super-packet of its own flow still queued there.
So TPB watches each port's root qdisc and sends everything through it
whenever it is not noqueue.  The tests' qdisc is a slow token bucket
(tbf), so that a super-packet is still queued when the frames after it
come, or so small that it refuses most of a burst: what it refuses TPB
counts.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest
from helpers import pseudo_sum
from rawsock import VIRTIO_NET_HDR_GSO_TCPV4, Port, netns
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from wire import End, ends, udp4

pytestmark = pytest.mark.netns
LAB_SUFFIX = "q"

MSS = 1000
SUPER = 30 * MSS  # at 20 Mbit/s, 12 ms in the token bucket
SMALL = [100, 100, 100]
TBF = ("tbf", "rate", "20mbit", "burst", "10k", "latency", "1s")
WATCH_PERIOD = 0.5  # how often TPB reads the root qdisc again (bridge.py)


def flow_frames(src: End, dst: End) -> tuple[bytes, dict, list[bytes], bytes]:
    """A TCP super-packet (TCPV4 vnet header, full checksums) and three
    small segments of the same flow after it; and all their data in order."""
    sport = random.randrange(20000, 60000)
    data = os.urandom(SUPER + sum(SMALL))

    def seg(seq: int, body: bytes) -> bytes:
        ip = IP(src=src.ip4, dst=dst.ip4, id=random.randrange(1, 60000), flags="DF")
        tcp = TCP(sport=sport, dport=9, seq=seq, ack=1, flags="A", window=1000)
        return bytes(Ether(src=src.mac, dst=dst.mac) / ip / tcp / Raw(body))

    big = bytearray(seg(1000, data[:SUPER]))
    # CHECKSUM_PARTIAL, as a TSO stack hands it over: the field holds the
    # pseudo-header sum
    big[50:52] = struct.pack("!H", pseudo_sum(bytes(big), 14, False, socket.IPPROTO_TCP))
    vnet = {
        "csum_start": 34,
        "csum_offset": 16,
        "gso_type": VIRTIO_NET_HDR_GSO_TCPV4,
        "gso_size": MSS,
        "hdr_len": 34 + 20,
    }
    small, at = [], SUPER
    for n in SMALL:
        small.append(seg(1000 + at, data[at : at + n]))
        at += n
    return bytes(big), vnet, small, data


def send_and_receive(lab, src: End, dst: End) -> tuple[list[tuple[int, bytes]], bytes]:
    """Sends the flow from src; returns its segments as dst received them,
    (TCP sequence, payload) in arrival order, and the data sent."""
    big, vnet, small, data = flow_frames(src, dst)
    sport = IP(big[14:])[TCP].sport
    got: list[tuple[int, bytes]] = []
    with (
        Port(lab.ns(src.node), src.ifname, vnet=True) as tx,
        Port(lab.ns(dst.node), dst.ifname, capture=True) as rx,
    ):
        tx.send_vnet(big, **vnet)
        for f in small:
            tx.send_vnet(f)
        deadline = time.monotonic() + 10
        while sum(len(p) for _, p in got) < len(data) and time.monotonic() < deadline:
            f = rx.recv(deadline - time.monotonic())
            if f is None:
                break
            e = Ether(f.data)
            if TCP in e and e[TCP].sport == sport:
                got.append((e[TCP].seq, bytes(e[TCP].payload)))
    return got, data


def assert_in_order(got: list[tuple[int, bytes]], data: bytes) -> None:
    seqs = [s for s, _ in got]
    assert seqs == sorted(seqs), f"reordered: sequence numbers as received {seqs}"
    assert b"".join(p for _, p in got) == data, "data lost or changed"


def set_tbf(lab, spec: tuple[str, ...] = TBF) -> None:
    lab.run("tpb", ["tc", "qdisc", "replace", "dev", "eth3", "root", *spec])


@pytest.fixture
def restore_qdisc(lab):
    yield
    lab.run("tpb", ["tc", "qdisc", "del", "dev", "eth3", "root"], check=False)


def test_a_flow_keeps_its_order_behind_a_qdisc_that_queues(lab, restore_qdisc, start_tpb):
    set_tbf(lab)
    tpb = start_tpb(lab)
    e = ends(lab)
    got, data = send_and_receive(lab, e["gw1"], e["gw2"])
    assert_in_order(got, data)
    c = tpb.stop()
    assert "eth3: root qdisc tbf: every frame goes through it" in tpb.stderr, tpb.stderr
    assert c["out"]["drop_egress_full"] == 0, c["out"]


def test_a_qdisc_added_and_removed_while_tpb_runs(lab, restore_qdisc, start_tpb):
    tpb = start_tpb(lab)
    e = ends(lab)
    set_tbf(lab)
    time.sleep(3 * WATCH_PERIOD)
    got, data = send_and_receive(lab, e["gw1"], e["gw2"])
    assert_in_order(got, data)
    lab.run("tpb", ["tc", "qdisc", "del", "dev", "eth3", "root"])
    time.sleep(3 * WATCH_PERIOD)
    got, data = send_and_receive(lab, e["gw1"], e["gw2"])
    assert_in_order(got, data)
    tpb.stop()
    lines = [ln for ln in tpb.stderr.splitlines() if "root qdisc" in ln]
    assert lines == [
        "tpb: eth3: root qdisc tbf: every frame goes through it",
        "tpb: eth3: root qdisc noqueue: frames skip it",
    ], tpb.stderr


def test_what_a_full_qdisc_refuses_is_counted(lab, restore_qdisc, start_tpb):
    """A shaper with room for a few frames only: what it refuses is counted
    as drop_egress_full, and every frame TPB took in either went out or was
    counted (nothing lost silently)."""
    set_tbf(lab, ("tbf", "rate", "100kbit", "burst", "2k", "limit", "3000"))
    tpb = start_tpb(lab)
    e = ends(lab)
    src, dst = e["gw1"], e["gw2"]
    markers = [os.urandom(16) for _ in range(200)]
    with (
        Port(lab.ns(src.node), src.ifname) as tx,
        Port(lab.ns(dst.node), dst.ifname, capture=True) as rx,
    ):
        for m in markers:
            tx.send(bytes(udp4(src, dst, m)))
        arrived: set[bytes] = set()
        while (f := rx.recv(2.0)) is not None:
            arrived.update(m for m in markers if m in f.data)
    c = tpb.stop()
    lost = len(markers) - len(arrived)
    assert lost > 0, "the shaper refused nothing: TPB's frames went past it"
    assert c["out"]["drop_egress_full"] >= lost, (lost, c["out"])
    assert c["in"]["rx_frames"] == c["out"]["tx_frames"] + c["out"]["drop_egress_full"], c


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_watching_the_qdisc_does_not_grow_memory(lab):
    """TPB reads each port's root qdisc twice a second for as long as it
    runs, on one netlink socket: what that costs must level off.  (With
    get_links() on a long-lived socket, as TPB first did, pyroute2 0.9.7
    kept about 2 KiB of every call: 10 MiB over these calls, and TPB's
    memory grew by about 10 KiB a second, idle, for ever.)  The port is a
    real one, tpb's eth3 in the lab, so the dump has a qdisc to read."""
    from pyroute2 import IPRoute

    from tpb.ports import root_qdisc

    with netns(lab.ns("tpb")), IPRoute() as ipr:
        ifindex = socket.if_nametoindex("eth3")
        for _ in range(12000):  # its warm-up: where it levelled off in TPB (README)
            assert root_qdisc(ipr, ifindex) == "noqueue"
        before = _rss_anon_kib()
        for _ in range(5000):
            assert root_qdisc(ipr, ifindex) == "noqueue"
        grown = _rss_anon_kib() - before
    assert grown < 1024, f"{grown} KiB more over 5000 reads after 12000"
