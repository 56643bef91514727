"""`tpb run` and `tpb pop` as services on a live link, in the tunnel lab
(tpb/lab.py: tunnel()):

    pc  — gw1 — [tpb]  —\\
                          gw2 — pop — server
    pc2 — gw3 — [tpb2] —/

SIGHUP reloads under a ping every 10 ms (nothing lost, nothing escapes
selection), refused reloads keep the running configuration, log lines and
their levels (journald's <N> prefixes), exit status 2 for configuration and
1 for failures while running, systemd's notifications on a real socket,
and `tpb check` against the host.

Every daemon runs with --metrics-listen off: these tests are about the
life cycle, not the metrics endpoint.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import TpbDaemon, read_counters, received, wait_for
from pop_util import Capture
from rawsock import netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from tunnel_util import (
    GW1_MAC,
    GW2_MAC,
    Wire,
    exclusive_lab,
    lab_unavailable,
    marker,
    parse_gre,
    remove_tpb_leftovers,
    tpb_leftovers,
)

from tpb import lab as labmod
from tpb.lab import T_PC, T_POP, T_SERVER, T_TPB, T_TPB2

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbd"
SITE1 = "192.0.2.0/26"
SITE2 = "192.0.2.64/26"
TUNNEL_A = ["ip daddr 203.0.113.0/24"]
TUNNEL_B = ["ip daddr 203.0.113.10", "udp dport 9"]
PING_INTERVAL = 0.01
PING_SECONDS = 3.0  # at least: from 0.3 s before the first reload to past the last
QUIET = ("--metrics-listen", "off")


@pytest.fixture(scope="module")
def tlab():
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with exclusive_lab(labmod.tunnel, LAB_PREFIX) as lb:
        # the TUN device's own IPv6 chatter would only add no_peer drops
        lb.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        yield lb


class Daemons:
    """This test's daemons, stopped (or killed) at teardown; the tpb
    node's nft table and veth pair removed if one was left."""

    def __init__(self, lab: labmod.Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.started: list[TpbDaemon] = []

    def start(self, node: str, cmd: str, *args: str, env: tuple[str, ...] = (),
              config: str | None = None, ready: str | None = None) -> TpbDaemon:
        n = len(self.started)
        counters = self.tmp / f"{node}-{n}.json"
        argv = [sys.executable, "-m", "tpb", cmd]
        if config is not None:
            argv += ["--config", str(self.config(f"{node}-{n}.toml", config))]
        argv += [*args, *QUIET, "--counters", str(counters)]
        if env:
            argv = ["env", *env, *argv]
        if ready is None:
            ready = "tpb: bridging" if cmd == "run" else "tpb: pop "
        d = TpbDaemon(self.lab, node, argv, ready, counters, f"{node} {cmd}")
        self.started.append(d)
        return d.start()

    def config(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def close(self) -> None:
        for d in self.started:
            if d.running:
                try:
                    d.send_signal(signal.SIGTERM)
                except AssertionError:
                    d.kill()


@pytest.fixture
def daemons(tlab, tmp_path):
    ds = Daemons(tlab, tmp_path)
    try:
        yield ds
    finally:
        ds.close()
        if tpb_leftovers(tlab):
            remove_tpb_leftovers(tlab)


def hup(d: TpbDaemon, path: Path, text: str, expect: str, timeout: float = 10.0) -> list[str]:
    """Write the file, SIGHUP, and return the stderr lines of that reload
    once the one containing `expect` is there (the last line of a reload:
    'configuration reloaded' or the last 'reload refused')."""
    path.write_text(text)
    os.kill(d.pid, signal.SIGHUP)
    return [d.wait_line(expect, timeout)]


def start_ping(lab: labmod.Lab, node: str, dst: str) -> subprocess.Popen:
    """A ping every 10 ms until finish_ping(): however long the reloads take
    on a loaded machine, they all happen under it."""
    p = lab.spawn(node, ["ping", "-n", "-i", str(PING_INTERVAL), "-W", "2", dst],
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p.started = time.monotonic()  # type: ignore[attr-defined]
    return p


def finish_ping(p: subprocess.Popen) -> int:
    """Stops the ping (SIGINT) and returns how many were answered, asserting
    that none was lost: the replies are echo 1..N without a gap, and at most
    the one request in flight when ping stopped went unanswered."""
    time.sleep(max(0.2, p.started + PING_SECONDS - time.monotonic()))  # type: ignore[attr-defined]
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    seqs = [int(n) for n in re.findall(r"icmp_seq=(\d+)", out)]
    sent = re.search(r"(\d+) packets transmitted", out)
    assert sent and seqs, out[-2000:]
    missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
    assert not missing, f"echo requests lost: {missing[:20]} ({len(missing)})"
    assert int(sent.group(1)) - len(seqs) <= 1, out[-500:]
    assert len(seqs) >= PING_SECONDS / 0.05, out[-500:]
    return len(seqs)


def plain(low_latency: bool = True, level: str = "info", out: str = "eth3") -> str:
    return (f'[ports]\nin = "eth2"\nout = "{out}"\n\n[bridge]\n'
            f'low_latency = {str(low_latency).lower()}\nlog_level = "{level}"\n')


def tunnel(match: list[str], extra: str = "") -> str:
    rules = ", ".join(f'"{m}"' for m in match)
    return (f'[ports]\nin = "eth2"\nout = "eth3"\n\n[tunnel]\nlocal = "{T_TPB}"\n'
            f'remote = "{T_POP}"\nkey = 7\n{extra}\n[select]\nmatch = [{rules}]\n')


POP_FILE = f"""\
[pop]
local = "{T_POP}"
{{extra}}
[[pop.peer]]
address = "{T_TPB}"
key = 7
prefixes = ["{SITE1}"]
{{peers}}"""


def pop_file(extra: str = "", peers: str = "") -> str:
    return POP_FILE.format(extra=extra, peers=peers)


INVALID = plain().replace("low_latency = true", 'low_latency = "yes"\nbogus = 1')


# -- reload ------------------------------------------------------------------------------


def test_ten_reloads_of_a_plain_bridge_under_ping_lose_nothing(tlab, daemons):
    """Ten times: a file with two mistakes (both logged at level error, the
    running configuration kept), then a valid one with changes (applied,
    and named).  A ping every 10 ms across all of it loses nothing."""
    d = daemons.start("tpb", "run", config=plain())
    path = daemons.tmp / "tpb-0.toml"
    ping = start_ping(tlab, "pc", T_SERVER)
    time.sleep(0.3)
    for i in range(10):
        path.write_text(INVALID)
        os.kill(d.pid, signal.SIGHUP)
        first = d.wait_line("reload refused")
        second = d.wait_line("reload refused")
        assert first == f'tpb: reload refused: {path}:6: bridge.low_latency must be true or false'
        assert second == f"tpb: reload refused: {path}:7: unknown setting bridge.bogus"
        on = i % 2 == 1
        level = "info" if on else "debug"
        was = "debug" if on else "info"
        line = hup(d, path, plain(low_latency=on, level=level), "configuration reloaded")[0]
        assert line == (f"tpb: configuration reloaded: bridge.low_latency {str(not on).lower()} "
                        f"-> {str(on).lower()}; bridge.log_level {was} -> {level}"), line
        assert d.running and d.proc.poll() is None
    answered = finish_ping(ping)
    c = d.stop()
    assert c["in"]["rx_frames"] >= answered and c["out"]["rx_frames"] >= answered
    assert "Traceback" not in d.stderr


def test_reload_refuses_port_and_mode_changes_and_keeps_running(tlab, daemons):
    d = daemons.start("tpb", "run", config=plain())
    path = daemons.tmp / "tpb-0.toml"
    line = hup(d, path, plain(out="eth5"), "reload refused")[0]
    assert line == (f"tpb: reload refused: {path}:3: ports.out cannot change on reload "
                    "(eth3 -> eth5): restart tpb"), line
    with_tunnel = plain() + f'\n[tunnel]\nlocal = "{T_TPB}"\nremote = "{T_POP}"\n'
    line = hup(d, path, with_tunnel, "reload refused")[0]
    assert "tunnel mode cannot be turned on on reload: restart tpb" in line, line
    batch = plain() + "batch = 8\n"
    line = hup(d, path, batch, "reload refused")[0]
    assert "bridge.batch cannot change on reload (64 -> 8): restart tpb" in line, line
    r = tlab.run("pc", ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", T_SERVER], check=False)
    assert received(r) == 3, r.stdout  # still bridging, as configured at start
    d.stop()
    assert "configuration reloaded" not in d.stderr


def escaped_echo(frame: bytes) -> bool:
    """An ICMP echo request from pc to the server as it is, not in GRE: a
    frame that escaped selection."""
    return (frame[12:14] == b"\x08\x00" and frame[14 + 9] == 1
            and frame[14 + 12:14 + 20] == socket.inet_aton(T_PC) + socket.inet_aton(T_SERVER)
            and frame[14 + 20] == 8)


def test_match_rules_swapped_ten_times_under_ping_nothing_escapes(tlab, daemons):
    """The new match rules are loaded in one nft transaction, so the chain
    that sends --in's frames to TPB is never missing: across ten reloads
    every echo request to the server is tunneled (none reaches gw2 as it
    is) and every one is answered."""
    daemons.start("pop", "pop", config=pop_file())
    d = daemons.start("tpb", "run", config=tunnel(TUNNEL_A))
    path = daemons.tmp / "tpb-1.toml"
    with Capture(tlab, "gw2", "eth0", keep=escaped_echo, incoming_only=True) as cap:
        ping = start_ping(tlab, "pc", T_SERVER)
        time.sleep(0.3)
        for i in range(10):
            old, new = (TUNNEL_A, TUNNEL_B) if i % 2 == 0 else (TUNNEL_B, TUNNEL_A)
            line = hup(d, path, tunnel(new), "configuration reloaded")[0]
            show = lambda m: "[" + ", ".join(m) + "]"  # noqa: E731
            assert line == (f"tpb: configuration reloaded: select.match {show(old)} -> "
                            f"{show(new)}"), line
        answered = finish_ping(ping)
        escaped = cap.stop()
    assert escaped == [], f"{len(escaped)} echo requests escaped selection"
    table = tlab.run("tpb", ["nft", "list", "table", "netdev", "tpb_eth2"]).stdout
    assert "ip daddr 203.0.113.0/24 meta mark set" in table, table  # the last one loaded
    c = d.stop()
    assert c["tunnel"]["encap_packets"] >= answered and c["tunnel"]["decap_packets"] >= answered
    assert c["tunnel"]["drop"] == {}, c["tunnel"]


def test_invalid_match_rule_on_reload_is_refused_with_nfts_error(tlab, daemons):
    daemons.start("pop", "pop", config=pop_file())
    d = daemons.start("tpb", "run", config=tunnel(TUNNEL_A))
    path = daemons.tmp / "tpb-1.toml"
    line = hup(d, path, tunnel(["ip dscp bogus"]), "reload refused")[0]
    assert line == ('tpb: reload refused: select.match "ip dscp bogus": Error: Could not parse '
                    "Differentiated Services Code Point"), line
    table = tlab.run("tpb", ["nft", "list", "table", "netdev", "tpb_eth2"]).stdout
    assert "ip daddr 203.0.113.0/24 meta mark set" in table, table
    r = tlab.run("pc", ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", T_SERVER], check=False)
    assert received(r) == 3, r.stdout
    c = d.stop()
    assert c["tunnel"]["encap_packets"] >= 3


def test_tunnel_settings_reloaded_ten_times_under_ping_lose_nothing(tlab, daemons):
    """The tunnel's own settings go to the C loop (NativeBridge.reconfigure)
    without closing a ring: ICMP rate and MSS changed back and forth."""
    daemons.start("pop", "pop", config=pop_file())
    d = daemons.start("tpb", "run", config=tunnel(TUNNEL_A))
    path = daemons.tmp / "tpb-1.toml"
    ping = start_ping(tlab, "pc", T_SERVER)
    time.sleep(0.3)
    for i in range(10):
        extra = "icmp_rate = 50\nmss = 1300\n" if i % 2 == 0 else ""
        line = hup(d, path, tunnel(TUNNEL_A, extra), "reload")[0]
        assert "configuration reloaded: " in line, line
        assert "tunnel.icmp_rate" in line and "tunnel.mss" in line, line
    answered = finish_ping(ping)
    c = d.stop()
    assert c["tunnel"]["encap_packets"] >= answered and c["tunnel"]["drop"] == {}


MARK_TABLE = """table netdev op {
  chain c {
    type filter hook ingress device "eth2" priority 0;
    udp dport 5000 meta mark set 47
    udp dport 6000 meta mark set 0x99
  }
}
"""


def test_a_new_mark_reaches_both_ways_into_tpb(tlab, daemons, sorting):
    """select.mark reloaded live: both ways into TPB split --in's frames by
    the new one — on --in itself (untagged IPv4) and on the veth pair
    (tagged), by each way's fanout group or by each socket's filter — so
    what was selected is bridged and the other way round, with no frame
    seen twice."""
    res = subprocess.run(tlab.cmd("tpb", ["nft", "-f", "-"]), input=MARK_TABLE,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    conf = (f'[ports]\nin = "eth2"\nout = "eth3"\n\n[tunnel]\nlocal = "{T_TPB}"\n'
            f'remote = "{T_POP}"\n\n[select]\nmark = {{mark}}\n')
    try:
        d = daemons.start("tpb", "run", config=conf.format(mark=47))
        path = daemons.tmp / "tpb-0.toml"
        with Wire(tlab, "gw1", "eth1", outgoing=False) as w_in, \
                Wire(tlab, "gw2", "eth0", outgoing=False) as w_out:
            first = _tunneled_by_port(w_in, w_out)
            line = hup(d, path, conf.format(mark=0x99), "reload")[0]
            assert "configuration reloaded: " in line and "select.mark" in line, line
            second = _tunneled_by_port(w_in, w_out)
        d.stop()
    finally:
        tlab.run("tpb", ["nft", "delete", "table", "netdev", "op"], check=False)
    assert first == {(5000, None), (5000, 100)}, first
    assert second == {(6000, None), (6000, 100)}, second


def _tunneled_by_port(w_in, w_out) -> set[tuple[int, int | None]]:
    """A frame to UDP port 5000 and one to 6000, untagged and tagged (VLAN
    100), from gw1: each arrives once at gw2; (port, vlan) of those that
    came as GRE."""
    sent = {}
    w_out.drain()
    for dport in (5000, 6000):
        for vlan in (None, 100):
            m = marker("mk")
            ip = IP(src=T_PC, dst=T_SERVER, ttl=63) / UDP(sport=4000, dport=dport) / Raw(m * 3)
            l2 = Ether(src=GW1_MAC, dst=GW2_MAC)
            w_in.send(bytes(l2 / ip if vlan is None else l2 / Dot1Q(vlan=vlan) / ip))
            sent[(dport, vlan)] = m
    fence = marker("fence")
    w_in.send(bytes(Ether(src=GW1_MAC, dst=GW2_MAC) / IP(src=T_PC, dst=T_SERVER, ttl=63)
                    / UDP(sport=4000, dport=9) / Raw(fence)))
    w_out.until(lambda f: fence in f.data, 5.0, "the fence")
    w_out.settle(0.2)
    tunneled = set()
    for key, m in sent.items():
        got = w_out.with_marker(m)
        assert len(got) == 1, f"{key}: arrived {len(got)} times"
        if parse_gre(got[0].data) is not None:
            tunneled.add(key)
    return tunneled


def test_pop_reload_adds_a_peer_and_its_prefix(tlab, daemons):
    """A second site's bridge, unknown to the POP, is added by a reload:
    its prefix is routed into the TUN device and its tunnel carries."""
    pop = daemons.start("pop", "pop", config=pop_file())
    daemons.start("tpb2", "run", "--in", "eth2", "--out", "eth3", "--local", T_TPB2,
                  "--remote", T_POP, "--match", TUNNEL_A[0], "--no-low-latency")
    path = daemons.tmp / "pop-0.toml"
    peer2 = f'[[pop.peer]]\naddress = "{T_TPB2}"\nprefixes = ["{SITE2}"]\n'
    line = hup(pop, path, pop_file(peers=peer2), "reload")[0]
    assert line == f"tpb: configuration reloaded: peer {T_TPB2} added", line
    assert SITE2 in tlab.run("pop", ["ip", "route", "show", "dev", "tpbpop0"]).stdout
    r = tlab.run("pc2", ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", T_SERVER], check=False)
    assert received(r) == 3, r.stdout


def test_pop_reload_keeps_running_through_refusals(tlab, daemons):
    """A log level is applied (no C needed); a changed TUN name and a bad
    file are refused line by line and change nothing; the POP keeps running
    and then takes a new peer (its route added)."""
    pop = daemons.start("pop", "pop", config=pop_file())
    path = daemons.tmp / "pop-0.toml"
    routes = tlab.run("pop", ["ip", "route"]).stdout
    line = hup(pop, path, pop_file(extra='log_level = "debug"'), "configuration reloaded")[0]
    assert line == "tpb: configuration reloaded: pop.log_level info -> debug", line
    line = hup(pop, path, pop_file(extra='tun = "tpbpop7"'), "reload refused")[0]
    assert line == (f"tpb: reload refused: {path}:3: pop.tun cannot change on reload "
                    "(tpbpop0 -> tpbpop7): restart tpb pop"), line
    line = hup(pop, path, pop_file(extra="learn_timeout = 0"), "reload refused")[0]
    assert "pop.learn_timeout must be from 1 to 86400, not 0" in line, line
    assert tlab.run("pop", ["ip", "route"]).stdout == routes  # the refusals changed nothing
    peer2 = f'[[pop.peer]]\naddress = "{T_TPB2}"\nprefixes = ["{SITE2}"]\n'
    path.write_text(pop_file(peers=peer2))
    os.kill(pop.pid, signal.SIGHUP)
    line = pop.wait_line("reload")
    assert "configuration reloaded" in line, line
    assert SITE2 in tlab.run("pop", ["ip", "route", "show", "dev", "tpbpop0"]).stdout
    c = pop.stop()
    assert T_TPB in c["peers"]


# -- logs and their levels ----------------------------------------------------------------


def test_debug_level_shows_more_and_error_level_only_errors(tlab, daemons):
    d = daemons.start("tpb", "run", "--in", "eth2", "--out", "eth3", "--log-level", "debug")
    assert "tpb: rings open on eth2" in d.stderr, d.stderr
    d.stop()
    with Notify() as n:
        d = daemons.start("tpb", "run", config=plain(level="error"),
                          env=(f"NOTIFY_SOCKET={n.path}",), ready="")
        n.wait("READY=1")
        path = daemons.tmp / "tpb-1.toml"
        path.write_text(INVALID.replace('log_level = "info"', 'log_level = "error"'))
        os.kill(d.pid, signal.SIGHUP)
        d.wait_line("unknown setting bridge.bogus")
        d.stop()
    lines = d.stderr.splitlines()
    assert lines and all(ln.startswith("tpb: reload refused: ") for ln in lines), lines


JOURNAL = "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2)"


@pytest.fixture
def eth3_mtu_1250(tlab):
    tlab.run("tpb", ["ip", "link", "set", "eth3", "mtu", "1250"])
    try:
        yield
    finally:
        tlab.run("tpb", ["ip", "link", "set", "eth3", "mtu", str(tlab.mtu)])


def test_journal_stream_gets_syslog_priorities(tlab, daemons, eth3_mtu_1250):
    """As systemd runs it: stderr is the journal's stream, JOURNAL_STREAM
    names its device and inode, and each line starts with its priority —
    4 for the MTU warning, 6 for the ready line, 3 for a refused reload."""
    daemons.start("pop", "pop", config=pop_file())
    cfg = daemons.config("journal.toml", tunnel(TUNNEL_A))
    counters = daemons.tmp / "journal.json"
    py = " ".join([sys.executable, "-m", "tpb", "run", "--config", str(cfg), *QUIET,
                   "--counters", str(counters)])
    d = TpbDaemon(tlab, "tpb", ["sh", "-c", f"exec env {JOURNAL} {py}"], "tpb: bridging",
                  counters, "tpb run (journal)")
    daemons.started.append(d)
    d.start()
    line = hup(d, cfg, tunnel(["ip dscp bogus"]), "reload refused")[0]
    d.stop()
    lines = d.stderr.splitlines()
    assert lines[0] == ("<4>tpb: --out eth3: MTU 1250 leaves 1222 bytes inside the tunnel, "
                        "below IPv6's 1280: tunneled IPv6 goes as outer fragments"), lines
    assert lines[1].startswith("<6>tpb: bridging eth2 <-> eth3 (tunnel"), lines
    assert line.startswith("<3>tpb: reload refused: select.match"), line
    # the same with stderr not the journal's stream: no prefix
    d = daemons.start("tpb", "run", config=plain(), env=("JOURNAL_STREAM=1:2",))
    d.stop()
    assert d.stderr.startswith("tpb: bridging"), d.stderr


# -- exit status: 2 for the configuration, 1 for a failure while running ----------------


def tpb_once(lab: labmod.Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(node, [sys.executable, "-m", "tpb", *args], check=False, timeout=60)


@pytest.mark.parametrize("cmd", ["run", "pop"])
def test_unwritable_counters_file_is_refused_at_start_with_2(tlab, cmd):
    args = (["run", "--in", "eth2", "--out", "eth3"] if cmd == "run"
            else ["pop", "--local", T_POP, "--peer", f"{T_TPB},prefix={SITE1}"])
    res = tpb_once(tlab, "tpb" if cmd == "run" else "pop", *args, *QUIET,
                   "--counters", "/nonexistent-tpb-dir/c.json")
    assert res.returncode == 2, res
    assert res.stderr == ("tpb: --counters /nonexistent-tpb-dir/c.json: no such directory "
                          "/nonexistent-tpb-dir\n"), res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("cmd", ["run", "pop"])
def test_counters_file_that_cannot_be_written_at_exit_is_1_without_traceback(
        tlab, daemons, cmd):
    """The file's directory was fine at start; at exit its name is a
    directory: the summary still on stdout, one line on stderr, exit 1."""
    if cmd == "run":
        d = daemons.start("tpb", "run", "--in", "eth2", "--out", "eth3")
    else:
        d = daemons.start("pop", "pop", config=pop_file())
    d.counters_file.mkdir()
    rc = d.send_signal(signal.SIGTERM)
    assert rc == 1, (rc, d.stderr)
    assert "Traceback" not in d.stderr
    assert d.stderr.splitlines()[-1] == f"tpb: --counters {d.counters_file}: Is a directory"
    assert len(d.stdout.splitlines()) == 1 and d.stdout.startswith("tpb: ")


@pytest.fixture
def spare_ports(tlab):
    """xa and xb in the tpb node, each a veth whose far end (ya, yb) stays
    in the node, quiet (no IPv6)."""
    for a, b in (("xa", "ya"), ("xb", "yb")):
        tlab.run("tpb", ["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        for dev in (a, b):
            tlab.sysctl("tpb", f"net.ipv6.conf.{dev}.disable_ipv6", "1")
            tlab.run("tpb", ["ip", "link", "set", dev, "up"])
    try:
        yield
    finally:
        for dev in ("xa", "xb"):
            tlab.run("tpb", ["ip", "link", "del", dev], check=False)


def test_a_port_that_goes_away_ends_tpb_with_1(tlab, daemons, spare_ports):
    d = daemons.start("tpb", "run", "--in", "xa", "--out", "xb")
    tlab.run("tpb", ["ip", "link", "del", "xa"])
    out, err = d.proc.communicate(timeout=10)
    d._collect(out, err)
    assert d.returncode == 1, (d.returncode, d.stderr)
    assert "tpb: xa: the port went away" in d.stderr.splitlines(), d.stderr
    assert "Traceback" not in d.stderr
    assert len(d.stdout.splitlines()) == 1 and d.stdout.startswith("tpb: in: ")
    read_counters(d.counters_file)  # written all the same


def test_configuration_errors_are_2_a_missing_port_3(tlab):
    res = tpb_once(tlab, "tpb", "run", "--in", "eth2", "--out", "nosuch0", *QUIET)
    assert (res.returncode, res.stderr) == (3, "tpb: --out nosuch0: no such interface\n")
    res = tpb_once(tlab, "tpb", "run", "--in", "eth2", "--out", "nosuch0", "--batch", "0")
    assert res.returncode == 2 and "--batch" in res.stderr


# -- systemd's notifications --------------------------------------------------------------


class Notify:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket at a
    path (reachable from every namespace) or, with `ns`, an abstract one in
    that lab namespace (abstract names are per network namespace)."""

    def __init__(self, ns: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if ns is None:
            self.dir = tempfile.mkdtemp(prefix="tpbn", dir="/tmp")  # sun_path: 108 bytes
            self.path = f"{self.dir}/notify"
            self.sock.bind(self.path)
        else:
            self.sock.close()
            self.dir = None
            name = f"tpb-notify-{os.getpid()}"
            with netns(ns):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(b"\0" + name.encode())
            self.path = "@" + name
        self.got: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.sock.settimeout(0.05)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self.lock:
                self.got.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        with self.lock:
            return [m for _, m in self.got]

    def wait(self, field: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        def enough() -> list[str] | None:
            found = [m for m in self.messages() if field in m.split("\n")]
            return found if len(found) >= count else None

        return wait_for(enough, timeout, f"{count} x {field} on NOTIFY_SOCKET "
                        f"(got {self.messages()})")

    def __enter__(self) -> Notify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()
        if self.dir is not None:
            os.unlink(self.path)
            os.rmdir(self.dir)


def test_ready_watchdog_reload_and_stopping_on_notify_socket(tlab, daemons):
    with Notify() as n:
        d = daemons.start("tpb", "run", config=plain(),
                          env=(f"NOTIFY_SOCKET={n.path}", "WATCHDOG_USEC=1000000"))
        ready = n.wait("READY=1")[0]
        assert ready == "READY=1\nSTATUS=bridging eth2 <-> eth3 (plain bridge)", ready
        n.wait("WATCHDOG=1", count=3, timeout=5)
        os.kill(d.pid, signal.SIGHUP)
        d.wait_line("configuration reloaded: no change")
        n.wait("READY=1", count=2)
        d.stop()
        msgs = n.messages()
    reloading = next(i for i, m in enumerate(msgs) if m.startswith("RELOADING=1\n"))
    assert msgs[reloading].split("\n")[1].startswith("MONOTONIC_USEC="), msgs
    assert msgs[reloading + 1].startswith("READY=1\n"), msgs
    assert msgs[-1] == "STOPPING=1\nSTATUS=stopping", msgs


def test_watchdog_of_another_process_is_left_alone(tlab, daemons):
    with Notify() as n:
        d = daemons.start("tpb", "run", "--in", "eth2", "--out", "eth3",
                          env=(f"NOTIFY_SOCKET={n.path}", "WATCHDOG_USEC=200000",
                               "WATCHDOG_PID=1"))
        n.wait("READY=1")
        time.sleep(0.6)
        d.stop()
        assert not [m for m in n.messages() if "WATCHDOG=1" in m], n.messages()


def test_abstract_notify_socket_and_the_pop(tlab, daemons):
    with Notify(ns=tlab.ns("pop")) as n:
        daemons.start("pop", "pop", config=pop_file(), env=(f"NOTIFY_SOCKET={n.path}",))
        ready = n.wait("READY=1")[0]
        assert ready == f"READY=1\nSTATUS=pop {T_POP} on tpbpop0 for 1 bridge(s)", ready


# -- tpb check against this host ----------------------------------------------------------


def check(lab: labmod.Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return tpb_once(lab, node, "check", *args)


def test_check_plain_and_tunnel_ok(tlab, tmp_path):
    res = check(tlab, "tpb", "--in", "eth2", "--out", "eth3")
    assert (res.returncode, res.stdout, res.stderr) == (0, "command line: ok\n", "")
    f = tmp_path / "t.toml"
    f.write_text(tunnel(TUNNEL_B))
    res = check(tlab, "tpb", "--config", str(f))
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{f}: ok\n", "")
    assert tpb_leftovers(tlab) == [], "tpb check loaded something"


def test_check_while_tpb_runs_with_that_file(tlab, daemons):
    """Before a reload: the running table is only dry-run replaced."""
    daemons.start("tpb", "run", config=tunnel(TUNNEL_A))
    path = daemons.tmp / "tpb-0.toml"
    res = check(tlab, "tpb", "--config", str(path))
    assert (res.returncode, res.stderr) == (0, ""), res
    table = tlab.run("tpb", ["nft", "list", "table", "netdev", "tpb_eth2"]).stdout
    assert "ip daddr 203.0.113.0/24" in table


def assert_problems(res: subprocess.CompletedProcess[str], *want: str) -> None:
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert len(lines) == len(want), lines
    for w, got in zip(want, lines, strict=True):
        assert got.startswith("tpb: ") and w in got, (w, got)


def test_check_bad_match_rule(tlab, tmp_path):
    f = tmp_path / "t.toml"
    f.write_text(tunnel(["ip daddr 203.0.113.0/24", "ip daddr 203.0.113.0/33"]))
    assert_problems(check(tlab, "tpb", "--config", str(f)),
                    'select.match "ip daddr 203.0.113.0/33": Error: Prefix length 33 is invalid')


def test_check_missing_interfaces_and_other_problems_at_once(tlab):
    res = check(tlab, "tpb", "--in", "nosuch0", "--out", "nosuch1", "--cpu", "4000",
                "--counters", "/nonexistent-tpb-dir/c.json")
    assert_problems(res, "--in nosuch0: no such interface", "--out nosuch1: no such interface",
                    "--cpu 4000: not a CPU this process may run on",
                    "--counters /nonexistent-tpb-dir/c.json: no such directory")


def test_check_local_address_of_this_host(tlab):
    tlab.run("tpb", ["ip", "addr", "add", f"{T_TPB}/32", "dev", "lo"])
    try:
        res = check(tlab, "tpb", "--in", "eth2", "--out", "eth3", "--local", T_TPB,
                    "--remote", T_POP)
    finally:
        tlab.run("tpb", ["ip", "addr", "del", f"{T_TPB}/32", "dev", "lo"])
    assert_problems(res, f"--local: tunnel.local {T_TPB} is an address of this host (lo)")


@pytest.mark.parametrize("mtu", [95, 96, 99, 1250, 1308, 1500])
def test_check_mtu_of_out(tlab, mtu):
    """With a key the tunnel adds 28 bytes (outer IPv4 20, GRE 4, key 4):
    --out needs 68 + 28 = 96 at least, with a checksum too 100; below
    1280 + 28 the check warns (IPv6 goes as outer fragments) and passes."""
    tunnel_flags = ["--in", "eth2", "--out", "eth3", "--local", T_TPB, "--remote", T_POP,
                    "--key", "7"]
    tlab.run("tpb", ["ip", "link", "set", "eth3", "mtu", str(mtu)])
    try:
        res = check(tlab, "tpb", *tunnel_flags)
        res_csum = check(tlab, "tpb", *tunnel_flags, "--csum")
    finally:
        tlab.run("tpb", ["ip", "link", "set", "eth3", "mtu", str(tlab.mtu)])
    room = mtu - 28
    if mtu < 96:
        assert_problems(res, f"--out eth3: MTU {mtu} leaves {room} bytes inside the tunnel "
                        "(overhead 28); at least 96 is needed")
    elif mtu < 1308:
        assert (res.returncode, res.stdout) == (0, "command line: ok\n"), res
        assert res.stderr == (f"tpb: --out eth3: MTU {mtu} leaves {room} bytes inside the "
                              "tunnel, below IPv6's 1280: tunneled IPv6 goes as outer "
                              "fragments\n"), res.stderr
    else:
        assert (res.returncode, res.stdout, res.stderr) == (0, "command line: ok\n", ""), res
    assert res_csum.returncode == (0 if mtu >= 100 else 2), res_csum


def test_check_pop_file(tlab, tmp_path):
    f = tmp_path / "pop.toml"
    f.write_text(pop_file())
    res = check(tlab, "pop", "--config", str(f))
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{f}: ok\n", "")
    f.write_text(pop_file(extra='tun = "eth0"'))
    assert_problems(check(tlab, "pop", "--config", str(f)),
                    f"{f}:3: eth0: an interface of this name exists already")
    f.write_text(pop_file().replace(f'local = "{T_POP}"', 'local = "192.0.2.99"'))
    assert_problems(check(tlab, "pop", "--config", str(f)),
                    f"{f}:2: 192.0.2.99 is not an address of this host")
    f.write_text(pop_file().replace(SITE1, "198.51.100.32/28"))
    assert_problems(check(tlab, "pop", "--config", str(f)),
                    "prefix 198.51.100.32/28: cannot route it into tpbpop0: it is routed "
                    "already (dev eth0)")


def test_keepalive_state_is_quiet_without_keepalives(tlab, daemons):
    """No keepalives: no state lines (the state log speaks only of changes)."""
    daemons.start("pop", "pop", config=pop_file())
    d = daemons.start("tpb", "run", config=tunnel(TUNNEL_A))
    r = tlab.run("pc", ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", T_SERVER], check=False)
    assert received(r) == 3, r.stdout
    time.sleep(0.6)
    d.stop()
    assert " is down" not in d.stderr and "traffic now goes" not in d.stderr, d.stderr

