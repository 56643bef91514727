"""The devices under test (DUTs): whatever forwards between the gen and
the sink of one of the bench's labs (bench/topo.py; most DUTs sit between
dut:eth2 and dut:eth3 of gen — [eth2 DUT eth3] — sink).

A DUT is an entry with its own setup() and teardown(); the harness brings
each one up afresh for every single measurement, so per-process counters
(TPB's) belong to exactly one measurement.  To add a variant, subclass Dut
or TpbRun, do the extra plumbing in setup()/teardown() (the lab is yours
while the DUT runs; or add a topology in bench/topo.py), append an instance
in default_duts(), and name in `baselines` the DUTs it is to be compared
with, with the targets to show.  The tunnel DUTs are in bench/tunnels.py.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import any_cpu
from tpb.errors import TpbError
from tpb.lab import Lab

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """What a ratio DUT/baseline should be: at least (>=) or at most (<=)."""

    op: str  # ">=" or "<="
    value: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.value:g}×"


# The goals of TPB against the kernel bridge (metric key -> target).
TPB_TARGETS = {
    "udp64_mpps": Target(">=", 1.3),
    "tcp_gbps": Target(">=", 0.9),
    "rtt_us": Target("<=", 2.0),
}


@dataclass
class Dut:
    name: str
    description: str
    # baseline DUT name -> targets of the ratios against it (may be empty)
    baselines: dict[str, dict[str, Target]] = field(default_factory=dict)
    # forwards through an AF_PACKET ring whose drops are to be checked
    ring_check: bool = False
    topo: str = "bench"  # the lab it runs in (bench/topo.py)
    # loads that do not apply to it -> why (printed with the results)
    skip: dict[str, str] = field(default_factory=dict)
    pingable: bool = True  # the gen can ping the sink through it
    placement: str = ""  # set by bench.placement.placed(); "" = the lab as built

    def counter_lines(self, load: str, infos: list[dict[str, float]]) -> list[str]:
        """What its own counters say about one load's runs (after the
        table); infos: the runs' info dicts, in measurement order."""
        del load, infos
        return []

    def setup(self, lab: Lab) -> None:
        raise NotImplementedError

    def teardown(self, lab: Lab) -> dict[str, float]:
        """Undo setup(); return the DUT's own counters for the measurement
        that ran in between (may be empty)."""
        raise NotImplementedError


@dataclass
class KernelBridge(Dut):
    """Linux bridge br0 enslaving eth2 and eth3 in each of `nodes`: no STP,
    no forward delay, no br_netfilter (bridge-nf-call-* = 0 in the node's
    namespace).  `no_gso`: (node, port) pairs whose TSO and GSO are turned
    off while it runs, so that the kernel segments every super-packet in
    software on the way out of that port."""

    nodes: tuple[str, ...] = ("dut",)
    no_gso: tuple[tuple[str, str], ...] = ()
    _saved: list[tuple[str, str, list[str]]] = field(default_factory=list, init=False)

    def setup(self, lab: Lab) -> None:
        for node in self.nodes:
            _bridge_up(lab, node)
        for node, port in self.no_gso:
            self._saved.append((node, port, _gso_state(lab, node, port)))
            lab.run(node, ["ethtool", "-K", port, "tso", "off", "gso", "off"])

    def teardown(self, lab: Lab) -> dict[str, float]:
        while self._saved:
            node, port, state = self._saved.pop()
            lab.run(node, ["ethtool", "-K", port, *state], check=False)
        for node in self.nodes:
            lab.run(node, "ip link del br0", check=False)
        return {}


def _gso_state(lab: Lab, node: str, port: str) -> list[str]:
    """`tso X gso Y` as the port has them now (ethtool -k)."""
    out = lab.run(node, ["ethtool", "-k", port]).stdout
    state = {
        line.split(":")[0]: line.split(":")[1].split()[0]
        for line in out.splitlines()
        if ":" in line and line.split(":")[1].strip()
    }
    key = {"tso": "tcp-segmentation-offload", "gso": "generic-segmentation-offload"}
    return [x for k, name in key.items() for x in (k, state[name])]


