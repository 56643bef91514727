#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/corpus/<harness>/, from frames like the ones
the tests send (scapy): GRE from the POP with key/checksum/sequence number,
its fragments, ARP for the tunnel address, echo requests, keepalives and
their answers, TCP super-packets with a vnet header, IPv6, VLAN tags.  Each
file is one input in the harness's own format (fuzz/README.md); the names
say what is in them.  Deterministic: running it again writes the same files.

    .venv/bin/python fuzz/make_corpus.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

ROOT = Path(__file__).resolve().parent / "corpus"

# The tunnel lab (tpb/lab.py), as fuzz/fuzz.h has it.
LOCAL = "198.51.100.3"          # the bridge's tunnel address
POP = "198.51.100.34"           # its first remote; the POP's own address
POP2 = "198.51.100.50"
PC, SERVER, PC6, SERVER6 = "192.0.2.10", "203.0.113.10", "2001:db8:1::10", "2001:db8:2::10"
OUT_MAC, GW1_MAC, GW2_MAC, TPB_IN_MAC = (
    "02:00:00:00:00:44", "02:00:00:00:00:42", "02:00:00:00:00:45", "02:00:00:00:00:43")
KEY = 7
GRE_UDP_PORT = 4754

# vnet modes (fuzz.h) and the GSO selector byte's "the type that fits"
NONE, RAW, GSO, PARTIAL = 0, 1, 2, 3


def u8(v: int) -> bytes:
    return struct.pack("!B", v & 0xFF)


def u16(v: int) -> bytes:
    return struct.pack("!H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("!I", v & 0xFFFFFFFF)


def mtu(v: int) -> bytes:
    """The u16 that the harnesses turn into MTU v (68 + x % 8933)."""
    return u16(v - 68)


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def gre(inner: Packet | None, key: int | None = KEY, csum: bool = False, seq: int | None = None,
        proto: int | None = None) -> GRE:
    g = GRE(key_present=int(key is not None), chksum_present=int(csum),
            seqnum_present=int(seq is not None))
    if key is not None:
        g.key = key
    if seq is not None:
        g.seqence_number = seq
    if proto is not None:
        g.proto = proto
    return g / inner if inner is not None else g


def tcp4(src: str = SERVER, dst: str = PC, flags: str = "PA", n: int = 64, **kw: Any) -> IP:
    return IP(src=src, dst=dst, **kw) / TCP(sport=5201, dport=40000, flags=flags, seq=1000) / Raw(
        payload(n))


def tcp6(src: str = SERVER6, dst: str = PC6, n: int = 64) -> IPv6:
    return IPv6(src=src, dst=dst) / TCP(sport=5201, dport=40000, flags="PA") / Raw(payload(n))


def udp4(src: str = SERVER, dst: str = PC, n: int = 64) -> IP:
    return IP(src=src, dst=dst) / UDP(sport=9, dport=9) / Raw(payload(n))


# The harnesses' ka_first_id() (tpb_fuzz_ka_id): the POP's first keepalive
# carries it, the bridge's the one after; an answer carries it back.
KA_ID = 0xfffe


def keepalive_of(bridge: str, pop: str, key: int | None, csum: bool, ka_id: int = KA_ID) -> IP:
    """A Cisco keepalive's inner packet: from the far end back to the sender."""
    return IP(src=pop, dst=bridge, ttl=255, id=ka_id) / gre(None, key=key, csum=csum, proto=0)


def udp_gre(g: Packet, sport: int = 0xC123, chksum: int | None = None) -> Packet:
    """GRE-in-UDP (RFC 8086): the GRE packet in UDP to 4754."""
    u = UDP(sport=sport, dport=GRE_UDP_PORT)
    if chksum is not None:
        u.chksum = chksum
    return u / g


def udp_keepalive_of(bridge: str, pop: str, key: int | None, csum: bool, ka_id: int = KA_ID,
                     sport: int = 4754) -> IP:
    """The same over GRE-in-UDP: the inner GRE header in UDP to 4754."""
    return IP(src=pop, dst=bridge, ttl=255, id=ka_id) / udp_gre(
        gre(None, key=key, csum=csum, proto=0), sport=sport)


class Corpus:
    def __init__(self, name: str) -> None:
        self.dir = ROOT / name
        # Findings kept as seeds (regress-*) and seeds made by hand (hand-*)
        # are not the generator's: kept.
        if self.dir.exists():
            for f in self.dir.iterdir():
                if not f.name.startswith(("regress-", "hand-")):
                    f.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, what: str, data: bytes) -> None:
        (self.dir / what).write_bytes(data)


# ---- from_out ---------------------------------------------------------------

