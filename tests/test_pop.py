"""`tpb pop`: one POP for many bridges.

The tunnel lab (tpb/lab.py: tunnel()): site 1 is pc — gw1 — [tpb] and site 2
is pc2 — gw3 — [tpb2], both meeting at gw2, behind which the pop (running
`tpb pop`) and the server are.  tpb tunnels with key 7, tpb2 with checksums
and sequence numbers, both selecting what goes to 203.0.113.0/24.  GRE
between gw2 and each bridge is captured on gw2's port facing it: eth0 faces
tpb, eth2 faces tpb2.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from helpers import (
    assert_balance,
    assert_zero_sum_completed,
    inet_sum,
    tshark_problems,
    zero_sum_partial,
)
from pop_util import (
    TUNSETVNETHDRSZ,
    Capture,
    FrameSender,
    IpSender,
    Tcpdump,
    all_stopped,
    assert_ping_ok,
    iperf,
    iperf_result,
    link_exists,
    need_root,
    parse_gre,
    ping,
    raw_socket_of,
    received,
    start_iperf_servers,
    tun_fd_of,
    tunnel_args,
    wait_for,
)
from rawsock import Port
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw
from tunnel_util import gre_header

from tpb import lab as labmod
from tpb.lab import T_GW2B, T_PC, T_PC2, T_POP, T_SERVER, T_TPB, T_TPB2

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbpop"
SITE1 = "192.0.2.0/26"
SITE2 = "192.0.2.64/26"
KEY1 = 7
PEER1 = f"{T_TPB},key={KEY1},prefix={SITE1}"
PEER2 = f"{T_TPB2},csum,seq,prefix={SITE2}"
TPB1 = tunnel_args(T_TPB, "--key", str(KEY1))
TPB2 = tunnel_args(T_TPB2, "--csum", "--seq")
TUN = "tpbpop0"
IPERF_PORTS = (5201, 5202)
GW2_TO_POP = "198.51.100.33"  # gw2's own address toward the pop: no bridge's


@pytest.fixture(scope="module")
def tlab():
    need_root()
    with labmod.tunnel(LAB_PREFIX) as lb:
        # No IPv6 on the pop's TUN device: its own router solicitations and
        # MLD reports would be counted (rightly) as no_peer drops, and the
        # counts below are exact.
        lb.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        yield lb


@pytest.fixture(scope="module")
def iperf_servers(tlab):
    start_iperf_servers(tlab, IPERF_PORTS)
    return IPERF_PORTS


def gre_capture(tlab, ifname: str) -> Capture:
    return Capture(tlab, "gw2", ifname, keep=lambda f: parse_gre(f) is not None)


def check_site_gre(frames, bridge: str, inner_host: str, key, csum_seq: bool) -> dict:
    """Every GRE frame on the link to one bridge is between that bridge and
    the POP, with that bridge's GRE options, and carries only that site's
    inner host and the server.  Returns counts by direction."""
    counts = {"to_pop": 0, "to_bridge": 0}
    seqs: dict[str, list[int]] = {"to_pop": [], "to_bridge": []}
    for fr in frames:
        data = fr if isinstance(fr, bytes) else fr.data
        g = parse_gre(data)
        if g is None:  # an outer fragment other than the first: addresses only
            pair = (socket.inet_ntoa(data[26:30]), socket.inet_ntoa(data[30:34]))
            assert pair in ((bridge, T_POP), (T_POP, bridge)), f"GRE {pair} on {bridge}'s link"
            continue
        pair = (g.outer_src, g.outer_dst)
        assert pair in ((bridge, T_POP), (T_POP, bridge)), f"GRE {pair} on {bridge}'s link"
        way = "to_pop" if g.outer_dst == T_POP else "to_bridge"
        counts[way] += 1
        assert g.flags & 0x0007 == 0, "GRE version"
        assert g.proto == 0x0800, hex(g.proto)
        assert g.key == key, (g.key, key)
        if csum_seq:
            assert g.csum is not None and g.seq is not None, g
            seqs[way].append(g.seq)
        else:
            assert g.csum is None and g.seq is None, g
        inner = (g.inner_src, g.inner_dst)
        want = (inner_host, T_SERVER) if way == "to_pop" else (T_SERVER, inner_host)
        assert inner == want, f"{way}: inner {inner}, expected {want}"
        if csum_seq and not isinstance(fr, bytes):
            # whole frame captured: the GRE checksum covers header + payload
            ip = data[14:]
            ihl = (ip[0] & 15) * 4
            tot = struct.unpack_from("!H", ip, 2)[0]
            assert inet_sum(ip[ihl:tot]) == 0xFFFF, "GRE checksum"
    for way, s in seqs.items():
        if s:
            assert s == list(range(s[0], s[0] + len(s))), f"{way}: sequence numbers {s}"
    return counts


def assert_only(counters: dict, **expected) -> None:
    for name, value in expected.items():
        assert counters[name] == value, f"{name}: {counters[name]} != {value}; {counters}"


# ---- traffic from both sites --------------------------------------------------


def test_ping_from_both_sites_replies_go_to_the_right_bridge(tlab, daemons):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    cap1, cap2 = gre_capture(tlab, "eth0"), gre_capture(tlab, "eth2")
    with cap1, cap2:
        # both at once
        p1 = subprocess.Popen(
            tlab.cmd("pc", ["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", T_SERVER]),
            stdout=subprocess.PIPE,
            text=True,
        )
        r2 = ping(tlab, "pc2", T_SERVER, count=5)
        out1, _ = p1.communicate(timeout=30)
        assert "5 received" in out1, out1
        assert_ping_ok(r2, 5)
        # ttl: pc -> gw1 -> (tunnel) -> pop -> server and back: 64 - 2
        assert "ttl=62" in out1 and "ttl=62" in r2.stdout, (out1, r2.stdout)
        f1, f2 = cap1.stop(), cap2.stop()
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()

    # GRE on each bridge's link: only that bridge's tunnel, only its site
    n1 = check_site_gre(f1, T_TPB, T_PC, KEY1, csum_seq=False)
    n2 = check_site_gre(f2, T_TPB2, T_PC2, None, csum_seq=True)
    assert n1 == {"to_pop": 5, "to_bridge": 5}, n1
    assert n2 == {"to_pop": 5, "to_bridge": 5}, n2

    assert set(cp["peers"]) == {T_TPB, T_TPB2}, cp
    for peer in (T_TPB, T_TPB2):
        p = cp["peers"][peer]
        assert_only(p, decap_packets=5, encap_packets=5, drop={})
    assert cp["other"]["drop"] == {}, cp["other"]
    assert cp["learned"] == 0, cp  # pc and pc2 are inside configured prefixes: not learned
    for c in (c1, c2):
        assert_only(c["tunnel"], encap_packets=5, decap_packets=5, drop={})


def test_iperf_tcp_and_udp_from_both_sites_at_once(tlab, daemons, iperf_servers, tmp_path):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    d1 = Tcpdump(tlab, "gw2", "eth0", tmp_path / "gw2-eth0.pcap", "ip proto 47", snap=96)
    d2 = Tcpdump(tlab, "gw2", "eth2", tmp_path / "gw2-eth2.pcap", "ip proto 47", snap=96)
    p1, p2 = iperf_servers
    t1 = iperf(tlab, "pc", p1, seconds=2)
    t2 = iperf(tlab, "pc2", p2, seconds=2)
    tcp = [iperf_result(t1), iperf_result(t2)]
    u1 = iperf(tlab, "pc", p1, "-u", "-b", "50M", seconds=2)
    u2 = iperf(tlab, "pc2", p2, "-u", "-b", "50M", seconds=2)
    udp = [iperf_result(u1), iperf_result(u2)]
    f1, f2 = d1.stop(), d2.stop()
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()

    for r in tcp:
        bps = r["end"]["sum_received"]["bits_per_second"]
        print(f"TCP {bps / 1e6:.0f} Mbit/s")
        assert bps > 5e6, r["end"]["sum_received"]
    for r in udp:
        s = r["end"]["sum"]
        print(f"UDP {s['bits_per_second'] / 1e6:.0f} Mbit/s, lost {s['lost_percent']:.1f} %")
        assert s["packets"] > 1000 and s["lost_percent"] < 20, s

    # Every captured GRE packet is its own site's (first fragments only).
    n1 = check_site_gre(f1, T_TPB, T_PC, KEY1, csum_seq=False)
    n2 = check_site_gre(f2, T_TPB2, T_PC2, None, csum_seq=True)
    print("GRE frames captured: site 1", n1, "site 2", n2)
    for n in (n1, n2):
        assert n["to_pop"] > 1000 and n["to_bridge"] > 100, n

    for peer, c in ((T_TPB, c1), (T_TPB2, c2)):
        p = cp["peers"][peer]
        t = c["tunnel"]
        assert p["drop"] == {} and t["drop"] == {}, (p, t)
        assert p["decap_packets"] > 1000 and p["encap_packets"] > 100, p
        # what the POP took from a bridge the bridge sent, and back
        assert p["decap_packets"] <= t["encap_packets"], (p, t)
        assert t["decap_packets"] <= p["encap_packets"], (p, t)
        assert p["decap_packets"] >= 0.8 * t["encap_packets"], (p, t)
    assert cp["learned"] == 0, cp  # inside configured prefixes: not learned


def test_tshark_finds_nothing_wrong_in_both_sites_tunnels(tlab, daemons, iperf_servers, tmp_path):
    """An independent decoder over each site's GRE, both ways, whole frames:
    site 1 with a key, site 2 with checksums and sequence numbers; pings
    the bridges fragment and TCP and UDP that they segment.  tshark checks
    the outer IPv4 and GRE checksums, every inner checksum, reassembles the
    fragments itself; and no packet is there twice."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    for host in ("pc", "pc2"):  # neighbours and routers learned first
        ping(tlab, host, T_SERVER, count=1)
    dumps = {
        site: Tcpdump(tlab, "gw2", ifname, tmp_path / f"{site}.pcap", "ip proto 47")
        for site, ifname in (("site1", "eth0"), ("site2", "eth2"))
    }
    for host in ("pc", "pc2"):
        assert_ping_ok(ping(tlab, host, T_SERVER, count=2, size=3000, df="dont"), 2)
    p1, p2 = iperf_servers
    runs = [
        iperf(tlab, "pc", p1, "-b", "100M", seconds=1),
        iperf(tlab, "pc2", p2, "-b", "100M", seconds=1),
    ]
    runs = [iperf_result(r) for r in runs]
    runs += [
        iperf_result(iperf(tlab, "pc", p1, "-u", "-b", "10M", "-l", "3000", seconds=1)),
        iperf_result(iperf(tlab, "pc2", p2, "-u", "-b", "10M", "-l", "3000", seconds=1)),
    ]
    frames = {site: dump.stop() for site, dump in dumps.items()}
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()
    for r in runs:
        assert r["end"]["sum_received" if "sum_received" in r["end"] else "sum"]["bytes"] > 0
    for c in (c1, c2):
        assert c["tunnel"]["fragmented"] > 0 and c["tunnel"]["gso_packets"] > 0, c["tunnel"]
    assert all(p["drop"] == {} for p in cp["peers"].values()), cp
    as_data = [f"{proto}.port=={p},data" for p in IPERF_PORTS for proto in ("tcp", "udp")]
    ports = [a for d in as_data for a in ("-d", d)]
    for site, got in frames.items():
        assert got, f"nothing captured for {site}"
        problems = tshark_problems(
            tmp_path / f"{site}.pcap", "-o", "tcp.analyze_sequence_numbers:FALSE", *ports
        )
        assert not problems, f"{site}: {problems}"


