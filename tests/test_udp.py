"""GRE-in-UDP (RFC 8086): `tpb run --encap udp` and `tpb pop --peer ...,udp`.

The tunnel lab of test_pop.py (tpb/lab.py: tunnel()): site 1 is pc — gw1 —
[tpb], site 2 pc2 — gw3 — [tpb2], both meeting at gw2, behind which the pop
(running `tpb pop`) and the server are.  Here both bridges tunnel in UDP:
tpb with key 7, tpb2 with checksums and sequence numbers.  What crosses gw2
is captured on its port facing each bridge (eth0: tpb, eth2: tpb2) and
checked byte by byte: outer UDP to port 4754 from a port that is the hash of
the inner flow, a UDP checksum that verifies (never zero), GRE inside.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from helpers import tshark_problems
from pop_util import (
    Capture,
    FrameSender,
    Tcpdump,
    assert_ping_ok,
    iperf,
    iperf_result,
    need_root,
    ping,
    start_iperf_servers,
    tunnel_args,
    wait_for,
)
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from tunnel_util import gre_header

from tpb import lab as labmod
from tpb.lab import T_PC, T_PC2, T_POP, T_SERVER, T_TPB, T_TPB2

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbudp"
SITE1 = "192.0.2.0/26"
SITE2 = "192.0.2.64/26"
KEY1 = 7
PEER1 = f"{T_TPB},udp,key={KEY1},prefix={SITE1}"
PEER2 = f"{T_TPB2},udp,csum,seq,prefix={SITE2}"
# Keepalives off unless a test asks for them: with them a POP is down until
# it first answers, and the exact counts below would depend on that race.
TPB1 = tunnel_args(T_TPB, "--encap", "udp", "--key", str(KEY1), "--no-keepalive")
TPB2 = tunnel_args(T_TPB2, "--encap", "udp", "--csum", "--seq", "--no-keepalive")
IPERF_PORTS = (5211, 5212)
GRE_UDP_PORT = 4754


@pytest.fixture(scope="module")
def tlab():
    need_root()
    with labmod.tunnel(LAB_PREFIX) as lb:
        lb.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        # The POP's kernel leaves the UDP checksum of what its socket sends to
        # the NIC (a veth passes it on partial); on a wire it is complete, and
        # so it is here, for the captures to check.
        lb.run("pop", ["ethtool", "-K", "eth0", "tx", "off"])
        # The same for the bridges: a TCP super-packet leaves TPB as one UDP
        # GSO message (csrc/udpgso.c) that a NIC cuts into datagrams and
        # checksums; a veth would pass it on whole, checksum partial. With
        # tx checksumming off the kernel cuts and checksums it in software
        # before gw2's capture, as the wire would carry it.
        for node in ("tpb", "tpb2"):
            lb.run(node, ["ethtool", "-K", "eth3", "tx", "off"])
        yield lb


@pytest.fixture(scope="module")
def iperf_servers(tlab):
    start_iperf_servers(tlab, IPERF_PORTS)
    return IPERF_PORTS


# ---- the wire format ----------------------------------------------------------


def flow_sport(inner: bytes) -> int:
    """RFC 8086 3.2.1's entropy as gre.c computes it: FNV-1a over the inner
    addresses, protocol and (not a fragment) ports, into 49152-65535."""
    h = 2166136261

    def mix(bs: bytes) -> None:
        nonlocal h
        for b in bs:
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF

    if inner[0] >> 4 == 4:
        proto, l4 = inner[9], (inner[0] & 15) * 4
        frag = struct.unpack_from("!H", inner, 6)[0] & 0x3FFF
        addrs = inner[12:20]
    else:
        proto, l4, frag, addrs = inner[6], 40, 0, inner[8:40]
    mix(addrs)
    mix(bytes([proto]))
    if not frag and proto in (6, 17, 132) and len(inner) >= l4 + 4:
        mix(inner[l4 : l4 + 4])
    h ^= h >> 16
    return 0xC000 | (h & 0x3FFF)


def is_udp4754(f: bytes) -> bool:
    if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
        return False
    if struct.unpack_from("!H", f, 20)[0] & 0x1FFF:  # a later fragment: no UDP header
        return True
    ihl = (f[14] & 15) * 4
    sport, dport = struct.unpack_from("!HH", f, 14 + ihl)
    return GRE_UDP_PORT in (sport, dport)


def udp_capture(tlab, ifname: str) -> Capture:
    return Capture(tlab, "gw2", ifname, keep=is_udp4754)


def check_site(frames, bridge: str, inner_host: str, key, csum_seq: bool) -> dict:
    """Every GRE-in-UDP frame on one bridge's link: between that bridge and
    the POP; toward the POP from the inner flow's port to 4754, back from
    4754 to 4754; the UDP checksum present and right; GRE with the site's
    options, its sequence numbers consecutive; only that site's traffic."""
    counts = {"to_pop": 0, "to_bridge": 0}
    seqs: dict[str, list[int]] = {"to_pop": [], "to_bridge": []}
    for fr in frames:
        ip = IP(fr.data[14:])
        assert (ip.src, ip.dst) in ((bridge, T_POP), (T_POP, bridge)), ip.summary()
        if ip.frag or ip.flags.MF:
            continue  # fragments: tshark checks them whole (test below)
        way = "to_pop" if ip.dst == T_POP else "to_bridge"
        counts[way] += 1
        udp = ip[UDP]
        raw = bytes(ip)
        ihl = ip.ihl * 4
        ulen = udp.len
        assert ulen == len(raw) - ihl, (ulen, len(raw))
        assert udp.chksum != 0, "a real UDP checksum, RFC 8086 6.1"
        again = IP(raw)
        del again[UDP].chksum
        assert IP(bytes(again))[UDP].chksum == udp.chksum, "UDP checksum"
        g = raw[ihl + 8 :]
        flags, proto = struct.unpack_from("!HH", g)
        assert flags & 7 == 0 and proto == 0x0800, (hex(flags), hex(proto))
        off = 4
        if flags & 0x8000:
            assert csum_seq
            off += 4
        if flags & 0x2000:
            assert struct.unpack_from("!I", g, off)[0] == key
            off += 4
        else:
            assert key is None
        if flags & 0x1000:
            seqs[way].append(struct.unpack_from("!I", g, off)[0])
            off += 4
        assert bool(flags & 0x9000) == csum_seq, hex(flags)
        inner = g[off:]
        isrc, idst = IP(inner).src, IP(inner).dst
        want = (inner_host, T_SERVER) if way == "to_pop" else (T_SERVER, inner_host)
        assert (isrc, idst) == want, (way, isrc, idst)
        if way == "to_pop":
            assert udp.dport == GRE_UDP_PORT and 49152 <= udp.sport <= 65535, udp.summary()
            assert udp.sport == flow_sport(inner), (udp.sport, flow_sport(inner))
        else:
            assert (udp.sport, udp.dport) == (GRE_UDP_PORT, GRE_UDP_PORT), udp.summary()
    for s in seqs.values():
        if s:
            assert s == list(range(s[0], s[0] + len(s))), s
    return counts


