"""Command line: `tpb run`, `tpb check`, `tpb pop`, `tpb demo`.

Every operator error is one line on stderr (one per problem) and exit
status 2; a failure while running (the loop, a port gone, the counters
file at exit) exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from tpb import config
from tpb.errors import EXIT_CONFIG, EXIT_RUNTIME, TpbError
from tpb.log import log, set_level, setup


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        log.error("%s", message)
        raise SystemExit(EXIT_CONFIG)


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
    "encap": ("tunnel", "encap"),
    "router_mac": ("tunnel", "router_mac"),
    "mark": ("select", "mark"),
    "match": ("select", "match"),
    "cpu": ("bridge", "cpu"),
    "ring_frames": ("bridge", "ring_frames"),
    "batch": ("bridge", "batch"),
    "spin_us": ("bridge", "spin_us"),
    "workers": ("bridge", "workers"),
    "backend": ("bridge", "backend"),
    "busy_poll": ("bridge", "busy_poll"),
    "priority": ("bridge", "priority"),
    "shed": ("bridge", "shed"),
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
        "toward a POP. Flags override the configuration file. SIGHUP reloads it.",
    )
    _add_run_flags(r)


def _add_run_flags(r: argparse.ArgumentParser) -> None:
    """`tpb run`'s flags; `tpb check` takes the same ones."""
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
    g.add_argument("--encap", choices=["gre", "udp"],
                   help="gre: GRE straight in IPv4 (the default); udp: GRE-in-UDP "
                   "(RFC 8086, port 4754), which crosses NAT")
    g.add_argument("--keepalive", metavar="PERIOD,RETRIES",
                   help='keepalives to each POP, e.g. 10s,3 (off; 20s,3 with --encap udp)')
    g.add_argument("--no-keepalive", dest="keepalive", action="store_const", const="off",
                   help="no keepalives: every POP counts as up")
    g.add_argument("--router-mac", metavar="MAC",
                   help="--in's router (the enterprise gateway): unwrapped packets addressed "
                   "to TPB go to it (default: learned from the first selected frame)")
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
    b.add_argument(
        "--backend",
        metavar="NAME",
        help="packet (AF_PACKET, the default; every mode) or afxdp (AF_XDP with an XDP "
        "program on each port; plain bridging, one worker, port MTU up to 3822)",
    )
    b.add_argument(
        "--busy-poll",
        type=_number,
        metavar="US",
        help="backend afxdp: preferred busy polling of the ports' NAPI, this many "
        "microseconds per poll (0, the default: off)",
    )
    b.add_argument(
        "--workers",
        type=_number,
        help="forwarding threads sharing the ports' traffic by flow (1; plain bridging only; "
        "with --cpu, worker k runs on CPU cpu+k)",
    )
    b.add_argument(
        "--priority",
        type=_number,
        help="run the forwarding threads SCHED_FIFO at this priority (1-99; 0, the default: "
        "normal scheduling); under a flood the receive softirq then runs in TPB's own "
        "system calls and the kernel drops the excess in its input backlog",
    )
    b.add_argument("--shed", action=argparse.BooleanOptionalAction, default=None,
                   help="backend packet, one worker: when TPB cannot keep up with a port, an "
                   "XDP program there drops the excess fairly by flow, before the kernel's "
                   "receive work (default on)")
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
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser,
                           help="`tpb COMMAND --help` says more")
    _add_run(sub)
    c = sub.add_parser(
        "check",
        help="check a configuration (and this host) as `tpb run` / `tpb pop` would",
        description="Every check `tpb run` (or, for a [pop] table, `tpb pop`) makes before "
        "it opens a port: the settings, the match rules (nft -c), the interfaces, the "
        "addresses, the MTU. Takes `tpb run`'s flags. Every problem is one line; exit "
        "status 2 if there is any.",
    )
    _add_run_flags(c)
    c.add_argument("--offline", action="store_true",
                   help="check the settings only, not this host (a file for another machine)")
    from tpb.pop_config import add_parser as add_pop

    add_pop(sub)
    from tpb.status import add_parser as add_status

    add_status(sub)
    sub.add_parser("demo", help="run TPB on the built-in lab topology")
    return p


