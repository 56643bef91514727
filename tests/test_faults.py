"""Faults while TPB runs, through real namespaces and the real C helper
(issue 12, point 3), in the tunnel lab (tpb/lab.py: tunnel()):

    pc — gw1 eth1 ─ eth2 [tpb] eth3 ─ eth0 gw2 — pop — server

- `kill -9` under traffic, then start again: the table and veth pair the
  killed one left are replaced, forwarding resumes;
- a port, or its far end (carrier), down and up under two streams of
  frames 10 ms apart, one each way: forwarding resumes within a second of
  the link's return, measured;
- a port deleted: exit 1 with one line, the table, the veth pair and the
  other port left as they were before TPB;
- TPB's nftables table deleted or flushed by someone else: restored within
  a second, logged, counted (tpb_nft_restored_total), selection works;
- --out's MTU lowered under a TCP transfer through the tunnel: the
  transfer completes, byte for byte.

Each prints its figures (`pytest -s` shows them; README, "Under attack and
fault")."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from fault_util import Stream, TcpTransfer, restore_routes, scrape, udp_frame
from helpers import TpbDaemon, ports_state, read_counters, wait_for
from pop_util import Daemons, need_root
from tunnel_util import (
    GW1_MAC,
    GW2_MAC,
    Procs,
    exclusive_lab,
    lab_unavailable,
    ping,
    remove_tpb_leftovers,
    tpb_leftovers,
)

from tpb import lab as labmod
from tpb.lab import T_PC, T_POP, T_SERVER, T_TPB

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbflt"
MATCH = ("--match", "ip daddr 203.0.113.0/24")
LISTEN = "127.0.0.1:9547"
RETURN_LIMIT = 1.0  # seconds from a link's return to forwarding
RESTORE_LIMIT = 1.0  # seconds from a table's loss to its return


@pytest.fixture(scope="module")
def flab(tmp_path_factory):
    need_root()
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with exclusive_lab(labmod.tunnel, LAB_PREFIX) as lb:
        lb.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        pops = Daemons(tmp_path_factory.mktemp("pop"))
        try:
            pops.pop(lb, "--local", T_POP, "--peer", f"{T_TPB},prefix=192.0.2.0/26")
            yield lb
        finally:
            pops.close()


@pytest.fixture
def procs(flab, tmp_path):
    p = Procs(flab, tmp_path)
    try:
        yield p
    finally:
        failures = p.stop_all()
        for d in p.started:
            if d.running:
                d.kill()
        if tpb_leftovers(flab):
            remove_tpb_leftovers(flab)
        assert not failures, failures


def tunnel_tpb(procs: Procs, *extra: str):
    return procs.tpb(*MATCH, "--metrics-listen", "off", *extra)


def in_to_out(payload: bytes) -> bytes:
    """gw1 → gw2 to the server: selected, so it leaves eth3 in GRE."""
    return udp_frame(GW2_MAC, GW1_MAC, T_PC, T_SERVER, payload)


def out_to_in(payload: bytes) -> bytes:
    """gw2 → gw1, a local experimental EtherType (IEEE 802): bridged as it
    is, and nobody answers it."""
    frame = bytes.fromhex(GW1_MAC.replace(":", "") + GW2_MAC.replace(":", "")) + b"\x88\xb5"
    return (frame + payload).ljust(60, b"\0")


def streams(lab: labmod.Lab) -> dict[str, Stream]:
    return {
        "in->out": Stream(lab, "gw1", "eth1", "gw2", "eth0", in_to_out, b"TPBFAULT-A"),
        "out->in": Stream(lab, "gw2", "eth0", "gw1", "eth1", out_to_in, b"TPBFAULT-B"),
    }


def wait_flowing(ss: dict[str, Stream], since: float, timeout: float, what: str) -> None:
    for name, s in ss.items():
        wait_for(lambda s=s: s.delivered_sent_after(since), timeout, f"{name} {what}")


# -- kill -9, then start again ---------------------------------------------------------


def test_kill_9_under_traffic_then_start_again_cleans_up_and_forwards(flab, procs):
    before = ports_state(flab)
    d = tunnel_tpb(procs)
    ss = streams(flab)
    try:
        wait_flowing(ss, time.monotonic(), 5, "before the kill")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.communicate(timeout=10)
        d.returncode = d.proc.returncode
        assert d.returncode == -signal.SIGKILL
        left = tpb_leftovers(flab)
        # what the next start must clean up: the table and the veth pair
        assert "netdev tpb_eth2" in left and sum(n.startswith("tpbsel") for n in left) == 2, left
        t0 = time.monotonic()
        d2 = tunnel_tpb(procs)
        ready = time.monotonic()
        assert sorted(tpb_leftovers(flab)) == sorted(left), "one table and one pair, not two"
        wait_flowing(ss, ready, 5, "after the start")
        gaps = {name: s.gap_after(ready) for name, s in ss.items()}
    finally:
        for s in ss.values():
            s.close()
    ping(flab, "pc", T_SERVER, count=5)  # end to end through the tunnel and the POP
    c = d2.stop()
    assert c["tunnel"]["encap_packets"] >= 5 and c["tunnel"]["decap_packets"] >= 5, c["tunnel"]
    assert tpb_leftovers(flab) == []
    assert ports_state(flab) == before
    print(f"\nfault kill -9: started again in {ready - t0:.2f} s; first frame after ready: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in gaps.items()))


# -- a link down and up ----------------------------------------------------------------------

# (node, device) whose going down and up is the fault: TPB's own port
# (administratively down), or the far end of its cable (TPB's port loses
# its carrier; veth has no `ip link set carrier off`).
LINKS = {
    ("in", "down"): ("tpb", "eth2"),
    ("out", "down"): ("tpb", "eth3"),
    ("in", "carrier"): ("gw1", "eth1"),
    ("out", "carrier"): ("gw2", "eth0"),
}
OUTAGE_TICKS = 30  # the link stays down while this many frames are due (~0.3 s)


@pytest.mark.parametrize("port,how", list(LINKS))
def test_link_down_and_up_forwarding_resumes_within_a_second(flab, procs, port, how):
    node, dev = LINKS[(port, how)]
    d = tunnel_tpb(procs)
    ss = streams(flab)
    try:
        wait_flowing(ss, time.monotonic(), 5, "before the fault")
        ticks = {k: s.ticks for k, s in ss.items()}
        t_down = time.monotonic()
        flab.run(node, ["ip", "link", "set", "dev", dev, "down"])
        wait_for(lambda: all(s.ticks - ticks[k] >= OUTAGE_TICKS for k, s in ss.items()),
                 10, "the outage's frames")
        t_up = time.monotonic()  # before the command: the gap is not flattered by its time
        flab.run(node, ["ip", "link", "set", "dev", dev, "up"])
        wait_flowing(ss, t_up, 5, "after the link came back")
        # a second and a half of steady forwarding after the return
        wait_flowing(ss, t_up + RETURN_LIMIT + 0.5, 10, "1.5 s after the link came back")
    finally:
        for s in ss.values():
            s.close()
        if node != "tpb":
            restore_routes(flab, node)
    gaps = {k: s.gap_after(t_up) for k, s in ss.items()}
    for k, s in ss.items():
        _, arrived = s.snapshot()
        during = [a for a in arrived.values() if t_down + 0.05 < a < t_up]
        assert not during, f"{k}: {len(during)} frames crossed while {node} {dev} was down"
        lost = s.lost_between(t_up + RETURN_LIMIT, t_up + RETURN_LIMIT + 0.5)
        assert not lost, f"{k}: frames lost a second after the link came back: {lost}"
        assert gaps[k] is not None and gaps[k] < RETURN_LIMIT, (k, gaps[k])
    assert d.running and d.proc.poll() is None, d.stderr
    c = d.stop()  # exit 0, one summary line, no traceback
    drops = {f"{p}.{k[5:]}": v for p in ("in", "out") for k, v in c[p].items()
             if k.startswith("drop_") and v}
    print(f"\nfault {port} {how} ({node} {dev}) for {t_up - t_down:.2f} s: forwarding back "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in gaps.items())
          + f" after `ip link set up`; TPB's drops {drops}, tunnel {c['tunnel']['drop']}")


# -- a port deleted ------------------------------------------------------------------------


@pytest.fixture
def spare_ports(flab):
    """xa and xb in the tpb node, each a veth whose far end (ya, yb) stays
    in the node, quiet (no IPv6)."""
    for a, b in (("xa", "ya"), ("xb", "yb")):
        flab.run("tpb", ["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        for dev in (a, b):
            flab.sysctl("tpb", f"net.ipv6.conf.{dev}.disable_ipv6", "1")
            flab.run("tpb", ["ip", "link", "set", dev, "up"])
    try:
        yield
    finally:
        for dev in ("xa", "xb"):
            flab.run("tpb", ["ip", "link", "del", dev], check=False)


def offloads(lab: labmod.Lab, dev: str) -> str:
    return lab.run("tpb", ["ethtool", "-k", dev]).stdout


@pytest.mark.parametrize("gone,other", [("xa", "xb"), ("xb", "xa")])
def test_a_port_deleted_ends_tpb_with_one_line_and_cleans_up(flab, procs, spare_ports,
                                                             gone, other):
    before = ports_state(flab, ifnames=(other,))
    features = offloads(flab, other)
    counters = procs.tmp / "deleted.json"
    argv = [sys.executable, "-m", "tpb", "run", "--in", "xa", "--out", "xb", "--local", T_TPB,
            "--remote", T_POP, *MATCH, "--metrics-listen", "off", "--counters", str(counters)]
    d = TpbDaemon(flab, "tpb", argv, "tpb: bridging", counters)
    procs.started.append(d)
    d.start()
    left = tpb_leftovers(flab)
    assert "netdev tpb_xa" in left and sum(n.startswith("tpbsel") for n in left) == 2, left
    assert ports_state(flab, ifnames=(other,)) != before  # promiscuous while it runs
    t0 = time.monotonic()
    flab.run("tpb", ["ip", "link", "del", gone])
    out, err = d.proc.communicate(timeout=10)
    took = time.monotonic() - t0
    d._collect(out, err)
    assert d.returncode == 1, (d.returncode, d.stderr)
    assert "Traceback" not in d.stderr
    lines = d.stderr.splitlines()
    assert lines[0].startswith("tpb: bridging "), lines
    assert lines[1:] == [f"tpb: {gone}: the port went away"], lines
    assert len(d.stdout.splitlines()) == 1 and d.stdout.startswith("tpb: in: "), d.stdout
    assert tpb_leftovers(flab) == [], "table or veth pair left behind"
    assert ports_state(flab, ifnames=(other,)) == before
    assert offloads(flab, other) == features
    read_counters(counters)  # written all the same
    print(f"\nfault {gone} deleted: exit 1 after {took:.2f} s, cleaned up")


# -- the nftables table lost -------------------------------------------------------------------

NFT_FAULTS = {
    "delete": (["nft", "delete", "table", "netdev", "tpb_eth2"], "was deleted"),
    "flush": (["nft", "flush", "table", "netdev", "tpb_eth2"], "was flushed"),
    "flush-ruleset": (["nft", "flush", "ruleset"], "was deleted"),
    "rule-deleted": (None, "was flushed or changed"),
}


def table_whole(lab: labmod.Lab) -> bool:
    res = lab.run("tpb", ["nft", "list", "table", "netdev", "tpb_eth2"], check=False)
    return (res.returncode == 0 and 'fwd to "tpbsel' in res.stdout
            and "ip daddr 203.0.113.0/24 meta mark set" in res.stdout)


def delete_match_rule(lab: labmod.Lab) -> None:
    doc = json.loads(lab.run("tpb", ["nft", "-j", "-a", "list", "table", "netdev",
                                     "tpb_eth2"]).stdout)
    rule = next(i["rule"] for i in doc["nftables"] if "rule" in i)
    lab.run("tpb", ["nft", "delete", "rule", "netdev", "tpb_eth2", "select", "handle",
                    str(rule["handle"])])


@pytest.mark.parametrize("fault", list(NFT_FAULTS))
def test_table_lost_is_restored_within_a_second_logged_and_counted(flab, procs, fault):
    cmd, why = NFT_FAULTS[fault]
    d = procs.tpb(*MATCH, "--metrics-listen", LISTEN)
    assert table_whole(flab)
    encap = 'tpb_tunnel_packets_total{direction="encap"}'
    t0 = time.monotonic()
    if cmd is None:
        delete_match_rule(flab)
    else:
        flab.run("tpb", cmd)
    wait_for(lambda: table_whole(flab), 5, "the table back")
    took = time.monotonic() - t0
    line = d.wait_line("nftables: table netdev tpb_eth2")
    assert line == (f"tpb: nftables: table netdev tpb_eth2 {why} by someone else: loaded it "
                    "again (1 time)"), line
    before = scrape(flab, "tpb", LISTEN)
    assert before["tpb_nft_restored_total"] == 1, before
    ping(flab, "pc", T_SERVER, count=5)
    after = scrape(flab, "tpb", LISTEN)
    assert after[encap] - before[encap] >= 5, "the pings were not selected into the tunnel"
    assert took < RESTORE_LIMIT, f"restored after {took:.2f} s"
    d.stop()
    print(f"\nfault nft {fault}: table back within {took * 1000:.0f} ms "
          "(includes the test's own polling, a process per look)")


# -- --out's MTU lowered under TCP -------------------------------------------------------------

SIZE = 48 << 20
RATE = 16e6  # bytes a second: about 3 s of transfer
LOWER_AT = 8 << 20
LOW_MTU = 1280


@pytest.fixture
def mtu_back(flab):
    yield
    flab.run("tpb", ["ip", "link", "set", "dev", "eth3", "mtu", str(flab.mtu)])
    flab.run("pc", ["ip", "route", "flush", "cache"])


def test_out_mtu_lowered_under_tcp_through_the_tunnel_tcp_recovers(flab, procs, mtu_back,
                                                                     tmp_path: Path):
    d = tunnel_tpb(procs)
    xfer = TcpTransfer(flab, "pc", "server", T_SERVER, SIZE, RATE)
    try:
        xfer.wait_received(LOWER_AT, 30)
        t0 = time.monotonic()
        flab.run("tpb", ["ip", "link", "set", "dev", "eth3", "mtu", str(LOW_MTU)])
        at = xfer.received()
        sent, got = xfer.finish(timeout=120)
        took = time.monotonic() - t0
    finally:
        xfer.close()
    assert sent == got, f"sent {sent}, received {got}"
    assert got.split()[0] == str(SIZE)
    c = d.stop()
    t = c["tunnel"]
    assert t["icmp_sent"] >= 1, t  # the sender learned the smaller MTU from TPB
    print(f"\nfault --out MTU 1500 -> {LOW_MTU} at {at >> 20} MiB of {SIZE >> 20} MiB: "
          f"transfer complete and intact {took:.1f} s later; ICMP sent {t['icmp_sent']}, "
          f"drops {t['drop']}, out port drops "
          f"{ {k: v for k, v in c['out'].items() if k.startswith('drop_') and v} }")
