"""`tpb run`: open the ports, run the C loop in a thread, stop on a signal.

Python's part is the life cycle.  The loop itself is one C call that
releases the GIL and returns only when asked to stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass

from tpb.errors import TpbError
from tpb.native import PORT_IN, PORT_NAMES, PORT_OUT, NativeBridge, PortCounters
from tpb.ports import lookup, require_privileges


@dataclass
class RunOptions:
    in_if: str
    out_if: str
    cpu: int | None = None
    ring_frames: int = 1024
    batch: int = 64
    spin_us: int = 50
    counters_file: str | None = None


def summary(counters: dict[int, PortCounters]) -> str:
    """One line: per port, frames/bytes each way and every non-zero drop."""
    parts = []
    for port, c in counters.items():
        drops = " ".join(f"{k}={v}" for k, v in c.drops.items() if v) or "none"
        parts.append(
            f"{PORT_NAMES[port]}: rx {c.rx_frames} frames {c.rx_bytes} B, "
            f"tx {c.tx_frames} frames {c.tx_bytes} B, drops {drops}"
        )
    return "tpb: " + "; ".join(parts)


def write_counters(path: str, counters: dict[int, PortCounters]) -> None:
    """The exit counters as JSON, {"in": {...}, "out": {...}}, for scripts."""
    data = {PORT_NAMES[p]: asdict(c) for p, c in counters.items()}
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError as e:
        print(f"tpb: --counters {path}: {e.strerror}", file=sys.stderr)


def run(opts: RunOptions) -> int:
    require_privileges()
    ports = lookup({"in": opts.in_if, "out": opts.out_if})
    if opts.cpu is not None:
        try:
            os.sched_setaffinity(0, {opts.cpu})
        except (OSError, ValueError) as e:
            raise TpbError(f"--cpu {opts.cpu}: {e}") from None
    bridge = NativeBridge(
        ports["in"].ifindex,
        ports["out"].ifindex,
        ring_frames=opts.ring_frames,
        batch=opts.batch,
        spin_us=opts.spin_us,
    )
    failure: list[BaseException] = []
    stopping = threading.Event()

    def loop() -> None:
        try:
            bridge.run()
        except BaseException as e:  # reported by the main thread
            failure.append(e)
        finally:
            stopping.set()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=loop, name="tpb-loop", daemon=True)
    try:
        worker.start()
        print(
            f"tpb: bridging {opts.in_if} <-> {opts.out_if} (ctrl-c to stop)",
            file=sys.stderr,
            flush=True,
        )
        while not stopping.wait(0.5):
            pass
    finally:
        bridge.stop()
        worker.join()
        for s, h in old.items():
            signal.signal(s, h)
        counters = {p: bridge.counters(p) for p in (PORT_IN, PORT_OUT)}
        bridge.close()
        print(summary(counters), flush=True)
        if opts.counters_file:
            write_counters(opts.counters_file, counters)
    if failure:
        raise failure[0]
    return 0
