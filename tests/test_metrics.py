"""The Prometheus endpoint (tpb/metrics.py) and `tpb status` (tpb/status.py).

Every C counter has its metric (checked against the structs cffi reads from
csrc/tpb.h).  Then, in a lab: a real NativeBridge (plain) in the tpb node
and a real NativePop in the server node, each serving metrics and status
from tests/ops_driver.py (until the service wiring runs them in `tpb run`
and `tpb pop`); frames and GRE packets are sent through, and the endpoint
is scraped over HTTP from inside the namespace (`ip netns exec`), checked
by promtool, and `tpb status` is run there as an operator would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import START_TIMEOUT, STOP_TIMEOUT, need_tool, spawn_until, wait_for
from prometheus_client.parser import text_string_to_metric_families
from rawsock import Port, netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from wire import LOCAL_EXPERIMENTAL, ends, payload, sized, udp4

from tpb import lab as labmod
from tpb import metrics, status
from tpb.errors import TpbError
from tpb.native import DROP_NAMES, PortCounters, RemoteState, ffi, lib

LAB_SUFFIX = "met"
DRIVER = str(Path(__file__).resolve().parent / "ops_driver.py")
RUN_LISTEN = ("127.0.0.1", 9547)
POP_LISTEN = ("::1", 9548)  # the POP's endpoint on IPv6
POP_LOCAL = labmod.SERVER  # 203.0.113.10, the server node's address
POP_TUN = "tpbmpop0"
PEER = labmod.GW2_IN  # 203.0.113.1: gw2 sends GRE from it
PEER_KEYED = "198.51.100.99,key=7"  # configured, never heard from
NOT_PEER = labmod.GW2  # 198.51.100.2: gw2's other address
OUT_MTU = 1400  # tpb's eth3: a frame past it is dropped too_big
PORT_DROP_REASONS = ("truncated", "too_big", "egress_full", "send_error", "gso_bad", "ring_full",
                     "fill_empty", "xsk_rx", "xsk_invalid", "no_socket", "shed")
UNKNOWN_MAC = "02:00:00:00:99:99"
TUNNEL_LOCAL = "198.51.100.3"
TUNNEL_REMOTE = "198.51.100.34"  # nobody: what goes there is only counted


# -- the map from C fields to metrics (no lab) --------------------------------


def test_every_c_counter_field_maps_to_a_metric():
    """A field added to a counter struct in csrc/tpb.h without a metric
    fails here, before it could go unexported."""
    assert metrics.unmapped() == {}
    for struct, mapping in metrics.STRUCTS.items():
        c_fields = [name for name, _ in ffi.typeof(struct).fields]
        assert set(mapping) == set(c_fields), f"{struct}: map and struct differ"
        families: dict[str, set[str]] = {}
        series: set[tuple] = set()
        for name, to in mapping.items():
            if not to.family:       # a label, or a field no metric carries
                continue
            assert to.family in metrics.FAMILIES, (struct, name, to.family)
            keys = {k for k, _ in to.labels}
            assert families.setdefault(to.family, keys) == keys, f"{to.family}: label keys differ"
            assert (to.family, to.labels) not in series, f"{name}: a series of another field"
            series.add((to.family, to.labels))
    # what the collectors read the structs through carries every field
    assert {f.name for f in dataclasses.fields(PortCounters)} == set(metrics.PORT_FIELDS)
    remote = {f.name for f in dataclasses.fields(RemoteState)}
    assert {to.attr or n for n, to in metrics.REMOTE_FIELDS.items()} == remote
    assert len(DROP_NAMES) == lib.TPB_NDROP


def test_unmapped_reports_a_field_without_metric(monkeypatch):
    port = dict(metrics.PORT_FIELDS)
    del port["polls"]
    monkeypatch.setitem(metrics.STRUCTS, "struct tpb_port_counters", port)
    assert metrics.unmapped() == {"struct tpb_port_counters": ["polls"]}


def test_family_names_follow_prometheus_conventions():
    for name, fam in metrics.FAMILIES.items():
        assert not name.endswith("_total"), name  # the client adds it to counters
        assert name == name.lower() and " " not in name
        words = set(name.split("_"))
        assert not words & {"ms", "milliseconds", "ns", "us", "kb", "mb", "bits"}, name
        assert fam.kind in (metrics.COUNTER, metrics.GAUGE)
        assert fam.doc.endswith("."), name


def test_remote_times_are_seconds_and_absent_while_unknown():
    def scrape(r: RemoteState) -> dict:
        out = metrics.Scrape()
        out.fields("struct tpb_remote_state", r, {"remote": r.addr})
        return {m.name: m.samples for m in out.families()}

    known = RemoteState("198.51.100.34", True, True, 2, 10, 1, 9, 0, 0.000420, 1.5)
    got = scrape(known)
    assert got["tpb_keepalive_rtt_seconds"][0].value == pytest.approx(0.00042)
    assert got["tpb_keepalive_last_reply_age_seconds"][0].value == 1.5
    assert got["tpb_tunnel_up"][0].labels == {"remote": "198.51.100.34"}
    never = dataclasses.replace(known, up=False, rtt=None, since_reply=None)
    got = scrape(never)
    assert "tpb_keepalive_rtt_seconds" not in got
    assert "tpb_keepalive_last_reply_age_seconds" not in got
    assert got["tpb_tunnel_up"][0].value == 0


def test_status_render_shows_remotes_at_a_glance():
    """What the C side's keepalive state (not there yet in the lab) looks
    like in `tpb status`."""
    state = {"up": True, "active": True, "transitions": 1, "keepalives_sent": 9,
             "keepalives_unsent": 0, "keepalives_received": 9, "keepalives_reflected": 0,
             "rtt": 0.00042, "since_reply": 1.5}
    down = {**state, "up": False, "active": False, "rtt": None, "since_reply": None,
            "transitions": 2}
    counters = {k: 0 for k in PortCounters.__dataclass_fields__}
    port = {"counters": counters, "drops": {}}
    doc = {
        "kind": "run", "name": "eth2", "pid": 42, "uptime_s": 3725.0, "version": "0.1.0",
        "ports": {"in": {**port, "device": "eth2"}, "out": {**port, "device": "eth3"}},
        "tunnel": {"local": "198.51.100.3", "key": True, "keepalive": "10s,3",
                   "on_tunnel_down": "bypass", "select": "mark 47",
                   "counters": {"encap_packets": 5, "decap_packets": 4}},
        "remotes": [{"addr": "198.51.100.34", "state": state},
                    {"addr": "198.51.100.35", "state": down}],
        "top_drops": [{"where": "out", "reason": "too_big", "count": 3}],
        "rates": {"seconds": 10.0, "ports": {"in": {"rx_frames_per_s": 1200.0,
                                                   "rx_bits_per_s": 9.8e6,
                                                   "tx_frames_per_s": 0, "tx_bits_per_s": 0}}},
    }
    text = status.render(doc)
    assert text.splitlines()[0] == "run eth2: pid 42, up 1h 2m, tpb 0.1.0"
    assert ("  remote 198.51.100.34: up, active, rtt 0.42 ms, last reply 1.5 s ago, "
            "1 transition") in text
    assert "  remote 198.51.100.35: down, standby, no rtt yet, no reply yet, 2 transitions" in text
    assert "port in  eth2: rx 1.2 kframes/s 9.8 Mbit/s (0 frames), tx 0 frames/s" in text
    assert "port out eth3: rx 0 frames, tx 0 frames" in text
    assert "key yes" in text
    assert text.splitlines()[-1] == "  drops: too_big (out) 3"


# -- the lab --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    """The classic lab, quiet (no IPv6 on the gateways' ports facing TPB, so
    only the test's frames cross) and with tpb's eth3 at OUT_MTU."""
    with labmod.classic(f"tpbt{LAB_SUFFIX}") as lb:
        for node, ifname in (("gw1", "eth1"), ("gw2", "eth0")):
            lb.sysctl(node, f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
        lb.run("tpb", ["ip", "link", "set", "eth3", "mtu", str(OUT_MTU)])
        yield lb


class Driver:
    """tests/ops_driver.py in a lab node, stopped by SIGTERM: exit 0, no
    traceback."""

    def __init__(self, lab: labmod.Lab, node: str, argv: list[str]) -> None:
        self.lab, self.node = lab, node
        self.started = time.time()
        self.proc, self.stderr = spawn_until(
            lab, node, [sys.executable, DRIVER, *argv], "ready", START_TIMEOUT, f"driver {argv}"
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=STOP_TIMEOUT)
        err = self.stderr + err.decode(errors="replace")
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        assert out.decode().strip() == "stopped", out


@pytest.fixture
def bridge(lab):
    """A plain bridge; per test, since the tunnel test needs the same ports."""
    d = Driver(lab, "tpb", ["run", *map(str, RUN_LISTEN)])
    yield d
    d.stop()


@pytest.fixture
def tunnel_bridge(lab):
    d = Driver(lab, "tpb", ["run", *map(str, RUN_LISTEN), TUNNEL_LOCAL, TUNNEL_REMOTE])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def pop(lab):
    d = Driver(lab, "server", ["pop", *map(str, POP_LISTEN), POP_LOCAL, POP_TUN, PEER,
                               PEER_KEYED])
    yield d
    d.stop()


def url(listen: tuple[str, int]) -> str:
    addr, port = listen
    return f"http://[{addr}]:{port}/metrics" if ":" in addr else f"http://{addr}:{port}/metrics"


SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def scrape_text(lab: labmod.Lab, node: str, listen: tuple[str, int]) -> str:
    """One scrape, by HTTP from inside the node's namespace."""
    return lab.run(node, [sys.executable, "-c", SCRAPE, url(listen)]).stdout


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"series twice: {key}"
            out[key] = s.value
    return out


def scrape(lab: labmod.Lab, node: str, listen: tuple[str, int]) -> dict:
    return samples(scrape_text(lab, node, listen))


def value(got: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in got, f"no {name}{labels}; have {sorted(k for k in got if k[0] == name)}"
    return got[key]


def port_value(got: dict, name: str, port: str, **labels: str) -> float:
    return value(got, name, port=port, device={"in": "eth2", "out": "eth3"}[port], **labels)


def names(got: dict) -> set[str]:
    return {name for name, _ in got}


def _silent(src, dst, marker: bytes) -> bytes:
    """A frame nobody answers (local experimental ethertype)."""
    frame = Ether(src=src.mac, dst=dst.mac, type=LOCAL_EXPERIMENTAL) / Raw(payload(marker, 46))
    return bytes(frame)


def send_and_collect(lab: labmod.Lab, a: str, b: str, frames: list[bytes],
                     markers: list[bytes]) -> None:
    """Send the frames from gateway a, and wait until every one carrying a
    marker has arrived at gateway b."""
    e = ends(lab)
    src, dst = e[a], e[b]
    with (
        Port(lab.ns(src.node), src.ifname) as tx,
        Port(lab.ns(dst.node), dst.ifname, capture=True) as rx,
    ):
        for f in frames:
            tx.send(f)
        left = set(markers)
        deadline = time.monotonic() + 10
        while left:
            f = rx.recv(deadline - time.monotonic())
            assert f is not None, f"{len(left)} of {len(markers)} frames never arrived"
            left -= {m for m in left if m in f.data}


# -- the bridge's endpoint --------------------------------------------------------

@pytest.mark.netns
def test_receive_and_transmit_counters_move_by_exactly_the_frames_sent(lab, bridge):
    """N frames in at `in` and M at `out`: exactly N received on in and sent
    on out (frames and bytes), M the other way, at the next scrape."""
    e = ends(lab)
    counts = {"gw1": 40, "gw2": 25}
    before = scrape(lab, "tpb", RUN_LISTEN)
    sent: dict[str, list[bytes]] = {}
    for a, b in (("gw1", "gw2"), ("gw2", "gw1")):
        markers = [os.urandom(16) for _ in range(counts[a])]
        sent[e[a].tpb_port] = frames = [_silent(e[a], e[b], m) for m in markers]
        send_and_collect(lab, a, b, frames, markers)

    def delta(got: dict, name: str, port: str) -> float:
        return port_value(got, name, port) - port_value(before, name, port)

    wait_for(
        lambda: all(
            delta(scrape(lab, "tpb", RUN_LISTEN), "tpb_port_transmit_frames_total", p)
            >= len(sent[o])
            for p, o in (("out", "in"), ("in", "out"))
        ),
        5, "the transmit counters",
    )
    after = scrape(lab, "tpb", RUN_LISTEN)
    for port, other in (("in", "out"), ("out", "in")):
        n, size = len(sent[port]), sum(len(f) for f in sent[port])
        assert delta(after, "tpb_port_receive_frames_total", port) == n, port
        assert delta(after, "tpb_port_receive_bytes_total", port) == size, port
        assert delta(after, "tpb_port_kernel_frames_total", port) == n, port
        assert delta(after, "tpb_port_transmit_frames_total", other) == n, other
        assert delta(after, "tpb_port_transmit_bytes_total", other) == size, other
        assert delta(after, "tpb_port_batches_total", other) >= 1
    # one loop serves both ports: bridge.c counts its sleeps on port in
    assert port_value(after, "tpb_port_polls_total", "in") >= 1


@pytest.mark.netns
def test_drops_are_counted_by_reason_with_port_and_device(lab, bridge):
    """Frames past the out port's MTU: tpb_port_drops_total{port="out",
    device="eth3", reason="too_big"} moves by exactly their number; every
    reason of both ports is a series, zeros included."""
    e = ends(lab)
    src, dst = e["gw1"], e["gw2"]
    before = scrape(lab, "tpb", RUN_LISTEN)
    big = [sized(bytes(udp4(src, dst, os.urandom(16), dst_mac=UNKNOWN_MAC)), OUT_MTU + 15)
           for _ in range(3)]
    fence = os.urandom(16)
    send_and_collect(lab, "gw1", "gw2", [*big, _silent(src, dst, fence)], [fence])

    def too_big(got: dict) -> float:
        return port_value(got, "tpb_port_drops_total", "out", reason="too_big")

    wait_for(lambda: too_big(scrape(lab, "tpb", RUN_LISTEN)) - too_big(before) >= 3, 5,
             "the too_big drops")
    after = scrape(lab, "tpb", RUN_LISTEN)
    assert too_big(after) - too_big(before) == 3
    for port in ("in", "out"):
        for reason in PORT_DROP_REASONS:
            port_value(after, "tpb_port_drops_total", port, reason=reason)
    drops = {labels for name, labels in after if name == "tpb_port_drops_total"}
    assert len(drops) == 2 * len(PORT_DROP_REASONS), drops
    assert sum(v for (n, _), v in after.items() if n == "tpb_port_drops_total") == too_big(after)


@pytest.mark.netns
def test_plain_bridge_exports_ports_build_info_and_reload_only(lab, bridge):
    got = scrape(lab, "tpb", RUN_LISTEN)
    assert value(got, "tpb_build_info", version=metrics.version(), mode="run") == 1
    assert value(got, "tpb_config_last_reload_successful") == 1
    ts = value(got, "tpb_config_last_reload_success_timestamp_seconds")
    assert bridge.started - 5 <= ts <= time.time()
    assert "process_cpu_seconds_total" in names(got)
    assert not {n for n in names(got) if n.startswith("python_")}
    # no tunnel in plain mode: no tunnel, keepalive or reassembly series
    tpb = {n for n in names(got) if n.startswith("tpb_")}
    assert all(n.startswith(("tpb_port_", "tpb_build_", "tpb_config_")) for n in tpb), tpb


@pytest.mark.netns
def test_promtool_finds_nothing_wrong_in_real_scrapes(lab, bridge, pop):
    promtool = need_tool("promtool", "prometheus")
    for node, listen in (("tpb", RUN_LISTEN), ("server", POP_LISTEN)):
        text = scrape_text(lab, node, listen)
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0 and not res.stdout and not res.stderr, (
            f"{node}: {res.stdout}{res.stderr}"
        )


@pytest.mark.netns
def test_scrapes_do_not_disturb_forwarding(lab, bridge):
    """Scrapes back to back while 300 frames cross: every frame arrives,
    nothing is dropped."""
    before = scrape(lab, "tpb", RUN_LISTEN)
    stop = threading.Event()
    done: list[int] = []

    def hammer() -> None:
        with netns(lab.ns("tpb")):  # this thread's sockets are in the tpb node
            while not stop.is_set():
                urllib.request.urlopen(url(RUN_LISTEN), timeout=5).read()
                done.append(1)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        e = ends(lab)
        markers = [os.urandom(16) for _ in range(300)]
        send_and_collect(lab, "gw1", "gw2", [_silent(e["gw1"], e["gw2"], m) for m in markers],
                         markers)
    finally:
        stop.set()
        t.join()
    assert len(done) >= 2
    after = scrape(lab, "tpb", RUN_LISTEN)
    for port in ("in", "out"):
        for reason in PORT_DROP_REASONS:
            d = (port_value(after, "tpb_port_drops_total", port, reason=reason)
                 - port_value(before, "tpb_port_drops_total", port, reason=reason))
            assert d == 0, (port, reason)


@pytest.mark.netns
def test_a_taken_or_foreign_address_is_one_line(lab, bridge):
    """metrics.serve() where the driver already listens, on an address
    that is not the node's, and a second status socket of the same name:
    TpbError, one line each."""
    collector = metrics.BuildInfo("run")
    cases = [
        (RUN_LISTEN, "127.0.0.1:9547", "Address already in use"),
        (("192.0.2.99", 9547), "192.0.2.99:9547", "Cannot assign requested address"),
        (("2001:db8::99", 9547), "[2001:db8::99]:9547", "Cannot assign requested address"),
    ]
    with netns(lab.ns("tpb")):
        for listen, where, why in cases:
            with pytest.raises(TpbError) as exc:
                metrics.serve(listen, collector)
            msg = str(exc.value)
            assert msg == f"metrics: cannot listen on {where}: {why}", msg
        with pytest.raises(TpbError) as exc:
            status.serve("run", "eth2", dict)
        assert "\n" not in str(exc.value) and "@tpb/run/eth2" in str(exc.value), exc.value
        # and a free port is served, then given back by close()
        s = metrics.serve(("127.0.0.1", 0), collector)
        port = s.address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"tpb_build_info{" in body
        s.close()
        with socket.create_server(("127.0.0.1", port)):
            pass


@pytest.mark.netns
def test_tunnel_bridge_exports_the_tunnel_families_and_status(lab, tunnel_bridge):
    """In tunnel mode with keepalives and no POP to answer them: the remote
    is down, so one selected frame is bridged as it is (fail-open) and moves
    tpb_tunnel_bypassed_packets_total by one; every drop reason is a
    series; promtool is content; `tpb status` shows the settings (whether
    there is a key, never the key), the remote and the traffic."""
    e = ends(lab)
    before = scrape(lab, "tpb", RUN_LISTEN)
    frame = bytes(udp4(e["gw1"], e["gw2"], os.urandom(16), dst_ip=labmod.SERVER))
    with Port(lab.ns("gw1"), "eth1") as tx:
        tx.send(frame)

    def bypassed(got: dict) -> float:
        return value(got, "tpb_tunnel_bypassed_packets_total")

    wait_for(lambda: bypassed(scrape(lab, "tpb", RUN_LISTEN)) - bypassed(before) >= 1, 5,
             "the frame to be bypassed")
    # the frame taught TPB the next hop: keepalives leave, unanswered
    wait_for(lambda: value(scrape(lab, "tpb", RUN_LISTEN), "tpb_keepalives_sent_total",
                           remote=TUNNEL_REMOTE) >= 1, 5, "a keepalive sent")
    text = scrape_text(lab, "tpb", RUN_LISTEN)
    got = samples(text)
    assert bypassed(got) - bypassed(before) == 1
    assert value(got, "tpb_tunnel_up", remote=TUNNEL_REMOTE) == 0
    assert value(got, "tpb_tunnel_active", remote=TUNNEL_REMOTE) == 0
    assert value(got, "tpb_tunnel_packets_total", direction="encap") == 0
    assert value(got, "tpb_tunnel_packets_total", direction="decap") == 0
    for reason in DROP_NAMES:
        value(got, "tpb_tunnel_drops_total", reason=reason)
    for name in ("tpb_reassembly_memory_bytes", "tpb_reassembly_memory_peak_bytes",
                 "tpb_tunnel_mss_clamped_total", "tpb_tunnel_fragments_total"):
        value(got, name)
    assert value(got, "tpb_build_info", version=metrics.version(), mode="run") == 1
    promtool = need_tool("promtool", "prometheus")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and not res.stdout and not res.stderr, res.stdout + res.stderr

    res = tpb_status(lab, "tpb", "--json")
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)
    t = doc["tunnel"]
    assert (t["local"], t["remotes"], t["key"], t["keepalive"]) == (
        TUNNEL_LOCAL, [TUNNEL_REMOTE], True, "10s,3")
    assert t["counters"]["bypassed"] >= 1
    assert [r["addr"] for r in doc["remotes"]] == [TUNNEL_REMOTE]
    res = tpb_status(lab, "tpb")
    assert res.returncode == 0, res.stderr
    assert ("  tunnel: local 198.51.100.3, key yes, keepalive 10s,3, on tunnel down bypass, "
            "select 1 match rule") in res.stdout, res.stdout
    assert f"  remote {TUNNEL_REMOTE}: " in res.stdout, res.stdout
    assert "  traffic: encap " in res.stdout, res.stdout


# -- the POP's endpoint -------------------------------------------------------


def _gre(lab: labmod.Lab, src: str) -> None:
    """One GRE packet (no key, no checksum) with an inner UDP packet, from
    gw2's address `src` to the POP."""
    inner = bytes(IP(src="192.0.2.77", dst=labmod.SERVER) / UDP(sport=40000, dport=9)
                  / Raw(b"tpb metrics test"))
    with netns(lab.ns("gw2")):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
    with s:
        s.bind((src, 0))
        s.sendto(b"\x00\x00\x08\x00" + inner, (POP_LOCAL, 0))


@pytest.mark.netns
def test_pop_counts_by_peer_and_none_over_ipv6(lab, pop):
    """GRE from a peer is counted under peer="ADDR", GRE from an unknown
    address under peer="none"; every drop reason is a series for every
    peer; scraped over IPv6 ([::1])."""
    before = scrape(lab, "server", POP_LISTEN)
    _gre(lab, PEER)
    _gre(lab, NOT_PEER)

    def moved(got: dict) -> bool:
        return (value(got, "tpb_tunnel_packets_total", peer=PEER, direction="decap") == 1
                and value(got, "tpb_tunnel_drops_total", peer="none", reason="not_peer") == 1)

    wait_for(lambda: moved(scrape(lab, "server", POP_LISTEN)), 5, "the POP's counters")
    got = scrape(lab, "server", POP_LISTEN)
    assert value(before, "tpb_tunnel_packets_total", peer=PEER, direction="decap") == 0
    assert value(got, "tpb_tunnel_bytes_total", peer=PEER, direction="decap") > 0
    assert value(got, "tpb_build_info", version=metrics.version(), mode="pop") == 1
    assert value(got, "tpb_pop_learned_entries") == 1  # 192.0.2.77 -> PEER
    keyed = PEER_KEYED.split(",")[0]
    for peer in (PEER, keyed, "none"):
        for reason in DROP_NAMES:
            value(got, "tpb_tunnel_drops_total", peer=peer, reason=reason)
        for direction in ("encap", "decap"):
            value(got, "tpb_tunnel_packets_total", peer=peer, direction=direction)
        value(got, "tpb_reassembly_memory_bytes", peer=peer)
    assert "tpb_tunnel_active" not in names(got)  # the bridge's choice, not the POP's
    assert not {n for n in names(got) if n.startswith("tpb_port_")}


# -- tpb status ---------------------------------------------------------------------


def tpb_status(lab: labmod.Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(node, [sys.executable, "-m", "tpb", "status", *args], check=False)


@pytest.mark.netns
def test_tpb_status_shows_the_bridge_with_rates(lab, bridge):
    e = ends(lab)

    def in_rate() -> float:
        res = tpb_status(lab, "tpb", "--json")
        assert res.returncode == 0, res.stderr
        docs = json.loads(res.stdout)
        assert len(docs) == 1, docs
        return docs[0]["rates"].get("ports", {}).get("in", {}).get("rx_frames_per_s", 0)

    def busy() -> float:
        markers = [os.urandom(16) for _ in range(20)]
        send_and_collect(lab, "gw1", "gw2", [_silent(e["gw1"], e["gw2"], m) for m in markers],
                         markers)
        return in_rate()

    wait_for(busy, 10, "a receive rate on port in", interval=0.3)
    res = tpb_status(lab, "tpb", "--json")
    doc = json.loads(res.stdout)[0]
    assert (doc["kind"], doc["name"], doc["pid"]) == ("run", "eth2", bridge.proc.pid)
    assert doc["ports"]["in"]["device"] == "eth2" and doc["ports"]["out"]["device"] == "eth3"
    assert doc["tunnel"] is None and doc["remotes"] == []
    assert 0 < doc["rates"]["seconds"] <= 10.5
    assert set(doc["rates"]["ports"]["in"]) == {
        "rx_frames_per_s", "rx_bits_per_s", "tx_frames_per_s", "tx_bits_per_s"}
    assert doc["ports"]["in"]["counters"]["rx_frames"] > 0
    assert set(doc["ports"]["out"]["drops"]) == set(PORT_DROP_REASONS)
    assert doc["uptime_s"] >= 0

    res = tpb_status(lab, "tpb")
    assert res.returncode == 0 and not res.stderr, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"run eth2: pid {bridge.proc.pid}, up "), lines
    assert "  plain bridge (no tunnel)" in lines
    assert any(ln.startswith("  port in  eth2: rx ") and "frames/s" in ln for ln in lines), lines
    assert any(ln.startswith("  port out eth3: rx ") for ln in lines), lines
    assert lines[-1].startswith("  drops: "), lines


@pytest.mark.netns
def test_tpb_status_shows_the_pop_per_peer(lab, pop):
    res = tpb_status(lab, "server", "--json")
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)
    assert (doc["kind"], doc["name"], doc["pid"]) == ("pop", POP_TUN, pop.proc.pid)
    keyed = PEER_KEYED.split(",")[0]
    assert [(p["addr"], p["key"]) for p in doc["peers"]] == [(PEER, False), (keyed, True)]
    assert "drop" in doc["other"]["counters"]
    res = tpb_status(lab, "server")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"pop {POP_TUN}: pid {pop.proc.pid}, up "), res.stdout
    assert f"  peer {keyed}: " in res.stdout and "key yes" in res.stdout, res.stdout


@pytest.mark.netns
@pytest.mark.parametrize("args", [(), ("--json",)])
def test_tpb_status_with_nothing_running_is_one_line_and_status_1(lab, bridge, args):
    """The pc node runs no instance (the tpb node's, next door, is in
    another network namespace)."""
    res = tpb_status(lab, "pc", *args)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == "tpb: no running instance in this network namespace\n"
