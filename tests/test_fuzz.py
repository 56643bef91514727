"""The libFuzzer harnesses (fuzz/README.md), briefly: each is built with
AddressSanitizer and UndefinedBehaviorSanitizer and fuzzed for
TPB_FUZZ_SECONDS (10 by default) from the seed corpus; any finding fails
the test with the harness's report.  Every finding kept (fuzz/corpus/
<harness>/regress-*, fuzz/crashes/) is replayed too: once fixed it stays
fixed.

No root, no namespaces: the harnesses open no socket.  `make fuzz` runs
them longer (FUZZ_SECONDS each)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fuzz"
HARNESSES = ("from_out", "encap", "forward", "reasm", "pop", "gre")
SECONDS = int(os.environ.get("TPB_FUZZ_SECONDS", "10"))
CC = "clang-14"
# The harnesses' own sanitizers report to their stderr, whatever the run
# around them asks of its processes (make test-asan: log files, a preload).
ENV = {k: v for k, v in os.environ.items()
       if k not in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LD_PRELOAD")}


def reproducers() -> list[Path]:
    """Findings fixed (fuzz/corpus/<harness>/regress-*, seeds too) and any
    still open (fuzz/crashes/<harness>/*)."""
    fuzz = ROOT / "fuzz"
    found = [*fuzz.glob("corpus/*/regress-*"), *fuzz.glob("crashes/*/*")]
    return sorted(p for p in found if p.is_file())


@pytest.fixture(scope="module")
def built() -> Path:
    if shutil.which(CC) is None:
        pytest.skip(f"needs {CC} and its libFuzzer (apt-get install clang-14 libclang-rt-14-dev)")
    res = subprocess.run(["make", "-s", "fuzz-build"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, f"building the harnesses failed:\n{res.stdout}\n{res.stderr}"
    return BUILD


def report(out: str, lines: int = 60) -> str:
    """The part of libFuzzer's output that says what went wrong."""
    text = out.splitlines()
    for i, line in enumerate(text):
        if "invariant violated" in line or "ERROR:" in line or "runtime error" in line:
            end = next((j for j in range(i, len(text)) if text[j].startswith("Shadow bytes")),
                       i + lines)
            return "\n".join(text[max(0, i - 2) : min(end, i + lines)])
    return "\n".join(text[-lines:])


@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzz(built: Path, harness: str, tmp_path: Path) -> None:
    """SECONDS of fuzzing from the seeds: no crash, no sanitizer report, no
    invariant violated, no hang (10 s per input), no runaway memory."""
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    corpus.mkdir()
    artifacts.mkdir()
    res = subprocess.run(
        [str(built / harness), f"-max_total_time={SECONDS}", "-timeout=10",
         "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
         str(corpus), str(ROOT / "fuzz" / "corpus" / harness)],
        capture_output=True, text=True, errors="replace", timeout=SECONDS + 120, env=ENV,
    )
    found = sorted(p.name for p in artifacts.iterdir())
    if res.returncode != 0 or found:
        pytest.fail(f"{harness}: a finding ({', '.join(found) or 'exit ' + str(res.returncode)})"
                    f"; replay it with build/fuzz/{harness} FILE\n{report(res.stderr)}",
                    pytrace=False)
    runs = [ln for ln in res.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs, f"{harness}: no run statistics\n{res.stderr[-2000:]}"


@pytest.mark.parametrize("path", reproducers(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_reproducer(built: Path, path: Path) -> None:
    """A kept finding no longer fails (fuzz/corpus/<harness>/regress-<what>)."""
    res = subprocess.run(
        [str(built / path.parent.name), "-timeout=10", "-rss_limit_mb=2048", str(path)],
        capture_output=True, text=True, errors="replace", timeout=120, env=ENV,
    )
    if res.returncode != 0:
        pytest.fail(f"{path.parent.name}/{path.name} fails again:\n{report(res.stderr)}",
                    pytrace=False)
