"""Keepalives, backup POPs and fail-open, on the bridge's side.

The tunnel lab (tpb/lab.py: tunnel()) grown a second POP host, pop2, on its
own link from gw2 (eth3).  Both POP hosts have 203.0.113.1 (the pop on its
server link, pop2 on its loopback), so a ping from pc to 203.0.113.1 is
answered by whichever POP the tunnel reaches — as sites outgrow one POP:
several POP hosts announcing the same prefixes.  Without a tunnel, gw2
routes 203.0.113.0/24 to the pop host as a plain router: that is what
fail-open's bypass reaches.

GRE between TPB and the POPs is captured on gw2: eth0 faces TPB, eth1 the
pop, eth3 pop2.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from helpers import received, wait_for
from pop_util import Capture, IpSender, assert_ping_ok, need_root, parse_gre, ping
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw
from tunnel_util import Wire

from tpb import lab as labmod
from tpb.lab import T_GW2, T_POP, T_SERVER, T_TPB, Iface, Node

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbka"
POP2 = "198.51.100.50"
ANYCAST = "203.0.113.1"  # on both POP hosts
KEY = 7
PEER = f"{T_TPB},key={KEY},prefix=192.0.2.0/26"
PERIOD, RETRIES = 0.2, 3
DEAD = PERIOD * RETRIES
MATCH = "ip daddr 203.0.113.0/24"
GW1_MAC = "02:00:00:00:00:42"
GW2_MAC = "02:00:00:00:00:45"


def two_pops(prefix: str) -> labmod.Lab:
    lab = labmod.tunnel(prefix)
    lab.nodes["pop2"] = Node("pop2", forwarding=True, routes=[("default", "198.51.100.49")])
    lab.links.append(
        (
            Iface("gw2", "eth3", "02:00:00:00:00:60", ["198.51.100.49/28"]),
            Iface("pop2", "eth0", "02:00:00:00:00:61", [f"{POP2}/28"]),
        )
    )
    return lab


@pytest.fixture(scope="module")
def tlab():
    need_root()
    with two_pops(LAB_PREFIX) as lb:
        lb.run("pop2", f"ip addr add {ANYCAST}/32 dev lo")
        for node in ("pop", "pop2"):
            # no router solicitations from the TUN device into exact counts
            lb.sysctl(node, "net.ipv6.conf.default.disable_ipv6", "1")
        yield lb


def bridge(daemons, tlab, *extra: str, remotes: str = T_POP):
    return daemons.run(
        tlab, "--local", T_TPB, "--remote", remotes, "--key", str(KEY), "--match", MATCH,
        "--keepalive", f"{PERIOD}s,{RETRIES}", *extra,
    )


def pop(daemons, tlab, node: str = "pop", local: str = T_POP):
    return daemons.pop(tlab, "--local", local, "--peer", PEER, node=node)


def teach_next_hop(tlab) -> None:
    """An IPv4 frame from --in to --out: TPB learns the MACs its keepalives
    leave with (gw1 -> gw2, as the tunnelled flows themselves)."""
    assert_ping_ok(ping(tlab, "gw1", T_GW2, count=1), 1)


def gre_to(dst: str, inner_dst: str):
    """A capture filter: GRE to dst whose inner packet goes to inner_dst."""

    def keep(frame: bytes) -> bool:
        g = parse_gre(frame)
        return g is not None and g.outer_dst == dst and g.proto == 0x0800 and (
            len(g.inner) >= 20 and g.inner_dst == inner_dst
        )

    return keep


def plain_icmp_to(dst: str):
    def keep(frame: bytes) -> bool:
        return (
            len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 1
            and socket.inet_ntoa(frame[30:34]) == dst
        )

    return keep


class Pinger:
    """ping every 20 ms in the background, counting replies at the end."""

    def __init__(self, tlab, node: str, dst: str) -> None:
        self.proc = subprocess.Popen(
            tlab.cmd(node, ["ping", "-n", "-i", "0.02", "-W", "1", dst]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out


# ---- what goes on the wire ----------------------------------------------------


def test_keepalives_are_cisco_format_at_the_period(tlab, daemons):
    cap = Capture(tlab, "gw2", "eth0", keep=lambda f: parse_gre(f) is not None,
                  incoming_only=True)
    with cap:
        t = bridge(daemons, tlab)
        time.sleep(2 * PERIOD)
        # Nothing yet: TPB knows no MAC to send them with.
        assert cap.snapshot() == [], cap.snapshot()
        teach_next_hop(tlab)
        frames = cap.wait(lambda fs: len(fs) >= 4 and fs, 5, "four keepalives")
    c = t.stop()
    times = [f.t for f in frames]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(PERIOD * 0.5 < g < PERIOD * 2.5 for g in gaps), gaps
    for f in frames:
        e = Ether(f.data)
        assert (e.dst, e.src) == (GW2_MAC, GW1_MAC), e.summary()
        outer = e[IP]
        assert (outer.src, outer.dst, outer.proto) == (T_TPB, T_POP, 47)
        g = outer[GRE]
        assert (g.key_present, g.key, g.proto, g.chksum_present, g.seqnum_present) == (
            1, KEY, 0x0800, 0, 0)
        inner = g.payload
        assert isinstance(inner, IP), inner.summary()
        assert (inner.src, inner.dst, inner.proto, inner.ttl, inner.flags, inner.frag) == (
            T_POP, T_TPB, 47, 255, 0, 0)
        ig = inner[GRE]
        assert (ig.key_present, ig.key, ig.proto, ig.seqnum_present) == (1, KEY, 0, 0)
        assert bytes(ig.payload) == b""
        # every length and checksum as scapy would write them
        assert bytes(e) == bytes(Ether(bytes(e)))
        redone = IP(bytes(outer))
        del redone.chksum
        redone[GRE].payload.chksum = None
        assert bytes(IP(bytes(redone))) == bytes(outer)
    # No POP answered: no traffic would go into the tunnel.
    assert c["tunnel"]["encap_packets"] == 0, c["tunnel"]


def test_a_strangers_frames_do_not_redirect_the_keepalives(tlab, daemons):
    """Once TPB knows the hop its keepalives leave by, bridged IPv4 frames
    from --in with other MACs (a flood from a spoofed source to a MAC
    nobody has, as anyone upstream can send) do not change it: the
    keepalives after them still go gw1 -> gw2, where the ISP's router
    takes them."""
    cap = Capture(tlab, "gw2", "eth0", keep=lambda f: parse_gre(f) is not None,
                  incoming_only=True)
    stranger, nobody = "02:00:00:00:00:77", "02:00:00:00:00:99"
    junk = bytes(Ether(src=stranger, dst=nobody) / IP(src="192.0.2.10", dst=T_GW2)
                 / UDP(sport=40000, dport=9) / Raw(b"x" * 18))
    with cap:
        t = bridge(daemons, tlab)
        teach_next_hop(tlab)
        cap.wait(lambda fs: len(fs) >= 1 and fs, 5, "a first keepalive")
        with Wire(tlab, "gw1", "eth1", outgoing=False) as w:
            for _ in range(20):
                w.send(junk)
        n = len(cap.snapshot())
        frames = cap.wait(lambda fs: len(fs) >= n + 3 and fs, 5, "three keepalives more")
    t.stop()
    for f in frames[n:]:
        e = Ether(f.data)
        assert (e.dst, e.src) == (GW2_MAC, GW1_MAC), e.summary()


def test_the_pops_own_keepalive_is_reflected(tlab, daemons):
    """A keepalive from the POP (outer POP -> TPB, inner TPB -> POP, GRE
    protocol 0) goes back to the POP as the inner packet, byte for byte; one
    from an address that is not a remote is refused and counted."""
    t = daemons.run(tlab, "--local", T_TPB, "--remote", T_POP, "--key", str(KEY),
                    "--match", MATCH)
    inner = IP(src=T_TPB, dst=T_POP, ttl=255, id=99) / GRE(key_present=1, key=KEY, proto=0)
    inner = IP(bytes(inner))
    ka = IP(src=T_POP, dst=T_TPB, ttl=64) / GRE(key_present=1, key=KEY, proto=0x0800) / inner
    back = Capture(tlab, "pop", "eth0", incoming_only=True,
                   keep=lambda f: f[12:14] == b"\x08\x00" and f[23] == 47)
    with back, IpSender(tlab, "pop") as tx:
        tx.send(bytes(ka))
        got = back.wait(lambda fs: fs, 5, "the reflected keepalive")
        stranger = bytes(IP(src="198.51.100.40", dst=T_TPB) / GRE(
            key_present=1, key=KEY, proto=0x0800) / inner)
        with IpSender(tlab, "gw2") as tx2:
            tx2.send(stranger)
        time.sleep(0.3)
        frames = back.stop()
    assert len(got) >= 1 and len(frames) == 1, frames
    reflected = frames[0].data[14:]
    # gw2 routed it on: only TTL and header checksum may have changed
    ip = IP(reflected)
    assert (ip.src, ip.dst, ip.id, ip.ttl) == (T_TPB, T_POP, 99, 254)
    assert bytes(ip[GRE]) == bytes(inner[GRE])
    c = t.stop()
    assert c["tunnel"]["drop"].get("not_peer") == 1, c["tunnel"]
    assert c["tunnel"]["decap_packets"] == 0, c["tunnel"]


def live(tlab) -> dict:
    """The running bridge's state, as `tpb status --json` shows it."""
    res = tlab.run("tpb", [sys.executable, "-m", "tpb", "status", "--json"], check=False)
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)
    return doc


