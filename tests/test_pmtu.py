"""Packets too big for the tunnel: ICMP "fragmentation needed" (RFC 1191),
fragmentation of the inner or the outer packet, the ICMP rate limit, and
the TCP MSS clamp with and without offloads.

The tunnel lab with every port at MTU 1500; tpb tunnels what goes to
203.0.113.0/24 without key, checksum or sequence numbers (GRE overhead 24:
tunnel MTU 1476, MSS 1436) to `tpb pop` on the pop, which routes it on to
the server.  pc is 192.0.2.10, the server 203.0.113.10.
"""

from __future__ import annotations

import math
import socket
import struct
import time

import pytest
from helpers import inet_sum, tshark_problems
from pop_util import (
    Capture,
    Daemons,
    FrameSender,
    Tcpdump,
    assert_ping_ok,
    iperf,
    iperf_result,
    mac,
    need_root,
    ping,
    set_offloads,
    start_iperf_servers,
    tunnel_args,
)
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether

from tpb import lab as labmod
from tpb.lab import T_PC, T_POP, T_SERVER, T_TPB

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbmtu"
TUNNEL_MTU = 1500 - 20 - 4
MSS = TUNNEL_MTU - 40
ICMP_QUOTE = 576 - 20 - 8
IPERF_PORT = 5211
TPB = tunnel_args(T_TPB)
# For captures of iperf3: TCP flow analysis off (a capture holds one
# direction, and iperf3's server resets its data connection at the end),
# its payload plain data (not guessed at: random bytes pass for Thrift).
TSHARK_IPERF = ("-o", "tcp.analyze_sequence_numbers:FALSE", "-d", f"tcp.port=={IPERF_PORT},data")


@pytest.fixture(scope="module")
def mlab(tmp_path_factory):
    need_root()
    with labmod.tunnel(LAB_PREFIX) as lb:
        pops = Daemons(tmp_path_factory.mktemp("pop"))
        try:
            pops.pop(lb, "--local", T_POP, "--peer", f"{T_TPB},prefix=192.0.2.0/26")
            yield lb
        finally:
            pops.close()


@pytest.fixture
def daemons(mlab, tmp_path):
    # Each test starts from no learned path MTU anywhere.
    for node in ("pc", "gw1", "server", "pop"):
        mlab.run(node, ["ip", "route", "flush", "cache"])
    d = Daemons(tmp_path)
    yield d
    d.close()