@pytest.mark.parametrize("l4,want", [("tcp", 0x0000), ("udp", 0xFFFF)])
def test_partial_checksum_from_the_server_that_computes_to_zero(tlab, daemons, l4, want):
    """The POP's TUN device takes partial checksums (checksum offload), and
    pop.c completes them: a TCP checksum that computes to zero goes to the
    bridge as 0x0000, where Linux's own completion would write 0xffff, and
    a UDP one as 0xffff (RFC 768).  The server sends it CHECKSUM_PARTIAL,
    as its stack would over a veth."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER2)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    server, pop_if = tlab.iface("server", "eth0"), tlab.iface("pop", "eth1")
    seg = TCP(sport=5202, dport=40000, flags="PA") if l4 == "tcp" else UDP(sport=5202, dport=40000)
    ip = IP(src=T_SERVER, dst=T_PC2, flags="DF") / seg / Raw(os.urandom(200))
    packet, l4_at, coff = zero_sum_partial(bytes(ip))
    frame = bytes(Ether(src=server.mac, dst=pop_if.mac, type=0x0800)) + packet
    cap = gre_capture(tlab, "eth2")
    with cap, Port(tlab.ns("server"), "eth0", vnet=True) as port:
        port.send_vnet(frame, csum_start=14 + l4_at, csum_offset=coff)
        cap.wait(lambda fr: any(f.outgoing for f in fr), 5, "the POP's GRE at gw2")
        frames = cap.stop()
    tpb2.stop()
    cp = pop.stop()
    grams = [g for g in (parse_gre(f.data) for f in frames) if g and g.inner_dst == T_PC2]
    assert len(grams) == 1, grams
    inner = grams[0].inner
    assert_zero_sum_completed(inner, packet, l4_at, coff, want)
    assert cp["peers"][T_TPB2]["encap_packets"] == 1 and cp["other"]["drop"] == {}, cp


# ---- refused bridges ----------------------------------------------------------


def test_wrong_key_is_refused_and_counted(tlab, daemons):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, "--key", "9", node="tpb2")  # the POP expects none
    bad = ping(tlab, "pc2", T_SERVER, count=3, wait=1)
    good = ping(tlab, "pc", T_SERVER, count=2)
    assert received(bad) == 0, bad.stdout
    assert_ping_ok(good, 2)
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()
    assert_balance(5, [p["drop"] for p in cp["peers"].values()] + [cp["other"]["drop"]],
                   sum(p["decap_packets"] for p in cp["peers"].values()))
    assert_only(cp["peers"][T_TPB2], decap_packets=0, encap_packets=0, drop={"gre_key": 3})
    assert_only(cp["peers"][T_TPB], decap_packets=2, encap_packets=2, drop={})
    assert cp["other"]["drop"] == {}, cp
    assert cp["learned"] == 0, cp  # inside a configured prefix: not learned  # pc only
    assert c2["tunnel"]["encap_packets"] == 3 and c2["tunnel"]["decap_packets"] == 0, c2
    assert c1["tunnel"]["decap_packets"] == 2, c1


def _gre_echo(src: str, key: int | None, ident: int) -> bytes:
    inner = IP(src="192.0.2.99", dst=T_SERVER) / ICMP(id=ident, seq=1) / b"not a peer"
    g = GRE(key_present=1, key=key, proto=0x0800) if key is not None else GRE(proto=0x0800)
    return bytes(IP(src=src, dst=T_POP, ttl=64) / g / inner)


def test_unknown_bridge_address_is_refused_and_counted(tlab, daemons):
    # tpb2's address is not a configured peer
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    tpb1 = daemons.run(tlab, *TPB1)
    srv = Capture(
        tlab,
        "server",
        "eth0",
        keep=lambda f: f[12:14] == b"\x08\x00" and f[14 + 9] == 1,  # ICMP
        incoming_only=True,
    )
    with srv:
        bad = ping(tlab, "pc2", T_SERVER, count=3, wait=1)
        assert received(bad) == 0, bad.stdout
        # GRE made by hand, from gw2's own address (and from gw2's address on
        # tpb2's link), with the key the POP would accept from tpb
        with IpSender(tlab, "gw2") as s:
            for i in range(4):
                s.send(_gre_echo(GW2_TO_POP if i % 2 else T_GW2B, KEY1, 0x7700 + i))
        # after those, a good one through the POP: it arrives after them
        assert_ping_ok(ping(tlab, "pc", T_SERVER, count=1), 1)
        frames = srv.stop()
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()
    sources = {socket.inet_ntoa(f.data[26:30]) for f in frames}
    assert sources == {T_PC}, f"ICMP at the server from {sources}"
    assert_balance(3 + 4 + 1, [p["drop"] for p in cp["peers"].values()] + [cp["other"]["drop"]],
                   sum(p["decap_packets"] for p in cp["peers"].values()))
    assert cp["other"]["drop"] == {"not_peer": 3 + 4}, cp["other"]
    assert_only(cp["peers"][T_TPB], decap_packets=1, encap_packets=1, drop={})
    assert cp["learned"] == 0, cp  # inside a configured prefix: not learned
    assert c2["tunnel"]["encap_packets"] == 3 and c2["tunnel"]["decap_packets"] == 0, c2
    assert c1["tunnel"]["decap_packets"] == 1, c1


# ---- where replies go -----------------------------------------------------------


def test_learned_entries_route_replies_to_a_peer_without_prefix(tlab, daemons):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", f"{T_TPB2},csum,seq")
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    tlab.run("pop", ["ip", "route", "add", SITE2, "dev", TUN])
    # Nothing learned yet: the POP has no bridge for pc2
    before = ping(tlab, "server", T_PC2, count=2, wait=1)
    assert received(before) == 0, before.stdout
    # pc2 speaks first: its address is learned behind tpb2
    assert_ping_ok(ping(tlab, "pc2", T_SERVER, count=3), 3)
    after = ping(tlab, "server", T_PC2, count=3)
    assert_ping_ok(after, 3)
    c2, cp = tpb2.stop(), pop.stop()
    assert cp["other"]["drop"] == {"no_peer": 2}, cp["other"]
    assert cp["learned"] == 1, cp  # pc2
    # pc2's 3 requests and 3 replies in; 3 replies and 3 requests out
    assert_only(cp["peers"][T_TPB2], decap_packets=6, encap_packets=6, drop={})
    assert_only(cp["peers"][T_TPB], decap_packets=0, encap_packets=0, drop={})
    assert_only(c2["tunnel"], encap_packets=6, decap_packets=6, drop={})
    assert not link_exists(tlab, "pop", TUN)


def test_learned_entries_expire(tlab, daemons):
    pop = daemons.pop(
        tlab, "--local", T_POP, "--peer", f"{T_TPB2},csum,seq", "--learn-timeout", "1"
    )
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    tlab.run("pop", ["ip", "route", "add", SITE2, "dev", TUN])
    assert_ping_ok(ping(tlab, "pc2", T_SERVER, count=1), 1)
    assert_ping_ok(ping(tlab, "server", T_PC2, count=1), 1)
    time.sleep(2.5)  # pc2 silent for more than the learn timeout
    late = ping(tlab, "server", T_PC2, count=1, wait=1)
    assert received(late) == 0, late.stdout
    tpb2.stop()
    cp = pop.stop()
    assert cp["other"]["drop"] == {"no_peer": 1}, cp["other"]
    assert cp["learned"] == 0, cp


def test_learned_count_at_exit_leaves_out_expired_entries(tlab, daemons):
    """The exit counters' `learned` is the number of live entries: one
    that expired while the POP was idle is not one.  (The C side compares
    with the time of the last packet, not the time of asking.)"""
    pop = daemons.pop(
        tlab,
        "--local",
        T_POP,
        "--peer",
        f"{T_TPB2},csum,seq,prefix={SITE2}",
        "--learn-timeout",
        "1",
    )
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    assert_ping_ok(ping(tlab, "pc2", T_SERVER, count=1), 1)
    time.sleep(2.5)  # nothing at all for more than the learn timeout
    tpb2.stop()
    cp = pop.stop()
    assert cp["peers"][T_TPB2]["decap_packets"] == 1, cp
    assert cp["learned"] == 0, f"an entry expired {2.5 - 1:.1f}s ago still counted: {cp['learned']}"


def test_a_bridge_cannot_take_over_another_sites_prefix(tlab, daemons):
    """Site 1's prefix is configured behind tpb; a packet that tpb2 tunnels
    with a site-1 source address (spoofed behind site 2) must not make the
    POP send site 1's traffic to tpb2: configured prefixes win over learned
    entries, and sources inside a configured prefix are not learned."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    # tpb learns gw1's MAC from gw1's frames: the way back needs it
    assert_ping_ok(ping(tlab, "pc", T_SERVER, count=1), 1)
    cap = gre_capture(tlab, "eth2")  # the link to tpb2
    with cap:
        spoofed = (
            Ether(src=tlab.iface("gw3", "eth1").mac, dst=tlab.iface("gw2", "eth2").mac)
            / IP(src=T_PC, dst=T_SERVER, ttl=64)
            / ICMP(type=0, id=0x5151)  # an echo reply: the server ignores it
            / b"I am pc, honest"
        )
        with FrameSender(tlab, "gw3", "eth1") as tx:
            tx.send(bytes(spoofed))
        # wait for it to be through the POP (it arrives at gw2 as GRE)
        cap.wait(lambda fr: any(parse_gre(f.data).inner_src == T_PC for f in fr), 5, "the GRE")
        r = ping(tlab, "server", T_PC, count=2)
        frames = cap.stop()
    tpb1.stop()
    tpb2.stop()
    cp = pop.stop()
    assert_ping_ok(r, 2)
    leaked = [f for f in frames if parse_gre(f.data).inner_dst == T_PC]
    assert leaked == [], (
        f"{len(leaked)} packet(s) to pc ({T_PC}, behind {T_TPB} by prefix={SITE1}) were "
        f"sent to {T_TPB2}; POP encap per peer "
        f"{ {a: p['encap_packets'] for a, p in cp['peers'].items()} }"
    )
    assert cp["peers"][T_TPB2]["encap_packets"] == 0, cp["peers"]
    # and the spoofed packet itself went nowhere: its replies would go to tpb
    assert cp["peers"][T_TPB2]["drop"] == {"source_owned": 1}, cp["peers"][T_TPB2]