def test_a_spoofed_answer_brings_no_pop_up(tlab, daemons):
    """Protocol-0 GRE from the POP's address with the right key is an answer
    only if it carries back the IP ID of one of our last keepalives (the far
    end reflects the inner packet as it is): guesses are counted as
    keepalive_stale and leave the POP down; the reflection of a real
    keepalive brings it up."""
    cap = Capture(tlab, "gw2", "eth0", keep=gre_to(T_POP, T_TPB), incoming_only=True)

    def ids() -> list[int]:
        return [IP(bytes(Ether(f.data)[GRE].payload)).id for f in cap.snapshot()]

    def answer(ident: int) -> bytes:
        return bytes(IP(src=T_POP, dst=T_TPB, ttl=254, id=ident) /
                     GRE(key_present=1, key=KEY, proto=0))

    with cap, IpSender(tlab, "pop") as tx:
        t = bridge(daemons, tlab)
        teach_next_hop(tlab)
        cap.wait(lambda fs: len(fs) >= 2 and fs, 5, "two keepalives")
        sent = ids()
        assert sent[1] == (sent[0] + 1) & 0xFFFF, sent
        # ahead of the next ones, far off, and just older than the window
        guesses = [(sent[-1] + d) & 0xFFFF for d in (5000, 20000, 0x8000, -RETRIES - 40)]
        for ident in guesses:
            tx.send(answer(ident))
        wait_for(lambda: live(tlab)["tunnel"]["counters"]["drop"].get("keepalive_stale")
                 == len(guesses), 5, "the guesses counted")
        st = live(tlab)["remotes"][0]["state"]
        assert not st["up"] and st["keepalives_received"] == 0, st
        # the latest keepalive reflected (the window spans RETRIES periods)
        tx.send(answer(ids()[-1]))
        wait_for(lambda: live(tlab)["remotes"][0]["state"]["up"], 5, "the real answer")
    c = t.stop()
    (r,) = c["tunnel"]["remotes"]
    assert r["keepalives_received"] == 1, r
    assert c["tunnel"]["drop"].get("keepalive_stale") == len(guesses), c["tunnel"]


