"""`tpb pop`: keepalives, peer state, live reload and heartbeat (csrc/pop.c).

Keepalives are Cisco's, which Linux ip_gre reflects too: the sender S sends
outer IPv4 S -> F + GRE (the tunnel's key/csum/seq, protocol 0x0800) whose
inner packet is IPv4 F -> S, protocol 47, TTL 255, DF clear, carrying a bare
GRE header of protocol 0 (the tunnel's key and checksum, no sequence number).
F decapsulates and routes the inner packet: S gets back plain GRE of
protocol 0, the answer.

The tunnel lab of test_pop.py, no bridge running: a bridge's GRE is made with
scapy and sent from gw2 with the bridge's address as source; the far end of
the POP's own keepalives is a Reflector, the bridge's tunnel address put on
the bridge node's eth3.  The live-reload tests drive the C API
(NativePop.reconfigure) in a process of their own in the pop's namespace
(tests/pop_agent.py), while scapy sends GRE.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import inet_sum
from pop_util import Capture, IpSender, need_root, parse_gre, wait_for
from rawsock import netns
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import GRE
from scapy.packet import Raw

from tpb import config, pop_config
from tpb import lab as labmod
from tpb.lab import T_GW2, T_GW2B, T_PC, T_PC2, T_POP, T_SERVER, T_TPB, T_TPB2

LAB_PREFIX = "tpbpka"
SITE1 = "192.0.2.0/26"
SITE2 = "192.0.2.64/26"
KEY1 = 7
PEER1 = f"{T_TPB},key={KEY1},prefix={SITE1}"
PEER2 = f"{T_TPB2},csum,seq,prefix={SITE2}"
TUN = "tpbpop0"
AGENT_TUN = "tpbrl0"
GW2_TO_POP = "198.51.100.33"  # gw2's own address toward the pop
AGENT = Path(__file__).resolve().parent / "pop_agent.py"

# the two bridges: address, GRE options, a host of its site, its node, its gateway
BRIDGES = {
    "key": dict(addr=T_TPB, key=KEY1, csum=False, seq=False, host=T_PC, node="tpb", gw=T_GW2,
                peer=PEER1),
    "csum_seq": dict(addr=T_TPB2, key=None, csum=True, seq=True, host=T_PC2, node="tpb2",
                     gw=T_GW2B, peer=PEER2),
}

netns_test = pytest.mark.netns


@pytest.fixture(scope="module")
def tlab():
    need_root()
    with labmod.tunnel(LAB_PREFIX) as lb:
        # No IPv6 on the TUN devices: nothing but what the tests send on them.
        lb.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        yield lb


# ---- GRE made by hand ---------------------------------------------------------


def gre(key=None, csum=False, seq=None, proto=0x0800) -> GRE:
    kw: dict = {"proto": proto}
    if key is not None:
        kw.update(key_present=1, key=key)
    if csum:
        kw.update(chksum_present=1)  # scapy computes it
    if seq is not None:
        kw.update(seqnum_present=1, sequence_number=seq)
    return GRE(**kw)


KA_ID = 0x6B61


def cisco_keepalive(sender: str, far: str, key=None, csum=False, seq=None) -> tuple[bytes, bytes]:
    """A keepalive from `sender` to `far`, and its inner GRE header (what
    comes back as the answer's GRE packet)."""
    inner_gre = bytes(gre(key, csum, None, proto=0))
    inner = IP(src=far, dst=sender, ttl=255, flags=0, proto=47, id=KA_ID) / Raw(inner_gre)
    return bytes(IP(src=sender, dst=far, ttl=64) / gre(key, csum, seq) / inner), inner_gre


def data_packet(sender: str, inner_src: str, key=None, csum=False, seq=None, ident=0,
                inner_dst: str = T_SERVER) -> bytes:
    """GRE from a bridge around an ICMP echo reply (its receiver ignores it)."""
    inner = IP(src=inner_src, dst=inner_dst, ttl=64) / ICMP(type=0, id=ident) / b"tpb test"
    return bytes(IP(src=sender, dst=T_POP, ttl=64) / gre(key, csum, seq) / inner)


def ip_header_ok(ip: bytes) -> bool:
    return inet_sum(ip[: (ip[0] & 15) * 4]) == 0xFFFF


def check_pop_keepalive(frame: bytes, b: dict) -> int | None:
    """One of the POP's keepalives to bridge b, byte by byte; returns its
    outer sequence number."""
    ip = frame[14:]
    tot = struct.unpack_from("!H", ip, 2)[0]
    assert ip[0] == 0x45 and ip[9] == 47 and ip_header_ok(ip), ip[:20].hex()
    assert (socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])) == (T_POP, b["addr"])
    assert ip[8] == 64, f"outer TTL {ip[8]} (the peer's ttl, 64 by default)"
    g = parse_gre(frame)
    assert g is not None
    want = (0x8000 if b["csum"] else 0) | (0x2000 if b["key"] is not None else 0)
    assert g.flags == want | (0x1000 if b["seq"] else 0), hex(g.flags)
    assert g.proto == 0x0800 and g.key == b["key"], g
    if b["csum"]:
        assert inet_sum(ip[20:tot]) == 0xFFFF, "outer GRE checksum"
    outer_glen = 4 + 4 * (b["csum"] + (b["key"] is not None) + b["seq"])
    inner = ip[20 + outer_glen : tot]
    inner_glen = 4 + (4 if b["csum"] else 0) + (4 if b["key"] is not None else 0)
    assert len(inner) == 20 + inner_glen, f"inner packet {inner.hex()}: no payload expected"
    # inner IPv4: from the bridge back to the POP, GRE, TTL 255, DF clear
    assert inner[0] == 0x45 and inner[1] == 0, inner[:20].hex()
    assert struct.unpack_from("!H", inner, 2)[0] == 20 + inner_glen
    assert struct.unpack_from("!H", inner, 6)[0] == 0, "DF clear, not a fragment"
    assert inner[8] == 255 and inner[9] == 47 and ip_header_ok(inner), inner[:20].hex()
    assert (socket.inet_ntoa(inner[12:16]), socket.inet_ntoa(inner[16:20])) == (b["addr"], T_POP)
    # inner GRE: protocol 0, the key and checksum options, no sequence number
    ig = inner[20:]
    assert struct.unpack_from("!HH", ig, 0) == (want, 0), ig.hex()
    if b["csum"]:
        assert inet_sum(ig) == 0xFFFF and ig[6:8] == b"\0\0", ig.hex()
    if b["key"] is not None:
        assert struct.unpack_from("!I", ig, len(ig) - 4)[0] == b["key"], ig.hex()
    return g.seq


