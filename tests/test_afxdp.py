"""backend afxdp (csrc/xsk.c): plain bridging through AF_XDP sockets.

The same lab as test_frames.py (real veth pairs, which have native XDP and
two receive queues each here, so both of a port's sockets carry frames),
`tpb run --backend afxdp`: frames of every kind cross once, byte for byte,
both ways; TCP and ping go through; the counters add up exactly; frames
past the other port's MTU are counted too_big; ports whose MTU does not fit
a UMEM chunk are refused with one line; and after exit, however it comes
(SIGTERM or SIGKILL), the ports have no XDP program and their flags and
promiscuity are as found.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import (
    assert_consistent,
    need_tool,
    ports_state,
    read_until,
    tpb_argv,
    wait_for,
)
from rawsock import Port
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from test_frames import FRAMES, _marker_of, check_past_the_out_mtu, send_silent_frames
from test_tcp import check_report, iperf3_run, set_offloads
from wire import DIRECTIONS, LOCAL_EXPERIMENTAL, check_crossed, cross, ends, udp4

from tpb import lab as labmod

pytestmark = pytest.mark.netns
LAB_SUFFIX = "x"
AFXDP = ("--backend", "afxdp")


def xdp_on(lb: labmod.Lab, ifname: str, node: str = "tpb") -> object:
    """The XDP program `ip -d -j link` shows on the port, None for none."""
    res = lb.run(node, ["ip", "-d", "-j", "link", "show", "dev", ifname])
    return json.loads(res.stdout)[0].get("xdp")


@pytest.fixture
def afxdp(lab, start_tpb):
    before = ports_state(lab)
    t = start_tpb(lab, extra=AFXDP)
    for ifname in ("eth2", "eth3"):
        assert xdp_on(lab, ifname) is not None, f"{ifname}: no XDP program while running"
    yield t
    if t.running:
        t.stop()
    for ifname in ("eth2", "eth3"):
        assert xdp_on(lab, ifname) is None, f"{ifname}: XDP program left after exit"
    assert ports_state(lab) == before


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_kind_of_frame_crosses_once_byte_identical(lab, afxdp, direction):
    """ARP, IPv4 and IPv6 (unicast, broadcast, multicast), LLDP, 802.1Q,
    802.1ad and QinQ tags, full-size and runt frames: each once, as sent."""
    e = ends(lab)
    src, dst = (e[n] for n in DIRECTIONS[direction])
    frames, keys = [], []
    for build in FRAMES.values():
        m = os.urandom(16)
        f = build(src, dst, m)
        frames.append(f)
        keys.append(_marker_of(f, m))
    got = cross(lab, src, dst, frames, keys)
    check_crossed(frames, keys, got)
    c = afxdp.stop()
    assert_consistent(c)
    assert c[src.tpb_port]["rx_frames"] >= len(frames) + 1, c


@pytest.fixture
def peers_checksum_in_software(lab):
    """What veth needs under XDP: a frame its sender left CHECKSUM_PARTIAL
    (tx-checksumming, veth's default) reaches the XDP program, and the
    UMEM, with its checksum not filled in; the kernel completes it only on
    the skb path.  A NIC's wire carries whole checksums.  So the ports'
    peers compute theirs (as Open vSwitch's AF_XDP documentation asks of
    veth peers), restored after."""
    peers = (("gw1", "eth1"), ("gw2", "eth0"))
    for node, ifname in peers:
        set_offloads(lab, node, ifname, ["tx", "off"])
    yield
    for node, ifname in peers:
        set_offloads(lab, node, ifname, ["tx", "on"])


def test_tcp_with_checksum_offload_on_the_peers_is_broken(lab, afxdp):
    """The limit above, pinned down: with the peers' tx-checksumming on,
    ping (ICMP, summed in software) crosses and a TCP connection does not."""
    ping = lab.run("pc", ["ping", "-c", "2", "-i", "0.2", "-W", "2", labmod.SERVER])
    assert " 0% packet loss" in ping.stdout, ping.stdout
    need_tool("iperf3")
    server = lab.spawn("server", ["iperf3", "-s", "-1", "--forceflush", "-B", labmod.SERVER],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        read_until(server.stdout, b"Server listening", 10, "iperf3 -s")
        res = lab.run("pc", ["iperf3", "-c", labmod.SERVER, "-t", "1", "--connect-timeout",
                             "1500"], check=False, timeout=30)
    finally:
        server.kill()
        server.communicate(timeout=10)
    assert res.returncode != 0, res.stdout
    assert "timed out" in res.stdout + res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize("reverse", [False, True], ids=["pc-to-server", "server-to-pc-R"])
def test_tcp_and_ping_go_through(lab, peers_checksum_in_software, afxdp, reverse):
    need_tool("iperf3")
    ping = lab.run("pc", ["ping", "-c", "3", "-i", "0.2", "-W", "2", labmod.SERVER])
    assert " 0% packet loss" in ping.stdout, ping.stdout
    report = iperf3_run(lab, reverse)
    check_report(report, afxdp.stop(), reverse)


@pytest.fixture(scope="module")
def quiet_lab(request):
    """Only the test's frames cross: IPv6 off on the gateways' ports."""
    with labmod.classic(f"tpbt{LAB_SUFFIX}q") as lb:
        for node, ifname in (("gw1", "eth1"), ("gw2", "eth0")):
            lb.sysctl(node, f"net.ipv6.conf.{ifname}.disable_ipv6", "1")
        yield lb


def test_counters_count_every_frame_exactly(quiet_lab, start_tpb):
    tpb = start_tpb(quiet_lab, extra=AFXDP)
    sent = send_silent_frames(quiet_lab)
    c = tpb.stop()
    assert_consistent(c)
    for port, other in (("in", "out"), ("out", "in")):
        frames = sent[port]
        assert c[port]["rx_frames"] == len(frames), (port, c[port])
        assert c[port]["rx_bytes"] == sum(len(f) for f in frames), (port, c[port])
        assert c[port]["kernel_packets"] == len(frames), (port, c[port])
        assert c[other]["tx_frames"] == len(frames), (other, c[other])
        assert c[other]["tx_bytes"] == sum(len(f) for f in frames), (other, c[other])


@pytest.fixture
def out_mtu_1400(quiet_lab):
    quiet_lab.run("tpb", ["ip", "link", "set", "eth3", "mtu", "1400"])
    yield 1400
    quiet_lab.run("tpb", ["ip", "link", "set", "eth3", "mtu", str(quiet_lab.mtu)])


def test_frames_past_the_out_mtu_are_refused_and_counted(quiet_lab, out_mtu_1400, start_tpb):
    """MTU + 14 crosses, one byte more is dropped too_big, a tagged frame
    may be 4 bytes longer: as backend packet."""
    tpb = start_tpb(quiet_lab, extra=AFXDP)
    check_past_the_out_mtu(quiet_lab, tpb, out_mtu_1400)


def test_sigkill_leaves_no_xdp_program(quiet_lab, start_tpb):
    """The programs are bpf_links: the kernel detaches them with the
    process, which an IFLA_XDP attachment would outlive."""
    before = ports_state(quiet_lab)
    tpb = start_tpb(quiet_lab, extra=AFXDP)
    assert xdp_on(quiet_lab, "eth2") is not None
    assert tpb.send_signal(signal.SIGKILL) == -signal.SIGKILL

    def clean() -> bool:
        return all(xdp_on(quiet_lab, i) is None for i in ("eth2", "eth3"))

    wait_for(clean, 5, "no XDP program on the ports")
    wait_for(lambda: ports_state(quiet_lab) == before, 5, "ports as found")


@pytest.fixture(scope="module")
def jumbo_lab(request):
    with labmod.classic(f"tpbt{LAB_SUFFIX}j", mtu=9000) as lb:
        yield lb


def test_jumbo_ports_are_refused_with_one_line(jumbo_lab):
    """A frame must fit one 4 KB UMEM chunk: MTU 9000 needs backend packet."""
    before = ports_state(jumbo_lab)
    res = jumbo_lab.run("tpb", tpb_argv("--in", "eth2", "--out", "eth3", *AFXDP),
                        check=False, timeout=60)
    lines = res.stderr.splitlines()
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith("tpb: "), lines
    assert "MTU 9000" in lines[0] and "backend packet" in lines[0], lines
    assert ports_state(jumbo_lab) == before
    assert xdp_on(jumbo_lab, "eth2") is None and xdp_on(jumbo_lab, "eth3") is None


def test_busy_poll_sets_and_restores_the_napi_settings(quiet_lab, start_tpb):
    paths = {k: f"/sys/class/net/eth2/{k}" for k in ("napi_defer_hard_irqs", "gro_flush_timeout")}

    def read() -> dict[str, str]:
        return {k: quiet_lab.run("tpb", ["cat", p]).stdout.strip() for k, p in paths.items()}

    before = read()
    tpb = start_tpb(quiet_lab, extra=(*AFXDP, "--busy-poll", "50"))
    assert read() == {"napi_defer_hard_irqs": "2", "gro_flush_timeout": "200000"}
    e = ends(quiet_lab)
    m = os.urandom(16)
    frame = bytes(udp4(e["gw1"], e["gw2"], m))
    check_crossed([frame], [m], cross(quiet_lab, e["gw1"], e["gw2"], [frame], [m]))
    time.sleep(0.1)
    assert_consistent(tpb.stop())
    assert read() == before


@pytest.fixture
def vlan_devices(lab):
    """VLAN 100 over the gateways' ports facing TPB: their kernels send the
    tag as metadata (tx-vlan offload on veth), not in the frame's bytes."""
    for node, port, addr in (("gw1", "eth1", "10.99.0.1/24"), ("gw2", "eth0", "10.99.0.2/24")):
        res = lab.run(node, ["ip", "link", "add", "link", port, "name", "v100", "type", "vlan",
                             "id", "100"], check=False)
        if "Unknown device type" in res.stderr:
            pytest.skip("this kernel has no 802.1Q devices (8021q)")
        assert res.returncode == 0, res.stderr
        lab.run(node, ["ip", "addr", "add", addr, "dev", "v100"])
        lab.run(node, ["ip", "link", "set", "v100", "up"])
    yield
    for node in ("gw1", "gw2"):
        lab.run(node, ["ip", "link", "del", "v100"], check=False)


def test_frames_of_a_vlan_device_keep_their_tag(lab, vlan_devices, afxdp):
    """XDP sees the frame veth hands it; a tag the sender's kernel kept
    out of band must still be on the frame that leaves TPB."""
    ping = lab.run("gw1", ["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.99.0.2"], check=False)
    assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    assert_consistent(afxdp.stop())


def test_a_stalled_loop_overflows_the_rx_ring_not_the_fill_ring(quiet_lab, start_tpb):
    """TPB's loop held still (SIGSTOP: its CPU busy elsewhere, as under
    load) while frames keep coming: the RX ring fills before the fill ring
    runs dry, so the excess is counted ring_full, congestion, and
    fill_empty stays for a real shortage of chunks.  Every frame offered is
    counted once, taken or dropped."""
    tpb = start_tpb(quiet_lab, extra=AFXDP)
    e = ends(quiet_lab)
    src, dst = e["gw1"], e["gw2"]

    def frame(payload: bytes) -> bytes:
        # an EtherType nobody answers: only these frames reach port in
        return bytes(Ether(src=src.mac, dst=dst.mac, type=LOCAL_EXPERIMENTAL) / Raw(payload))

    offered = 20000  # past every ring: 4096 descriptors a ring at most
    fence = os.urandom(16)
    with (
        Port(quiet_lab.ns(src.node), src.ifname) as tx,
        Port(quiet_lab.ns(dst.node), dst.ifname, capture=True) as rx,
    ):
        os.kill(tpb.pid, signal.SIGSTOP)
        try:
            for _ in range(offered):
                tx.send(frame(os.urandom(46)))
        finally:
            os.kill(tpb.pid, signal.SIGCONT)
        # A fence behind the backlog, in the same ring, instead of a blind
        # sleep: once it is out, every frame before it was taken or dropped.
        # It is sent again until one copy crosses (the first may still find
        # the ring full), and every copy is offered too.
        fences, fenced, deadline = 0, False, time.monotonic() + 10
        while not fenced and time.monotonic() < deadline:
            tx.send(frame(fence + bytes(30)))
            fences += 1
            until = time.monotonic() + 0.2
            while not fenced and (f := rx.recv(until - time.monotonic())) is not None:
                fenced = fence in f.data
        assert fenced, "no fence crossed within 10 s"
    c = tpb.stop()
    port = c["in"]
    assert port["kernel_drops"] > 0, port
    assert port["drop_fill_empty"] == 0, port
    assert port["rx_frames"] + port["kernel_drops"] == offered + fences, (port, fences)
    assert_consistent(c, ring_full_ok=True)