# ---- fail-open ------------------------------------------------------------------


def test_pop_killed_bypass_carries_the_flow_then_the_tunnel_comes_back(tlab, daemons):
    p = pop(daemons, tlab)
    t = bridge(daemons, tlab)
    teach_next_hop(tlab)
    to_pop = Capture(tlab, "gw2", "eth0", incoming_only=True, keep=gre_to(T_POP, T_SERVER))
    plain = Capture(tlab, "gw2", "eth0", incoming_only=True, keep=plain_icmp_to(T_SERVER))
    with to_pop, plain:
        wait_for(lambda: received(ping(tlab, "pc", T_SERVER, count=1)) == 1, 5,
                 "the tunnel up (a ping through it)")
        assert to_pop.snapshot() and not plain.snapshot()
        pinger = Pinger(tlab, "pc", T_SERVER)
        time.sleep(0.5)
        p.kill()
        killed = time.monotonic()
        first = plain.wait(lambda fs: fs and fs[0], DEAD + 2, "the flow bypassing the tunnel")
        switch = first.t - killed
        # within period x retries (+ one ping interval and scheduling)
        assert switch <= DEAD + 0.3, switch
        time.sleep(0.5)
        restart = time.monotonic()
        p2 = pop(daemons, tlab)
        back = to_pop.wait(lambda fs: [f for f in fs if f.t > restart + 0.05] or None,
                           DEAD + 5, "encapsulation again")
        time.sleep(0.5)
        out = pinger.stop()
    assert back
    # unselected traffic never noticed: pc to gw2 is bridged throughout
    assert_ping_ok(ping(tlab, "pc", T_GW2, count=3), 3)
    c, cp = t.stop(), p2.stop()
    assert c["tunnel"]["bypassed"] >= 1, c["tunnel"]
    assert cp["peers"][T_TPB]["decap_packets"] >= 1, cp
    assert "bytes from" in out, out


