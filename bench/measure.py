"""What the loads read: interface counters inside a namespace, the
machine's CPU time, the CPU time of processes that are not ours.

Counters inside a namespace are read through /proc/PID/net/dev of a
process living in that namespace (an anchor), so a reading costs no
fork and can be timed to the microsecond.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class IfStats:
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int


def ifstats(anchor_pid: int, ifname: str) -> IfStats:
    """Counters of ifname in the namespace of process anchor_pid."""
    with open(f"/proc/{anchor_pid}/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                v = [int(x) for x in rest.split()]
                return IfStats(rx_packets=v[1], rx_bytes=v[0], tx_packets=v[9], tx_bytes=v[8])
    raise KeyError(f"no interface {ifname} in the namespace of pid {anchor_pid}")


@dataclass(frozen=True)
class CpuTimes:
    """Seconds since boot, all CPUs together."""

    busy: float  # user + nice + system + irq + softirq
    steal: float
    total: float
    softirq: float = 0.0  # part of busy (per CPU only)


def cpu_times() -> CpuTimes:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    busy = user + nice + system + irq + softirq
    return CpuTimes(
        busy=busy / CLK_TCK,
        steal=steal / CLK_TCK,
        total=(busy + idle + iowait + steal) / CLK_TCK,
    )


def cpu_times_each() -> list[CpuTimes]:
    """Per CPU (cpu0, cpu1, ...), as cpu_times() for the whole machine but
    niced time counted as idle: where the work of a placement lands (the
    receive softirq on the sender's CPU or on the DUT's) shows only CPU by
    CPU."""
    out: list[CpuTimes] = []
    with open("/proc/stat") as f:
        for line in f:
            name, *rest = line.split()
            if not name.startswith("cpu"):
                break
            if name == "cpu":
                continue
            v = [int(x) for x in rest]
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            # without nice: the niced fuzzers others run beside the bench
            # soak up idle time, which would read as the DUT's cost
            busy = user + system + irq + softirq
            idle += nice
            out.append(
                CpuTimes(
                    busy=busy / CLK_TCK,
                    steal=steal / CLK_TCK,
                    total=(busy + idle + iowait + steal) / CLK_TCK,
                    softirq=softirq / CLK_TCK,
                )
            )
    return out


def backlog_drops() -> int:
    """Frames the kernel dropped at a CPU's receive backlog (RPS or
    netif_rx queue over net.core.netdev_max_backlog), all CPUs: the
    second column of /proc/net/softnet_stat.  Machine-wide, not per
    namespace: other engineers' traffic would count too (rarely any)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def _proc_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (ppid, flags, CPU seconds) of every process: its own user and
    system time and that of its children it has reaped, so that short-lived
    processes count too, through their parents."""
    out: dict[int, tuple[int, int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces
        v = text[text.rfind(")") + 2 :].split()
        ticks = sum(int(x) for x in v[11:15])  # utime stime cutime cstime
        out[int(d)] = (int(v[1]), int(v[6]), ticks / CLK_TCK)
    return out


def _ours(table: dict[int, tuple[int, int, float]]) -> set[int]:
    """This process and all its descendants."""
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _flags, _t) in table.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return ours


class ForeignCpu:
    """CPU seconds spent by user-space processes that are not ours (another
    test suite, a VM...) between start() and stop(): a measurement that
    shares the machine with them is not worth much."""

    def __init__(self) -> None:
        self._t0: dict[int, tuple[int, float]] = {}
        self._busy0 = 0.0
        self.top: list[tuple[float, str]] = []  # after stop(): (seconds, command), largest first

    @staticmethod
    def _sample() -> dict[int, tuple[int, float]]:
        table = _proc_table()
        ours = _ours(table)
        return {
            pid: (ppid, t)
            for pid, (ppid, flags, t) in table.items()
            if pid not in ours and not flags & PF_KTHREAD
        }

    def start(self) -> None:
        self._busy0 = cpu_times().busy
        self._t0 = self._sample()

    def stop(self) -> float:
        t0, t1 = self._t0, self._sample()
        busy = cpu_times().busy - self._busy0
        # a process born during the interval counts from zero
        used = {pid: t - t0.get(pid, (0, 0.0))[1] for pid, (_ppid, t) in t1.items()}
        # One that ended was reaped by its parent (or the parent's parent...,
        # the first still alive), whose children's time now holds all of the
        # child's: take off what the child had used before.
        for pid, (ppid, t) in t0.items():
            if pid in t1:
                continue
            while ppid not in t1 and ppid in t0:
                ppid = t0[ppid][0]
            if ppid in used:
                used[ppid] -= t
        self.top = sorted(((t, _comm(pid)) for pid, t in used.items() if t > 0), reverse=True)[:3]
        # never more than the whole machine was busy
        return min(busy, max(0.0, sum(used.values())))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"{f.read().strip()}[{pid}]"
    except OSError:
        return f"[{pid}]"


def foreign_load(seconds: float = 0.5) -> float:
    """Fraction of one CPU used by processes not ours over `seconds`."""
    f = ForeignCpu()
    f.start()
    time.sleep(seconds)
    return f.stop() / seconds


def wait_quiet(
    limit: float, max_wait: float, on_wait: Callable[[float], None] | None = None
) -> float:
    """Wait (up to max_wait seconds) until processes not ours use less than
    `limit` of one CPU; returns the last load seen."""
    deadline = time.monotonic() + max_wait
    load = foreign_load()
    told = False
    while load > limit and time.monotonic() < deadline:
        if on_wait and not told:
            on_wait(load)
            told = True
        time.sleep(1.0)
        load = foreign_load()
    return load


def any_cpu() -> None:
    """For preexec_fn: a child may run anywhere, whatever the harness's CPU."""
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")