def test_no_matching_bridge_is_dropped_and_counted(tlab, daemons):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tlab.run("pop", ["ip", "route", "add", "198.18.0.0/24", "dev", TUN])
    out = Capture(tlab, "pop", "eth0", keep=lambda f: parse_gre(f) is not None)
    with out:
        r = ping(tlab, "server", "198.18.0.1", count=4, wait=1)
        frames = out.stop()
    cp = pop.stop()
    assert received(r) == 0, r.stdout
    assert frames == [], "GRE left the POP"
    assert cp["other"]["drop"] == {"no_peer": 4}, cp["other"]
    for p in cp["peers"].values():
        assert_only(p, encap_packets=0, decap_packets=0, drop={})
    assert cp["learned"] == 0


# ---- hostile bridges: what the POP believes of a peer ---------------------------

HOST = "192.0.2.77"  # behind tpb2's site, no prefix configured for it


class PeerWire:
    """GRE as one bridge would send it to the POP, made byte by byte and
    sent from that bridge's node (no `tpb run` there): out of its eth3,
    to gw2, which routes it to the POP."""

    def __init__(self, tlab, node: str, addr: str, gw_if: str, key=None, csum=False) -> None:
        self.addr, self.key, self.csum = addr, key, csum
        self.src_mac = tlab.iface(node, "eth3").mac
        self.dst_mac = tlab.iface("gw2", gw_if).mac
        self.tx = FrameSender(tlab, node, "eth3")

    def send(self, inner: bytes, seq=None, tos: int = 0, proto: int | None = None) -> None:
        if proto is None:
            proto = 0x86DD if inner[0] >> 4 == 6 else 0x0800
        g = gre_header(proto=proto, key=self.key, seq=seq, csum=self.csum, payload=inner)
        outer = IP(src=self.addr, dst=T_POP, proto=47, ttl=64, tos=tos)
        self.tx.send(bytes(Ether(src=self.src_mac, dst=self.dst_mac) / outer / Raw(g)))

    def close(self) -> None:
        self.tx.close()


