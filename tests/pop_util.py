"""Shared by test_pop.py, test_pmtu.py and test_reassembly.py: `tpb run` and
`tpb pop` as processes in a tunnel lab, captures in a lab namespace (a packet
socket of our own, or tcpdump for fast flows), frames sent from a lab
namespace, and a few traffic tools (ping, iperf3, ethtool).

Everything is bounded: every wait has a timeout, every process is stopped
at teardown (Lab.down() stops what Lab.spawn() started)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import START_TIMEOUT, STOP_TIMEOUT, TpbDaemon, received, wait_for
from rawsock import ETH_P_ALL, SO_RCVBUFFORCE, netns

from tpb import lab as labmod
from tpb.lab import Lab

TUNNEL_MATCH = "ip daddr 203.0.113.0/24"

PACKET_OUTGOING = 4


# ---- tools ------------------------------------------------------------------


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, AF_PACKET, TUN)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")


def need_tool(name: str, package: str | None = None) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs `{name}` (apt-get install {package or name})")
    return path


def mac(lab: Lab, node: str, ifname: str) -> str:
    return lab.iface(node, ifname).mac


def link_exists(lab: Lab, node: str, ifname: str) -> bool:
    return lab.run(node, ["ip", "link", "show", "dev", ifname], check=False).returncode == 0


# ---- tpb run / tpb pop as processes -------------------------------------------


class Daemons:
    """A test's daemons; whatever is still running at teardown is stopped."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[TpbDaemon] = []

    def _add(self, d: TpbDaemon) -> TpbDaemon:
        self.started.append(d)
        return d.start()

    def run(self, lab: Lab, *extra: str, node: str = "tpb", config: str | None = None) -> TpbDaemon:
        """`tpb run --in eth2 --out eth3` in node (tpb or tpb2) with extra flags."""
        path = self.tmp / f"{node}-{len(self.started)}.json"
        argv = [sys.executable, "-m", "tpb", "run", "--in", "eth2", "--out", "eth3"]
        if config is not None:
            cfg = self.tmp / f"{node}-{len(self.started)}.toml"
            cfg.write_text(config)
            argv += ["--config", str(cfg)]
        argv += ["--counters", str(path), *extra]
        return self._add(TpbDaemon(lab, node, argv, "tpb: bridging", path))

    def pop(self, lab: Lab, *extra: str, node: str = "pop") -> TpbDaemon:
        path = self.tmp / f"{node}-{len(self.started)}.json"
        argv = [sys.executable, "-m", "tpb", "pop", "--counters", str(path), *extra]
        return self._add(TpbDaemon(lab, node, argv, "tpb: pop ", path))

    def close(self) -> None:
        for d in self.started:
            if d.running:
                try:
                    d.send_signal(signal.SIGTERM)
                except AssertionError:
                    d.kill()


def tunnel_args(local: str, *extra: str) -> list[str]:
    return ["--local", local, "--remote", labmod.T_POP, "--match", TUNNEL_MATCH, *extra]


# ---- namespaces and packet sockets ------------------------------------------




class FrameSender:
    """A packet socket on one interface of a lab node: frames out as given."""

    def __init__(self, lab: Lab, node: str, ifname: str) -> None:
        with netns(lab.ns(node)):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.sock.bind((ifname, 0))

    def send(self, frame: bytes) -> None:
        n = self.sock.send(frame)
        assert n == len(frame), (n, len(frame))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IpSender:
    """A raw IPv4 socket (IP_HDRINCL) in a lab node: the kernel routes our
    packets, whatever their source address."""

    def __init__(self, lab: Lab, node: str) -> None:
        with netns(lab.ns(node)):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, packet: bytes) -> None:
        dst = socket.inet_ntoa(packet[16:20])
        n = self.sock.sendto(packet, (dst, 0))
        assert n == len(packet), (n, len(packet))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Captured:
    data: bytes
    pkttype: int  # PACKET_HOST, ..., PACKET_OUTGOING
    t: float

    @property
    def outgoing(self) -> bool:
        return self.pkttype == PACKET_OUTGOING


