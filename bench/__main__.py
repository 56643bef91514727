"""`python -m bench` (as root, from the repository root; `make bench`):
the Linux bridge and TPB side by side, plain and tunneling, in one run.

    bench   gen — [eth2 DUT eth3] — sink                 bridge, tpb, tpb-encap
    chain   gen — [eth2 A eth3] — [eth3 B eth2] — sink    chain, chain-gre
    pop     gen — [eth2 DUT eth3] — pop — sink            pop-bridge, pop-tpb, pop-gre

One lab at a time (bench/topo.py), torn down before the next.  In each,
for each load, each run, each DUT (order alternating from run to run, so
a drift of the machine hits every DUT alike): set the DUT up, measure,
tear it down.  Then the table: medians, raw runs, the DUTs' own counters,
ratios against the baselines with the targets.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import placement, report
from bench.duts import Dut, default_duts, owned_pids
from bench.loads import GEN_CPU, LOADS, Env, Load, ring_rate
from bench.measure import foreign_load, wait_quiet
from bench.topo import TOPOS
from tpb.errors import TpbError

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("trafgen", "iperf3", "ping", "taskset", "bridge", "ip", "sysctl")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per load and DUT (default 3)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured interval (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up before it (default 1)")
    p.add_argument(
        "--only",
        metavar="NAME[,NAME...]",
        help="only these DUTs and/or loads (" + ", ".join(x.name for x in LOADS) + ")",
    )
    p.add_argument(
        "--tpb",
        metavar="NAME=ARGS",
        action="append",
        default=[],
        help="one more TPB entry: NAME runs `tpb run ... ARGS`, e.g. "
        "--tpb 'spin0=--cpu 1 --spin-us 0' (repeatable)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="before each measurement wait up to this long for other processes "
        "to go quiet (default 60; 0: never wait)",
    )
    p.add_argument(
        "--sink",
        choices=("drop", "icmp"),
        default="drop",
        help="drop (default): the sink drops the 64-byte frames at its ingress hook "
        "(nftables), after counting them, as a remote sink costs the DUT nothing; "
        "icmp: its IP stack takes them (UDP to the discard port, no socket: ICMP port "
        "unreachable), on whichever CPU delivers to it",
    )
    p.add_argument(
        "--placement",
        default="default,1core",
        metavar="NAME[,NAME]",
        help="where the bench lab's DUTs are measured, each in turn: default (no RPS) "
        "and/or 1core (RPS steers the DUT ports' receive work to the DUT's CPU 1); "
        "default: both",
    )
    p.add_argument(
        "--rates",
        default="0.3,0.6,0.9,1.2",
        metavar="MPPS[,MPPS...]",
        help="the paced points of the overload load, before its full-speed one "
        "(default 0.3,0.6,0.9,1.2)",
    )
    p.add_argument(
        "--flows",
        type=int,
        default=16,
        help="UDP flows (source ports) of the 64-byte loads, sent in turn (default 16): "
        "a DUT with several workers shares them by flow",
    )
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0:
        p.error("--runs and --seconds must be positive, --warmup not negative")
    try:
        args.rates = tuple(float(x) for x in args.rates.split(",") if x.strip())
    except ValueError:
        p.error(f"--rates {args.rates!r}: want numbers of Mpps, comma-separated")
    if not 1 <= args.flows <= 1000:
        p.error("--flows: from 1 to 1000")
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates: want at least one positive rate")
    args.sink_drop = args.sink == "drop"
    return args


def place(duts: list[Dut], placements: list[placement.Placement]) -> list[Dut]:
    """Each DUT of the bench lab once per placement (NAME@PLACEMENT), the
    others as they are."""
    out: list[Dut] = []
    for d in duts:
        if d.topo == "bench":
            out += [placement.placed(d, p) for p in placements]
        else:
            out.append(d)
    return out


def select(args: argparse.Namespace, duts: list[Dut]) -> tuple[list[Dut], list[Load]]:
    loads = list(LOADS)
    if not args.only:
        return duts, loads
    names = {n.strip() for n in args.only.split(",") if n.strip()}
    known = {d.name for d in duts} | {x.name for x in LOADS}
    if names - known:
        raise TpbError(f"--only: unknown {', '.join(sorted(names - known))} (known: {known})")
    if names & {d.name for d in duts}:
        duts = [d for d in duts if d.name in names]
    if names & {x.name for x in LOADS}:
        if "ringcheck" in names:
            names.add("udp64")  # its rate is half the 64-byte rate
        loads = [x for x in LOADS if x.name in names]
    return duts, loads


def variants(specs: list[str], taken: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or name in taken or name in out:
            raise TpbError(f"--tpb {spec!r}: want a new NAME=ARGS")
        out[name] = rest.split()
    return out


def preflight() -> None:
    if os.geteuid() != 0:
        raise TpbError("needs root (network namespaces, AF_PACKET)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise TpbError(f"missing tools: {' '.join(missing)} (make deps)")
    if (os.cpu_count() or 1) < 2:
        raise TpbError("needs 2 CPUs: the generator on CPU 0, TPB on CPU 1")


LOCK = Path("/run/lock/tpb-bench.lock")


def lock() -> int:
    """One harness at a time: a second one would delete the first's labs
    (same namespace names) and kill its processes as leftovers.  The lock
    goes with the process, however it ends."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TpbError(f"another python -m bench is running (pid {other})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def git_rev() -> str:
    res = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=Path.cwd()
    )
    return res.stdout.strip() or "?"