def tpb2_wire(tlab, key=None, csum=True) -> PeerWire:
    return PeerWire(tlab, "tpb2", T_TPB2, "eth2", key=key, csum=csum)


def tpb1_wire(tlab, key=KEY1) -> PeerWire:
    return PeerWire(tlab, "tpb", T_TPB, "eth0", key=key)


def echo_reply(src: str, m: bytes, dst: str = T_SERVER, tos: int = 0) -> bytes:
    """An inner packet the server takes silently: an ICMP echo reply."""
    return bytes(IP(src=src, dst=dst, ttl=64, tos=tos, id=0x5A5A) / ICMP(type=0, id=0x5A5A)
                 / Raw(m + bytes(20)))


def routed(inner: bytes) -> bytes:
    """The inner IPv4 packet as the server gets it: one router (the POP's
    host) on the way, TTL one less, header checksum again."""
    p = IP(inner)
    p.ttl -= 1
    del p.chksum
    return bytes(p)


def server_capture(tlab) -> Capture:
    return Capture(tlab, "server", "eth0",
                   keep=lambda f: f[12:14] == b"\x08\x00" and f[14 + 9] == 1, incoming_only=True)


def arrived(frames, m: bytes) -> list[bytes]:
    return [f.data[14:] for f in frames if m in f.data]