def test_ping_from_both_sites_over_gre_in_udp(tlab, daemons):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    with udp_capture(tlab, "eth0") as cap1, udp_capture(tlab, "eth2") as cap2:
        assert_ping_ok(ping(tlab, "pc", T_SERVER, count=5), 5)
        assert_ping_ok(ping(tlab, "pc2", T_SERVER, count=5), 5)
        f1, f2 = cap1.stop(), cap2.stop()
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()
    assert check_site(f1, T_TPB, T_PC, KEY1, csum_seq=False) == {"to_pop": 5, "to_bridge": 5}
    assert check_site(f2, T_TPB2, T_PC2, None, csum_seq=True) == {"to_pop": 5, "to_bridge": 5}
    for peer in (T_TPB, T_TPB2):
        p = cp["peers"][peer]
        assert (p["decap_packets"], p["encap_packets"], p["drop"]) == (5, 5, {}), p
        assert p["state"]["endpoint"] == f"{peer}:{GRE_UDP_PORT}", p["state"]
    assert cp["other"]["drop"] == {}, cp["other"]
    for c in (c1, c2):
        t = c["tunnel"]
        assert (t["encap_packets"], t["decap_packets"], t["drop"]) == (5, 5, {}), t


def test_the_8_udp_bytes_in_pmtud_and_mss(tlab, daemons):
    """--out's MTU 1500 carries inner packets of 1500 - 20 - 8 - 8 (key) =
    1464 bytes: a DF ping of 1472 + 28 gets fragmentation needed with that
    MTU, a ping of exactly 1464 passes whole, and SYNs are clamped to
    1464 - 40."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1)
    tpb1 = daemons.run(tlab, *TPB1)
    # the SYN first: once the pc has learned the path MTU its MSS is small already
    tlab.run("pc", ["ip", "route", "flush", "cache"])
    syn = Capture(tlab, "server", "eth0", incoming_only=True,
                  keep=lambda f: f[12:14] == b"\x08\x00" and f[23] == 6 and f[47] & 0x02)
    with syn:
        tlab.run("pc", ["bash", "-c", f"exec 3<>/dev/tcp/{T_SERVER}/1"], check=False)
        got = syn.wait(lambda fr: fr, 5, "the SYN at the server")
    big = tlab.run("pc", ["ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", "1472", T_SERVER],
                   check=False)
    fits = ping(tlab, "pc", T_SERVER, count=2, size=1464 - 28, df="do")
    c1, _ = tpb1.stop(), pop.stop()
    assert "mtu = 1464" in big.stdout + big.stderr, big.stdout + big.stderr
    assert_ping_ok(fits, 2)
    opts = bytes(got[0].data[34 + 20 : 34 + (got[0].data[46] >> 4) * 4])
    i = opts.find(b"\x02\x04")
    assert i >= 0 and struct.unpack_from("!H", opts, i + 2)[0] == 1464 - 40, opts.hex()
    assert c1["tunnel"]["icmp_sent"] >= 1 and c1["tunnel"]["mss_clamped"] >= 1, c1["tunnel"]


def test_tcp_udp_fragments_decode_cleanly_in_tshark(tlab, daemons, iperf_servers, tmp_path):
    """TCP (super-packets segmented in C, each sent as one UDP GSO message
    that the kernel cuts into datagrams), UDP of 3000 bytes and pings of
    3000 bytes (fragmented inside the tunnel, and by the POP's kernel in the
    outer header on the way back) through both sites' GRE-in-UDP tunnels:
    tshark (which takes UDP port 4754 for GRE-in-UDP itself) decodes every
    packet without a warning — UDP, GRE and inner checksums, reassembly."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    tpb1 = daemons.run(tlab, *TPB1)
    tpb2 = daemons.run(tlab, *TPB2, node="tpb2")
    for host in ("pc", "pc2"):
        tlab.run(host, ["ip", "route", "flush", "cache"])  # no path MTU from earlier tests
        ping(tlab, host, T_SERVER, count=1)
    dumps = {
        site: Tcpdump(tlab, "gw2", ifname, tmp_path / f"{site}.pcap",
                      f"udp port {GRE_UDP_PORT} or (ip[6:2] & 0x1fff != 0)")
        for site, ifname in (("site1", "eth0"), ("site2", "eth2"))
    }
    for host in ("pc", "pc2"):
        assert_ping_ok(ping(tlab, host, T_SERVER, count=2, size=3000, df="dont"), 2)
    p1, p2 = iperf_servers
    runs = [iperf(tlab, "pc", p1, "-b", "100M", seconds=1),
            iperf(tlab, "pc2", p2, "-b", "100M", seconds=1)]
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
        assert c["tunnel"]["udp_gso_sent"] > 0, c["tunnel"]
        assert c["tunnel"]["reasm_done"] > 0 and c["tunnel"]["drop"] == {}, c["tunnel"]
    assert all(p["drop"] == {} for p in cp["peers"].values()), cp
    as_data = [f"{proto}.port=={p},data" for p in IPERF_PORTS for proto in ("tcp", "udp")]
    ports = [a for d in as_data for a in ("-d", d)]
    for site, got in frames.items():
        assert len(got) > 100, f"{site}: {len(got)} frames"
        problems = tshark_problems(
            tmp_path / f"{site}.pcap", "-o", "tcp.analyze_sequence_numbers:FALSE", *ports
        )
        assert not problems, f"{site}: {problems}"
        # and tshark did see GRE inside UDP, on its own
        out = subprocess.run(["tshark", "-r", str(tmp_path / f"{site}.pcap"), "-Y",
                              "udp.port == 4754 && gre",
                              "-T", "fields", "-e", "frame.number"],
                             capture_output=True, text=True, timeout=120)
        assert len(out.stdout.split()) > 100, out.stderr


