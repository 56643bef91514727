"""`tpb pop`: the far end of many bridges' tunnels.

    tpb pop --local ADDR --peer ADDR[,key=N][,csum][,seq][,keepalive=10s,3][,prefix=CIDR...] ...
            [--tun NAME]

or the same in the TOML file's [pop] table with [[pop.peer]] entries.  GRE
arrives on a raw IPv4 socket (the host reassembles fragments), inner
packets leave through a TUN device that TPB creates, and the host routes
them on; what the host routes back into the TUN device goes to the bridge
behind whose prefix (or learned address) the destination is.  The C helper
does every packet; Python creates the TUN device, adds the prefixes' routes,
and reads counters.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from tpb import config
from tpb.errors import TpbError

DEFAULT_TUN = "tpbpop0"
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01


@dataclass
class Peer:
    address: str
    key: int | None = None
    csum: bool = False
    seq: bool = False
    ttl: int | None = 64
    tos: int | None = None
    prefixes: list[str] = field(default_factory=list)
    keepalive: config.Keepalive | None = None


@dataclass
class PopSettings:
    local: str
    tun: str = DEFAULT_TUN
    learn_timeout: int = 300
    peers: list[Peer] = field(default_factory=list)


def _prefix(v: Any) -> str:
    try:
        return str(ipaddress.ip_network(v, strict=True))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a prefix: {v!r} ({e})") from None


def _prefixes(v: Any) -> list[str]:
    if not isinstance(v, list):
        raise ValueError('must be a list of prefixes, e.g. ["192.0.2.0/24"]')
    return [_prefix(x) for x in v]


POP_SCHEMA = {
    "local": config._ipv4,
    "tun": config._name,
    "learn_timeout": config._int(1, 86400),
}
PEER_SCHEMA = {
    "address": config._ipv4,
    "key": config._int(0, config.U32),
    "csum": config._bool,
    "seq": config._bool,
    "ttl": config._int_or_inherit(1, 255),
    "tos": config._int_or_inherit(0, 255),
    "prefixes": _prefixes,
    "keepalive": config._keepalive,
}


def parse_peer_flag(text: str) -> dict[str, Any]:
    """ADDR[,key=N][,csum][,seq][,ttl=N|inherit][,tos=N|inherit][,keepalive=PERIOD,RETRIES|off]
    [,prefix=CIDR...]; keepalive's value has a comma of its own ("keepalive=10s,3")."""
    parts = [p.strip() for p in text.split(",")]
    out: dict[str, Any] = {"address": parts[0], "prefixes": []}
    i = 1
    while i < len(parts):
        part = parts[i]
        i += 1
        name, eq, value = part.partition("=")
        if name in ("csum", "seq") and not eq:
            out[name] = True
        elif name == "prefix" and eq:
            out["prefixes"].append(value)
        elif name == "keepalive" and eq:
            if value != "off" and i < len(parts) and "=" not in parts[i] and parts[i] not in (
                "csum", "seq"
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
        for pfx in pv.get("prefixes", []):
            if pfx in seen:
                problems.append(f"{where}: prefix {pfx} is already behind peer {seen[pfx]}")
            seen[pfx] = pv["address"]
        if any(p.address == pv["address"] for p in peers):
            problems.append(f"{where}: peer {pv['address']} is given twice")
        peers.append(Peer(**pv))
    if not peers and not problems and not peers_raw:
        problems.append(f"{src.where('pop')}: tpb pop needs at least one peer (--peer)")
    if problems:
        raise config.ConfigError(problems)
    return PopSettings(peers=peers, **vals)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pop", help="terminate the GRE tunnels of many bridges")
    p.add_argument("--config", help=f"TOML file with a [pop] table ({config.DEFAULT_PATH})")
    p.add_argument("--local", metavar="ADDR", help="this POP's tunnel address")
    p.add_argument(
        "--peer",
        action="append",
        metavar="SPEC",
        help="ADDR[,key=N][,csum][,seq][,ttl=N|inherit][,tos=N|inherit]"
        "[,keepalive=PERIOD,RETRIES][,prefix=CIDR...] (repeatable); keepalive=10s,3 sends"
        " the POP's own keepalives to that bridge every 10 s and counts it down after 3"
        " unanswered periods (off by default; the POP always reflects a bridge's)",
    )
    p.add_argument("--tun", metavar="NAME", help=f"TUN device to create ({DEFAULT_TUN})")
    p.add_argument("--learn-timeout", type=int, metavar="S", help="learned entries expire (300)")
    p.add_argument("--counters", metavar="FILE", help="at exit, write the counters as JSON")


def settings_from(args: argparse.Namespace) -> PopSettings:
    path = args.config or config.DEFAULT_PATH
    data, src = config.read_file(path, required=args.config is not None)
    # A file for `tpb run` may sit at the default path: take only [pop].
    if args.config is None:
        data = {k: v for k, v in data.items() if k == "pop"}
    pop = data.setdefault("pop", {})
    for flag, key in (("local", "local"), ("tun", "tun"), ("learn_timeout", "learn_timeout")):
        value = getattr(args, flag)
        if value is not None:
            pop[key] = value
            src.flags[("pop", key)] = "--" + flag.replace("_", "-")
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
    return settings


def _ip(*argv: str) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if r.returncode:
        raise TpbError(f"ip {' '.join(argv)}: {r.stderr.strip()}")


def _prefix_struct(pfx: str) -> tuple[bytes, int]:
    net = ipaddress.ip_network(pfx)
    if net.version == 4:
        return bytes(10) + b"\xff\xff" + net.network_address.packed, net.prefixlen + 96
    return net.network_address.packed, net.prefixlen


def main(args: argparse.Namespace) -> int:
    from tpb.native import NativePop
    from tpb.ports import require_privileges

    s = settings_from(args)
    require_privileges()
    try:
        from pytun import IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunTapDevice
    except ImportError:
        raise TpbError("python-pytun is not installed") from None
    try:
        # A vnet header on every packet: what the host's GRO merged goes
        # back to the kernel as a super-packet (pop.c: tun_write).
        tun = TunTapDevice(name=s.tun, flags=IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    except Exception as e:  # pytun raises its own Error for every failure
        raise TpbError(f"cannot create TUN device {s.tun}: {e}") from None
    try:
        # Checksum offload only (no TSO: the kernel sends no super-packet).
        # A partial checksum reaches pop.c, which completes it as RFC 1071
        # computes it: Linux's own completion writes a TCP checksum of zero
        # as 0xffff, which decoders flag.
        fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, TUN_F_CSUM)
        _ip("link", "set", tun.name, "up")
        for peer in s.peers:
            for pfx in peer.prefixes:
                # `add`, not `replace`: a prefix that is already routed (the
                # POP's own link, say) is a configuration error to show,
                # not a route to take over and lose at exit.
                r = subprocess.run(["ip", "route", "add", pfx, "dev", tun.name],
                                   capture_output=True, text=True)
                if r.returncode:
                    raise TpbError(f"peer {peer.address}: prefix {pfx}: cannot route it "
                                   f"into {tun.name}: {r.stderr.strip()}")
        prefixes = [
            (*_prefix_struct(p), i) for i, peer in enumerate(s.peers) for p in peer.prefixes
        ]
        pop = NativePop(s, tun.fileno(), tun.mtu, prefixes)
        return _loop(pop, s, args.counters)
    finally:
        tun.close()  # a non-persistent TUN device goes away with its fd


def _loop(pop: Any, s: PopSettings, counters_file: str | None) -> int:
    stopping = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            pop.run()
        except BaseException as e:
            failure.append(e)
        finally:
            stopping.set()

    old = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    worker = threading.Thread(target=loop, name="tpb-pop", daemon=True)
    try:
        worker.start()
        print(
            f"tpb: pop {s.local} on {s.tun} for {len(s.peers)} bridge(s) (ctrl-c to stop)",
            file=sys.stderr,
            flush=True,
        )
        while not stopping.wait(0.5):
            pass
    finally:
        pop.stop()
        worker.join()
        for sig, h in old.items():
            signal.signal(sig, h)
        counters = pop.counters()
        pop.close()
        print(summary(counters), flush=True)
        if counters_file:
            with open(counters_file, "w") as f:
                json.dump(counters, f, indent=1)
    if failure:
        raise failure[0]
    return 0


def summary(counters: dict[str, Any]) -> str:
    parts = []
    for name, c in counters["peers"].items():
        drops = " ".join(f"{k}={v}" for k, v in c["drop"].items()) or "none"
        parts.append(
            f"{name}: in {c['decap_packets']} packets, out {c['encap_packets']} "
            f"packets, drops {drops}"
        )
    other = " ".join(f"{k}={v}" for k, v in counters["other"]["drop"].items()) or "none"
    parts.append(f"no peer: drops {other}")
    return "tpb: " + "; ".join(parts)