def peer_drops(cp: dict) -> list[dict]:
    return [p["drop"] for p in cp["peers"].values()] + [cp["other"]["drop"]]


def test_pop_sequence_window_moves_only_for_delivered_packets(tlab, daemons):
    """tpb2's peer with checksums and sequence numbers: packets numbered
    far ahead but refused after their GRE header passed (inner header bad,
    a martian source, another site's source, CE on Not-ECT) leave the
    window as it was, so the next packet, numbered just after the first
    good one, is still fresh and reaches the server, byte for byte."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    ok1, ok2 = b"POPSEQ-ok1-" + os.urandom(4), b"POPSEQ-ok2-" + os.urandom(4)
    good1, good2 = echo_reply(T_PC2, ok1), echo_reply(T_PC2, ok2)
    bad_ip = bytearray(echo_reply(T_PC2, b"POPSEQ-bad"))
    bad_ip[10] ^= 0xFF  # header checksum
    w = tpb2_wire(tlab)
    cap = server_capture(tlab)
    with cap:
        w.send(good1, seq=100)
        w.send(bytes(bad_ip), seq=1000)
        w.send(echo_reply("0.0.0.0", b"POPSEQ-martian"), seq=2000)
        w.send(echo_reply(T_PC, b"POPSEQ-owned"), seq=3000)  # site 1's, behind tpb
        w.send(echo_reply(T_PC2, b"POPSEQ-ce"), seq=4000, tos=0x03)
        w.send(good2, seq=101)
        cap.wait(lambda fr: arrived(fr, ok2), 5, "the second good packet at the server")
        frames = cap.stop()
    w.close()
    cp = pop.stop()
    assert arrived(frames, ok1) == [routed(good1)]
    assert arrived(frames, ok2) == [routed(good2)]
    assert not [f for f in frames if b"POPSEQ-" in f.data and ok1 not in f.data
                and ok2 not in f.data]
    p2 = cp["peers"][T_TPB2]
    assert p2["drop"] == {"inner_bad": 1, "inner_martian": 1, "source_owned": 1, "ecn": 1}, p2
    assert p2["decap_packets"] == 2, p2
    assert_balance(6, peer_drops(cp), p2["decap_packets"])
    assert cp["learned"] == 0, cp


def test_a_fresh_learned_entry_does_not_move_to_another_peer(tlab, daemons):
    """Two peers without prefixes.  HOST speaks through tpb2 first: learned
    behind tpb2.  tpb then sends from HOST: dropped (source_owned), never
    delivered, and replies to HOST still go to tpb2 (RFC 3704 strict
    reverse path: a peer is believed only for sources the POP routes back
    to it).  Once the entry expired (--learn-timeout 1), tpb may have it:
    delivered, and replies go to tpb."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", f"{T_TPB},key={KEY1}",
                      "--peer", f"{T_TPB2},csum,seq", "--learn-timeout", "1")
    tlab.run("pop", ["ip", "route", "add", SITE2, "dev", TUN])
    w1, w2 = tpb1_wire(tlab), tpb2_wire(tlab)
    first, spoof, later = (b"POPOWN-" + t + os.urandom(4) for t in (b"1st", b"spf", b"lat"))
    srv = server_capture(tlab)
    out = Capture(tlab, "pop", "eth0", keep=lambda f: parse_gre(f) is not None)
    with srv, out:
        w2.send(echo_reply(HOST, first), seq=1)
        srv.wait(lambda fr: arrived(fr, first), 5, "HOST's packet through tpb2")
        w1.send(echo_reply(HOST, spoof))
        ping(tlab, "server", HOST, count=1, wait=1)  # no answer: nobody is HOST
        out.wait(lambda fr: any(parse_gre(f.data).inner_dst == HOST for f in fr), 5, "GRE to HOST")
        time.sleep(1.6)  # past the learn timeout: HOST silent meanwhile
        w1.send(echo_reply(HOST, later))
        srv.wait(lambda fr: arrived(fr, later), 5, "HOST's packet through tpb")
        ping(tlab, "server", HOST, count=1, wait=1)
        out.wait(lambda fr: sum(parse_gre(f.data).inner_dst == HOST for f in fr) >= 2, 5,
                 "the second GRE to HOST")
        to_host = [parse_gre(f.data) for f in out.stop() if parse_gre(f.data).inner_dst == HOST]
        at_server = srv.stop()
    w1.close()
    w2.close()
    cp = pop.stop()
    assert not arrived(at_server, spoof), "tpb's packet from tpb2's HOST was delivered"
    assert [g.outer_dst for g in to_host] == [T_TPB2, T_TPB], [g.outer_dst for g in to_host]
    assert cp["peers"][T_TPB]["drop"] == {"source_owned": 1}, cp["peers"][T_TPB]
    assert cp["peers"][T_TPB]["decap_packets"] == 1 and cp["peers"][T_TPB2]["decap_packets"] == 1
    assert_balance(3, peer_drops(cp), 2)
    # (cp["learned"]: HOST's entry behind tpb has expired by now, 1 s on)


