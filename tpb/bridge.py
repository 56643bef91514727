"""`tpb run`: the bridge between --in and --out, as a service.Daemon.

Python's part is the life cycle: check the host, open the ports (and, in
tunnel mode, the selection table and its veth pair), hand the C loop its
configuration, keep the qdisc bypass in step, log keepalive changes,
reload on SIGHUP, and print the counters at exit.  The loop itself is one
C call that releases the GIL and returns only when asked to stop.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

from tpb import config, metrics, status
from tpb.config import ConfigError, PortsNotReady, Settings, Source
from tpb.errors import RuntimeFailure, TpbError
from tpb.log import log, set_level
from tpb.metrics import Closeable
from tpb.native import (
    PORT_IN,
    PORT_NAMES,
    PORT_OUT,
    PortCounters,
    tunnel_struct,
)
from tpb.nftguard import TableGuard
from tpb.ports import Port, host_addresses, lookup, refresh, require_privileges, root_qdisc
from tpb.select import Selector
from tpb.service import (
    Served,
    StateLog,
    counters_file_problem,
    keepalive_retries,
    serve,
    serve_metrics,
    serve_status,
)
from tpb.service import write_counters as write_counters_json
from tpb.workers import Workers

# What a reload cannot change: the rings are sized and bound at open.
RESTART_SETTINGS = (
    "ports.in",
    "ports.out",
    "bridge.cpu",
    "bridge.ring_frames",
    "bridge.batch",
    "bridge.spin_us",
    "bridge.workers",
    "bridge.backend",
    "bridge.busy_poll",
    "bridge.priority",
    "bridge.shed",
)
# backend afxdp: a frame fits one 4 KB UMEM chunk after the kernel's 256
# bytes of XDP headroom (3840 bytes), an 802.1Q tag included.
AFXDP_MAX_MTU = 4096 - 256 - 18
MIN_IPV4_MTU = 68  # RFC 791: every IPv4 host must take a packet this large
MIN_IPV6_MTU = 1280  # RFC 8200


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


def write_counters(
    path: str,
    counters: dict[int, PortCounters],
    tunnel: dict[str, Any],
    per_worker: list[dict[int, PortCounters]] | None = None,
) -> None:
    """The exit counters as JSON, {"in": {...}, "out": {...}, "tunnel":
    {...}}, for scripts; with more than one worker also "workers": each
    one's ports, whose sum "in" and "out" are.  RuntimeFailure if the file
    cannot be written."""
    data: dict[str, Any] = {PORT_NAMES[p]: asdict(c) for p, c in counters.items()}
    data["tunnel"] = tunnel
    if per_worker is not None and len(per_worker) > 1:
        data["workers"] = [
            {PORT_NAMES[p]: asdict(c) for p, c in w.items()} for w in per_worker
        ]
    write_counters_json(path, data)


# ---- the checks before a port is opened (`tpb run` and `tpb check`) --------


def overhead(t: config.Tunnel) -> int:
    """Bytes the tunnel adds: outer IPv4 (20) + GRE (4) + key, checksum and
    sequence number (4 each), + UDP (8) with GRE-in-UDP."""
    return 24 + 4 * ((t.key is not None) + t.csum + t.seq) + (8 if t.encap == "udp" else 0)


def tunnel_problems(
    s: Settings, src: Source, out: Port | None, addresses: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the tunnel settings on this host.

    - the tunnel address must not be an address of this host: TPB answers
      ARP and ping for it itself, and the host would answer too (and
      refuse the POP's GRE with ICMP);
    - no POP may be this host;
    - --out's MTU must leave room for the smallest IPv4 packet (68 bytes)
      inside the tunnel; below IPv6's 1280, IPv6 through the tunnel still
      works but every large packet goes as outer fragments: a warning.
    """
    problems: list[str] = []
    warnings: list[str] = []
    t = s.tunnel
    if t is None:
        return problems, warnings
    if t.local in addresses:
        problems.append(
            f"{src.where('tunnel', 'local')}: tunnel.local {t.local} is an address of this "
            f"host ({addresses[t.local]}): TPB answers for it itself on --out; remove it "
            "there or choose another"
        )
    for r in t.remote:
        if r in addresses:
            problems.append(
                f"{src.where('tunnel', 'remote')}: tunnel.remote {r} is an address of this "
                f"host ({addresses[r]}), not a POP"
            )
    if out is not None:
        room = out.mtu - overhead(t)
        if room < MIN_IPV4_MTU:
            problems.append(
                f"--out {out.name}: MTU {out.mtu} leaves {room} bytes inside the tunnel "
                f"(overhead {overhead(t)}); at least {MIN_IPV4_MTU + overhead(t)} is needed"
            )
        elif room < MIN_IPV6_MTU:
            warnings.append(
                f"--out {out.name}: MTU {out.mtu} leaves {room} bytes inside the tunnel, "
                f"below IPv6's {MIN_IPV6_MTU}: tunneled IPv6 goes as outer fragments"
            )
    return problems, warnings


