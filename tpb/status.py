"""`tpb status`: a running instance's state, from another shell.

Each running `tpb run` / `tpb pop` listens on an abstract Unix socket
(network-namespace scoped, so `ip netns exec NS tpb status` sees the
instances of that namespace) and answers every connection with one JSON
document; `tpb status` finds them through /proc/net/unix.

INTERFACE SKELETON — filled in by the status work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from tpb.metrics import Closeable


def serve(kind: str, name: str, snapshot: Callable[[], dict[str, Any]]) -> Closeable:
    """Answer status requests for instance `name` of `kind` ("run"/"pop")
    with snapshot() (plus rates over the last seconds, sampled in a
    thread of its own) until close()."""
    raise NotImplementedError


def bridge_snapshot(bridge: Any, ports: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A `tpb run` instance's state: ports, counters, tunnel, remotes."""
    raise NotImplementedError


def pop_snapshot(pop: Any, settings: Any) -> dict[str, Any]:
    """A `tpb pop` instance's state: per peer counters and keepalive state."""
    raise NotImplementedError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show running instances (like `wg show`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError
