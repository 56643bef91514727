"""Prometheus metrics for `tpb run` and `tpb pop` (prometheus-client).

A custom collector reads the C helper's counters at scrape time: no Python
per packet, no copy of the counters kept in Python.  Conventions of
node_exporter and wireguard_exporter: `tpb_` prefix, base units, `_total`
counters, `_info` metadata, labels of low cardinality.

Which metric a C counter becomes is decided here, field by field, in
PORT_FIELDS, TUNNEL_FIELDS and REMOTE_FIELDS, keyed by the field names of
csrc/tpb.h's structs.  The collectors walk the struct's fields as cffi
reports them (ffi.typeof(...).fields), so the order and the set of
counters come from C; unmapped() lists a field the maps lack, and the
tests fail on it: a counter added in C cannot go unexported unnoticed.

One scrape costs one counters read per port and per tunnel/peer (the C
side copies a struct under its own lock; the forwarding loop never waits
for Python, which it runs without).
"""

from __future__ import annotations

import functools
import importlib.metadata
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from tpb.errors import TpbError
from tpb.native import DROP_NAMES, PORT_IN, PORT_OUT, ffi

log = logging.getLogger("tpb")

PREFIX = "tpb_"
COUNTER = "counter"
GAUGE = "gauge"


@dataclass
class ReloadState:
    """What Prometheus itself exports as prometheus_config_last_reload_*:
    set by the service at start and on every SIGHUP."""

    successful: bool = True
    timestamp: float = field(default_factory=time.time)  # of the last success


class Closeable(Protocol):
    def close(self) -> None: ...


# ---- what each C field becomes --------------------------------------------


class Family(NamedTuple):
    kind: str  # COUNTER or GAUGE
    doc: str