def status_json(tlab, node: str) -> dict:
    r = tlab.run(node, [sys.executable, "-m", "tpb", "status", "--json"], check=False)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return {}
    return doc[0] if isinstance(doc, list) and doc else doc


def test_keepalives_over_udp_both_ways(tlab, daemons):
    """The bridge's keepalives ride GRE-in-UDP and the POP reflects them in
    UDP; the POP's own keepalives to a udp peer come back the same way."""
    # The bridge first: gw2 learns the bridge's address by ARP, which the
    # bridge answers only once it runs.  A POP started first has its
    # keepalives wait in gw2's ARP queue and answered all at once, most of
    # them older than the 3 the POP takes answers for (keepalive_stale).
    tpb1 = daemons.run(tlab, *tunnel_args(T_TPB, "--encap", "udp", "--key", str(KEY1),
                                          "--keepalive", "0.2s,3"))
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1 + ",keepalive=0.2s,3")
    with udp_capture(tlab, "eth0") as cap:
        # an IPv4 frame from --in gives the keepalives their Ethernet header
        tlab.run("gw1", ["ping", "-c", "1", "-W", "1", labmod.T_GW2], check=False)

        def both_up() -> bool:
            d = status_json(tlab, "pop")
            peers = d.get("peers", [])
            return bool(peers) and (peers[0].get("state") or {}).get("up") and \
                peers[0]["state"]["keepalives_received"] >= 3 and \
                peers[0]["state"]["keepalives_reflected"] >= 3
        wait_for(both_up, 10, "the POP's peer up and the bridge's keepalives reflected")
        frames = cap.stop()
    c1, cp = tpb1.stop(), pop.stop()
    (remote,) = c1["tunnel"]["remotes"]
    assert remote["up"] and remote["keepalives_received"] >= 3, remote
    assert remote["keepalives_reflected"] >= 3, remote
    assert c1["tunnel"]["drop"] == {} and cp["peers"][T_TPB]["drop"] == {}, (c1, cp)
    # No plain GRE on the wire: every keepalive and answer was UDP to 4754.
    assert frames and all(IP(f.data[14:])[UDP].dport == GRE_UDP_PORT for f in frames)


