"""The printed table, the ratios against the baselines, the JSON file."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from bench.duts import Dut
from bench.measure import median

# A measurement during which processes that are not ours used more than
# this share of one CPU is marked: the machine was not ours alone.
FOREIGN_LIMIT = 0.10


@dataclass(frozen=True)
class Metric:
    key: str
    load: str
    title: str
    fmt: str
    higher_is_better: bool


METRICS = [
    Metric("udp64_mpps", "udp64", "64 B UDP, Mpps at sink", "{:.3f}", True),
    Metric("udp64_offered_mpps", "udp64", "64 B UDP, Mpps offered", "{:.3f}", True),
    Metric("udp64_ns", "udp64", "64 B UDP, CPU ns/frame", "{:.0f}", False),
    Metric("udp64_cpu0_s_per_mframe", "udp64", "64 B, CPU 0 s/Mframe", "{:.3f}", False),
    Metric("udp64_cpu1_s_per_mframe", "udp64", "64 B, CPU 1 s/Mframe", "{:.3f}", False),
    Metric("ovl_best_mpps", "overload", "overload: best Mpps", "{:.3f}", True),
    Metric("ovl_full_mpps", "overload", "overload: Mpps at full", "{:.3f}", True),
    Metric("ovl_keep", "overload", "overload: full / best", "{:.2f}", True),
    Metric("flood_mpps", "flood", "flood: Mpps at sink", "{:.3f}", True),
    Metric("flood_ping_ok", "flood", "flood: pings answered", "{:.2f}", True),
    Metric("flood_tcp_mbps", "flood", "flood: TCP Mbit/s beside", "{:.0f}", True),
    Metric("ring_mpps", "ringcheck", "ring check, Mpps at sink", "{:.3f}", True),
    Metric("tcp_gbps", "tcp", "TCP, Gbit/s", "{:.2f}", True),
    Metric("tcp_cubic_gbps", "tcp-cubic", "TCP with CUBIC, Gbit/s", "{:.2f}", True),
    Metric("tcp_down_gbps", "tcp-down", "TCP sink -> gen, Gbit/s", "{:.2f}", True),
    Metric("rtt_us", "rtt", "idle RTT, µs", "{:.0f}", False),
]

NOTES = """\
Mpps: frames counted at the sink (rx_packets of sink:eth0) over the measured
  interval, after a warm-up; trafgen pinned to CPU 0 (-t 0, sendto mode).
  The sink drops them at its nftables ingress hook (--sink drop, the
  default): a remote sink costs the DUT nothing.  --sink icmp passes them
  to its IP stack instead, which answers ICMP port unreachable on the CPU
  that delivers to it (the kernel bridge's only CPU, TPB's second one).
  Offered: what left gen:eth0 (tx_packets) over the same interval.
