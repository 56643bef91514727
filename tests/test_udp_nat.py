"""Both sites behind one NAT: GRE-in-UDP crosses it, plain GRE does not.

The tunnel lab (tpb/lab.py: tunnel()) with gw2 as the NAT: what leaves its
eth1 toward the POP from the bridges' links (198.51.100.0/27) is
masqueraded to gw2's own 198.51.100.33, ports chosen at random (`masquerade
random`, as carrier-grade NATs do), so neither the POP nor anything else on
that side sees a bridge's address or its own source port:

    pc  — gw1 — [tpb]  —\\
                          gw2 (NAT) — pop — server
    pc2 — gw3 — [tpb2] —/

The POP knows both bridges only as `any` peers, told apart by their keys,
and answers each where its packets come from.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from pop_util import (
    Capture,
    assert_ping_ok,
    iperf,
    iperf_result,
    need_root,
    need_tool,
    ping,
    received,
    start_iperf_servers,
    tunnel_args,
    wait_for,
)
from scapy.layers.inet import IP, UDP

from tpb import lab as labmod
from tpb.lab import T_POP, T_SERVER, T_TPB, T_TPB2

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbnat"
NAT_ADDR = "198.51.100.33"  # gw2 toward the pop
SITE1 = "192.0.2.0/26"
SITE2 = "192.0.2.64/26"
NAT_PEER1 = f"any,udp,key=7,prefix={SITE1}"
NAT_PEER2 = f"any,udp,key=8,csum,seq,prefix={SITE2}"
KA = "0.5s,3"
UDP1 = tunnel_args(T_TPB, "--encap", "udp", "--key", "7", "--keepalive", KA,
                   "--on-tunnel-down", "drop")
UDP2 = tunnel_args(T_TPB2, "--encap", "udp", "--key", "8", "--csum", "--seq",
                   "--keepalive", KA, "--on-tunnel-down", "drop")
IPERF_PORTS = (5221, 5222)


@pytest.fixture(scope="module")
def tlab():
    need_root()
    need_tool("nft", "nftables")
    need_tool("conntrack")
    with labmod.tunnel(LAB_PREFIX) as lb:
        lb.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        lb.run("gw2", [
            "nft", "add table ip nat; "
            "add chain ip nat post { type nat hook postrouting priority srcnat; }; "
            "add rule ip nat post oifname eth1 ip saddr 198.51.100.0/27 masquerade random"])
        yield lb


@pytest.fixture(scope="module")
def iperf_servers(tlab):
    start_iperf_servers(tlab, IPERF_PORTS)
    return IPERF_PORTS


def status(tlab, node: str) -> dict:
    r = tlab.run(node, [sys.executable, "-m", "tpb", "status", "--json"], check=False)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return {}
    return doc[0] if isinstance(doc, list) and doc else doc


def endpoints(tlab) -> dict[str, str | None]:
    """The POP's view: peer name -> the endpoint it answers at."""
    return {p["name"]: (p.get("state") or {}).get("endpoint")
            for p in status(tlab, "pop").get("peers", [])}


def wait_bridge_up(tlab, node: str) -> None:
    # an IPv4 frame from --in gives the keepalives their Ethernet header
    gw = "gw1" if node == "tpb" else "gw3"
    tlab.run(gw, ["ping", "-c", "1", "-W", "1", labmod.T_GW2 if node == "tpb" else "198.51.100.18"],
             check=False)

    def up() -> bool:
        rs = status(tlab, node).get("remotes", [])
        return bool(rs) and bool((rs[0].get("state") or {}).get("up"))
    wait_for(up, 10, f"{node}'s POP up through the NAT", interval=0.1)