class Reflector:
    """The far end of the POP's keepalives, as Linux ip_gre or a Cisco router:
    the bridge's tunnel address on its node's eth3, a raw GRE socket that
    decapsulates what arrives and sends the inner packet on as it is (an
    IPPROTO_RAW socket: the kernel routes it, its header untouched).
    `answering` cleared: it keeps receiving, answers nothing."""

    def __init__(self, lab: labmod.Lab, node: str, addr: str, gw: str) -> None:
        self.lab, self.node, self.addr = lab, node, addr
        lab.run(node, ["ip", "addr", "add", f"{addr}/28", "dev", "eth3"])
        lab.run(node, ["ip", "route", "add", "default", "via", gw])
        with netns(lab.ns(node)):
            self.rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.answering = threading.Event()
        self.answering.set()
        self.got: list[tuple[float, bytes]] = []
        self.answered: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            r, _, _ = select.select([self.rx], [], [], 0.05)
            if not r:
                continue
            data = self.rx.recv(65536)
            t = time.monotonic()
            self.got.append((t, data))
            g = parse_gre(b"\0" * 12 + b"\x08\x00" + data)  # an Ethernet header in front
            if not self.answering.is_set() or g is None or g.proto != 0x0800:
                continue
            inner = g.inner
            if len(inner) >= 20 and inner[0] >> 4 == 4:
                self.tx.sendto(inner, (socket.inet_ntoa(inner[16:20]), 0))
                self.answered.append(t)

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.rx.close()
        self.tx.close()
        self.lab.run(self.node, ["ip", "route", "del", "default"], check=False)
        self.lab.run(self.node, ["ip", "addr", "del", f"{self.addr}/28", "dev", "eth3"],
                     check=False)

    def __enter__(self) -> Reflector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def outgoing_gre_to(addr: str):
    return lambda f: (g := parse_gre(f)) is not None and g.outer_dst == addr


