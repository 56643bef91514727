"""GRE super-packets out of the tunnel: what a port's GRO hands TPB.

A NIC driver's GRO merges consecutive GRE packets of one TCP flow (Linux
does for GRE without sequence numbers) into one frame: outer and inner
lengths grown to the whole, the GRE checksum field left as the first
packet's, and a virtio_net_hdr saying TCPV4, gso_size and where the inner
TCP checksum is (partial).  TPB must unwrap it as one and send the inner
super-packet on with the header's offsets moved, so that the kernel
segments it on the way out (or the next hop takes it whole).

The frames are injected as a NIC driver hands them up: TPB's --out is a
TAP device here, and the test writes each frame into it with its vnet
header (IFF_VNET_HDR), so that the kernel receives it on --out exactly so.
(A packet socket on a veth cannot send it: the kernel checks a GSO frame
from user space by segmenting it, and finds no GSO type for GRE.)  gw1
checks what arrives at --in.  Real GRO on a veth is the bench's chain lab.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import TpbDaemon, pseudo_sum
from rawsock import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    Port,
    netns,
)
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw
from tunnel_util import Procs, exclusive_lab, gre_checksum_ok, lab_unavailable

from tpb import lab as labmod

pytestmark = [pytest.mark.netns, pytest.mark.skipif(lab_unavailable() is not None,
                                                    reason=lab_unavailable() or "")]

MSS = 1200
SEQ0 = 0x10000000
TAP = "tap3"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


@pytest.fixture(scope="module")
def tlab():
    with exclusive_lab(labmod.tunnel, "tpbgro") as lb:
        yield lb


@contextmanager
def tap_device(tlab, node: str, name: str) -> Iterator[int]:
    """A TAP device in node's namespace, up; yields its fd (vnet headers on).
    The device goes with the fd."""
    with netns(tlab.ns(node)):
        fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        tlab.run(node, ["ip", "link", "set", name, "up"])
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def tap(tlab) -> Iterator[int]:
    """TPB's --out for these tests."""
    with tap_device(tlab, "tpb", TAP) as fd:
        yield fd


@pytest.fixture
def tpb(tlab, tap, tmp_path):
    """`tpb run --in eth2 --out tap3`, the tunnel to the pop."""
    procs = Procs(tlab, tmp_path)
    yield procs.tpb("--out", TAP)
    procs.stop_all()


def gro_frame(
    tlab,
    data: bytes,
    gre_csum: int | None = None,
    toward_pop: bool = False,
    dst_mac: str | None = None,
) -> tuple[bytes, int]:
    """Ethernet + outer IPv4 + GRE + inner IPv4/TCP + data, as GRO leaves it:
    the inner TCP checksum holds the pseudo-header sum.  Sent from gw2 to
    gw1's MAC (the router whose address TPB borrows).  Returns the frame and
    where the inner TCP header starts (the vnet header's csum_start)."""
    gre = GRE(proto=0x0800) if gre_csum is None else GRE(
        proto=0x0800, chksum_present=1, chksum=gre_csum)
    src, dst = (labmod.T_PC, labmod.T_SERVER) if toward_pop else (labmod.T_SERVER, labmod.T_PC)
    inner = IP(src=src, dst=dst, id=random.randrange(1, 60000),
               flags="DF", ttl=60) / TCP(sport=5201, dport=40000, seq=SEQ0, ack=7,
                                         flags="PA", window=500) / Raw(data)
    osrc, odst = (labmod.T_TPB, labmod.T_POP) if toward_pop else (labmod.T_POP, labmod.T_TPB)
    outer = IP(src=osrc, dst=odst, flags="DF", ttl=62) / gre / inner
    frame = bytearray(bytes(Ether(src=tlab.iface("gw2", "eth0").mac,
                                  dst=dst_mac or tlab.iface("gw1", "eth1").mac) / outer))
    l3 = 14 + 20 + (8 if gre_csum is not None else 4)
    l4 = l3 + 20
    frame[l4 + 16 : l4 + 18] = struct.pack("!H", pseudo_sum(bytes(frame), l3, False, 6))
    return bytes(frame), l4


