"""--out's MTU at its limits: too small for the tunnel at start and while
running, followed when it changes, and packets no IPv4 header can describe.

The tunnel's smallest MTU is RFC 791's 68 bytes (a 60-byte header and the
smallest fragment, 8) plus the outer IPv4 and GRE headers: 92 without GRE
options, 104 with checksum, key and sequence number (encap.c,
encap_min_mtu).  Below it TPB refuses to start, with one line and exit
status 2; while running, --out's MTU is read every second and everything
the tunnel does follows it (fragment size, ICMP next-hop MTU, MSS clamp);
below the minimum every selected frame is dropped and counted
(mtu_too_small), and the rest of TPB goes on.

The tunnel lab with `tpb pop` on the pop (no GRE options: overhead 24);
"the out link" is TPB's eth3 and gw2's eth0, both ends set alike.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

import pytest
from helpers import inet_sum, received, wait_for
from pop_util import (
    Capture,
    Daemons,
    FrameSender,
    assert_ping_ok,
    mac,
    need_root,
    ping,
    tunnel_args,
)
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from tunnel_util import exclusive_lab, parse_gre, tpb_leftovers

from tpb import lab as labmod
from tpb.lab import T_GW2, T_PC, T_POP, T_SERVER, T_TPB

pytestmark = pytest.mark.netns

OVERHEAD = 24
TPB = tunnel_args(T_TPB)
OUT_LINK = (("tpb", "eth3"), ("gw2", "eth0"))
NOTICED = 6.0  # the loop reads the MTU every second and wakes at least as often


@pytest.fixture(scope="module")
def mlab(tmp_path_factory):
    need_root()
    with exclusive_lab(labmod.tunnel, "tpbmtl") as lb:
        pops = Daemons(tmp_path_factory.mktemp("pop"))
        try:
            pops.pop(lb, "--local", T_POP, "--peer", f"{T_TPB},prefix=192.0.2.0/26")
            yield lb
        finally:
            pops.close()


def set_out_mtu(lab, mtu: int) -> None:
    for node, dev in OUT_LINK:
        lab.run(node, ["ip", "link", "set", "dev", dev, "mtu", str(mtu)])


@pytest.fixture
def daemons(mlab, tmp_path):
    for node in ("pc", "gw1", "gw2", "server", "pop"):
        mlab.run(node, ["ip", "route", "flush", "cache"])
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.close()
        set_out_mtu(mlab, 1500)


def from_tpb(f: bytes) -> bool:
    g = parse_gre(f)
    return g is not None and g.src == T_TPB


# ---- too small at start: one line, exit 2, nothing left behind ---------------------


@pytest.mark.parametrize(
    "opts,need",
    [((), 92), (("--csum", "--key", "7", "--seq"), 104)],
    ids=["plain-gre", "csum-key-seq"],
)
def test_mtu_too_small_at_start_refused(mlab, daemons, opts, need):
    set_out_mtu(mlab, need - 1)
    argv = [sys.executable, "-m", "tpb", "run", "--in", "eth2", "--out", "eth3", *TPB, *opts]
    res = mlab.run("tpb", argv, check=False, timeout=30)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    # tpb run's own start checks (the same as `tpb check`'s) refuse it
    # before the C helper's would
    assert res.stderr.splitlines() == [
        f"tpb: --out eth3: MTU {need - 1} leaves 67 bytes inside the tunnel "
        f"(overhead {need - 68}); at least {need} is needed"
    ], res.stderr
    assert res.stdout == ""
    assert tpb_leftovers(mlab) == []


def test_mtu_at_the_minimum_carries_the_tunnel(mlab, daemons):
    """At exactly 92 TPB starts, and a 228-byte packet leaves in inner
    fragments of 20 + 48 bytes, each GRE packet 92 bytes at most."""
    set_out_mtu(mlab, 92)
    tpb = daemons.run(mlab, *TPB)
    with Capture(mlab, "gw2", "eth0", keep=from_tpb, incoming_only=True) as cap:
        ping(mlab, "pc", T_SERVER, count=1, size=200, df="dont", wait=1)
        frames = cap.stop()
    c = tpb.stop()["tunnel"]
    ips = [f.data[14 : 14 + struct.unpack_from("!H", f.data, 16)[0]] for f in frames]
    assert [len(ip) for ip in ips] == [92, 92, 92, 92, 60], [len(ip) for ip in ips]
    offsets = [struct.unpack_from("!H", ip, 24 + 6)[0] for ip in ips]
    assert offsets == [0x2000, 0x2006, 0x200C, 0x2012, 0x0018], [hex(o) for o in offsets]
    assert c["fragments"] == 5 and c["drop"] == {}, c


# ---- too small while running: counted drops, TPB alive, back when raised ------------


def options_packet(lab) -> bytes:
    """A selected IPv4 packet with 24 bytes of options (IHL 11), DF clear,
    too big for a 68-byte link: inner fragmentation at that MTU would cut
    0-byte pieces (68 - 24 - 44 = 0) forever, were it tried."""
    ip = IP(src=T_PC, dst=T_SERVER, ttl=64, options=b"\x01" * 24) / (b"\xa5" * 200)
    return bytes(Ether(src=mac(lab, "gw1", "eth1"), dst=mac(lab, "gw2", "eth0")) / ip)


def test_mtu_below_minimum_while_running(mlab, daemons):
    tpb = daemons.run(mlab, *TPB)
    assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2), 2)
    set_out_mtu(mlab, 68)
    time.sleep(NOTICED / 2)
    with FrameSender(mlab, "gw1", "eth1") as tx:
        tx.send(options_packet(mlab))
    lost = ping(mlab, "pc", T_SERVER, count=5, wait=1)
    assert received(lost) == 0, lost.stdout
    # alive: it answers ARP and echo for the tunnel address, and bridges
    mlab.run("gw2", ["ip", "neigh", "flush", "dev", "eth0"])
    assert_ping_ok(ping(mlab, "gw2", T_TPB, count=2, size=16), 2)
    assert_ping_ok(ping(mlab, "pc", T_GW2, count=2, size=16), 2)
    set_out_mtu(mlab, 1500)
    time.sleep(NOTICED / 2)
    assert_ping_ok(ping(mlab, "pc", T_SERVER, count=3), 3)
    c = tpb.stop()
    t = c["tunnel"]
    assert t["drop"] == {"mtu_too_small": 6}, t["drop"]
    assert t["echo_replies"] == 2 and t["encap_packets"] == 5, t
    assert c["out"]["drop_too_big"] == 0, c["out"]


# ---- lowered while running: fragments, ICMP and the MSS clamp follow ------------------


def syn_frame(lab) -> bytes:
    ip = IP(src=T_PC, dst=T_SERVER, ttl=64) / TCP(
        sport=40123, dport=5201, flags="S", seq=1000, options=[("MSS", 1460)]
    )
    return bytes(Ether(src=mac(lab, "gw1", "eth1"), dst=mac(lab, "gw2", "eth0")) / ip)


def test_mtu_lowered_while_running_is_followed(mlab, daemons):
    tun = 1280 - OVERHEAD
    tpb = daemons.run(mlab, *TPB)
    assert_ping_ok(ping(mlab, "pc", T_SERVER, count=1, size=1400, df="do"), 1)
    set_out_mtu(mlab, 1280)

    def frag_needed() -> bool:
        r = ping(mlab, "pc", T_SERVER, count=1, size=1400, df="do", wait=0.5)
        return f"Frag needed and DF set (mtu = {tun})" in r.stdout

    with Capture(
        mlab, "gw1", "eth1", keep=lambda f: f[12:14] == b"\x08\x00" and f[23] == 1
    ) as icmp_cap:
        wait_for(frag_needed, NOTICED, f"ICMP fragmentation needed with MTU {tun}")
        icmps = [f.data for f in icmp_cap.stop() if f.data[34:36] == b"\x03\x04"]
    # the ICMP, byte by byte where it matters
    ip = icmps[-1][14:]
    assert socket.inet_ntoa(ip[12:16]) == T_TPB and socket.inet_ntoa(ip[16:20]) == T_PC
    icmp = ip[20 : struct.unpack_from("!H", ip, 2)[0]]
    assert struct.unpack_from("!HH", icmp, 4) == (0, tun) and inet_sum(icmp) == 0xFFFF

    mlab.run("pc", ["ip", "route", "flush", "cache"])  # forget the path MTU
    with Capture(mlab, "gw2", "eth0", keep=from_tpb, incoming_only=True) as cap:
        assert_ping_ok(ping(mlab, "pc", T_SERVER, count=1, size=1400, df="dont"), 1)
        with FrameSender(mlab, "gw1", "eth1") as tx:
            tx.send(syn_frame(mlab))
        time.sleep(0.5)
        frames = cap.stop()
    grams = [parse_gre(f.data) for f in frames]
    frags = [g for g in grams if g.inner[9] == 1]
    # 1428 bytes of inner packet: a 20 + 1232 fragment (1276 on the wire) and
    # a 20 + 176 one
    assert [len(g.inner) for g in frags] == [1252, 196], [len(g.inner) for g in frags]
    assert [struct.unpack_from("!H", g.inner, 6)[0] for g in frags] == [0x2000, 1232 // 8]
    syns = [IP(g.inner) for g in grams if g.inner[9] == 6]
    assert len(syns) == 1
    syn = syns[0]
    assert dict(syn[TCP].options)["MSS"] == 1280 - OVERHEAD - 40, syn[TCP].options
    check = syn.copy()
    del check[TCP].chksum
    assert IP(bytes(check))[TCP].chksum == syn[TCP].chksum, "MSS clamp checksum"
    c = tpb.stop()["tunnel"]
    assert c["icmp_sent"] >= 1 and c["mss_clamped"] == 1 and c["fragments"] == 2, c


# ---- what no IPv4 header can describe: past 65535 bytes ----------------------------
#
# An IPv4 datagram is at most 65535 bytes and a fragment offset at most
# 8191 x 8 (RFC 791).  Near-64 KiB inner packets arrive whole on a jumbo
# link (MTU 65535 here, everywhere but where a test lowers the out link):
# with 24 bytes of GRE around them they are longer than any outer IPv4
# datagram, and cut into fragments an offset of 65536 or more would run
# into the flag bits (offset 8192 reads as MF with offset 0).  TPB drops
# them (frag_overflow) and sends nothing of them; what still fits goes.

JUMBO = 65535
SERVER6 = "2001:db8:99::10"
PC6 = "2001:db8:1::10"


@pytest.fixture(scope="module")
def jlab():
    need_root()
    with exclusive_lab(lambda p: labmod.tunnel(p, mtu=JUMBO), "tpbmtj") as lb:
        # No `tpb pop`: the pop's kernel must not answer GRE with ICMP.
        lb.run(
            "pop",
            [
                "nft",
                "add table ip tpbmtj; "
                "add chain ip tpbmtj input { type filter hook input priority 0; policy accept; }; "
                "add rule ip tpbmtj input ip protocol gre drop",
            ],
        )
        yield lb


@pytest.fixture
def jdaemons(jlab, tmp_path):
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.close()
        set_out_mtu(jlab, JUMBO)


def big_ipv6(lab, ilen: int, marker: bytes) -> bytes:
    """An IPv6 UDP packet of ilen bytes from pc to the server's v6 address."""
    body = (marker * (ilen // len(marker) + 1))[: ilen - 48]
    ip = IPv6(src=PC6, dst=SERVER6, hlim=64) / UDP(sport=40000, dport=9) / body
    frame = bytes(Ether(src=mac(lab, "gw1", "eth1"), dst=mac(lab, "gw2", "eth0")) / ip)
    assert len(frame) == 14 + ilen
    return frame


def big_ipv4(lab, ilen: int, marker: bytes, frag: int = 0) -> bytes:
    """An IPv4 packet of ilen bytes from pc to the server, DF clear; `frag`
    its flags/offset field (a fragment already, maybe one that claims to
    reach past 65535)."""
    body = (marker * (ilen // len(marker) + 1))[: ilen - 20]
    ip = bytearray(bytes(IP(src=T_PC, dst=T_SERVER, ttl=64, proto=17, id=0x4242) / body))
    struct.pack_into("!H", ip, 6, frag)
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", 0xFFFF - inet_sum(bytes(ip[:20])))
    eth = Ether(src=mac(lab, "gw1", "eth1"), dst=mac(lab, "gw2", "eth0"), type=0x0800)
    frame = bytes(eth) + bytes(ip)
    assert len(frame) == 14 + ilen
    return frame


def gre_after(lab, frame: bytes) -> list:
    """The GRE packets TPB sends for `frame`, sent from gw1: up to a small
    selected packet sent after it (TPB keeps their order)."""
    fence = b"FENCE-" + frame[-8:].hex().encode()
    with Capture(lab, "gw2", "eth0", keep=from_tpb, incoming_only=True) as cap:
        with FrameSender(lab, "gw1", "eth1") as tx:
            tx.send(frame)
            tx.send(big_ipv4(lab, 100, fence))
        cap.wait(lambda fr: any(fence in f.data for f in fr), 5, "the fence")
        time.sleep(0.2)
        frames = cap.stop()
    return [parse_gre(f.data) for f in frames if fence not in f.data]


def outer_datagrams(grams: list) -> dict[int, tuple[int, list[tuple[int, int, bool]]]]:
    """Outer IPv4 fragments by IP ID: (the datagram's length as the
    fragments describe it, [(offset, data length, MF)])."""
    out: dict[int, list[tuple[int, int, bool]]] = {}
    for g in grams:
        ff = struct.unpack_from("!H", g.outer, 6)[0]
        tot = struct.unpack_from("!H", g.outer, 2)[0]
        out.setdefault(g.ip_id, []).append(((ff & 0x1FFF) * 8, tot - 20, bool(ff & 0x2000)))
    return {k: (20 + max(o + n for o, n, _ in v), sorted(v)) for k, v in out.items()}


@pytest.mark.parametrize("ilen,out_mtu,fits", [
    (65535, 1044, False),  # cut at 1024: a fragment at 65536 (offset field 0x2000)
    (65535, JUMBO, False),  # 65559 bytes of outer datagram
    (65511, 1044, True),  # 65535 with GRE: the largest that fits
], ids=["offset-65536", "outer-65559", "largest-that-fits"])
def test_near_64k_ipv6_inner_packet(jlab, jdaemons, ilen, out_mtu, fits):
    set_out_mtu(jlab, out_mtu)
    tpb = jdaemons.run(jlab, *TPB, "--match", f"ip6 daddr {SERVER6}")
    frame = big_ipv6(jlab, ilen, b"V6-%d-" % ilen)
    grams = gre_after(jlab, frame)
    c = tpb.stop()["tunnel"]
    if not fits:
        assert grams == [], f"{len(grams)} fragments sent"
        assert c["drop"] == {"frag_overflow": 1}, c["drop"]
        return
    (length, pieces), = outer_datagrams(grams).values()
    assert length == 65535 and all(20 + n <= out_mtu for _, n, _ in pieces), pieces
    assert [o for o, _, _ in pieces] == list(range(0, 65515, 1024)), pieces
    assert [mf for _, _, mf in pieces] == [True] * (len(pieces) - 1) + [False]
    # the fragments' payloads in order: the GRE header and the packet
    whole = b"".join(g.gre for g in sorted(
        grams, key=lambda g: struct.unpack_from("!H", g.outer, 6)[0] & 0x1FFF))
    assert whole == b"\x00\x00\x86\xdd" + frame[14:], "the GRE payload is not the packet"
    assert c["drop"] == {} and c["fragments"] == len(pieces), c


@pytest.mark.parametrize("mode,fits", [("outer", False), ("inner", True)])
def test_near_64k_ipv4_inner_packet(jlab, jdaemons, mode, fits):
    """65535 bytes of IPv4 on a 65535-byte link: the outer datagram would be
    65559 bytes (dropped); fragmenting the inner packet instead fits."""
    tpb = jdaemons.run(jlab, *TPB, "--fragment", mode)
    frame = big_ipv4(jlab, 65535, b"V4-" + mode.encode())
    grams = gre_after(jlab, frame)
    c = tpb.stop()["tunnel"]
    if not fits:
        assert grams == [] and c["drop"] == {"frag_overflow": 1}, (len(grams), c["drop"])
        return
    inner = [g.inner for g in grams]
    assert [len(p) for p in inner] == [20 + 65488, 20 + 27], [len(p) for p in inner]
    assert [struct.unpack_from("!H", p, 6)[0] for p in inner] == [0x2000, 65488 // 8]
    assert inner[0][20:] + inner[1][20:] == frame[34:]
    assert c["drop"] == {} and c["fragments"] == 2, c


def test_inner_fragment_reaching_past_64k_dropped(jlab, jdaemons):
    """An inner fragment at offset 65528 with 2000 bytes claims to end past
    65535; cut for a 1044-byte link, its second piece's offset (66528 / 8)
    would spill into the flag bits.  Dropped, nothing sent."""
    set_out_mtu(jlab, 1044)
    tpb = jdaemons.run(jlab, *TPB)
    grams = gre_after(jlab, big_ipv4(jlab, 2020, b"PAST-64K", frag=0x1FFF))
    c = tpb.stop()["tunnel"]
    assert grams == [], f"{len(grams)} fragments sent"
    assert c["drop"] == {"frag_overflow": 1}, c["drop"]