def preflight(s: Settings, src: Source, counters_file: str | None) -> tuple[dict[str, Port],
                                                                             list[str]]:
    """Every check `tpb run` makes before it opens anything, after the
    settings themselves (`tpb check` makes the same ones): the ports
    (present, distinct, not loopback, up), the tunnel addresses and MTU,
    the CPU, the PM QoS device, the --counters file.  Returns the ports
    and warnings; ConfigError with every problem."""
    assert s.in_if and s.out_if
    problems: list[str] = []
    warnings: list[str] = []
    ports: dict[str, Port] = {}
    not_ready = False
    try:
        ports = lookup({"in": s.in_if, "out": s.out_if})
    except ConfigError as e:
        problems += e.problems
        not_ready = isinstance(e, PortsNotReady)
    n_port_problems = len(problems)
    if s.tunnel is not None:
        p, w = tunnel_problems(s, src, ports.get("out"), host_addresses())
        problems += p
        warnings += w
    if s.cpu is not None:
        allowed = os.sched_getaffinity(0)
        want = range(s.cpu, s.cpu + s.workers)
        if not set(want) <= allowed:
            shown = ",".join(map(str, sorted(allowed)))
            what = (f"{s.cpu}: not a CPU" if s.workers == 1 else
                    f"{s.cpu} with {s.workers} workers: CPUs {want[0]}-{want[-1]} are not CPUs")
            problems.append(f"{src.where('bridge', 'cpu')} {what} this process may run on "
                            f"(allowed: {shown})")
    if s.low_latency and not os.access(PM_QOS, os.W_OK):
        problems.append(f"{src.where('bridge', 'low_latency')}: {PM_QOS}: not writable "
                        "(--no-low-latency runs without)")
    if (why := counters_file_problem(counters_file)) is not None:
        problems.append(why)
    if problems:
        # only a port missing or down: the host may not be ready yet (exit 3)
        raise (PortsNotReady if not_ready and len(problems) == n_port_problems
               else ConfigError)(problems)
    return ports, warnings


PM_QOS = "/dev/cpu_dma_latency"


def _pm_qos() -> int:
    """Asks the kernel for zero wake-up latency (PM QoS) for as long as the
    descriptor stays open: idle CPUs poll instead of halting, so waking
    the data path costs no sleep-state exit.  The request ends with the
    process, however it ends."""
    try:
        fd = os.open(PM_QOS, os.O_WRONLY)
        os.write(fd, (0).to_bytes(4, "little"))
    except OSError as e:
        raise TpbError(f"--low-latency: {PM_QOS}: {e.strerror}") from None
    return fd


