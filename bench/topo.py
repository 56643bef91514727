"""The bench's topologies: one lab each, built in turn, each torn down
before the next is built (also on error and Ctrl-C).

    bench   gen — [eth2 DUT eth3] — sink                      tpb.lab.bench
    chain   gen — [eth2 A eth3] — [eth3 B eth2] — sink          two TPBs
    pop     gen — [eth2 DUT eth3] — pop — sink                  a router / tpb pop

Every lab has a `gen` and a `sink` node (eth0 each); the loads need only
the addresses of those two and the MAC the gen's frames go to (the sink's
own, or the pop's as the gen's next hop).  Addresses are from the
benchmarking range 198.18.0.0/15 (RFC 2544); each lab has a namespace
prefix of its own, never those of the demo or the tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from tpb import lab as labmod
from tpb.lab import Iface, Lab, Node

# -- chain: two TPBs back to back ----------------------------------------------

CHAIN_A = "198.18.1.1"  # TPB-A's tunnel address (never on an interface)
CHAIN_B = "198.18.1.2"  # TPB-B's

# -- pop: the gen's site behind TPB, the sink behind the pop -------------------

POP_GEN = "198.18.2.1"
POP_TPB = "198.18.2.253"  # TPB's tunnel address, on the gen—pop link
POP_LINK = "198.18.2.254"  # the pop's address on that link: the gen's gateway
# The site's prefix behind TPB, as `tpb pop --peer ...,prefix=` takes it.  Not
# the whole link's /24: tpb pop adds its prefixes with `ip route replace`,
# which would take the pop's connected route to that /24 (and to TPB's
# tunnel address with it) into the TUN device.  The gen is in the /25; TPB's
# and the pop's addresses are outside it.
POP_SITE = "198.18.2.0/25"
POP_SINK_NET = "198.18.3.0/24"
POP_SINK_GW = "198.18.3.1"
POP_SINK = "198.18.3.2"


def _mac(lab_no: int, n: int) -> str:
    # tpb.lab uses 02:00:00:00:00:xx; ours differ per lab
    return f"02:00:00:00:{lab_no:02x}:{n:02x}"


# The CPU that takes the A—B link's "interrupts" (its NAPI threads): the
# gen's, not the DUTs' (bench.loads.GEN_CPU).
LINK_IRQ_CPU = "0"


def _napi_threads() -> set[str]:
    res = subprocess.run(["pgrep", "^napi/"], capture_output=True, text=True, check=False)
    return set(res.stdout.split())


class ChainLab(Lab):
    """The chain lab, its A—B link modelled as two NICs rather than a veth
    pair.  A veth hands each packet to the peer's stack right away, one at
    a time, so GRO never sees two GRE packets together; a NIC takes a
    burst per interrupt and its driver's GRO merges them.  So on both eth3:
    GRO through NAPI in a thread of its own (threaded NAPI) on
    LINK_IRQ_CPU, as a NIC's interrupt would run there; rx-udp-gro-
    forwarding, without which a veth takes NAPI only for packets from a
    device without TSO; and a pfifo qdisc, which holds what the device
    ring cannot (a veth has none by default).  Both chain DUTs run on it."""

    def up(self) -> Lab:
        super().up()
        try:
            before = _napi_threads()
            for node in ("a", "b"):
                gro = ["gro", "on", "rx-udp-gro-forwarding", "on"]
                self.run(node, ["ethtool", "-K", "eth3", *gro])
                self.run(node, ["tc", "qdisc", "replace", "dev", "eth3", "root", "pfifo"])
                self.run(node, ["sh", "-c", "echo 1 > /sys/class/net/eth3/threaded"])
            for pid in _napi_threads() - before:
                pin = ["taskset", "-pc", LINK_IRQ_CPU, pid]
                subprocess.run(pin, capture_output=True, check=True)
        except BaseException:
            self.down()
            raise
        return self


def chain_lab(prefix: str, mtu: int = 1500) -> Lab:
    """gen — [eth2 A eth3] — [eth3 B eth2] — sink: B's --out (eth3) faces A,
    its --in (eth2) the sink.  One subnet end to end; the A—B link a
    model of NICs (ChainLab)."""
    nodes = {n: Node(n) for n in ("gen", "a", "b", "sink")}
    links = [
        (
            Iface("gen", "eth0", _mac(2, 0x10), [f"{labmod.GEN}/24"]),
            Iface("a", "eth2", _mac(2, 0x11)),
        ),
        (Iface("a", "eth3", _mac(2, 0x12)), Iface("b", "eth3", _mac(2, 0x13))),
        (
            Iface("b", "eth2", _mac(2, 0x14)),
            Iface("sink", "eth0", _mac(2, 0x15), [f"{labmod.SINK}/24"]),
        ),
    ]
    return ChainLab(prefix, nodes, links, mtu)


class PopLab(Lab):
    """The pop lab; no IPv6 in the pop, so that the TUN device of `tpb pop`
    says nothing of its own (router solicitations, MLD: counted no_peer)."""

    def up(self) -> Lab:
        super().up()
        try:
            for key in ("default", "all"):
                self.sysctl("pop", f"net.ipv6.conf.{key}.disable_ipv6", "1")
            # The sink counts frames (rx_packets), and a veth passes a UDP
            # super-packet whole: one that `tpb pop` coalesced would count
            # once.  Without USO on eth1 the pop's kernel cuts it into its
            # datagrams before sending, as for a NIC without USO (the
            # costlier case for the pop), and each counts.
            self.run("pop", ["ethtool", "-K", "eth1", "tx-udp-segmentation", "off"])
        except BaseException:
            self.down()
            raise
        return self


def pop_lab(prefix: str, mtu: int = 1500) -> Lab:
    """gen — [eth2 DUT eth3] — pop — sink.  The gen's default route is the
    pop's address on the gen—DUT—pop link; the sink is on a subnet of its
    own behind the pop, its default route the pop too."""
    nodes = {
        "gen": Node("gen", routes=[("default", POP_LINK)]),
        "dut": Node("dut"),
        "pop": Node("pop", forwarding=True),
        "sink": Node("sink", routes=[("default", POP_SINK_GW)]),
    }
    links = [
        (
            Iface("gen", "eth0", _mac(3, 0x10), [f"{POP_GEN}/24"]),
            Iface("dut", "eth2", _mac(3, 0x11)),
        ),
        (
            Iface("dut", "eth3", _mac(3, 0x12)),
            Iface("pop", "eth0", _mac(3, 0x13), [f"{POP_LINK}/24"]),
        ),
        (
            Iface("pop", "eth1", _mac(3, 0x14), [f"{POP_SINK_GW}/24"]),
            Iface("sink", "eth0", _mac(3, 0x15), [f"{POP_SINK}/24"]),
        ),
    ]
    return PopLab(prefix, nodes, links, mtu)


@dataclass(frozen=True)
class Topo:
    name: str
    prefix: str  # of its namespaces
    drawing: str
    build: Callable[[str], Lab]
    gen_ip: str
    sink_ip: str
    next_hop: tuple[str, str]  # (node, iface): the MAC the gen's frames are sent to

    def lab(self) -> Lab:
        return self.build(self.prefix)


TOPOS = {
    t.name: t
    for t in (
        Topo(
            "bench",
            "tpbbench",
            "gen 198.18.0.1 — [eth2 DUT eth3] — sink 198.18.0.2",
            labmod.bench,
            labmod.GEN,
            labmod.SINK,
            ("sink", "eth0"),
        ),
        Topo(
            "chain",
            "tpbbench2",
            "gen 198.18.0.1 — [eth2 A eth3] — [eth3 B eth2] — sink 198.18.0.2",
            chain_lab,
            labmod.GEN,
            labmod.SINK,
            ("sink", "eth0"),
        ),
        Topo(
            "pop",
            "tpbbench3",
            f"gen {POP_GEN} — [eth2 DUT eth3] — {POP_LINK} pop {POP_SINK_GW} — sink {POP_SINK}",
            pop_lab,
            POP_GEN,
            POP_SINK,
            ("pop", "eth0"),
        ),
    )
}