def fo_header(key: bool = True, csum: bool = False, seq: bool = False, ka: bool = False,
              router: bool = True, hop: bool = True, nremotes: int = 1,
              mem: int = 0, timeout: int = 0, m: int = 1500, udp: bool = False) -> bytes:
    b0 = key | csum << 1 | seq << 2 | ka << 3 | router << 4 | hop << 5 | udp << 6
    return u8(b0) + u8(nremotes - 1) + u32(KEY) + mtu(m) + u8(mem | timeout << 3)


def fo_frame(frame: bytes, mode: int = NONE, vnet: bytes = b"", tagged: bool = False,
             tag: int = 100) -> bytes:
    fl = tagged | mode << 1
    return u8(0) + u8(fl) + u16(len(frame)) + u8(0) + u16(tag) + frame + vnet


def from_out() -> None:
    c = Corpus("from_out")
    to_us = Ether(src=GW2_MAC, dst=GW1_MAC)
    to_our_mac = Ether(src=GW2_MAC, dst=OUT_MAC)

    def pkt(inner: Packet, key: int | None = KEY, csum: bool = False, seq: int | None = None,
            eth: Packet = to_us, src: str = POP) -> bytes:
        return bytes(eth / IP(src=src, dst=LOCAL) / gre(inner, key=key, csum=csum, seq=seq))

    c.add("gre-key", fo_header() + fo_frame(pkt(tcp4())))
    c.add("gre-key-csum-seq", fo_header(csum=True, seq=True) +
          fo_frame(pkt(tcp4(), csum=True, seq=1)) + fo_frame(pkt(tcp4(n=10), csum=True, seq=2)) +
          fo_frame(pkt(tcp4(n=12), csum=True, seq=2)))
    c.add("gre-nokey-ipv6", fo_header(key=False) + fo_frame(pkt(tcp6(), key=None)))
    c.add("gre-to-our-mac", fo_header() + fo_frame(pkt(udp4(), eth=to_our_mac)))
    c.add("gre-syn-mss", fo_header() +
          fo_frame(pkt(IP(src=SERVER, dst=PC) / TCP(flags="SA", options=[("MSS", 1460)]))))
    c.add("gre-ecn-ce", fo_header() +
          fo_frame(bytes(to_us / IP(src=POP, dst=LOCAL, tos=3) / gre(tcp4(tos=2)))))
    c.add("gre-tagged", fo_header() + fo_frame(pkt(tcp4()), tagged=True))
    c.add("gre-not-peer", fo_header() + fo_frame(pkt(tcp4(), src="192.0.2.99")))
    c.add("gre-wrong-key", fo_header() + fo_frame(pkt(tcp4(), key=8)))
    # the POP fragmented the outer packet; the bridge reassembles
    big = IP(src=POP, dst=LOCAL, id=0x4242) / gre(tcp4(n=2000), csum=True)
    frags = fragment(big, fragsize=1000)
    c.add("fragments", fo_header(csum=True) +
          b"".join(fo_frame(bytes(to_us / f)) for f in frags))
    c.add("fragments-reversed-dup", fo_header(csum=True) +
          b"".join(fo_frame(bytes(to_us / f)) for f in (frags[1], frags[1], frags[0])))
    c.add("fragments-timeout", fo_header(csum=True, timeout=3) + fo_frame(bytes(to_us / frags[0]))
          + u8(5) + u16(2000) + fo_frame(bytes(to_us / frags[1])))
    c.add("fragments-small-memory", fo_header(csum=True, mem=1) +
          b"".join(fo_frame(bytes(to_us / f)) for f in frags))
    # GRO merged GRE packets of one TCP flow: a super-packet, partial checksum
    sp = pkt(tcp4(n=1448 * 3))
    l4 = 14 + 20 + 8 + 20
    c.add("gro-super-packet", fo_header() + fo_frame(sp, GSO, u8(0) + u16(1448)))
    c.add("gro-super-packet-raw", fo_header() + fo_frame(
        sp, RAW, struct.pack("=BBHHHH", 1, 1, l4 + 20, 1448, l4, 16)))
    c.add("partial-csum", fo_header() + fo_frame(pkt(udp4()), PARTIAL))
    # ARP for the tunnel address, and for someone else
    arp = Ether(src=GW2_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=GW2_MAC, psrc="198.51.100.1", pdst=LOCAL)
    c.add("arp-for-us", fo_header() + fo_frame(bytes(arp)))
    c.add("arp-tagged", fo_header() + fo_frame(bytes(arp), tagged=True))
    c.add("arp-other", fo_header() + fo_frame(bytes(Ether(src=GW2_MAC, dst="ff:ff:ff:ff:ff:ff") /
                                                   ARP(op=1, psrc="198.51.100.1",
                                                       pdst="198.51.100.9"))))
    echo = to_our_mac / IP(src="198.51.100.1", dst=LOCAL) / ICMP(type=8, id=1, seq=1) / Raw(
        payload(56))
    c.add("echo", fo_header() + fo_frame(bytes(echo)))
    c.add("udp-to-us", fo_header() + fo_frame(bytes(to_us / IP(src=POP, dst=LOCAL) / UDP())))
    # keepalives: our own answered, the POP's reflected
    c.add("keepalive-answer", fo_header(ka=True) + u8(5) + u16(0) +
          fo_frame(bytes(to_us / keepalive_of(LOCAL, POP, KEY, False, KA_ID + 1))) +
          u8(5) + u16(1000))
    c.add("keepalive-answer-csum", fo_header(csum=True, ka=True) + u8(5) + u16(0) +
          fo_frame(bytes(to_us / keepalive_of(LOCAL, POP, KEY, True, KA_ID + 1))))
    c.add("keepalive-reflect", fo_header() + fo_frame(pkt(keepalive_of(POP, LOCAL, KEY, False))))
    c.add("keepalive-tick", fo_header(ka=True, nremotes=3, csum=True, seq=True) +
          u8(5) + u16(0) + u8(5) + u16(1000) + u8(5) + u16(4000))
    c.add("reconfigure", fo_header(ka=True, nremotes=2) + u8(6) + u8(0x0f) + u8(2) + u8(1) +
          fo_frame(pkt(tcp4(), key=KEY)))
    c.add("learn-hop", fo_header(hop=False, router=False, ka=True) + u8(7) + u8(3) +
          bytes.fromhex("020000000045020000000042") + u16(0x8100) + u16(5) + u8(5) + u16(0))
    # bridged: someone else's GRE super-packet, plain frames
    other = Ether(src=GW2_MAC, dst=GW1_MAC) / IP(src="198.51.100.77", dst="192.0.2.20") / gre(
        tcp4(n=1400 * 3), key=None)
    c.add("transit-gre-super-packet", fo_header() + fo_frame(bytes(other), GSO, u8(0) + u16(1400)))
    c.add("plain-udp", fo_header() + fo_frame(bytes(Ether(src=GW2_MAC, dst=GW1_MAC) / udp4())))
    # GRE-in-UDP (encap = "udp")
    def upkt(inner: Packet, csum: bool = False, seq: int | None = None, **kw: Any) -> bytes:
        return bytes(to_us / IP(src=POP, dst=LOCAL) / udp_gre(gre(inner, csum=csum, seq=seq), **kw))

    c.add("udp-gre-key", fo_header(udp=True) + fo_frame(upkt(tcp4())))
    c.add("udp-gre-csum-seq", fo_header(udp=True, csum=True, seq=True) +
          fo_frame(upkt(tcp4(), csum=True, seq=1)) + fo_frame(upkt(udp4(), csum=True, seq=2)))
    c.add("udp-zero-csum", fo_header(udp=True) + fo_frame(upkt(tcp4(), chksum=0)))
    c.add("udp-bad-csum", fo_header(udp=True) + fo_frame(upkt(tcp4(), chksum=0x1234)))
    c.add("udp-from-4754", fo_header(udp=True) + fo_frame(bytes(
        to_us / IP(src=POP, dst=LOCAL) / UDP(sport=GRE_UDP_PORT, dport=40000) / gre(tcp4()))))
    ubig = IP(src=POP, dst=LOCAL, id=0x4243) / udp_gre(gre(tcp4(n=2000)))
    c.add("udp-fragments", fo_header(udp=True) +
          b"".join(fo_frame(bytes(to_us / f)) for f in fragment(ubig, fragsize=1000)))
    c.add("udp-keepalive-answer", fo_header(udp=True, ka=True) + u8(5) + u16(0) +
          fo_frame(bytes(to_us / udp_keepalive_of(LOCAL, POP, KEY, False, KA_ID + 1))) +
          u8(5) + u16(1000))
    c.add("udp-keepalive-reflect", fo_header(udp=True) + fo_frame(
        upkt(udp_keepalive_of(POP, LOCAL, KEY, False, sport=KA_ID))))
    # A UDP GSO super-packet of GRE-in-UDP (another TPB's udpgso.c): pieces of
    # one size but the last, each GRE + inner packet, the checksum partial;
    # the last one shorter.
    pieces = [bytes(gre(tcp4(n=200, id=k))) for k in range(3)] + [bytes(gre(tcp4(n=50, id=9)))]
    body = b"".join(pieces)
    sup = bytes(to_us / IP(src=POP, dst=LOCAL, proto=17, len=28 + len(body))) + struct.pack(
        "!HHHH", GRE_UDP_PORT, GRE_UDP_PORT, 8 + len(body), 0) + body
    c.add("udp-gso-pieces", fo_header(udp=True) + fo_frame(
        sup, RAW, struct.pack("=BBHHHH", 1, 5, 14 + 28, len(pieces[0]), 14 + 20, 6)))
    # ... and one whose pieces follow on, segments of one TCP flow: merged
    segs = [IP(src=SERVER, dst=PC, id=7 + k) / TCP(sport=5201, dport=40000, seq=1000 + 200 * k,
                                                  flags="PA" if k == 3 else "A") /
            Raw(payload(200 if k < 3 else 50, k)) for k in range(4)]
    pieces = [bytes(gre(s)) for s in segs]
    body = b"".join(pieces)
    sup = bytes(to_us / IP(src=POP, dst=LOCAL, proto=17, len=28 + len(body))) + struct.pack(
        "!HHHH", GRE_UDP_PORT, GRE_UDP_PORT, 8 + len(body), 0) + body
    c.add("udp-gso-merge", fo_header(udp=True) + fo_frame(
        sup, RAW, struct.pack("=BBHHHH", 1, 5, 14 + 28, len(pieces[0]), 14 + 20, 6)))