def _bridge_up(lab: Lab, node: str) -> None:
    for fam in ("iptables", "ip6tables", "arptables"):
        key = f"net.bridge.bridge-nf-call-{fam}"
        lab.sysctl(node, key, "0")
        if lab.run(node, ["sysctl", "-n", key]).stdout.strip() != "0":
            raise TpbError(f"{node}: {key} did not stay 0")
    lab.run(node, "ip link add br0 type bridge stp_state 0 forward_delay 0")
    for port in ("eth2", "eth3"):
        lab.run(node, ["ip", "link", "set", port, "master", "br0"])
    lab.run(node, "ip link set br0 up")
    # with STP off and no forward delay the ports forward at once; check
    deadline = time.monotonic() + 5
    while True:
        states = {
            p["ifname"]: p.get("state")
            for p in json.loads(lab.run(node, "bridge -j link show").stdout or "[]")
        }
        if states.get("eth2") == states.get("eth3") == "forwarding":
            return
        if time.monotonic() > deadline:
            raise TpbError(f"{node}: bridge ports not forwarding: {states}")
        time.sleep(0.05)


class TpbProc:
    """One `python -m tpb SUBCOMMAND ...` in a lab node: started until it
    prints its ready line, stopped with SIGTERM, its exit counters read
    from the --counters file it writes."""

    def __init__(self, label: str, node: str, argv: list[str], ready: str, workdir: Path) -> None:
        self.label, self.node, self.argv, self.ready = label, node, argv, ready
        self.counters = workdir / f"{label}-counters.json"
        # an empty configuration: a /etc/tpb/tpb.toml must not change the DUT
        self.config = workdir / "empty.toml"
        self._proc: subprocess.Popen[str] | None = None

    def start(self, lab: Lab) -> None:
        self.counters.unlink(missing_ok=True)
        self.config.touch()
        sub, *rest = self.argv
        argv = [sys.executable, "-m", "tpb", sub, "--config", str(self.config), *rest]
        p = lab.spawn(
            self.node,
            [*argv, "--counters", str(self.counters)],
            cwd=str(REPO),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the harness alone decides when it stops
            preexec_fn=any_cpu,  # its own --cpu decides, not the harness's CPU
        )
        self._proc = p
        assert p.stderr is not None
        deadline = time.monotonic() + 30
        seen = ""
        while self.ready not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or p.poll() is not None:
                self.stop()
                raise TpbError(f"{self.label}: did not start: {seen.strip() or 'timeout'}")
            # unbuffered reads: select() knows nothing of a file's buffer
            if select.select([p.stderr], [], [], min(left, 0.5))[0]:
                seen += os.read(p.stderr.fileno(), 4096).decode(errors="replace")

    def stop(self) -> str:
        """SIGTERM (SIGKILL after 20 s); its stdout."""
        p = self._proc
        self._proc = None
        if p is None:
            return ""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            out, _err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _err = p.communicate()
        return out or ""

    def finish(self) -> dict[str, Any]:
        """stop(), then the exit counters (TpbError if none were written)."""
        out = self.stop()
        if not self.counters.exists():
            raise TpbError(f"{self.label}: wrote no counters (stdout: {out.strip()!r})")
        data = json.loads(self.counters.read_text())
        self.counters.unlink()
        return data


# the tunnel counters kept per measurement (struct tpb_tunnel_counters)
TUNNEL_KEYS = (
    "encap_packets",
    "decap_packets",
    "gso_packets",
    "gso_segments",
    "mss_clamped",
    "fragments",
    "icmp_sent",
    "udp_gso_sent",
    "udp_gso_received",
    "udp_gso_coalesced",
)


def run_stats(data: dict[str, Any]) -> dict[str, float]:
    """A `tpb run` counters file as flat numbers: both ports' sums, TPB's
    own drops (own_drops; by reason, non-zero: drop_port_* of the ports,
    drop_* of the tunnel), and in tunnel mode the tunnel's counters (tun_*)."""
    ports = [data["in"], data["out"]]
    stats: dict[str, float] = {}
    for key in ("kernel_drops", "kernel_packets", "rx_frames", "tx_frames"):
        stats[key] = sum(port[key] for port in ports)
    stats["own_drops"] = 0
    for port in ports:
        for k, v in port.items():
            if k.startswith("drop_") and v:
                stats[f"drop_port_{k[5:]}"] = stats.get(f"drop_port_{k[5:]}", 0) + v
                stats["own_drops"] += v
    tunnel = data.get("tunnel") or {}
    if tunnel.get("encap_packets") or tunnel.get("decap_packets") or tunnel.get("drop"):
        for key in TUNNEL_KEYS:
            stats[f"tun_{key}"] = tunnel.get(key, 0)
        for reason, n in (tunnel.get("drop") or {}).items():
            stats[f"drop_{reason}"] = n
            stats["own_drops"] += n
    return stats