# ---- --peer ...,keepalive=PERIOD,RETRIES ------------------------------------------


def _settings(tmp_path, *peers: str) -> pop_config.PopSettings:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    args = argparse.Namespace(config=str(empty), local=T_POP, tun=None, learn_timeout=None,
                              peer=list(peers))
    return pop_config.settings_from(args)[0]


def test_peer_flag_keepalive_takes_its_own_comma(tmp_path):
    s = _settings(tmp_path, f"{T_TPB},key=7,keepalive=1s,3,prefix={SITE1}",
                  f"{T_TPB2},keepalive=500ms,5,csum", f"{GW2_TO_POP},keepalive=off,seq")
    assert [p.keepalive for p in s.peers] == [
        config.Keepalive(1.0, 3), config.Keepalive(0.5, 5), None
    ]
    assert s.peers[0].key == 7 and s.peers[0].prefixes == [SITE1]
    assert s.peers[1].csum and s.peers[2].seq


@pytest.mark.parametrize("spec, want", [
    (f"{T_TPB},keepalive=1s", "PERIOD,RETRIES"),
    (f"{T_TPB},keepalive=1s,csum", "PERIOD,RETRIES"),
    (f"{T_TPB},keepalive=1s,0", "retries"),
    (f"{T_TPB},keepalive=10ms,3", "period"),
])
def test_peer_flag_bad_keepalive_is_one_problem(tmp_path, spec, want):
    with pytest.raises(config.ConfigError) as e:
        _settings(tmp_path, spec)
    assert len(e.value.problems) == 1 and want in e.value.problems[0], e.value.problems
    assert e.value.problems[0].startswith(f"--peer {spec}:"), e.value.problems