# Every family, by name without the tpb_ prefix (and without _total: the
# client library appends it to counters).
FAMILIES: dict[str, Family] = {
    "port_receive_frames": Family(COUNTER, "Frames taken from the port's receive ring."),
    "port_receive_bytes": Family(COUNTER, "Bytes of the frames received (no FCS)."),
    "port_transmit_frames": Family(COUNTER, "Frames sent out of the port."),
    "port_transmit_bytes": Family(COUNTER, "Bytes of the frames sent (no FCS)."),
    "port_drops": Family(
        COUNTER,
        "Frames that did not make it, by reason; ring_full: the kernel found the "
        "receive ring full (PACKET_STATISTICS).",
    ),
    "port_kernel_frames": Family(
        COUNTER, "Frames the kernel offered the port's sockets, ring drops included."
    ),
    "port_polls": Family(
        COUNTER, "Times the forwarding loop slept in poll() (one loop serves both ports: "
        "counted on port in)."
    ),
    "port_batches": Family(COUNTER, "sendmmsg batches sent out of the port."),
    "port_xsk_tx_ring_empty": Family(
        COUNTER, "backend afxdp: times the kernel found the port's AF_XDP TX ring empty "
        "(XDP_STATISTICS tx_ring_empty_descs; not a drop)."
    ),
    "port_shed_engaged": Family(
        COUNTER, "backend packet: times TPB could not keep up with the port and attached "
        "its shedding XDP program there (drops with reason shed; detached after 2 s calm)."
    ),
    "port_shed_refused": Family(
        COUNTER, "backend packet: times the kernel refused the shedding XDP program on the "
        "port, at most 1: it is not tried again (TPB runs without it; the log says why)."
    ),
    "tunnel_packets": Family(
        COUNTER, "GRE packets: encap sent toward the far end, decap received and unwrapped."
    ),
    "tunnel_bytes": Family(COUNTER, "Inner bytes of the GRE packets, by direction."),
    "tunnel_drops": Family(COUNTER, "Packets the tunnel dropped, by reason."),
    "tunnel_fragments": Family(COUNTER, "Fragments made (inner or outer)."),
    "tunnel_fragmented_packets": Family(COUNTER, "Packets that needed fragmenting."),
    "tunnel_icmp_sent": Family(COUNTER, "ICMP fragmentation-needed messages sent."),
    "tunnel_icmp_ratelimited": Family(
        COUNTER, "ICMP fragmentation-needed messages held back by the rate limit."
    ),
    "tunnel_mss_clamped": Family(COUNTER, "TCP SYNs whose MSS option was clamped."),
    "tunnel_gso_packets": Family(COUNTER, "Super-packets (GSO/GRO) segmented."),
    "tunnel_gso_segments": Family(COUNTER, "Segments made of super-packets."),
    "tunnel_gro_packets": Family(
        COUNTER, "Super-packets the POP wrote to its TUN device, coalesced from several."
    ),
    "tunnel_gro_segments": Family(COUNTER, "Packets the POP coalesced into super-packets."),
    "tunnel_arp_replies": Family(COUNTER, "ARP replies sent for the tunnel address."),
    "tunnel_echo_replies": Family(COUNTER, "ICMP echo replies sent from the tunnel address."),
    "tunnel_bypassed_packets": Family(
        COUNTER, "Selected frames bridged unencapsulated while no POP was up (fail-open)."
    ),
    "tunnel_udp_gso_sent_messages": Family(
        COUNTER, "GRE-in-UDP UDP GSO messages sent: super-packets the kernel cuts into datagrams."
    ),
    "tunnel_udp_gso_received_messages": Family(
        COUNTER, "GRE-in-UDP UDP GSO super-packets received and taken apart."
    ),
    "tunnel_udp_gso_coalesced_messages": Family(
        COUNTER, "GRE-in-UDP UDP GSO super-packets whose pieces went out of --in as one."
    ),
    "reassembly_fragments": Family(COUNTER, "GRE fragments taken into reassembly."),
    "reassembly_datagrams": Family(COUNTER, "Datagrams reassembled."),
    "reassembly_memory_bytes": Family(GAUGE, "Bytes reassembly holds now."),
    "reassembly_memory_peak_bytes": Family(GAUGE, "Most bytes reassembly has held."),
    "tunnel_up": Family(GAUGE, "1 while the far end answers keepalives (or they are off)."),
    "tunnel_active": Family(GAUGE, "1 for the POP that selected traffic goes to."),
    "tunnel_transitions": Family(COUNTER, "Changes between up and down."),
    "keepalives_sent": Family(COUNTER, "Keepalives sent."),
    "keepalives_unsent": Family(COUNTER, "Keepalives not sent: no next-hop MAC learned yet."),
    "keepalives_received": Family(COUNTER, "Own keepalives that came back."),
    "keepalives_reflected": Family(COUNTER, "The far end's keepalives sent back to it."),
    "keepalive_rtt_seconds": Family(GAUGE, "Round-trip time of the last answered keepalive."),
    "keepalive_last_reply_age_seconds": Family(
        GAUGE, "Time since the last answered keepalive."
    ),
    "nft_restored": Family(
        COUNTER, "Times TPB found its nftables table deleted or changed by someone else and "
        "loaded it again."
    ),
    "pop_learned_entries": Family(GAUGE, "Learned inner source -> bridge entries."),
    "config_last_reload_successful": Family(
        GAUGE, "1 if the last configuration reload succeeded."
    ),
    "config_last_reload_success_timestamp_seconds": Family(
        GAUGE, "Time of the last successful configuration load or reload."
    ),
}


class To(NamedTuple):
    """Where one C field goes: a family, the labels that set it apart from
    the family's other fields, and the Python snapshot's attribute when it
    is not the C field's name."""

    family: str
    labels: tuple[tuple[str, str], ...] = ()
    attr: str | None = None


# A field whose value labels the series (a remote's address), not a metric.
LABEL = To("")


def unexported(attr: str) -> To:
    """A field the Python snapshot carries (as `attr`) that no metric does."""
    return To("", attr=attr)

# The label value of an array field: one series per entry of DROP_NAMES.
EACH_DROP = "*"

