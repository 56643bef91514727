"""Configuration: one TOML file (annotated example: appliance/tpb.toml) and
command-line flags for the same settings, flags winning.

Every problem is reported with where it came from — `file:line` for the
file, `--flag` for a flag — one line each, so `tpb check` and `tpb run`
can print them all at once and exit 2.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tpb.errors import EXIT_NOT_READY, TpbError

DEFAULT_PATH = "/etc/tpb/tpb.toml"
U32 = 2**32 - 1


class ConfigError(TpbError):
    """Several problems, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class PortsNotReady(ConfigError):
    """Only ports missing or down: the host is not ready yet, and a later
    start may succeed (exit status 3, which the units restart)."""

    exit_code = EXIT_NOT_READY


# ---- the settings ---------------------------------------------------------


@dataclass(frozen=True)
class Keepalive:
    """Cisco-style keepalives: one every `period` seconds; a POP that
    leaves `retries` of them unanswered in a row is down."""

    period: float
    retries: int

    def __str__(self) -> str:
        return f"{self.period:g}s,{self.retries}"


@dataclass
class Tunnel:
    local: str
    remote: list[str]  # the POPs, in order of preference
    key: int | None = None
    csum: bool = False
    seq: bool = False
    ttl: int | None = 64  # None: inherit from the inner packet
    tos: int | None = None  # None: inherit
    df: str = "copy"  # copy | set | clear
    fragment: str = "inner"  # inner | outer
    pmtud: bool = True
    mss: int = 0  # 0: MTU - overhead - 40
    icmp_rate: int = 100
    reassembly_memory: int = 4 * 1024 * 1024
    reassembly_timeout: float = 30.0
    keepalive: Keepalive | None = None  # None: off, every POP counts as up
    on_tunnel_down: str = "bypass"  # bypass | drop
    encap: str = "gre"  # gre | udp (GRE-in-UDP, RFC 8086)
    router_mac: str | None = None  # --in's router, pinned; None: learned


# With GRE-in-UDP keepalives are on unless turned off: they keep a NAT's
# UDP mapping open, so they come more often than common UDP timeouts (30 s
# for an unanswered flow in Linux conntrack, WireGuard's advice is 25 s).
UDP_KEEPALIVE = Keepalive(20.0, 3)


DEFAULT_METRICS_RUN = "127.0.0.1:9547"
DEFAULT_METRICS_POP = "127.0.0.1:9548"


@dataclass
class Settings:
    in_if: str | None = None
    out_if: str | None = None
    tunnel: Tunnel | None = None
    mark: int = 47
    match: list[str] = field(default_factory=list)
    cpu: int | None = None
    ring_frames: int = 8192
    batch: int = 64
    spin_us: int = 0
    workers: int = 1  # forwarding threads, ports' traffic shared by flow
    backend: str = "packet"  # packet (AF_PACKET) | afxdp (AF_XDP, plain bridging)
    busy_poll: int = 0  # afxdp: SO_BUSY_POLL microseconds, preferred busy polling; 0: off
    priority: int = 0  # SCHED_FIFO priority of the forwarding threads; 0: normal
    shed: bool = True  # backend packet, one worker: XDP drops what TPB cannot keep up with
    low_latency: bool = True
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9547)  # None: off
    log_level: str = "info"


# [bridge]'s settings, in the order `tpb config` shows them.
BRIDGE_KEYS = ("cpu", "ring_frames", "batch", "spin_us", "workers", "backend", "busy_poll",
               "priority", "shed", "low_latency", "metrics_listen", "log_level")


def run_items(s: Settings) -> dict[str, Any]:
    """Every setting by its name in the file ("tunnel.key"), for telling
    what a reload changes; a plain bridge has no tunnel.* or select.*."""
    out: dict[str, Any] = {"ports.in": s.in_if, "ports.out": s.out_if}
    if s.tunnel is not None:
        for f in fields(Tunnel):
            out[f"tunnel.{f.name}"] = getattr(s.tunnel, f.name)
        out["select.mark"] = s.mark
        out["select.match"] = s.match
    for key in BRIDGE_KEYS:
        out[f"bridge.{key}"] = getattr(s, key)
    return out


