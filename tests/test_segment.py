"""Super-packets into the tunnel: segmented in C, as the kernel's
gre_gso_segment + tcp_gso_segment / __udp_gso_segment would.

gw1 sends each super-packet with a virtio_net_hdr (GSO type, gso_size,
partial checksum), exactly as a TSO stack or GRO hands it to TPB; at gw2 the
GRE packets are taken apart and every segment checked: gso_size pieces, IP
ID +1 per segment and lengths and checksums of its own, TCP sequence and
checksum, CWR only on the first, FIN/PSH only on the last, a GRE sequence
number per segment; UDP segments each a datagram with its own length and
checksum.  The payloads joined are the original.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import struct

import pytest
from helpers import assert_balance, assert_zero_sum_completed, pseudo_sum, zero_sum_partial
from rawsock import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    Port,
    netns,
)
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw
from tunnel_util import Wire, exclusive_lab, lab_unavailable, parse_gre

from tpb import lab as labmod

pytestmark = [pytest.mark.netns, pytest.mark.skipif(lab_unavailable() is not None,
                                                    reason=lab_unavailable() or "")]

GSO_TCPV6 = 4
GSO_UDP_L4 = 5
MSS = 1000
SERVER6 = "2001:db8:99::10"
# No `tpb pop` runs here: the pop's kernel answers the GRE with "protocol
# unreachable" to the tunnel address, which TPB counts as local_other.
NO_POP = {"local_other"}


@pytest.fixture(scope="module")
def tlab():
    with exclusive_lab(labmod.tunnel, "tpbseg") as lb:
        yield lb


@pytest.fixture
def tpb(tlab, tmp_path):
    from tunnel_util import Procs

    procs = Procs(tlab, tmp_path)
    p = procs.tpb("--seq", "--match", f"ip daddr {labmod.T_SERVER}",
                  "--match", f"ip6 daddr {SERVER6}")
    yield p
    procs.stop_all()


def super_packet(tlab, l4: str, v6: bool, flags: str = "PA") -> tuple[bytes, int, int, bytes]:
    """A CHECKSUM_PARTIAL super-packet: (frame, csum_start, csum_offset, payload)."""
    data = os.urandom(5 * MSS + 321)
    gw1 = tlab.iface("gw1", "eth1")
    gw2 = tlab.iface("gw2", "eth0")
    if v6:
        ip = IPv6(src="2001:db8:1::10", dst=SERVER6)
    else:
        ip = IP(src=labmod.T_PC, dst=labmod.T_SERVER, id=random.randrange(1, 60000), flags="DF")
    if l4 == "tcp":
        seg = TCP(sport=40000, dport=5201, seq=0xFFFFF000, ack=1, flags=flags, window=500)
        off = 16
    else:
        seg = UDP(sport=40000, dport=5202)
        off = 6
    frame = bytearray(bytes(Ether(src=gw1.mac, dst=gw2.mac) / ip / seg / Raw(data)))
    l3 = 14
    l4_start = l3 + (40 if v6 else 20)
    proto = socket.IPPROTO_TCP if l4 == "tcp" else socket.IPPROTO_UDP
    frame[l4_start + off : l4_start + off + 2] = struct.pack(
        "!H", pseudo_sum(bytes(frame), l3, v6, proto))
    return bytes(frame), l4_start, off, data


def capture_gre(tlab, send, count: int) -> list:
    """Every GRE packet from TPB at gw2 after send(), waiting for `count`
    and then for quiet, so that extra ones would show."""
    with Wire(tlab, "gw2", "eth0", outgoing=False) as w:
        w.drain()
        send()

        def mine():
            return [g for f in w.seen if (g := parse_gre(f.data)) and g.src == labmod.T_TPB]

        w.until(lambda fr: len(mine()) >= count, timeout=5, what=f"{count} GRE segments")
        w.settle()
        return mine()


@pytest.mark.parametrize("v6", [False, True], ids=["tcp4", "tcp6"])
def test_tcp_super_packet_segmented(tlab, tpb, v6):
    frame, cstart, coff, data = super_packet(tlab, "tcp", v6, flags="FPAC")
    gso = GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    n = -(-len(data) // MSS)
    with Port(tlab.ns("gw1"), "eth1", vnet=True) as port:
        segs = capture_gre(tlab, lambda: port.send_vnet(
            frame, csum_start=cstart, csum_offset=coff, gso_type=gso, gso_size=MSS,
            hdr_len=cstart + 20), n)
    assert len(segs) == n
    inner = [(IPv6 if v6 else IP)(g.inner) for g in segs]
    # one GRE sequence number per segment, consecutive
    seqs = [g.seq for g in segs]
    assert seqs == list(range(seqs[0], seqs[0] + n)), seqs
    first = (IPv6 if v6 else IP)(frame[14:])
    joined = b""
    for k, p in enumerate(inner):
        t = p[TCP]
        body = bytes(t.payload)
        assert len(body) == min(MSS, len(data) - k * MSS)
        assert t.seq == (first[TCP].seq + k * MSS) & 0xFFFFFFFF
        flags = str(t.flags)
        assert ("C" in flags) == (k == 0), (k, flags)
        assert ("F" in flags) == (k == n - 1) and ("P" in flags) == (k == n - 1), (k, flags)
        # checksums as the receiver would compute them
        check = p.copy()
        del check[TCP].chksum
        if not v6:
            del check[IP].chksum
            check = IP(bytes(check))
            assert p[IP].chksum == check[IP].chksum
            assert p[IP].id == (first[IP].id + k) & 0xFFFF
            assert p[IP].len == 20 + 20 + len(body)
        else:
            check = IPv6(bytes(check))
            assert p[IPv6].plen == 20 + len(body)
        assert t.chksum == check[TCP].chksum, k
        joined += body
    assert joined == data
    c = tpb.stop()["tunnel"]
    assert c["gso_packets"] == 1 and c["gso_segments"] == n, c
    assert set(c["drop"]) <= NO_POP, c["drop"]


@pytest.mark.parametrize("v6", [False, True], ids=["udp4", "udp6"])
def test_udp_super_packet_segmented(tlab, tpb, v6):
    frame, cstart, coff, data = super_packet(tlab, "udp", v6)
    n = -(-len(data) // MSS)
    with Port(tlab.ns("gw1"), "eth1", vnet=True) as port:
        segs = capture_gre(tlab, lambda: port.send_vnet(
            frame, csum_start=cstart, csum_offset=coff, gso_type=GSO_UDP_L4, gso_size=MSS,
            hdr_len=cstart + 8), n)
    assert len(segs) == n
    joined = b""
    for k, g in enumerate(segs):
        p = (IPv6 if v6 else IP)(g.inner)
        u = p[UDP]
        body = bytes(u.payload)
        assert u.len == 8 + len(body) == 8 + min(MSS, len(data) - k * MSS)
        check = p.copy()
        del check[UDP].chksum
        check = (IPv6 if v6 else IP)(bytes(check))
        assert u.chksum == check[UDP].chksum, k
        joined += body
    assert joined == data
    c = tpb.stop()["tunnel"]
    assert c["gso_packets"] == 1 and c["gso_segments"] == n, c
    assert set(c["drop"]) <= NO_POP, c["drop"]


@pytest.mark.parametrize("l4,want", [("tcp", 0x0000), ("udp", 0xFFFF)])
def test_partial_checksum_that_computes_to_zero(tlab, tpb, l4, want):
    """A CHECKSUM_PARTIAL packet whose checksum computes to zero: TCP sends
    0x0000 (0xffff, "-0", comes from no real sum, and decoders flag it: RFC
    1624, 3); UDP sends 0xffff, because its zero means "no checksum" (RFC
    768)."""
    gw1, gw2 = tlab.iface("gw1", "eth1"), tlab.iface("gw2", "eth0")
    seg = TCP(sport=40000, dport=5201, flags="PA") if l4 == "tcp" else UDP(sport=40000, dport=5202)
    ip = IP(src=labmod.T_PC, dst=labmod.T_SERVER, flags="DF") / seg / Raw(os.urandom(200))
    packet, l4_at, coff = zero_sum_partial(bytes(ip))
    frame = bytes(Ether(src=gw1.mac, dst=gw2.mac, type=0x0800)) + packet
    with Port(tlab.ns("gw1"), "eth1", vnet=True) as port:
        segs = capture_gre(
            tlab, lambda: port.send_vnet(frame, csum_start=14 + l4_at, csum_offset=coff), 1
        )
    assert len(segs) == 1
    inner = segs[0].inner
    assert_zero_sum_completed(inner, packet, l4_at, coff, want)
    c = tpb.stop()["tunnel"]
    assert c["encap_packets"] == 1, c
    assert set(c["drop"]) <= NO_POP, c["drop"]


def test_super_packet_without_payload_is_dropped_and_counted(tlab, tpb):
    """A TCP super-packet whose IPv4 total length leaves no payload (the rest
    of the frame is then padding): there is no segment to make, and the
    packet is dropped and counted gso_bad, where it used to vanish (counted
    as segmented into nothing).  A small packet after it crosses."""
    frame, cstart, coff, _ = super_packet(tlab, "tcp", False)
    ip = bytearray(frame[14:34])
    ip[2:4] = struct.pack("!H", 40)  # IP and TCP headers only
    ip[10:12] = b"\0\0"
    s = sum(struct.unpack("!10H", bytes(ip)))
    s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    empty = frame[:14] + bytes(ip) + frame[34:]
    gw1, gw2 = tlab.iface("gw1", "eth1"), tlab.iface("gw2", "eth0")
    fence = os.urandom(16)
    small = bytes(
        Ether(src=gw1.mac, dst=gw2.mac)
        / IP(src=labmod.T_PC, dst=labmod.T_SERVER, id=0x2D2D)
        / UDP(sport=40000, dport=5202)
        / Raw(fence)
    )

    def send():
        with Port(tlab.ns("gw1"), "eth1", vnet=True) as port:
            port.send_vnet(empty, csum_start=cstart, csum_offset=coff,
                           gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=MSS, hdr_len=cstart + 20)
            port.send_vnet(small)

    segs = capture_gre(tlab, send, 1)
    c = tpb.stop()
    assert len(segs) == 1 and segs[0].inner == small[14:], segs
    t = c["tunnel"]
    dropped = {k: v for k, v in t["drop"].items() if k not in NO_POP}
    assert dropped == {"gso_bad": 1}, t
    assert t["gso_packets"] == 0 and t["gso_segments"] == 0, t
    assert_balance(2, dropped, t["encap_packets"])


# ---- hostile super-packets: a TCP data offset below 5 ------------------------------
#
# RFC 9293 3.1: the data offset counts 32-bit words and is at least 5.  A
# super-packet cut with a shorter TCP header would have each segment's
# flags and checksum written past the header copy made for it.  Only a
# device without a software-segmentation stop in front of TPB delivers one:
# a veth has no tx-gso-robust, so the kernel segments a "dodgy" super-packet
# (from a packet socket or a TAP) in software at each veth it crosses, and
# refuses this one there (ENOMEM to a packet socket on gw1; real GRO never
# merges it).  So these come through a TAP device that is TPB's --out, as a
# NIC driver hands frames up: someone else's tunnel crossing TPB, and GRE
# from the POP (the same segment() code cuts TPB's own tunnel traffic).

TAP = "tap3"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TRANSIT_SRC, TRANSIT_DST = "198.51.100.50", "198.51.100.60"  # not TPB's, not the POP's


@pytest.fixture
def tap_tpb(tlab, tmp_path):
    """`tpb run --in eth2 --out tap3`: a TAP device as --out, into which the
    test writes frames with a vnet header as a NIC driver's GRO hands them
    up (a packet socket on a veth could not send a GRE super-packet)."""
    from tunnel_util import Procs

    with netns(tlab.ns("tpb")):
        fd = os.open("/dev/net/tun", os.O_RDWR)
    procs = Procs(tlab, tmp_path)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", TAP.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        tlab.run("tpb", ["ip", "link", "set", TAP, "up"])
        yield fd, procs.tpb("--out", TAP, "--match", f"ip daddr {labmod.T_SERVER}")
    finally:
        procs.stop_all()
        os.close(fd)


def gre_super_packet(tlab, doff: int, ident: int, transit: bool) -> tuple[bytes, int]:
    """A GRE super-packet as GRO leaves it, 4 x MSS of inner TCP data with
    data offset `doff`: someone else's tunnel (transit) or the POP's GRE to
    TPB.  Returns the frame and where its inner TCP header starts."""
    src, dst = (TRANSIT_SRC, TRANSIT_DST) if transit else (labmod.T_POP, labmod.T_TPB)
    isrc, idst = ("10.9.0.1", "10.9.0.2") if transit else (labmod.T_SERVER, labmod.T_PC)
    inner = IP(src=isrc, dst=idst, id=ident, flags="DF") / TCP(
        sport=1234, dport=80, seq=1, ack=1, flags="PA", dataofs=doff) / Raw(
        bytes(4 * MSS))
    pkt = IP(src=src, dst=dst, id=ident, flags="DF") / GRE(proto=0x0800) / inner
    gw2, gw1 = tlab.iface("gw2", "eth0"), tlab.iface("gw1", "eth1")
    frame = bytearray(bytes(Ether(src=gw2.mac, dst=gw1.mac) / pkt))
    l4 = 14 + 20 + 4 + 20
    frame[l4 + 16 : l4 + 18] = struct.pack(
        "!H", pseudo_sum(bytes(frame), l4 - 20, False, socket.IPPROTO_TCP))
    return bytes(frame), l4


def inject(fd: int, frame: bytes, l4: int) -> None:
    hdr = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
                        l4 + 20, MSS, l4, 16)
    assert os.write(fd, hdr + frame) == len(hdr) + len(frame)


def ids_at_gw1(tlab, send, src: str) -> list[int]:
    """The IP IDs of what reaches gw1 from `src` (outer for transit, the
    inner packets for GRE from the POP) after send(), until a quiet second."""
    with Port(tlab.ns("gw1"), "eth1", capture=True) as cap:
        send()
        got = []
        while (f := cap.recv(1.0)) is not None:
            p = Ether(f.data)
            if IP in p and p[IP].src == src:
                got.append(p[IP].id)
    return got


@pytest.mark.parametrize("doff", [2, 4])
def test_transit_super_packet_with_short_data_offset_counted(tlab, tap_tpb, doff):
    """Someone else's GRE super-packet whose inner TCP data offset is below
    5: TPB, which segments such packets itself, refuses it and counts
    gso_bad on the port; nothing half-made reaches gw1, and a well-formed
    one right after still crosses in its 4 segments."""
    fd, tpb = tap_tpb
    got = ids_at_gw1(tlab, lambda: (
        inject(fd, *gre_super_packet(tlab, doff, 1111, True)),
        inject(fd, *gre_super_packet(tlab, 5, 2222, True))), TRANSIT_SRC)
    assert got == [2222 + k for k in range(4)], got
    c = tpb.stop()
    assert c["in"]["drop_gso_bad"] == 1, c["in"]


@pytest.mark.parametrize("doff", [2, 4])
def test_gre_super_packet_with_short_data_offset_from_the_pop_counted(tlab, tap_tpb, doff):
    """The same from the POP: unwrapped, its inner super-packet could be cut
    by nobody (the kernel refuses it at --in).  TPB counts it gso_bad in the
    tunnel's drops; a well-formed one right after goes to gw1 whole."""
    fd, tpb = tap_tpb
    got = ids_at_gw1(tlab, lambda: (
        inject(fd, *gre_super_packet(tlab, doff, 3333, False)),
        inject(fd, *gre_super_packet(tlab, 5, 4444, False))), labmod.T_SERVER)
    assert got == [4444], got
    c = tpb.stop()["tunnel"]
    assert c["drop"].get("gso_bad") == 1 and c["decap_packets"] == 1, c