class QdiscWatch:
    """Keeps each port's qdisc bypass in step with its root qdisc, read
    again every half second: frames skip it only while it is noqueue (a
    veth's), where skipping changes nothing.  Behind a qdisc that queues
    (a NIC's mq or fq_codel, an operator's shaper) they would overtake
    their own flow's super-packets queued there, and escape the shaping.

    A port that went away ends TPB (RuntimeFailure, exit 1): its ring
    sees nothing any more, and a port of the same name made later is
    another interface."""

    def __init__(self, bridge: Workers, ports: dict[int, Port]) -> None:
        from pyroute2 import IPRoute  # slow to import: only when needed
        from pyroute2.netlink.exceptions import NetlinkError

        self._ipr = IPRoute()
        self._error = NetlinkError
        self._bridge = bridge
        self._ports = ports
        self._kind: dict[int, str | None] = {}

    def check(self) -> None:
        for p, port in self._ports.items():
            try:
                kind = root_qdisc(self._ipr, port.ifindex)
            except (OSError, self._error) as e:
                code = e.errno if isinstance(e, OSError) else e.code
                if code in (errno.ENXIO, errno.ENODEV):
                    raise RuntimeFailure(f"{port.name}: the port went away") from None
                continue  # a passing netlink hiccup: look again next time
            if p in self._kind and kind == self._kind[p]:
                continue
            bypass = kind == "noqueue"
            self._bridge.bypass_qdisc(p, bypass)
            if p in self._kind or not bypass:
                how = "frames skip it" if bypass else "every frame goes through it"
                log.info("%s: root qdisc %s: %s", port.name, kind or "none", how)
            self._kind[p] = kind

    def close(self) -> None:
        self._ipr.close()


