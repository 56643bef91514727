"""Self-test of tests/kgre: a real Linux kernel (ip_gre, in a qemu VM) as GRE peer.

Topology: one fresh namespace "A" holds the VM's tap with 192.0.2.1/24; the VM
has 192.0.2.2/24 on its NIC and gre1 (local 192.0.2.2, remote 192.0.2.1, inner
10.255.0.2/30).  The host kernel has no ip_gre, so namespace A speaks GRE in
user space (kgre.GreEndpoint: a raw IPPROTO_GRE socket): it sends GRE-wrapped
packets built here and checks what the VM's kernel sends back.

Two VM configurations: "full" (key, checksum, sequence numbers, TTL 33) and
"plain" (no GRE options, 9000-byte MTU on the NIC and the tap).  Two more VMs:
one with its NIC on VLAN 100 (the host kernel has no 8021q, so that test only
checks the tagged frames on the tap), one in gretap mode (Ethernet in GRE).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kgre  # noqa: E402

_reason = kgre.available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

A_ADDR, VM_ADDR = "192.0.2.1", "192.0.2.2"
A_INNER, VM_INNER = "10.255.0.1", "10.255.0.2"
KEY = 0x1234

CONFIGS = {
    "full": {"key": KEY, "csum": True, "seq": True, "ttl": 33},
    "plain": {"mtu": 9000},
}


class Lab:
    def __init__(self, ns: str, peer: kgre.KernelGrePeer, cfg: dict, a_dev: str) -> None:
        self.ns, self.peer, self.cfg, self.a_dev = ns, peer, cfg, a_dev
        # One endpoint for the whole module: its sequence numbers must keep going
        # up, or the VM's kernel (iseq) drops what it sends as out of order.
        self.ep = kgre.GreEndpoint(ns, A_ADDR, VM_ADDR, key=cfg.get("key"),
                                   csum=cfg.get("csum", False), seq=cfg.get("seq", False))

    def endpoint(self) -> kgre.GreEndpoint:
        self.ep.drain()
        return self.ep

    def nsrun(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def lab(request):
    name = request.param
    cfg = CONFIGS[name]
    ns = f"kgre-st-{os.getpid()}"
    with kgre.temp_netns(ns):
        peer = kgre.KernelGrePeer(
            ns, "kgre0", addr=f"{VM_ADDR}/24", remote=A_ADDR, inner_addr=f"{VM_INNER}/30",
            **cfg)
        peer.create_tap()  # the tap exists before boot, so it can be wired first
        a_dev = "kgre0"
        subprocess.run(["ip", "-n", ns, "link", "set", a_dev, "mtu", str(cfg.get("mtu", 1500)),
                        "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{A_ADDR}/24", "dev", a_dev], check=True)
        try:
            peer.start(timeout=120)
            print(f"\nkgre[{name}]: booted in {peer.boot_seconds:.1f}s "
                  f"(guest uptime {peer.guest_uptime}s, accel {peer.accel_used})")
            lab = Lab(ns, peer, cfg, a_dev)
            yield lab
            lab.ep.close()
        finally:
            peer.stop()


def _icmp_request(ident: int, seq: int, payload: bytes) -> bytes:
    from scapy.layers.inet import ICMP, IP

    return bytes(IP(src=A_INNER, dst=VM_INNER, ttl=64) / ICMP(id=ident, seq=seq) / payload)


def _is_reply_to(ident: int, seq: int):
    from scapy.layers.inet import ICMP, IP

    def match(g: dict) -> bool:
        if g["proto"] != 0x0800:
            return False
        p = IP(g["payload"])
        return ICMP in p and p[ICMP].type == 0 and p[ICMP].id == ident and p[ICMP].seq == seq
    return match


def _check_gre_options(lab: Lab, g: dict) -> None:
    cfg = lab.cfg
    assert g["src"] == VM_ADDR and g["dst"] == A_ADDR
    assert g["version"] == 0 and g["proto"] == 0x0800
    want = {f for f, on in (("C", cfg.get("csum")), ("K", cfg.get("key") is not None),
                            ("S", cfg.get("seq"))) if on}
    assert g["flags"] == want
    assert g["key"] == cfg.get("key")
    if cfg.get("csum"):
        assert g["csum_ok"] is True
    if cfg.get("ttl"):
        assert g["ttl"] == cfg["ttl"]


def test_boot_time_and_console(lab):
    assert lab.peer.running
    assert kgre.READY in lab.peer.console()
    assert lab.peer.boot_seconds < 60


def test_vm_answers_ping_on_its_nic(lab):
    size = 8000 if lab.cfg.get("mtu", 1500) >= 9000 else 1000
    p = lab.nsrun("ping", "-c", "3", "-i", "0.2", "-W", "5", "-s", str(size), "-M", "do", VM_ADDR)
    assert p.returncode == 0, p.stdout + p.stderr
    assert " 0% packet loss" in p.stdout


def test_gre_echo_through_vm_kernel(lab):
    """GRE-wrapped echo requests in, GRE-wrapped echo replies out, with our options."""
    from scapy.layers.inet import ICMP, IP

    seqs = []
    ep = lab.endpoint()
    for i in range(1, 4):
        payload = b"tpb-kgre-%d" % i * 4
        ep.send(_icmp_request(0x4242, i, payload))
        g = ep.recv(timeout=10, match=_is_reply_to(0x4242, i))
        assert g is not None, f"no GRE echo reply {i}\n" + lab.peer.console()[-2000:]
        _check_gre_options(lab, g)
        inner = IP(g["payload"])
        assert inner.src == VM_INNER and inner.dst == A_INNER
        assert bytes(inner[ICMP].payload) == payload
        seqs.append(g["seq"])
    if lab.cfg.get("seq"):
        assert seqs == list(range(seqs[0], seqs[0] + 3)), seqs
    stats = lab.peer.link_stats("gre1")
    assert stats["rx"]["packets"] >= 3 and stats["tx"]["packets"] >= 3


def test_vm_originated_gre_ping_answered_from_user_space(lab):
    """The VM pings the tunnel's far end; namespace A answers in user space, and
    tcpdump in A decodes the VM's GRE packets with the configured options."""
    from scapy.layers.inet import ICMP, IP

    dump = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns, "tcpdump", "-i", lab.a_dev, "-n", "-v", "-l", "-c", "2",
         f"ip proto 47 and src {VM_ADDR}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        line = ""
        while "listening on" not in line and time.monotonic() < deadline:
            line = dump.stderr.readline()
        result: dict = {}
        vm = threading.Thread(target=lambda: result.update(
            out=lab.peer.run(f"ping -c 2 -w 20 {A_INNER}", timeout=30)))
        ep = lab.endpoint()
        vm.start()
        for _ in range(2):
            g = ep.recv(timeout=20, match=lambda g: g["proto"] == 0x0800
                        and ICMP in IP(g["payload"]) and IP(g["payload"])[ICMP].type == 8)
            assert g is not None, "the VM's echo request did not arrive in GRE"
            _check_gre_options(lab, g)
            req = IP(g["payload"])
            rep = IP(src=A_INNER, dst=VM_INNER) / ICMP(
                type=0, id=req[ICMP].id, seq=req[ICMP].seq) / bytes(req[ICMP].payload)
            ep.send(bytes(rep))
        vm.join(40)
        rc, out = result["out"]
        assert rc == 0 and "2 packets received" in out, out
        text, _ = dump.communicate(timeout=10)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    assert text.count("GREv0") == 2, text
    if lab.cfg.get("key"):
        assert f"key=0x{KEY:x}" in text, text
    if lab.cfg.get("seq"):
        assert "seq " in text, text
    if lab.cfg.get("csum"):
        assert "sum 0x" in text or "checksum" in text, text


