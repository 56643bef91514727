"""TPB and `tpb pop` watched by Debian's real Prometheus server.

The tunnel lab (tpb/lab.py: tunnel()); one Prometheus in the tpb node
scrapes `tpb run` on 127.0.0.1:9547, one in the pop node scrapes `tpb pop`
on 127.0.0.1:9548 (the defaults), every 200 ms.  The lab is made quiet
first (no IPv6, static neighbours), so every counter moves by exactly what
the test sends.  What the tests read is what Prometheus stored, through
its HTTP API: what an operator's dashboards and alerts see.
"""

from __future__ import annotations

import signal
import time

import pytest
from helpers import received, wait_for
from pop_util import IpSender, need_root, ping
from prom_util import Prometheus
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import GRE

from tpb import lab as labmod
from tpb.lab import T_GW1, T_GW2, T_PC, T_POP, T_SERVER, T_TPB

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbprm"
KEY = 7
PEER = f"{T_TPB},key={KEY},prefix=192.0.2.0/26"
MATCH = "ip daddr 203.0.113.0/24"
GW1_MAC, GW2_MAC = "02:00:00:00:00:42", "02:00:00:00:00:45"


@pytest.fixture(scope="module")
def tlab():
    need_root()
    with labmod.tunnel(LAB_PREFIX) as lb:
        for node in lb.nodes:
            lb.sysctl(node, "net.ipv6.conf.all.disable_ipv6", "1")
            lb.sysctl(node, "net.ipv6.conf.default.disable_ipv6", "1")
        # no ARP across TPB while a test counts
        lb.run("gw1", f"ip neigh replace {T_GW2} lladdr {GW2_MAC} nud permanent dev eth1")
        lb.run("gw2", f"ip neigh replace {T_GW1} lladdr {GW1_MAC} nud permanent dev eth0")
        lb.run("gw2", f"ip neigh replace {T_TPB} lladdr 02:00:00:00:00:44 nud permanent dev eth0")
        yield lb


def bridge_args(*extra: str) -> list[str]:
    return ["--local", T_TPB, "--remote", T_POP, "--key", str(KEY), "--match", MATCH, *extra]


def test_prometheus_sees_every_frame_and_drop_exactly(tlab, daemons, tmp_path):
    daemons.pop(tlab, "--local", T_POP, "--peer", PEER)
    daemons.run(tlab, *bridge_args())
    with Prometheus(tlab, "tpb", {"tpb": "127.0.0.1:9547"}, tmp_path) as prom, \
            Prometheus(tlab, "pop", {"pop": "127.0.0.1:9548"}, tmp_path) as ppop:
        prom.wait_value('up{job="tpb"}', 1)
        ppop.wait_value('up{job="pop"}', 1)
        assert received(ping(tlab, "pc", T_SERVER, count=1)) == 1  # warm: neighbours, routes
        queries = {
            "in_rx": 'tpb_port_receive_frames_total{port="in",device="eth2"}',
            "out_tx": 'tpb_port_transmit_frames_total{port="out",device="eth3"}',
            "out_rx": 'tpb_port_receive_frames_total{port="out",device="eth3"}',
            "in_tx": 'tpb_port_transmit_frames_total{port="in",device="eth2"}',
            "encap": 'tpb_tunnel_packets_total{direction="encap"}',
            "decap": 'tpb_tunnel_packets_total{direction="decap"}',
            "gre_key": 'tpb_tunnel_drops_total{reason="gre_key"}',
        }
        pop_queries = {
            "pop_decap": f'tpb_tunnel_packets_total{{peer="{T_TPB}",direction="decap"}}',
            "pop_encap": f'tpb_tunnel_packets_total{{peer="{T_TPB}",direction="encap"}}',
        }
        time.sleep(1)  # two scrapes after the warm-up

        def now() -> dict[str, float | None]:
            out = {k: prom.one(q) for k, q in queries.items()}
            out.update({k: ppop.one(q) for k, q in pop_queries.items()})
            return out

        before = now()
        assert None not in before.values(), before
        n, m = 10, 7
        assert received(ping(tlab, "pc", T_SERVER, count=n, interval=0.05)) == n
        wrong = IP(src=T_POP, dst=T_TPB) / GRE(key_present=1, key=KEY + 1) / IP(
            src=T_SERVER, dst=T_PC) / ICMP()
        with IpSender(tlab, "pop") as tx:
            for _ in range(m):
                tx.send(bytes(wrong))
        want = {k: v + n for k, v in before.items()}
        want["gre_key"] = before["gre_key"] + m
        want["out_rx"] = before["out_rx"] + n + m
        wait_for(lambda: now() == want, 10, "Prometheus to see every frame")
        time.sleep(0.6)  # and nothing more
        assert now() == want, (before, now())