def show(value: Any) -> str:
    """A setting's value as the file would spell it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple) and len(value) == 2:  # a listen address
        return f"{value[0]}:{value[1]}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'name old -> new' for every setting that differs, in `new`'s order."""
    out = []
    for key in dict.fromkeys([*new, *old]):
        a, b = old.get(key), new.get(key)
        if a != b:
            out.append(f"{key} {show(a)} -> {show(b)}")
    return out


# ---- checkers: value -> converted value, or raise ValueError(why) ---------


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        if not lo <= v <= hi:
            raise ValueError(f"must be from {lo} to {hi}, not {v}")
        return v

    return check


def _int_or_inherit(lo: int, hi: int) -> Callable[[Any], int | None]:
    num = _int(lo, hi)

    def check(v: Any) -> int | None:
        if v == "inherit":
            return None
        try:
            return num(v)
        except ValueError:
            raise ValueError(f'must be "inherit" or a number from {lo} to {hi}') from None

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(v)

    return check


def _ipv4(v: Any) -> str:
    try:
        addr = ipaddress.IPv4Address(v)
    except (ipaddress.AddressValueError, ValueError):
        raise ValueError(f"not an IPv4 address: {v!r}") from None
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address(U32):
        raise ValueError(f"not a unicast address: {v}")
    return str(addr)


def _mac(v: Any) -> str:
    """A unicast Ethernet address, as aa:bb:cc:dd:ee:ff (or with dashes)."""
    if not isinstance(v, str) or not re.fullmatch(r"[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}", v):
        raise ValueError(f"not a MAC address (aa:bb:cc:dd:ee:ff): {v!r}")
    mac = v.lower().replace("-", ":")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise ValueError(f"not a unicast MAC address: {mac}")
    return mac


def _name(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[^\s/]{1,15}", v):
        raise ValueError("must be an interface name (1-15 characters)")
    return v


def _match(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise ValueError('must be a list of nft expressions, e.g. ["ip daddr 203.0.113.0/24"]')
    return [x.strip() for x in v]


MAX_REMOTES = 8


def _remotes(v: Any) -> list[str]:
    """One address, a list, or a comma-separated string (flags), in order
    of preference."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError('must be an address or a list of them, e.g. ["198.51.100.34"]')
    out = [_ipv4(x.strip() if isinstance(x, str) else x) for x in items]
    if len(set(out)) != len(out):
        raise ValueError("lists an address twice")
    if len(out) > MAX_REMOTES:
        raise ValueError(f"lists more than {MAX_REMOTES} POPs")
    return out


def parse_duration(text: str) -> float:
    """'10s', '500ms', '2m' or a bare number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 10s, 500ms)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def _keepalive(v: Any) -> Keepalive | None:
    """'PERIOD,RETRIES' (e.g. "10s,3"), or "off" / false."""
    if v is False or v == "off":
        return None
    if not isinstance(v, str) or v.count(",") != 1:
        raise ValueError('must be "PERIOD,RETRIES" (e.g. "10s,3") or "off"')
    period_text, retries_text = v.split(",")
    period = parse_duration(period_text)
    if not 0.1 <= period <= 3600:
        raise ValueError(f"period must be from 100ms to 3600s, not {period_text.strip()}")
    if not retries_text.strip().isdigit() or not 1 <= int(retries_text) <= 255:
        raise ValueError(f"retries must be from 1 to 255, not {retries_text.strip()}")
    return Keepalive(period, int(retries_text))


def _listen(v: Any) -> tuple[str, int] | None:
    """'ADDR:PORT' ('[v6]:PORT' for IPv6), or "off"."""
    if v is False or v == "off":
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", v) if isinstance(
        v, str) else None
    if not m:
        raise ValueError('must be "ADDR:PORT" (e.g. "127.0.0.1:9547") or "off"')
    addr, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"not an IP address: {addr!r}") from None
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be from 1 to 65535, not {port}")
    return addr, int(port)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 1 <= v <= 3600:
        raise ValueError("must be a number of seconds from 1 to 3600")
    return float(v)