def test_pop_help_documents_keepalive():
    out = subprocess.run([sys.executable, "-m", "tpb", "pop", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "keepalive=PERIOD,RETRIES" in "".join(out.split()), out  # however it wraps


# ---- a bridge's keepalives: reflected ---------------------------------------------


@netns_test
@pytest.mark.parametrize("which", list(BRIDGES))
def test_bridges_keepalive_is_reflected_never_routed(tlab, daemons, which):
    """A Cisco keepalive from a bridge's address comes back to it from the
    POP: outer IPv4 POP -> bridge, its payload the keepalive's inner GRE
    header byte for byte (protocol 0, the key, the checksum).  Nothing of it
    reaches the TUN device, and it is not learned.  With a wrong key it is
    dropped and counted as gre_key, not reflected.  A data packet sent after
    both does reach the TUN device (the capture there works)."""
    b = BRIDGES[which]
    seqs = iter(range(1, 10))

    def seq():
        return next(seqs) if b["seq"] else None

    bad, _ = cisco_keepalive(b["addr"], T_POP, key=8, csum=b["csum"], seq=seq())
    good, inner_gre = cisco_keepalive(b["addr"], T_POP, key=b["key"], csum=b["csum"], seq=seq())
    after = data_packet(b["addr"], b["host"], key=b["key"], csum=b["csum"], seq=seq(),
                        ident=0x4B41)
    after_inner = after[20 + 4 + 4 * (b["csum"] + (b["key"] is not None) + b["seq"]) :]
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    out = Capture(tlab, "pop", "eth0", keep=outgoing_gre_to(b["addr"]))
    tun = Capture(tlab, "pop", TUN, incoming_only=True)
    with out, tun, IpSender(tlab, "gw2") as tx:
        for packet in (bad, good, after):
            tx.send(packet)
        tun.wait(lambda fr: fr, 5, "the data packet on the TUN device")
        out.wait(lambda fr: fr, 5, "the reflected keepalive")
        reflected, routed = out.stop(), tun.stop()
    cp = pop.stop()

    assert [r.data for r in routed] == [after_inner], "only the data packet reaches TUN"
    assert len(reflected) == 1, [r.data.hex() for r in reflected]
    frame = reflected[0].data
    ip = frame[14:]
    tot = struct.unpack_from("!H", ip, 2)[0]
    assert ip[0] == 0x45 and ip[9] == 47 and ip_header_ok(ip), ip[:20].hex()
    assert (socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])) == (T_POP, b["addr"])
    assert struct.unpack_from("!H", ip, 6)[0] & 0x5FFF == 0, "DF clear, not a fragment"
    assert ip[8] == 255, "the keepalive's inner TTL, sent back as it is"
    # the IP ID too: the bridge takes only answers with the IDs it sent
    assert struct.unpack_from("!H", ip, 4)[0] == KA_ID
    assert ip[20:tot] == inner_gre, (ip[20:tot].hex(), inner_gre.hex())
    g = parse_gre(frame)
    assert g.proto == 0 and g.key == b["key"] and g.seq is None and g.inner == b"", g
    assert (g.csum is not None) == b["csum"], g

    p = cp["peers"][b["addr"]]
    assert p["drop"] == {"gre_key": 1}, p
    assert p["decap_packets"] == 1 and p["encap_packets"] == 0, p
    st = p["state"]
    assert st["keepalives_reflected"] == 1, st
    # no keepalives of its own to this peer: up, nothing sent or received
    assert st["up"] is True and st["transitions"] == 0, st
    assert st["keepalives_sent"] == st["keepalives_received"] == 0, st
    assert cp["other"]["drop"] == {}, cp["other"]
    assert cp["learned"] == 0, cp
    other = cp["peers"][T_TPB2 if b["addr"] == T_TPB else T_TPB]
    assert other["state"]["keepalives_reflected"] == 0 and other["drop"] == {}, other


@netns_test
def test_keepalive_to_another_address_is_not_reflected(tlab, daemons):
    """Only to the peer it came from: a 'keepalive' from tpb's address whose
    inner packet goes to tpb2 is not reflected (the POP is no reflector for
    anyone else).  As an ordinary inner packet its source is the POP's own
    address, which no router forwards (the host would drop it as a martian
    source, unseen): dropped and counted inner_martian, never written to
    the TUN device.  A data packet after it (the fence) is."""
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER1, "--peer", PEER2)
    inner = IP(src=T_POP, dst=T_TPB2, ttl=255, proto=47) / Raw(bytes(gre(None, True, None, 0)))
    packet = bytes(IP(src=T_TPB, dst=T_POP) / gre(KEY1) / inner)
    fence = IP(src=T_PC, dst=T_SERVER, ttl=64, id=0x7E7E) / ICMP(type=0, id=0x7E7E) / Raw(b"fence")
    out = Capture(tlab, "pop", "eth0", keep=lambda f: (g := parse_gre(f)) is not None
                  and g.outer_src == T_POP)
    tun = Capture(tlab, "pop", TUN, incoming_only=True)
    with out, tun, IpSender(tlab, "gw2") as tx:
        tx.send(packet)
        tx.send(bytes(IP(src=T_TPB, dst=T_POP) / gre(KEY1) / fence))
        tun.wait(lambda fr: fr, 5, "the fence on the TUN device")
        time.sleep(0.3)
        sent, routed = out.stop(), tun.stop()
    cp = pop.stop()
    assert sent == [], [f.data.hex() for f in sent]
    assert [r.data for r in routed] == [bytes(fence)]
    p = cp["peers"][T_TPB]
    assert p["state"]["keepalives_reflected"] == 0 and p["decap_packets"] == 1, cp
    assert p["drop"] == {"inner_martian": 1}, p