Placements (--placement): NAME@default, no RPS: the DUT ports' receive work
  runs on the CPU that sent to them (the gen's CPU 0 for eth2); NAME@1core:
  RPS on dut:eth2 and dut:eth3 steers it to the DUT's CPU 1, as NIC
  interrupts on the forwarder's core would.  The generator alone: the rate
  it offers to bridge@1core, where its CPU does nothing but generate.
CPU N s/Mframe: busy seconds of CPU N (/proc/stat, per CPU) per million
  frames delivered at the sink; "busy" and "softirq" are the shares of that
  CPU over the interval.  Backlog drops: /proc/net/softnet_stat's dropped
  column, all CPUs (a CPU's input backlog over netdev_max_backlog).
overload: trafgen paced (tbf) at each --rates point, then at full speed;
  best: the most delivered at any point; full / best: what is kept when
  offered more than the DUT carries (target >= 0.9).
flood: during a full-speed flood, the gen's and the sink's ARP caches are
  flushed, then 40 pings 50 ms apart and 2 s of iperf3 TCP go through the
  DUT beside it.
CPU ns/frame: busy CPU time of the whole machine (/proc/stat user+nice+system+
  irq+softirq, both CPUs, steal excluded) during the interval, divided by the
  frames delivered at the sink; the same method for every DUT.  It includes
  the work of trafgen and of the sink, and of frames sent but dropped by the
  DUT (a DUT that drops pays for frames it does not deliver).
ring check: trafgen paced by a tbf qdisc on gen:eth0 (--qdisc-path) at half
  the DUT's median 64 B rate; kernel_drops (PACKET_STATISTICS of TPB's rings)
  must be 0.  Not trafgen -b: it sends each second's quota in one burst at
  full speed and then sleeps out the second.
TCP: iperf3 -c sink, one stream, client pinned to CPU 0 (the server is not
  pinned), first second omitted; Gbit/s received.  The machine's congestion
  control (net.ipv4.tcp_congestion_control); here that is BBR, and with it
  the gen's TCP tops out near 17-20 Gbit/s whichever DUT is in the path.
  TCP with CUBIC (-C cubic; the bench lab only) runs 2-3x faster, so the
  DUT's own cost shows more.
RTT: median of 100 pings 20 ms apart (ping pinned to CPU 0), after 5 warm-up pings.
tpb-encap: every frame leaves TPB as GRE toward 198.18.0.20 (nobody's) behind
  the sink's MAC; the sink counts it and its IP stack drops it (not its
  address), where for the plain DUTs it takes the UDP to the discard port.
  The sink's receive runs on the CPU that sent to it (TPB's, CPU 1).  And
  every frame takes TPB's selection path (nft ingress chain, then TPB's
  ETH_P_IP sockets on eth2) on the CPU that receives it at eth2: the gen's,
  CPU 0, in the default placement.