# ---- encap ------------------------------------------------------------------

def en(frame: bytes, key: bool = True, csum: bool = False, seq: bool = False,
       pmtud: bool = True, frag_outer: bool = False, tagged: bool = False,
       on_down_drop: bool = False, down: bool = False, df: int = 0, mode: int = NONE,
       fix: bool = False, mss: int | None = None, m: int = 1500, vnet: bytes = b"",
       ttl: int = 64, tos: int | None = None, udp: bool = False,
       no_uso: bool = False) -> bytes:
    b0 = (key | csum << 1 | seq << 2 | pmtud << 3 | frag_outer << 4 | tagged << 5 |
          on_down_drop << 6 | down << 7)
    b1 = df | (tos is None) << 3 | mode << 4 | fix << 6 | (mss is not None) << 7
    out = u8(b0) + u8(b1) + mtu(m) + (u16(mss) if mss is not None else b"")
    return (out + u8(2 | udp << 3 | no_uso << 4) + u32(KEY) + u8(ttl) + u8(tos or 0) + u8(0) +
            u16(100) + vnet + frame)


def encap() -> None:
    c = Corpus("encap")
    eth = Ether(src=GW1_MAC, dst=GW2_MAC)
    c.add("tcp", en(bytes(eth / tcp4(PC, SERVER))))
    c.add("tcp-csum-seq", en(bytes(eth / tcp4(PC, SERVER)), csum=True, seq=True))
    c.add("udp-tagged", en(bytes(eth / udp4(PC, SERVER)), tagged=True))
    c.add("ipv6", en(bytes(eth / tcp6(PC6, SERVER6)), key=False))
    c.add("syn-mss", en(bytes(eth / IP(src=PC, dst=SERVER) /
                             TCP(flags="S", options=[("NOP", None), ("MSS", 1460)]))))
    c.add("syn-mss-set", en(bytes(eth / IP(src=PC, dst=SERVER) /
                                 TCP(flags="S", options=[("MSS", 1460)])), mss=1200))
    big4 = bytes(eth / tcp4(PC, SERVER, n=1460))
    c.add("too-big-df", en(bytes(eth / IP(src=PC, dst=SERVER, flags="DF") / TCP(flags="A") /
                                 Raw(payload(1460)))))
    c.add("too-big-frag-inner", en(big4))
    c.add("too-big-frag-outer", en(big4, frag_outer=True))
    c.add("too-big-ipv6", en(bytes(eth / tcp6(PC6, SERVER6, n=1460))))
    c.add("too-big-nopmtud", en(bytes(eth / IP(src=PC, dst=SERVER, flags="DF") / UDP() /
                                      Raw(payload(1472))), pmtud=False))
    c.add("small-mtu", en(bytes(eth / udp4(PC, SERVER, n=300)), m=576, csum=True, seq=True))
    c.add("jumbo", en(bytes(eth / udp4(PC, SERVER, n=8000)), m=9000))
    c.add("df-set", en(bytes(eth / udp4(PC, SERVER)), df=1, tos=0x28))
    c.add("df-clear", en(bytes(eth / udp4(PC, SERVER)), df=2, ttl=1))
    c.add("fragment-in", en(bytes(eth / fragment(IP(src=PC, dst=SERVER) / UDP() /
                                                 Raw(payload(3000)), 1480)[0])))
    # TSO super-packets, partial checksums
    for name, inner, gso in (("tso4", tcp4(PC, SERVER, n=1448 * 4), 0),
                             ("tso6", tcp6(PC6, SERVER6, n=1428 * 4), 0),
                             ("uso4", udp4(PC, SERVER, n=1472 * 3), 0)):
        f = bytes(eth / inner)
        c.add(name, en(f, mode=GSO, fix=True, vnet=u8(gso) + u16(1400)))
        c.add(name + "-frag", en(f, mode=GSO, fix=True, vnet=u8(gso) + u16(1448), m=1000,
                                 pmtud=False))
    c.add("ufo", en(bytes(eth / udp4(PC, SERVER, n=3000)), mode=GSO, fix=True,
                    vnet=u8(0x83) + u16(1472)))
    c.add("partial-udp", en(bytes(eth / udp4(PC, SERVER)), mode=PARTIAL, fix=True))
    c.add("partial-tcp", en(bytes(eth / tcp4(PC, SERVER)), mode=PARTIAL, fix=True))
    c.add("tunnel-down-bypass", en(bytes(eth / tcp4(PC, SERVER)), down=True))
    c.add("tunnel-down-drop", en(bytes(eth / tcp4(PC, SERVER)), down=True, on_down_drop=True))
    c.add("arp-selected", en(bytes(eth / ARP())))
    # GRE-in-UDP (encap = "udp")
    c.add("udp-tcp", en(bytes(eth / tcp4(PC, SERVER)), udp=True))
    c.add("udp-csum-seq-ipv6", en(bytes(eth / tcp6(PC6, SERVER6)), csum=True, seq=True, udp=True))
    c.add("udp-too-big-frag-inner", en(big4, udp=True))
    c.add("udp-too-big-frag-outer", en(big4, frag_outer=True, udp=True))
    c.add("udp-too-big-df", en(bytes(eth / IP(src=PC, dst=SERVER, flags="DF") / TCP(flags="A") /
                                     Raw(payload(1460))), udp=True))
    c.add("udp-tso4-frag", en(bytes(eth / tcp4(PC, SERVER, n=1448 * 4)), mode=GSO, fix=True,
                              vnet=u8(0) + u16(1448), m=1000, pmtud=False, udp=True))
    c.add("udp-small-mtu", en(bytes(eth / udp4(PC, SERVER, n=300)), m=576, udp=True))
    # super-packets as UDP GSO messages (udpgso.c), the harness cutting them
    # as the kernel does; and as a kernel before 6.2 sends them, one by one
    tso4 = bytes(eth / tcp4(PC, SERVER, n=1448 * 5))
    c.add("udp-gso-tso4", en(tso4, mode=GSO, fix=True, vnet=u8(0) + u16(1400), udp=True))
    c.add("udp-gso-tso4-csum-seq", en(tso4, mode=GSO, fix=True, vnet=u8(0) + u16(1400),
                                      udp=True, csum=True, seq=True))
    c.add("udp-gso-tso6", en(bytes(eth / tcp6(PC6, SERVER6, n=1428 * 5)), mode=GSO, fix=True,
                             vnet=u8(0) + u16(1400), udp=True, key=False))
    c.add("udp-gso-uso4", en(bytes(eth / udp4(PC, SERVER, n=1472 * 4)), mode=GSO, fix=True,
                             vnet=u8(0) + u16(1400), udp=True))
    c.add("udp-gso-tso4-no-uso", en(tso4, mode=GSO, fix=True, vnet=u8(0) + u16(1400),
                                    udp=True, no_uso=True))
    c.add("icmp-ratelimited", en(bytes(eth / IP(src=PC, dst=SERVER, flags="DF") / ICMP() /
                                       Raw(payload(1500)))))


