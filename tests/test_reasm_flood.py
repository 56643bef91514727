"""Reassembly under a flood of spoofed fragments (reasm.c).

An attacker who only knows the POP's address sends TPB 10,000 datagrams a
second, each a single fragment with the POP as its source (tests/
fragflood.c, a raw socket in gw2, which reaches the tunnel address through
TPB's ARP answer, as the POP's own GRE does).  Meanwhile pc pings the server
through the tunnel with 1500-byte packets: each reply comes back from `tpb
pop` as 1528 bytes of GRE, which the pop's kernel fragments toward TPB, and
TPB must reassemble it among the flood.  Two floods:

- "tail": 8-byte fragments far out in their datagrams (offset ~64000): no
  GRE header to check, so reassembly holds them; before, each was charged
  its reach (64 KiB) and 64 of them filled the 4 MiB for 30 s, refusing
  every real reply;
- "first": first fragments with a wrong GRE key: dropped at once, nothing
  kept.

The flood runs from a second before the pings until after them; its sender
reports the rate it achieved and TPB's counters what arrived.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pop_util import Daemons, need_root, need_tool, ping, tunnel_args
from tunnel_util import exclusive_lab

from tpb import lab as labmod
from tpb.lab import T_POP, T_SERVER, T_TPB

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbfld"
KEY = 7
RATE = 10000  # spoofed datagrams a second
PINGS = 1000
INTERVAL = 0.005  # 200 replies a second to reassemble
LEAD = 1.0  # the flood runs this long before the pings, and after them
SUCCESS = 0.99


@pytest.fixture(scope="module")
def flood_bin(tmp_path_factory) -> Path:
    need_tool("gcc")
    out = tmp_path_factory.mktemp("fragflood") / "fragflood"
    src = Path(__file__).with_name("fragflood.c")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture(scope="module")
def flab(tmp_path_factory):
    need_root()
    with exclusive_lab(labmod.tunnel, LAB_PREFIX) as lb:
        pops = Daemons(tmp_path_factory.mktemp("pop"))
        try:
            pops.pop(lb, "--local", T_POP, "--peer", f"{T_TPB},key={KEY},prefix=192.0.2.0/26")
            yield lb
        finally:
            pops.close()


@pytest.fixture
def daemons(flab, tmp_path):
    for node in ("pc", "gw1", "server", "pop"):
        flab.run(node, ["ip", "route", "flush", "cache"])
    d = Daemons(tmp_path)
    yield d
    d.close()


@pytest.mark.parametrize("kind", ["tail", "first"])
def test_replies_reassembled_under_a_flood_of_spoofed_fragments(flab, daemons, flood_bin, kind):
    tpb = daemons.run(flab, *tunnel_args(T_TPB, "--key", str(KEY)))
    warm = ping(flab, "pc", T_SERVER, count=1, size=1472, df="dont", wait=2)
    assert " 1 received" in warm.stdout, warm.stdout + warm.stderr
    seconds = LEAD + PINGS * INTERVAL + 2 * LEAD
    flood = flab.spawn(
        "gw2",
        [str(flood_bin), T_POP, T_TPB, str(RATE), str(seconds), kind, str(KEY + 1)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            flood.wait(timeout=LEAD)
        except subprocess.TimeoutExpired:
            pass  # flooding, as it should
        assert flood.returncode is None, flood.communicate()
        pings = ping(
            flab, "pc", T_SERVER, count=PINGS, size=1472, df="dont", interval=INTERVAL, wait=1
        )
        out, err = flood.communicate(timeout=seconds + 10)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.communicate()
    assert flood.returncode == 0, err
    m = re.match(r"sent (\d+) failed (\d+) in ([\d.]+) s", out)
    assert m, out
    sent, failed, took = int(m[1]), int(m[2]), float(m[3])
    rate = sent / took
    m = re.search(r"(\d+) received", pings.stdout)
    received = int(m[1]) if m else 0
    c = tpb.stop()
    t = c["tunnel"]
    # what of the flood reached TPB's reassembly (or its first check)
    seen = t["drop"].get("gre_key", 0) if kind == "first" else t["reasm_fragments"] - 2 * t[
        "reasm_done"]
    print(
        f"\n{kind} flood: {sent} spoofed fragments in {took:.2f} s = {rate:.0f}/s sent "
        f"({failed} refused by the sender's kernel), {seen} reached TPB ({seen / took:.0f}/s); "
        f"pings {received}/{PINGS} answered ({100 * received / PINGS:.1f} %), "
        f"reassembled {t['reasm_done']}, drops {t['drop']}, "
        f"reasm_memory_peak {t['reasm_memory_peak']}, ring drops {c['out']['kernel_drops']}"
    )
    assert rate >= 0.95 * RATE, f"the flood ran at {rate:.0f}/s only"
    assert seen >= 0.9 * sent, (seen, sent)
    assert received >= SUCCESS * PINGS, pings.stdout
    # every answered ping was one reply reassembled (and the warm-up's)
    assert t["reasm_done"] >= received + 1, t
    if kind == "first":
        # wrong keys: nothing of them was ever kept
        assert set(t["drop"]) == {"gre_key"}, t["drop"]
        assert t["reasm_memory_peak"] < 8192, t
    else:
        # never more than the cap of unverified datagrams and the replies;
        # the flood's own random IDs meet now and then (reasm_bad, overlap)
        assert set(t["drop"]) <= {"reasm_evicted", "reasm_overlap", "reasm_bad",
                                  "reasm_duplicate"}, t["drop"]
        assert t["drop"]["reasm_evicted"] >= 0.98 * seen, t["drop"]
        assert t["reasm_memory_peak"] < 64 * 512 + 8 * 4096, t