@dataclass
class TpbRun(Dut):
    """`python -m tpb run --in IN --out OUT ARGS` in one node of the lab."""

    args: list[str] = field(default_factory=list)
    workdir: Path = Path("/tmp")
    node: str = "dut"
    in_if: str = "eth2"
    out_if: str = "eth3"
    _tpb: TpbProc | None = field(default=None, init=False, repr=False)

    def command(self) -> list[str]:
        return ["run", "--in", self.in_if, "--out", self.out_if, *self.args]

    def setup(self, lab: Lab) -> None:
        self._tpb = TpbProc(self.name, self.node, self.command(), "tpb: bridging", self.workdir)
        self._tpb.start(lab)

    def teardown(self, lab: Lab) -> dict[str, float]:
        tpb, self._tpb = self._tpb, None
        return run_stats(tpb.finish()) if tpb else {}

    def abort(self) -> None:
        """Stop it, counters unread (a failed setup of a larger DUT)."""
        tpb, self._tpb = self._tpb, None
        if tpb:
            tpb.stop()


@dataclass
class TpbXdp(TpbRun):
    """`tpb run --backend afxdp`.  In the 1core placement RPS cannot move
    its receive work: the XDP program runs in veth's own NAPI, scheduled
    on the CPU that transmitted into the veth (the generator's), before
    RPS.  The honest equivalent of a NIC interrupting TPB's core is the
    ports' NAPI as kernel threads (sysfs `threaded`) pinned to the DUT's
    CPU; it is set once TPB runs (veth creates its XDP NAPI when the
    program is attached) and undone at teardown.

    And the gen's and the sink's tx checksumming off while it runs (TSO
    with it): a veth hands XDP a frame its sender left CHECKSUM_PARTIAL
    without the checksum filled in, so TCP through afxdp on veth needs its
    peers to compute checksums (README, *Backends*).  The gen pays for
    that, where the other DUTs let it leave checksums undone; 64-byte loads
    (trafgen writes whole frames) are not affected."""

    _threaded: list[str] = field(default_factory=list, init=False, repr=False)
    _lab: Lab | None = field(default=None, init=False, repr=False)
    _tx_off: list[str] = field(default_factory=list, init=False, repr=False)

    def setup(self, lab: Lab) -> None:
        self._lab = lab
        for node in ("gen", "sink"):
            lab.run(node, ["ethtool", "-K", "eth0", "tx", "off"])
            self._tx_off.append(node)
        super().setup(lab)
        if self.placement != "1core":
            return
        # After TPB: veth has a NAPI only once an XDP program is attached
        # (before, writing `threaded` fails), and setting it makes the
        # NAPIs' kernel threads, named napi/DEV-ID.
        before = _napi_threads()
        for port in (self.in_if, self.out_if):
            lab.run(self.node, ["sh", "-c", f"echo 1 > /sys/class/net/{port}/threaded"])
            self._threaded.append(port)
        new = _napi_threads() - before
        if not new:
            raise TpbError("tpb-xdp@1core: no NAPI thread of the ports appeared")
        for pid in new:
            os.sched_setaffinity(pid, {DUT_CPU})

    def teardown(self, lab: Lab) -> dict[str, float]:
        self._unthread(lab)  # while the NAPIs exist: the flag would outlive them
        try:
            return super().teardown(lab)
        finally:
            self._tx_on(lab)

    def abort(self) -> None:
        if self._lab is not None:
            self._unthread(self._lab)
            self._tx_on(self._lab)
        super().abort()

    def _tx_on(self, lab: Lab) -> None:
        for node in self._tx_off:
            lab.run(node, ["ethtool", "-K", "eth0", "tx", "on"], check=False)
        self._tx_off.clear()

    def _unthread(self, lab: Lab) -> None:
        for port in self._threaded:
            lab.run(self.node, ["sh", "-c", f"echo 0 > /sys/class/net/{port}/threaded"],
                    check=False)
        self._threaded.clear()


DUT_CPU = 1  # as bench.placement's


def _napi_threads() -> set[int]:
    """Kernel threads named napi/eth2-* or napi/eth3-* (the ports' NAPI)."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith(("napi/eth2-", "napi/eth3-")):
            out.add(int(pid))
    return out


# A scraper of TPB's metrics endpoint: what a Prometheus server polling it
# every SCRAPE_S would cost TPB (the scrape itself runs in TPB's process).
SCRAPE_S = 0.1
SCRAPER = f"""
import sys, time, urllib.request
url = sys.argv[1]
while True:
    t = time.monotonic()
    try:
        urllib.request.urlopen(url, timeout=2).read()
    except OSError:
        pass
    time.sleep(max(0.0, {SCRAPE_S} - (time.monotonic() - t)))