# ---- forward ----------------------------------------------------------------

def fw(frame: bytes, mode: int = NONE, vnet: bytes = b"", tagged: bool = False,
       fix: bool = False, port: int = 0) -> bytes:
    return u8(tagged | mode << 1 | fix << 3 | port << 4) + u8(0) + u16(100) + vnet + frame


def forward() -> None:
    c = Corpus("forward")
    eth = Ether(src=GW2_MAC, dst=GW1_MAC)
    transit = IP(src="198.51.100.77", dst="192.0.2.20")
    gso = u8(0) + u16(1400)
    c.add("plain", fw(bytes(eth / udp4())))
    c.add("plain-tagged", fw(bytes(eth / udp4()), tagged=True, port=1))
    c.add("tcp-super-packet", fw(bytes(eth / tcp4(n=1448 * 3)), GSO, gso, fix=True))
    c.add("gre-super-packet", fw(bytes(eth / transit / gre(tcp4(n=1400 * 3), key=None)), GSO,
                                 gso, fix=True))
    c.add("gre-key-csum-super-packet", fw(bytes(eth / transit / gre(tcp4(n=1400 * 3), csum=True)),
                                          GSO, gso, fix=True, tagged=True))
    c.add("gre-seq-super-packet", fw(bytes(eth / transit / gre(tcp4(n=1400 * 3), seq=1)),
                                     GSO, gso, fix=True))
    c.add("gre-ipv6-super-packet", fw(bytes(eth / transit / gre(tcp6(n=1400 * 3), key=None)),
                                      GSO, gso, fix=True))
    c.add("ipip-super-packet", fw(bytes(eth / IP(src="198.51.100.77", dst="192.0.2.20", proto=4) /
                                        tcp4(n=1400 * 3)), GSO, gso, fix=True))
    c.add("ip6-outer-super-packet", fw(bytes(eth / IPv6(src="2001:db8::77", dst="2001:db8::20") /
                                             gre(tcp4(n=1400 * 3), key=None)), GSO, gso, fix=True))
    c.add("partial", fw(bytes(eth / udp4()), PARTIAL, fix=True))


