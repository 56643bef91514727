"""Shared by the tunnel tests: `tpb run` (tunnel mode) and `tpb pop` in the
tunnel lab, raw frames in and out of its namespaces, GRE built by hand.

The tunnel lab (tpb/lab.py: tunnel()):

    pc — gw1 eth1 ─ eth2 [tpb] eth3 ─ eth0 gw2 eth1 — pop — server

Frames are sent and captured with packet sockets created inside the lab's
namespaces (setns just long enough to create the socket), so nothing
here depends on timing beyond bounded waits: every wait has a timeout and
fails with what the process said on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import TpbDaemon
from rawsock import (
    AUXDATA,
    ETH_P_ALL,
    PACKET_AUXDATA,
    PACKET_IGNORE_OUTGOING,
    SO_RCVBUFFORCE,
    SOL_PACKET,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    netns,
)

from tpb import lab as labmod

# The tunnel lab's MACs (tpb/lab.py), by role.
PC_MAC = "02:00:00:00:00:40"
GW1_MAC = "02:00:00:00:00:42"  # gw1 eth1, the in-side router
TPB_IN_MAC = "02:00:00:00:00:43"
TPB_OUT_MAC = "02:00:00:00:00:44"  # what TPB answers ARP for its tunnel address with
GW2_MAC = "02:00:00:00:00:45"  # gw2 eth0, the ISP's router
POP_MAC = "02:00:00:00:00:57"
SERVER_MAC = "02:00:00:00:00:59"

# Where TPB (eth2/eth3) is cabled.
IN_END = ("gw1", "eth1")
OUT_END = ("gw2", "eth0")

GRE_C, GRE_R, GRE_K, GRE_S = 0x8000, 0x4000, 0x2000, 0x1000
PACKET_OUTGOING = 4


def lab_unavailable() -> str | None:
    """Why the tunnel lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, AF_PACKET, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install {package})"
    return None


LOCK_WAIT = 300.0


@contextlib.contextmanager
def exclusive_lab(make: Callable[[str], labmod.Lab], prefix: str) -> Iterator[labmod.Lab]:
    """The lab `make(prefix)`, up for the block, for this process alone.

    Namespace names are fixed per module (a killed run's leftovers are
    removed by the next run's up()), so two runs of one module at once —
    another session running the whole suite — would tear down each
    other's lab.  An flock on a per-prefix file serializes them instead;
    the kernel releases it if this process dies."""
    import fcntl

    path = Path("/run/lock" if os.path.isdir("/run/lock") else "/tmp") / f"tpb-lab-{prefix}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = Path(path).read_text().strip() or "?"
                    pytest.fail(
                        f"lab {prefix!r} still in use by another test run (pid {holder}) "
                        f"after {LOCK_WAIT:.0f}s"
                    )
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        with make(prefix) as lb:
            yield lb
    finally:
        os.close(fd)  # releases the lock


def need_tool(name: str, package: str | None = None) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs `{name}` (apt-get install {package or name})")
    return path


def marker(tag: str = "") -> bytes:
    """16 bytes that identify one test frame (the lab's own chatter crosses too)."""
    return (b"TPBT" + tag.encode()[:4].ljust(4, b"-") + os.urandom(4).hex().encode())[:16]


