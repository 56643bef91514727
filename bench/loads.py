"""The loads: each measures one DUT once and returns a Sample.

All traffic goes gen -> DUT -> sink (in the pop lab gen -> DUT -> pop ->
sink).  The generator side (trafgen, the iperf3 client, ping) is pinned to
CPU 0; a DUT that has a process of its own pins it to CPU 1.  The sink's
counters and the machine's CPU time are read at the two ends of a measured
interval that starts after a warm-up.  Before the frames, a few pings
check the path (not through a DUT the sink cannot answer through, as
tpb-encap); the frames must then be seen at the sink.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.duts import Dut
from bench.frames import trafgen_cfg, udp_frame
from bench.measure import (
    ForeignCpu,
    any_cpu,
    backlog_drops,
    cpu_times,
    cpu_times_each,
    ifstats,
    median,
)
from bench.topo import Topo
from tpb.errors import TpbError
from tpb.lab import Lab

GEN_CPU = "0"
UDP_PORT = 9  # discard
FRAME_LEN = 60  # 64 bytes on the wire with the FCS


@dataclass
class Sample:
    values: dict[str, float]  # metric key -> value
    info: dict[str, float] = field(default_factory=dict)  # DUT counters, context
    others: str = ""  # the processes not ours that used the most CPU meanwhile


def _others(f: ForeignCpu, dt: float) -> str:
    return ", ".join(f"{comm} {t / dt:.2f}" for t, comm in f.top)


@dataclass
class Env:
    """What every load needs: the lab, its topology, its anchors, the options."""

    lab: Lab
    topo: Topo
    workdir: Path
    seconds: float
    warmup: float
    sink_drop: bool = True  # the sink discards the UDP frames at ingress
    rates: tuple[float, ...] = ()  # Mpps of the overload sweep's paced points
    flows: int = 1  # UDP flows of the 64-byte load, sent in turn
    anchors: dict[str, int] = field(default_factory=dict)  # node -> pid living there
    trafgen_cfg: Path = Path()

    def start(self) -> None:
        """Anchors in the end nodes (to read counters through /proc/PID/net),
        the iperf3 server, the trafgen configuration."""
        for node in ("gen", "sink"):
            p = self.lab.spawn(node, ["sleep", "infinity"], start_new_session=True)
            self.anchors[node] = p.pid
        self.lab.spawn(
            "sink",
            ["iperf3", "-s", "-B", self.topo.sink_ip],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=any_cpu,  # not pinned, unlike the harness (CPU 0)
        )
        # to the sink's IP address and to the gen's next hop's MAC: the
        # sink's own, or the pop's (a router)
        gen, hop = self.lab.iface("gen", "eth0"), self.lab.iface(*self.topo.next_hop)
        # flows differ in their UDP source port (one flow: the discard
        # port's own), so that a DUT sharing flows over workers can
        frames = [
            udp_frame(
                hop.mac,
                gen.mac,
                self.topo.gen_ip,
                self.topo.sink_ip,
                size=FRAME_LEN,
                port=UDP_PORT,
                sport=UDP_PORT if self.flows == 1 else 10000 + i,
            )
            for i in range(self.flows)
        ]
        self.trafgen_cfg = self.workdir / f"udp64-{self.topo.name}.cfg"
        self.trafgen_cfg.write_text(trafgen_cfg(frames))
        if self.sink_drop:
            # counted in rx_packets (by the veth peer's transmit), then
            # dropped before the sink's IP stack: the sink costs next to
            # nothing (GRE: what tpb-encap sends it)
            nft = ["nft", "-f", "-"]
            rules = (
                "table netdev bench {\n chain ingress {\n"
                "  type filter hook ingress device eth0 priority 0;\n"
                f"  udp dport {UDP_PORT} drop\n  ip protocol gre drop\n }}\n}}\n"
            )
            res = subprocess.run(
                self.lab.cmd("sink", nft), input=rules, capture_output=True, text=True
            )
            if res.returncode:
                raise TpbError(f"sink: nft: {res.stderr.strip()}")

    def ping_ok(self, count: int = 3, wait: float = 5.0) -> None:
        """The DUT forwards: a few pings make it (ARP resolved, FDB learnt)."""
        deadline = time.monotonic() + wait
        while True:
            res = self.lab.run(
                "gen",
                ["ping", "-c", str(count), "-i", "0.05", "-W", "1", self.topo.sink_ip],
                check=False,
            )
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TpbError(f"gen cannot ping sink through the DUT: {res.stdout.strip()}")

    def sink_rx(self) -> int:
        return ifstats(self.anchors["sink"], "eth0").rx_packets

    def gen_tx(self) -> int:
        return ifstats(self.anchors["gen"], "eth0").tx_packets


def _stop_group(p: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Stop a process started in its own session, with all its children
    (trafgen forks its workers: signalling the parent alone leaves them)."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    try:  # workers that outlived their parent
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _trafgen(env: Env, pps: int | None) -> subprocess.Popen:
    """trafgen on gen:eth0, pinned to CPU 0, in sendto mode (-t 0: its TX
    ring mode collapses here).  At full speed it bypasses the qdisc; at a
    given rate a tbf qdisc on gen:eth0 paces it (trafgen's own -b sends
    each second's quota in one burst at full speed, then sleeps out the
    second: no good for a check below a DUT's rate)."""
    argv = ["taskset", "-c", GEN_CPU, "trafgen", "--cpus", "1", "-t", "0"]
    # leave the machine's socket memory and IRQ affinities alone
    argv += ["--no-sock-mem", "--notouch-irq", "-i", str(env.trafgen_cfg), "-o", "eth0"]
    if pps:
        bits = pps * FRAME_LEN * 8  # tbf counts the frame without its FCS
        env.lab.run(
            "gen",
            f"tc qdisc replace dev eth0 root tbf rate {bits}bit burst 1600 latency 1ms",
        )
        argv.append("--qdisc-path")
    else:
        env.lab.run("gen", "tc qdisc del dev eth0 root", check=False)
    return env.lab.spawn(
        "gen", argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _blast(
    env: Env,
    dut: Dut,
    pps: int | None,
    beside: Callable[[], dict[str, float]] | None = None,
) -> tuple[dict[str, float], str]:
    """trafgen 60-byte frames (64 on the wire) for warm-up + seconds; count
    over the measured interval.  Per CPU: busy seconds per million frames
    delivered (cpuN_s_per_mframe) and the share of that CPU spent in
    softirq (cpuN_softirq).  beside: run during the measured interval
    instead of sleeping through it (its values are added)."""
    side: dict[str, float] = {}
    if dut.pingable:
        env.ping_ok()
    tg = _trafgen(env, pps)
    try:
        checks = (("trafgen sends nothing", env.gen_tx), ("no frame reaches the sink", env.sink_rx))
        for what, count in checks:
            c0 = count()
            deadline = time.monotonic() + 5
            while count() == c0:
                if tg.poll() is not None or time.monotonic() > deadline:
                    err = tg.stderr.read().decode(errors="replace") if tg.stderr else ""
                    raise TpbError(f"{what}: {err.strip()[-300:]}" if err else what)
                time.sleep(0.01)
        time.sleep(env.warmup)
        foreign = ForeignCpu()
        foreign.start()
        t0, c0, r0, g0 = time.monotonic(), cpu_times(), env.sink_rx(), env.gen_tx()
        e0, b0 = cpu_times_each(), backlog_drops()
        if beside is not None:
            side = beside()
        else:
            time.sleep(env.seconds)
        t1, c1, r1, g1 = time.monotonic(), cpu_times(), env.sink_rx(), env.gen_tx()
        e1, b1 = cpu_times_each(), backlog_drops()
        other = foreign.stop()
    finally:
        _stop_group(tg)
        if pps:
            env.lab.run("gen", "tc qdisc del dev eth0 root", check=False)
    dt = t1 - t0
    frames = r1 - r0
    busy = c1.busy - c0.busy
    out = {
        "mpps": frames / dt / 1e6,
        "offered_mpps": (g1 - g0) / dt / 1e6,
        "ns_per_frame": busy / frames * 1e9 if frames else float("nan"),
        "busy_cpus": busy / dt,
        "steal_cpus": (c1.steal - c0.steal) / dt,
        "foreign_cpus": other / dt,
        "backlog_drops": float(b1 - b0),
    }
    for i, (a, b) in enumerate(zip(e0, e1, strict=True)):
        cpu_busy = b.busy - a.busy
        out[f"cpu{i}_s_per_mframe"] = cpu_busy / frames * 1e6 if frames else float("nan")
        out[f"cpu{i}_busy"] = cpu_busy / dt
        out[f"cpu{i}_softirq"] = (b.softirq - a.softirq) / dt
    return {**out, **side}, _others(foreign, dt)


PER_CPU = ("cpu0_s_per_mframe", "cpu1_s_per_mframe")
CONTEXT = (
    "offered_mpps",
    "busy_cpus",
    "steal_cpus",
    "foreign_cpus",
    "backlog_drops",
    "cpu0_busy",
    "cpu1_busy",
    "cpu0_softirq",
    "cpu1_softirq",
)


def udp64(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """64-byte UDP frames from trafgen at full speed."""
    del results
    r, others = _blast(env, dut, None)
    return Sample(
        {
            "udp64_mpps": r["mpps"],
            "udp64_offered_mpps": r["offered_mpps"],
            "udp64_ns": r["ns_per_frame"],
            **{f"udp64_{k}": r[k] for k in PER_CPU if k in r},
        },
        {k: r[k] for k in CONTEXT if k in r},
        others,
    )


def overload(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """The DUT offered more than it carries: trafgen paced at each of
    env.rates Mpps, then at full speed.  best: the most delivered at any
    point; keep: what full speed delivers over that (no collapse: near 1)."""
    del results
    points: dict[str, float] = {}
    for pps in [*(int(r * 1e6) for r in env.rates), None]:
        r, _others_ = _blast(env, dut, pps)
        tag = f"{pps / 1e6:g}" if pps else "full"
        points[f"at_{tag}_offered"] = r["offered_mpps"]
        points[f"at_{tag}_mpps"] = r["mpps"]
    delivered = [v for k, v in points.items() if k.endswith("_mpps")]
    best, full = max(delivered), points["at_full_mpps"]
    return Sample(
        {"ovl_best_mpps": best, "ovl_full_mpps": full, "ovl_keep": full / best if best else 0.0},
        points,
    )


FLOOD_PINGS = 40


def flood(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """Beside a full-speed 64-byte flood: the gen's and the sink's ARP
    caches flushed (the next packet each way needs ARP through the DUT),
    then pings and a TCP flow (iperf3, 2 s) through it."""
    del results
    lab, sink = env.lab, env.topo.sink_ip

    def beside() -> dict[str, float]:
        for node in ("gen", "sink"):
            lab.run(node, "ip neigh flush dev eth0", check=False)
        res = lab.run(
            "gen",
            ["ping", "-c", str(FLOOD_PINGS), "-i", "0.05", "-W", "1", sink],
            check=False,
            timeout=FLOOD_PINGS * 0.05 + 30,
        )
        got = len(_RTT.findall(res.stdout))
        times = [float(m) * 1000 for m in _RTT.findall(res.stdout)]
        argv = ["taskset", "-c", GEN_CPU, "iperf3", "-c", sink, "-J", "-t", "2"]
        try:
            tcp = lab.run("gen", argv, check=False, timeout=40)
            data = json.loads(tcp.stdout)
            mbps = data["end"]["sum_received"]["bits_per_second"] / 1e6
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
            mbps = 0.0  # no connection, or none that ended: nothing got through
        return {
            "ping_ok": got / FLOOD_PINGS,
            "ping_ms": median(times) / 1000 if times else float("nan"),
            "tcp_mbps": mbps,
        }

    r, others = _blast(env, dut, None, beside)
    return Sample(
        {
            "flood_mpps": r["mpps"],
            "flood_ping_ok": r["ping_ok"],
            "flood_tcp_mbps": r["tcp_mbps"],
        },
        {k: r[k] for k in (*CONTEXT, "ping_ms") if k in r},
        others,
    )


RING_CHECK_SHARE = 0.5


def ring_rate(dut: Dut, results: dict[str, dict[str, list[float]]]) -> int | None:
    """Half the DUT's measured 64-byte rate, in frames per second."""
    runs = results.get(dut.name, {}).get("udp64_mpps")
    if not runs:
        return None
    return int(median(runs) * RING_CHECK_SHARE * 1e6)


def ringcheck(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """trafgen rate-limited to half the DUT's 64-byte rate: the DUT's ring
    must drop nothing (kernel_drops, added by the DUT's teardown)."""
    pps = ring_rate(dut, results)
    if pps is None:
        raise TpbError(f"{dut.name}: ring check needs its 64-byte rate (load udp64)")
    r, others = _blast(env, dut, pps)
    return Sample(
        {"ring_offered_mpps": r["offered_mpps"], "ring_mpps": r["mpps"]},
        {"target_mpps": pps / 1e6, "busy_cpus": r["busy_cpus"], "foreign_cpus": r["foreign_cpus"]},
        others,
    )


def tcp(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """iperf3 gen -> sink, one stream, offloads as they come (TSO on), the
    machine's congestion control."""
    del dut, results
    return _iperf3(env, "tcp_gbps", [])


def tcp_cubic(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """The same with CUBIC.  This machine's default is BBR, with which the
    gen's TCP tops out near 17-20 Gbit/s whichever DUT is in the path;
    CUBIC runs 2-3x faster, so the DUT's own cost shows more."""
    del dut, results
    return _iperf3(env, "tcp_cubic_gbps", ["-C", "cubic"])


def tcp_down(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """iperf3 sink -> gen (-R), the pop lab only: the download a site
    behind `tpb pop` makes, which reaches the POP through its TUN device."""
    del dut, results
    return _iperf3(env, "tcp_down_gbps", ["-R"])


def _iperf3(env: Env, key: str, extra: list[str]) -> Sample:
    env.ping_ok()
    omit = max(1, round(env.warmup))
    argv = ["taskset", "-c", GEN_CPU, "iperf3", "-c", env.topo.sink_ip, "-J", *extra]
    argv += ["-t", str(max(1, round(env.seconds))), "-O", str(omit)]
    foreign = ForeignCpu()
    foreign.start()
    t0 = time.monotonic()
    res = env.lab.run("gen", argv, check=False, timeout=env.seconds + omit + 30)
    dt = time.monotonic() - t0
    other = foreign.stop()
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        data = {"error": (res.stderr or res.stdout).strip()[-300:]}
    if "error" in data:
        raise TpbError(f"iperf3: {data['error']}")
    end = data["end"]
    return Sample(
        {key: end["sum_received"]["bits_per_second"] / 1e9},
        {
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "foreign_cpus": other / dt,
        },
        _others(foreign, dt),
    )


_RTT = re.compile(r"time=([\d.]+) ms")
# 100, not 20: with 20 pings a run's median swung between 15 and 77 us
# with the host's phases, through the bridge and through TPB alike, and
# one run's ratio read 3.6x where the runs around it read 0.5x.  Over 100
# pings TPB read 16-44 us and the bridge 11-70 (18 runs): the host still
# moves the bridge, but no run hangs on a handful of pings.  20 ms apart
# is still idle (50 pings a second).
RTT_PINGS = 100


def rtt(env: Env, dut: Dut, results: dict[str, dict[str, list[float]]]) -> Sample:
    """Idle round trip: RTT_PINGS pings 20 ms apart after a warm-up; the median."""
    del dut, results
    env.ping_ok(count=5)
    foreign = ForeignCpu()
    foreign.start()
    t0 = time.monotonic()
    res = env.lab.run(
        "gen",
        ["taskset", "-c", GEN_CPU, "ping", "-c", str(RTT_PINGS), "-i", "0.02", "-W", "1"]
        + [env.topo.sink_ip],
        check=False,
    )
    dt = time.monotonic() - t0
    other = foreign.stop()
    times = [float(m) * 1000 for m in _RTT.findall(res.stdout)]
    if len(times) < RTT_PINGS * 3 // 4:
        raise TpbError(f"ping: {len(times)}/{RTT_PINGS} replies: {res.stdout.strip()[-200:]}")
    return Sample(
        {"rtt_us": median(times)},
        {"rtt_min_us": min(times), "rtt_max_us": max(times), "foreign_cpus": other / dt},
        _others(foreign, dt),
    )


@dataclass(frozen=True)
class Load:
    name: str
    title: str
    run: Callable[[Env, Dut, dict[str, dict[str, list[float]]]], Sample]
    applies: Callable[[Dut], bool] = lambda dut: True


LOADS = [
    Load("udp64", "64-byte UDP frames, trafgen at full speed", udp64),
    Load(
        "ringcheck",
        f"ring-drop check: trafgen at {RING_CHECK_SHARE:.0%} of the DUT's 64-byte rate",
        ringcheck,
        lambda dut: dut.ring_check,
    ),
    Load("tcp", "TCP, iperf3, one stream, offloads on", tcp),
    Load(
        "tcp-cubic",
        "TCP as above with CUBIC, plain bridging only",
        tcp_cubic,
        lambda dut: dut.topo == "bench" and dut.pingable,
    ),
    Load(
        "tcp-down",
        "TCP sink -> gen (iperf3 -R), the pop lab only",
        tcp_down,
        lambda dut: dut.topo == "pop",
    ),
    Load("rtt", f"idle RTT, ping, {RTT_PINGS} x 20 ms", rtt),
    Load(
        "overload",
        "64 B paced at the --rates, then at full speed: best and kept rate",
        overload,
        lambda dut: dut.topo == "bench" and dut.pingable,
    ),
    Load(
        "flood",
        f"beside a full-speed 64 B flood: ARP, {FLOOD_PINGS} pings, 2 s of TCP",
        flood,
        lambda dut: dut.topo == "bench" and dut.pingable,
    ),
]
