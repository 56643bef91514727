"""The command line itself: every flag of every subcommand says what it does,
every boolean setting can be turned off by a flag as well as on, and `tpb`
alone lists its subcommands.  No root, no namespaces."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpb import config, pop_config
from tpb.cli import RUN_FLAGS, build_parser

ROOT = Path(__file__).resolve().parent.parent


Parsers = Iterator[tuple[str, argparse.ArgumentParser]]


def parsers(p: argparse.ArgumentParser, name: str = "tpb") -> Parsers:
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sp in action.choices.items():
                yield from parsers(sp, f"{name} {sub}")


def test_every_flag_has_help():
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, p in parsers(build_parser())
        for a in p._actions
        if not isinstance(a, argparse._HelpAction | argparse._VersionAction)
        and (a.help is None or a.help == argparse.SUPPRESS or not a.help.strip())
    ]
    assert missing == [], f"flags without help text: {missing}"


def test_the_walk_sees_every_subcommand():
    names = {n for n, _ in parsers(build_parser())}
    assert {"tpb", "tpb run", "tpb check", "tpb pop", "tpb demo"} <= names


def options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}


def sub(name: str) -> argparse.ArgumentParser:
    return dict(parsers(build_parser()))[f"tpb {name}"]


BOOLS = sorted(
    (section, key)
    for section, keys in config.RUN_SCHEMA.items()
    for key, check in keys.items()
    if check is config._bool
)


@pytest.mark.parametrize("cmd", ["run", "check"])
@pytest.mark.parametrize("setting", BOOLS, ids=[f"{s}.{k}" for s, k in BOOLS])
def test_every_boolean_setting_has_a_flag_and_a_no_flag(cmd, setting):
    dest = next(d for d, where in RUN_FLAGS.items() if where == setting)
    flag = "--" + dest.replace("_", "-")
    p = sub(cmd)
    assert {flag, "--no-" + flag[2:]} <= options(p)
    base = ["--in", "a", "--out", "b"]
    assert getattr(p.parse_args([*base, flag]), dest) is True
    assert getattr(p.parse_args([*base, "--no-" + flag[2:]]), dest) is False
    assert getattr(p.parse_args(base), dest) is None  # unset: the file decides


def test_booleans_checked_are_the_ones_the_issue_names():
    assert {k for _, k in BOOLS} >= {"csum", "seq", "pmtud", "low_latency"}


@pytest.mark.parametrize("name", pop_config.PEER_BOOLS)
def test_every_boolean_peer_option_has_a_no_form(name):
    assert pop_config.parse_peer_flag(f"198.51.100.3,{name}")[name] is True
    assert pop_config.parse_peer_flag(f"198.51.100.3,no-{name}")[name] is False
    assert name not in pop_config.parse_peer_flag("198.51.100.3")


def test_pop_has_the_service_flags():
    p = sub("pop")
    assert {"--metrics-listen", "--no-metrics", "--log-level"} <= options(p)
    args = p.parse_args(["--no-metrics", "--log-level", "debug"])
    assert (args.metrics_listen, args.log_level) == ("off", "debug")


def tpb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tpb", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_tpb_alone_lists_its_subcommands_and_exits_2():
    res = tpb()
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("usage: tpb")
    for name in ("run", "check", "pop", "demo"):
        assert f"\n    {name} " in res.stderr, res.stderr


def test_pop_settings_from_the_file_and_flags(tmp_path):
    f = tmp_path / "pop.toml"
    f.write_text('[pop]\nlocal = "198.51.100.34"\nmetrics_listen = "127.0.0.1:9600"\n'
                 'log_level = "warning"\n[[pop.peer]]\naddress = "198.51.100.3"\n')
    p = sub("pop")
    s, _ = pop_config.settings_from(p.parse_args(["--config", str(f)]))
    assert (s.metrics_listen, s.log_level) == (("127.0.0.1", 9600), "warning")
    s, _ = pop_config.settings_from(p.parse_args(["--config", str(f), "--no-metrics",
                                           "--log-level", "debug"]))
    assert (s.metrics_listen, s.log_level) == (None, "debug")
    res = tpb("check", "--offline", "--config", str(f))
    assert res.returncode == 0, res.stderr
    f.write_text('[pop]\nlocal = "198.51.100.34"\nmetrics_listen = "nowhere"\n'
                 '[[pop.peer]]\naddress = "198.51.100.3"\n')
    res = tpb("check", "--offline", "--config", str(f))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f'tpb: {f}:3: pop.metrics_listen must be "ADDR:PORT" (e.g. "127.0.0.1:9547") or "off"'
    ]