def _merge_run_flags(args: argparse.Namespace, data: dict[str, Any], src: config.Source) -> None:
    flags = {RUN_FLAGS[d]: getattr(args, d) for d in RUN_FLAGS}
    if args.remote:  # repeated and comma-separated alike
        flags[RUN_FLAGS["remote"]] = ",".join(args.remote)
    names = {RUN_FLAGS[d]: "--" + d.replace("_if", "").replace("_", "-") for d in RUN_FLAGS}
    config.merge_flags(data, src, flags, names)


def run_settings(args: argparse.Namespace) -> tuple[config.Settings, config.Source]:
    """The file (if any) and the flags, flags winning; called again as it
    is on SIGHUP, so nothing here may change `args`."""
    path = args.config or config.DEFAULT_PATH
    data, src = config.read_file(path, required=args.config is not None)
    _merge_run_flags(args, data, src)
    return config.build_settings(data, src), src


def _check(args: argparse.Namespace) -> int:
    """`tpb check`: what the file and the flags hold — `tpb run`'s settings,
    `tpb pop`'s [pop] table, or both — and, unless --offline, every check
    of this host either would make before opening anything.  Every problem
    on its own line; warnings too, without failing."""
    from tpb import pop, pop_config

    flagged = any(getattr(args, d) is not None for d in RUN_FLAGS) or args.counters is not None
    path = args.config or config.DEFAULT_PATH
    # `tpb check` alone checks the default file, which must then exist.
    data, src = config.read_file(path, required=args.config is not None or not flagged)
    problems: list[str] = []
    if "pop" in data:
        try:
            ps = pop_config.build({"pop": data["pop"]}, src)
            if not args.offline:
                problems += _host_problems(lambda: pop.preflight(ps, src))
        except config.ConfigError as e:
            problems += e.problems
    if set(data) - {"pop"} or flagged or "pop" not in data:
        _merge_run_flags(args, data, src)
        try:
            s = config.build_settings(data, src)
            if not args.offline:
                problems += _run_host_problems(s, src, args.counters)
        except config.ConfigError as e:
            problems += e.problems
    if problems:
        # both tables' checks may find the same thing (no privileges)
        raise config.ConfigError(list(dict.fromkeys(problems)))
    print(f"{src.path or 'command line'}: ok")
    return 0


def _host_problems(check: Any) -> list[str]:
    from tpb.ports import require_privileges

    problems = []
    try:
        require_privileges()
    except TpbError as e:
        problems.append(str(e))
    try:
        check()
    except config.ConfigError as e:
        problems += e.problems
    return problems


def _run_host_problems(s: config.Settings, src: config.Source, counters: str | None) -> list[str]:
    """bridge.preflight() and the match rules through `nft -c` (which needs
    privileges, and the --in port to hook)."""
    from tpb import bridge
    from tpb.ports import require_privileges
    from tpb.select import check_rules

    problems = []
    try:
        require_privileges()
        privileged = True
    except TpbError as e:
        problems.append(str(e))
        privileged = False
    try:
        _, warnings = bridge.preflight(s, src, counters)
        for w in warnings:
            log.warning("%s", w)
        ports_ok = True
    except config.ConfigError as e:
        problems += e.problems
        ports_ok = not any(p.startswith(f"--in {s.in_if}:") for p in e.problems)
    if s.tunnel is not None and privileged and ports_ok:
        assert s.in_if
        try:
            check_rules(s.in_if, s.mark, s.match)
        except TpbError as e:
            problems.append(str(e))
    return problems


class Terminated(BaseException):
    """SIGTERM outside the forwarding loop: unwinds every cleanup block."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated


def _hangup(_signum: int, _frame: object) -> None:
    # A SIGHUP while starting is kept for the running daemon to act on
    # (service.serve); it must not end the process, as its default would.
    from tpb.service import request_reload

    request_reload()


def main(argv: Sequence[str] | None = None) -> int:
    setup()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _hangup)
    try:
        return _main(argv)
    except Terminated:
        log.info("terminated")
        return 143
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        if args.cmd == "run":
            from tpb.bridge import run

            settings, src = run_settings(args)
            set_level(settings.log_level)
            return run(settings, args.counters, src, lambda: run_settings(args))
        if args.cmd == "check":
            return _check(args)
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
            log.error("%s", problem)
        return e.exit_code
    except TpbError as e:
        log.error("%s", e)
        return e.exit_code
    except Exception as e:  # a bug: one line, the traceback only at debug level
        log.debug("%s", traceback.format_exc().rstrip())
        log.error("internal error: %s: %s", type(e).__name__, e)
        return EXIT_RUNTIME
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
