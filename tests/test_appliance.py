"""The appliance: systemd units, shipped configurations, `make install`, and
the Grafana dashboard (appliance/README.md says why each is as it is).

systemd is not PID 1 here (nor in CI). `systemd-analyze verify` and
`security --offline` judge the unit files as installed; one test runs `tpb
run` and `tpb pop` in the lab the way the units would (their user,
capabilities, no new privileges, no writable-and-executable memory, device
access as udev gives it) without systemd; the last one boots this
machine's own systemd as PID 1 of two containers (systemd-nspawn) in the
lab's namespaces and has it start, reload and stop the installed units for
real, their metrics scraped through the dashboard's queries.

`make install DESTDIR=...` builds a real venv (pip, the C helper): once per
session, shared by the tests that look at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import TpbDaemon, unprivileged_python

from tpb import lab as labmod

ROOT = Path(__file__).resolve().parent.parent
APPLIANCE = ROOT / "appliance"
UNITS = ("tpb.service", "tpb@.service", "tpb-pop.service")
CONFIGS = ("tpb.toml", "tpb-pop.toml")
DASHBOARD = APPLIANCE / "grafana" / "tpb-dashboard.json"

# Where `make install` puts things (Makefile), and what the units name.
TPB_HOME = "opt/tpb"
UNITDIR = "usr/local/lib/systemd/system"
SHAREDIR = "usr/local/share/tpb"
CONFDIR = "etc/tpb"

LAB_PREFIX = "tpbap"


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)], repeated keys kept in order (no line
    continuations: the units have none)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
            out.setdefault(section, [])
            continue
        key, eq, value = line.partition("=")
        assert eq and not line.endswith("\\"), f"{path.name}: {raw!r}"
        out[section].append((key.strip(), value.strip()))
    return out


def directive(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit[section] if k == key]


def one(unit: dict, section: str, key: str) -> str:
    values = directive(unit, section, key)
    assert len(values) == 1, (section, key, values)
    return values[0]


# ---- the units ----------------------------------------------------------------


def test_the_bridge_template_is_the_bridge_unit_but_for_its_file():
    """tpb@NAME.service is tpb.service with /etc/tpb/NAME.toml: the
    hardening of the two cannot drift apart."""
    plain = parse_unit(APPLIANCE / "tpb.service")
    template = parse_unit(APPLIANCE / "tpb@.service")
    differ = {"Description", "SyslogIdentifier"}
    for section in plain:
        a = [(k, v.replace("/etc/tpb/tpb.toml", "/etc/tpb/%i.toml"))
             for k, v in plain[section] if k not in differ]
        b = [(k, v) for k, v in template[section] if k not in differ]
        assert a == b, section
    assert set(template) == set(plain)
    assert "%i" in one(template, "Unit", "Description")
    assert one(template, "Service", "SyslogIdentifier") == "tpb@%i"


@pytest.mark.parametrize("name", UNITS)
def test_unit_life_cycle_and_privileges(name):
    """What the daemons and the issue ask of every unit."""
    u = parse_unit(APPLIANCE / name)
    cmd = "pop" if name == "tpb-pop.service" else "run"
    config = {"tpb.service": "tpb", "tpb@.service": "%i", "tpb-pop.service": "tpb-pop"}[name]
    s = dict(u["Service"])  # the keys checked here are given once
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"] == f"/opt/tpb/bin/tpb {cmd} --config /etc/tpb/{config}.toml"
    assert directive(u, "Service", "ExecReload") == [
        f"/opt/tpb/bin/tpb check --offline --config /etc/tpb/{config}.toml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert s["WatchdogSec"] and s["Restart"] == "on-failure"
    assert s["RestartPreventExitStatus"] == "2"
    assert s["User"] == "tpb" and s["NoNewPrivileges"] == "yes"
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(s["CapabilityBoundingSet"].split()) == caps
    assert set(s["AmbientCapabilities"].split()) == caps
    assert s["DevicePolicy"] == "closed"
    device = "/dev/net/tun" if cmd == "pop" else "/dev/cpu_dma_latency"
    assert directive(u, "Service", "DeviceAllow") == [f"{device} rw"]
    families = set(s["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} | (
        set() if cmd == "pop" else {"AF_PACKET"})
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "MemoryDenyWriteExecute", "SystemCallFilter"):
        assert s[key] in ("yes", "strict", "@system-service"), key
    # the one sysctl the bridge writes (tpb/select.py), and nothing else
    expect_rw = [] if cmd == "pop" else ["-/proc/sys/net/ipv6/conf"]
    assert directive(u, "Service", "ReadWritePaths") == expect_rw
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_udev_rule_gives_the_pm_qos_device_to_the_units_user():
    """tpb run opens /dev/cpu_dma_latency for writing (tpb/bridge.py); the
    unit's user gets it through its group, as the sysusers file makes it."""
    rule = [ln for ln in (APPLIANCE / "70-tpb.rules").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert rule == ['SUBSYSTEM=="misc", KERNEL=="cpu_dma_latency", GROUP="tpb", MODE="0660"']
    users = [ln.split() for ln in (APPLIANCE / "tpb.sysusers").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert [u[:3] for u in users] == [["u", "tpb", "-"]]


# ---- the shipped configurations --------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configuration_passes_check(name):
    f = APPLIANCE / name
    res = subprocess.run([sys.executable, "-m", "tpb", "check", "--offline", "--config", str(f)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip() == f"{f}: ok"


def test_shipped_bridge_configuration_shows_every_setting():
    """Every setting of RUN_SCHEMA appears in appliance/tpb.toml, set or
    commented out, so the annotated default documents them all."""
    from tpb.config import RUN_SCHEMA

    text = (APPLIANCE / "tpb.toml").read_text()
    for section, keys in RUN_SCHEMA.items():
        assert f"[{section}]" in text, section
        for key in keys:
            assert re.search(rf"^#? ?{key} = ", text, re.M), f"{section}.{key}"


# ---- make install ------------------------------------------------------------------


def make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"make {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res


def need_make_install() -> None:
    if os.geteuid() != 0:
        pytest.skip("make install needs root (it may install Debian packages)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("make install builds the venv with Debian's /usr/bin/python3")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`make install DESTDIR=...` once: the image-build way."""
    need_make_install()
    dest = tmp_path_factory.mktemp("destdir")
    res = make("install", f"DESTDIR={dest}")
    return dest, res.stdout


def test_make_install_puts_everything_where_the_units_expect(installed):
    dest, _ = installed
    for name in UNITS:  # the units as they are, not copied
        assert (dest / UNITDIR / name).read_bytes() == (APPLIANCE / name).read_bytes()
    assert (dest / "usr/local/lib/sysusers.d/tpb.conf").read_bytes() == (
        APPLIANCE / "tpb.sysusers").read_bytes()
    assert (dest / "usr/local/lib/udev/rules.d/70-tpb.rules").read_bytes() == (
        APPLIANCE / "70-tpb.rules").read_bytes()
    for name in CONFIGS:
        assert (dest / CONFDIR / name).read_bytes() == (APPLIANCE / name).read_bytes()
        assert (dest / SHAREDIR / name).read_bytes() == (APPLIANCE / name).read_bytes()
    assert (dest / SHAREDIR / "tpb-dashboard.json").read_bytes() == DASHBOARD.read_bytes()
    # ExecStart=/opt/tpb/bin/tpb, a script of the venv, naming the venv's
    # python by its place in the image, not in DESTDIR
    tpb = dest / TPB_HOME / "bin" / "tpb"
    assert os.access(tpb, os.X_OK)
    assert tpb.read_text().splitlines()[0] == "#!/opt/tpb/bin/python"
    assert os.readlink(dest / "usr/local/bin/tpb") == "/opt/tpb/bin/tpb"
    cfg = (dest / TPB_HOME / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg, cfg
    left = subprocess.run(["grep", "-rlIF", str(dest), str(dest / TPB_HOME / "bin"),
                           str(dest / TPB_HOME / "pyvenv.cfg")], capture_output=True, text=True)
    assert left.stdout == "", f"DESTDIR left in: {left.stdout}"
    # the C helper was built into the venv
    assert list((dest / TPB_HOME).glob("lib/python3*/site-packages/tpb/_tpb_c*.so"))


def test_installed_tpb_runs_from_opt_tpb(installed):
    """The installed tree, mounted where the image has it (a private mount
    namespace: nothing of this machine's /opt changes): the units' command
    starts, and passes the installed configurations."""
    dest, _ = installed
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    script = (f"mount --bind {dest}/opt /opt && /opt/tpb/bin/tpb --version && "
              f"/opt/tpb/bin/tpb check --offline --config {dest}/etc/tpb/tpb.toml && "
              f"/opt/tpb/bin/tpb check --offline --config {dest}/etc/tpb/tpb-pop.toml")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "tpb 0.1.0", f"{dest}/etc/tpb/tpb.toml: ok", f"{dest}/etc/tpb/tpb-pop.toml: ok"]


def test_make_install_again_never_overwrites_an_operators_configuration(installed):
    """Run twice, the operator's edit in between: kept, and said so; a
    configuration the operator removed comes back."""
    dest, _ = installed
    mine = dest / CONFDIR / "tpb.toml"
    edited = mine.read_text().replace('in = "eth2"', 'in = "enp1s0"')
    mine.write_text(edited)
    (dest / CONFDIR / "tpb-pop.toml").unlink()
    res = make("install", f"DESTDIR={dest}")
    assert mine.read_text() == edited
    assert f"{mine} exists: kept" in res.stdout
    assert (dest / CONFDIR / "tpb-pop.toml").read_bytes() == (
        APPLIANCE / "tpb-pop.toml").read_bytes()
    assert os.access(dest / TPB_HOME / "bin" / "tpb", os.X_OK)


def test_make_uninstall_keeps_only_the_configuration(installed, tmp_path):
    dest, _ = installed
    copy = tmp_path / "root"
    shutil.copytree(dest, copy, symlinks=True)
    make("uninstall", f"DESTDIR={copy}")
    files = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if not p.is_dir())
    assert files == [f"{CONFDIR}/{name}" for name in sorted(CONFIGS)], files


def systemd_root(dest: Path, tmp: Path) -> Path:
    """A root for `systemd-analyze --root`: the installed tree plus this
    machine's own system units (sysinit.target, network-online.target...),
    which the units' dependencies name."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd)")
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                   if (p / "sysinit.target").exists()), None)
    if system is None:
        pytest.skip("this machine has no systemd unit files to verify against")
    root = tmp / "root"
    shutil.copytree(dest, root, symlinks=True, copy_function=os.link)
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=60)


def test_systemd_analyze_verify_passes_on_the_installed_units(installed, tmp_path):
    """The real unit files, installed by `make install`, against the real
    installed tree (its ExecStart must exist and be executable): not a word
    from systemd-analyze. Checked against an empty /opt too, to show that
    the verification does look at ExecStart."""
    dest, _ = installed
    root = systemd_root(dest, tmp_path)
    names = ["tpb.service", "tpb-pop.service", "tpb@site2.service"]
    res = analyze("verify", "--man=no", f"--root={root}", *names)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr
    shutil.rmtree(root / TPB_HOME)
    res = analyze("verify", "--man=no", f"--root={root}", "tpb.service")
    assert res.returncode != 0 and "/opt/tpb/bin/tpb is not executable" in res.stderr


def test_units_exposure_stays_low(installed, tmp_path):
    """`systemd-analyze security` rates the sandbox: 2.2-2.4 ("OK") when
    written; above 2.5 something was loosened."""
    dest, _ = installed
    root = systemd_root(dest, tmp_path)
    for name in ("tpb.service", "tpb-pop.service", "tpb@site2.service"):
        res = analyze("security", "--offline=yes", f"--root={root}", "--threshold=25", name)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr


# ---- the Grafana dashboard -----------------------------------------------------------

# The metric names TPB exports, with the labels a bridge (`tpb run`) and a POP
# (`tpb pop`) give them: the list, plus the families tpb/metrics.py
# has on main since (FAMILIES, PORT_FIELDS, TUNNEL_FIELDS, REMOTE_FIELDS of
# 07227af: the bridge's tunnel families unlabelled, the POP's per peer and
# peer="none" for what belongs to no peer, no tpb_tunnel_active on a POP).
# Checked once by hand against a scrape of main's tests/ops_driver.py in the
# tunnel lab: the same names, and every query of the dashboard returned data
# from it but the POP's keepalive RTT (that POP sent no keepalives of its own).
# The lead will replace this list by a scrape of a running `tpb run` and
# `tpb pop` in the lab once the daemons serve their metrics: the names (and
# labels) the dashboard uses are then checked against the real endpoints.
PEER = "198.51.100.3"
_PORTS = [{"port": p, "device": d} for p, d in (("in", "eth2"), ("out", "eth3"))]
_REMOTES = [{"remote": "198.51.100.34"}, {"remote": "198.51.100.35"}]
_PEERS = [{"peer": PEER}, {"peer": "none"}]
METRICS: dict[str, dict[str, list[dict[str, str]]]] = {
    "tpb_build_info": {"bridge": [{"version": "0.1.0", "mode": "run"}],
                       "pop": [{"version": "0.1.0", "mode": "pop"}]},
    **{f"tpb_port_{name}_total": {"bridge": _PORTS}
       for name in ("receive_frames", "receive_bytes", "transmit_frames", "transmit_bytes",
                    "kernel_frames", "polls", "batches", "xsk_tx_ring_empty", "shed_engaged",
                    "shed_refused")},
    "tpb_port_drops_total": {"bridge": [{**p, "reason": r} for p in _PORTS
                                        for r in ("ring_full", "too_big")]},
    **{f"tpb_tunnel_{name}_total": {"bridge": [{"direction": d} for d in ("encap", "decap")],
                                    "pop": [{**p, "direction": d} for p in _PEERS
                                            for d in ("encap", "decap")]}
       for name in ("packets", "bytes")},
    "tpb_tunnel_drops_total": {"bridge": [{"reason": r} for r in ("gre_key", "tunnel_down")],
                               "pop": [{**p, "reason": r} for p in _PEERS
                                       for r in ("gre_csum", "no_peer")]},
    **{name: {"bridge": [{}], "pop": _PEERS}
       for name in ("tpb_tunnel_fragments_total", "tpb_tunnel_fragmented_packets_total",
                    "tpb_tunnel_icmp_sent_total", "tpb_tunnel_icmp_ratelimited_total",
                    "tpb_tunnel_mss_clamped_total", "tpb_tunnel_gso_packets_total",
                    "tpb_tunnel_gso_segments_total", "tpb_tunnel_arp_replies_total",
                    "tpb_tunnel_echo_replies_total", "tpb_tunnel_bypassed_packets_total",
                    "tpb_tunnel_udp_gso_sent_messages_total",
                    "tpb_tunnel_udp_gso_received_messages_total",
                    "tpb_tunnel_udp_gso_coalesced_messages_total",
                    "tpb_tunnel_gro_packets_total", "tpb_tunnel_gro_segments_total",
                    "tpb_reassembly_fragments_total", "tpb_reassembly_datagrams_total",
                    "tpb_reassembly_memory_bytes", "tpb_reassembly_memory_peak_bytes")},
    **{name: {"bridge": _REMOTES, "pop": [{"peer": PEER}]}
       for name in ("tpb_tunnel_up", "tpb_tunnel_transitions_total",
                    "tpb_keepalives_sent_total", "tpb_keepalives_unsent_total",
                    "tpb_keepalives_received_total", "tpb_keepalives_reflected_total",
                    "tpb_keepalive_rtt_seconds", "tpb_keepalive_last_reply_age_seconds")},
    "tpb_tunnel_active": {"bridge": _REMOTES},
    "tpb_pop_learned_entries": {"pop": [{}]},
    "tpb_nft_restored_total": {"bridge": [{}]},  # tunnel mode: its table guarded
    **{name: {"bridge": [{}], "pop": [{}]}
       for name in ("tpb_config_last_reload_successful",
                    "tpb_config_last_reload_success_timestamp_seconds")},
}
INSTANCES = {"bridge": "bridge1:9547", "pop": "pop1:9548"}

# What the dashboard must show (the list).
REQUIRED = {
    "tpb_port_receive_bytes_total", "tpb_port_transmit_bytes_total",
    "tpb_port_receive_frames_total", "tpb_port_transmit_frames_total",
    "tpb_tunnel_up", "tpb_tunnel_active", "tpb_keepalive_rtt_seconds",
    "tpb_port_drops_total", "tpb_tunnel_drops_total", "tpb_reassembly_memory_bytes",
    "tpb_tunnel_packets_total", "tpb_config_last_reload_successful",
}

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "atan2", "inf", "nan"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])  # a collapsed row holds its panels
    return out


def expressions(d: dict) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects: strings, label matchers,
    ranges and label lists taken out, what remains that is not a function
    call, a keyword or a number is a metric name."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\w+|\$\{\w+\}", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        if m.group(2) or m.group(1) in PROMQL_WORDS:
            continue
        names.add(m.group(1))
    return names


def test_metric_name_extraction():
    """metric_names() on the shapes the dashboard uses."""
    assert metric_names(
        'sum by (instance, port) (rate(tpb_a_total{instance=~"$instance", x="y{z}"}'
        "[$__rate_interval])) * 8") == {"tpb_a_total"}
    assert metric_names("time() - tpb_b_seconds") == {"tpb_b_seconds"}
    assert metric_names("max by (peer) (tpb_c) and on (instance) tpb_d > bool 0") == {
        "tpb_c", "tpb_d"}


def test_dashboard_uses_only_metrics_tpb_exports():
    d = dashboard()
    used: set[str] = set()
    for expr in expressions(d):
        names = metric_names(expr)
        assert names, expr
        unknown = names - set(METRICS)
        assert not unknown, f"{expr}: not a TPB metric: {unknown}"
        used |= names
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), instance\)", var["query"]["query"])
            assert m and m.group(1) in METRICS, var["query"]
            used.add(m.group(1))
    assert REQUIRED <= used, REQUIRED - used


def test_dashboard_structure():
    """What Grafana needs to import it anywhere: a schema version, a
    datasource variable every panel and query uses, an instance variable,
    unique panel ids, panels inside the 24-column grid, none overlapping."""
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ds
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Prometheus would receive them."""
    return (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
            .replace("$instance", INSTANCES["bridge"]).replace("$pop", INSTANCES["pop"]))


def dashboard_queries_without_data(series: list[dict[str, str]], tmp: Path) -> str:
    """promtool runs every query of the dashboard (Grafana's variables
    filled in) over `series` (promtool's input_series: 20 minutes of
    samples); what it says about the queries that returned nothing, or ""."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (apt-get install prometheus)")
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": f"clamp_max(count({grafana_to_promql(e)}), 1)", "eval_time": "20m",
                 "exp_samples": [{"labels": "{}", "value": 1}]}
                for e in expressions(dashboard())
            ],
        }],
    }
    f = tmp / "dashboard_test.yml"
    f.write_text(json.dumps(tests))  # YAML is a superset of JSON
    res = subprocess.run([promtool, "test", "rules", str(f)], capture_output=True, text=True,
                         timeout=120)
    return "" if res.returncode == 0 else res.stdout[-4000:] + res.stderr[-2000:]


def series_of(kind: str, name: str, labels: dict[str, str], value: float = 1) -> dict[str, str]:
    """One input series as Prometheus would store a scrape of instance
    `kind`: counters rising, gauges flat."""
    lab = {"job": "tpb", "instance": INSTANCES[kind], **labels}
    text = ",".join(f'{k}="{v}"' for k, v in sorted(lab.items()))
    values = f"{value:g}+1x20" if name.endswith("_total") else f"{value:g}x20"
    return {"series": f"{name}{{{text}}}", "values": values}


def test_dashboard_queries_return_data_from_tpb_shaped_series(tmp_path):
    """Every query, parsed and run by promtool over series named and
    labelled as in METRICS, returns something: none names a metric or label
    that is not there, nor filters a bridge's panel to the POP or the other
    way round. (test_units_run_under_systemd does the same over a scrape of
    the real daemons.)"""
    series = [series_of(kind, name, labels) for name, by_kind in METRICS.items()
              for kind, label_sets in by_kind.items() for labels in label_sets]
    failed = dashboard_queries_without_data(series, tmp_path)
    assert not failed, failed


# ---- the daemons as the units run them --------------------------------------------

SANDBOX_UID = 61234  # a uid no account has: the unit's User=tpb, without the account


def unit_sandbox(unit_name: str, devices: Path) -> list[str]:
    """argv prefix that runs a command as the unit would, as far as can be
    done without systemd: another user than root, the unit's capabilities
    (bounding, inheritable, ambient), no new privileges, no writable and
    executable memory (PR_SET_MDWE, what MemoryDenyWriteExecute= is), and
    its DeviceAllow= devices with the access udev gives them (Debian's 0666
    for /dev/net/tun; appliance/70-tpb.rules' group and 0660 for
    /dev/cpu_dma_latency), as private nodes bound over this machine's own in
    a mount namespace of its own."""
    u = parse_unit(APPLIANCE / unit_name)
    assert one(u, "Service", "User") == "tpb"
    caps = one(u, "Service", "AmbientCapabilities").split()
    assert set(caps) == set(one(u, "Service", "CapabilityBoundingSet").split())
    setcaps = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert one(u, "Service", "MemoryDenyWriteExecute") == "yes"
    binds = []
    for allow in directive(u, "Service", "DeviceAllow"):
        path, access = allow.split()
        assert access == "rw"
        st = os.stat(path)
        node = devices / Path(path).name
        if not node.exists():
            os.mknod(node, 0o600 | 0o020000, st.st_rdev)
            if path == "/dev/net/tun":
                os.chmod(node, 0o666)
            else:
                os.chown(node, 0, SANDBOX_UID)
                os.chmod(node, 0o660)
        binds.append(f"mount --bind {node} {path}")
    mdwe = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
            "sys.exit('PR_SET_MDWE refused') if libc.prctl(65, 1, 0, 0, 0) else "
            "os.execvp(sys.argv[1], sys.argv[1:])")
    inner = [
        sys.executable, "-c", mdwe,
        "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
        f"--inh-caps={setcaps}", f"--ambient-caps={setcaps}", f"--bounding-set={setcaps}",
        "--no-new-privs", "--",
    ]
    script = " && ".join([*binds, 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *inner]


UNIT_CAPS = 1 << 12 | 1 << 13  # CAP_NET_ADMIN, CAP_NET_RAW


def process_identity(pid: int) -> tuple[int, int]:
    """(effective uid, effective capabilities) of a running process."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[1]), int(fields["CapEff"].strip(), 16)


def mdwe_supported() -> bool:
    """PR_SET_MDWE (Linux 6.3): tried in a child, as it cannot be undone."""
    probe = ("import ctypes, sys; "
             "sys.exit(ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0)")
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


@pytest.mark.netns
def test_daemons_run_with_only_what_the_units_grant():
    """`tpb pop` and `tpb run` (tunnel mode: veth pair, nftables table, the
    disable_ipv6 sysctl, low latency on) with the units' user, capabilities
    and restrictions: pc reaches the server through the tunnel, and both
    stop cleanly. Not checked here (systemd applies them): the system call
    filter, address families, read-only file system and device cgroup."""
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux)")
    if not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (MemoryDenyWriteExecute's equivalent)")
    work = Path(tempfile.mkdtemp(prefix="tpb-appliance-"))
    try:
        os.chmod(work, 0o755)
        devices = work / "dev"
        devices.mkdir()
        state = work / "state"  # the daemons' counters, written as the unit's user
        state.mkdir()
        os.chown(state, SANDBOX_UID, SANDBOX_UID)
        bridge_cfg = state / "tpb.toml"
        bridge_cfg.write_text(
            '[ports]\nin = "eth2"\nout = "eth3"\n'
            f'[tunnel]\nlocal = "{labmod.T_TPB}"\nremote = ["{labmod.T_POP}"]\nkey = 7\n'
            '[select]\nmatch = ["ip daddr 203.0.113.0/24"]\n'
            '[bridge]\nlow_latency = true\nmetrics_listen = "off"\n')
        pop_cfg = state / "tpb-pop.toml"
        pop_cfg.write_text(
            f'[pop]\nlocal = "{labmod.T_POP}"\n'
            f'[[pop.peer]]\naddress = "{labmod.T_TPB}"\nkey = 7\nprefixes = ["192.0.2.0/26"]\n')
        # the unit's user may not read the checkout (a mode-0700 home): a
        # world-readable copy of TPB and what it needs, as an install has it
        tpb = [*unprivileged_python(work / "py"), "-m", "tpb"]
        with labmod.tunnel(LAB_PREFIX) as lb:
            pop = TpbDaemon(
                lb, "pop",
                [*unit_sandbox("tpb-pop.service", devices), *tpb, "pop", "--config",
                 str(pop_cfg), "--counters", str(state / "pop.json")],
                "tpb: pop ", state / "pop.json", "tpb pop as tpb-pop.service runs it")
            run = TpbDaemon(
                lb, "tpb",
                [*unit_sandbox("tpb.service", devices), *tpb, "run", "--config",
                 str(bridge_cfg), "--counters", str(state / "run.json")],
                "tpb: bridging", state / "run.json", "tpb run as tpb.service runs it")
            try:
                pop.start()
                run.start()
                for d in (pop, run):  # every wrapper exec()s: the pid is tpb's own
                    assert process_identity(d.pid) == (SANDBOX_UID, UNIT_CAPS), d.describe()
                sysctl = lb.run("tpb", ["sh", "-c",
                                        "cat /proc/sys/net/ipv6/conf/tpbsel*/disable_ipv6"])
                assert sysctl.stdout.split() == ["1", "1"], sysctl.stdout
                ping = lb.run("pc", ["ping", "-c", "3", "-i", "0.2", "-W", "2",
                                     labmod.T_SERVER], check=False)
                assert " 0% packet loss" in ping.stdout, ping.stdout + run.stderr + pop.stderr
                counters = run.stop()
                assert counters["tunnel"]["encap_packets"] >= 3, counters
                assert counters["tunnel"]["decap_packets"] >= 3, counters
                peers = pop.stop()["peers"]
                assert peers[labmod.T_TPB]["decap_packets"] >= 3, peers
            finally:
                for d in (run, pop):
                    if d.running:
                        d.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the units under a real systemd -------------------------------------------------


def systemd_pid1(nspawn: subprocess.Popen, timeout: float = 30) -> int:
    """The container's init: nspawn's child named systemd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert nspawn.poll() is None, f"systemd-nspawn exited with {nspawn.returncode}"
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if comm == "systemd" and ppid == nspawn.pid:
                return int(d.name)
        time.sleep(0.2)
    raise AssertionError("no systemd came up in the container")


class Container:
    """This machine's own system booted by systemd-nspawn into a lab
    namespace, on a throw-away overlay of /, with the installed tree
    (`make install DESTDIR=`) bound in: its /opt/tpb, unit files and
    sysusers.d, and /etc/tpb with the lab's configuration. systemd is PID 1
    there and starts only `unit` (and what every service needs: journald,
    sysusers...). All mounts are made in a mount namespace of their own."""

    def __init__(self, lab: labmod.Lab, node: str, unit: str, dest: Path, etc: Path,
                 work: Path) -> None:
        self.unit = unit
        root, upper = work / f"{node}-root", work / f"{node}-upper"
        root.mkdir()
        upper.mkdir()
        target = work / f"{node}.target"
        target.write_text(f"[Unit]\nDescription=TPB test\nWants={unit}\nAfter={unit}\n")
        # udev's permissions (70-tpb.rules, Debian's 0666 for tun), on private nodes
        binds = [(dest / TPB_HOME, "/opt/tpb"), (dest / UNITDIR, "/usr/local/lib/systemd/system"),
                 (dest / "usr/local/lib/sysusers.d", "/usr/local/lib/sysusers.d"),
                 (dest / SHAREDIR, "/usr/local/share/tpb"), (etc, "/etc/tpb"),
                 (target, "/etc/systemd/system/tpbtest.target")]
        args = [f"--bind-ro={src}:{dst}" for src, dst in binds]
        for path in ("/dev/cpu_dma_latency", "/dev/net/tun"):
            dev = work / f"{node}-{Path(path).name}"
            os.mknod(dev, 0o666 | 0o020000, os.stat(path).st_rdev)
            os.chmod(dev, 0o666)
            args.append(f"--bind={dev}:{path}")
        nspawn = [
            "systemd-nspawn", "--quiet", f"--directory={root}", f"--machine={lab.ns(node)}",
            "--register=no", "--keep-unit", "--link-journal=no",
            f"--network-namespace-path=/run/netns/{lab.ns(node)}",
            "--capability=CAP_NET_ADMIN", *args, "--boot", "--", "--unit=tpbtest.target",
        ]
        script = (
            "set -e; mkdir -p /run/systemd/nspawn; mount -t tmpfs tmpfs /run/systemd/nspawn; "
            f"mount -t tmpfs tmpfs {upper}; mkdir {upper}/u {upper}/w; "
            f"mount -t overlay overlay -o lowerdir=/,upperdir={upper}/u,workdir={upper}/w "
            f'{root}; exec "$@"')
        self.log = work / f"{node}-console.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                 *nspawn], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pid1 = systemd_pid1(self.proc)

    def run(self, *argv: str) -> str:
        res = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *argv],
                             capture_output=True, text=True, timeout=60)
        return res.stdout + res.stderr

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "-p", ",".join(props), self.unit)
        return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", self.unit)

    def wait_active(self, timeout: float = 30) -> None:
        """Until the unit is active: the daemon said READY=1."""
        deadline = time.monotonic() + timeout
        while (state := self.show("ActiveState")).get("ActiveState") != "active":
            assert time.monotonic() < deadline, (
                f"{self.unit}: {state}:\n{self.journal()}\n" + self.log.read_text()[-3000:])
            time.sleep(0.3)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.journal():
            assert time.monotonic() < deadline, (
                f"{self.unit}: no {text!r} in {timeout}s:\n{self.journal()}\n"
                + self.log.read_text()[-3000:])
            time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape(lab: labmod.Lab, node: str, port: int) -> str:
    """GET /metrics from inside a lab namespace (the daemons listen on
    loopback, as the shipped configurations have them)."""
    get = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
           f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")
    return lab.run(node, [sys.executable, "-c", get]).stdout


def scraped_series(kind: str, text: str) -> list[dict[str, str]]:
    """The tpb_* samples of a scrape as promtool input series."""
    out = []
    for line in text.splitlines():
        if not line.startswith("tpb_"):
            continue
        m = re.fullmatch(r'(\w+)(?:\{(.*)\})? (\S+)', line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append(series_of(kind, m.group(1), labels, float(m.group(3))))
    return out


@pytest.mark.netns
def test_units_run_under_systemd(installed, tmp_path):
    """The installed tpb.service and tpb-pop.service, started by systemd
    252 as PID 1 (in containers booted from this machine's own system into
    the lab's tpb and pop namespaces): the bridge started while its --out
    port is down exits 3 and is restarted until the port is up; everything
    the units say applies,
    the system call filter, address families, read-only file system with
    the one writable sysctl directory, device cgroup and the user from
    sysusers.d included. Both become active (READY=1); pc reaches the
    server through the tunnel; `tpb status` finds them; every query of the dashboard returns data
    from their metrics endpoints; `systemctl reload` refuses a bad file
    and leaves the daemon as it was, and reloads a good one; the watchdog
    (10 s) is fed; `systemctl stop` leaves both inactive, their counters in
    the journal."""
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (apt-get install systemd-container util-linux)")
    dest, _ = installed
    etc = tmp_path / "etc-tpb"
    etc.mkdir()
    bridge_toml = (
        '[ports]\nin = "eth2"\nout = "eth3"\n'
        f'[tunnel]\nlocal = "{labmod.T_TPB}"\nremote = ["{labmod.T_POP}"]\nkey = 7\n'
        'keepalive = "1s,3"\n[select]\nmatch = ["ip daddr 203.0.113.0/24"]\n')
    (etc / "tpb.toml").write_text(bridge_toml)
    (etc / "tpb-pop.toml").write_text(
        f'[pop]\nlocal = "{labmod.T_POP}"\n'
        f'[[pop.peer]]\naddress = "{labmod.T_TPB}"\nkey = 7\nprefixes = ["192.0.2.0/26"]\n'
        'keepalive = "1s,3"\n')
    containers: list[Container] = []
    with labmod.tunnel(LAB_PREFIX + "s") as lb:
        try:
            pop = Container(lb, "pop", "tpb-pop.service", dest, etc, tmp_path)
            containers.append(pop)
            # A port that comes late (a NIC's driver or rename, someone raising
            # it): TPB exits 3 and the unit restarts it until the port is there.
            lb.run("tpb", ["ip", "link", "set", "eth3", "down"])
            bridge = Container(lb, "tpb", "tpb.service", dest, etc, tmp_path)
            containers.append(bridge)
            deadline = time.monotonic() + 30
            while int(bridge.show("NRestarts").get("NRestarts", "0")) < 2:
                assert time.monotonic() < deadline, bridge.journal()
                time.sleep(0.3)
            assert "--out eth3: interface is down" in bridge.journal(), bridge.journal()
            assert "status=3/NOTIMPLEMENTED" in bridge.run(
                "journalctl", "--no-pager", "-o", "cat", "_PID=1"), bridge.journal()
            lb.run("tpb", ["ip", "link", "set", "eth3", "up"])
            started = time.monotonic()
            main_pid, restarts = {}, {}
            for c in containers:
                c.wait_active()
                s = c.show("MainPID", "NRestarts", "WatchdogUSec", "StatusText")
                assert s["WatchdogUSec"] == "10s", s
                assert (s["NRestarts"] == "0") == (c is pop), s
                restarts[c.unit] = s["NRestarts"]
                assert s["StatusText"], "no STATUS= from the daemon"
                main_pid[c.unit] = s["MainPID"]
                status = dict(ln.split(":", 1) for ln in c.run(
                    "cat", f"/proc/{s['MainPID']}/status").splitlines() if ":" in ln)
                uid = status["Uid"].split()[0]
                assert uid != "0" and c.run("id", "-nu", uid).strip() == "tpb", status["Uid"]
                for caps in ("CapEff", "CapBnd", "CapAmb"):
                    assert int(status[caps], 16) == UNIT_CAPS, (c.unit, caps, status[caps])
                assert status["NoNewPrivs"].strip() == "1"
                assert status["Seccomp"].strip() == "2", "no system call filter"
            sysctl = lb.run("tpb", ["sh", "-c", "cat /proc/sys/net/ipv6/conf/tpbsel*/disable_ipv6"])
            assert sysctl.stdout.split() == ["1", "1"], sysctl.stdout
            # A first echo request shows TPB the next hop's MAC, so keepalives
            # start (it may pass bypassed); then the tunnel is up, and carries.
            lb.run("pc", ["ping", "-c", "1", "-W", "2", labmod.T_SERVER], check=False)
            deadline = time.monotonic() + 15
            while f'tpb_tunnel_up{{remote="{labmod.T_POP}"}} 1.0' not in scrape(lb, "tpb", 9547):
                assert time.monotonic() < deadline, bridge.journal() + pop.journal()
                time.sleep(0.2)
            ping = lb.run("pc", ["ping", "-c", "3", "-i", "0.2", "-W", "2", labmod.T_SERVER],
                          check=False)
            assert " 0% packet loss" in ping.stdout, (
                ping.stdout + bridge.journal() + pop.journal())

            # `tpb status` from another shell in the namespace finds each daemon
            # (an abstract Unix socket, which the sandbox leaves alone)
            for node, what in (("tpb", "eth2"), ("pop", labmod.T_TPB)):
                res = lb.run(node, [sys.executable, "-m", "tpb", "status", "--json"])
                assert what in res.stdout, res.stdout + res.stderr

            # the dashboard over what the daemons really export
            deadline = time.monotonic() + 15
            while True:
                texts = {"bridge": scrape(lb, "tpb", 9547), "pop": scrape(lb, "pop", 9548)}
                if all("tpb_keepalive_rtt_seconds{" in x for x in texts.values()):
                    break
                assert time.monotonic() < deadline, texts
                time.sleep(0.5)
            series = [s for kind, x in texts.items() for s in scraped_series(kind, x)]
            assert {s["series"].split("{")[0] for s in series} == set(METRICS)
            failed = dashboard_queries_without_data(series, tmp_path)
            assert not failed, failed

            # systemctl reload: a bad file is refused before the daemon sees it
            (etc / "tpb.toml").write_text(bridge_toml.replace("key = 7", "key = -7"))
            bad = bridge.run("systemctl", "reload", "tpb.service")
            assert "failed" in bad, bad
            assert bridge.show("ActiveState", "MainPID") == {
                "ActiveState": "active", "MainPID": main_pid["tpb.service"]}
            (etc / "tpb.toml").write_text(bridge_toml.replace("1s,3", "2s,3"))
            good = bridge.run("systemctl", "reload", "tpb.service")
            assert good == "", good
            bridge.wait_for("tpb: configuration reloaded: ")

            # the watchdog is fed: still the same processes after 10 s and more
            time.sleep(max(0.0, started + 12 - time.monotonic()))
            for c in containers:
                s = c.show("ActiveState", "MainPID", "NRestarts")
                assert s == {"ActiveState": "active", "MainPID": main_pid[c.unit],
                             "NRestarts": restarts[c.unit]}, (s, c.journal())

            for c in containers:
                c.run("systemctl", "stop", c.unit)
                assert c.show("ActiveState")["ActiveState"] == "inactive", c.journal()
                assert f"{c.unit}: Deactivated successfully" in c.run(
                    "journalctl", "--no-pager", "-o", "cat", "_PID=1"), c.journal()
            sent = re.search(r"tunnel: encap (\d+) packets", bridge.journal())
            assert sent and int(sent.group(1)) >= 3, bridge.journal()
            got = re.search(rf"{re.escape(labmod.T_TPB)}: in (\d+) packets", pop.journal())
            assert got and int(got.group(1)) >= 3, pop.journal()
        finally:
            for c in containers:
                c.close()