# struct tpb_port_counters
PORT_FIELDS: dict[str, To] = {
    "rx_frames": To("port_receive_frames"),
    "rx_bytes": To("port_receive_bytes"),
    "tx_frames": To("port_transmit_frames"),
    "tx_bytes": To("port_transmit_bytes"),
    "drop_truncated": To("port_drops", (("reason", "truncated"),)),
    "drop_too_big": To("port_drops", (("reason", "too_big"),)),
    "drop_egress_full": To("port_drops", (("reason", "egress_full"),)),
    "drop_send_error": To("port_drops", (("reason", "send_error"),)),
    "drop_gso_bad": To("port_drops", (("reason", "gso_bad"),)),
    "kernel_packets": To("port_kernel_frames"),
    "kernel_drops": To("port_drops", (("reason", "ring_full"),)),
    "polls": To("port_polls"),
    "batches": To("port_batches"),
    "drop_fill_empty": To("port_drops", (("reason", "fill_empty"),)),
    "drop_xsk_rx": To("port_drops", (("reason", "xsk_rx"),)),
    "drop_xsk_invalid": To("port_drops", (("reason", "xsk_invalid"),)),
    "drop_no_socket": To("port_drops", (("reason", "no_socket"),)),
    "xsk_tx_ring_empty": To("port_xsk_tx_ring_empty"),
    "drop_shed": To("port_drops", (("reason", "shed"),)),
    "shed_engaged": To("port_shed_engaged"),
    "shed_refused": To("port_shed_refused"),
}

# struct tpb_tunnel_counters
TUNNEL_FIELDS: dict[str, To] = {
    "encap_packets": To("tunnel_packets", (("direction", "encap"),)),
    "encap_bytes": To("tunnel_bytes", (("direction", "encap"),)),
    "decap_packets": To("tunnel_packets", (("direction", "decap"),)),
    "decap_bytes": To("tunnel_bytes", (("direction", "decap"),)),
    "fragments": To("tunnel_fragments"),
    "fragmented": To("tunnel_fragmented_packets"),
    "icmp_sent": To("tunnel_icmp_sent"),
    "icmp_ratelimited": To("tunnel_icmp_ratelimited"),
    "mss_clamped": To("tunnel_mss_clamped"),
    "gso_packets": To("tunnel_gso_packets"),
    "gso_segments": To("tunnel_gso_segments"),
    "gro_packets": To("tunnel_gro_packets"),
    "gro_segments": To("tunnel_gro_segments"),
    "reasm_fragments": To("reassembly_fragments"),
    "reasm_done": To("reassembly_datagrams"),
    "reasm_memory": To("reassembly_memory_bytes"),
    "reasm_memory_peak": To("reassembly_memory_peak_bytes"),
    "arp_replies": To("tunnel_arp_replies"),
    "echo_replies": To("tunnel_echo_replies"),
    "bypassed": To("tunnel_bypassed_packets"),
    "udp_gso_sent": To("tunnel_udp_gso_sent_messages"),
    "udp_gso_received": To("tunnel_udp_gso_received_messages"),
    "udp_gso_coalesced": To("tunnel_udp_gso_coalesced_messages"),
    "drop": To("tunnel_drops", (("reason", EACH_DROP),)),
}

# struct tpb_remote_state, read through tpb.native.RemoteState (which gives
# the times in seconds, None while unknown: such a sample is left out).
REMOTE_FIELDS: dict[str, To] = {
    "addr": LABEL,
    "up": To("tunnel_up"),
    "active": To("tunnel_active"),
    "transitions": To("tunnel_transitions"),
    "keepalives_sent": To("keepalives_sent"),
    "keepalives_unsent": To("keepalives_unsent"),
    "keepalives_received": To("keepalives_received"),
    "keepalives_reflected": To("keepalives_reflected"),
    "rtt_ns": To("keepalive_rtt_seconds", attr="rtt"),
    "since_reply_ns": To("keepalive_last_reply_age_seconds", attr="since_reply"),
    # a NAT'd peer's learned endpoint (RemoteState.endpoint): in `tpb status`
    # and --counters, not a label (it changes with the NAT mapping: a new
    # series each time)
    "endpoint_addr": unexported("endpoint"),
    "endpoint_port": unexported("endpoint"),
}

# The C structs, in their order: what the collectors walk.
STRUCTS: dict[str, dict[str, To]] = {
    "struct tpb_port_counters": PORT_FIELDS,
    "struct tpb_tunnel_counters": TUNNEL_FIELDS,
    "struct tpb_remote_state": REMOTE_FIELDS,
}
_FIELD_NAMES: dict[str, list[str]] = {
    struct: [name for name, _ in ffi.typeof(struct).fields] for struct in STRUCTS
}