def test_plain_gre_does_not_cross_the_nat(tlab, daemons):
    """The POP sees the NAT's address, not the bridge's: not a peer."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", f"{T_TPB},key=7,prefix={SITE1}")
    tpb1 = daemons.run(tlab, *tunnel_args(T_TPB, "--key", "7", "--no-keepalive"))
    r = ping(tlab, "pc", T_SERVER, count=3, wait=1.0)
    c1, cp = tpb1.stop(), pop.stop()
    assert received(r) == 0, r.stdout
    assert c1["tunnel"]["encap_packets"] >= 3, c1["tunnel"]
    assert cp["peers"][T_TPB]["decap_packets"] == 0, cp
    assert cp["other"]["drop"].get("not_peer", 0) >= 3, cp["other"]


def test_both_sites_behind_one_nat_address(tlab, daemons):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", NAT_PEER1, "--peer", NAT_PEER2)
    tpb1 = daemons.run(tlab, *UDP1)
    tpb2 = daemons.run(tlab, *UDP2, node="tpb2")
    wait_bridge_up(tlab, "tpb")
    wait_bridge_up(tlab, "tpb2")
    seen = Capture(tlab, "pop", "eth0", incoming_only=True,
                   keep=lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
    with seen:
        assert_ping_ok(ping(tlab, "pc", T_SERVER, count=3), 3)
        assert_ping_ok(ping(tlab, "pc2", T_SERVER, count=3), 3)
        frames = seen.stop()
    eps = endpoints(tlab)
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()
    # At the POP everything comes from the NAT's one address.
    srcs = {IP(f.data[14:]).src for f in frames}
    assert srcs == {NAT_ADDR}, srcs
    assert all(IP(f.data[14:])[UDP].dport == 4754 for f in frames)
    # Each site's packets found its own peer by key, and went back to it.
    e1, e2 = eps["any/key=7"], eps["any/key=8"]
    assert e1 and e2 and e1.startswith(NAT_ADDR + ":") and e2.startswith(NAT_ADDR + ":"), eps
    for name, c in (("any/key=7", c1), ("any/key=8", c2)):
        p = cp["peers"][name]
        assert p["decap_packets"] >= 3 and p["encap_packets"] >= 3 and p["drop"] == {}, p
        assert p["state"]["keepalives_reflected"] >= 1, p["state"]
        t = c["tunnel"]
        assert t["encap_packets"] >= 3 and t["decap_packets"] >= 3 and t["drop"] == {}, t
    assert cp["other"]["drop"] == {}, cp["other"]


def test_nat_mapping_flushed_mid_transfer_tcp_carries_on(tlab, daemons, iperf_servers):
    """TCP up from site 1 and down to site 2 at once; mid-transfer the NAT
    forgets every mapping (conntrack -F): the bridges' next packets get new
    ports, the POP follows them (the endpoints change) and both transfers
    go on to the end."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", NAT_PEER1, "--peer", NAT_PEER2)
    tpb1 = daemons.run(tlab, *UDP1)
    tpb2 = daemons.run(tlab, *UDP2, node="tpb2")
    wait_bridge_up(tlab, "tpb")
    wait_bridge_up(tlab, "tpb2")
    p1, p2 = iperf_servers
    seconds = 6
    up = iperf(tlab, "pc", p1, "-b", "50M", "-i", "0.5", seconds=seconds)
    down = iperf(tlab, "pc2", p2, "-R", "-b", "50M", "-i", "0.5", seconds=seconds)
    t0 = time.monotonic()

    def flowing() -> dict[str, str | None] | None:
        d = status(tlab, "pop")
        c = {p["name"]: (p.get("counters") or {}).get("decap_packets", 0)
             for p in d.get("peers", [])}
        return endpoints(tlab) if len(c) == 2 and min(c.values()) > 500 else None

    before = wait_for(flowing, 5, "both transfers under way", interval=0.1)
    flushed = tlab.run("gw2", ["conntrack", "-F"], check=False)
    assert flushed.returncode == 0, flushed.stderr
    flushed_at = time.monotonic() - t0
    assert flushed_at < seconds - 2, f"the flush came late ({flushed_at:.1f}s)"
    after = wait_for(lambda: (e := endpoints(tlab)) and all(
        e[k] and e[k] != before[k] for k in before) and e, 5,
        "the POP following both bridges to their new NAT ports", interval=0.1)
    r_up, r_down = iperf_result(up, timeout=seconds + 20), iperf_result(down, timeout=seconds + 20)
    c1, c2, cp = tpb1.stop(), tpb2.stop(), pop.stop()
    print("endpoints before", before, "after", after, f"flush at {flushed_at:.1f}s")
    for r in (r_up, r_down):
        ivs = r["intervals"]
        late = [iv["sum"]["bytes"] for iv in ivs if iv["sum"]["start"] >= flushed_at + 1.0]
        assert late and all(b > 0 for b in late), [iv["sum"]["bytes"] for iv in ivs]
        assert r["end"]["sum_received"]["bytes"] > 1_000_000, r["end"]["sum_received"]
    for name in ("any/key=7", "any/key=8"):
        assert cp["peers"][name]["drop"] == {}, cp["peers"][name]
    # what went to the old mapping after the flush was lost in the NAT, not
    # refused by a bridge
    assert c1["tunnel"]["drop"] == {} and c2["tunnel"]["drop"] == {}, (c1, c2)
