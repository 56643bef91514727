"""Fixtures: a lab of real namespaces and `tpb run` inside it.

Tests marked `netns` need root and `ip`; they are skipped, with the reason,
only when one of those is really missing.  A test that needs a further tool
asks for it with `helpers.need_tool("iperf3")`.  Anything else going wrong (a
namespace that cannot be created, a tool that fails) is a failure, not a
skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TpbProcess, netns_unavailable  # noqa: E402
from pop_util import Daemons  # noqa: E402

from tpb import lab as labmod  # noqa: E402

LAB_PREFIX = "tpbt"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = netns_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


def lab_prefix(request: pytest.FixtureRequest, suffix: str = "") -> str:
    """`tpbt` plus the module's LAB_SUFFIX: modules never share namespaces,
    so they could run side by side."""
    return LAB_PREFIX + getattr(request.module, "LAB_SUFFIX", "") + suffix


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest):
    """The classic topology, pc - gw1 - [eth2 tpb eth3] - gw2 - server."""
    with labmod.classic(lab_prefix(request)) as lb:
        yield lb


@pytest.fixture
def start_tpb(tmp_path: Path):
    """start_tpb(lab, **kw) -> a running TpbProcess (see helpers.py).

    At teardown a still running instance is stopped with SIGTERM, and must
    exit 0 with its counters written."""
    started: list[TpbProcess] = []

    def start(lb: labmod.Lab, **kw: object) -> TpbProcess:
        path = tmp_path / f"counters-{len(started)}.json"
        t = TpbProcess(lb, path, **kw)  # type: ignore[arg-type]
        started.append(t)
        return t.start()

    yield start
    failures = []
    for t in started:
        if t.running:
            try:
                t.stop()
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, failures


@pytest.fixture
def tpb(lab, start_tpb) -> TpbProcess:
    """`tpb run --in eth2 --out eth3 --counters FILE` in the lab's tpb node,
    running; `tpb.stop()` returns the exit counters."""
    return start_tpb(lab)


@pytest.fixture
def daemons(tmp_path: Path):
    """Daemons(tmp_path): `tpb run` / `tpb pop` processes of one test, all
    stopped at teardown (tests/pop_util.py). Modules that need more around
    them (route caches flushed) define their own."""
    d = Daemons(tmp_path)
    yield d
    d.close()


# How a port's frames are sorted into TPB's rings: one PACKET_FANOUT_CBPF
# group per port or way (the default), or, as on a kernel before 6.2, a
# filter on each ring's socket (TPB_FAULT_NO_SPLIT; csrc/bridge_open.c).
SORTING = {"group": None, "filters": "1"}


@pytest.fixture(params=list(SORTING))
def sorting(request, monkeypatch) -> str:
    if SORTING[request.param]:
        monkeypatch.setenv("TPB_FAULT_NO_SPLIT", SORTING[request.param])
    return request.param