def unmapped() -> dict[str, list[str]]:
    """Fields of the C structs that no map exports, by struct (empty when
    every counter has its metric)."""
    out = {}
    for struct, mapping in STRUCTS.items():
        missing = [n for n in _FIELD_NAMES[struct] if n not in mapping]
        if missing:
            out[struct] = missing
    return out


@functools.cache  # the status sampler asks every second; it cannot change
def version() -> str:
    try:
        return importlib.metadata.version("tpb")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- building one scrape's families ---------------------------------------


class Scrape:
    """The families of one scrape, each made when its first sample comes,
    so a family without series (no remotes yet) is left out."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, family: str, labels: dict[str, str], value: float) -> None:
        m = self._families.get(family)
        if m is None:
            kind, doc = FAMILIES[family]
            cls = CounterMetricFamily if kind == COUNTER else GaugeMetricFamily
            m = cls(PREFIX + family, doc, labels=list(labels))
            self._families[family] = m
        m.add_metric(list(labels.values()), value)

    def fields(
        self, struct: str, values: Any, base: dict[str, str], skip: Iterable[str] = ()
    ) -> None:
        """Every field of `struct` from `values` (an object with the fields
        as attributes, or a dict as tpb.native.tunnel_counters gives), in the
        struct's order, labelled `base` plus the field's own labels."""
        mapping = STRUCTS[struct]
        get = values.get if isinstance(values, dict) else lambda k: getattr(values, k, None)
        for name in _FIELD_NAMES[struct]:
            to = mapping.get(name)
            if to is None or not to.family or name in skip:
                continue  # unmapped: unmapped() names it, and the tests fail on it
            value = get(to.attr or name)
            if to.labels and to.labels[-1][1] == EACH_DROP:
                drops = value or {}  # by reason; tunnel_counters() leaves out zeros
                for reason in DROP_NAMES:
                    self.add(to.family, {**base, to.labels[-1][0]: reason}, drops.get(reason, 0))
                continue
            if value is None:
                continue  # not known (yet): no sample rather than a made-up 0
            self.add(to.family, {**base, **dict(to.labels)}, float(value))

    def reload(self, state: ReloadState) -> None:
        self.add("config_last_reload_successful", {}, float(state.successful))
        self.add("config_last_reload_success_timestamp_seconds", {}, state.timestamp)

    def families(self) -> Iterator[Metric]:
        return iter(self._families.values())


# ---- the collectors --------------------------------------------------------


class BridgeCollector(Collector):
    """Every counter of a `tpb run` instance (see csrc/tpb.h).

    Plain mode (no tunnel) exports the port families only: a tunnel that
    does not exist has no series, rather than zeros that would read as a
    tunnel carrying nothing (and trip `tpb_tunnel_up == 0` alerts).
    Whether the bridge tunnels is `tunnel`, or, left None, whether it
    reports any remote (tpb.h: tpb_bridge_remotes gives 0 in plain mode
    and one per configured POP in tunnel mode)."""

    mode = "run"

    def __init__(
        self,
        bridge: Any,
        ports: dict[str, Any],
        reload: ReloadState,
        *,
        tunnel: bool | None = None,
        nft_restored: Callable[[], int] | None = None,
    ) -> None:
        """bridge: tpb.native.NativeBridge; ports: {"in": Port, "out": Port};
        nft_restored: how often the table was restored (tpb/nftguard.py;
        a Python counter, the control plane's), None without a table."""
        self._bridge = bridge
        self._nft_restored = nft_restored
        self._ports = [(PORT_IN, "in", ports["in"].name), (PORT_OUT, "out", ports["out"].name)]
        self._reload = reload
        self._tunnel = tunnel
        _warn_unmapped()

    def collect(self) -> Iterator[Metric]:
        out = Scrape()
        for index, role, device in self._ports:
            out.fields(
                "struct tpb_port_counters",
                self._bridge.counters(index),
                {"port": role, "device": device},
            )
        remotes = self._bridge.remotes()
        if self._tunnel or (self._tunnel is None and remotes):
            out.fields("struct tpb_tunnel_counters", self._bridge.tunnel_counters(), {})
            for r in remotes:
                out.fields("struct tpb_remote_state", r, {"remote": r.addr})
        if self._nft_restored is not None:
            out.add("nft_restored", {}, float(self._nft_restored()))
        out.reload(self._reload)
        return out.families()


class PopCollector(Collector):
    """Every counter of a `tpb pop` instance, per peer: the tunnel families
    labelled peer="ADDR", and peer="none" for what belongs to no peer (GRE
    from unknown addresses, packets no bridge is behind)."""

    mode = "pop"

    def __init__(self, pop: Any, reload: ReloadState) -> None:
        """pop: tpb.native.NativePop."""
        self._pop = pop
        self._reload = reload
        _warn_unmapped()

    def collect(self) -> Iterator[Metric]:
        out = Scrape()
        counters = self._pop.counters()
        for peer, c in counters["peers"].items():
            out.fields("struct tpb_tunnel_counters", c, {"peer": peer})
        out.fields("struct tpb_tunnel_counters", counters["other"], {"peer": "none"})
        for peer, state in self._pop.peer_states().items():
            # `active` is the bridge's choice among its POPs: nothing here
            out.fields("struct tpb_remote_state", state, {"peer": peer}, skip=("active",))
        out.add("pop_learned_entries", {}, float(counters["learned"]))
        out.reload(self._reload)
        return out.families()


_warned = False


def _warn_unmapped() -> None:
    global _warned
    missing = unmapped()
    if missing and not _warned:
        _warned = True
        log.warning("metrics: C counters without a metric (not exported): %s", missing)


class BuildInfo(Collector):
    """tpb_build_info{version, mode} 1."""

    def __init__(self, mode: str) -> None:
        self._value = {"version": version(), "mode": mode}

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily(PREFIX + "build", "TPB's version and mode.", value=self._value)


# ---- the HTTP endpoint ------------------------------------------------------


class _Handler(WSGIRequestHandler):
    # A client that stops reading cannot hold close() for longer than this.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        """One line per scrape on stderr is noise: say nothing."""


class _Server(ThreadingWSGIServer):
    # close() waits for the scrapes in flight (server_close joins them):
    # none may read a bridge the service closes right after.
    daemon_threads = False
    block_on_close = True

    def __init__(self, addr: tuple[str, int], family: int) -> None:
        self.address_family = family
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks getfqdn(address): a reverse DNS query
        # that can stall start-up where no resolver answers.  The rest of
        # what it and WSGIServer.server_bind do:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class MetricsServer:
    """The running endpoint; close() stops it (and waits for scrapes in
    flight)."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server: _Server | None = server
        self._thread = thread
        self.address: tuple[str, int] = server.server_address[:2]  # the port, if 0 was asked

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None


def _where(listen: tuple[str, int]) -> str:
    addr, port = listen
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def serve(listen: tuple[str, int], collector: Any) -> Closeable:
    """Serve the collector (plus tpb_build_info and process_*) on
    http://ADDR:PORT/metrics in a thread; TpbError (one line) if the address
    cannot be bound.  Close it before closing what the collector reads.

    prometheus_client.start_http_server does the same but resolves the
    address and its host name (DNS at start-up); this takes IP addresses
    only (the settings hold nothing else), IPv6 too.

    process_* (CPU seconds, memory, open files, start time) are what node
    operators expect of any exporter, and the CPU time shows the data
    path's cost; python_* (garbage collector, interpreter) are left out:
    nothing an operator of TPB acts on."""
    addr, port = listen
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
    except ValueError:
        raise TpbError(f"metrics: {addr!r} is not an IP address") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BuildInfo(getattr(collector, "mode", "unknown")))
    registry.register(collector)
    ProcessCollector(registry=registry)
    try:
        server = _Server((addr, port), family)
    except OSError as e:
        raise TpbError(f"metrics: cannot listen on {_where(listen)}: "
                       f"{e.strerror or e}") from None
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="tpb-metrics", daemon=True)
    thread.start()
    log.info("metrics on http://%s/metrics", _where(server.server_address[:2]))
    return MetricsServer(server, thread)