# ---- the POP's own keepalives -----------------------------------------------------


@netns_test
@pytest.mark.parametrize("which", list(BRIDGES))
def test_pop_keepalives_on_the_wire_and_an_answering_peer_is_up(tlab, daemons, which):
    """keepalive=1s,3: one keepalive a second to the peer, in Cisco's format
    with the peer's GRE options (sequence numbers outside only); a far end
    that reflects them makes the peer up, with an RTT.  Answers never reach
    the TUN device.  Silent for less than 1 s x 3, the peer is still up."""
    b = BRIDGES[which]
    spec = b["peer"].replace(",prefix=", ",keepalive=1s,3,prefix=")
    with Reflector(tlab, b["node"], b["addr"], b["gw"]) as refl:
        out = Capture(tlab, "pop", "eth0", keep=outgoing_gre_to(b["addr"]))
        with out:
            pop = daemons.pop(tlab, "--local", T_POP, "--peer", spec)
            tun = Capture(tlab, "pop", TUN, incoming_only=True)
            with tun:
                wait_for(lambda: len(refl.answered) >= 3, 6, "three answered keepalives")
                refl.answering.clear()
                time.sleep(1.5)  # silent, but for less than 1 s x 3
                routed = tun.stop()
            cp = pop.stop()
            frames = [f for f in out.stop() if f.outgoing]
        answered = len(refl.answered)

    seqs = [check_pop_keepalive(f.data, b) for f in frames]
    if b["seq"]:
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    gaps = [b2.t - a.t for a, b2 in zip(frames, frames[1:], strict=False)]
    assert len(frames) >= 4 and all(0.8 < gap < 1.2 for gap in gaps), gaps
    assert abs(sum(gaps) / len(gaps) - 1.0) < 0.05, gaps
    assert routed == [], "a keepalive answer reached the TUN device"
    p = cp["peers"][b["addr"]]
    assert p["decap_packets"] == 0 and p["drop"] == {}, p
    st = p["state"]
    assert st["up"] is True and st["active"] is True and st["transitions"] == 1, st
    assert st["keepalives_sent"] == len(frames), (st, len(frames))
    assert st["keepalives_received"] == answered, (st, answered)
    assert st["keepalives_reflected"] == st["keepalives_unsent"] == 0, st
    assert st["rtt"] is not None and 0 < st["rtt"] < 0.5, st
    assert st["since_reply"] is not None and 1.4 < st["since_reply"] < 3.0, st
    assert cp["other"]["drop"] == {}, cp["other"]