MARTIANS = [
    "0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.5", "239.1.2.3", "240.0.0.1",
    "255.255.255.255", "169.254.7.7", T_POP,
    "::", "::1", "ff02::1", "fe80::1", "::ffff:192.0.2.80",
]


def test_martian_sources_are_dropped_and_never_learned(tlab, daemons):
    """Sources no router forwards (RFC 1812 5.3.7, RFC 3927 2.7, RFC 4291:
    unspecified, loopback, multicast, class E and broadcast, link-local,
    IPv4-mapped) and the POP's own address: dropped (inner_martian), none
    learned, none at the server; a good source after them is learned."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", f"{T_TPB2},csum,seq")
    w = tpb2_wire(tlab)
    srv = server_capture(tlab)
    good = b"POPMART-good" + os.urandom(4)
    with srv:
        for i, src in enumerate(MARTIANS):
            m = b"POPMART-%02d" % i
            if ":" in src:
                inner = bytes(IPv6(src=src, dst="2001:db8:3::10", hlim=64)
                              / ICMP(type=0) / Raw(m))
            else:
                inner = echo_reply(src, m)
            w.send(inner, seq=10 + i)
        w.send(echo_reply(HOST, good), seq=100)
        srv.wait(lambda fr: arrived(fr, good), 5, "the good packet at the server")
        frames = srv.stop()
    w.close()
    cp = pop.stop()
    assert [f for f in frames if b"POPMART-" in f.data and good not in f.data] == []
    p2 = cp["peers"][T_TPB2]
    assert p2["drop"] == {"inner_martian": len(MARTIANS)}, p2
    assert_balance(len(MARTIANS) + 1, peer_drops(cp), p2["decap_packets"])
    assert cp["learned"] == 1, cp


def test_learned_entries_are_bounded_per_peer(tlab, daemons):
    """Each peer may hold 1024 learned entries (the table is sized by the
    number of peers): tpb2 sending from 1030 sources gets 1024 learned and
    6 dropped (learn_full); tpb, another peer, still learns its own."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", f"{T_TPB},key={KEY1}",
                      "--peer", f"{T_TPB2},csum")
    w1, w2 = tpb1_wire(tlab), tpb2_wire(tlab)
    for i in range(1030):
        w2.send(echo_reply(f"10.1.{i >> 8}.{i & 255}", b"POPBUDGET"))
        if i % 50 == 49:
            time.sleep(0.005)
    w1.send(echo_reply("10.9.9.9", b"POPBUDGET-tpb"))
    w1.close()
    w2.close()
    time.sleep(0.5)  # the POP takes them in batches of 64, well within
    cp = pop.stop()
    p1, p2 = cp["peers"][T_TPB], cp["peers"][T_TPB2]
    assert p2["decap_packets"] == 1024 and p2["drop"] == {"learn_full": 6}, p2
    assert p1["decap_packets"] == 1 and p1["drop"] == {}, p1
    assert_balance(1031, peer_drops(cp), 1025)
    assert cp["learned"] == 1025, cp


