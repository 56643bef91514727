"""`workers = N`: N C forwarding loops, each in a thread of its own, sharing
the ports' traffic by flow.

Each worker is a whole NativeBridge with its own rings, transmit queues and
counters.  The first opens its rings as new PACKET_FANOUT_HASH groups, the
others join those groups in the same order, so the kernel hands each
frame to one worker by its flow hash (symmetric: both directions of a flow
to the same worker), and the frames of a flow stay in order.  Nothing is
shared between the loops, so they need no locks; the counters are summed
when read.  Plain bridging only: a tunnel's keepalive state, sequence
numbers and reassembly belong to one loop (tpb.config refuses the rest).

Workers is what tpb.bridge, tpb.metrics and tpb.status see in place of a
NativeBridge: the same methods, counters summed over the workers.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from tpb.errors import RuntimeFailure
from tpb.native import NativeBridge, NativeXsk, PortCounters, RemoteState


def realtime(priority: int) -> None:
    """The calling thread SCHED_FIFO at `priority`.  Why: with the ports'
    receive softirq on TPB's CPU, a flood keeps ksoftirqd busy, and at the
    same priority as TPB's thread it takes half the CPU or more filling
    rings TPB has no time to empty (receive livelock).  Above ksoftirqd,
    TPB's loop runs whenever it has frames; the softirq then runs at
    interrupt exits and in TPB's own sends, and what it cannot take the
    kernel drops in its input backlog (softnet_stat), before the copy into
    a ring.  The kernel's RT throttling (sched_rt_runtime_us) still leaves
    others a share; the loop sleeps in poll() when idle."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as e:
        raise RuntimeFailure(f"priority {priority}: SCHED_FIFO: {e.strerror}") from None


class Workers:
    def __init__(
        self,
        in_ifindex: int,
        out_ifindex: int,
        n: int,
        *,
        cpus: list[int] | None = None,
        priority: int = 0,
        backend: str = "packet",
        **kw: Any,
    ) -> None:
        """n loops on the two ports (kw: NativeBridge's); cpus: the CPU of
        each worker's thread, or None to leave them to the scheduler;
        priority: SCHED_FIFO priority of the loops' threads, 0: normal."""
        if n < 1 or (cpus is not None and len(cpus) != n):
            raise ValueError(f"{n} workers, CPUs {cpus}")
        self._cpus = cpus
        self._priority = priority
        self.loops: list[NativeBridge | NativeXsk] = []
        try:
            if backend == "afxdp":
                if n != 1:
                    raise ValueError("backend afxdp runs one worker")
                kw.pop("shed", None)
                self.loops.append(NativeXsk(in_ifindex, out_ifindex, **kw))
                return
            kw.pop("names", None)
            kw.pop("busy_poll_us", None)
            if n == 1:
                self.loops.append(NativeBridge(in_ifindex, out_ifindex, **kw))
                return
            kw.pop("shed", None)  # each worker sees part of a port: one loop only
            first = NativeBridge(in_ifindex, out_ifindex, fanout=[], **kw)
            self.loops.append(first)
            ids = first.fanout_ids()
            for _ in range(n - 1):
                self.loops.append(NativeBridge(in_ifindex, out_ifindex, fanout=ids, **kw))
        except BaseException:
            self.close()
            raise

    # -- the loops ------------------------------------------------------------

    def run(self) -> None:
        """Every loop until stop(): loops 1.. in threads of their own, loop 0
        in the caller's.  If one fails, all stop, and the first failure is
        raised once all have returned."""
        failures: list[BaseException] = []

        def one(k: int) -> None:
            try:
                if self._cpus is not None:
                    os.sched_setaffinity(0, {self._cpus[k]})  # this thread only
                if self._priority:
                    realtime(self._priority)
                self.loops[k].run()
            except BaseException as e:
                failures.append(e)
                self.stop()

        threads = [
            threading.Thread(target=one, args=(k,), name=f"tpb-worker-{k}", daemon=True)
            for k in range(1, len(self.loops))
        ]
        for t in threads:
            t.start()
        one(0)
        for t in threads:
            t.join()
        if failures:
            e = failures[0]
            raise e if isinstance(e, RuntimeFailure) else RuntimeFailure(f"worker: {e}")

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()

    def heartbeat(self) -> int:
        """Moves only while every loop moves: the watchdog must see a
        single stuck worker."""
        return min(loop.heartbeat() for loop in self.loops)

    def bypass_qdisc(self, port: int, on: bool) -> None:
        for loop in self.loops:
            loop.bypass_qdisc(port, on)

    def reconfigure(self, tunnel: Any = None, sel_ifindex: int = 0, mark: int = 0) -> None:
        for loop in self.loops:
            loop.reconfigure(tunnel, sel_ifindex, mark)

    def close(self) -> None:
        for loop in self.loops:
            loop.close()

    # -- counters, summed -----------------------------------------------------

    def counters(self, port: int) -> PortCounters:
        each = [loop.counters(port) for loop in self.loops]
        return PortCounters(
            **{
                f.name: sum(getattr(c, f.name) for c in each)
                for f in dataclasses.fields(PortCounters)
            }
        )

    def per_worker(self, port: int) -> list[PortCounters]:
        return [loop.counters(port) for loop in self.loops]

    def remotes(self) -> list[RemoteState]:
        return self.loops[0].remotes()  # tunnel mode has one worker

    def tunnel_counters(self) -> dict[str, Any]:
        return self.loops[0].tunnel_counters()

    def shed_error(self) -> str:
        """Why overload shedding was asked for and could not be loaded ("")."""
        loop = self.loops[0]
        return loop.shed_error() if isinstance(loop, NativeBridge) else ""

    def zerocopy(self) -> bool | None:
        """backend afxdp: whether the sockets are zero-copy; None for packet."""
        loop = self.loops[0]
        return loop.zerocopy() if isinstance(loop, NativeXsk) else None