RUN_SCHEMA: dict[str, dict[str, Callable[[Any], Any]]] = {
    "ports": {"in": _name, "out": _name},
    "tunnel": {
        "local": _ipv4,
        "remote": _remotes,
        "key": _int(0, U32),
        "csum": _bool,
        "seq": _bool,
        "ttl": _int_or_inherit(1, 255),
        "tos": _int_or_inherit(0, 255),
        "df": _choice("copy", "set", "clear"),
        "fragment": _choice("inner", "outer"),
        "pmtud": _bool,
        "mss": _int(0, 65535),
        "icmp_rate": _int(0, 1_000_000),
        "reassembly_memory": _int(65536, 1 << 30),
        "reassembly_timeout": _seconds,
        "keepalive": _keepalive,
        "on_tunnel_down": _choice("bypass", "drop"),
        "encap": _choice("gre", "udp"),
        "router_mac": _mac,
    },
    "select": {"mark": _int(1, U32), "match": _match},
    "bridge": {
        "cpu": _int(0, 4095),
        "ring_frames": _int(16, 65536),
        "batch": _int(1, 256),
        "spin_us": _int(0, 100_000),
        "workers": _int(1, 64),
        "backend": _choice("packet", "afxdp"),
        "busy_poll": _int(0, 1_000_000),
        "priority": _int(0, 99),
        "shed": _bool,
        "low_latency": _bool,
        "metrics_listen": _listen,
        "log_level": _choice(*LOG_LEVELS),
    },
}


# ---- reading the file, with line numbers ----------------------------------


