"""Command line: `tpb run`, `tpb check`, `tpb pop`, `tpb demo`.

Every operator error is one line on stderr (one per problem) and exit
status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from tpb import config
from tpb.errors import TpbError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"tpb: {message}", file=sys.stderr)
        raise SystemExit(2)


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _number_or_inherit(text: str) -> int | str:
    return "inherit" if text == "inherit" else _number(text)


# flag dest -> (section, key) of the TOML file
RUN_FLAGS: dict[str, tuple[str, str]] = {
    "in_if": ("ports", "in"),
    "out_if": ("ports", "out"),
    "local": ("tunnel", "local"),
    "remote": ("tunnel", "remote"),
    "key": ("tunnel", "key"),
    "csum": ("tunnel", "csum"),
    "seq": ("tunnel", "seq"),
    "ttl": ("tunnel", "ttl"),
    "tos": ("tunnel", "tos"),
    "df": ("tunnel", "df"),
    "fragment": ("tunnel", "fragment"),
    "pmtud": ("tunnel", "pmtud"),
    "mss": ("tunnel", "mss"),
    "icmp_rate": ("tunnel", "icmp_rate"),
    "reassembly_memory": ("tunnel", "reassembly_memory"),
    "reassembly_timeout": ("tunnel", "reassembly_timeout"),
    "keepalive": ("tunnel", "keepalive"),
    "on_tunnel_down": ("tunnel", "on_tunnel_down"),
    "mark": ("select", "mark"),
    "match": ("select", "match"),
    "cpu": ("bridge", "cpu"),
    "ring_frames": ("bridge", "ring_frames"),
    "batch": ("bridge", "batch"),
    "spin_us": ("bridge", "spin_us"),
    "low_latency": ("bridge", "low_latency"),
    "metrics_listen": ("bridge", "metrics_listen"),
    "log_level": ("bridge", "log_level"),
}


def _seconds_flag(text: str) -> float:
    try:
        return config.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_service_flags(g: Any, default_listen: str) -> None:
    """Flags every daemon has: metrics and logging."""
    g.add_argument(
        "--metrics-listen",
        metavar="ADDR:PORT|off",
        help=f"serve Prometheus metrics here ({default_listen}); off: no endpoint",
    )
    g.add_argument(
        "--no-metrics",
        dest="metrics_listen",
        action="store_const",
        const="off",
        help="no metrics endpoint (same as --metrics-listen off)",
    )
    g.add_argument(
        "--log-level", choices=config.LOG_LEVELS, help="least important level logged (info)"
    )


def _add_run(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="bridge two ports (and tunnel selected flows)",
        description="Bridge --in and --out; with a tunnel, wrap selected IPv4 flows in GRE "
        "toward a POP. Flags override the configuration file.",
    )
    a = r.add_argument
    a("--config", help=f"TOML file (default {config.DEFAULT_PATH} if it exists)")
    a("--in", dest="in_if", metavar="IF", help="port facing the enterprise gateway")
    a("--out", dest="out_if", metavar="IF", help="port facing the ISP")
    g = r.add_argument_group("tunnel (GRE toward the POP)")
    g.add_argument("--local", metavar="ADDR", help="TPB's tunnel address")
    g.add_argument(
        "--remote",
        action="append",
        metavar="ADDR[,ADDR...]",
        help="the POP's address; several (repeated or comma-separated) in order of "
        "preference: traffic goes to the first one up",
    )
    g.add_argument("--key", type=_number, metavar="N", help="GRE key (RFC 2890)")
    g.add_argument("--csum", action=argparse.BooleanOptionalAction, default=None,
                   help="GRE checksums (off)")
    g.add_argument("--seq", action=argparse.BooleanOptionalAction, default=None,
                   help="GRE sequence numbers (off)")
    g.add_argument("--ttl", type=_number_or_inherit, metavar="N|inherit", help="outer TTL (64)")
    g.add_argument("--tos", type=_number_or_inherit, metavar="N|inherit",
                   help="outer TOS (inherit)")
    g.add_argument("--df", choices=["copy", "set", "clear"], help="outer DF policy (copy)")
    g.add_argument("--fragment", choices=["inner", "outer"],
                   help="what to fragment when too big (inner)")
    g.add_argument("--pmtud", action=argparse.BooleanOptionalAction, default=None,
                   help="DF set and too big: ICMP fragmentation needed (on); "
                   "--no-pmtud fragments instead")
    g.add_argument("--mss", type=_number, metavar="N", help="TCP MSS clamp (default MTU-H-40)")
    g.add_argument("--icmp-rate", type=_number, metavar="N", help="ICMP per second (100)")
    g.add_argument("--reassembly-memory", type=_number, metavar="BYTES",
                   help="memory for GRE fragments from the POP (4 MiB)")
    g.add_argument("--reassembly-timeout", type=_seconds_flag, metavar="SECONDS",
                   help="fragments of an incomplete datagram expire (30s)")
    g.add_argument("--keepalive", metavar="PERIOD,RETRIES",
                   help='keepalives to each POP, e.g. 10s,3 (off)')
    g.add_argument("--no-keepalive", dest="keepalive", action="store_const", const="off",
                   help="no keepalives: every POP counts as up")
    g.add_argument("--on-tunnel-down", choices=["bypass", "drop"],
                   help="selected flows while no POP is up: bridged as they are (bypass, "
                   "the default) or dropped")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--mark", type=_number, metavar="N", help="select by this mark (47)")
    s.add_argument(
        "--match", action="append", metavar="EXPR", help="select by nft expression (repeatable)"
    )
    b = r.add_argument_group("data path")
    b.add_argument("--cpu", type=_number, help="pin the data path to this CPU")
    b.add_argument(
        "--ring-frames",
        type=_number,
        help="RX ring slots of 2 KB per port (8192); longer frames have 1024 of 68 KB",
    )
    b.add_argument(
        "--batch", type=_number, help="frames taken per ring before each flush (64, at most 256)"
    )
    b.add_argument("--spin-us", type=_number, help="busy-poll before sleeping (0)")
    b.add_argument("--low-latency", action=argparse.BooleanOptionalAction, default=None,
                   help="keep idle CPUs polling, not halting, while TPB runs: wake-ups "
                   "cost no sleep-state exit (PM QoS; default on)")
    add_service_flags(r.add_argument_group("service"), config.DEFAULT_METRICS_RUN)
    a("--counters", metavar="FILE", help="at exit, also write the counters to FILE as JSON")


def _version() -> str:
    try:
        return importlib.metadata.version("tpb")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tpb", description="Transparent bridge with a GRE tunnel to a POP.")
    p.add_argument("--version", action="version", version=f"tpb {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_run(sub)
    c = sub.add_parser("check", help="validate a configuration file")
    c.add_argument("--config", default=config.DEFAULT_PATH)
    from tpb.pop import add_parser as add_pop

    add_pop(sub)
    from tpb.status import add_parser as add_status

    add_status(sub)
    sub.add_parser("demo", help="run TPB on the built-in lab topology")
    return p


def run_settings(args: argparse.Namespace) -> tuple[config.Settings, config.Source]:
    path = args.config or config.DEFAULT_PATH
    data, src = config.read_file(path, required=args.config is not None)
    if args.remote:  # repeated and comma-separated alike
        args.remote = ",".join(args.remote)
    flags = {RUN_FLAGS[d]: getattr(args, d) for d in RUN_FLAGS}
    names = {RUN_FLAGS[d]: "--" + d.replace("_if", "").replace("_", "-") for d in RUN_FLAGS}
    config.merge_flags(data, src, flags, names)
    return config.build_settings(data, src), src


def _check(path: str) -> int:
    """Validates what the file holds: `tpb run`'s settings, `tpb pop`'s
    [pop] table, or both; every problem on its own line."""
    from tpb import pop

    data, src = config.read_file(path, required=True)
    problems: list[str] = []
    parts = [("pop", lambda: pop.build({"pop": data["pop"]}, src))] if "pop" in data else []
    if set(data) - {"pop"} or not parts:
        parts.append(("run", lambda: config.build_settings(data, src)))
    for _, check in parts:
        try:
            check()
        except config.ConfigError as e:
            problems += e.problems
    if problems:
        raise config.ConfigError(problems)
    print(f"{path}: ok")
    return 0


class Terminated(BaseException):
    """SIGTERM outside the forwarding loop: unwinds every cleanup block."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    except Terminated:
        print("tpb: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tpb: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            from tpb.bridge import run

            settings, _ = run_settings(args)
            return run(settings, args.counters)
        if args.cmd == "check":
            return _check(args.config)
        if args.cmd == "pop":
            from tpb.pop import main as pop_main

            return pop_main(args)
        if args.cmd == "status":
            from tpb.status import main as status_main

            return status_main(args)
        if args.cmd == "demo":
            from tpb.demo import demo

            return demo()
    except config.ConfigError as e:
        for problem in e.problems:
            print(f"tpb: {problem}", file=sys.stderr)
        return e.exit_code
    except TpbError as e:
        print(f"tpb: {e}", file=sys.stderr)
        return e.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
