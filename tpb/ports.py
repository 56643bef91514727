"""The two Ethernet ports: checked before TPB touches anything.

TPB changes nothing on a port through the interface flags: promiscuous
mode is a membership of its own packet sockets (the kernel counts it and
takes it back when the sockets close, even on a crash), and the offloads
stay as the operator set them, since super-packets and partial checksums
travel intact in the vnet header.  So a port is restored simply by
closing the sockets.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from tpb.config import ConfigError, PortsNotReady
from tpb.errors import TpbError

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
TC_H_ROOT = 0xFFFFFFFF


@dataclass(frozen=True)
class Port:
    name: str
    ifindex: int
    mtu: int
    mac: str


def require_privileges() -> None:
    """AF_PACKET needs CAP_NET_RAW; nftables and links need CAP_NET_ADMIN."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("CapEff:"))
        caps = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError):
        caps = 0 if os.geteuid() else ~0
    missing = [
        n
        for n, b in (("CAP_NET_RAW", CAP_NET_RAW), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
        if not caps >> b & 1
    ]
    if missing:
        raise TpbError(f"needs root ({' and '.join(missing)} missing)")


def lookup(names: dict[str, str]) -> dict[str, Port]:
    """Resolve role -> interface name into Ports, refusing what cannot be
    a bridge port: missing, repeated, loopback or administratively down
    (ConfigError, one line per port that is wrong).

    A port that is down was put down by someone: TPB does not override
    that.  A port that is up without carrier is fine (a cable can come).
    """
    from pyroute2 import IPRoute  # slow to import: only when needed

    seen: dict[str, str] = {}
    for role, name in names.items():
        if name in seen:
            raise ConfigError([f"--{role} {name}: the same interface as --{seen[name]}"])
        seen[name] = role
    ports: dict[str, Port] = {}
    problems: list[str] = []
    not_ready = True  # only missing or down ports: a later start may find them
    with IPRoute() as ipr:
        for role, name in names.items():
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                problems.append(f"--{role} {name}: no such interface")
                continue
            link = ipr.get_links(idx[0])[0]
            flags = link["flags"]
            if flags & IFF_LOOPBACK:
                problems.append(f"--{role} {name}: a loopback interface cannot be a bridge port")
                not_ready = False
            elif not flags & IFF_UP:
                problems.append(f"--{role} {name}: interface is down (ip link set {name} up)")
            else:
                ports[role] = Port(
                    name=name,
                    ifindex=idx[0],
                    mtu=link.get_attr("IFLA_MTU"),
                    mac=link.get_attr("IFLA_ADDRESS"),
                )
    if problems:
        raise PortsNotReady(problems) if not_ready else ConfigError(problems)
    return ports


def refresh(port: Port) -> Port:
    """The same port as it is now (its MTU may have changed), looked up
    by ifindex; TpbError if it went away or is another interface now."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            link = ipr.get_links(port.ifindex)[0]
    except (NetlinkError, OSError, IndexError):
        raise TpbError(f"{port.name}: the interface is gone") from None
    if link.get_attr("IFLA_IFNAME") != port.name:
        raise TpbError(f"{port.name}: the interface is gone (its index is "
                       f"{link.get_attr('IFLA_IFNAME')}'s now)")
    return Port(port.name, port.ifindex, link.get_attr("IFLA_MTU"), link.get_attr("IFLA_ADDRESS"))


def host_addresses() -> dict[str, str]:
    """Every IPv4 address of this host (this network namespace) -> the
    interface that has it."""
    from pyroute2 import IPRoute

    out: dict[str, str] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr(family=socket.AF_INET):
            # IFA_LOCAL is ours; IFA_ADDRESS is the far end on point-to-point links
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            out[addr] = names.get(msg["index"], "?")
    return out


def link_exists(name: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def root_qdisc(ipr: Any, ifindex: int) -> str | None:
    """The kind of a port's root qdisc ("noqueue" on a veth, "mq",
    "fq_codel", "pfifo_fast" ... on a NIC), or None if it has none.
    OSError ENXIO if the port is gone.

    ipr's qdisc dump is the one netlink request, asked twice a second on
    a socket that stays open: pyroute2 0.9.7 keeps something of every
    get_links() reply (1.6 KiB a call on a long-lived socket, measured),
    and with it TPB's memory grew by about 10 KiB a second, idle.  Whether
    the port is still there is an ioctl (SIOCGIFNAME)."""
    socket.if_indextoname(ifindex)  # a port's qdiscs read as none once it is gone
    for msg in ipr.get_qdiscs(index=ifindex):
        if msg["parent"] == TC_H_ROOT:
            return msg.get_attr("TCA_KIND")
    socket.if_indextoname(ifindex)  # or it went between the two
    return None