@netns_test
def test_pop_takes_only_answers_with_the_ids_it_sent(tlab, daemons):
    """Protocol-0 GRE from the peer's address with its key, but an IP ID
    none of the POP's last keepalives carried: counted as keepalive_stale,
    and the peer stays down (nothing reflects the real keepalives here)."""
    b = BRIDGES["key"]
    spec = f"{b['addr']},key={KEY1},keepalive=0.2s,3"
    out = Capture(tlab, "pop", "eth0", keep=outgoing_gre_to(b["addr"]))
    with out:
        pop = daemons.pop(tlab, "--local", T_POP, "--peer", spec)
        frames = out.wait(lambda fr: len(fr) >= 2 and fr, 5, "two keepalives")
    ids = [struct.unpack_from("!H", parse_gre(f.data).inner, 4)[0] for f in frames]
    assert ids[1] == (ids[0] + 1) & 0xFFFF, ids
    guesses = [(ids[-1] + d) & 0xFFFF for d in (3000, 0x8000, -100)]
    with IpSender(tlab, "gw2") as tx:
        for ident in guesses:
            tx.send(bytes(IP(src=b["addr"], dst=T_POP, ttl=64, id=ident) /
                          gre(KEY1, False, None, proto=0)))

        def stale() -> int | None:
            res = tlab.run("pop", [sys.executable, "-m", "tpb", "status", "--json"], check=False)
            (peer,) = [q for q in json.loads(res.stdout)[0]["peers"] if q["addr"] == b["addr"]]
            return peer["counters"]["drop"].get("keepalive_stale")

        wait_for(lambda: stale() == len(guesses), 5, "the guesses counted")
    cp = pop.stop()
    p = cp["peers"][b["addr"]]
    assert p["drop"] == {"keepalive_stale": len(guesses)}, p
    st = p["state"]
    assert st["up"] is False and st["keepalives_received"] == 0 and st["transitions"] == 0, st


@netns_test
def test_pop_keepalive_peer_goes_down_after_period_times_retries(tlab, daemons):
    """keepalive=1s,3: once the far end stops answering, the peer is down
    within 3 s (+ margin) of the last answer: up, then down, two
    transitions; keepalives go on being sent."""
    b = BRIDGES["key"]
    spec = f"{b['addr']},key={KEY1},keepalive=1s,3"
    with Reflector(tlab, b["node"], b["addr"], b["gw"]) as refl:
        pop = daemons.pop(tlab, "--local", T_POP, "--peer", spec)
        wait_for(lambda: len(refl.answered) >= 2, 5, "two answered keepalives")
        refl.answering.clear()
        time.sleep(0.2)
        last = refl.answered[-1]
        time.sleep(max(0.0, last + 3.0 + 0.8 - time.monotonic()))
        cp = pop.stop()
        answered = len(refl.answered)
        got = len(refl.got)
    st = cp["peers"][b["addr"]]["state"]
    assert st["up"] is False and st["active"] is False, st
    assert st["transitions"] == 2, st  # down (at start) -> up -> down
    assert st["keepalives_received"] == answered, (st, answered)
    assert st["keepalives_sent"] >= answered + 3 and st["keepalives_sent"] >= got, (st, got)
    assert st["since_reply"] > 3.0, st


# ---- live reload and heartbeat (the C API, from a process in the pop's namespace) ----


class Agent:
    """tests/pop_agent.py in the pop's namespace: a NativePop on its own TUN
    device, its loop in a thread, driven one JSON line at a time."""

    def __init__(self, lab: labmod.Lab, tun: str) -> None:
        self.proc = lab.spawn("pop", [sys.executable, str(AGENT), tun], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def call(self, op: str, **kw) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], 10)
        assert r, f"pop_agent: no answer to {op}"
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=5)
            raise AssertionError(f"pop_agent exited: {self.proc.stderr.read()}")
        return json.loads(line)

    def counters(self) -> dict:
        c = self.call("counters")
        assert "error" not in c, c
        return c

    def close(self) -> dict | None:
        last = None
        if self.proc.poll() is None:
            last = self.call("stop")
            self.proc.wait(timeout=10)
        assert self.proc.returncode == 0, self.proc.stderr.read()
        return last


@pytest.fixture
def agent(tlab):
    a = Agent(tlab, AGENT_TUN)
    yield a
    if a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def peer(addr: str, **kw) -> dict:
    return {"address": addr, **kw}