def is_icmp(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[23] == 1


def reassemble(ips: list[bytes]) -> dict[object, tuple[bytes, list[tuple[int, int, bool]]]]:
    """IPv4 packets -> {key: (payload, [(offset, length, MF)])}: fragments
    grouped by IP ID (checked to tile the payload exactly), whole packets
    on their own (Linux sends DF packets with ID 0)."""
    groups: dict[object, list[bytes]] = {}
    generation: dict[int, int] = {}
    seen: dict[object, set[int]] = {}
    for n, ip in enumerate(ips):
        ident, ff = struct.unpack_from("!HH", ip, 4)
        if not ff & 0x3FFF:
            groups[("whole", n)] = [ip]
            continue
        # A datagram with the ID of an earlier one (DF packets fragmented
        # with --no-pmtud all have ID 0): a repeated offset starts it.
        key = ("frag", ident, generation.get(ident, 0))
        if ff & 0x1FFF in seen.get(key, set()):
            generation[ident] = generation.get(ident, 0) + 1
            key = ("frag", ident, generation[ident])
        seen.setdefault(key, set()).add(ff & 0x1FFF)
        groups.setdefault(key, []).append(ip)
    out = {}
    for key, frags in groups.items():
        pieces = []
        for ip in frags:
            ihl = (ip[0] & 15) * 4
            tot = struct.unpack_from("!H", ip, 2)[0]
            ff = struct.unpack_from("!H", ip, 6)[0]
            pieces.append(((ff & 0x1FFF) * 8, ip[ihl:tot], bool(ff & 0x2000)))
        pieces.sort(key=lambda p: p[0])
        layout = [(o, len(c), mf) for o, c, mf in pieces]
        data = b""
        for off, chunk, _ in pieces:
            assert off == len(data), f"{key}: gap or overlap: {layout}"
            data += chunk
        assert all(mf for _, _, mf in pieces[:-1]) and not pieces[-1][2], layout
        out[key] = (data, layout)
    return out


def echo_requests_at_server(frames) -> list[bytes]:
    """The IPv4 packets from pc to the server that reached the server."""
    out = []
    for f in frames:
        ip = f.data[14:]
        if ip[12:16] == socket.inet_aton(T_PC) and ip[16:20] == socket.inet_aton(T_SERVER):
            out.append(ip[: struct.unpack_from("!H", ip, 2)[0]])
    return out


def check_echo(payload: bytes, size: int) -> None:
    """A whole ICMP echo request of `size` data bytes, checksum right."""
    assert len(payload) == 8 + size, len(payload)
    assert payload[0] == 8 and inet_sum(payload) == 0xFFFF, "ICMP echo request corrupted"


# ---- DF set: ICMP fragmentation needed -----------------------------------------


def test_df_too_big_gets_frag_needed_from_the_tunnel_address(mlab, daemons):
    tpb = daemons.run(mlab, *TPB)
    cap = Capture(mlab, "gw1", "eth1", keep=is_icmp)
    with cap:
        first = ping(mlab, "pc", T_SERVER, count=1, size=1472, df="do")
        frames = cap.stop()
    assert f"From {T_TPB} icmp_seq=1 Frag needed and DF set (mtu = {TUNNEL_MTU})" in first.stdout, (
        first.stdout + first.stderr
    )
    # Linux took the MTU: the same size is now refused locally ...
    again = ping(mlab, "pc", T_SERVER, count=1, size=1472, df="do")
    assert f"message too long, mtu={TUNNEL_MTU}" in again.stdout + again.stderr, again
    route = mlab.run("pc", ["ip", "route", "get", T_SERVER]).stdout
    assert f"mtu {TUNNEL_MTU}" in route, route
    # ... and what fits the tunnel goes through
    assert_ping_ok(ping(mlab, "pc", T_SERVER, count=3, size=TUNNEL_MTU - 28, df="do"), 3)
    c = tpb.stop()["tunnel"]

    offending = [f for f in frames if f.outgoing and Ether(f.data)[IP].len == 1500]
    icmps = [f for f in frames if not f.outgoing and Ether(f.data).haslayer(ICMP)]
    icmps = [f for f in icmps if Ether(f.data)[ICMP].type == 3]
    assert len(offending) == 1 and len(icmps) == 1, frames
    bad, err = Ether(offending[0].data), Ether(icmps[0].data)
    assert bad[IP].flags.DF and bad[ICMP].type == 8
    # back the way it came: the MACs swapped
    assert (err.src, err.dst) == (bad.dst, bad.src), (err.summary(), bad.summary())
    assert (err.src, err.dst) == (mac(mlab, "gw2", "eth0"), mac(mlab, "gw1", "eth1"))
    ip = err[IP]
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.tos) == (T_TPB, T_PC, 1, 64, 0xC0), ip.summary()
    assert ip.flags == 0 and ip.frag == 0
    raw_ip = bytes(ip)[: ip.len]
    assert inet_sum(raw_ip[:20]) == 0xFFFF, "IP header checksum"
    icmp = raw_ip[20:]
    assert inet_sum(icmp) == 0xFFFF, "ICMP checksum"
    assert (err[ICMP].type, err[ICMP].code, err[ICMP].nexthopmtu) == (3, 4, TUNNEL_MTU)
    assert icmp[4:6] == b"\0\0", "unused field"
    # the quote: the offending IP header and as much data as fits in 576
    quoted = icmp[8:]
    assert len(quoted) == ICMP_QUOTE, len(quoted)
    assert quoted == bytes(bad[IP])[:ICMP_QUOTE]
    assert ip.len == 576

    assert c["drop"] == {"too_big": 1}, c
    assert c["icmp_sent"] == 1 and c["icmp_ratelimited"] == 0, c
    assert c["encap_packets"] == 3 and c["decap_packets"] == 3, c


# ---- DF clear: fragmentation ----------------------------------------------------


def _capture_server(mlab) -> Capture:
    return Capture(mlab, "server", "eth0", keep=is_icmp, incoming_only=True)


