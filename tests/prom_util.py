"""Debian's real Prometheus server in a lab namespace, scraping TPB.

A test starts one with its targets, waits for the first scrapes, and asks
its HTTP API (/api/v1/query) what it stored — what an operator's
dashboards and alerts would see.  Every wait is bounded; the server is
stopped (and its storage removed) on close()."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from helpers import wait_for

from tpb.lab import Lab

SCRAPE_INTERVAL = "200ms"
QUERY = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


class Prometheus:
    def __init__(self, lab: Lab, node: str, targets: dict[str, str], workdir: Path,
                 port: int = 9090) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("needs `prometheus` (apt-get install prometheus)")
        self.lab, self.node, self.port = lab, node, port
        self.dir = workdir / f"prometheus-{node}"
        self.dir.mkdir(parents=True, exist_ok=True)
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in targets.items()
        )
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL}\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL}\n"
            f"scrape_configs:\n{jobs}"
        )
        self.log = open(self.dir / "log", "w")  # noqa: SIM115 (closed in close())
        self.proc = lab.spawn(node, [
            binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 30, f"prometheus in {node} ready", interval=0.2)

    def _get(self, path: str) -> str:
        res = self.lab.run(self.node, [sys.executable, "-c", QUERY,
                                       f"http://127.0.0.1:{self.port}{path}"], check=False)
        return res.stdout if res.returncode == 0 else ""

    def _ready(self) -> bool:
        assert self.proc.poll() is None, (self.dir / "log").read_text()
        return "Ready" in self._get("/-/ready")

    def query(self, expr: str) -> dict[frozenset, float]:
        """An instant query: {labels (without __name__): value}."""
        out = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert out, f"query {expr!r} failed"
        data = json.loads(out)
        assert data["status"] == "success", data
        return {
            frozenset((k, v) for k, v in r["metric"].items() if k != "__name__"):
                float(r["value"][1])
            for r in data["data"]["result"]
        }

    def one(self, expr: str) -> float | None:
        """The value of a query that selects one series, None if none."""
        got = self.query(expr)
        assert len(got) <= 1, got
        return next(iter(got.values()), None)

    def wait_value(self, expr: str, want: float, timeout: float = 10) -> None:
        wait_for(lambda: self.one(expr) == want, timeout,
                 f"{expr} == {want} in prometheus (last: {self.one(expr)})", interval=0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir / "data", ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
