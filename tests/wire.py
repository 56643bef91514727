"""Frames between the two gateways, across TPB: who is at each end, frame
building blocks, and `cross()`, which sends frames and collects what
arrives at the far side (and anything that came back)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from rawsock import Port
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tpb import lab as labmod

LOCAL_EXPERIMENTAL = 0x88B5  # IEEE 802 local experimental ethertype
TPIDS = (0x8100, 0x88A8, 0x9100)


@dataclass(frozen=True)
class End:
    """One gateway port facing TPB."""

    node: str
    ifname: str
    mac: str
    ip4: str
    ip6: str
    tpb_port: str  # the TPB port it is cabled to: "in" or "out"


def ends(lb: labmod.Lab) -> dict[str, End]:
    return {
        "gw1": End("gw1", "eth1", lb.iface("gw1", "eth1").mac, labmod.GW1, labmod.GW1_6, "in"),
        "gw2": End("gw2", "eth0", lb.iface("gw2", "eth0").mac, labmod.GW2, labmod.GW2_6, "out"),
    }


DIRECTIONS = {"gw1-to-gw2": ("gw1", "gw2"), "gw2-to-gw1": ("gw2", "gw1")}


# -- frames ------------------------------------------------------------------


def payload(marker: bytes, size: int = 32) -> bytes:
    """`size` bytes (at least the marker's): the marker, then 00 01 02 ..."""
    fill = max(0, size - len(marker))
    return marker + (bytes(range(256)) * (fill // 256 + 1))[:fill]


def udp4(s: End, d: End, m: bytes, dst_mac: str | None = None, dst_ip: str | None = None):
    return (
        Ether(src=s.mac, dst=dst_mac or d.mac)
        / IP(src=s.ip4, dst=dst_ip or d.ip4)
        / UDP(sport=40000, dport=9)
        / Raw(payload(m))
    )


def sized(frame: bytes, size: int) -> bytes:
    """Pad an Ethernet frame built by scapy to exactly `size` bytes, with the
    IP/UDP lengths and checksums made to match."""
    pkt = Ether(frame)
    raw = pkt[Raw]
    raw.load = raw.load + bytes(size - len(frame))
    for layer in (IP, UDP):
        if layer in pkt:
            del pkt[layer].len
            del pkt[layer].chksum
    out = bytes(pkt)
    assert len(out) == size, (len(out), size)
    return out


def has_outer_tag(frame: bytes) -> bool:
    return struct.unpack_from("!H", frame, 12)[0] in TPIDS


def diff(want: bytes, got: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
    if at is None:
        at = min(len(want), len(got))
    lo, hi = max(0, at - 4), at + 12
    return (
        f"sent {len(want)} B, got {len(got)} B, first difference at byte {at}: "
        f"sent ...{want[lo:hi].hex()} got ...{got[lo:hi].hex()}"
    )


# -- crossing ----------------------------------------------------------------


def cross(
    lb: labmod.Lab,
    src: End,
    dst: End,
    frames: list[bytes],
    markers: list[bytes],
    vnet: list[dict] | None = None,
) -> dict[bytes, list]:
    """Send `frames` from src; return, per marker, the copies that arrived
    at dst (rawsock.Frame), after checking none came back to src.  With
    `vnet`, each frame goes with a virtio_net_hdr (Port.send_vnet's keywords).

    Fences: after the frames, one fence goes src -> dst; once it is in, a
    second goes dst -> src.  TPB forwards each direction in order, so when
    the second fence is in, every copy TPB could have made of a frame, on
    either side, is in the capture queues already."""
    fence1, fence2 = os.urandom(16), os.urandom(16)

    def fence(a: End, b: End, m: bytes) -> bytes:
        return bytes(Ether(src=a.mac, dst=b.mac, type=LOCAL_EXPERIMENTAL) / Raw(payload(m, 46)))

    with (
        Port(lb.ns(src.node), src.ifname, vnet=vnet is not None) as tx,
        Port(lb.ns(dst.node), dst.ifname) as tx_back,
        Port(lb.ns(dst.node), dst.ifname, capture=True) as rx,
        Port(lb.ns(src.node), src.ifname, capture=True) as rx_back,
    ):
        if vnet is None:
            for f in frames:
                tx.send(f)
            tx.send(fence(src, dst, fence1))
        else:
            for f, kw in zip(frames, vnet, strict=True):
                tx.send_vnet(f, **kw)
            tx.send_vnet(fence(src, dst, fence1))
        got = rx.collect(markers, fence1)
        tx_back.send(fence(dst, src, fence2))
        back = rx_back.collect(markers, fence2)
    for f, m in zip(frames, markers, strict=True):
        loops = [c for c in back[m] if c.data == f]
        assert not loops, f"{len(loops)} copies of the frame came back to {src.node}"
    return got


def check_crossed(frames: list[bytes], markers: list[bytes], got: dict) -> None:
    for f, m in zip(frames, markers, strict=True):
        copies = got[m]
        assert len(copies) == 1, f"frame arrived {len(copies)} times, expected exactly once"
        c = copies[0]
        assert c.data == f, diff(f, c.data)
        # the capture, not TPB, put the outer tag back: it was on the wire
        assert c.tag_from_aux == has_outer_tag(f)


# -- pcap files ------------------------------------------------------------------


def read_pcap(path) -> list[bytes]:
    """The frames of a classic pcap file (what tcpdump -w writes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">"}.get(magic)
    if endian is None:  # nanosecond pcap
        endian = {b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}[magic]
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from(endian + "IIII", data, off)
        if off + 16 + incl > len(data):
            break  # a record tcpdump is still writing
        out.append(data[off + 16 : off + 16 + incl])
        off += 16 + incl
    return out


def write_pcap(path, frames: list[bytes]) -> None:
    hdr = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    recs = b"".join(struct.pack("<IIII", 0, i, len(f), len(f)) + f for i, f in enumerate(frames))
    path.write_bytes(hdr + recs)