def test_vm_kernel_drops_mismatched_gre(lab):
    """The VM kernel's own checks: a wrong key gets no answer; a missing checksum or
    sequence number is counted as an rx error on gre1."""
    if not lab.cfg.get("key"):
        pytest.skip("plain tunnel: nothing to mismatch")
    ep = lab.endpoint()
    ep.send(_icmp_request(0x99, 1, b"wrong key"), key=KEY + 1)
    assert ep.recv(timeout=3, match=_is_reply_to(0x99, 1)) is None
    for what, override in (("no checksum", {"csum": False}), ("no sequence number",
                                                              {"seq": None})):
        before = lab.peer.link_stats("gre1")["rx"]["errors"]
        ep.send(_icmp_request(0x98, 1, what.encode()), **override)
        assert ep.recv(timeout=3, match=_is_reply_to(0x98, 1)) is None, what
        assert lab.peer.link_stats("gre1")["rx"]["errors"] == before + 1, what
    # and the tunnel still works after
    ep.send(_icmp_request(0x97, 1, b"good"))
    assert ep.recv(timeout=10, match=_is_reply_to(0x97, 1)) is not None


def test_gre_udp_echo(lab):
    from scapy.layers.inet import IP, UDP

    ep = lab.endpoint()
    ep.send(bytes(IP(src=A_INNER, dst=VM_INNER) / UDP(sport=40000, dport=7) / b"echo me"))
    g = ep.recv(timeout=10, match=lambda g: UDP in IP(g["payload"])
                and IP(g["payload"])[UDP].dport == 40000)
    assert g is not None
    _check_gre_options(lab, g)
    assert bytes(IP(g["payload"])[UDP].payload) == b"echo me"