"""
METRICS = "127.0.0.1:9547"


@dataclass
class TpbScraped(TpbRun):
    """TPB with its metrics endpoint scraped every SCRAPE_S seconds."""

    _scraper: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def setup(self, lab: Lab) -> None:
        super().setup(lab)
        self._scraper = lab.spawn(
            self.node,
            [sys.executable, "-c", SCRAPER, f"http://{METRICS}/metrics"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=any_cpu,  # wherever the scheduler puts it, as a real scraper
        )

    def teardown(self, lab: Lab) -> dict[str, float]:
        if self._scraper is not None:
            self._scraper.kill()
            self._scraper.wait()
            self._scraper = None
        return super().teardown(lab)


def default_duts(workdir: Path, tpb_variants: dict[str, list[str]]) -> list[Dut]:
    """The DUT list, in order.  tpb_variants: more TPB entries (name ->
    extra `tpb run` arguments), compared with the bridge like `tpb`."""
    from bench import tunnels  # it builds on this module's classes

    duts: list[Dut] = [
        KernelBridge("bridge", "Linux bridge br0 (no STP, forward delay 0, no br_netfilter)"),
        TpbRun(
            "tpb",
            "tpb run --cpu 1 (defaults)",
            baselines={"bridge": TPB_TARGETS},
            ring_check=True,
            args=["--cpu", "1"],
            workdir=workdir,
        ),
    ]
    duts.append(
        TpbScraped(
            "tpb-scraped",
            f"tpb run --cpu 1, its metrics scraped every {SCRAPE_S * 1000:.0f} ms",
            baselines={"tpb": {"udp64_mpps": Target(">=", 0.98)}},
            args=["--cpu", "1", "--metrics-listen", METRICS],
            workdir=workdir,
            skip={load: "the scrape's cost is measured on the 64-byte load"
                  for load in ("ringcheck", "tcp", "tcp-cubic", "rtt")},
        )
    )
    # Issue 14's answers, each against TPB as it is and the bridge: the
    # loop's thread above the receive softirq's (SCHED_FIFO), and two
    # workers sharing the flows (worker 0 on CPU 0 beside the generator,
    # worker 1 on CPU 1: on this 2-CPU machine there is no third).
    duts.append(
        TpbRun(
            "tpb-fifo",
            "tpb run --cpu 1 --priority 10 (SCHED_FIFO)",
            baselines={"bridge": TPB_TARGETS, "tpb": {}},
            ring_check=True,
            args=["--cpu", "1", "--priority", "10"],
            workdir=workdir,
        )
    )
    duts.append(
        TpbRun(
            "tpb-w2",
            "tpb run --cpu 0 --workers 2 (worker 0 on CPU 0, worker 1 on CPU 1)",
            baselines={"bridge": TPB_TARGETS, "tpb": {}},
            ring_check=True,
            args=["--cpu", "0", "--workers", "2"],
            workdir=workdir,
        )
    )
    # Issue 14 point 3: the AF_XDP backend (plain bridging), on CPU 1.
    duts.append(
        TpbXdp(
            "tpb-xdp",
            "tpb run --cpu 1 --backend afxdp",
            baselines={"bridge": TPB_TARGETS, "tpb": {}},
            args=["--cpu", "1", "--backend", "afxdp"],
            workdir=workdir,
        )
    )
    for name, extra in tpb_variants.items():
        duts.append(
            TpbRun(
                name,
                "tpb run " + " ".join(extra),
                baselines={"bridge": TPB_TARGETS, "tpb": {}},
                ring_check=True,
                args=extra,
                workdir=workdir,
            )
        )
    return duts + tunnels.duts(workdir)


def owned_pids(lab: Lab) -> dict[str, list[int]]:
    """Processes still living in the lab's namespaces (left by an earlier
    run of the harness that was killed hard)."""
    out: dict[str, list[int]] = {}
    for node in lab.nodes:
        ns = lab.ns(node)
        if not os.path.exists(f"/run/netns/{ns}"):
            continue
        res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids = [int(x) for x in res.stdout.split()]
        if pids:
            out[ns] = pids
    return out