def test_no_df_fragment_inner(mlab, daemons):
    tpb = daemons.run(mlab, *TPB, "--fragment", "inner")
    with _capture_server(mlab) as cap:
        assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2, size=1472, df="dont"), 2)
        assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2, size=3000, df="dont"), 2)
        frames = cap.stop()
    c = tpb.stop()["tunnel"]
    got = reassemble(echo_requests_at_server(frames))
    assert len(got) == 4, got.keys()
    sizes = sorted((len(p), len(frags)) for p, frags in got.values())
    # 1480: cut in two by TPB; 3008: pc's three, its two 1500s cut by TPB
    assert sizes == [(1480, 2), (1480, 2), (3008, 5), (3008, 5)], sizes
    for payload, frags in got.values():
        check_echo(payload, len(payload) - 8)
        assert all(20 + n <= TUNNEL_MTU for _, n, _ in frags), frags
    assert c["fragmented"] == 6 and c["fragments"] == 12, c
    assert c["drop"] == {}, c
    # the replies: the POP's kernel fragments the outer packet, TPB reassembles
    assert c["reasm_done"] == 6 and c["reasm_memory"] == 0, c
    assert c["decap_packets"] == 2 + 2 * 3, c


def test_no_df_fragment_outer(mlab, daemons):
    tpb = daemons.run(mlab, *TPB, "--fragment", "outer")
    at_pop = Capture(
        mlab,
        "pop",
        "eth0",
        keep=lambda f: (
            f[12:14] == b"\x08\x00" and f[23] == 47 and f[26:30] == socket.inet_aton(T_TPB)
        ),
        incoming_only=True,
    )
    with _capture_server(mlab) as cap, at_pop:
        assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2, size=1472, df="dont"), 2)
        assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2, size=3000, df="dont"), 2)
        frames = cap.stop()
        outer = at_pop.stop()
    c = tpb.stop()["tunnel"]

    # At the POP: outer GRE fragments, each outer packet in two
    ips = [f.data[14 : 14 + struct.unpack_from("!H", f.data, 16)[0]] for f in outer]
    assert all(len(ip) <= 1500 for ip in ips)
    grams = list(reassemble(ips).values())
    # 2 x 1500 (-s 1472) + 2 x (1500, 1500, 68) (pc's fragments of -s 3000):
    # every 1500 cut in two, the 68s whole
    layout = sorted((len(gre) - 4, len(frags)) for gre, frags in grams)
    assert layout == [(68, 1), (68, 1)] + [(1500, 2)] * 6, layout
    for gre, _ in grams:
        assert gre[:4] == b"\x00\x00\x08\x00", gre[:4].hex()  # GRE, no options, IPv4
        inner = gre[4:]
        assert inner[12:20] == socket.inet_aton(T_PC) + socket.inet_aton(T_SERVER)
        assert inet_sum(inner[:20]) == 0xFFFF
    # At the server: what pc sent, not cut again
    got = reassemble(echo_requests_at_server(frames))
    sizes = sorted((len(p), [n for _, n, _ in frags]) for p, frags in got.values())
    assert sizes == [(1480, [1480])] * 2 + [(3008, [1480, 1480, 48])] * 2, sizes
    for payload, _ in got.values():
        check_echo(payload, len(payload) - 8)
    assert c["fragmented"] == 6 and c["fragments"] == 12, c
    assert c["encap_packets"] == 2 + 2 * 3, c
    assert c["drop"] == {}, c


@pytest.mark.parametrize("mode", ["inner", "outer"])
def test_tshark_finds_nothing_wrong_in_what_too_big_traffic_becomes(
    mlab, daemons, iperf_server, tmp_path, mode
):
    """An independent decoder over everything TPB makes of packets too big
    for the tunnel: the GRE it sends (fragments of the inner or the outer
    packet, TCP super-packets cut into segments), the ICMP "fragmentation
    needed" it answers with, and what it unwraps from the POP (replies the
    POP's kernel fragmented, reassembled by TPB).  tshark checks every IPv4,
    TCP, UDP and ICMP checksum and reassembles the fragments itself."""
    tpb = daemons.run(mlab, *TPB, "--fragment", mode)
    dumps = {
        "gre": Tcpdump(mlab, "gw2", "eth0", tmp_path / "gre.pcap", f"ip proto 47 and src {T_TPB}"),
        "icmp": Tcpdump(mlab, "gw1", "eth1", tmp_path / "icmp.pcap", f"icmp and src {T_TPB}"),
        "back": Tcpdump(mlab, "gw1", "eth1", tmp_path / "back.pcap", f"src {T_SERVER}"),
    }
    assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2, size=1472, df="dont"), 2)
    assert_ping_ok(ping(mlab, "pc", T_SERVER, count=2, size=3000, df="dont"), 2)
    ping(mlab, "pc", T_SERVER, count=1, size=1472, df="do")  # last: pc learns the MTU
    # 200 Mbit/s for a second: super-packets still, and a capture tshark
    # reads in seconds
    res = iperf_result(iperf(mlab, "pc", iperf_server, "-b", "200M", seconds=1))
    frames = {name: dump.stop() for name, dump in dumps.items()}
    c = tpb.stop()["tunnel"]
    assert res["end"]["sum_received"]["bytes"] > 0, res["end"]
    assert c["icmp_sent"] == 1 and c["fragmented"] == 6 and c["gso_packets"] > 0, c
    assert c["reasm_done"] >= 6, c
    for name, got in frames.items():
        assert got, f"nothing captured for {name}"
        problems = tshark_problems(tmp_path / f"{name}.pcap", *TSHARK_IPERF)
        assert not problems, f"{name}: {problems}"