def inet_csum(data: bytes) -> int:
    """RFC 1071: the one's complement of the one's complement sum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# -- processes ---------------------------------------------------------------


def tpb_argv(cmd: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tpb", cmd, *args]


class Procs:
    """Processes of one test; whatever still runs at teardown is stopped."""

    def __init__(self, lab: labmod.Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.started: list[TpbDaemon] = []

    def _new(self, node: str, argv: list[str], ready: str) -> TpbDaemon:
        p = TpbDaemon(self.lab, node, argv, ready, self.tmp / f"counters-{len(self.started)}.json")
        self.started.append(p)
        return p

    def tpb(
        self,
        *extra: str,
        local: str = labmod.T_TPB,
        remote: str = labmod.T_POP,
        node: str = "tpb",
        start: bool = True,
    ) -> TpbDaemon:
        """`tpb run --in eth2 --out eth3 --local L --remote R ...`"""
        n = len(self.started)
        argv = tpb_argv(
            "run",
            "--in",
            "eth2",
            "--out",
            "eth3",
            "--local",
            local,
            "--remote",
            remote,
            "--counters",
            str(self.tmp / f"counters-{n}.json"),
            *extra,
        )
        p = self._new(node, argv, "tpb: bridging")
        return p.start() if start else p

    def pop(self, *peers: str, local: str = labmod.T_POP, start: bool = True) -> TpbDaemon:
        """`tpb pop --local L --peer SPEC ...` in the pop node."""
        n = len(self.started)
        argv = tpb_argv("pop", "--local", local, "--counters", str(self.tmp / f"counters-{n}.json"))
        for spec in peers:
            argv += ["--peer", spec]
        p = self._new("pop", argv, "tpb: pop")
        return p.start() if start else p

    def stop_all(self) -> list[str]:
        failures = []
        for p in self.started:
            if p.running:
                try:
                    p.stop()
                except AssertionError as e:
                    failures.append(str(e))
        return failures


def peer_spec(
    addr: str,
    key: int | None = None,
    csum: bool = False,
    seq: bool = False,
    prefix: str = "192.0.2.0/26",
) -> str:
    """A `tpb pop --peer` value for a bridge with these GRE options."""
    parts = [addr]
    if key is not None:
        parts.append(f"key={key}")
    if csum:
        parts.append("csum")
    if seq:
        parts.append("seq")
    parts.append(f"prefix={prefix}")
    return ",".join(parts)


def gre_flags_args(key: int | None, csum: bool, seq: bool) -> list[str]:
    """The same options as `tpb run` flags."""
    return (
        (["--key", str(key)] if key is not None else [])
        + (["--csum"] if csum else [])
        + (["--seq"] if seq else [])
    )


# -- raw frames --------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    data: bytes  # as on the wire, VLAN tag put back from PACKET_AUXDATA
    pkttype: int  # PACKET_HOST, PACKET_OTHERHOST, PACKET_OUTGOING, ...

    @property
    def outgoing(self) -> bool:
        return self.pkttype == PACKET_OUTGOING


class Wire:
    """A packet socket on one interface of a lab node: sends frames, and
    captures every frame seen there (both ways unless `outgoing=False`)."""

    def __init__(self, lab: labmod.Lab, node: str, ifname: str, outgoing: bool = True) -> None:
        self.where = f"{node}:{ifname}"
        self.outgoing = outgoing
        with netns(lab.ns(node)):
            # protocol 0 until bind(): nothing from other interfaces queues first
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
                if not outgoing:
                    self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                self.sock.bind((ifname, ETH_P_ALL))
            except BaseException:
                self.sock.close()
                raise
        self.seen: list[Frame] = []

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, frame: bytes) -> None:
        n = self.sock.send(frame)
        assert n == len(frame), f"{self.where}: sent {n} of {len(frame)} bytes"

    def recv(self, timeout: float) -> Frame | None:
        """The next frame, or None after `timeout` seconds."""
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not r:
            return None
        data, anc, flags, addr = self.sock.recvmsg(1 << 17, socket.CMSG_SPACE(AUXDATA.size))
        assert not flags & socket.MSG_TRUNC, "capture buffer too small"
        for level, kind, cdata in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                status, _l, _s, _m, _n, tci, tpid = AUXDATA.unpack_from(cdata)
                if status & TP_STATUS_VLAN_VALID:
                    if not status & TP_STATUS_VLAN_TPID_VALID:
                        tpid = 0x8100
                    data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
        f = Frame(data, addr[2])
        self.seen.append(f)
        return f

    def drain(self, quiet: float = 0.0) -> None:
        """Forget what is queued (and what was seen so far)."""
        while self.recv(quiet) is not None:
            pass
        self.seen.clear()

    def until(self, pred: Callable[[Frame], bool], timeout: float = 5.0, what: str = "") -> Frame:
        """The first frame seen since the last drain() that satisfies `pred`,
        receiving more as needed; fail after `timeout`.  (TPB keeps the
        order within a flow, not between a tunneled and a bridged one.)"""
        for f in self.seen:
            if pred(f):
                return f
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            f = self.recv(left) if left > 0 else None
            if f is None:
                raise AssertionError(
                    f"{self.where}: no {what or 'expected frame'} within {timeout}s "
                    f"({len(self.seen)} other frames seen)"
                )
            if pred(f):
                return f

    def settle(self, quiet: float = 0.3, limit: float = 3.0) -> None:
        """Keep receiving until nothing arrives for `quiet` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self.recv(quiet) is not None:
            pass

    def with_marker(self, m: bytes) -> list[Frame]:
        return [f for f in self.seen if m in f.data]


def gre_header(
    proto: int = 0x0800,
    key: int | None = None,
    seq: int | None = None,
    csum: bool = False,
    payload: bytes = b"",
    extra_flags: int = 0,
    version: int = 0,
    csum_value: int | None = None,
) -> bytes:
    """A GRE header (RFC 2784/2890) + payload, byte by byte; `csum_value`
    overrides the computed checksum (to make it wrong)."""
    flags = extra_flags | version
    opt = b""
    if csum:
        flags |= GRE_C
        opt += b"\0\0\0\0"
    if key is not None:
        flags |= GRE_K
        opt += struct.pack("!I", key)
    if seq is not None:
        flags |= GRE_S
        opt += struct.pack("!I", seq)
    g = bytearray(struct.pack("!HH", flags, proto) + opt + payload)
    if csum:
        value = inet_csum(bytes(g)) if csum_value is None else csum_value
        g[4:6] = struct.pack("!H", value)
    return bytes(g)


def gre_checksum_ok(gre_bytes: bytes) -> bool:
    """The GRE checksum field verifies over header and payload (RFC 2784 2.5)."""
    return inet_csum(gre_bytes) == 0


# -- lab state ---------------------------------------------------------------


