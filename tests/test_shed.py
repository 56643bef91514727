"""Overload shedding (csrc/shed.c): a 64-byte flood past what TPB can carry,
with the ports' receive work on TPB's own CPU (RPS, as a NIC interrupting
that core would), in the classic lab.

With shedding (the default) TPB attaches its XDP program to the flooded
port, drops the excess there (counted `shed`), pings across TPB still get
through, and once the flood ends the program is gone and the flooding
side's TSO is back.  With `--no-shed` the same flood fills the ring
(`ring_full`) and no program is ever attached: the shedding is what acts.

The program itself is run on frames of every kind, valid and random
(BPF_PROG_TEST_RUN: the kernel's verifier has proved it memory-safe; what
is checked here is its logic), against an independent model of how it
buckets a frame and what it lets through.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_util import ipv4_header, mac_bytes
from helpers import need_tool, ports_state, read_until, received, tshark, wait_for
from rawsock import Port
from test_afxdp import xdp_on

from tpb import lab as labmod
from tpb.native import ShedProgram

pytestmark = pytest.mark.netns
LAB_SUFFIX = "s"
TPB_CPU, FLOOD_CPU = 1, 0
FLOOD_SECONDS = 6
PINGS = 20


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs: TPB's and the flood's")
    with labmod.classic("tpbt" + LAB_SUFFIX) as lb:
        for ifname in ("eth2", "eth3"):  # the ports' receive work on TPB's CPU
            lb.run("tpb", ["sh", "-c", f"echo {1 << TPB_CPU:x} > "
                           f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"])
        yield lb


@pytest.fixture(autouse=True)
def off_tpbs_cpu():
    """The test's own work (pytest, the threads and processes it starts:
    pings, tcpdump, a light flow) runs on the flood's CPU, so TPB's CPU
    carries only TPB and its ports' receive work, as the placement says.
    Left unpinned it stole TPB's CPU for milliseconds at a time: the ring
    overflowed and a light flow beside a VLAN flood lost 1-4 of its 150
    frames in 4 of 12 runs, none in 18 runs pinned.  Yields the CPUs it
    could run on before."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {FLOOD_CPU})
    try:
        yield before
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture
def start_tpb(start_tpb, off_tpbs_cpu: set[int]):
    """conftest's, started from all the CPUs: `--cpu` takes only one the
    process may run on."""
    def start(*args: Any, **kw: Any) -> Any:
        os.sched_setaffinity(0, off_tpbs_cpu)
        try:
            return start_tpb(*args, **kw)
        finally:
            os.sched_setaffinity(0, {FLOOD_CPU})
    return start


def flood_frame() -> bytes:
    """One 60-byte UDP frame from pc to gw2's address, to a MAC no one has
    (gw2 throws it away as another host's)."""
    payload = bytes.fromhex("9c400009001a0000") + bytes(18)
    frame = (mac_bytes("02:00:00:00:00:99") + mac_bytes("02:00:00:00:00:77") + b"\x08\x00"
             + ipv4_header(labmod.PC, labmod.GW2, 17, len(payload)) + payload)
    assert len(frame) == 60
    return frame


