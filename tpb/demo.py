"""`tpb demo`: TPB's main job on the built-in lab, with no arguments.

Builds pc — gw1 — [eth2 TPB eth3] — gw2 — server in network namespaces,
runs `tpb run --in eth2 --out eth3` in the TPB namespace, shows a ping and
a 5-second iperf3 TCP run from pc to server through it, prints what TPB
counted, and tears everything down, also on Ctrl-C or error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tpb import lab as labmod
from tpb.errors import TpbError
from tpb.ports import require_privileges


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def start_tpb(lab: labmod.Lab, counters: Path, *extra: str) -> subprocess.Popen[str]:
    """Start `tpb run` in the lab's tpb node; return once it forwards."""
    argv = [
        sys.executable,
        "-m",
        "tpb",
        "run",
        "--in",
        "eth2",
        "--out",
        "eth3",
        "--counters",
        str(counters),
        *extra,
    ]
    proc = lab.spawn("tpb", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "tpb: bridging ..." or the error
    if "bridging" not in line:
        proc.wait(timeout=10)
        raise TpbError(f"tpb run did not start: {line.strip() or proc.returncode}")
    return proc


def stop_tpb(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, err = proc.communicate(timeout=15)
    if proc.returncode != 0:
        raise TpbError(f"tpb run exited {proc.returncode}: {err.strip()}")
    return out.strip()


def demo() -> int:
    require_privileges()
    for tool in ("ip", "ping", "iperf3"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            raise TpbError(f"demo needs {tool} (run `make demo`, which installs it)")
    lab = labmod.classic("tpbdemo")
    with tempfile.TemporaryDirectory() as tmp, lab:
        counters = Path(tmp) / "counters.json"
        _say("lab: pc — gw1 — [eth2 TPB eth3] — gw2 — server (namespaces tpbdemo-*)")
        for node in ("pc", "gw1", "gw2", "server"):
            addrs = lab.run(node, "ip -br -4 addr show scope global").stdout.split()
            print(f"   {node:7s} {' '.join(a for a in addrs if '/' in a)}")
        tpb = start_tpb(lab, counters)
        _say(f"TPB runs in namespace {lab.ns('tpb')}: tpb run --in eth2 --out eth3")
        _say(f"ping pc -> server ({labmod.SERVER})")
        print(lab.run("pc", f"ping -c 3 -i 0.2 -W 2 {labmod.SERVER}").stdout.strip())
        _say("iperf3 TCP pc -> server, 5 seconds")
        srv = lab.spawn("server", ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        res = lab.run("pc", f"iperf3 -c {labmod.SERVER} -t 5 -J", timeout=60)
        srv.wait(timeout=10)
        end = json.loads(res.stdout)["end"]
        print(
            f"   sent {end['sum_sent']['bytes'] / 1e9:.2f} GB, "
            f"received {end['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s, "
            f"{end['sum_sent'].get('retransmits', 0)} retransmits"
        )
        _say("what TPB counted")
        print("   " + stop_tpb(tpb))
    _say("lab torn down")
    return 0