@pytest.mark.parametrize("mode", ["inner", "outer"])
def test_no_pmtud_fragments_df_packets(mlab, daemons, mode):
    tpb = daemons.run(mlab, *TPB, "--no-pmtud", "--fragment", mode)
    at_pc = Capture(
        mlab, "pc", "eth0", keep=lambda f: is_icmp(f) and f[34] == 3, incoming_only=True
    )
    with at_pc, _capture_server(mlab) as cap:
        r = ping(mlab, "pc", T_SERVER, count=2, size=1472, df="do")
        assert_ping_ok(r, 2)
        unreachable = at_pc.stop()
        frames = cap.stop()
    c = tpb.stop()["tunnel"]
    assert unreachable == [], "ICMP sent despite --no-pmtud"
    assert "mtu" not in mlab.run("pc", ["ip", "route", "get", T_SERVER]).stdout
    assert c["icmp_sent"] == 0 and c["drop"] == {}, c
    assert c["fragmented"] == 2 and c["fragments"] == 4, c
    got = reassemble(echo_requests_at_server(frames))
    assert len(got) == 2
    for payload, frags in got.values():
        check_echo(payload, 1472)
        assert len(frags) == (2 if mode == "inner" else 1), frags


# ---- the ICMP rate limit ---------------------------------------------------------


def _too_big_frames(mlab, n: int, first_id: int) -> list[bytes]:
    src, dst = mac(mlab, "pc", "eth0"), mac(mlab, "gw1", "eth0")
    return [
        bytes(
            Ether(src=src, dst=dst)
            / IP(src=T_PC, dst=T_SERVER, flags="DF", id=first_id + i, ttl=64)
            / ICMP(id=0x4242, seq=first_id + i)
            / (b"\xa5" * 1472)
        )
        for i in range(n)
    ]


def test_icmp_rate_limit(mlab, daemons):
    rate = 5
    tpb = daemons.run(mlab, *TPB, "--icmp-rate", str(rate))
    burst1, burst2 = _too_big_frames(mlab, 50, 1000), _too_big_frames(mlab, 20, 2000)
    at_pc = Capture(
        mlab,
        "pc",
        "eth0",
        keep=lambda f: is_icmp(f) and f[34:36] == b"\x03\x04",
        incoming_only=True,
    )
    with at_pc, FrameSender(mlab, "pc", "eth0") as tx:
        t0 = time.monotonic()
        for f in burst1:
            tx.send(f)
        at_pc.wait(lambda fr: len(fr) >= rate, 5, f"{rate} ICMP")
        d1 = time.monotonic() - t0
        time.sleep(1.5)  # the bucket fills up again (to one second's worth)
        n1 = len(at_pc.snapshot())
        t1 = time.monotonic()
        for f in burst2:
            tx.send(f)
        at_pc.wait(lambda fr: len(fr) >= n1 + rate, 5, f"{rate} more ICMP")
        d2 = time.monotonic() - t1
        time.sleep(0.5)
        frames = at_pc.stop()
    c = tpb.stop()["tunnel"]
    n2 = len(frames) - n1
    print(f"ICMP: burst 1 of 50 -> {n1} in {d1:.2f}s, burst 2 of 20 -> {n2} in {d2:.2f}s; {c}")
    # a burst of one second's worth, then `rate` per second
    assert rate <= n1 <= rate + math.ceil(rate * (d1 + 0.2)), n1
    assert rate <= n2 <= rate + math.ceil(rate * (d2 + 0.2)), n2
    assert c["icmp_sent"] == len(frames), c
    assert c["drop"] == {"too_big": 70}, c
    assert c["icmp_sent"] + c["icmp_ratelimited"] == 70, c
    for f in frames:
        assert Ether(f.data)[IP].src == T_TPB