def test_socket_overflow_is_counted(tlab, daemons):
    """The POP stopped (SIGSTOP) while 40 GRE packets come, its raw socket's
    receive buffer made small (through a duplicate of its descriptor): the
    kernel drops what does not fit and tells with the next packet queued
    (SO_RXQ_OVFL).  Every packet is delivered or counted rcvbuf_full."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", f"{T_TPB2},csum,prefix={SITE2}")
    raw = raw_socket_of(pop.pid, 47)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.close()
    w = tpb2_wire(tlab)
    srv = server_capture(tlab)
    fence = b"POPOVFL-fence" + os.urandom(4)
    with srv:
        os.kill(pop.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: all_stopped(pop.pid), 5, "the POP to stop")
            for i in range(40):
                w.send(echo_reply(T_PC2, b"POPOVFL-%02d" % i))
            time.sleep(0.3)
        finally:
            os.kill(pop.pid, signal.SIGCONT)
        time.sleep(0.3)
        w.send(echo_reply(T_PC2, fence))  # carries the drop count
        srv.wait(lambda fr: arrived(fr, fence), 5, "the fence at the server")
        frames = srv.stop()
    w.close()
    cp = pop.stop()
    delivered = [f for f in frames if b"POPOVFL-" in f.data]
    p2 = cp["peers"][T_TPB2]
    assert p2["decap_packets"] == len(delivered), (p2, len(delivered))
    assert cp["other"]["drop"].get("rcvbuf_full", 0) > 0, cp["other"]
    assert_balance(41, peer_drops(cp), p2["decap_packets"])


def test_tun_write_failures_by_reason(tlab, daemons):
    """A TUN write refused as malformed (EINVAL: the device's vnet header
    size changed under the POP, through a duplicate of its descriptor) is
    tun_invalid; one to the device set down is tun_write; neither moves
    the sequence window, so the packets after them, numbered lower, are
    delivered, byte for byte."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER2)
    w = tpb2_wire(tlab)
    srv = server_capture(tlab)
    ms = [b"POPTUN-%d-" % i + os.urandom(4) for i in range(5)]
    pkts = [echo_reply(T_PC2, m) for m in ms]
    tun = tun_fd_of(pop.pid)
    with srv:
        w.send(pkts[0], seq=10)
        srv.wait(lambda fr: arrived(fr, ms[0]), 5, "the first packet")
        fcntl.ioctl(tun, TUNSETVNETHDRSZ, struct.pack("i", 12))
        try:
            w.send(pkts[1], seq=5000)
            time.sleep(0.3)
        finally:
            fcntl.ioctl(tun, TUNSETVNETHDRSZ, struct.pack("i", 10))
        w.send(pkts[2], seq=11)
        srv.wait(lambda fr: arrived(fr, ms[2]), 5, "the packet after EINVAL")
        tlab.run("pop", ["ip", "link", "set", TUN, "down"])
        w.send(pkts[3], seq=6000)
        time.sleep(0.3)
        tlab.run("pop", ["ip", "link", "set", TUN, "up"])
        w.send(pkts[4], seq=12)
        srv.wait(lambda fr: arrived(fr, ms[4]), 5, "the packet after the device came up")
        frames = srv.stop()
    os.close(tun)
    w.close()
    cp = pop.stop()
    for i in (0, 2, 4):
        assert arrived(frames, ms[i]) == [routed(pkts[i])], i
    for i in (1, 3):
        assert not arrived(frames, ms[i]), i
    p2 = cp["peers"][T_TPB2]
    assert p2["drop"] == {"tun_invalid": 1, "tun_write": 1}, p2
    assert_balance(5, peer_drops(cp), p2["decap_packets"])


