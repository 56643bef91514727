"""TCP through TPB: iperf3 from pc to server (and back with -R), 2 s each.

The only path between pc and server crosses TPB, so iperf3 completing is
TPB carrying TCP; the counters show it did so without a drop of TPB's
making (an RX ring overflowing under the flood, `ring_full`, is congestion
and allowed: TCP backs off).  Three offload settings:
  - default: TSO/GSO on the veths, so 64 KB super-packets and partial
    checksums cross TPB in the vnet header;
  - all off: every offload ethtool lets us turn off, on every veth;
  - egress without TSO/GSO: senders still make super-packets, but TPB's
    ports cannot take them whole, so the kernel must segment them on
    TPB's transmit.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import assert_consistent, need_tool, read_until

from tpb import lab as labmod

pytestmark = pytest.mark.netns
LAB_SUFFIX = "t"
SECONDS = 2
MIN_BITS_PER_SECOND = 50e6  # sane for veth on a busy 2-core VM; offloads on does 5-10 Gbit/s

OFFLOADS_OFF = ["tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off", "sg", "off"]
# ethtool's short names for the features above, as `ethtool -k` spells them
FEATURES_OFF = [
    "tcp-segmentation-offload",
    "generic-segmentation-offload",
    "generic-receive-offload",
    "tx-checksumming",
    "rx-checksumming",
    "scatter-gather",
]


def all_veths(lb: labmod.Lab) -> list[tuple[str, str]]:
    return [(i.node, i.name) for pair in lb.links for i in pair]


def features(lb: labmod.Lab, node: str, ifname: str) -> dict[str, str]:
    out = lb.run(node, ["ethtool", "-k", ifname]).stdout
    feats = {}
    for line in out.splitlines()[1:]:
        name, _, value = line.strip().partition(": ")
        feats[name] = value.split()[0] if value else ""
    return feats


def set_offloads(lb: labmod.Lab, node: str, ifname: str, args: list[str]) -> None:
    lb.run(node, ["ethtool", "-K", ifname, *args])


@pytest.fixture(scope="module")
def iperf3():
    return need_tool("iperf3")


def iperf3_run(lb: labmod.Lab, reverse: bool) -> dict:
    """One iperf3 test pc -> server (server -> pc with reverse); the client's
    JSON report."""
    server = lb.spawn(
        "server",
        ["iperf3", "-s", "-1", "--forceflush", "-B", labmod.SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        read_until(server.stdout, b"Server listening", 10, "iperf3 -s")
        argv = ["iperf3", "-c", labmod.SERVER, "-t", str(SECONDS), "-J"]
        argv += ["--connect-timeout", "5000"]
        res = lb.run("pc", argv + (["-R"] if reverse else []), check=False, timeout=SECONDS + 30)
        report = json.loads(res.stdout)
        assert res.returncode == 0 and "error" not in report, report.get("error", res.stderr)
        return report
    finally:
        if server.poll() is None:
            server.terminate()
        server.communicate(timeout=10)


def check_report(report: dict, c: dict, reverse: bool) -> float:
    received = report["end"]["sum_received"]
    assert received["bytes"] > 0, report["end"]
    assert report["end"]["sum_sent"]["bytes"] > 0, report["end"]
    bps = received["bits_per_second"]
    assert bps >= MIN_BITS_PER_SECOND, f"{bps / 1e6:.1f} Mbit/s"
    # a ring may overflow under the flood (TCP's congestion signal): allowed
    assert_consistent(c, ring_full_ok=True)
    # the data went through TPB: pc's side is "in", the server's "out"
    data_port = "out" if reverse else "in"
    assert c[data_port]["rx_bytes"] >= received["bytes"], (c, received["bytes"])
    return bps


@pytest.mark.parametrize("reverse", [False, True], ids=["pc-to-server", "server-to-pc-R"])
def test_iperf3_offloads_default(lab, tpb, iperf3, reverse):
    report = iperf3_run(lab, reverse)
    c = tpb.stop()
    check_report(report, c, reverse)


@pytest.fixture(scope="module")
def lab_offloads_off(request, iperf3):
    need_tool("ethtool")
    with labmod.classic(f"tpbt{LAB_SUFFIX}o") as lb:
        for node, ifname in all_veths(lb):
            set_offloads(lb, node, ifname, OFFLOADS_OFF)
            feats = features(lb, node, ifname)
            on = [f for f in FEATURES_OFF if feats.get(f) != "off"]
            assert not on, f"{node}:{ifname} still has {on} on"
        yield lb


@pytest.mark.parametrize("reverse", [False, True], ids=["pc-to-server", "server-to-pc-R"])
def test_iperf3_offloads_off_everywhere(lab_offloads_off, start_tpb, reverse):
    tpb = start_tpb(lab_offloads_off)
    report = iperf3_run(lab_offloads_off, reverse)
    c = tpb.stop()
    check_report(report, c, reverse)


@pytest.fixture(scope="module")
def lab_egress_no_tso(request, iperf3):
    """Senders keep TSO; TPB's own ports take no super-packet."""
    need_tool("ethtool")
    with labmod.classic(f"tpbt{LAB_SUFFIX}e") as lb:
        for ifname in ("eth2", "eth3"):
            set_offloads(lb, "tpb", ifname, ["tso", "off", "gso", "off"])
        yield lb


@pytest.mark.parametrize("reverse", [False, True], ids=["pc-to-server", "server-to-pc-R"])
def test_iperf3_egress_port_without_tso(lab_egress_no_tso, start_tpb, reverse):
    tpb = start_tpb(lab_egress_no_tso)
    report = iperf3_run(lab_egress_no_tso, reverse)
    c = tpb.stop()
    check_report(report, c, reverse)