def inject(tap: int, frame: bytes, csum_start: int, gso: bool = True) -> None:
    """Into the TAP device: received on its host as a driver hands it up."""
    flags = VIRTIO_NET_HDR_F_NEEDS_CSUM
    if gso:
        hdr = VNET_HDR.pack(flags, VIRTIO_NET_HDR_GSO_TCPV4, csum_start + 20, MSS,
                            csum_start, 16)
    else:
        hdr = VNET_HDR.pack(flags, VIRTIO_NET_HDR_GSO_NONE, 0, 0, csum_start, 16)
    assert os.write(tap, hdr + frame) == len(hdr) + len(frame)


def arrivals(cap: Port, want: int, timeout: float = 5.0,
             src: str = labmod.T_SERVER) -> list[bytes]:
    """The TCP frames from src that reach the capture, until `want` of them
    and then a quiet 0.3 s (so that extra ones would show)."""
    got: list[bytes] = []
    wait = timeout
    while True:
        f = cap.recv(wait)
        if f is None:
            return got
        p = Ether(f.data)
        if IP in p and TCP in p and p[IP].src == src:
            got.append(f.data)
        wait = 0.3 if len(got) >= want else timeout


def tcp_ok(frame: bytes) -> bool:
    p = Ether(frame)
    check = p[IP].copy()
    del check[TCP].chksum
    del check[IP].chksum
    check = IP(bytes(check))
    return p[TCP].chksum == check[TCP].chksum and p[IP].chksum == check[IP].chksum


@pytest.mark.parametrize("gre_csum", [None, 0x1234], ids=["plain", "stale-gre-csum"])
def test_gro_super_packet_unwrapped_whole(tlab, tap, tpb, gre_csum):
    """With offloads on at --in, the inner super-packet leaves whole: one
    frame at gw1, the inner packet byte for byte but for its partial
    checksum, which the kernel completes when it segments.  A GRE checksum
    field in a merged frame is the first packet's: GRO checked every one,
    so TPB does not check it again."""
    data = os.urandom(6 * MSS + 77)
    frame, l4 = gro_frame(tlab, data, gre_csum)
    inner_at = l4 - 20
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject(tap, frame, l4)
        got = arrivals(cap, 1)
    assert len(got) == 1, [len(g) for g in got]
    out = got[0]
    assert out[:12] == frame[:12]                  # MACs as received
    assert out[12:14] == b"\x08\x00"
    assert out[14:] == frame[inner_at:]
    c = tpb.stop()
    assert c["tunnel"]["decap_packets"] == 1
    assert c["tunnel"]["decap_bytes"] == len(frame) - inner_at
    assert not c["tunnel"]["drop"], c["tunnel"]["drop"]


@pytest.fixture
def in_port_no_offloads(tlab):
    """TPB's --in without checksum offload or TSO: the kernel segments
    TPB's super-packets and completes their checksums in software."""
    tlab.run("tpb", ["ethtool", "-K", "eth2", "tx", "off"])
    try:
        yield
    finally:
        tlab.run("tpb", ["ethtool", "-K", "eth2", "tx", "on", "tso", "on"])