def test_tcp_echo_and_sink_on_the_nic(lab):
    s = kgre.netns_socket(lab.ns, socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(20)
        s.connect((VM_ADDR, 7))
        data = os.urandom(100_000)
        threading.Thread(target=s.sendall, args=(data,), daemon=True).start()
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        assert got == data
    s = kgre.netns_socket(lab.ns, socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(20)
        s.connect((VM_ADDR, 9))
        s.sendall(b"x" * 250_000)
        s.shutdown(socket.SHUT_WR)
        assert s.makefile().readline().strip() == "250000"
    log = lab.peer.read_file("/tmp/tcp.log")
    assert "echo " in log and "sink " in log and " 250000" in log


def test_udp_sink_counts(lab):
    s = kgre.netns_socket(lab.ns, socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        for _ in range(5):
            s.sendto(struct.pack("!I", 7) * 25, (VM_ADDR, 9))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = lab.peer.sh("cat /tmp/udp-sink 2>/dev/null || true").split()
        if out and int(out[0]) >= 5:
            break
        time.sleep(0.3)
    assert out == ["5", "500"]


def test_agent_commands(lab):
    assert lab.peer.sh("echo hello; uname -r").splitlines()[0] == "hello"
    rc, out = lab.peer.run("echo oops >&2; exit 3")
    assert (rc, out) == (3, "oops\n")
    with pytest.raises(kgre.KgreError):
        lab.peer.sh("false")
    detail = lab.peer.sh("ip -d link show gre1")
    assert f"remote {A_ADDR} local {VM_ADDR}" in detail
    if lab.cfg.get("key"):
        assert "icsum ocsum" in detail and "iseq oseq" in detail and "ttl 33" in detail


def test_iperf3_server(lab):
    if "iperf3" not in lab.peer.sh("ls /usr/bin"):
        pytest.skip("no iperf3 in the VM (not on the host when it was built)")
    p = lab.nsrun("iperf3", "-c", VM_ADDR, "-t", "1", "-J", timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert '"bits_per_second"' in p.stdout


def test_vlan_nic():
    """vlan=100: the VM's address and GRE sit on eth0.100; its frames leave tagged."""
    ns = f"kgre-vl-{os.getpid()}"
    with kgre.temp_netns(ns), kgre.KernelGrePeer(
            ns, "kgre1", addr=f"{VM_ADDR}/24", remote=A_ADDR, inner_addr=f"{VM_INNER}/30",
            vlan=100) as peer:
        dump = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", "kgre1", "-n", "-e", "-l", "-c", "1",
             "vlan 100 and arp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line, deadline = "", time.monotonic() + 10
            while "listening on" not in line and time.monotonic() < deadline:
                line = dump.stderr.readline()
            peer.run(f"ping -c 1 -w 2 {A_ADDR}", timeout=10)
            text, _ = dump.communicate(timeout=10)
        finally:
            if dump.poll() is None:
                dump.kill()
                dump.wait()
        assert "vlan 100" in text and f"Request who-has {A_ADDR} tell {VM_ADDR}" in text, text
        assert "eth0.100" in peer.sh("ip -d link show gre1; ip route get " + A_ADDR)


def test_gretap_mode():
    """mode="gretap": Ethernet in GRE (0x6558); the VM answers ARP for its inner address."""
    from scapy.layers.l2 import ARP, Ether

    ns = f"kgre-tap-{os.getpid()}"
    with kgre.temp_netns(ns):
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "kgre2", "mode", "tap"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{A_ADDR}/24", "dev", "kgre2"], check=True)
        with kgre.KernelGrePeer(ns, "kgre2", addr=f"{VM_ADDR}/24", remote=A_ADDR, key=7,
                                mode="gretap", inner_addr=f"{VM_INNER}/30") as peer, \
                kgre.GreEndpoint(ns, A_ADDR, VM_ADDR, key=7, proto=0x6558) as ep:
            assert "gretap remote" in peer.sh("ip -d link show gre1")
            me = "02:00:00:00:aa:01"
            ep.send(bytes(Ether(src=me, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=me, psrc=A_INNER, pdst=VM_INNER)))
            g = ep.recv(timeout=10, match=lambda g: g["proto"] == 0x6558
                        and ARP in Ether(g["payload"]) and Ether(g["payload"])[ARP].op == 2)
            assert g is not None, peer.console()[-1500:]
            assert g["key"] == 7
            arp = Ether(g["payload"])[ARP]
            assert arp.psrc == VM_INNER and arp.pdst == A_INNER and arp.hwdst == me
