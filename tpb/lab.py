"""The lab: network namespaces joined by veth pairs, for the demo, the tests
and the benchmarks alike.

A Lab is data (nodes, links, addresses, routes) plus up()/down().  Two
topologies are built in:

  classic()  pc — gw1 — [eth2 TPB eth3] — gw2 — server      (the original design)
  bench()    gen — [eth2 DUT eth3] — sink                     (benchmarks)

Every namespace name carries the lab's prefix, so labs of different
prefixes never collide, and down() removes all of them — also after a
failed up().  Addresses are from the documentation ranges (RFC 5737,
RFC 3849).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from tpb.errors import TpbError


@dataclass
class Iface:
    node: str
    name: str
    mac: str
    addrs: list[str] = field(default_factory=list)


@dataclass
class Node:
    name: str
    forwarding: bool = False
    routes: list[tuple[str, str]] = field(default_factory=list)  # (prefix, via)


@dataclass
class Lab:
    prefix: str
    nodes: dict[str, Node]
    links: list[tuple[Iface, Iface]]
    mtu: int = 1500
    procs: list[subprocess.Popen] = field(default_factory=list)

    # -- naming ---------------------------------------------------------------

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def iface(self, node: str, name: str) -> Iface:
        for a, b in self.links:
            for i in (a, b):
                if i.node == node and i.name == name:
                    return i
        raise KeyError(f"{node}:{name}")

    # -- running things inside a node -----------------------------------------

    def cmd(self, node: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def run(
        self, node: str, argv: Sequence[str] | str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        if isinstance(argv, str):
            argv = shlex.split(argv)
        res = subprocess.run(self.cmd(node, argv), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise TpbError(f"{node}: {' '.join(argv)}: {(res.stderr or res.stdout).strip()}")
        return res

    def spawn(self, node: str, argv: Sequence[str], **kw: object) -> subprocess.Popen:
        """Start a background process in node; down() stops it."""
        p = subprocess.Popen(self.cmd(node, argv), **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def sysctl(self, node: str, key: str, value: str) -> None:
        self.run(node, ["sysctl", "-qw", f"{key}={value}"])

    # -- life cycle -----------------------------------------------------------

    def up(self) -> Lab:
        self.down()
        try:
            for n in self.nodes.values():
                _ip("netns", "add", self.ns(n.name))
                self.run(n.name, "ip link set lo up")
                # br_netfilter is on by default in new namespaces; it has no
                # business in a lab and costs the kernel bridge 20-30 %.
                for fam in ("iptables", "ip6tables", "arptables"):
                    self.run(
                        n.name, ["sysctl", "-qw", f"net.bridge.bridge-nf-call-{fam}=0"], check=False
                    )
                if n.forwarding:
                    self.sysctl(n.name, "net.ipv4.ip_forward", "1")
                    self.sysctl(n.name, "net.ipv6.conf.all.forwarding", "1")
            t0, t1 = self._tmp_names()
            for a, b in self.links:
                _ip("link", "add", t0, "type", "veth", "peer", "name", t1)
                for tmp, end in ((t0, a), (t1, b)):
                    _ip("link", "set", tmp, "netns", self.ns(end.node))
                    self.run(
                        end.node,
                        [
                            "ip",
                            "link",
                            "set",
                            tmp,
                            "name",
                            end.name,
                            "address",
                            end.mac,
                            "mtu",
                            str(self.mtu),
                        ],
                    )
                    self.sysctl(end.node, f"net.ipv6.conf.{end.name}.accept_dad", "0")
                    if not end.addrs:
                        # No address: a bridge port, which must never speak
                        # itself.  With IPv6 on, its kernel would send MLD
                        # reports and router solicitations for seconds after
                        # it came up, frames no test sent (the appliance's
                        # sysctl.d silences its ports the same way).
                        self.sysctl(end.node, f"net.ipv6.conf.{end.name}.disable_ipv6", "1")
                    for addr in end.addrs:
                        self.run(
                            end.node,
                            ["ip", "addr", "add", addr, "dev", end.name]
                            + (["nodad"] if ":" in addr else []),
                        )
                    self.run(end.node, ["ip", "link", "set", end.name, "up"])
            for n in self.nodes.values():
                for dst, via in n.routes:
                    self.run(n.name, ["ip", "route", "add", dst, "via", via])
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        for n in self.nodes.values():
            if os.path.exists(f"/run/netns/{self.ns(n.name)}"):
                _ip("netns", "del", self.ns(n.name), check=False)
        # a failed up() may leave the temporary pair in the root namespace
        _ip("link", "del", self._tmp_names()[0], check=False)

    def _tmp_names(self) -> tuple[str, str]:
        # veth pairs are born in the root namespace: names unique per lab
        return f"{self.prefix[:10]}-va", f"{self.prefix[:10]}-vb"

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _ip(*argv: str, check: bool = True) -> None:
    res = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise TpbError(f"ip {' '.join(argv)}: {res.stderr.strip()}")


def _mac(n: int) -> str:
    return f"02:00:00:00:00:{n:02x}"


# Addresses of the classic topology, by role (documentation ranges).
PC = "192.0.2.10"
GW1_IN = "192.0.2.1"
GW1 = "198.51.100.1"
GW2 = "198.51.100.2"
GW2_IN = "203.0.113.1"
SERVER = "203.0.113.10"
GW1_6 = "2001:db8:2::1"
GW2_6 = "2001:db8:2::2"


def classic(prefix: str = "tpb", mtu: int = 1500) -> Lab:
    """pc — gw1 — [eth2 TPB eth3] — gw2 — server, as in the original design."""
    nodes = {
        "pc": Node("pc", routes=[("default", GW1_IN)]),
        "gw1": Node("gw1", forwarding=True, routes=[("203.0.113.0/24", GW2)]),
        "tpb": Node("tpb"),
        "gw2": Node("gw2", forwarding=True, routes=[("192.0.2.0/24", GW1)]),
        "server": Node("server", routes=[("default", GW2_IN)]),
    }
    links = [
        (
            Iface("pc", "eth0", _mac(0x10), [f"{PC}/24", "2001:db8:1::10/64"]),
            Iface("gw1", "eth0", _mac(0x11), [f"{GW1_IN}/24", "2001:db8:1::1/64"]),
        ),
        (
            Iface("gw1", "eth1", _mac(0x12), [f"{GW1}/24", f"{GW1_6}/64"]),
            Iface("tpb", "eth2", _mac(0x20)),
        ),
        (
            Iface("tpb", "eth3", _mac(0x21)),
            Iface("gw2", "eth0", _mac(0x13), [f"{GW2}/24", f"{GW2_6}/64"]),
        ),
        (
            Iface("gw2", "eth1", _mac(0x14), [f"{GW2_IN}/24", "2001:db8:3::1/64"]),
            Iface("server", "eth0", _mac(0x15), [f"{SERVER}/24", "2001:db8:3::10/64"]),
        ),
    ]
    return Lab(prefix, nodes, links, mtu)


# Addresses of the bench topology.
GEN = "198.18.0.1"
SINK = "198.18.0.2"


def bench(prefix: str = "tpbb", mtu: int = 1500) -> Lab:
    """gen — [eth2 DUT eth3] — sink; addresses from the benchmarking range
    (RFC 2544's 198.18.0.0/15)."""
    nodes = {n: Node(n) for n in ("gen", "dut", "sink")}
    links = [
        (Iface("gen", "eth0", _mac(0x30), [f"{GEN}/24"]), Iface("dut", "eth2", _mac(0x31))),
        (Iface("dut", "eth3", _mac(0x32)), Iface("sink", "eth0", _mac(0x33), [f"{SINK}/24"])),
    ]
    return Lab(prefix, nodes, links, mtu)


# Addresses of the tunnel topology.
T_PC = "192.0.2.10"
T_PC2 = "192.0.2.74"
T_GW1 = "198.51.100.1"
T_GW2 = "198.51.100.2"
T_TPB = "198.51.100.3"  # TPB's tunnel address, on the gw1–gw2 link
T_GW3 = "198.51.100.17"
T_GW2B = "198.51.100.18"
T_TPB2 = "198.51.100.19"
T_POP = "198.51.100.34"
T_SERVER = "203.0.113.10"


def tunnel(prefix: str = "tpbg", mtu: int = 1500) -> Lab:
    """Two sites, each pc — gw — [eth2 TPB eth3] —, meeting at gw2 (the
    ISP), then the POP and a server behind it:

        pc  — gw1 — [tpb]  —\\
                              gw2 — pop — server
        pc2 — gw3 — [tpb2] —/

    Without a tunnel, gw2 routes the sites to the server through the pop
    as a plain router; TPB's tunnel takes the selected flows to `tpb pop`
    instead, which routes them on through its TUN device."""
    nodes = {
        "pc": Node("pc", routes=[("default", "192.0.2.1")]),
        "gw1": Node("gw1", forwarding=True, routes=[("default", T_GW2)]),
        "tpb": Node("tpb"),
        "pc2": Node("pc2", routes=[("default", "192.0.2.65")]),
        "gw3": Node("gw3", forwarding=True, routes=[("default", T_GW2B)]),
        "tpb2": Node("tpb2"),
        "gw2": Node(
            "gw2",
            forwarding=True,
            routes=[("192.0.2.0/26", T_GW1), ("192.0.2.64/26", T_GW3), ("203.0.113.0/24", T_POP)],
        ),
        "pop": Node("pop", forwarding=True, routes=[("default", "198.51.100.33")]),
        "server": Node("server", routes=[("default", "203.0.113.1")]),
    }
    links = [
        (
            Iface("pc", "eth0", _mac(0x40), [f"{T_PC}/26"]),
            Iface("gw1", "eth0", _mac(0x41), ["192.0.2.1/26"]),
        ),
        (Iface("gw1", "eth1", _mac(0x42), [f"{T_GW1}/28"]), Iface("tpb", "eth2", _mac(0x43))),
        (Iface("tpb", "eth3", _mac(0x44)), Iface("gw2", "eth0", _mac(0x45), [f"{T_GW2}/28"])),
        (
            Iface("pc2", "eth0", _mac(0x50), [f"{T_PC2}/26"]),
            Iface("gw3", "eth0", _mac(0x51), ["192.0.2.65/26"]),
        ),
        (Iface("gw3", "eth1", _mac(0x52), [f"{T_GW3}/28"]), Iface("tpb2", "eth2", _mac(0x53))),
        (Iface("tpb2", "eth3", _mac(0x54)), Iface("gw2", "eth2", _mac(0x55), [f"{T_GW2B}/28"])),
        (
            Iface("gw2", "eth1", _mac(0x56), ["198.51.100.33/28"]),
            Iface("pop", "eth0", _mac(0x57), [f"{T_POP}/28"]),
        ),
        (
            Iface("pop", "eth1", _mac(0x58), ["203.0.113.1/24"]),
            Iface("server", "eth0", _mac(0x59), [f"{T_SERVER}/24"]),
        ),
    ]
    return Lab(prefix, nodes, links, mtu)