def test_on_tunnel_down_drop_drops_and_counts_only_the_selected(tlab, daemons):
    t = bridge(daemons, tlab, "--on-tunnel-down", "drop")
    teach_next_hop(tlab)
    time.sleep(DEAD + 0.2)  # keepalives unanswered (no POP): down
    assert received(ping(tlab, "pc", T_SERVER, count=5, wait=0.5)) == 0
    assert_ping_ok(ping(tlab, "pc", T_GW2, count=3), 3)
    c = t.stop()
    assert c["tunnel"]["drop"].get("tunnel_down") == 5, c["tunnel"]
    assert c["tunnel"]["encap_packets"] == 0 and c["tunnel"]["bypassed"] == 0, c["tunnel"]


def test_without_keepalives_the_tunnel_counts_as_up(tlab, daemons):
    t = daemons.run(tlab, "--local", T_TPB, "--remote", T_POP, "--key", str(KEY),
                    "--match", MATCH)
    assert received(ping(tlab, "pc", T_SERVER, count=3, wait=0.5)) == 0  # no POP: lost
    c = t.stop()
    assert c["tunnel"]["encap_packets"] == 3 and c["tunnel"]["bypassed"] == 0, c["tunnel"]


# ---- backup POPs ------------------------------------------------------------------


def test_backup_pop_takes_over_and_the_primary_takes_back(tlab, daemons):
    p1 = pop(daemons, tlab)
    p2 = pop(daemons, tlab, node="pop2", local=POP2)
    t = bridge(daemons, tlab, remotes=f"{T_POP},{POP2}")
    teach_next_hop(tlab)
    via1 = Capture(tlab, "gw2", "eth0", incoming_only=True, keep=gre_to(T_POP, ANYCAST))
    via2 = Capture(tlab, "gw2", "eth0", incoming_only=True, keep=gre_to(POP2, ANYCAST))
    with via1, via2:
        wait_for(lambda: received(ping(tlab, "pc", ANYCAST, count=1)) == 1, 5,
                 "the tunnel to the primary up")
        assert via1.snapshot() and not via2.snapshot()
        pinger = Pinger(tlab, "pc", ANYCAST)
        time.sleep(0.3)
        p1.kill()
        killed = time.monotonic()
        first = via2.wait(lambda fs: fs and fs[0], DEAD + 2, "traffic to the backup")
        assert first.t - killed <= DEAD + 0.3, first.t - killed
        time.sleep(0.5)
        restart = time.monotonic()
        p1b = pop(daemons, tlab)
        via1.wait(lambda fs: [f for f in fs if f.t > restart] or None, DEAD + 5,
                  "traffic back to the primary")
        t_back = time.monotonic()
        time.sleep(0.3)
        out = pinger.stop()
        late2 = [f for f in via2.snapshot() if f.t > t_back + 0.1]
    # once the primary answers again, nothing more goes to the backup
    assert late2 == [], len(late2)
    c = t.stop()
    c1, c2 = p1b.stop(), p2.stop()
    assert c1["peers"][T_TPB]["decap_packets"] >= 1, c1
    assert c2["peers"][T_TPB]["decap_packets"] >= 1, c2
    assert "bytes from" in out, out
    assert c["tunnel"]["bypassed"] == 0, c["tunnel"]  # a POP was up throughout