def nft_tables(lab: labmod.Lab, node: str = "tpb") -> list[str]:
    """`family name` of every nftables table in the node."""
    res = lab.run(node, ["nft", "-j", "list", "tables"])
    out = []
    for item in json.loads(res.stdout).get("nftables", []):
        t = item.get("table")
        if t:
            out.append(f"{t['family']} {t['name']}")
    return out


def links(lab: labmod.Lab, node: str = "tpb") -> list[str]:
    res = lab.run(node, ["ip", "-j", "link", "show"])
    return [link["ifname"] for link in json.loads(res.stdout)]


def tpb_leftovers(lab: labmod.Lab, node: str = "tpb") -> list[str]:
    """What a tunnel-mode TPB creates in its node: its table and veth pair."""
    left = [t for t in nft_tables(lab, node) if t.startswith("netdev tpb_")]
    left += [n for n in links(lab, node) if n.startswith("tpbsel")]
    return left


def remove_tpb_leftovers(lab: labmod.Lab, node: str = "tpb") -> None:
    """Put the node back (after a failed test), so later tests see the
    lab as built."""
    for t in nft_tables(lab, node):
        if t.startswith("netdev tpb_"):
            lab.run(node, ["nft", "delete", "table", *t.split()], check=False)
    for n in links(lab, node):
        if n.startswith("tpbsel"):
            lab.run(node, ["ip", "link", "del", n], check=False)


def neigh_mac(lab: labmod.Lab, node: str, addr: str, dev: str) -> str | None:
    res = lab.run(node, ["ip", "-j", "neigh", "show", addr, "dev", dev])
    for n in json.loads(res.stdout or "[]"):
        if n.get("lladdr"):
            return n["lladdr"]
    return None


def ping(lab: labmod.Lab, node: str, addr: str, count: int = 3, timeout: float = 30) -> str:
    """ping that must get every reply; fails with ping's output."""
    res = lab.run(
        node,
        ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", addr],
        check=False,
        timeout=timeout,
    )
    assert res.returncode == 0 and f" {count} received" in res.stdout, (
        f"{node}: ping {addr} failed: {res.stdout}{res.stderr}"
    )
    return res.stdout


# -- GRE as seen on the wire --------------------------------------------------

VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)


@dataclass(frozen=True)
class Gre:
    """One IPv4 GRE frame taken apart byte by byte."""

    frame: bytes
    dst_mac: str
    src_mac: str
    tags: tuple[tuple[int, int], ...]  # (TPID, TCI) of each VLAN tag
    outer: bytes  # the outer IPv4 header
    gre: bytes  # GRE header + payload (to the end of the outer packet)
    flags: int  # the first 16 bits: C R K S s Recur Flags Ver
    proto: int
    csum: int | None
    reserved1: int | None
    key: int | None
    seq: int | None
    inner: bytes

    @property
    def src(self) -> str:
        return socket.inet_ntoa(self.outer[12:16])

    @property
    def dst(self) -> str:
        return socket.inet_ntoa(self.outer[16:20])

    @property
    def df(self) -> bool:
        return bool(self.outer[6] & 0x40)

    @property
    def ip_id(self) -> int:
        return struct.unpack("!H", self.outer[4:6])[0]


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_gre(data: bytes) -> Gre | None:
    """The frame as Gre if it is Ethernet [+ tags] + IPv4 + GRE, else None."""
    off, tags = 12, []
    while len(data) >= off + 4 and struct.unpack("!H", data[off : off + 2])[0] in VLAN_TPIDS:
        tags.append(struct.unpack("!HH", data[off : off + 4]))
        off += 4
    if len(data) < off + 2 + 20 or data[off : off + 2] != b"\x08\x00":
        return None
    ip = data[off + 2 :]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ip[9] != 47:
        return None
    tot = struct.unpack("!H", ip[2:4])[0]
    g = ip[ihl:tot]
    flags, proto = struct.unpack("!HH", g[:4])
    pos = 4
    csum = reserved1 = key = seq = None
    if flags & GRE_C:
        csum, reserved1 = struct.unpack("!HH", g[pos : pos + 4])
        pos += 4
    if flags & GRE_K:
        key = struct.unpack("!I", g[pos : pos + 4])[0]
        pos += 4
    if flags & GRE_S:
        seq = struct.unpack("!I", g[pos : pos + 4])[0]
        pos += 4
    return Gre(
        frame=data,
        dst_mac=_mac(data[0:6]),
        src_mac=_mac(data[6:12]),
        tags=tuple(tags),
        outer=ip[:ihl],
        gre=g,
        flags=flags,
        proto=proto,
        csum=csum,
        reserved1=reserved1,
        key=key,
        seq=seq,
        inner=g[pos:],
    )


def ip_payload_of(data: bytes) -> bytes:
    """The IP packet of a plain Ethernet [+ tags] frame (padding cut off)."""
    off = 12
    while struct.unpack("!H", data[off : off + 2])[0] in VLAN_TPIDS:
        off += 4
    ip = data[off + 2 :]
    if ip[0] >> 4 == 4:
        return ip[: struct.unpack("!H", ip[2:4])[0]]
    return ip[: 40 + struct.unpack("!H", ip[4:6])[0]]
