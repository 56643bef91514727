#!/usr/bin/env python3
"""Replays crash/timeout/oom files through a harness and groups them by what
went wrong: the invariant's message, or the sanitizer's summary line and the
first frame of the helper's code.  Prints one line per kind, with a count
and the smallest file.

    fuzz/triage.py build/fuzz/encap build/fuzz/artifacts/encap/*
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

FRAME = re.compile(r"#\d+ 0x[0-9a-f]+ in (\S+) (\S*csrc/\S+)")


def kind(harness: str, path: Path) -> str:
    try:
        res = subprocess.run(
            [harness, "-runs=1", "-timeout=25", "-rss_limit_mb=4096", str(path)],
            capture_output=True, text=True, errors="replace", timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "hangs (over 120 s)"
    out = res.stderr
    m = re.search(r"tpb fuzz invariant violated: (.*)", out)
    if m:
        what = re.sub(r"\d+", "N", m.group(1))
        return f"invariant: {what}"
    m = re.search(r"SUMMARY: \w+: (.*)", out)
    if m:
        where = FRAME.search(out)
        summary = re.sub(r"0x[0-9a-f]+|\(\S+\+0x[0-9a-f]+\)", "", m.group(1))
        return f"{summary.strip()} @ {where.group(1) + ' ' + where.group(2) if where else '?'}"
    m = re.search(r"runtime error: (.*)", out)
    if m:
        return f"UB: {m.group(1)}"
    if "timeout" in out or "ALARM" in out:
        return "timeout"
    if res.returncode == 0:
        return "no longer reproduces"
    return f"exit {res.returncode}"


def main() -> int:
    harness, files = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        groups[kind(harness, f)].append(f)
    for k, fs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        small = min(fs, key=lambda p: p.stat().st_size)
        print(f"{len(fs):4d}  {k}\n      {small} ({small.stat().st_size} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