def _locate(text: str) -> dict[tuple[str, ...], int]:
    """(table..., key) -> line, and (table...,) -> line of its header.
    Arrays of tables get the index: ("pop", "peer", "0", "address")."""
    where: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    counts: dict[tuple[str, ...], int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if m := re.fullmatch(r"\[\[\s*([\w.\-]+)\s*\]\]", line):
            base = tuple(m.group(1).split("."))
            idx = counts.get(base, 0)
            counts[base] = idx + 1
            table = (*base, str(idx))
            where.setdefault(table, n)
        elif m := re.fullmatch(r"\[\s*([\w.\-]+)\s*\]", line):
            table = tuple(m.group(1).split("."))
            where.setdefault(table, n)
        elif m := re.match(r'([\w\-."]+?)\s*=', line):
            # a dotted key (a.b = 1) names every table on its way
            parts = tuple(p.strip('"') for p in m.group(1).split("."))
            for i in range(1, len(parts) + 1):
                where.setdefault((*table, *parts[:i]), n)
    return where


@dataclass
class Source:
    """Where settings came from, for messages."""

    path: str | None = None
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    flags: dict[tuple[str, ...], str] = field(default_factory=dict)

    def where(self, *key: str) -> str:
        if key in self.flags:
            return self.flags[key]
        for k in (key, key[:-1], key[:1]):
            if k in self.lines:
                return f"{self.path}:{self.lines[k]}"
        return self.path or "config"


def read_file(path: str, required: bool) -> tuple[dict[str, Any], Source]:
    p = Path(path)
    if not p.exists():
        if required:
            raise ConfigError([f"{path}: no such file"])
        return {}, Source()
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: {e.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        msg = re.sub(r"\s*\(at line.*\)", "", str(e))
        raise ConfigError([f"{path}:{m.group(1) if m else '?'}: {msg}"]) from None
    return data, Source(path, _locate(text))


def merge_flags(
    data: dict[str, Any],
    src: Source,
    flags: dict[tuple[str, str], Any],
    names: dict[tuple[str, str], str],
) -> None:
    """Flag values (already given) override the file's.  A selection flag
    replaces the file's selection, whichever kind it was."""
    for (section, key), value in flags.items():
        if value is None:
            continue
        if section == "select" and isinstance(data.get("select"), dict):
            data["select"].pop("match" if key == "mark" else "mark", None)
        data.setdefault(section, {})[key] = value
        src.flags[(section, key)] = names[(section, key)]


def check_schema(
    data: dict[str, Any],
    src: Source,
    schema: dict[str, dict[str, Callable[[Any], Any]]],
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    """Converted values by section; every problem appended to problems."""
    out: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section == "pop" and "pop" not in schema:
            continue  # tpb pop's table: `tpb pop` (and `tpb check`) validate it
        if section not in schema:
            problems.append(f"{src.where(section)}: unknown section [{section}]")
            continue
        if not isinstance(values, dict):
            problems.append(f"{src.where(section)}: {section} must be a table")
            continue
        out[section] = {}
        for key, value in values.items():
            check = schema[section].get(key)
            if check is None:
                problems.append(f"{src.where(section, key)}: unknown setting {section}.{key}")
                continue
            try:
                out[section][key] = check(value)
            except ValueError as e:
                problems.append(f"{src.where(section, key)}: {section}.{key} {e}")
    return out


def build_settings(data: dict[str, Any], src: Source) -> Settings:
    """Validated Settings for `tpb run`, or ConfigError with every problem."""
    problems: list[str] = []
    v = check_schema(data, src, RUN_SCHEMA, problems)
    s = Settings()
    ports, tun, sel, br = (v.get(k, {}) for k in ("ports", "tunnel", "select", "bridge"))
    s.in_if, s.out_if = ports.get("in"), ports.get("out")
    for key in BRIDGE_KEYS:
        if key in br:
            setattr(s, key, br[key])
    if "mark" in sel and "match" in sel:
        problems.append(
            f"{src.where('select', 'match')}: select.mark and select.match "
            "exclude each other: choose one"
        )
    s.mark = sel.get("mark", 47)
    s.match = sel.get("match", [])
    if tun:
        missing = [k for k in ("local", "remote") if k not in tun]
        if missing:
            problems.append(
                f"{src.where('tunnel')}: tunnel needs "
                + " and ".join(f"tunnel.{k}" for k in missing)
            )
        else:
            if tun["local"] in tun["remote"]:
                problems.append(
                    f"{src.where('tunnel', 'remote')}: tunnel.remote equals tunnel.local"
                )
            if tun.get("encap") == "udp" and "keepalive" not in tun:
                tun["keepalive"] = UDP_KEEPALIVE
            s.tunnel = Tunnel(**tun)
    elif "select" in data and not problems:
        problems.append(
            f"{src.where('select')}: [select] needs a tunnel (tunnel.local and tunnel.remote)"
        )
    if s.workers > 1 and s.tunnel is not None:
        # Each worker would keep its own keepalive state, sequence numbers
        # and reassembly; the POP's answers reach only one of them.
        problems.append(
            f"{src.where('bridge', 'workers')}: bridge.workers {s.workers}: more than one "
            "worker is for plain bridging only (no tunnel)"
        )
    if s.backend == "afxdp":
        # XDP runs in the driver, before the netdev ingress hook where
        # TPB's nftables table marks the selected flows: nothing an XDP
        # socket receives can carry the mark.
        where = src.where("bridge", "backend")
        if s.tunnel is not None:
            problems.append(f"{where}: bridge.backend afxdp is for plain bridging only "
                            "(no tunnel): selection by nftables mark needs backend packet")
        if s.workers > 1:
            problems.append(f"{src.where('bridge', 'workers')}: bridge.workers {s.workers}: "
                            "backend afxdp runs one worker (one queue per port)")
    elif s.busy_poll:
        problems.append(f"{src.where('bridge', 'busy_poll')}: bridge.busy_poll is for "
                        "backend afxdp only")
    if "in" not in data.get("ports", {}) or "out" not in data.get("ports", {}):
        problems.append(
            f"{src.path or 'config'}: both ports are needed (--in and --out, "
            "or ports.in and ports.out)"
        )
    if problems:
        raise ConfigError(problems)
    return s
