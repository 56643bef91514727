"""Command line: `tpb run`, `tpb demo`.  Every operator error is one line
on stderr and exit status 2; never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from tpb.errors import TpbError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"tpb: {message}", file=sys.stderr)
        raise SystemExit(2)


def _nonneg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tpb", description="Transparent bridge with a GRE tunnel to a POP.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="bridge two ports")
    r.add_argument(
        "--in", dest="in_if", required=True, metavar="IF", help="port facing the enterprise gateway"
    )
    r.add_argument("--out", dest="out_if", required=True, metavar="IF", help="port facing the ISP")
    r.add_argument("--cpu", type=_nonneg, help="pin the data path to this CPU")
    r.add_argument(
        "--ring-frames", type=_nonneg, default=1024, help="RX ring slots per port (default 1024)"
    )
    r.add_argument(
        "--batch", type=_nonneg, default=64, help="frames per sendmmsg (default 64, at most 256)"
    )
    r.add_argument(
        "--spin-us",
        type=_nonneg,
        default=50,
        help="busy-poll this long before sleeping (default 50)",
    )
    r.add_argument(
        "--counters", metavar="FILE", help="at exit, also write the counters to FILE as JSON"
    )

    sub.add_parser("demo", help="run TPB on the built-in lab topology")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            from tpb.bridge import RunOptions, run

            return run(
                RunOptions(
                    args.in_if,
                    args.out_if,
                    args.cpu,
                    args.ring_frames,
                    args.batch,
                    args.spin_us,
                    args.counters,
                )
            )
        if args.cmd == "demo":
            from tpb.demo import demo

            return demo()
    except TpbError as e:
        print(f"tpb: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tpb: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
