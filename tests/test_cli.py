"""`tpb run` as an operator meets it: bad input is one line on stderr and
exit status 2, never a traceback, and leaves the ports as they were; a
stopped or killed TPB leaves them as they were too (promiscuous mode is a
packet-socket membership the kernel takes back when the sockets close)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from helpers import NOBODY, need_tool, ports_state, tpb_argv, unprivileged_python, wait_for

pytestmark = pytest.mark.netns
LAB_SUFFIX = "c"
PORTS = ("eth2", "eth3", "lo")


def run_tpb(lab, args: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    argv = [*(prefix or []), *tpb_argv(*args)]
    return lab.run("tpb", argv, check=False, timeout=60)


def assert_refused(res: subprocess.CompletedProcess, *expect: str, status: int = 2) -> str:
    """Exit status 2 (3: only a port missing or down), one line on stderr
    that starts `tpb: ` and contains every string in `expect`, nothing on
    stdout, no traceback."""
    lines = res.stderr.splitlines()
    assert res.returncode == status, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("tpb: "), lines
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert res.stdout == "", res.stdout
    return lines[0]


BAD_INPUT = {
    "missing-out": (["--in", "eth2", "--out", "nosuch0"], ["--out nosuch0", "no such interface"]),
    "missing-in": (["--in", "nosuch0", "--out", "eth3"], ["--in nosuch0", "no such interface"]),
    "same-twice": (["--in", "eth2", "--out", "eth2"], ["eth2", "same interface"]),
    "loopback-in": (["--in", "lo", "--out", "eth3"], ["--in lo", "loopback"]),
    "loopback-out": (["--in", "eth2", "--out", "lo"], ["--out lo", "loopback"]),
    "name-too-long": (["--in", "eth2", "--out", "x" * 16], ["--out"]),
    "no-out-flag": (["--in", "eth2"], ["--out"]),
    "unknown-flag": (["--in", "eth2", "--out", "eth3", "--bogus"], ["--bogus"]),
    "cpu-not-a-number": (["--in", "eth2", "--out", "eth3", "--cpu", "x"], ["--cpu", "'x'"]),
    "cpu-negative": (["--in", "eth2", "--out", "eth3", "--cpu", "-1"], ["--cpu"]),
    "cpu-absent": (["--in", "eth2", "--out", "eth3", "--cpu", "4095"], ["--cpu"]),
    "cpu-beyond-32-bits": (["--in", "eth2", "--out", "eth3", "--cpu", str(2**32)], ["--cpu"]),
    "ring-frames-beyond-32-bits": (
        ["--in", "eth2", "--out", "eth3", "--ring-frames", str(2**32)],
        ["--ring-frames"],
    ),
    "ring-frames-wraps-32-bits": (
        ["--in", "eth2", "--out", "eth3", "--ring-frames", str(2**32 - 1)],
        ["--ring-frames"],
    ),
    "batch-beyond-32-bits": (
        ["--in", "eth2", "--out", "eth3", "--batch", str(2**32)],
        ["--batch"],
    ),
    "spin-us-beyond-32-bits": (
        ["--in", "eth2", "--out", "eth3", "--spin-us", str(2**32)],
        ["--spin-us"],
    ),
}


# A port that is not there (yet) is exit status 3, which the units restart:
# a NIC whose driver or rename comes late must not leave the link cut.
NOT_READY = {"missing-out", "missing-in"}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_status_2(lab, case):
    args, expect = BAD_INPUT[case]
    before = ports_state(lab, ifnames=PORTS)
    assert_refused(run_tpb(lab, args), *expect, status=3 if case in NOT_READY else 2)
    assert ports_state(lab, ifnames=PORTS) == before


@pytest.fixture
def eth3_down(lab):
    lab.run("tpb", ["ip", "link", "set", "eth3", "down"])
    try:
        yield
    finally:
        lab.run("tpb", ["ip", "link", "set", "eth3", "up"])


def test_admin_down_port_is_refused(lab, eth3_down):
    before = ports_state(lab, ifnames=PORTS)
    assert "UP" not in before["eth3"]["flags"]
    assert_refused(run_tpb(lab, ["--in", "eth2", "--out", "eth3"]), "--out eth3", "down",
                   status=3)
    after = ports_state(lab, ifnames=PORTS)
    assert after == before, "TPB must not bring a port up, nor touch it"


def test_a_missing_port_with_another_problem_is_status_2(lab):
    """Status 3 only when waiting could help: a missing port beside a bad
    setting is a configuration error (2)."""
    res = run_tpb(lab, ["--in", "eth2", "--out", "nosuch0", "--cpu", "4000"])
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "--out nosuch0: no such interface" in res.stderr and "--cpu 4000" in res.stderr
    assert "Traceback" not in res.stderr


def test_unprivileged_user_is_refused(lab):
    need_tool("setpriv", "util-linux")
    # Not in pytest's tmp_path: its parents are mode 0700.
    copy = Path(tempfile.mkdtemp(prefix="tpb-nobody-", dir="/tmp"))
    try:
        python = unprivileged_python(copy)
        before = ports_state(lab, ifnames=PORTS)
        argv = [*NOBODY, *python, "-m", "tpb", "run", "--in", "eth2", "--out", "eth3"]
        line = assert_refused(lab.run("tpb", argv, check=False, timeout=60), "needs root")
    finally:
        shutil.rmtree(copy)
    assert "CAP_NET_RAW" in line, line
    assert ports_state(lab, ifnames=PORTS) == before


def test_root_without_cap_net_raw_is_refused(lab):
    need_tool("setpriv", "util-linux")
    no_raw = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"]
    before = ports_state(lab, ifnames=PORTS)
    assert_refused(run_tpb(lab, ["--in", "eth2", "--out", "eth3"], no_raw), "CAP_NET_RAW")
    assert ports_state(lab, ifnames=PORTS) == before


# -- the ports after a run -------------------------------------------------


def offloads(lab) -> dict[str, str]:
    if shutil.which("ethtool") is None:
        return {}
    return {i: lab.run("tpb", ["ethtool", "-k", i]).stdout for i in ("eth2", "eth3")}


def check_running_state(lab, before: dict) -> None:
    """While TPB runs: each port promiscuous once more (a membership), flags
    otherwise as they were."""
    during = ports_state(lab)
    for i in ("eth2", "eth3"):
        assert during[i]["promiscuity"] == before[i]["promiscuity"] + 1, (before, during)
        assert during[i]["flags"] == before[i]["flags"], "TPB set an interface flag"
        assert "PROMISC" not in during[i]["flags"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_leaves_ports_as_found(lab, start_tpb, signum):
    before, feats = ports_state(lab), offloads(lab)
    tpb = start_tpb(lab)
    check_running_state(lab, before)
    c = tpb.stop(signum)
    assert set(c) >= {"in", "out"}
    assert ports_state(lab) == before
    assert offloads(lab) == feats, "TPB changed an offload setting"


def test_sigkill_leaves_ports_as_found(lab, start_tpb):
    before = ports_state(lab)
    tpb = start_tpb(lab)
    check_running_state(lab, before)
    assert tpb.send_signal(signal.SIGKILL) == -signal.SIGKILL
    # the kernel closes the sockets as the process dies; allow it a moment
    wait_for(lambda: ports_state(lab) == before, 5, "ports back to their state before TPB")
    assert not tpb.counters_file.exists(), "a killed TPB cannot have written counters"


def test_version_is_the_installed_package_version():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    res = subprocess.run(
        [sys.executable, "-m", "tpb", "--version"], capture_output=True, text=True, timeout=30
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, f"tpb {project['version']}\n", "")