class Bridge(Served[Settings]):
    """`tpb run` as a service.Daemon.  open() makes everything (undone by
    close(), also after a failure half-way); reload() applies a re-read
    configuration without closing a ring."""

    def __init__(
        self,
        s: Settings,
        src: Source | None = None,
        counters_file: str | None = None,
        load: Callable[[], tuple[Settings, Source]] | None = None,
    ) -> None:
        super().__init__(s, src, counters_file, load)
        self.ports: dict[str, Port] = {}
        self.selector: Selector | None = None
        self.guard: TableGuard | None = None
        self.native: Workers | None = None
        self._watch: QdiscWatch | None = None
        self._qos: int | None = None
        self._states = StateLog(
            "tunnel to",
            lambda _addr: keepalive_retries(self.s.tunnel.keepalive if self.s.tunnel else None),
            nothing_active=self._nothing_active,
        )

    # -- life cycle ----------------------------------------------------------

    def _open(self) -> None:
        s = self.s
        require_privileges()
        self.ports, warnings = preflight(s, self.src, self.counters_file)
        for w in warnings:
            log.warning("%s", w)
        cpus = None if s.cpu is None else list(range(s.cpu, s.cpu + s.workers))
        if cpus is not None:
            try:
                os.sched_setaffinity(0, set(cpus))
            except (OSError, ValueError) as e:
                raise TpbError(f"--cpu {s.cpu}: {e}") from None
        if s.low_latency:
            self._qos = _pm_qos()
        kw: dict[str, Any] = {}
        if s.tunnel:
            assert s.in_if
            self.selector = Selector(s.in_if, self.ports["in"].ifindex, s.mark, s.match)
            self._stack.callback(self.selector.stop)
            kw = {
                "tunnel": tunnel_struct(s.tunnel, self.ports["out"].mtu, self.ports["out"].mac),
                "sel_ifindex": self.selector.start(),
                "mark": s.mark,
            }
            self.guard = TableGuard(self.selector)
            self._stack.callback(self.guard.close)
        if s.backend == "afxdp":
            for p in self.ports.values():
                if p.mtu > AFXDP_MAX_MTU:
                    raise TpbError(f"{p.name}: MTU {p.mtu}: backend afxdp carries frames of one "
                                   f"4 KB UMEM chunk, MTU {AFXDP_MAX_MTU} at most (jumbo "
                                   "frames need backend packet)")
            kw = {"names": (self.ports["in"].name, self.ports["out"].name),
                  "busy_poll_us": s.busy_poll}
        self.native = Workers(
            self.ports["in"].ifindex,
            self.ports["out"].ifindex,
            s.workers,
            cpus=cpus if s.workers > 1 else None,  # one worker: the process is pinned
            priority=s.priority,
            backend=s.backend,
            ring_frames=s.ring_frames,
            batch=s.batch,
            spin_us=s.spin_us,
            shed=s.shed and s.backend == "packet" and s.workers == 1,
            **kw,
        )
        self._stack.callback(self.native.close)
        if why := self.native.shed_error():
            log.warning("overload shedding off: %s", why)
        log.debug("rings open on %s", ", ".join(
            f"{p.name} (ifindex {p.ifindex}, MTU {p.mtu})" for p in self.ports.values()))
        self._watch = QdiscWatch(self.native, {PORT_IN: self.ports["in"],
                                               PORT_OUT: self.ports["out"]})
        self._stack.callback(self._watch.close)
        self._metrics = self._serve_metrics(s.metrics_listen)
        assert s.in_if
        self._status = serve_status("run", s.in_if, self._snapshot)

    def _serve_metrics(self, listen: tuple[str, int] | None) -> Closeable | None:
        return serve_metrics(
            listen, lambda: metrics.BridgeCollector(
                self.native, self.ports, self.reload_state, tunnel=self.s.tunnel is not None,
                nft_restored=self._nft_restored if self.guard is not None else None,
            )
        )

    def _nft_restored(self) -> int:
        return self.guard.restored if self.guard is not None else 0

    def _snapshot(self) -> dict[str, Any]:
        return status.bridge_snapshot(self.native, self.ports, self.s)

    def close(self) -> None:
        super().close()
        if self._qos is not None:
            os.close(self._qos)
            self._qos = None

    # -- service.Daemon --------------------------------------------------------

    def _what(self) -> str:
        s = self.s
        if s.tunnel is None:
            return "plain bridge" + (", AF_XDP" if s.backend == "afxdp" else "")
        return (f"tunnel {s.tunnel.local} -> {', '.join(s.tunnel.remote)}, "
                + (f"match {len(s.match)} rule(s)" if s.match else f"mark {s.mark}"))

    def ready(self) -> str:
        workers = f", {self.s.workers} workers" if self.s.workers > 1 else ""
        return (f"bridging {self.s.in_if} <-> {self.s.out_if} ({self._what()}{workers}) "
                "(ctrl-c to stop)")

    def status(self) -> str:
        text = f"bridging {self.s.in_if} <-> {self.s.out_if} ({self._what()})"
        if self.s.tunnel is not None and self._states.last:
            active = self._states.active()
            text += f"; traffic to {active}" if active else "; no POP up"
        return text

    def tick(self) -> None:
        assert self._watch and self.native
        self._watch.check()
        if self.guard is not None:
            self.guard.check()
        if self.s.tunnel is not None:
            self._states.update({r.addr: r for r in self.native.remotes()})

    def _nothing_active(self) -> str:
        down = self.s.tunnel.on_tunnel_down if self.s.tunnel else "bypass"
        how = "bridged as they are" if down == "bypass" else "dropped"
        return f"no POP is up: selected flows are {how} (on_tunnel_down = {down})"

    def finish(self) -> None:
        """Counters, sockets closed (the kernel takes promiscuous mode back),
        the summary line, the --counters file."""
        assert self.native
        self._close_servers()
        counters = {p: self.native.counters(p) for p in (PORT_IN, PORT_OUT)}
        each = {p: self.native.per_worker(p) for p in (PORT_IN, PORT_OUT)}
        per_worker = [{p: each[p][k] for p in each} for k in range(len(each[PORT_IN]))]
        tunnel = self.native.tunnel_counters()
        self.native.close()
        try:
            print(summary(counters, tunnel), flush=True)
        except OSError:
            pass  # stdout gone: the --counters file may still be written
        if self.counters_file:
            write_counters(self.counters_file, counters, tunnel, per_worker)

    # -- reload ---------------------------------------------------------------

    def reload(self) -> list[str]:
        """The configuration read again as at start (same file, same flags
        winning) and applied without closing a ring, or refused as a whole
        (ConfigError, one line per problem) with the running one kept.

        Live: the tunnel's settings and the mark (NativeBridge.reconfigure),
        the match rules (one nft transaction), low_latency, metrics_listen,
        log_level.  Not: the ports, tunnel mode on or off, the CPU, ring
        and batch sizes, spin_us (the rings are made for them)."""
        assert self._load is not None and self.native is not None
        new, src = self._load()
        old_items, new_items = config.run_items(self.s), config.run_items(new)
        problems = [
            f"{src.where(*key.split('.'))}: {key} cannot change on reload "
            f"({config.show(old_items.get(key))} -> {config.show(new_items.get(key))}): "
            "restart tpb"
            for key in RESTART_SETTINGS
            if old_items.get(key) != new_items.get(key)
        ]
        if (self.s.tunnel is None) != (new.tunnel is None):
            how = "on" if new.tunnel else "off"
            problems.append(f"{src.where('tunnel')}: tunnel mode cannot be turned {how} on "
                            "reload: restart tpb")
        if problems:
            raise ConfigError(problems)
        changed = config.changes(old_items, new_items)
        if not changed:
            return []
        out = refresh(self.ports["out"])
        problems, warnings = tunnel_problems(new, src, out, host_addresses())
        if problems:
            raise ConfigError(problems)
        keys = {c.split(" ", 1)[0] for c in changed}
        to_c = any(k.startswith("tunnel.") for k in keys) or "select.mark" in keys
        to_nft = new.tunnel is not None and (
            "select.match" in keys or ("select.mark" in keys and bool(new.match or self.s.match))
        )
        with ExitStack() as undo:
            if to_nft:
                assert self.selector
                self.selector.check(new.mark, new.match)
            if "bridge.metrics_listen" in keys:
                srv = self._serve_metrics(new.metrics_listen)
                if srv is not None:
                    undo.callback(srv.close)
            else:
                srv = self._metrics
            qos = self._qos
            if new.low_latency and qos is None:
                qos = _pm_qos()
                undo.callback(os.close, qos)
            if to_c:
                try:
                    self._reconfigure(new, out)
                except TpbError as e:
                    what = ", ".join(sorted(k for k in keys if k.startswith(("tunnel", "select"))))
                    raise TpbError(f"the forwarding loop refused {what}: {e}") from None
                undo.callback(self._restore_c)
            if to_nft:
                assert self.selector
                self.selector.load(new.mark, new.match)
            undo.pop_all()  # all in place: nothing to take back
        for w in warnings:
            log.warning("%s", w)
        if "bridge.metrics_listen" in keys and self._metrics is not None:
            self._metrics.close()
        self._metrics = srv
        if not new.low_latency and qos is not None:
            os.close(qos)
            qos = None
        self._qos = qos
        set_level(new.log_level)
        self.s, self.src, self.ports["out"] = new, src, out
        return changed

    def _reconfigure(self, s: Settings, out: Port) -> None:
        assert self.native and self.selector and s.tunnel
        self.native.reconfigure(
            tunnel_struct(s.tunnel, out.mtu, out.mac), self.selector.sel_ifindex, s.mark
        )

    def _restore_c(self) -> None:
        """Puts the running configuration back into C after a later step of
        a reload failed."""
        try:
            self._reconfigure(self.s, self.ports["out"])
        except TpbError as e:
            log.error("reload: the running tunnel settings could not be restored in the "
                      "loop: %s", e)


def run(
    s: Settings,
    counters_file: str | None = None,
    src: Source | None = None,
    load: Callable[[], tuple[Settings, Source]] | None = None,
) -> int:
    """`tpb run` until a signal: exit status 0, or TpbError (2) before
    forwarding started, RuntimeFailure (1) after."""
    with Bridge(s, src, counters_file, load) as bridge:
        return serve(bridge)
