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
from dataclasses import asdict
from typing import Any

from tpb.config import Settings
from tpb.errors import TpbError
from tpb.native import (
    PORT_IN,
    PORT_NAMES,
    PORT_OUT,
    NativeBridge,
    PortCounters,
    tunnel_struct,
)
from tpb.ports import Port, lookup, require_privileges, root_qdisc
from tpb.select import Selector


def summary(counters: dict[int, PortCounters], tunnel: dict[str, Any] | None = None) -> str:
    """One line: per port, frames/bytes each way and every non-zero drop;
    in tunnel mode the tunnel's packets each way and its drops too."""
    parts = []
    for port, c in counters.items():
        drops = " ".join(f"{k}={v}" for k, v in c.drops.items() if v) or "none"
        parts.append(
            f"{PORT_NAMES[port]}: rx {c.rx_frames} frames {c.rx_bytes} B, "
            f"tx {c.tx_frames} frames {c.tx_bytes} B, drops {drops}"
        )
    if tunnel and (tunnel["encap_packets"] or tunnel["decap_packets"] or tunnel["drop"]):
        drops = " ".join(f"{k}={v}" for k, v in tunnel["drop"].items()) or "none"
        parts.append(
            f"tunnel: encap {tunnel['encap_packets']} packets {tunnel['encap_bytes']} B, "
            f"decap {tunnel['decap_packets']} packets {tunnel['decap_bytes']} B, drops {drops}"
        )
    return "tpb: " + "; ".join(parts)


def write_counters(path: str, counters: dict[int, PortCounters], tunnel: dict[str, Any]) -> None:
    """The exit counters as JSON, {"in": {...}, "out": {...}, "tunnel":
    {...}}, for scripts."""
    data: dict[str, Any] = {PORT_NAMES[p]: asdict(c) for p, c in counters.items()}
    data["tunnel"] = tunnel
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError as e:
        print(f"tpb: --counters {path}: {e.strerror}", file=sys.stderr)


def run(s: Settings, counters_file: str | None = None) -> int:
    require_privileges()
    assert s.in_if and s.out_if
    ports = lookup({"in": s.in_if, "out": s.out_if})
    if s.cpu is not None:
        try:
            os.sched_setaffinity(0, {s.cpu})
        except (OSError, ValueError) as e:
            raise TpbError(f"--cpu {s.cpu}: {e}") from None
    selector = None
    qos = _pm_qos() if s.low_latency else None
    try:
        kw: dict[str, Any] = {}
        if s.tunnel:
            selector = Selector(s.in_if, ports["in"].ifindex, s.mark, s.match)
            kw = {
                "tunnel": tunnel_struct(s.tunnel, ports["out"].mtu, ports["out"].mac),
                "sel_ifindex": selector.start(),
                "mark": s.mark,
            }
        bridge = NativeBridge(
            ports["in"].ifindex,
            ports["out"].ifindex,
            ring_frames=s.ring_frames,
            batch=s.batch,
            spin_us=s.spin_us,
            **kw,
        )
        what = (
            f"tunnel {s.tunnel.local} -> {', '.join(s.tunnel.remote)}, "
            + (f"match {len(s.match)} rule(s)" if s.match else f"mark {s.mark}")
            if s.tunnel
            else "plain bridge"
        )
        watch = QdiscWatch(bridge, {PORT_IN: ports["in"], PORT_OUT: ports["out"]})
        return _loop(bridge, watch, f"{s.in_if} <-> {s.out_if} ({what})", counters_file)
    finally:
        if selector:
            selector.stop()
        if qos is not None:
            os.close(qos)


def _pm_qos() -> int:
    """Asks the kernel for zero wake-up latency (PM QoS) for as long as the
    descriptor stays open: idle CPUs poll instead of halting, so waking
    the data path costs no sleep-state exit.  The request ends with the
    process, however it ends."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
        os.write(fd, (0).to_bytes(4, "little"))
    except OSError as e:
        raise TpbError(f"--low-latency: /dev/cpu_dma_latency: {e.strerror}") from None
    return fd


class QdiscWatch:
    """Keeps each port's qdisc bypass in step with its root qdisc, read
    again every half second: frames skip it only while it is noqueue (a
    veth's), where skipping changes nothing.  Behind a qdisc that queues
    (a NIC's mq or fq_codel, an operator's shaper) they would overtake
    their own flow's super-packets queued there, and escape the shaping."""

    def __init__(self, bridge: NativeBridge, ports: dict[int, Port]) -> None:
        from pyroute2 import IPRoute  # slow to import: only when needed
        from pyroute2.netlink.exceptions import NetlinkError

        self._ipr = IPRoute()
        self._gone = (NetlinkError, OSError)
        self._bridge = bridge
        self._ports = ports
        self._kind: dict[int, str | None] = {}

    def check(self) -> None:
        for p, port in self._ports.items():
            try:
                kind = root_qdisc(self._ipr, port.ifindex)
            except self._gone:
                continue  # the port is going away; the loop will say so
            if p in self._kind and kind == self._kind[p]:
                continue
            bypass = kind == "noqueue"
            self._bridge.bypass_qdisc(p, bypass)
            if p in self._kind or not bypass:
                how = "frames skip it" if bypass else "every frame goes through it"
                print(
                    f"tpb: {port.name}: root qdisc {kind or 'none'}: {how}",
                    file=sys.stderr,
                    flush=True,
                )
            self._kind[p] = kind

    def close(self) -> None:
        self._ipr.close()


def _loop(bridge: NativeBridge, watch: QdiscWatch, what: str, counters_file: str | None) -> int:
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

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=loop, name="tpb-loop", daemon=True)
    try:
        watch.check()
        worker.start()
        print(f"tpb: bridging {what} (ctrl-c to stop)", file=sys.stderr, flush=True)
        while not stopping.wait(0.5):
            watch.check()
    finally:
        bridge.stop()
        if worker.ident is not None:
            worker.join()
        watch.close()
        for sig, h in old.items():
            signal.signal(sig, h)
        counters = {p: bridge.counters(p) for p in (PORT_IN, PORT_OUT)}
        tunnel = bridge.tunnel_counters()
        bridge.close()
        print(summary(counters, tunnel), flush=True)
        if counters_file:
            write_counters(counters_file, counters, tunnel)
    if failure:
        raise failure[0]
    return 0