def test_prometheus_sees_the_pop_die_and_come_back(tlab, daemons, tmp_path):
    pop = daemons.pop(tlab, "--local", T_POP, "--peer", PEER)
    t = daemons.run(tlab, *bridge_args("--keepalive", "0.2s,3"))
    up = f'tpb_tunnel_up{{remote="{T_POP}"}}'
    flips = f'tpb_tunnel_transitions_total{{remote="{T_POP}"}}'
    with Prometheus(tlab, "tpb", {"tpb": "127.0.0.1:9547"}, tmp_path) as prom:
        prom.wait_value('up{job="tpb"}', 1)
        assert received(ping(tlab, "gw1", T_GW2, count=1)) == 1  # the next hop, learned
        prom.wait_value(up, 1)
        assert prom.one(f'tpb_tunnel_active{{remote="{T_POP}"}}') == 1
        rtt = prom.one(f'tpb_keepalive_rtt_seconds{{remote="{T_POP}"}}')
        assert rtt is not None and 0 < rtt < 0.2, rtt
        base = prom.one(flips)
        pop.send_signal(signal.SIGKILL)
        prom.wait_value(up, 0, timeout=5)
        assert prom.one(flips) == base + 1
        # fail-open: the selected flow is bridged as it is, and gets through
        assert received(ping(tlab, "pc", T_SERVER, count=3)) == 3
        prom.wait_value("tpb_tunnel_bypassed_packets_total", 3, timeout=5)
        daemons.pop(tlab, "--local", T_POP, "--peer", PEER)
        prom.wait_value(up, 1, timeout=5)
        assert prom.one(flips) == base + 2
    assert received(ping(tlab, "pc", T_SERVER, count=3)) == 3
    c = t.stop()
    assert c["tunnel"]["encap_packets"] >= 3, c["tunnel"]
    down = [ln for ln in t.stderr.splitlines() if T_POP in ln and "down" in ln]
    back = [ln for ln in t.stderr.splitlines() if T_POP in ln and " up" in ln]
    assert len(down) == 1 and len(back) >= 1, t.stderr


def test_prometheus_sees_a_refused_then_a_good_reload(tlab, daemons, tmp_path):
    good = (f'[ports]\nin = "eth2"\nout = "eth3"\n[tunnel]\nlocal = "{T_TPB}"\n'
            f'remote = "{T_POP}"\nkey = {KEY}\n[select]\nmatch = ["{MATCH}"]\n')
    t = daemons.run(tlab, config=good)
    cfg = next(tmp_path.glob("tpb-*.toml"))
    ok = "tpb_config_last_reload_successful"
    stamp = "tpb_config_last_reload_success_timestamp_seconds"
    with Prometheus(tlab, "tpb", {"tpb": "127.0.0.1:9547"}, tmp_path) as prom:
        prom.wait_value('up{job="tpb"}', 1)
        assert prom.one(ok) == 1
        started = prom.one(stamp)
        assert started is not None and abs(started - time.time()) < 60
        cfg.write_text(good.replace(f"key = {KEY}", 'key = "seven"'))
        t.proc.send_signal(signal.SIGHUP)
        prom.wait_value(ok, 0)
        assert prom.one(stamp) == started
        cfg.write_text(good.replace(f"key = {KEY}", f"key = {KEY + 1}"))
        time.sleep(1.1)  # a timestamp of whole seconds may not move otherwise
        t.proc.send_signal(signal.SIGHUP)
        prom.wait_value(ok, 1)
        assert prom.one(stamp) > started
    assert t.running
    t.stop()
