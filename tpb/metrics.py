"""Prometheus metrics for `tpb run` and `tpb pop` (prometheus-client).

A custom collector reads the C helper's counters at scrape time: no Python
per packet, no copy of the counters kept in Python.  Conventions of
node_exporter and wireguard_exporter: `tpb_` prefix, base units, `_total`
counters, `_info` metadata, labels of low cardinality.

INTERFACE SKELETON — filled in by the metrics work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ReloadState:
    """What Prometheus itself exports as prometheus_config_last_reload_*:
    set by the service at start and on every SIGHUP."""

    successful: bool = True
    timestamp: float = field(default_factory=time.time)  # of the last success


class Closeable(Protocol):
    def close(self) -> None: ...


class BridgeCollector:
    """Every counter of a `tpb run` instance (see csrc/tpb.h)."""

    def __init__(self, bridge: Any, ports: dict[str, Any], reload: ReloadState) -> None:
        """bridge: tpb.native.NativeBridge; ports: {"in": Port, "out": Port}."""
        raise NotImplementedError

    def collect(self) -> Any:
        raise NotImplementedError


class PopCollector:
    """Every counter of a `tpb pop` instance, per peer."""

    def __init__(self, pop: Any, reload: ReloadState) -> None:
        """pop: tpb.native.NativePop."""
        raise NotImplementedError

    def collect(self) -> Any:
        raise NotImplementedError


def serve(listen: tuple[str, int], collector: Any) -> Closeable:
    """Serve the collector (plus tpb_build_info) on http://ADDR:PORT/metrics
    in a thread; TpbError (one line) if the address cannot be bound."""
    raise NotImplementedError