# ---- TCP: the MSS clamp, with and without offloads ---------------------------------


@pytest.fixture(scope="module")
def iperf_server(mlab):
    start_iperf_servers(mlab, (IPERF_PORT,))
    return IPERF_PORT


@pytest.mark.parametrize("offloads", ["on", "off"])
def test_iperf_tcp_mss_clamped(mlab, daemons, iperf_server, tmp_path, offloads):
    set_offloads(mlab, offloads == "on")
    try:
        tpb = daemons.run(mlab, *TPB)
        dump = Tcpdump(
            mlab, "server", "eth0", tmp_path / "syn.pcap", "tcp[tcpflags] & tcp-syn != 0"
        )
        res = iperf_result(iperf(mlab, "pc", iperf_server, seconds=2))
        syns = dump.stop()
        c = tpb.stop()["tunnel"]
    finally:
        set_offloads(mlab, True)
    bps = res["end"]["sum_received"]["bits_per_second"]
    print(f"offloads {offloads}: {bps / 1e6:.0f} Mbit/s; {c}")
    assert bps > 5e6, res["end"]["sum_received"]
    from_pc = [Ether(f) for f in syns if Ether(f)[IP].src == T_PC]
    from_pc = [p for p in from_pc if p[TCP].flags.S and not p[TCP].flags.A]
    assert len(from_pc) >= 2, syns  # iperf3's control and data connections
    for p in from_pc:
        mss = dict(p[TCP].options).get("MSS")
        assert mss is not None and mss <= MSS, p[TCP].options
    assert c["mss_clamped"] >= len(from_pc), c
    assert c["drop"] == {}, c
    if offloads == "on":
        assert c["gso_packets"] > 0 and c["gso_segments"] > c["gso_packets"], c
    else:
        assert c["gso_packets"] == 0, c


def test_tcp_without_clamp_finds_the_path_mtu(mlab, daemons, iperf_server):
    """With the clamp out of the way (--mss 1460), pc's TCP sends full-size
    segments (GSO super-packets cut by TPB); each too big for the tunnel
    gets an ICMP "fragmentation needed" quoting that segment's own header,
    pc lowers its path MTU and the transfer goes on."""
    tpb = daemons.run(mlab, *TPB, "--mss", "1460")
    at_pc = Capture(
        mlab,
        "pc",
        "eth0",
        keep=lambda f: is_icmp(f) and f[34:36] == b"\x03\x04",
        incoming_only=True,
    )
    with at_pc:
        res = iperf_result(iperf(mlab, "pc", iperf_server, seconds=2))
        frames = at_pc.stop()
    c = tpb.stop()["tunnel"]
    bps = res["end"]["sum_received"]["bits_per_second"]
    print(f"{bps / 1e6:.0f} Mbit/s, {len(frames)} ICMP; {c}")
    assert bps > 5e6, res["end"]["sum_received"]
    assert c["mss_clamped"] == 0, c
    assert c["icmp_sent"] == len(frames) > 0, c
    assert c["drop"].get("too_big", 0) == c["icmp_sent"] + c["icmp_ratelimited"], c
    assert set(c["drop"]) <= {"too_big"}, c
    assert f"mtu {TUNNEL_MTU}" in mlab.run("pc", ["ip", "route", "get", T_SERVER]).stdout
    for f in frames:
        ip = f.data[14:]
        assert ip[12:16] == socket.inet_aton(T_TPB)
        icmp = ip[20 : struct.unpack_from("!H", ip, 2)[0]]
        assert inet_sum(icmp) == 0xFFFF, "ICMP checksum"
        assert struct.unpack_from("!H", icmp, 6)[0] == TUNNEL_MTU
        quoted = icmp[8:]
        # a real wire segment: its own length, DF, a valid header checksum
        assert quoted[9] == 6 and quoted[12:20] == socket.inet_aton(T_PC) + socket.inet_aton(
            T_SERVER
        )
        assert struct.unpack_from("!H", quoted, 2)[0] == 1500, quoted[:20].hex()
        assert struct.unpack_from("!H", quoted, 6)[0] & 0x4000, "DF"
        assert inet_sum(quoted[:20]) == 0xFFFF, "quoted IP header checksum"
        assert len(quoted) == ICMP_QUOTE