# ---- the bridge's checks of what arrives ---------------------------------------


def test_bridge_validates_udp_before_gre(tlab, daemons):
    """GRE-in-UDP made byte by byte, as from the POP, sent to the bridge's
    tunnel address: a right one is unwrapped toward --in; a wrong UDP
    checksum, a UDP length past the datagram, a truncated UDP header and
    other ports are dropped, each under its reason; a zero checksum ("none",
    RFC 768) is taken."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1)
    tpb1 = daemons.run(tlab, *TPB1)
    assert_ping_ok(ping(tlab, "pc", T_SERVER, count=1), 1)  # the router's MAC learned
    out_mac = tlab.iface("tpb", "eth3").mac
    gw2_mac = tlab.iface("gw2", "eth0").mac

    def frame(marker: bytes, *, sport=GRE_UDP_PORT, dport=GRE_UDP_PORT, csum=None,
              ulen_delta=0, truncate=None) -> bytes:
        inner = bytes(IP(src=T_SERVER, dst=T_PC, ttl=60) / ICMP(type=0, id=0x4242) / Raw(marker))
        g = gre_header(key=KEY1, payload=inner)
        udp = UDP(sport=sport, dport=dport) / Raw(g)
        ip = IP(src=T_POP, dst=T_TPB, ttl=64) / udp
        raw = bytearray(bytes(ip))
        if csum is not None:
            struct.pack_into("!H", raw, 26, csum)
        if ulen_delta:
            struct.pack_into("!H", raw, 24, len(raw) - 20 + ulen_delta)
        if truncate is not None:
            raw = raw[: 20 + truncate]
            struct.pack_into("!H", raw, 2, len(raw))
            raw[10:12] = b"\0\0"
            raw[10:12] = struct.pack("!H", _ip_csum(bytes(raw[:20])))
        return bytes(Ether(src=gw2_mac, dst=out_mac, type=0x0800)) + bytes(raw)

    cases = {
        b"good-one": {},
        b"zero-sum": {"csum": 0},
        b"bad-csum": {"csum": 0x1234},
        b"too-long": {"ulen_delta": 4},
        b"other-ports": {"sport": 5000, "dport": 5001},
        b"truncated": {"truncate": 6},
    }
    arrive = Capture(tlab, "gw1", "eth1", incoming_only=True,
                     keep=lambda f: any(m in f for m in cases))
    with arrive, FrameSender(tlab, "gw2", "eth0") as tx:
        for m, kw in cases.items():
            tx.send(frame(m, **kw))
        arrive.wait(lambda fr: len(fr) >= 2, 5, "the good frames through")
        got = arrive.stop()
    c1, _ = tpb1.stop(), pop.stop()
    seen = {m for m in cases for f in got if m in f.data}
    assert seen == {b"good-one", b"zero-sum"}, seen
    t = c1["tunnel"]
    assert t["drop"] == {"udp_csum": 1, "udp_bad": 2, "local_other": 1}, t["drop"]


def _ip_csum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