# ---- the TUN device's life ------------------------------------------------------


def test_tun_device_gone_after_sigterm_and_sigkill(tlab, daemons):
    name = "tpbtun9"
    for how in (signal.SIGTERM, signal.SIGKILL):
        pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--tun", name)
        assert link_exists(tlab, "pop", name)
        routes = tlab.run("pop", ["ip", "route", "show", "dev", name]).stdout
        assert SITE1 in routes, routes
        if how == signal.SIGTERM:
            pop.stop()
        else:
            pop.kill()
            assert pop.returncode == -signal.SIGKILL
        wait_for(lambda: not link_exists(tlab, "pop", name), 5, f"{name} to go ({how.name})")
        assert SITE1 not in tlab.run("pop", ["ip", "route"]).stdout
    # and the name can be taken again
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--tun", name)
    pop.stop()
    assert not link_exists(tlab, "pop", name)


# ---- operator errors ---------------------------------------------------------------

BAD = {
    "missing-local": (["--peer", T_TPB], ["needs its address"]),
    "bad-peer-option": (["--local", T_POP, "--peer", f"{T_TPB},colour=blue"], ["colour=blue"]),
    "bad-peer-flag-value": (["--local", T_POP, "--peer", f"{T_TPB},key=seven"], ["key"]),
    "duplicate-peer": (["--local", T_POP, "--peer", T_TPB, "--peer", T_TPB], ["given twice"]),
    "bad-prefix-host-bits": (
        ["--local", T_POP, "--peer", f"{T_TPB},prefix=192.0.2.1/26"],
        ["192.0.2.1/26"],
    ),
    "bad-prefix-word": (["--local", T_POP, "--peer", f"{T_TPB},prefix=banana"], ["banana"]),
    "prefix-behind-two-peers": (
        ["--local", T_POP, "--peer", PEER1, "--peer", f"{T_TPB2},prefix={SITE1}"],
        ["already behind"],
    ),
    "no-peers": (["--local", T_POP], ["at least one peer"]),
    "bad-local": (["--local", "198.51.100", "--peer", T_TPB], ["--local"]),
    "three-problems": (
        ["--peer", f"{T_TPB},prefix=banana", "--peer", T_TPB],
        ["needs its address", "banana", "given twice"],
    ),
    # Each bad --peer is a problem of its own, as is the missing --local.
    "every-bad-peer-reported": (
        ["--peer", f"{T_TPB},colour=blue", "--peer", f"{T_TPB2},shape=round"],
        ["needs its address", "colour=blue", "shape=round"],
    ),
    # Found only when starting: still one line, and nothing left behind.
    "local-not-ours": (["--local", "192.0.2.99", "--peer", T_TPB], ["192.0.2.99"]),
    "tun-name-taken": (["--local", T_POP, "--peer", T_TPB, "--tun", "eth0"], ["eth0"]),
    # the pop's own link: refused, never taken over (and lost at exit)
    "prefix-already-routed": (
        ["--local", T_POP, "--peer", f"{T_TPB},prefix=198.51.100.32/28"],
        ["cannot route"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_flags_one_line_per_problem_exit_2(tlab, case):
    argv, expected = BAD[case]
    res = tlab.run("pop", [sys.executable, "-m", "tpb", "pop", *argv], check=False, timeout=30)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stdout == "", res.stdout
    assert all(line.startswith("tpb: ") for line in lines), lines
    assert len(lines) == len(expected), f"expected {len(expected)} lines: {lines}"
    for want in expected:
        assert sum(want in line for line in lines) == 1, f"{want!r} not on one line: {lines}"
    assert not link_exists(tlab, "pop", TUN)
