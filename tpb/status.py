"""`tpb status`: a running instance's state, from another shell.

Each running `tpb run` / `tpb pop` listens on an abstract Unix socket
(network-namespace scoped, so `ip netns exec NS tpb status` sees the
instances of that namespace) and answers every connection with one JSON
document; `tpb status` finds them through /proc/net/unix.

The socket is `@tpb/<kind>/<name>`: abstract, so there is no file to
create, clean up after a crash, or find in the wrong mount namespace; it
goes away with the process.  Anyone in the network namespace may read it,
as anyone on the host may scrape the metrics endpoint: the document holds
counters and addresses, never the GRE key (only whether there is one).
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import json
import logging
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from tpb.errors import TpbError

if TYPE_CHECKING:  # `tpb --help` builds this module's parser: no C helper, no
    from tpb.metrics import Closeable  # prometheus_client to load for that

log = logging.getLogger("tpb")

SOCKET_PREFIX = "tpb/"
SAMPLE_EVERY = 1.0  # seconds between the sampler's counter readings
SAMPLES = 11  # kept: rates over the last 10 s
QUERY_TIMEOUT = 2.0
NO_INSTANCE = "tpb: no running instance in this network namespace"
SO_ACCEPTCON = 0x10000  # /proc/net/unix's flag of a listening socket
TOP_DROPS = 3

# Counters the sampler turns into rates, where the documents hold them.
PORT_RATES = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes")
TUNNEL_RATES = ("encap_packets", "encap_bytes", "decap_packets", "decap_bytes")


# ---- the server side ---------------------------------------------------------


def _rate_counters(doc: dict[str, Any]) -> dict[tuple[str, ...], int]:
    """The counters of a snapshot that get rates, by their path in it."""
    out: dict[tuple[str, ...], int] = {}
    for role, port in (doc.get("ports") or {}).items():
        for k in PORT_RATES:
            out[("ports", role, k)] = port["counters"][k]
    tunnel = doc.get("tunnel")
    if tunnel:
        for k in TUNNEL_RATES:
            out[("tunnel", k)] = tunnel["counters"][k]
    for peer in doc.get("peers") or []:
        if peer.get("counters"):
            for k in TUNNEL_RATES:
                out[("peers", peer.get("name", peer["addr"]), k)] = peer["counters"][k]
    return out


class Sampler:
    """Reads the counters every second in a thread of its own and keeps the
    last ~10 s of them: a status answer gives rates over a window that does
    not depend on when, or how often, someone asks."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot
        self._samples: collections.deque[tuple[float, dict[tuple[str, ...], int]]] = (
            collections.deque(maxlen=SAMPLES)
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tpb-status-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sample = (time.monotonic(), _rate_counters(self._snapshot()))
            except Exception as e:  # a reading missed; the next one may do
                log.debug("status: sampling failed: %s", e)
            else:
                with self._lock:
                    self._samples.append(sample)
            if self._stop.wait(SAMPLE_EVERY):
                return

    def rates(self) -> dict[str, Any]:
        """{"seconds": window, "ports": {"in": {"rx_frames_per_s": ...,
        "rx_bits_per_s": ...}}, "tunnel": {...}, "peers": {ADDR: {...}}};
        just {"seconds": 0} until two readings are in."""
        with self._lock:
            samples = list(self._samples)
        if len(samples) < 2:
            return {"seconds": 0}
        t_last, last = samples[-1]
        out: dict[str, Any] = {"seconds": round(t_last - samples[0][0], 3)}
        for path, value in last.items():
            # the oldest reading that has it: a peer added by a reload
            # has fewer readings than the window holds
            t0, v0 = next((t, s[path]) for t, s in samples if path in s)
            if t_last - t0 <= 0:
                continue
            *where, name = path
            node = out
            for key in where:
                node = node.setdefault(key, {})
            rate = max(0, value - v0) / (t_last - t0)  # a counter reset reads as 0
            if name.endswith("_bytes"):
                node[name[: -len("_bytes")] + "_bits_per_s"] = round(rate * 8, 3)
            else:
                node[name + "_per_s"] = round(rate, 3)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()


class StatusServer:
    """One instance's status socket: a thread answers each connection with
    snapshot() plus the sampler's rates."""

    def __init__(self, kind: str, name: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.kind, self.name = kind, name
        self.address = f"{SOCKET_PREFIX}{kind}/{name}"
        self._snapshot = snapshot
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind("\0" + self.address)
            self._sock.listen(16)
        except OSError as e:
            self._sock.close()
            raise TpbError(_bind_error(self.address, e)) from None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._sampler = Sampler(snapshot)
        self._thread = threading.Thread(target=self._serve, name="tpb-status", daemon=True)
        self._sampler.start()
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        continue
                    with conn:
                        try:
                            self._answer(conn)
                        except Exception as e:  # one bad answer must not end the thread
                            log.warning("status: %s: %s", self.address, e)

    def document(self) -> dict[str, Any]:
        try:
            doc = self._snapshot()
        except Exception as e:
            log.warning("status: snapshot failed: %s", e)
            doc = {"error": str(e)}
        return {"kind": self.kind, "name": self.name, **doc, "rates": self._sampler.rates()}

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(QUERY_TIMEOUT)  # a client that does not read: dropped
        try:
            conn.sendall(json.dumps(self.document()).encode() + b"\n")
        except OSError as e:
            log.debug("status: %s: %s", self.address, e)

    def close(self) -> None:
        """Stops both threads; once it returns, snapshot() is not called
        again (so the bridge it reads may be closed)."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._sampler.close()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _bind_error(address: str, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"status socket @{address}: another instance of that name runs in this "
                "network namespace")
    return f"status socket @{address}: {e.strerror or e}"


def serve(kind: str, name: str, snapshot: Callable[[], dict[str, Any]]) -> Closeable:
    """Answer status requests for instance `name` of `kind` ("run"/"pop")
    with snapshot() (plus rates over the last seconds, sampled in a
    thread of its own) until close(); TpbError (one line) if another
    instance has that name in this network namespace."""
    return StatusServer(kind, name, snapshot)


# ---- the documents ------------------------------------------------------------


@functools.cache
def _process_start() -> float:
    """This process's start, as Unix time (process_start_time_seconds)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/stat") as f:
        btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime "))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _process() -> dict[str, Any]:
    from tpb.metrics import version

    start = _process_start()
    return {
        "pid": os.getpid(),
        "version": version(),
        "started": round(start, 3),
        "uptime_s": round(max(0.0, time.time() - start), 3),
    }


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _top_drops(groups: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """The largest non-zero drop counters over every port/tunnel/peer."""
    drops = [
        {"where": where, "reason": reason, "count": n}
        for where, by_reason in groups.items()
        for reason, n in by_reason.items()
        if n
    ]
    drops.sort(key=lambda d: -d["count"])
    return drops[:TOP_DROPS]


def _state(r: Any) -> dict[str, Any] | None:
    """A tpb.native.RemoteState without its address (times in seconds)."""
    if r is None:
        return None
    d = asdict(r)
    del d["addr"]
    return d


def bridge_snapshot(bridge: Any, ports: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A `tpb run` instance's state: ports, counters, tunnel, remotes.

    bridge: tpb.native.NativeBridge; ports: {"in": Port, "out": Port};
    settings: tpb.config.Settings."""
    from tpb.native import PORT_IN, PORT_OUT

    doc: dict[str, Any] = _process()
    doc["ports"] = {}
    drops: dict[str, dict[str, int]] = {}
    for role, index in (("in", PORT_IN), ("out", PORT_OUT)):
        c = bridge.counters(index)
        doc["ports"][role] = {"device": ports[role].name, "counters": asdict(c),
                              "drops": c.drops}
        drops[role] = c.drops
    t = settings.tunnel
    if t is None:
        doc["tunnel"] = None
        doc["remotes"] = []
    else:
        tc = bridge.tunnel_counters()
        doc["tunnel"] = {
            "local": t.local,
            "remotes": list(t.remote),
            "key": t.key is not None,
            "csum": t.csum,
            "seq": t.seq,
            "keepalive": str(t.keepalive) if t.keepalive else None,
            "on_tunnel_down": t.on_tunnel_down,
            "select": _plural(len(settings.match), "match rule") if settings.match
            else f"mark {settings.mark}",
            "counters": tc,
        }
        drops["tunnel"] = tc["drop"]
        # In order of preference; a remote the C side has no state for
        # (yet) is listed with state null.
        states = {r.addr: r for r in bridge.remotes()}
        order = list(t.remote) + [a for a in states if a not in t.remote]
        doc["remotes"] = [{"addr": a, "state": _state(states.get(a))} for a in order]
    doc["top_drops"] = _top_drops(drops)
    return doc


def pop_snapshot(pop: Any, settings: Any) -> dict[str, Any]:
    """A `tpb pop` instance's state: per peer counters and keepalive state.

    pop: tpb.native.NativePop; settings: tpb.pop_config.PopSettings."""
    doc: dict[str, Any] = _process()
    counters = pop.counters()
    states = pop.peer_states()
    doc.update(local=settings.local, tun=settings.tun, learned=counters["learned"])
    doc["peers"] = []
    drops: dict[str, dict[str, int]] = {}
    for p in settings.peers:
        c = counters["peers"].get(p.name)
        doc["peers"].append({
            "name": p.name,
            "addr": p.address,
            "encap": p.encap,
            "key": p.key is not None,
            "csum": p.csum,
            "seq": p.seq,
            "prefixes": list(p.prefixes),
            "keepalive": str(p.keepalive) if p.keepalive else None,
            "state": _state(states.get(p.name)),
            "counters": c,
        })
        if c:
            drops[p.name] = c["drop"]
    doc["other"] = {"counters": counters["other"]}
    drops["none"] = counters["other"]["drop"]
    doc["top_drops"] = _top_drops(drops)
    return doc


# ---- the client: `tpb status` ----------------------------------------------------


def instances() -> list[str]:
    """Names (tpb/KIND/NAME) of the status sockets listening in this
    network namespace (/proc/net/unix shows abstract names with a '@')."""
    found = set()
    with open("/proc/net/unix") as f:
        next(f, None)  # the header
        for line in f:
            parts = line.split()
            if len(parts) < 8 or not parts[7].startswith("@" + SOCKET_PREFIX):
                continue
            if int(parts[3], 16) & SO_ACCEPTCON:
                found.add(parts[7][1:])
    return sorted(found)


def query(address: str, timeout: float = QUERY_TIMEOUT) -> dict[str, Any]:
    """One instance's document."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect("\0" + address)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _si(value: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 999.5 or prefix == "T":
            break
        value /= 1000
    return f"{value:.3g} {prefix}{unit}"


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    parts, rest = [], int(s)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= n:
            parts.append(f"{rest // n}{unit}")
            rest %= n
    return " ".join(parts[:2])


def _rate(rates: dict[str, Any] | None, way: str, unit: str, total: int) -> str:
    """'rx 1.2 kframes/s 9.8 Mbit/s (12345 frames)' for way 'rx', unit
    'frames'; only the total until the sampler has two readings."""
    count = (rates or {}).get(f"{way}_{unit}_per_s")
    bits = (rates or {}).get(f"{way}_bits_per_s")
    if count is None or bits is None:
        return f"{way} {total} {unit}"
    return f"{way} {_si(count, unit + '/s')} {_si(bits, 'bit/s')} ({total} {unit})"


def _remote_line(what: str, addr: str, state: dict[str, Any] | None, keepalive: Any,
                 bridge: bool) -> str:
    if state is None:
        return f"  {what} {addr}: no state yet"
    bits = ["up" if state["up"] else "down"]
    if bridge:
        bits.append("active" if state["active"] else "standby")
    if not keepalive:
        bits.append("keepalives off")
    else:
        bits.append(f"rtt {state['rtt'] * 1000:.2f} ms" if state["rtt"] else "no rtt yet")
        bits.append(f"last reply {_duration(state['since_reply'])} ago" if state["since_reply"]
                    else "no reply yet")
    bits.append(_plural(state["transitions"], "transition"))
    return f"  {what} {addr}: {', '.join(bits)}"


def _drops_line(doc: dict[str, Any]) -> str:
    top = doc.get("top_drops") or []
    text = ", ".join(f"{d['reason']} ({d['where']}) {d['count']}" for d in top)
    return f"  drops: {text or 'none'}"


def render(doc: dict[str, Any]) -> str:
    """One instance, at a glance (as `wg show` shows an interface)."""
    head = f"{doc.get('kind')} {doc.get('name')}"
    if "error" in doc:
        return f"{head}: {doc['error']}"
    lines = [f"{head}: pid {doc['pid']}, up {_duration(doc['uptime_s'])}, tpb {doc['version']}"]
    rates = doc.get("rates") or {}
    if doc.get("kind") == "pop":
        lines.append(f"  pop: local {doc['local']}, tun {doc['tun']}, "
                     f"{len(doc['peers'])} peer(s), {doc['learned']} learned")
        for p in doc["peers"]:
            name = p.get("name", p["addr"])
            line = _remote_line("peer", name, p["state"], p["keepalive"], bridge=False)
            c = p.get("counters") or {}
            r = (rates.get("peers") or {}).get(name)
            where = (p["state"] or {}).get("endpoint")
            udp = f"; udp{' at ' + where if where else ''}" if p.get("encap") == "udp" else ""
            lines.append(
                f"{line}; key {'yes' if p['key'] else 'no'}{udp}"
                f"\n    traffic: {_rate(r, 'decap', 'packets', c.get('decap_packets', 0))}, "
                f"{_rate(r, 'encap', 'packets', c.get('encap_packets', 0))}"
            )
        lines.append(_drops_line(doc))
        return "\n".join(lines)
    t = doc.get("tunnel")
    if t:
        lines.append(
            f"  tunnel: local {t['local']}, key {'yes' if t['key'] else 'no'}, "
            f"keepalive {t['keepalive'] or 'off'}, on tunnel down {t['on_tunnel_down']}, "
            f"select {t['select']}"
        )
        for r in doc.get("remotes") or []:
            lines.append(_remote_line("remote", r["addr"], r["state"], t["keepalive"], True))
    else:
        lines.append("  plain bridge (no tunnel)")
    width = max(len(p["device"]) for p in doc["ports"].values())
    for role, p in doc["ports"].items():
        r = (rates.get("ports") or {}).get(role)
        c = p["counters"]
        lines.append(
            f"  port {role:<3} {p['device']:<{width}}: "
            f"{_rate(r, 'rx', 'frames', c['rx_frames'])}, "
            f"{_rate(r, 'tx', 'frames', c['tx_frames'])}"
        )
    if t:
        r = rates.get("tunnel")
        c = t["counters"]
        lines.append(
            f"  traffic: {_rate(r, 'encap', 'packets', c['encap_packets'])}, "
            f"{_rate(r, 'decap', 'packets', c['decap_packets'])}"
        )
    lines.append(_drops_line(doc))
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show running instances (like `wg show`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    """Every instance of this network namespace; 1 if there is none, or
    one did not answer."""
    names = instances()
    if not names:
        print(NO_INSTANCE, file=sys.stderr)
        return 1
    docs, failed = [], False
    for name in names:
        try:
            docs.append(query(name))
        except (OSError, ValueError) as e:
            failed = True
            why = "no answer in time" if isinstance(e, TimeoutError) else str(e)
            print(f"tpb: @{name}: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps(docs, indent=1))
    else:
        print("\n\n".join(render(d) for d in docs))
    return 1 if failed else 0
