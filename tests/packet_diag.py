"""The packet sockets of a network namespace as the kernel reports them
(sock_diag, NETLINK_SOCK_DIAG with AF_PACKET: linux/packet_diag.h), an
independent view of what TPB opened: each socket's protocol, port, RX ring,
fanout group and whether it has a filter.

Run as a script inside a namespace (`ip netns exec NS python packet_diag.py`),
it prints them as JSON; sockets(lab, node) does that for a lab node."""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path
from typing import Any

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
PACKET_SHOW_INFO, PACKET_SHOW_RING_CFG, PACKET_SHOW_FANOUT, PACKET_SHOW_FILTER = 1, 4, 8, 0x20
PACKET_DIAG_INFO, PACKET_DIAG_RX_RING, PACKET_DIAG_FANOUT, PACKET_DIAG_FILTER = 0, 2, 4, 7
FANOUT_TYPES = {0: "hash", 6: "cbpf"}

NLMSG = struct.Struct("=IHHII")
REQ = struct.Struct("=BBHII2I")  # packet_diag_req
MSG = struct.Struct("=BBHI2I")  # packet_diag_msg
INFO = struct.Struct("=6I")  # packet_diag_info
RING = struct.Struct("=7I")  # packet_diag_ring
NLA = struct.Struct("=HH")


def _attrs(buf: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + NLA.size <= len(buf):
        length, kind = NLA.unpack_from(buf, off)
        if length < NLA.size:
            break
        out[kind & 0x3FFF] = buf[off + NLA.size: off + length]
        off += (length + 3) & ~3
    return out


def dump() -> list[dict[str, Any]]:
    """Every packet socket of this namespace."""
    show = PACKET_SHOW_INFO | PACKET_SHOW_RING_CFG | PACKET_SHOW_FANOUT | PACKET_SHOW_FILTER
    req = REQ.pack(socket.AF_PACKET, 0, 0, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.send(NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        while True:
            data, off = nl.recv(1 << 16), 0
            while off + NLMSG.size <= len(data):
                length, kind, _, _, _ = NLMSG.unpack_from(data, off)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("=i", data, off + NLMSG.size)[0],
                                  "sock_diag")
                body = data[off + NLMSG.size: off + length]
                _, _, proto, ino, _, _ = MSG.unpack_from(body)
                a = _attrs(body[MSG.size:])
                sock: dict[str, Any] = {"ino": ino, "proto": proto}  # host order here
                if PACKET_DIAG_INFO in a:
                    sock["ifindex"] = INFO.unpack_from(a[PACKET_DIAG_INFO])[0]
                if PACKET_DIAG_RX_RING in a:
                    ring = RING.unpack_from(a[PACKET_DIAG_RX_RING])
                    sock["rx_frame_size"], sock["rx_frames"] = ring[2], ring[3]
                if PACKET_DIAG_FANOUT in a:
                    val = struct.unpack_from("=I", a[PACKET_DIAG_FANOUT])[0]
                    sock["fanout_id"] = val & 0xFFFF
                    sock["fanout_type"] = FANOUT_TYPES.get((val >> 16) & 0xFF, (val >> 16) & 0xFF)
                sock["filter"] = PACKET_DIAG_FILTER in a
                out.append(sock)
                off += (length + 3) & ~3


def rings_by_port(socks: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """The sockets with an RX ring, by (ifindex, protocol)."""
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for s in socks:
        if "rx_frames" in s:
            out.setdefault((s["ifindex"], s["proto"]), []).append(s)
    return out


def assert_sorted_by(sorting: str, rings: list[dict[str, Any]], sources: int) -> None:
    """The rings TPB opened on one port for one protocol, `sources` sources
    of a small-slot and a big-slot ring each: sorting "group", all of them
    in one PACKET_FANOUT_CBPF group and no filter on any; "filters", no
    group and a filter on each."""
    assert sorted(s["rx_frame_size"] for s in rings) == sorted([2048, 69632] * sources), rings
    if sorting == "group":
        assert {s.get("fanout_type") for s in rings} == {"cbpf"}, rings
        assert len({s["fanout_id"] for s in rings}) == 1, rings
        assert not any(s["filter"] for s in rings), rings
    else:
        assert not any("fanout_id" in s for s in rings), rings
        assert all(s["filter"] for s in rings), rings


def ifindex(lab: Any, node: str, dev: str) -> int:
    return int(json.loads(lab.run(node, ["ip", "-j", "link", "show", dev]).stdout)[0]["ifindex"])


def sockets(lab: Any, node: str) -> list[dict[str, Any]]:
    """dump() in a lab node's namespace."""
    return json.loads(lab.run(node, [sys.executable, str(Path(__file__).resolve())]).stdout)


if __name__ == "__main__":
    print(json.dumps(dump()))