class Capture:
    """Frames seen on one interface of a lab node (both directions), kept if
    `keep(frame)` says so, collected by a thread until stop().  The socket
    exists from the constructor on: nothing sent afterwards is missed."""

    def __init__(
        self,
        lab: Lab,
        node: str,
        ifname: str,
        keep: Callable[[bytes], bool] = lambda f: True,
        incoming_only: bool = False,
    ) -> None:
        self.keep = keep
        self.incoming_only = incoming_only
        self.frames: list[Captured] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        with netns(lab.ns(node)):
            # protocol 0 until bind(): created with ETH_P_ALL it would queue
            # every interface's frames until bind() names this one
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            self.sock.bind((ifname, ETH_P_ALL))
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if not r:
                continue
            while True:
                try:
                    data, addr = self.sock.recvfrom(1 << 17, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if self.incoming_only and addr[2] == PACKET_OUTGOING:
                    continue
                if self.keep(data):
                    with self.lock:
                        self.frames.append(Captured(data, addr[2], time.monotonic()))

    def snapshot(self) -> list[Captured]:
        with self.lock:
            return list(self.frames)

    def wait(self, predicate: Callable[[list[Captured]], object], timeout: float, what: str):
        return wait_for(lambda: predicate(self.snapshot()), timeout, what)

    def stop(self) -> list[Captured]:
        """Stop (after a moment for frames still in flight) and return them."""
        time.sleep(0.1)
        self.done.set()
        self.thread.join(timeout=5)
        self.sock.close()
        return self.snapshot()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done.is_set():
            self.stop()


class Tcpdump:
    """tcpdump writing a pcap file in a lab node, for flows too fast for a
    Python capture; frames() reads the file (our own parser: fast)."""

    def __init__(self, lab: Lab, node: str, ifname: str, path: Path, expr: str, snap: int = 0):
        need_tool("tcpdump")
        self.path = path
        argv = ["tcpdump", "-i", ifname, "-n", "-U", "-B", "16384", "-w", str(path)]
        if snap:
            argv += ["-s", str(snap)]
        argv += [expr]
        self.proc = lab.spawn(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        buf = b""
        while b"listening on" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, f"tcpdump did not start: {buf!r}"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                assert chunk, f"tcpdump exited: {buf!r}"
                buf += chunk

    def stop(self) -> list[bytes]:
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=STOP_TIMEOUT)
        return read_pcap(self.path)


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file (as captured, maybe cut at snaplen)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    rec = struct.Struct(endian + "IIII")
    out = []
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = rec.unpack_from(data, off)
        off += 16
        out.append(data[off : off + incl])
        off += incl
    return out


# ---- another process's file descriptors (pidfd_getfd) -----------------------

SYS_PIDFD_GETFD = 438  # x86_64, arm64 and the rest of the generic table
TUNSETVNETHDRSZ = 0x400454D8


def steal_fd(pid: int, fd: int) -> int:
    """A duplicate of process pid's file descriptor fd in this process
    (pidfd_getfd(2)): the same open file, so a socket option or ioctl set
    on it holds for that process too.  The caller closes it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        n = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_getfd({pid}, {fd}): {os.strerror(e)}")
        return n
    finally:
        os.close(pidfd)


def tun_fd_of(pid: int) -> int:
    """A duplicate of the TUN device's descriptor of process pid."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/net/tun":
                return steal_fd(pid, int(name))
        except FileNotFoundError:
            continue
    raise AssertionError(f"process {pid} has no TUN device open")


def raw_socket_of(pid: int, proto: int) -> socket.socket:
    """A duplicate of process pid's raw IPv4 socket of protocol proto."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
        except FileNotFoundError:
            continue
        s = socket.socket(fileno=steal_fd(pid, int(name)))
        if s.family == socket.AF_INET and s.type == socket.SOCK_RAW and s.proto == proto:
            return s
        s.close()
    raise AssertionError(f"process {pid} has no raw socket of protocol {proto}")


def all_stopped(pid: int) -> bool:
    """Every thread of the process is stopped (SIGSTOP reaches each thread
    a little after kill() returns)."""
    states = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(st in ("T", "t") for st in states)


# ---- parsing frames by hand (byte by byte) ----------------------------------


@dataclass(frozen=True)
class Gre:
    """A GRE-in-IPv4 frame, parsed by hand."""

    outer_src: str
    outer_dst: str
    outer_flags: int  # the IPv4 flags/fragment offset field
    flags: int  # GRE flags and version
    proto: int
    csum: int | None
    key: int | None
    seq: int | None
    inner: bytes  # what follows the GRE header (maybe cut at the snaplen)

    @property
    def inner_src(self) -> str:
        return socket.inet_ntoa(self.inner[12:16])

    @property
    def inner_dst(self) -> str:
        return socket.inet_ntoa(self.inner[16:20])


def parse_gre(frame: bytes) -> Gre | None:
    """The GRE packet in an Ethernet frame, or None (not GRE, or an outer
    fragment other than the first)."""
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 47:
        return None
    frag = struct.unpack_from("!H", ip, 6)[0]
    if frag & 0x1FFF:
        return None
    g = ip[ihl:]
    flags, proto = struct.unpack_from("!HH", g, 0)
    off = 4
    csum = key = seq = None
    if flags & 0x8000:
        csum = struct.unpack_from("!H", g, off)[0]
        off += 4
    if flags & 0x2000:
        key = struct.unpack_from("!I", g, off)[0]
        off += 4
    if flags & 0x1000:
        seq = struct.unpack_from("!I", g, off)[0]
        off += 4
    return Gre(
        socket.inet_ntoa(ip[12:16]),
        socket.inet_ntoa(ip[16:20]),
        frag,
        flags,
        proto,
        csum,
        key,
        seq,
        g[off:],
    )


def ipv4(frame: bytes) -> bytes | None:
    """The IPv4 packet in an untagged Ethernet frame, or None."""
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
        return frame[14:]
    return None


# ---- traffic ------------------------------------------------------------------


def ping(
    lab: Lab,
    node: str,
    dst: str,
    count: int = 3,
    size: int | None = None,
    df: str | None = None,
    interval: float = 0.2,
    wait: float = 2.0,
) -> subprocess.CompletedProcess[str]:
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait)]
    if size is not None:
        argv += ["-s", str(size)]
    if df is not None:
        argv += ["-M", df]
    argv.append(dst)
    return lab.run(node, argv, check=False, timeout=count * (interval + wait) + 10)


def assert_ping_ok(res: subprocess.CompletedProcess[str], count: int) -> None:
    assert received(res) == count, f"ping: {res.stdout}{res.stderr}"


def start_iperf_servers(lab: Lab, ports: tuple[int, ...]) -> None:
    need_tool("iperf3")
    for port in ports:
        lab.spawn(
            "server",
            ["iperf3", "-s", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def listening() -> bool:
        out = lab.run("server", ["ss", "-ltnH"], check=False).stdout
        return all(f":{p} " in out for p in ports)

    wait_for(listening, 10, "iperf3 servers")


def iperf(
    lab: Lab, node: str, port: int, *extra: str, seconds: int = 2, dst: str = labmod.T_SERVER
) -> subprocess.Popen:
    """iperf3 client in the background (-J); finish with iperf_result()."""
    argv = ["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J", *extra]
    return subprocess.Popen(lab.cmd(node, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def iperf_result(p: subprocess.Popen, timeout: float = 25) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("iperf3 did not finish") from None
    try:
        res = json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"iperf3: {out!r} {err!r}") from None
    assert p.returncode == 0 and "error" not in res, res.get("error", err)
    return res


# A veth's defaults: segmentation and checksum offloads on, GRO off.
OFFLOADS_ON = {"tso": "on", "gso": "on", "tx": "on", "gro": "off"}
OFFLOADS_OFF = {"tso": "off", "gso": "off", "tx": "off", "gro": "off"}


def lab_veths(lab: Lab) -> list[tuple[str, str]]:
    return [(i.node, i.name) for a, b in lab.links for i in (a, b)]


def set_offloads(lab: Lab, on: bool) -> None:
    """ethtool -K on every lab veth: TSO, GSO, tx checksumming (and GRO)
    off, or back to a veth's defaults."""
    need_tool("ethtool")
    args = [x for kv in (OFFLOADS_ON if on else OFFLOADS_OFF).items() for x in kv]
    for node, ifname in lab_veths(lab):
        lab.run(node, ["ethtool", "-K", ifname, *args])