def cpu_model() -> str:
    """The CPU's model name: figures taken on machines of one kind differ by
    the host CPU they landed on (AMD EPYC and Intel Xeon both seen here)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def header(args: argparse.Namespace, duts: list[Dut], loads: list[Load]) -> str:
    cpu = cpu_model()
    lines = [
        f"TPB bench  {time.strftime('%Y-%m-%d %H:%M:%S')}  git {git_rev()}  "
        f"Linux {platform.release()}  {os.cpu_count()} x {cpu}",
        f"runs {args.runs}, {args.seconds:g} s measured after {args.warmup:g} s warm-up; "
        f"64-byte loads in {args.flows} UDP flow(s); "
        f"loads: {', '.join(x.name for x in loads)}",
        "sink: "
        + (
            "drops the 64-byte frames at its nftables ingress hook (after counting)"
            if args.sink_drop
            else "its IP stack receives the 64-byte frames (UDP to the discard port, no socket)"
        ),
        "placements: "
        + "; ".join(f"{p.name}: {p.title}" for p in placement.parse(args.placement)),
        "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]
    w = max(len(d.name) for d in duts) if duts else 0
    for topo in TOPOS.values():
        mine = [d for d in duts if d.topo == topo.name]
        if mine:
            lines.append(f"lab {topo.name} ({topo.prefix}-*): {topo.drawing}")
            lines += [f"  {d.name:<{w}}  {d.description}" for d in mine]
    lines += skipped(duts, loads)
    return "\n".join(lines)


def skipped(duts: list[Dut], loads: list[Load]) -> list[str]:
    names = {x.name for x in loads}
    return [
        f"not measured: {load} on {d.name}: {why}"
        for d in duts
        for load, why in d.skip.items()
        if load in names
    ]


def measure(env: Env, load: Load, dut: Dut, rec: report.Record) -> None:
    if dut.placement:
        placement.apply(env.lab, placement.PLACEMENTS[dut.placement])
    dut.setup(env.lab)
    stats: dict[str, float] = {}
    try:
        sample = load.run(env, dut, rec.values)
    finally:
        stats = dut.teardown(env.lab)
    rec.add(dut.name, load.name, sample.values, {**sample.info, **stats})
    shown = "  ".join(f"{k} {v:.3f}" for k, v in sample.values.items())
    extra = f"  ring drops {int(stats['kernel_drops'])}" if "kernel_drops" in stats else ""
    if "backlog_drops" in sample.info:
        extra += f"  backlog drops {int(sample.info['backlog_drops'])}"
    foreign = sample.info.get("foreign_cpus", 0.0)
    noisy = (
        f"  (others used {foreign:.2f} CPU: {sample.others})"
        if foreign > report.FOREIGN_LIMIT
        else ""
    )
    print(f"  {load.name:<9} {dut.name:<10} {shown}{extra}{noisy}", flush=True)


def bench(
    args: argparse.Namespace, duts: list[Dut], loads: list[Load], rec: report.Record, workdir: Path
) -> None:
    """Each lab in turn, with its DUTs."""
    for topo in TOPOS.values():
        mine = [d for d in duts if d.topo == topo.name]
        if not any(load.name not in d.skip for d in mine for load in loads):
            continue
        lab = topo.lab()
        for ns, pids in owned_pids(lab).items():  # an earlier run of ours killed hard
            print(f"bench: killing {len(pids)} leftover processes in {ns}", file=sys.stderr)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        print(f"lab {topo.name}: {topo.drawing}", flush=True)
        with lab:  # down() also on an error or Ctrl-C: namespaces, veths, TUN, nft
            env = Env(
                lab, topo, workdir, args.seconds, args.warmup, args.sink_drop, args.rates,
                args.flows,
            )
            env.start()
            bench_lab(args, env, mine, loads, rec)


def bench_lab(
    args: argparse.Namespace, env: Env, duts: list[Dut], loads: list[Load], rec: report.Record
) -> None:
    for load in loads:
        for run in range(args.runs):
            order = duts if run % 2 == 0 else duts[::-1]
            for dut in order:
                if load.name in dut.skip or not load.applies(dut):
                    continue
                if load.name == "ringcheck" and ring_rate(dut, rec.values) is None:
                    continue
                if args.max_wait > 0:
                    wait_quiet(
                        report.FOREIGN_LIMIT,
                        args.max_wait,
                        lambda x: print(
                            f"  (waiting: other processes use {x:.2f} CPU)", flush=True
                        ),
                    )
                try:
                    measure(env, load, dut, rec)
                except (TpbError, subprocess.TimeoutExpired) as e:
                    msg = f"{load.name} {dut.name} run {run + 1}: {e}"
                    rec.errors.append(msg)
                    print(f"  ERROR {msg}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    # Ctrl-C, also when started where SIGINT is ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_term)
    rec = report.Record({}, {}, [])
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tpb-bench-"))
    interrupted = False
    duts: list[Dut] = []
    loads: list[Load] = []
    try:
        preflight()
        lock()
        # The harness belongs to the generator's side: on CPU 1 it could
        # take the DUT's CPU away for the milliseconds a ring overflows in.
        os.sched_setaffinity(0, {int(GEN_CPU)})
        known = {d.name for d in default_duts(workdir, {})}
        duts, loads = select(args, default_duts(workdir, variants(args.tpb, known)))
        duts = place(duts, placement.parse(args.placement))
        print(header(args, duts, loads), flush=True)
        idle = foreign_load(1.0)
        print(f"other processes before start: {idle:.2f} CPU", flush=True)
        bench(args, duts, loads, rec, workdir)
    except TpbError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench: interrupted; namespaces removed; what was measured:", file=sys.stderr)
        interrupted = True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    print()
    print(report.table(rec, duts))
    if any(
        i.get("foreign_cpus", 0) > report.FOREIGN_LIMIT
        for per in rec.info.values()
        for infos in per.values()
        for i in infos
    ):
        print(f"* other processes used more than {report.FOREIGN_LIMIT} CPU during that run")
    for line in report.ring_verdicts(rec, duts):
        print(line)
    for line in skipped(duts, loads):
        print(line)
    counters = report.counters(rec, duts)
    if counters:
        print()
        print(counters)
    print()
    print(report.ratios(rec, duts) or "ratios: no baseline measured in this run")
    for line in report.overload_verdicts(rec, duts):
        print(line)
    print()
    print(report.NOTES)
    for e in rec.errors:
        print(f"ERROR {e}")
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nbench: {elapsed:.0f} s; load average at the end: {loadavg}", flush=True)
    if not args.no_json:
        path = RESULTS / time.strftime("%Y%m%d-%H%M%S.json")
        meta = {
            "argv": sys.argv,
            "options": vars(args),
            "git": git_rev(),
            "kernel": platform.release(),
            "cpu": f"{os.cpu_count()} x {cpu_model()}",
            "seconds_total": elapsed,
        }
        report.write_json(path, rec, duts, meta)
        print(f"bench: results in {path}")
    return 130 if interrupted else 1 if rec.errors else 0


if __name__ == "__main__":
    sys.exit(main())
