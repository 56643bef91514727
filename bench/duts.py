"""The devices under test (DUTs): whatever forwards between dut:eth2 and
dut:eth3 of the bench lab (gen — [eth2 DUT eth3] — sink).

A DUT is an entry with its own setup() and teardown(); the harness brings
each one up afresh for every single measurement, so per-process counters
(TPB's) belong to exactly one measurement.  To add a variant (TPB
encapsulating into GRE, TPB through a POP...), subclass Dut or TpbRun,
do the extra plumbing in setup()/teardown() (the lab is yours while the
DUT runs: add namespaces under lab.prefix, links, addresses; remove them
in teardown()), append an instance in default_duts(), and name in
`baselines` the DUTs it is to be compared with, with the targets to show.
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

    def setup(self, lab: Lab) -> None:
        raise NotImplementedError

    def teardown(self, lab: Lab) -> dict[str, float]:
        """Undo setup(); return the DUT's own counters for the measurement
        that ran in between (may be empty)."""
        raise NotImplementedError


@dataclass
class KernelBridge(Dut):
    """Linux bridge br0 enslaving eth2 and eth3: no STP, no forward delay,
    no br_netfilter (bridge-nf-call-* = 0 in the DUT's namespace)."""

    def setup(self, lab: Lab) -> None:
        for fam in ("iptables", "ip6tables", "arptables"):
            key = f"net.bridge.bridge-nf-call-{fam}"
            lab.sysctl("dut", key, "0")
            if lab.run("dut", ["sysctl", "-n", key]).stdout.strip() != "0":
                raise TpbError(f"dut: {key} did not stay 0")
        lab.run("dut", "ip link add br0 type bridge stp_state 0 forward_delay 0")
        for port in ("eth2", "eth3"):
            lab.run("dut", ["ip", "link", "set", port, "master", "br0"])
        lab.run("dut", "ip link set br0 up")
        # with STP off and no forward delay the ports forward at once; check
        deadline = time.monotonic() + 5
        while True:
            states = {
                p["ifname"]: p.get("state")
                for p in json.loads(lab.run("dut", "bridge -j link show").stdout or "[]")
            }
            if states.get("eth2") == states.get("eth3") == "forwarding":
                break
            if time.monotonic() > deadline:
                raise TpbError(f"dut: bridge ports not forwarding: {states}")
            time.sleep(0.05)

    def teardown(self, lab: Lab) -> dict[str, float]:
        lab.run("dut", "ip link del br0", check=False)
        return {}


@dataclass
class TpbRun(Dut):
    """`python -m tpb run --in eth2 --out eth3 ARGS` in the DUT's namespace."""

    args: list[str] = field(default_factory=list)
    workdir: Path = Path("/tmp")
    _proc: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _counters: Path | None = field(default=None, init=False, repr=False)

    def setup(self, lab: Lab) -> None:
        self._counters = self.workdir / f"{self.name}-counters.json"
        self._counters.unlink(missing_ok=True)
        # an empty configuration: a /etc/tpb/tpb.toml must not change the DUT
        config = self.workdir / "empty.toml"
        config.touch()
        argv = [sys.executable, "-m", "tpb", "run", "--config", str(config)]
        argv += ["--in", "eth2", "--out", "eth3", *self.args, "--counters", str(self._counters)]
        p = lab.spawn(
            "dut",
            argv,
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
        while "tpb: bridging" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or p.poll() is not None:
                self._stop()
                raise TpbError(f"{self.name}: did not start: {seen.strip() or 'timeout'}")
            # unbuffered reads: select() knows nothing of a file's buffer
            if select.select([p.stderr], [], [], min(left, 0.5))[0]:
                seen += os.read(p.stderr.fileno(), 4096).decode(errors="replace")

    def _stop(self) -> str:
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

    def teardown(self, lab: Lab) -> dict[str, float]:
        out = self._stop()
        if self._counters is None or not self._counters.exists():
            raise TpbError(f"{self.name}: wrote no counters (stdout: {out.strip()!r})")
        data = json.loads(self._counters.read_text())
        self._counters.unlink()
        ports = [data["in"], data["out"]]
        stats: dict[str, float] = {}
        for key in ("kernel_drops", "kernel_packets", "rx_frames", "tx_frames"):
            stats[key] = sum(port[key] for port in ports)
        stats["own_drops"] = sum(
            v for port in ports for k, v in port.items() if k.startswith("drop_")
        )
        tunnel = data.get("tunnel") or {}
        if isinstance(tunnel.get("drop"), dict):
            stats["own_drops"] += sum(tunnel["drop"].values())
        return stats


def default_duts(workdir: Path, tpb_variants: dict[str, list[str]]) -> list[Dut]:
    """The DUT list, in order.  tpb_variants: more TPB entries (name ->
    extra `tpb run` arguments), compared with the bridge like `tpb`."""
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
    return duts


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