# ---- reasm ------------------------------------------------------------------

def re_dg(ihl_words: int, length: int, seed: int, big: bool = False) -> bytes:
    return u8((ihl_words - 5) | (0xC0 if big else 0)) + u32(seed) + u16(length)


def re_frag(dg: int, start: int, length: int, v: int = 0) -> bytes:
    return u8(dg << 6) + u8(v) + u16(start // 8) + u16(length)


def reasm() -> None:
    c = Corpus("reasm")
    dgs = re_dg(5, 2000, 1) + re_dg(6, 1480, 2) + re_dg(15, 100, 3) + re_dg(5, 60000, 4, True)
    c.add("in-order", u8(0) + dgs + re_frag(0, 0, 1000) + re_frag(0, 1000, 1000))
    c.add("reversed", u8(0) + dgs + re_frag(1, 736, 744) + re_frag(1, 0, 736))
    c.add("duplicate", u8(0) + dgs + re_frag(0, 0, 1000) + re_frag(0, 0, 1000) +
          re_frag(0, 1000, 1000))
    c.add("overlap", u8(0) + dgs + re_frag(0, 0, 1000) + re_frag(0, 504, 1000))
    c.add("false-end", u8(0) + dgs + re_frag(0, 0, 1000) + re_frag(0, 1000, 200, 4) +
          re_frag(0, 1000, 1000))
    c.add("unaligned", u8(0) + dgs + re_frag(2, 0, 50, 16 | 8) + re_frag(2, 56, 44))
    c.add("timeout", u8(3 << 3) + dgs + re_frag(0, 0, 1000) + u8(7) + u8(1) + u16(0) + u16(0) +
          u16(1001) + re_frag(0, 1000, 1000))
    c.add("memory-bound", u8(2) + dgs + re_frag(0, 0, 1000) + re_frag(1, 0, 1000) +
          re_frag(0, 1000, 1000))
    c.add("big", u8(0) + dgs + b"".join(re_frag(3, o, 8000) for o in range(0, 60000, 8000)))
    c.add("raw", u8(0) + dgs + u8(6) + u8(0) + u16(0) + u16(100) +
          bytes(IP(src="10.255.0.1", dst=LOCAL, flags="MF", proto=47) / Raw(payload(100))))


# ---- pop --------------------------------------------------------------------

def pop_header(peers: list[tuple[int, bool, bool, bool, bool, int]],
               prefixes: list[tuple[bool, int, int, int]], learn: int = 0,
               tun_mtu: int | None = None) -> bytes:
    """peers: (pool index, has_key, csum, seq, keepalive, key);
    prefixes: (ipv6, len, peer, last byte)."""
    b = (len(peers) - 1) | learn << 2 | (tun_mtu is not None) << 4 | len(prefixes) << 5
    out = u8(b) + (mtu(tun_mtu) if tun_mtu is not None else b"")
    for idx, k, cs, sq, ka, key in peers:
        out += u8(idx | k << 2 | cs << 3 | sq << 4 | ka << 7) + u8(key)
    for v6, plen, peer, last in prefixes:
        out += u8(v6 | peer << 1) + u8(plen - (0 if v6 else 96)) + u8(last)
    return out


BRIDGES = ["198.51.100.3", "198.51.100.19", "198.51.100.35", "198.51.100.51"]


def pf(ip: bytes, fix: bool = False, sel: int = 0, partial: bool = False) -> bytes:
    return u8(0) + u8(fix | sel << 1 | partial << 4) + u16(len(ip)) + ip


def pu(payload_: bytes, sel: int = 0, sport: int = 0xC123, fix: bool = True, tos: int = 0) -> bytes:
    """A GRE-in-UDP datagram's payload as the POP's UDP socket hands it over,
    from pool[sel]:sport."""
    return u8(1) + u8(fix | sel << 1) + u8(tos) + u16(sport) + u16(len(payload_)) + payload_


def pt(ip: bytes, mode: int = NONE, fix: bool = False, gso_size: int = 0,
       refuse_gso: bool = False) -> bytes:
    """A packet read from the TUN device (mode GSO: a super-packet of
    gso_size); refuse_gso: the UDP socket refuses UDP GSO messages."""
    out = u8(3) + u8(fix | mode << 1 | refuse_gso << 4) + u16(len(ip)) + ip
    return out + (u8(0) + u16(gso_size) if mode == GSO else b"")


def pop() -> None:
    c = Corpus("pop")
    two = pop_header([(0, True, False, False, False, KEY), (1, False, True, True, False, 0)],
                     [(False, 122, 0, 0), (False, 122, 1, 64)])
    b1 = IP(src=BRIDGES[0], dst=POP)
    b2 = IP(src=BRIDGES[1], dst=POP)
    c.add("from-bridge", two + pf(bytes(b1 / gre(tcp4(PC, SERVER)))))
    c.add("from-bridge-csum-seq", two + pf(bytes(b2 / gre(udp4("192.0.2.70", SERVER), key=None,
                                                          csum=True, seq=1))) +
          pf(bytes(b2 / gre(udp4("192.0.2.70", SERVER), key=None, csum=True, seq=1))))
    c.add("from-bridge-ipv6", two + pf(bytes(b1 / gre(tcp6(PC6, SERVER6)))))
    c.add("from-unknown", two + pf(bytes(IP(src="192.0.2.99", dst=POP) / gre(tcp4()))))
    c.add("keepalive-reflect", two + pf(bytes(b1 / gre(keepalive_of(BRIDGES[0], POP, KEY, False)))))
    c.add("keepalive-answer", pop_header([(0, True, False, False, True, KEY)], []) +
          u8(5) + u16(0) + u8(0) +
          pf(bytes(IP(src=BRIDGES[0], dst=POP, id=KA_ID) / gre(None, key=KEY, proto=0))))
    c.add("keepalives", pop_header([(0, True, True, True, True, KEY),
                                    (1, False, False, False, True, 0)], []) +
          u8(5) + u16(0) + u8(0) + u8(5) + u16(1000) + u8(0) + u8(5) + u16(5000) + u8(1))
    c.add("to-bridge-prefix", two + pt(bytes(tcp4(SERVER, "192.0.2.10"))) +
          pt(bytes(udp4(SERVER, "192.0.2.70"))))
    c.add("to-bridge-learned", pop_header([(0, True, False, False, False, KEY)], [], learn=0) +
          pf(bytes(b1 / gre(tcp4("10.1.2.3", SERVER)))) + pt(bytes(tcp4(SERVER, "10.1.2.3"))) +
          u8(7) + u32(301000) + pt(bytes(tcp4(SERVER, "10.1.2.3"))))
    c.add("to-bridge-no-peer", two + pt(bytes(tcp4(SERVER, "10.9.9.9"))))
    c.add("to-bridge-partial", two + pt(bytes(udp4(SERVER, "192.0.2.10")), PARTIAL, fix=True))
    c.add("to-bridge-ipv6", pop_header([(0, False, False, False, False, 0)],
                                       [(True, 64, 0, 0)]) +
          pt(bytes(IPv6(src=SERVER6, dst="2001:db8::10") / UDP() / Raw(payload(40)))))
    # the host's GRO merged GRE packets: bigger than the TUN MTU, partial TCP checksum
    big = b1 / gre(tcp4(PC, SERVER, n=1448 * 3), csum=True)
    c.add("gro-merged", pop_header([(0, True, True, False, False, KEY)], [(False, 122, 0, 0)],
                                   tun_mtu=1500) + pf(bytes(big), fix=True, partial=True))
    c.add("rcvbuf-full", two + u8(2) + u8(3 << 1) + pf(bytes(b1 / gre(tcp4(PC, SERVER)))) +
          u8(2) + u8(1) + u32(0xfffffff0) + u8(2) + u8(1) + u32(5))
    c.add("reload", two + pf(bytes(b1 / gre(tcp4("10.1.2.3", SERVER)))) + u8(6) +
          pop_header([(1, False, True, True, False, 0), (0, True, False, False, False, KEY)],
                     [(False, 120, 0, 0)]) + pt(bytes(tcp4(SERVER, "10.1.2.3"))))
    pop_udp(c)


def pop_udp(c: Corpus) -> None:
    """GRE-in-UDP peers (key byte 0x40) and NAT'd ones (any: 0x80 | 0x40)."""
    udp, nat = 0x40, 0xC0
    nat_addr = 4                    # pool[4], 192.0.2.1: the NAT's address
    one = pop_header([(0, True, False, False, False, KEY | udp)], [(False, 122, 0, 0)])
    c.add("udp-from-bridge", one + pu(bytes(gre(tcp4(PC, SERVER)))) +
          pt(bytes(tcp4(SERVER, "192.0.2.10"))))
    c.add("udp-from-bridge-csum", pop_header([(0, False, True, True, False, udp)],
                                             [(False, 122, 0, 0)]) +
          pu(bytes(gre(udp4(PC, SERVER), key=None, csum=True, seq=1))))
    c.add("udp-keepalives", pop_header([(0, True, False, False, True, KEY | udp)], []) +
          u8(5) + u16(0) + u8(0) + pu(bytes(gre(None, key=KEY, proto=0)), sport=KA_ID) +
          u8(5) + u16(1000) + u8(0))
    c.add("udp-keepalive-reflect", one + pu(bytes(gre(udp_keepalive_of(BRIDGES[0], POP, KEY,
                                                                       False)))))
    two_nat = pop_header([(0, True, False, False, False, KEY | nat),
                          (1, True, False, False, False, 9 | nat)],
                         [(False, 122, 0, 0), (False, 122, 1, 64)])
    c.add("udp-nat-learn", two_nat + pt(bytes(tcp4(SERVER, "192.0.2.10"))) +
          pu(bytes(gre(tcp4(PC, SERVER))), sel=nat_addr, sport=40000) +
          pu(bytes(gre(udp4("192.0.2.70", SERVER), key=9)), sel=nat_addr, sport=40001) +
          pt(bytes(tcp4(SERVER, "192.0.2.10"))) + pt(bytes(udp4(SERVER, "192.0.2.70"))))
    c.add("udp-nat-keepalive-reflect", two_nat + pu(bytes(gre(udp_keepalive_of(
        "10.0.0.2", POP, KEY, False, sport=4754))), sel=nat_addr, sport=40002) +
          pt(bytes(tcp4(SERVER, "192.0.2.10"))))
    # a path that refuses UDP GSO (a route MTU below the datagrams): the
    # super-packet's datagrams one by one, and the peer's next one too
    sp = bytes(tcp4(SERVER, "192.0.2.10", n=1400 * 4))
    c.add("udp-to-bridge-uso-refused",
          pop_header([(0, True, False, False, False, KEY | udp)], [(False, 122, 0, 0)],
                     tun_mtu=1500) +
          pt(sp, GSO, fix=True, gso_size=1400, refuse_gso=True) +
          pt(sp, GSO, fix=True, gso_size=1400))
    c.add("udp-nat-wrong-key", two_nat + pu(bytes(gre(tcp4(PC, SERVER), key=8)), sel=nat_addr))
    c.add("udp-nat-reload", two_nat + pu(bytes(gre(tcp4(PC, SERVER))), sel=nat_addr, sport=40000) +
          u8(6) + pop_header([(1, True, False, False, False, KEY | nat)], [(False, 122, 0, 0)]) +
          pt(bytes(tcp4(SERVER, "192.0.2.10"))))


# ---- gre --------------------------------------------------------------------

def gr(g: bytes, rx: int = 0, next_seq: int = 0, enc: int = 0) -> bytes:
    return u8(rx) + u32(KEY) + u32(next_seq) + u8(enc) + u8(64) + u8(0) + u32(KEY) + u32(9) + \
        u8(1) + u8(2) + g


def gre_corpus() -> None:
    c = Corpus("gre")
    inner = bytes(tcp4())
    c.add("key", gr(bytes(gre(None, key=KEY)) + inner, rx=1))
    c.add("csum", gr(bytes(gre(tcp4(), key=None, csum=True)), rx=2, enc=4))
    c.add("key-csum-seq", gr(bytes(gre(tcp4(), csum=True, seq=5)), rx=1 | 2 | 4 | 8, next_seq=5,
                             enc=2 | 4 | 8))
    c.add("seq-stale", gr(bytes(gre(tcp4(), seq=4)), rx=1 | 4 | 8, next_seq=5))
    c.add("keepalive-answer", gr(bytes(gre(None, key=KEY, proto=0)), rx=1))
    c.add("ipv6", gr(bytes(gre(tcp6(), key=None)), enc=1))
    c.add("version-1", gr(b"\x00\x01\x08\x00" + inner))
    c.add("routing-flag", gr(b"\x40\x00\x08\x00" + inner))
    c.add("truncated", gr(b"\xb0\x00\x08\x00\x00"))


def main() -> int:
    for make in (from_out, encap, forward, reasm, pop, gre_corpus):
        make()
    for d in sorted(ROOT.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
