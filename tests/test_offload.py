"""The vnet header path, frame by frame: partial checksums and GSO
super-packets, untagged and behind every kind of VLAN tag.

A gateway sends each frame with a virtio_net_hdr of its own (PACKET_VNET_HDR),
so it reaches TPB just as a frame from a local TCP stack or a GRO'd batch
would: CHECKSUM_PARTIAL, or GSO.  TPB hands that header on; for a tagged frame
it must move csum_start (and hdr_len) past the tag it re-inserts.

Where the kernel finishes the work decides what the far side sees:
  - TPB's ports with tx checksumming off: the kernel completes checksums and
    segments super-packets on TPB's transmit, so a wrong csum_start or
    hdr_len shows as a wrong byte at the far side;
  - default offloads: veth hands the frame on as it is, super-packet and
    partial checksum included.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest
from helpers import assert_consistent, need_tool, pseudo_sum
from rawsock import VIRTIO_NET_HDR_GSO_TCPV4, Port
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw
from wire import DIRECTIONS, End, check_crossed, cross, diff, ends, payload

pytestmark = pytest.mark.netns
LAB_SUFFIX = "o"

TAGS = {
    "untagged": lambda: None,
    "dot1q": lambda: Dot1Q(prio=5, vlan=100),
    "dot1ad": lambda: Dot1AD(prio=2, vlan=200),
    "qinq": lambda: Dot1AD(vlan=200) / Dot1Q(vlan=300),
}
MSS = 1000


def make_partial(frame: bytes, l3: int) -> tuple[bytes, int, int]:
    """The frame as a stack hands it over CHECKSUM_PARTIAL: the L4 checksum
    field holds the pseudo-header sum only.  Returns (frame, csum_start,
    csum_offset)."""
    ihl = (frame[l3] & 0x0F) * 4
    proto = frame[l3 + 9]
    l4 = l3 + ihl
    offset = {socket.IPPROTO_UDP: 6, socket.IPPROTO_TCP: 16}[proto]
    out = bytearray(frame)
    out[l4 + offset : l4 + offset + 2] = struct.pack("!H", pseudo_sum(frame, l3, False, proto))
    return bytes(out), l4, offset


def l2_len(frame: bytes) -> int:
    n = 12
    while struct.unpack_from("!H", frame, n)[0] in (0x8100, 0x88A8):
        n += 4
    return n + 2


def build(s, d, tag, l4, data: bytes) -> bytes:
    eth = Ether(src=s.mac, dst=d.mac)
    ip = IP(src=s.ip4, dst=d.ip4, flags="DF", id=random.randrange(1, 60000)) / l4 / Raw(data)
    t = TAGS[tag]()
    return bytes(eth / t / ip if t is not None else eth / ip)


@pytest.fixture
def egress_csum_off(lab):
    """TPB's ports without tx checksumming (and so without TSO): the kernel
    finishes each checksum, and segments each super-packet, as TPB sends."""
    need_tool("ethtool")
    for i in ("eth2", "eth3"):
        lab.run("tpb", ["ethtool", "-K", i, "tx", "off"])
    try:
        yield
    finally:
        for i in ("eth2", "eth3"):
            lab.run("tpb", ["ethtool", "-K", i, "tx", "on", "sg", "on", "tso", "on", "gso", "on"])


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("tag", TAGS)
def test_partial_checksum_is_finished_right(lab, egress_csum_off, tpb, tag, proto, direction):
    e = ends(lab)
    src, dst = (e[n] for n in DIRECTIONS[direction])
    marker = os.urandom(16)
    l4 = UDP(sport=40000, dport=9) if proto == "udp" else TCP(sport=40000, dport=9, flags="PA")
    good = build(src, dst, tag, l4, payload(marker, 200))
    partial, start, offset = make_partial(good, l2_len(good))
    assert partial != good

    got = cross(
        lab, src, dst, [partial], [marker], vnet=[{"csum_start": start, "csum_offset": offset}]
    )
    check_crossed([good], [marker], got)
    c = tpb.stop()
    assert_consistent(c)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tag", TAGS)
def test_gso_super_packet_crosses_whole(lab, tpb, tag, direction):
    """With TSO on TPB's ports a super-packet leaves TPB whole: the far side
    gets the very bytes sent (checksum still partial, as veth leaves it)."""
    e = ends(lab)
    src, dst = (e[n] for n in DIRECTIONS[direction])
    marker = os.urandom(16)
    tcp = TCP(sport=40000, dport=9, seq=1000, ack=1, flags="PA", window=1000)
    good = build(src, dst, tag, tcp, payload(marker, 3 * MSS))
    assert len(good) > 1514 + 8, "not a super-packet"
    frame, start, offset = make_partial(good, l2_len(good))
    vnet = {
        "csum_start": start,
        "csum_offset": offset,
        "gso_type": VIRTIO_NET_HDR_GSO_TCPV4,
        "gso_size": MSS,
        "hdr_len": start + 20,
    }
    got = cross(lab, src, dst, [frame], [marker], vnet=[vnet])
    check_crossed([frame], [marker], got)
    c = tpb.stop()
    assert_consistent(c)


def segments_ok(original: bytes, segs: list[bytes], mss: int) -> None:
    """What the kernel's TCP segmentation makes of `original` (a super-packet
    with a full checksum): same L2 header, valid checksums, consecutive
    sequence numbers, the payload in order, PSH only on the last."""
    l3 = l2_len(original)
    orig = IP(original[l3:])
    data = bytes(orig[TCP].payload)
    assert len(segs) == -(-len(data) // mss), f"{len(segs)} segments for {len(data)} bytes"
    segs = sorted(segs, key=lambda f: IP(f[l3:])[TCP].seq)
    joined = b""
    for i, f in enumerate(segs):
        assert f[:l3] == original[:l3], diff(original[:l3], f[:l3])
        ip = IP(f[l3:])
        for layer in (IP, TCP):
            sent = ip[layer].chksum
            fresh = ip.copy()
            del fresh[layer].chksum
            assert IP(bytes(fresh))[layer].chksum == sent, (
                f"segment {i}: bad {layer.__name__} checksum"
            )
        assert ip[TCP].seq == orig[TCP].seq + len(joined)
        assert ("P" in str(ip[TCP].flags)) == (i == len(segs) - 1)
        joined += bytes(ip[TCP].payload)
    assert joined == data


def cross_tcp_super_packet(lab, src: End, dst: End, tag: str) -> tuple[bytes, list[bytes]]:
    """Sends a TCP super-packet (3 MSS, partial checksum, TCPV4 vnet header)
    from src; returns it with full checksums, and the frames of its flow
    that reached dst (each segment carries the flow's addresses and ports,
    IP bytes 12-24)."""
    tcp = TCP(sport=random.randrange(20000, 60000), dport=9, seq=1000, ack=1, flags="PA",
              window=1000)
    good = build(src, dst, tag, tcp, payload(os.urandom(16), 3 * MSS))
    assert len(good) > 1514 + 8, "not a super-packet"
    frame, start, offset = make_partial(good, l2_len(good))
    vnet = {
        "csum_start": start,
        "csum_offset": offset,
        "gso_type": VIRTIO_NET_HDR_GSO_TCPV4,
        "gso_size": MSS,
        "hdr_len": start + 20,
    }
    l3 = l2_len(good)
    flow = good[l3 + 12 : l3 + 24]
    got = cross(lab, src, dst, [frame], [flow], vnet=[vnet])
    return good, [f.data for f in got[flow]]


@pytest.mark.parametrize("tag", TAGS)
def test_gso_super_packet_is_segmented_on_egress(lab, egress_csum_off, tpb, tag):
    e = ends(lab)
    src, dst = e["gw1"], e["gw2"]
    good, segs = cross_tcp_super_packet(lab, src, dst, tag)
    c = tpb.stop()
    assert c["out"]["drop_egress_full"] == 0, f"out: {c['out']}"
    segments_ok(good, segs, MSS)
    assert_consistent(c)


def test_segment_checker_accepts_the_kernel_bridge(lab, egress_csum_off):
    """The reference for the test above: the Linux bridge in TPB's place,
    same ports, same offloads, same frame."""
    lab.run("tpb", ["ip", "link", "add", "br-ref", "type", "bridge"])
    try:
        for i in ("eth2", "eth3"):
            lab.run("tpb", ["ip", "link", "set", i, "master", "br-ref"])
        lab.run("tpb", ["ip", "link", "set", "br-ref", "up"])
        e = ends(lab)
        src, dst = e["gw1"], e["gw2"]
        # the bridge floods until it learns gw2's MAC; teach it first
        with Port(lab.ns("gw2"), "eth0") as p:
            p.send(build(dst, src, "untagged", UDP(sport=9, dport=9), b"learn"))
        good, segs = cross_tcp_super_packet(lab, src, dst, "dot1q")
        segments_ok(good, segs, MSS)
    finally:
        lab.run("tpb", ["ip", "link", "del", "br-ref"])