chain lab: TPB's A and B are both pinned to CPU 1; the sink's TCP and the
  ACKs back run there too.  The A—B link is a model of two NICs: each eth3
  receives through NAPI in a thread on CPU 0 (a NIC's interrupt), with GRO,
  which merges A's GRE segments for B as a NIC driver's GRO would; a pfifo
  qdisc on each holds bursts.  Without it a veth hands B one GRE packet at
  a time.  The same link for every chain DUT.  chain-kseg: the kernel's
  bridges, with the software segmentation a tunnel needs (A's eth3 has TSO
  and GSO off) but no GRE, no system call, no copy: what per-segment work
  alone allows on this machine (not pinned: the kernel forwards in the
  gen's softirq on CPU 0).
pop lab: the gen's frames go to the pop's MAC (its gateway) and are routed
  by the pop to the sink (TTL 63).  `tpb pop`, the pop's routing and the
  sink are not pinned: with 2 CPUs they share them with the gen and TPB.
  The pop's raw GRE socket drops (/proc/net/raw, read before tpb pop
  stops) are what its kernel threw away for want of receive buffer; this
  kernel then answers ICMP protocol-unreachable (rate-limited), which TPB
  counts as local_other drops.
Counters (TPB's, the pop's): at each process's exit, over its whole life
  (pings, warm-up, measured interval), not only the measured interval.
Each value: median of the runs; the raw runs follow in measurement order.
Ratios: DUT median / baseline median (for CPU ns/frame and RTT, lower is better)."""


@dataclass
class Record:
    """Every sample: results[dut][metric] = values; info[dut][load] = dicts."""

    values: dict[str, dict[str, list[float]]]
    info: dict[str, dict[str, list[dict[str, float]]]]
    errors: list[str]

    def add(self, dut: str, load: str, values: dict[str, float], info: dict[str, float]) -> None:
        for k, v in values.items():
            self.values.setdefault(dut, {}).setdefault(k, []).append(v)
        self.info.setdefault(dut, {}).setdefault(load, []).append(info)

    def med(self, dut: str, key: str) -> float:
        return median(self.values.get(dut, {}).get(key, []))


def _fmt(m: Metric, v: float) -> str:
    return "-" if math.isnan(v) else m.fmt.format(v)


def _ints(values: list[float]) -> str:
    return " ".join(str(int(v)) for v in values)


def _note(rec: Record, dut: Dut, m: Metric) -> str:
    infos = rec.info.get(dut.name, {}).get(m.load, [])
    parts: list[str] = []
    if m.key == "udp64_mpps":
        parts.append("offered " + " ".join(f"{i['offered_mpps']:.3f}" for i in infos))
    if m.key in ("udp64_mpps", "ring_mpps", "flood_mpps") and infos and "kernel_drops" in infos[0]:
        parts.append("ring drops " + _ints([i["kernel_drops"] for i in infos]))
        parts.append("TPB drops " + _ints([i["own_drops"] for i in infos]))
    if m.key in ("udp64_mpps", "flood_mpps") and infos and "backlog_drops" in infos[0]:
        parts.append("backlog drops " + _ints([i["backlog_drops"] for i in infos]))
    if m.key in ("udp64_cpu0_s_per_mframe", "udp64_cpu1_s_per_mframe") and infos:
        cpu = m.key[6:10]
        if f"{cpu}_busy" in infos[0]:
            parts.append(
                "busy "
                + " ".join(f"{i[f'{cpu}_busy']:.2f}" for i in infos)
                + ", softirq "
                + " ".join(f"{i[f'{cpu}_softirq']:.2f}" for i in infos)
            )
    if m.key == "ovl_best_mpps" and infos:
        for i in infos:
            parts.append(
                " ".join(
                    f"{k[3:-8]}:{v:.3f}->{i[k[:-8] + '_mpps']:.3f}"
                    for k, v in i.items()
                    if k.endswith("_offered")
                )
            )
    if m.key == "flood_ping_ok" and infos and "ping_ms" in infos[0]:
        parts.append("median RTT ms " + " ".join(f"{i['ping_ms']:.2f}" for i in infos))
    if m.key == "ring_mpps" and infos:
        offered = rec.values[dut.name].get("ring_offered_mpps", [])
        parts.insert(0, "offered " + " ".join(f"{v:.3f}" for v in offered))
    if m.key in ("tcp_gbps", "tcp_cubic_gbps", "tcp_down_gbps") and infos:
        parts.append("retransmits " + _ints([i["retransmits"] for i in infos]))
    if m.key == "rtt_us" and infos:
        parts.append("min " + _ints([i["rtt_min_us"] for i in infos]))
    return "; ".join(parts)


def _flag(rec: Record, dut: str, load: str, i: int) -> str:
    infos = rec.info.get(dut, {}).get(load, [])
    return "*" if i < len(infos) and infos[i].get("foreign_cpus", 0) > FOREIGN_LIMIT else ""


def table(rec: Record, duts: list[Dut]) -> str:
    w = max([6] + [len(d.name) for d in duts])
    lines = [f"{'load':<26} {'DUT':<{w}} {'median':>8}   {'runs':<24} notes"]
    for m in METRICS:
        first = True
        for d in duts:
            vals = rec.values.get(d.name, {}).get(m.key)
            if not vals:
                continue
            runs = " ".join(
                f"{_fmt(m, v)}{_flag(rec, d.name, m.load, i)}" for i, v in enumerate(vals)
            )
            lines.append(
                f"{m.title if first else '':<26} {d.name:<{w}} {_fmt(m, median(vals)):>8}   "
                f"{runs:<24} {_note(rec, d, m)}".rstrip()
            )
            first = False
    return "\n".join(lines)


def ring_verdicts(rec: Record, duts: list[Dut]) -> list[str]:
    out = []
    for d in duts:
        infos = rec.info.get(d.name, {}).get("ringcheck", [])
        if not infos:
            continue
        drops = [int(i.get("kernel_drops", -1)) for i in infos]
        target = infos[0].get("target_mpps", float("nan"))
        verdict = "OK" if all(x == 0 for x in drops) else "FAILED"
        out.append(
            f"ring-drop check {d.name} at {target:.3f} Mpps: kernel_drops "
            f"{' '.join(map(str, drops))} -> {verdict}"
        )
    return out


def counters(rec: Record, duts: list[Dut]) -> str:
    """The DUTs' own counters, per load, every run in measurement order."""
    lines = []
    for d in duts:
        for load, infos in rec.info.get(d.name, {}).items():
            rows = d.counter_lines(load, infos)
            if rows:
                lines.append(f"{d.name}, {load} (per run):")
                lines += rows
    return ("counters of the tunnel DUTs:\n" + "\n".join(lines)) if lines else ""


def measured_as(rec: Record, name: str) -> str | None:
    """The name a baseline was measured under: the chain and pop labs'
    DUTs name the bench lab's `tpb`, which runs as tpb@default (and
    tpb@1core) whenever placements are measured; the default placement,
    no RPS, is the one those labs run in."""
    for n in (name, f"{name}@default"):
        if n in rec.values:
            return n
    return None


def ratios(rec: Record, duts: list[Dut]) -> str:
    lines = []
    for d in duts:
        for wanted, targets in d.baselines.items():
            base = measured_as(rec, wanted)
            if base is None or d.name not in rec.values:
                continue
            lines.append(f"{d.name} / {base}:")
            for m in METRICS:
                a, b = rec.med(d.name, m.key), rec.med(base, m.key)
                if math.isnan(a) or math.isnan(b) or b == 0 or m.key == "ring_mpps":
                    continue
                r = a / b
                t = targets.get(m.key)
                if t:
                    verdict = f"target {t}  {'met' if t.met(r) else 'NOT MET'}"
                else:
                    verdict = "(higher is better)" if m.higher_is_better else "(lower is better)"
                lines.append(f"  {m.title:<26} {r:6.2f}×   {verdict}")
    return "\n".join(lines)


# Absolute targets (not ratios): offered more than it carries, a DUT keeps
# delivering near its best; beside the flood, pings and a TCP flow get through.
KEEP_TARGET = 0.9
PING_TARGET = 0.9


def overload_verdicts(rec: Record, duts: list[Dut]) -> list[str]:
    out = []
    for d in duts:
        keep = rec.med(d.name, "ovl_keep")
        if not math.isnan(keep):
            best, full = rec.med(d.name, "ovl_best_mpps"), rec.med(d.name, "ovl_full_mpps")
            out.append(
                f"overload {d.name}: full speed {full:.3f} Mpps, best {best:.3f}: "
                f"{keep:.2f}× (target ≥ {KEEP_TARGET}×) "
                f"{'met' if keep >= KEEP_TARGET else 'NOT MET'}"
            )
        ping = rec.med(d.name, "flood_ping_ok")
        if not math.isnan(ping):
            # judged on the worst run: a flow that moved nothing in one run
            # did not get through, whatever the median says
            pings = rec.values[d.name]["flood_ping_ok"]
            tcps = rec.values[d.name].get("flood_tcp_mbps", [])
            low_ping, low_tcp = min(pings), min(tcps, default=0.0)
            out.append(
                f"flood {d.name}: pings answered {ping:.0%}, TCP beside "
                f"{rec.med(d.name, 'flood_tcp_mbps'):.0f} Mbit/s (worst run: {low_ping:.0%}, "
                f"{low_tcp:.0f} Mbit/s; target in every run: pings ≥ {PING_TARGET:.0%}, TCP > 0) "
                f"{'met' if low_ping >= PING_TARGET and low_tcp > 0 else 'NOT MET'}"
            )
    # The generator alone: what it offers when its CPU does nothing else,
    # read as the offered rate through the kernel bridge on one core.
    gen = rec.med("bridge@1core", "udp64_offered_mpps")
    if not math.isnan(gen) and gen:
        for d in duts:
            if d.placement == "default":
                v = rec.med(d.name, "udp64_mpps")
                if not math.isnan(v):
                    out.append(
                        f"{d.name}: 64 B {v:.3f} Mpps = {v / gen:.2f}× the generator alone "
                        f"({gen:.3f} Mpps offered to bridge@1core)"
                    )
    return out


def write_json(path: Path, rec: Record, duts: list[Dut], meta: dict[str, object]) -> None:
    data = {
        "meta": meta,
        "duts": {d.name: d.description for d in duts},
        "labs": {d.name: d.topo for d in duts},
        "medians": {d: {k: median(v) for k, v in per.items()} for d, per in rec.values.items()},
        "values": rec.values,
        "info": rec.info,
        "errors": rec.errors,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
