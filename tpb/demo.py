"""`tpb demo`: TPB's main job on the built-in lab, with no arguments.

Builds, in network namespaces, the original design grown a POP and a
second site:

    pc  — gw1 — [eth2 TPB  eth3] —\\
                                   gw2 — pop — server
    pc2 — gw3 — [eth2 TPB2 eth3] —/

runs `tpb pop` on the pop and `tpb run` on both bridges (flows to the
server's network selected by a match rule, everything else bridged), shows
ping and a 5-second iperf3 TCP run from each pc to the server through the
tunnels, prints what each TPB counted, and tears everything down, also on
Ctrl-C or error.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from tpb import lab as labmod
from tpb.errors import TpbError
from tpb.ports import require_privileges

SELECT = "ip daddr 203.0.113.0/24"


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def start(lab: labmod.Lab, node: str, argv: list[str], ready: str) -> subprocess.Popen[str]:
    """Start `python -m tpb ARGV` in node; return once it says `ready`."""
    proc = lab.spawn(node, [sys.executable, "-m", "tpb", *argv],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    said = ""
    # Lines before the ready one (where its metrics are, say) are fine.
    while ready not in said:
        fd = proc.stderr.fileno()  # unbuffered: select() knows nothing of a file's buffer
        if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 4096)
            if chunk:
                said += chunk.decode(errors="replace")
                continue
        proc.kill()
        proc.wait(timeout=10)
        raise TpbError(f"{node}: tpb {argv[0]} did not start: {said.strip() or proc.returncode}")
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, err = proc.communicate(timeout=15)
    if proc.returncode != 0:
        raise TpbError(f"tpb exited {proc.returncode}: {err.strip()}")
    return out.strip()


def iperf(lab: labmod.Lab, client: str, seconds: int = 5) -> str:
    srv = lab.spawn("server", ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    res = lab.run(client, f"iperf3 -c {labmod.T_SERVER} -t {seconds} -J", timeout=seconds + 30)
    srv.wait(timeout=10)
    end = json.loads(res.stdout)["end"]
    return (f"   {client}: {end['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s received, "
            f"{end['sum_sent'].get('retransmits', 0)} retransmits")


def demo() -> int:
    require_privileges()
    for tool in ("ip", "ping", "iperf3", "nft"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            raise TpbError(f"demo needs {tool} (run `make demo`, which installs it)")
    lab = labmod.tunnel("tpbdemo")
    with lab:
        _say("lab (namespaces tpbdemo-*):  pc — gw1 — [TPB] — gw2 — pop — server,"
             "  pc2 — gw3 — [TPB2] — gw2")
        for node in ("pc", "gw1", "pc2", "gw3", "gw2", "pop", "server"):
            addrs = lab.run(node, "ip -br -4 addr show scope global").stdout.split()
            print(f"   {node:7s} {' '.join(a for a in addrs if '/' in a)}")
        pop_cmd = ["pop", "--local", labmod.T_POP,
                   "--peer", f"{labmod.T_TPB},key=7,prefix=192.0.2.0/26",
                   "--peer", f"{labmod.T_TPB2},csum,seq,prefix=192.0.2.64/26"]
        tpb1_cmd = ["run", "--in", "eth2", "--out", "eth3", "--local", labmod.T_TPB,
                    "--remote", labmod.T_POP, "--key", "7", "--match", SELECT]
        tpb2_cmd = ["run", "--in", "eth2", "--out", "eth3", "--local", labmod.T_TPB2,
                    "--remote", labmod.T_POP, "--csum", "--seq", "--match", SELECT]
        pop = start(lab, "pop", pop_cmd, "tpb: pop")
        tpbs = {"TPB": start(lab, "tpb", tpb1_cmd, "bridging"),
                "TPB2": start(lab, "tpb2", tpb2_cmd, "bridging")}
        _say("tpb " + " ".join(pop_cmd))
        _say("tpb " + " ".join(tpb1_cmd))
        _say("tpb " + " ".join(tpb2_cmd))
        _say(f"ping pc -> gw2 ({labmod.T_GW2}): not selected, bridged as it is")
        print(lab.run("pc", f"ping -c 2 -i 0.2 -W 2 {labmod.T_GW2}").stdout.strip())
        for pc in ("pc", "pc2"):
            _say(f"ping {pc} -> server ({labmod.T_SERVER}): selected, through the tunnel")
            print(lab.run(pc, f"ping -c 3 -i 0.2 -W 2 {labmod.T_SERVER}").stdout.strip())
        _say("iperf3 TCP to the server through the tunnels, 5 seconds each")
        for pc in ("pc", "pc2"):
            print(iperf(lab, pc))
        _say("what each TPB counted")
        for name, proc in tpbs.items():
            print(f"   {name} " + stop(proc))
        _say("what the POP counted")
        print("   " + stop(pop))
    _say("lab torn down")
    return 0