def test_gro_super_packet_segmented_on_egress(tlab, tap, tpb, in_port_no_offloads):
    data = os.urandom(6 * MSS + 77)
    n = -(-len(data) // MSS)
    frame, l4 = gro_frame(tlab, data)
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject(tap, frame, l4)
        got = arrivals(cap, n)
    assert len(got) == n, [len(g) for g in got]
    joined = b""
    for k, seg in enumerate(got):
        p = Ether(seg)
        body = bytes(p[TCP].payload)
        assert len(body) == min(MSS, len(data) - k * MSS)
        assert p[TCP].seq == SEQ0 + k * MSS
        assert tcp_ok(seg), k
        joined += body
    assert joined == data
    c = tpb.stop()
    assert c["tunnel"]["decap_packets"] == 1
    assert not c["tunnel"]["drop"], c["tunnel"]["drop"]


def test_gso_offsets_outside_inner_packet_dropped(tlab, tap, tpb):
    """A vnet header whose checksum offset points into the GRE header, not
    the inner packet's TCP header, cannot be segmented once unwrapped:
    dropped as gso_bad, nothing reaches gw1."""
    frame, _l4 = gro_frame(tlab, os.urandom(3 * MSS))
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject(tap, frame, 14 + 20)                # the GRE header
        got = arrivals(cap, 1, timeout=1.5)
    assert got == []
    c = tpb.stop()
    assert c["tunnel"]["drop"] == {"gso_bad": 1}, c["tunnel"]["drop"]
    assert c["tunnel"]["decap_packets"] == 0


def test_partial_inner_checksum_completed(tlab, tap, tpb):
    """A GRE packet from a sender on the same host may come with its inner
    checksum left for the NIC (a vnet header, no GSO).  TPB completes it
    before it checks the GRE checksum (computed as if it were complete) and
    sends the packet on whole and correct."""
    data = os.urandom(MSS)
    full = Ether(gro_frame(tlab, data, gre_csum=0)[0])
    del full[IP].len, full[IP].chksum, full[GRE].chksum
    del full[GRE].payload[TCP].chksum
    done = bytes(full)                             # every checksum complete
    l4 = 14 + 20 + 8 + 20
    partial = bytearray(done)
    partial[l4 + 16 : l4 + 18] = struct.pack("!H", pseudo_sum(done, l4 - 20, False, 6))
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject(tap, bytes(partial), l4, gso=False)
        got = arrivals(cap, 1)
    assert len(got) == 1
    assert got[0][14:] == done[l4 - 20 :]
    assert tcp_ok(got[0])
    c = tpb.stop()
    assert not c["tunnel"]["drop"], c["tunnel"]["drop"]


# -- tpb pop: the same merged packets reach its raw GRE socket -----------------


@pytest.fixture
def pop_no_offloads(tlab):
    """The pop's port toward the server without checksum offload or TSO."""
    tlab.run("pop", ["ethtool", "-K", "eth1", "tx", "off"])
    try:
        yield
    finally:
        tlab.run("pop", ["ethtool", "-K", "eth1", "tx", "on", "tso", "on"])


@contextmanager
def pop_on_tap(tlab, tmp_path, peer: str) -> Iterator[tuple[int, TpbDaemon, str]]:
    """`tpb pop` for one peer, and a TAP device in the pop's namespace to
    inject GRE into (no reverse-path filter: the peer is routed elsewhere);
    yields (the TAP's fd, the pop process, the TAP's MAC)."""
    procs = Procs(tlab, tmp_path)
    try:
        for key in ("all", "default"):
            tlab.sysctl("pop", f"net.ipv4.conf.{key}.rp_filter", "0")
        with tap_device(tlab, "pop", "tap9") as fd:
            tlab.sysctl("pop", "net.ipv4.conf.tap9.rp_filter", "0")
            pop = procs.pop(peer)
            mac = tlab.run("pop", ["cat", "/sys/class/net/tap9/address"]).stdout.strip()
            yield fd, pop, mac
    finally:
        procs.stop_all()


@pytest.mark.parametrize("gre_csum", [None, 0x1234], ids=["plain", "stale-gre-csum"])
def test_pop_passes_gro_merged_packet_on_as_segments(tlab, tmp_path, pop_no_offloads, gre_csum):
    """The POP host's GRO merges GRE packets of one TCP flow too, and its raw
    GRE socket gets the merged datagram: inner packet larger than the TUN
    device's MTU, inner checksum partial, a GRE checksum (if any) only the
    first segment's.  `tpb pop` hands it to the kernel as a super-packet,
    and the server gets segments of at most the MTU, each with a right
    checksum, the data whole and in order."""
    csum = ",csum" if gre_csum is not None else ""
    with pop_on_tap(tlab, tmp_path, f"{labmod.T_TPB}{csum},prefix=192.0.2.0/26") as (fd, pop, mac):
        data = os.urandom(6 * MSS + 77)
        frame, l4 = gro_frame(tlab, data, gre_csum, toward_pop=True, dst_mac=mac)
        with Port(tlab.ns("server"), "eth0", capture=True) as cap:
            inject(fd, frame, l4)
            got = arrivals(cap, -(-len(data) // 1460), src=labmod.T_PC)
        c = pop.stop()
    assert got, "nothing reached the server"
    joined, seq = b"", SEQ0
    for k, seg in enumerate(got):
        assert len(seg) <= 1514, (k, len(seg))
        p = Ether(seg)
        assert p[TCP].seq == seq, k
        assert tcp_ok(seg), k
        body = bytes(p[TCP].payload)
        joined += body
        seq += len(body)
    assert joined == data
    peer = c["peers"][labmod.T_TPB]
    assert peer["decap_packets"] == 1 and peer["gso_packets"] == 1, peer
    assert not peer["drop"], peer["drop"]


def test_pop_still_drops_a_wrong_gre_checksum(tlab, tmp_path):
    """Only a merge excuses the GRE checksum: a packet of normal size with a
    complete inner checksum and a wrong GRE checksum is dropped, counted."""
    with pop_on_tap(tlab, tmp_path, f"{labmod.T_TPB},csum,prefix=192.0.2.0/26") as (fd, pop, mac):
        p = Ether(gro_frame(tlab, os.urandom(MSS), 0x1234, toward_pop=True, dst_mac=mac)[0])
        del p[GRE].payload[TCP].chksum                     # complete, right
        frame = bytes(p)
        hdr = VNET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0)
        assert os.write(fd, hdr + frame) == len(hdr) + len(frame)
        time.sleep(1.0)                                     # counters come at exit
        c = pop.stop()
    peer = c["peers"][labmod.T_TPB]
    assert peer["drop"] == {"gre_csum": 1} and peer["decap_packets"] == 0, peer


# -- someone else's tunnel through the bump in the wire --------------------------

TRANSIT_SRC, TRANSIT_DST = "198.51.100.50", "198.51.100.60"   # not TPB's, not the POP's


def transit_frame(tlab, data: bytes, encap: str) -> tuple[bytes, int]:
    """A merged super-packet of another tunnel between two other hosts:
    GRE (plain, or with key and checksum, the field stale) or IP-in-IP."""
    inner = IP(src="10.9.0.1", dst="10.9.0.2", id=4242, flags="DF") / TCP(
        sport=1234, dport=80, seq=SEQ0, ack=1, flags="PA") / Raw(data)
    outer = IP(src=TRANSIT_SRC, dst=TRANSIT_DST, id=1000, flags="DF", ttl=50)
    if encap == "gre":
        pkt = outer / GRE(proto=0x0800) / inner
    elif encap == "gre-key-csum":
        pkt = outer / GRE(proto=0x0800, key_present=1, key=99, chksum_present=1,
                          chksum=0x1234) / inner
    else:
        pkt = outer / inner
    frame = bytearray(bytes(Ether(src=tlab.iface("gw2", "eth0").mac,
                                  dst=tlab.iface("gw1", "eth1").mac) / pkt))
    l4 = len(frame) - len(data) - 20
    frame[l4 + 16 : l4 + 18] = struct.pack("!H", pseudo_sum(bytes(frame), l4 - 20, False, 6))
    return bytes(frame), l4


@pytest.mark.parametrize("encap", ["gre", "gre-key-csum", "ipip"])
def test_transit_tunnel_super_packet_segmented(tlab, tap, tpb, encap):
    """Another tunnel's packets cross TPB untouched.  When the port's GRO
    has merged them, the kernel cannot send the merged frame out of a
    packet socket (it has no GSO type for GRE or IP-in-IP from there), so
    TPB segments it as gre_gso_segment would: gw1 gets the packets again,
    each a valid outer IPv4 packet (length, ID +1, checksum, and the GRE
    checksum recomputed), around a valid inner TCP segment; the data whole."""
    data = os.urandom(6 * MSS + 77)
    n = -(-len(data) // MSS)
    frame, l4 = transit_frame(tlab, data, encap)
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject(tap, frame, l4)
        got = []
        wait = 5.0
        while (f := cap.recv(wait)) is not None:
            p = Ether(f.data)
            if IP in p and p[IP].src == TRANSIT_SRC:
                got.append(f.data)
            wait = 0.3 if len(got) >= n else 5.0
    assert len(got) == n, [len(g) for g in got]
    joined = b""
    for k, seg in enumerate(got):
        assert len(seg) <= 1514
        assert seg[:12] == frame[:12]
        outer = Ether(seg)[IP]
        check = IP(bytes(outer))
        del check.chksum, check.len
        check = IP(bytes(check))
        assert (outer.chksum, outer.len) == (check.chksum, check.len), k
        assert outer.id == 1000 + k and outer.ttl == 50
        if encap.startswith("gre"):
            g = outer[GRE]
            if encap == "gre-key-csum":
                assert g.key == 99
                gre = bytes(g)
                assert gre_checksum_ok(gre), k
            inner = g.payload
        else:
            inner = outer.payload
        assert isinstance(inner, IP) and inner.id == 4242 + k
        assert inner[TCP].seq == SEQ0 + k * MSS
        c2 = inner.copy()
        del c2[TCP].chksum, c2.chksum
        c2 = IP(bytes(c2))
        assert inner[TCP].chksum == c2[TCP].chksum and inner.chksum == c2.chksum, k
        joined += bytes(inner[TCP].payload)
    assert joined == data
    c = tpb.stop()
    assert c["in"]["tx_frames"] >= n and c["in"]["drop_gso_bad"] == 0, c["in"]


def test_transit_super_packet_not_taken_apart_is_counted(tlab, tap, tpb):
    """A merged GRE packet carrying Ethernet (0x6558) is one TPB does not take
    apart; the kernel would refuse it, or drop it unseen behind a qdisc.
    TPB drops it itself and counts it as gso_bad; nothing half-made leaves."""
    data = os.urandom(4 * MSS)
    inner = Ether(src="02:00:00:00:aa:01", dst="02:00:00:00:aa:02") / IP(
        src="10.9.0.1", dst="10.9.0.2", flags="DF") / TCP(seq=SEQ0, flags="PA") / Raw(data)
    pkt = IP(src=TRANSIT_SRC, dst=TRANSIT_DST, flags="DF") / GRE(proto=0x6558) / inner
    frame = bytearray(bytes(Ether(src=tlab.iface("gw2", "eth0").mac,
                                  dst=tlab.iface("gw1", "eth1").mac) / pkt))
    l4 = len(frame) - len(data) - 20
    frame[l4 + 16 : l4 + 18] = struct.pack("!H", pseudo_sum(bytes(frame), l4 - 20, False, 6))
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject(tap, bytes(frame), l4)
        got = []
        while (f := cap.recv(1.0)) is not None:
            p = Ether(f.data)
            if IP in p and p[IP].src == TRANSIT_SRC:
                got.append(f.data)
    assert got == []
    c = tpb.stop()
    assert c["in"]["drop_gso_bad"] == 1, c["in"]


# ---- GRE-in-UDP: a UDP GSO super-packet (another TPB's csrc/udpgso.c) ----------

VIRTIO_NET_HDR_GSO_UDP_L4 = 5
GRE_UDP_PORT = 4754


@pytest.fixture
def tpb_udp(tlab, tap, tmp_path):
    """`tpb run --in eth2 --out tap3 --encap udp`, the tunnel to the pop."""
    procs = Procs(tlab, tmp_path)
    yield procs.tpb("--out", TAP, "--encap", "udp")
    procs.stop_all()


def udp_gso_frame(tlab, n: int, last: int, id_step: int = 1) -> tuple[bytes, list[bytes], int]:
    """A UDP GSO message as TPB's udpgso.c sends one from the pop toward
    tpb: outer IPv4 + UDP (4754 both ways, the length of the whole, the
    checksum field the pseudo-header sum: partial) + n pieces of one size
    but the last, each a GRE header and a whole inner TCP segment.  Returns
    the frame, the inner packets and the piece size (gso_size)."""
    inners = []
    for k in range(n):
        data = os.urandom(MSS if k < n - 1 else last)
        inners.append(bytes(IP(src=labmod.T_SERVER, dst=labmod.T_PC, id=100 + k * id_step,
                               flags="DF", ttl=60) /
                            TCP(sport=5201, dport=40000, seq=SEQ0 + k * MSS, ack=7,
                                flags="PA" if k == n - 1 else "A", window=500) / Raw(data)))
    payload = b"".join(struct.pack("!HH", 0, 0x0800) + i for i in inners)
    ulen = 8 + len(payload)
    outer = IP(src=labmod.T_POP, dst=labmod.T_TPB, flags="DF", ttl=62, proto=17,
               len=20 + ulen)
    frame = bytearray(bytes(Ether(src=tlab.iface("gw2", "eth0").mac,
                                  dst=tlab.iface("gw1", "eth1").mac) / outer)
                      + struct.pack("!HHHH", GRE_UDP_PORT, GRE_UDP_PORT, ulen, 0) + payload)
    frame[14 + 20 + 6 : 14 + 20 + 8] = struct.pack(
        "!H", pseudo_sum(bytes(frame), 14, False, 17))
    return bytes(frame), inners, 4 + 40 + MSS


def inject_udp_gso(tap: int, frame: bytes, seg: int, csum_start: int = 14 + 20) -> None:
    hdr = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 14 + 28, seg,
                        csum_start, 6)
    assert os.write(tap, hdr + frame) == len(hdr) + len(frame)


def test_udp_gso_super_packet_merged_whole(tlab, tap, tpb_udp):
    """The pieces of a GRE-in-UDP UDP GSO message are consecutive segments
    of one TCP flow: they leave --in as one inner super-packet (offloads on
    at --in: gw1 gets it whole) — the first segment's headers, every
    payload behind them in order, lengths and flags of the whole."""
    frame, inners, seg = udp_gso_frame(tlab, 5, 301)
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject_udp_gso(tap, frame, seg)
        got = arrivals(cap, 1)
    assert len(got) == 1, [len(g) for g in got]
    out = Ether(got[0])
    assert got[0][:12] == frame[:12] and got[0][12:14] == b"\x08\x00"
    first = IP(inners[0])
    assert (out[IP].src, out[IP].dst, out[IP].id, out[IP].ttl, out[IP].flags) == (
        first.src, first.dst, first.id, first.ttl, first.flags)
    assert out[IP].len == 40 + sum(len(IP(i)[TCP].payload) for i in inners)
    assert (out[TCP].seq, out[TCP].ack, out[TCP].flags) == (SEQ0, 7, "PA")
    assert bytes(out[TCP].payload) == b"".join(bytes(IP(i)[TCP].payload) for i in inners)
    c = tpb_udp.stop()
    assert c["tunnel"]["udp_gso_received"] == 1 and c["tunnel"]["udp_gso_coalesced"] == 1
    assert c["tunnel"]["decap_packets"] == len(inners)
    assert not c["tunnel"]["drop"], c["tunnel"]["drop"]


def test_udp_gso_merged_then_segmented_on_egress(tlab, tap, tpb_udp, in_port_no_offloads):
    """Merged and cut again by the kernel at --in (no TSO there), the
    segments are the very packets the pieces carried, byte for byte: the
    merge loses or changes nothing."""
    frame, inners, seg = udp_gso_frame(tlab, 5, 301)
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject_udp_gso(tap, frame, seg)
        got = arrivals(cap, len(inners))
    assert [g[14:] for g in got] == inners
    c = tpb_udp.stop()
    assert c["tunnel"]["udp_gso_coalesced"] == 1, c["tunnel"]


def test_udp_gso_super_packet_taken_apart(tlab, tap, tpb_udp):
    """Pieces GRO would not merge (here the IP IDs do not count up one by
    one) are each decapsulated as if they had come alone: each inner
    packet reaches gw1 byte for byte, in order, behind the Ethernet header
    as received."""
    frame, inners, seg = udp_gso_frame(tlab, 5, 301, id_step=2)
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject_udp_gso(tap, frame, seg)
        got = arrivals(cap, len(inners))
    assert [g[14:] for g in got] == inners
    assert all(g[:12] == frame[:12] and g[12:14] == b"\x08\x00" for g in got)
    c = tpb_udp.stop()
    assert c["tunnel"]["udp_gso_received"] == 1, c["tunnel"]
    assert c["tunnel"]["udp_gso_coalesced"] == 0, c["tunnel"]
    assert c["tunnel"]["decap_packets"] == len(inners)
    assert c["tunnel"]["decap_bytes"] == sum(map(len, inners))
    assert not c["tunnel"]["drop"], c["tunnel"]["drop"]


@pytest.mark.parametrize("bad", ["csum-start", "udp-length"])
def test_udp_gso_super_packet_with_wrong_offsets_dropped(tlab, tap, tpb_udp, bad):
    """A vnet header that does not point at the UDP header, or a UDP length
    that is not the payload's: nothing is taken apart, one gso_bad."""
    frame, _inners, seg = udp_gso_frame(tlab, 3, 100)
    start = 14 + 20
    if bad == "csum-start":
        start += 8                                 # the GRE header
    else:
        frame = frame[:38] + struct.pack("!H", struct.unpack_from("!H", frame, 38)[0] - 4) \
            + frame[40:]
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        inject_udp_gso(tap, frame, seg, csum_start=start)
        got = arrivals(cap, 1, timeout=1.5)
    assert got == []
    c = tpb_udp.stop()
    assert c["tunnel"]["drop"] == {"gso_bad": 1}, c["tunnel"]["drop"]
    assert c["tunnel"]["decap_packets"] == 0