@netns_test
def test_heartbeat_moves_about_once_a_second_when_idle(tlab, agent):
    """The loop wakes at least once a second with nothing to do (a watchdog
    tells a stuck loop from an idle one), and no more than that."""
    assert agent.call("start", local=T_POP, peers=[peer(T_TPB, key=KEY1)]) == {"ok": True}
    # the loop's first pass (its thread may start late on a loaded machine,
    # or under make test-asan), then 3 s of idling
    deadline = time.monotonic() + 5.0
    while (h0 := agent.call("heartbeat")["heartbeat"]) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3.0)
    h1 = agent.call("heartbeat")["heartbeat"]
    assert h0 >= 1 and 2 <= h1 - h0 <= 10, (h0, h1)
    agent.close()


@netns_test
def test_live_reload_keeps_counters_and_state_of_kept_peers(tlab, agent):
    """Reload 1, while tpb's address streams GRE: peer C added in front (the
    others' indexes move), A and B unchanged: A took every packet of the
    stream, B's sequence window carried over, pc2's learned entry still
    leads to B.  Reload 2: B removed (its packets now not_peer, its learned
    entry gone), A's key changed (its counters and keepalive state kept),
    C's learned entry follows C to its new index.  Refused reloads (a peer
    twice, another TUN fd, another local address) change nothing."""
    A, B, C = T_TPB, T_TPB2, GW2_TO_POP
    pa = peer(A, key=KEY1, prefixes=[SITE1], keepalive="500ms,3")
    pb = peer(B, csum=True, seq=True)  # no prefix: pc2 is learned
    pc = peer(C, key=9)
    route = ["ip", "route", "add"]
    assert agent.call("start", local=T_POP, peers=[pa, pb]) == {"ok": True}
    tlab.run("pop", [*route, SITE2, "dev", AGENT_TUN])
    tlab.run("pop", [*route, "198.18.0.0/24", "dev", AGENT_TUN])
    out = Capture(tlab, "pop", "eth0", keep=lambda f: (g := parse_gre(f)) is not None
                  and g.outer_src == T_POP and g.proto == 0x0800 and len(g.inner) > 28)

    def to_bridge(dst: str) -> bytes:
        return bytes(IP(src=T_SERVER, dst=dst) / ICMP(type=0, id=0x7272) / b"from the server")

    def captured_to(inner_dst: str):
        return lambda fr: [parse_gre(f.data) for f in fr
                           if parse_gre(f.data).inner_dst == inner_dst]

    with out, IpSender(tlab, "gw2") as tx, IpSender(tlab, "server") as srv:
        for i in range(3):
            tx.send(data_packet(A, T_PC, key=KEY1, ident=i))
        for s in (1, 2):
            tx.send(data_packet(B, T_PC2, csum=True, seq=s))
        wait_for(lambda: [p["decap_packets"] for p in agent.counters()["peers"].values()]
                 == [3, 2], 5, "A's 3 and B's 2 packets")
        before = agent.counters()
        assert before["learned"] == 1, before  # pc2 behind B
        ka_before = before["peers"][A]["state"]["keepalives_sent"]
        assert ka_before >= 1, before["peers"][A]

        # reload 1 while A streams
        n = 150

        def stream():
            with IpSender(tlab, "gw2") as t2:
                for i in range(n):
                    t2.send(data_packet(A, T_PC, key=KEY1, ident=1000 + i))
                    time.sleep(0.002)

        th = threading.Thread(target=stream)
        th.start()
        time.sleep(0.1)
        assert agent.call("reconfigure", local=T_POP, peers=[pc, pa, pb]) == {"ok": True}
        th.join()
        wait_for(lambda: agent.counters()["peers"][A]["decap_packets"] == 3 + n, 5,
                 "every packet of A's stream")
        c1 = agent.counters()
        assert list(c1["peers"]) == [C, A, B], c1["peers"].keys()
        assert c1["peers"][A]["drop"] == {} and c1["other"]["drop"] == {}, c1
        assert c1["peers"][A]["state"]["keepalives_sent"] >= ka_before, c1["peers"][A]
        assert c1["learned"] == 1, c1
        # pc2's learned entry still leads to B, at its new index (before B
        # sends again, which would learn it anew)
        srv.send(to_bridge(T_PC2))
        g = out.wait(captured_to(T_PC2), 5, "the POP's GRE to pc2")[0]
        assert g.outer_dst == B and g.csum is not None and g.seq is not None, g
        # B's window came along: 2 is stale, 3 is next (a fresh one takes 2)
        tx.send(data_packet(B, T_PC2, csum=True, seq=2))
        tx.send(data_packet(B, T_PC2, csum=True, seq=3))
        for i in range(2):
            tx.send(data_packet(C, "198.18.0.7", key=9, ident=i))

        def taken(p: dict) -> int:
            return p["decap_packets"] + sum(p["drop"].values())

        wait_for(lambda: [taken(agent.counters()["peers"][x]) for x in (B, C)] == [4, 2], 5,
                 "B's and C's packets")
        c1 = agent.counters()
        assert c1["peers"][B]["drop"] == {"gre_seq_stale": 1}, c1["peers"][B]
        assert c1["peers"][B]["decap_packets"] == 3 and c1["peers"][C]["decap_packets"] == 2, c1
        assert c1["learned"] == 2, c1

        # reload 2: B gone, A's key 7 -> 8, C kept (index 0 -> 1); C sends
        # nothing after it, so its learned entry is the one from before
        pa8 = dict(pa, key=8)
        assert agent.call("reconfigure", local=T_POP, peers=[pa8, pc]) == {"ok": True}
        c2 = agent.counters()
        assert list(c2["peers"]) == [A, C], c2["peers"].keys()
        assert c2["learned"] == 1, c2  # pc2's entry went with B
        assert c2["peers"][C]["decap_packets"] == 2, c2["peers"][C]
        assert c2["peers"][A]["decap_packets"] == 3 + n, c2["peers"][A]
        assert c2["peers"][A]["state"]["keepalives_sent"] >= ka_before, c2["peers"][A]
        for s in (4, 5):
            tx.send(data_packet(B, T_PC2, csum=True, seq=s))
        tx.send(data_packet(A, T_PC, key=KEY1, ident=7))
        tx.send(data_packet(A, T_PC, key=8, ident=8))
        srv.send(to_bridge("198.18.0.7"))
        srv.send(to_bridge(T_PC2))
        g = out.wait(captured_to("198.18.0.7"), 5, "the POP's GRE to 198.18.0.7")[0]
        assert g.outer_dst == C and g.key == 9, g
        wait_for(lambda: agent.counters()["other"]["drop"] == {"not_peer": 2, "no_peer": 1}, 5,
                 "B's packets as not_peer, pc2 without a bridge")
        c2 = agent.counters()
        assert c2["peers"][A]["decap_packets"] == 3 + n + 1, c2["peers"][A]
        assert c2["peers"][A]["drop"] == {"gre_key": 1}, c2["peers"][A]
        assert c2["peers"][C]["encap_packets"] == 1 and c2["peers"][C]["drop"] == {}, c2

        # refused: nothing changes
        r = agent.call("reconfigure", local=T_POP, peers=[pa8, pc, peer(A, key=1)])
        assert "given twice" in r.get("error", ""), r
        r = agent.call("reconfigure", local=T_POP, peers=[pa8, pc], other_tun_fd=True)
        assert "TUN device" in r.get("error", ""), r
        r = agent.call("reconfigure", local="198.51.100.35", peers=[pa8, pc])
        assert "local address" in r.get("error", ""), r
        tx.send(data_packet(A, T_PC, key=8, ident=9))
        wait_for(lambda: agent.counters()["peers"][A]["decap_packets"] == 3 + n + 2, 5,
                 "A's packet with key 8")
        assert list(agent.counters()["peers"]) == [A, C]
    last = agent.close()
    assert last is not None and last["other"]["drop"] == {"not_peer": 2, "no_peer": 1}, last
