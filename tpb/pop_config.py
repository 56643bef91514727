"""`tpb pop`'s configuration: its [pop] table and [[pop.peer]] entries,
the `--peer ADDR[,key=N][,csum][,udp]...` flags, checked together
(`build`) into PopSettings; the flags win over the file (`settings_from`).
tpb/pop.py runs what this describes.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tpb import config
from tpb.config import Source

DEFAULT_TUN = "tpbpop0"


@dataclass
class Peer:
    address: str  # the bridge's address, or "any": behind NAT (udp, found by its key)
    key: int | None = None
    csum: bool = False
    seq: bool = False
    ttl: int | None = 64
    tos: int | None = None
    prefixes: list[str] = field(default_factory=list)
    keepalive: config.Keepalive | None = None
    encap: str = "gre"  # gre | udp (GRE-in-UDP, RFC 8086)

    @property
    def name(self) -> str:
        """How counters, metrics, logs and reloads name the peer: its address,
        or for a peer behind NAT (any) its key, the one thing that tells such
        peers apart."""
        return self.address if self.address != "any" else f"any/key={self.key}"


@dataclass
class PopSettings:
    local: str
    tun: str = DEFAULT_TUN
    learn_timeout: int = 300
    peers: list[Peer] = field(default_factory=list)
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9548)  # None: off
    log_level: str = "info"


def _prefix(v: Any) -> str:
    try:
        return str(ipaddress.ip_network(v, strict=True))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a prefix: {v!r} ({e})") from None


def _prefixes(v: Any) -> list[str]:
    if not isinstance(v, list):
        raise ValueError('must be a list of prefixes, e.g. ["192.0.2.0/24"]')
    return [_prefix(x) for x in v]


def _peer_address(v: Any) -> str:
    return "any" if v == "any" else config._ipv4(v)


POP_SCHEMA = {
    "local": config._ipv4,
    "tun": config._name,
    "learn_timeout": config._int(1, 86400),
    "metrics_listen": config._listen,
    "log_level": config._choice(*config.LOG_LEVELS),
}
PEER_SCHEMA = {
    "address": _peer_address,
    "key": config._int(0, config.U32),
    "csum": config._bool,
    "seq": config._bool,
    "ttl": config._int_or_inherit(1, 255),
    "tos": config._int_or_inherit(0, 255),
    "prefixes": _prefixes,
    "keepalive": config._keepalive,
    "encap": config._choice("gre", "udp"),
}
PEER_BOOLS = [k for k, check in PEER_SCHEMA.items() if check is config._bool]


def parse_peer_flag(text: str) -> dict[str, Any]:
    """ADDR|any[,gre|udp][,key=N][,[no-]csum][,[no-]seq][,ttl=N|inherit][,tos=N|inherit]
    [,keepalive=PERIOD,RETRIES|off][,prefix=CIDR...]; keepalive's value has a comma of its
    own ("keepalive=10s,3")."""
    parts = [p.strip() for p in text.split(",")]
    out: dict[str, Any] = {"address": parts[0], "prefixes": []}
    i = 1
    while i < len(parts):
        part = parts[i]
        i += 1
        name, eq, value = part.partition("=")
        if name in ("gre", "udp") and not eq:
            out["encap"] = name
        elif name in PEER_BOOLS and not eq:
            out[name] = True
        elif name.startswith("no-") and name[3:] in PEER_BOOLS and not eq:
            out[name[3:]] = False
        elif name == "prefix" and eq:
            out["prefixes"].append(value)
        elif name == "keepalive" and eq:
            if value != "off" and i < len(parts) and "=" not in parts[i] and parts[i] not in (
                "csum", "seq", "gre", "udp"
            ):
                value += "," + parts[i]  # the RETRIES half
                i += 1
            out[name] = value  # the schema says what is wrong with it
        elif name in ("key", "ttl", "tos") and eq:
            try:
                out[name] = value if value == "inherit" else int(value, 0)
            except ValueError:
                out[name] = value  # the schema says what is wrong with it
        else:
            raise ValueError(f"unknown peer option {part!r}")
    return out


def build(data: dict[str, Any], src: config.Source) -> PopSettings:
    problems: list[str] = []
    pop = data.get("pop", {})
    for section in data:
        if section != "pop":
            problems.append(f"{src.where(section)}: [{section}] is not a tpb pop setting")
    vals: dict[str, Any] = {}
    peers_raw = pop.get("peer", [])
    for key, value in pop.items():
        if key == "peer":
            continue
        check = POP_SCHEMA.get(key)
        if check is None:
            problems.append(f"{src.where('pop', key)}: unknown setting pop.{key}")
            continue
        try:
            vals[key] = check(value)
        except ValueError as e:
            problems.append(f"{src.where('pop', key)}: pop.{key} {e}")
    if "local" not in vals and not any("pop.local" in p for p in problems):
        problems.append(f"{src.where('pop')}: tpb pop needs its address (--local or pop.local)")
    peers: list[Peer] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(peers_raw if isinstance(peers_raw, list) else []):
        where = src.flags.get(("pop", "peer", str(i))) or src.where("pop", "peer", str(i))
        pv: dict[str, Any] = {}
        for key, value in raw.items():
            check = PEER_SCHEMA.get(key)
            at = src.flags.get(("pop", "peer", str(i))) or src.where("pop", "peer", str(i), key)
            if check is None:
                problems.append(f"{at}: unknown peer setting {key}")
                continue
            try:
                pv[key] = check(value)
            except ValueError as e:
                problems.append(f"{at}: peer {key} {e}")
        if "address" not in pv:
            if not any(p.startswith(where) and "address" in p for p in problems):
                problems.append(f"{where}: a peer needs its address")
            continue
        peer = Peer(**pv)
        if peer.address == "any":
            # Behind NAT: only the key tells it from the others, and only
            # GRE-in-UDP crosses a NAT.
            if peer.encap != "udp" or peer.key is None:
                problems.append(f"{where}: a peer behind NAT (address any) needs udp and a key")
                continue
            if peer.keepalive is not None:
                problems.append(f"{where}: a peer behind NAT (address any) takes no keepalive "
                                "from the POP: its bridge's keepalives keep the NAT open")
        for pfx in peer.prefixes:
            if pfx in seen:
                problems.append(f"{where}: prefix {pfx} is already behind peer {seen[pfx]}")
            seen[pfx] = peer.name
        if any(p.name == peer.name for p in peers):
            problems.append(f"{where}: peer {peer.name} is given twice")
        peers.append(peer)
    if not peers and not problems and not peers_raw:
        problems.append(f"{src.where('pop')}: tpb pop needs at least one peer (--peer)")
    if problems:
        raise config.ConfigError(problems)
    return PopSettings(peers=peers, **vals)


def add_parser(sub: Any) -> None:
    from tpb.cli import add_service_flags  # cli imports this module lazily: no cycle

    p = sub.add_parser(
        "pop",
        help="terminate the GRE tunnels of many bridges",
        description="The far end of the bridges' tunnels: GRE in, a TUN device out. "
        "Flags override the configuration file's [pop] table.",
    )
    p.add_argument("--config", help=f"TOML file with a [pop] table ({config.DEFAULT_PATH})")
    p.add_argument("--local", metavar="ADDR", help="this POP's tunnel address")
    p.add_argument(
        "--peer",
        action="append",
        metavar="SPEC",
        help="ADDR|any[,gre|udp][,key=N][,[no-]csum][,[no-]seq][,ttl=N|inherit]"
        "[,tos=N|inherit][,keepalive=PERIOD,RETRIES][,prefix=CIDR...] (repeatable; replaces "
        "the file's peers); udp: GRE-in-UDP (RFC 8086, port 4754); any: a bridge behind NAT, "
        "udp and a key required, answered where its packets come from;"
        " keepalive=10s,3 sends the POP's own keepalives to that bridge every 10 s and counts"
        " it down after 3 unanswered periods (off by default; the POP always reflects a"
        " bridge's)",
    )
    p.add_argument("--tun", metavar="NAME", help=f"TUN device to create ({DEFAULT_TUN})")
    p.add_argument("--learn-timeout", type=int, metavar="S", help="learned entries expire (300)")
    add_service_flags(p.add_argument_group("service"), config.DEFAULT_METRICS_POP)
    p.add_argument("--counters", metavar="FILE", help="at exit, write the counters as JSON")


POP_FLAGS = ("local", "tun", "learn_timeout", "metrics_listen", "log_level")


def settings_from(args: argparse.Namespace) -> tuple[PopSettings, Source]:
    """The settings from the file and the flags, flags winning; called again
    as it is on SIGHUP (the same file, the same flags)."""
    path = args.config or config.DEFAULT_PATH
    data, src = config.read_file(path, required=args.config is not None)
    # A file for `tpb run` may sit at the default path: take only [pop].
    if args.config is None:
        data = {k: v for k, v in data.items() if k == "pop"}
    pop = data.setdefault("pop", {})
    for key in POP_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            pop[key] = value
            src.flags[("pop", key)] = "--" + key.replace("_", "-")
    bad: list[str] = []
    if args.peer:
        pop["peer"] = []
        for spec in args.peer:
            try:
                peer = parse_peer_flag(spec)
            except ValueError as e:
                bad.append(f"--peer {spec}: {e}")
                continue
            src.flags[("pop", "peer", str(len(pop["peer"])))] = f"--peer {spec}"
            pop["peer"].append(peer)
    try:
        settings = build(data, src)
    except config.ConfigError as e:
        # "needs a peer" says nothing new when the given peers were bad
        rest = [p for p in e.problems if not (bad and "at least one peer" in p)]
        raise config.ConfigError(bad + rest) from None
    if bad:
        raise config.ConfigError(bad)
    return settings, src