def flood_config(path: Path, frame: bytes | None = None) -> Path:
    """trafgen's configuration: `frame` (flood_frame()) over and over."""
    frame = frame if frame is not None else flood_frame()
    path.write_text("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
    return path


def flood6_config(path: Path) -> Path:
    """The same flood as IPv6: one 62-byte UDP frame from an address on
    gw1's link to gw2's, to a MAC no one has."""
    payload = bytes.fromhex("9c400009001a0000") + bytes(18)
    ip6 = (struct.pack("!IHBB", 6 << 28, len(payload), 17, 64)
           + socket.inet_pton(socket.AF_INET6, "2001:db8:2::99")
           + socket.inet_pton(socket.AF_INET6, labmod.GW2_6))
    frame = mac_bytes("02:00:00:00:00:99") + mac_bytes("02:00:00:00:00:77") + b"\x86\xdd"
    frame += ip6 + payload
    path.write_text("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
    return path


def tso(lb: labmod.Lab) -> str:
    """gw1 eth1's TCP segmentation offload as ethtool shows it: the port
    TPB floods from is its veth peer, whose TSO an XDP program turns off."""
    out = lb.run("gw1", ["ethtool", "-k", "eth1"]).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                if ln.startswith("tcp-segmentation-offload:"))


def flood_with_pings(lb: labmod.Lab, cfg: Path, during=None, to: str = labmod.SERVER,
                     frm: str = "pc") -> int:
    """trafgen at full speed on FLOOD_CPU for FLOOD_SECONDS (sendto() mode:
    its TX ring mode gives up when the port's queue is full); pings from pc
    to the server across TPB from the second second on; during(): called
    while the flood runs.  Returns the pings answered."""
    sent0 = tx_packets(lb)
    flood = lb.spawn("gw1", ["taskset", "-c", str(FLOOD_CPU), "timeout", str(FLOOD_SECONDS),
                             "trafgen", "--cpus", "1", "-t", "0", "--no-sock-mem", "--notouch-irq",
                             "-o", "eth1", "-i", str(cfg), "-q"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        ping = lb.run(frm, ["ping", "-n", "-c", str(PINGS), "-i", "0.1", "-W", "1", to],
                      check=False)
        if during is not None:
            during()
    finally:
        _, err = flood.communicate(timeout=FLOOD_SECONDS + 10)
    assert flood.returncode in (0, 124), f"trafgen: {err}"  # 124: timeout ended it
    sent = tx_packets(lb) - sent0
    assert sent > 100_000 * FLOOD_SECONDS, f"trafgen sent only {sent} frames: {err}"
    return received(ping)


def tx_packets(lb: labmod.Lab) -> int:
    return int(lb.run("gw1", ["cat", "/sys/class/net/eth1/statistics/tx_packets"]).stdout)


def test_a_flood_on_tpbs_core_is_shed_and_the_program_leaves_after_it(lab, start_tpb,
                                                                      tmp_path: Path):
    need_tool("trafgen", "netsniff-ng")
    before, tso_before = ports_state(lab), tso(lab)
    t = start_tpb(lab, extra=("--cpu", str(TPB_CPU)))
    lab.run("pc", ["ping", "-c", "1", "-W", "2", labmod.SERVER])  # ARP settled
    seen: dict[str, object] = {}

    def during() -> None:
        seen["xdp"] = xdp_on(lab, "eth2")

    got = flood_with_pings(lab, flood_config(tmp_path / "flood.cfg"), during)
    assert seen["xdp"] is not None, "no XDP program on eth2 during the flood"
    assert got >= PINGS * 9 // 10, f"{got} of {PINGS} pings across TPB under the flood"
    # Released 2 s after the last frame it shed; the peer's TSO back with it.
    wait_for(lambda: xdp_on(lab, "eth2") is None, 6, "the program detached after the flood")
    assert tso(lab) == tso_before
    inp = t.stop()["in"]
    assert inp["drop_shed"] > 0 and inp["shed_engaged"] >= 1, inp
    assert inp["shed_refused"] == 0
    # What was shed never reached TPB's ring: more than what overflowed it.
    assert inp["drop_shed"] > inp["kernel_drops"], inp
    assert ports_state(lab) == before


def test_an_ipv6_flood_is_shed_by_flow_and_ipv6_pings_beside_it_pass(lab, start_tpb,
                                                                    tmp_path: Path):
    """IPv6 flows are buckets of their own too (pings from gw1 to gw2
    beside a UDP flood from another address on gw1's link), as the program
    tests below show frame by frame.  Before, every IPv6 frame counted in
    the one bucket of its EtherType and the pings took their chance in the
    flood's quota: 15 and 20 of 20 passed in two runs, so this test alone
    does not tell the two apart; it holds the behaviour."""
    need_tool("trafgen", "netsniff-ng")
    t = start_tpb(lab, extra=("--cpu", str(TPB_CPU)))
    # gw1 to gw2 across TPB (the lab routes no IPv6 beyond that link)
    lab.run("gw1", ["ping", "-c", "1", "-W", "2", labmod.GW2_6])  # neighbours settled
    got = flood_with_pings(lab, flood6_config(tmp_path / "flood6.cfg"), to=labmod.GW2_6,
                           frm="gw1")
    assert got >= PINGS * 9 // 10, f"{got} of {PINGS} IPv6 pings across TPB under the flood"
    inp = t.stop()["in"]
    assert inp["drop_shed"] > 0 and inp["shed_engaged"] >= 1, inp


VLAN = 100
LIGHT_PORT = 7777
LIGHT_FRAMES = 150


def test_a_flood_on_a_vlan_trunk_is_shed_by_flow_and_a_flow_beside_it_passes(
        lab, start_tpb, tmp_path: Path):
    """On a trunk the flows inside a VLAN are buckets of their own: beside a
    UDP flood tagged VLAN 100, a light UDP flow on the same VLAN from
    another host (100 frames a second, numbered) gets through, counted at
    gw2 by tcpdump's filter.  Before, the program did not look behind the
    tag: every tagged frame counted in one bucket and the light flow took
    its chance in the flood's quota: it lost 34 to 61 of its 150 frames in
    three runs; with the VLAN looked into, none in ten (4 % are allowed).

    The light flow starts once the program is on the port: the frames sent
    before it (the ring overflowing for the three ticks shedding waits)
    tell nothing about shedding by flow, and how long that takes depends
    on the machine (CI lost 7 of 150 once, starting at a fixed second).
    Lost frames are named with the time they left, to tell a stall of
    TPB's CPU (a run of them) from a lost share (spread out)."""
    need_tool("trafgen", "netsniff-ng")
    need_tool("tcpdump")
    need_tool("tshark")
    t = start_tpb(lab, extra=("--cpu", str(TPB_CPU)))
    flood = tagged(flood_frame(), (DOT1Q, VLAN))

    def light(k: int) -> bytes:
        payload = (struct.pack("!HHHH", 40000, LIGHT_PORT, 8 + 22, 0) + b"TPBLIGHT"
                   + struct.pack("!H", k) + bytes(12))
        return tagged(mac_bytes("02:00:00:00:00:77") + mac_bytes("02:00:00:00:00:98")
                      + b"\x08\x00" + ipv4_header("192.0.2.98", labmod.GW2, 17, len(payload))
                      + payload, (DOT1Q, VLAN))

    assert model_bucket(light(0)) != model_bucket(flood)
    pcap = tmp_path / "light.pcap"
    dump = lab.spawn("gw2", ["tcpdump", "-i", "eth0", "-Q", "in", "-n", "-U", "-w", str(pcap),
                             f"vlan {VLAN} and udp dst port {LIGHT_PORT}"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sent: list[float] = []     # when each light frame left, from the program's attach

    def send_light() -> None:
        t0 = time.monotonic()
        while xdp_on(lab, "eth2") is None:
            if time.monotonic() - t0 > FLOOD_SECONDS / 2:
                return          # never engaged: the assertions below say so
            time.sleep(0.05)
        t0 = time.monotonic()
        with Port(lab.ns("gw1"), "eth1") as port:
            for k in range(LIGHT_FRAMES):
                # ENOBUFS: the veth's own queue to its peer's XDP is full
                # (the flood's doing, before the program): sent again, as
                # a real flow's retransmission would be
                while True:
                    try:
                        port.send(light(k))
                        break
                    except OSError as e:
                        if e.errno != errno.ENOBUFS:
                            raise
                        time.sleep(0.001)
                sent.append(time.monotonic() - t0)
                time.sleep(0.01)

    sender = threading.Thread(target=send_light)
    try:
        read_until(dump.stderr, b"listening on", 10, "tcpdump")
        sender.start()
        flood_with_pings(lab, flood_config(tmp_path / "vlan.cfg", flood))
        sender.join()
        time.sleep(0.5)
    finally:
        if sender.is_alive():   # an error before start() must not be masked
            sender.join()
        dump.terminate()
        dump.communicate(timeout=10)
    mark = b"TPBLIGHT".hex()
    got = {int(d[len(mark):len(mark) + 4], 16)
           for d in tshark(pcap, "-Y", f"vlan.id == {VLAN} && udp.dstport == {LIGHT_PORT}",
                           "-T", "fields", "-e", "data.data").split()
           if d.startswith(mark)}
    inp = t.stop()["in"]
    assert inp["drop_shed"] > 0 and inp["shed_engaged"] >= 1, inp
    assert len(sent) == LIGHT_FRAMES, f"{len(sent)} light frames sent: the program came late"
    lost = [f"#{k} at {sent[k]:.2f} s" for k in range(LIGHT_FRAMES) if k not in got]
    assert len(lost) <= LIGHT_FRAMES * 4 // 100, \
        f"{len(lost)} of {LIGHT_FRAMES} frames of the light flow lost beside the VLAN flood: " \
        f"{lost}; counters {inp}"


def test_without_shedding_the_same_flood_fills_the_ring_instead(lab, start_tpb,
                                                                tmp_path: Path):
    need_tool("trafgen", "netsniff-ng")
    t = start_tpb(lab, extra=("--cpu", str(TPB_CPU), "--no-shed"))
    seen: dict[str, object] = {}

    def during() -> None:
        seen["xdp"] = xdp_on(lab, "eth2")

    flood_with_pings(lab, flood_config(tmp_path / "flood.cfg"), during)
    assert seen["xdp"] is None
    inp = t.stop()["in"]
    assert inp["drop_shed"] == 0 and inp["shed_engaged"] == 0, inp
    assert inp["kernel_drops"] > 0, inp


# -- the program on its own (no lab, no port) ----------------------------------

XDP_DROP, XDP_PASS = 1, 2
NBUCKET, KEY_DROPS = 256, 257


TAGS = DOT1Q, DOT1AD = (b"\x81\x00", b"\x88\xa8")


def model_bucket(frame: bytes) -> int:
    """Which of 1..256 the program counts frame in (csrc/shed.c): the IPv4
    addresses, and the TCP/UDP ports of a header without options; for IPv6
    the EtherType and the low 64 bits of both addresses, and the TCP/UDP
    ports right behind the header; else the EtherType — behind up to two
    VLAN tags, whose VLAN IDs join the key (the outer one shifted by 16
    bits).  A frame too short for its kind's fields counts by its
    EtherType (the kernel runs no frame shorter than an Ethernet header)."""
    vids, at = 0, 0  # at: how far tags moved the rest of the frame

    def w(off: int) -> int:
        return struct.unpack_from("<I", frame, at + off)[0]

    key = struct.unpack_from("<H", frame, 12)[0]
    for n in range(2):
        if frame[at + 12:at + 14] not in TAGS or len(frame) < at + 18:
            break
        vids ^= struct.unpack_from("<H", frame, at + 14)[0] & 0xFF0F  # the VID, as stored
        if n == 0:
            vids <<= 16
        at += 4
        key = struct.unpack_from("<H", frame, at + 12)[0]
    kind = frame[at + 12:at + 14]
    if kind == b"\x08\x00" and len(frame) >= at + 38:
        key = w(26) ^ w(30)
        if frame[at + 14] == 0x45 and frame[at + 23] in (6, 17):
            key ^= w(34)
    elif kind == b"\x86\xdd" and len(frame) >= at + 58:
        key ^= w(30) ^ w(34) ^ w(46) ^ w(50)
        if frame[at + 20] in (6, 17):
            key ^= w(54)
    key ^= vids
    return (((key * 0x9E3779B1) & 0xFFFFFFFF) >> 24) + 1


def tagged(frame: bytes, *tags: tuple[bytes, int]) -> bytes:
    """frame with VLAN tags (TPID, TCI) after its MAC addresses, outer first."""
    return frame[:12] + b"".join(tpid + struct.pack("!H", tci) for tpid, tci in tags) + frame[12:]


def udp_frame(sport: int, dport: int = 9, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    payload = struct.pack("!HHHH", sport, dport, 26, 0) + bytes(18)
    return (bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00"
            + ipv4_header(src, dst, 17, len(payload)) + payload)


def udp6_frame(sport: int, dport: int = 9, src: str = "2001:db8::1",
               dst: str = "2001:db8::2", nh: int = 17) -> bytes:
    payload = struct.pack("!HHHH", sport, dport, 26, 0) + bytes(18)
    ip6 = (struct.pack("!IHBB", 6 << 28, len(payload), nh, 64)
           + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst))
    return bytes(6) + bytes.fromhex("020000000001") + b"\x86\xdd" + ip6 + payload


@pytest.fixture(scope="module")
def prog() -> ShedProgram:
    return ShedProgram()


def counted(prog: ShedProgram) -> list[int]:
    return [prog.map(b) & 0xFFFFFFFF for b in range(1, NBUCKET + 1)]


def test_the_program_buckets_every_kind_of_frame_as_the_model_says(prog):
    rng = random.Random(14)
    frames = [udp_frame(1000), udp_frame(1001), udp_frame(1000, src="10.9.9.9"),
              bytes(12) + b"\x08\x06" + bytes(28),            # ARP
              bytes(12) + b"\x86\xdd" + bytes(60),            # IPv6
              udp6_frame(1000), udp6_frame(1001), udp6_frame(1000, src="2001:db8::9"),
              udp6_frame(1000, nh=6), udp6_frame(1000, nh=0),   # TCP; hop-by-hop: no ports
              udp6_frame(7)[:57], udp6_frame(7)[:58],           # one byte short, exact
              bytes(12) + b"\x81\x00" + bytes(60),            # 802.1Q, VLAN 0, type 0
              udp_frame(7)[:37], udp_frame(7)[:38]]           # one byte short, exact
    tcp = bytearray(udp_frame(5555))
    tcp[23] = 6
    opts = bytearray(udp_frame(5555))
    opts[14] = 0x46                                           # options: no ports
    frames += [bytes(tcp), bytes(opts)]
    q, ad = DOT1Q, DOT1AD
    for f in (udp_frame(1000), udp6_frame(1000), bytes(tcp), bytes(opts),
              bytes(12) + b"\x08\x06" + bytes(28)):
        frames += [tagged(f, (q, 100)), tagged(f, (q, 101)), tagged(f, (q, 0xE064)),  # PCP 7
                   tagged(f, (ad, 100), (q, 7)), tagged(f, (ad, 100), (q, 8)),
                   tagged(f, (q, 5), (q, 6), (q, 7))]                         # a third tag
    for cut in (14, 17, 18, 21, 22, 41, 42, 45, 46):  # short: tag, tags, IPv4 behind them
        frames += [tagged(udp_frame(7), (q, 9))[:cut], tagged(udp_frame(7), (ad, 9), (q, 3))[:cut]]
    for _ in range(3000):  # random bytes, half of them dressed as IPv4 or IPv6, some tagged
        f = bytearray(rng.randbytes(rng.randrange(14, 100)))
        if rng.random() < 0.3:
            f[12:14] = rng.choice(TAGS)
            if rng.random() < 0.3 and len(f) >= 18:
                f[16:18] = rng.choice(TAGS)
        if rng.random() < 0.5 and len(f) >= 24:
            if rng.random() < 0.3:
                f[12:14] = b"\x86\xdd"
                f[20] = rng.choice((6, 17, 0, rng.randrange(256)))
            else:
                f[12:14] = b"\x08\x00"
                f[14] = rng.choice((0x45, 0x45, 0x46, 0x60))
                f[23] = rng.choice((6, 17, 1, rng.randrange(256)))
        if rng.random() < 0.3 and len(f) >= 64:  # the same behind one or two tags
            f[12:12] = rng.choice(TAGS) + rng.randbytes(2)
            if rng.random() < 0.5:
                f[12:12] = rng.choice(TAGS) + rng.randbytes(2)
        frames.append(bytes(f))
    for f in frames:
        before = counted(prog)
        assert prog.run(f, 1 << 40) == XDP_PASS, f.hex()
        after = counted(prog)
        moved = [b + 1 for b in range(NBUCKET) if after[b] != before[b]]
        want = model_bucket(f)
        # Counted in the model's bucket (+1, or 1 if a new slot began).
        assert after[want - 1] in (before[want - 1] + 1, 1), (f.hex(), want, moved)
        assert moved in ([want], []), (f.hex(), want, moved)
        assert moved or before[want - 1] == 1, f.hex()


def test_nothing_is_dropped_or_counted_while_the_quota_is_zero(prog):
    drops = prog.map(KEY_DROPS)
    before = counted(prog)
    for sport in range(200):
        assert prog.run(udp_frame(40000), 0) == XDP_PASS
        assert prog.run(udp_frame(sport), 0) == XDP_PASS
    assert counted(prog) == before and prog.map(KEY_DROPS) == drops


def test_a_heavy_flow_is_trimmed_to_its_quota_and_a_light_one_passes(prog):
    heavy, light = udp_frame(40000), udp_frame(40001, src="10.0.0.77")
    assert model_bucket(heavy) != model_bucket(light)
    quota, n = 3, 40
    drops = prog.map(KEY_DROPS)
    verdicts = [prog.run(heavy, quota) for _ in range(n)]
    passed = verdicts.count(XDP_PASS)
    # quota per ~1 ms slot; the 40 runs take far less, but may straddle a
    # slot boundary once.
    assert quota <= passed <= 2 * quota, verdicts
    assert prog.map(KEY_DROPS) - drops == n - passed
    assert prog.run(light, quota) == XDP_PASS


def test_ipv6_flows_are_buckets_of_their_own(prog):
    """An IPv6 flood is trimmed to its flow's quota, and an IPv6 flow beside
    it (another host, another port) passes, as for IPv4."""
    heavy, light = udp6_frame(40000), udp6_frame(40001, src="2001:db8::77")
    assert model_bucket(heavy) != model_bucket(light)
    quota, n = 3, 40
    verdicts = [prog.run(heavy, quota) for _ in range(n)]
    assert quota <= verdicts.count(XDP_PASS) <= 2 * quota, verdicts
    assert prog.run(light, quota) == XDP_PASS
