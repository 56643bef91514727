"""Shared by tests/test_faults.py and tests/soak.py: streams of numbered
frames through TPB with their send and arrival times, a TCP transfer
between lab namespaces checked byte for byte, a metrics scrape from inside
a lab namespace, and putting a lab router's routes back after one of its
links went down (the kernel removes the routes through a link that goes
down, and does not bring them back when it comes up).

Every wait is bounded; times are CLOCK_MONOTONIC, which all network
namespaces share, so a send in one namespace and an arrival in another
can be compared."""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from rawsock import ETH_P_ALL, PACKET_IGNORE_OUTGOING, SO_RCVBUFFORCE, SOL_PACKET, netns

from tpb.lab import Lab


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ipv4_header(src: str, dst: str, proto: int, payload_len: int, ttl: int = 64,
                ident: int = 0, frag: int = 0) -> bytes:
    """An IPv4 header (no options) with its checksum."""
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, frag, ttl,
                              proto, 0, socket.inet_aton(src), socket.inet_aton(dst)))
    s = sum(struct.unpack("!10H", h))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    h[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(h)


def udp_frame(dst_mac: str, src_mac: str, src: str, dst: str, payload: bytes,
              dport: int = 9, sport: int = 40000, ttl: int = 64) -> bytes:
    """Ethernet + IPv4 + UDP (checksum 0: none, allowed over IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return (mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00"
            + ipv4_header(src, dst, 17, len(udp), ttl=ttl) + udp)


# ---- a stream of numbered frames --------------------------------------------


@dataclass
class Stream:
    """Frames carrying `tag` + a sequence number, sent from (node, ifname)
    every `interval` seconds by a thread, and looked for on (rx_node,
    rx_ifname) by another.  sent[seq] is the time of a successful send
    (a send the kernel refused, its link being down, is not in it);
    arrived[seq] the time it was seen at the far end.  Either end's link
    may go down and come back while it runs: errors are taken as they come,
    the threads go on."""

    lab: Lab
    node: str
    ifname: str
    rx_node: str
    rx_ifname: str
    build: object  # Callable[[bytes], bytes]: the frame around a payload
    tag: bytes
    interval: float = 0.01
    sent: dict[int, float] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    refused: int = 0
    ticks: int = 0  # frames the sender tried to send

    def __post_init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        with netns(self.lab.ns(self.node)):
            self._tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._tx.bind((self.ifname, 0))
        with netns(self.lab.ns(self.rx_node)):
            # protocol 0 until bind(): nothing from other interfaces queues first
            self._rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self._rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self._rx.bind((self.rx_ifname, ETH_P_ALL))
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        seq = 0
        due = time.monotonic()
        while not self._done.is_set():
            frame = self.build(self.tag + struct.pack("!I", seq))  # type: ignore[operator]
            try:
                self._tx.send(frame)
                with self._lock:
                    self.sent[seq] = time.monotonic()
            except OSError:  # ENETDOWN, ENXIO: the link is down
                self.refused += 1
            seq += 1
            self.ticks = seq
            due += self.interval
            self._done.wait(max(0.0, due - time.monotonic()))

    def _recv(self) -> None:
        n = len(self.tag)
        while not self._done.is_set():
            try:
                if not select.select([self._rx], [], [], 0.05)[0]:
                    continue
                data = self._rx.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:  # ENETDOWN once when its link goes down; it goes on after
                if e.errno not in (errno.ENETDOWN, errno.ENXIO):
                    raise
                continue
            t = time.monotonic()
            i = data.find(self.tag)
            if i >= 0 and len(data) >= i + n + 4:
                seq = struct.unpack_from("!I", data, i + n)[0]
                with self._lock:
                    self.arrived.setdefault(seq, t)

    def snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        with self._lock:
            return dict(self.sent), dict(self.arrived)

    def sent_since(self, t: float) -> int:
        return sum(1 for s in self.snapshot()[0].values() if s >= t)

    def delivered_sent_after(self, t: float) -> bool:
        """Whether some frame sent at or after `t` has arrived."""
        sent, arrived = self.snapshot()
        return any(sent.get(q, -1.0) >= t for q in arrived)

    def gap_after(self, t: float) -> float | None:
        """Seconds from `t` to the first arrival of a frame sent at or
        after `t` (None: none arrived)."""
        sent, arrived = self.snapshot()
        times = [a for q, a in arrived.items() if sent.get(q, -1.0) >= t]
        return min(times) - t if times else None

    def lost_between(self, t0: float, t1: float) -> list[int]:
        """Frames sent in [t0, t1) that never arrived."""
        sent, arrived = self.snapshot()
        return sorted(q for q, s in sent.items() if t0 <= s < t1 and q not in arrived)

    def close(self) -> None:
        self._done.set()
        for t in self._threads:
            t.join(timeout=5)
        self._tx.close()
        self._rx.close()


# ---- routes ------------------------------------------------------------------


def restore_routes(lab: Lab, node: str) -> None:
    """The node's static routes as the lab made them (a link that went
    down took those through it away)."""
    for dst, via in lab.nodes[node].routes:
        lab.run(node, ["ip", "route", "replace", dst, "via", via])


# ---- a TCP transfer between namespaces ------------------------------------------

# The receiver: takes one connection, prints how much it has every 256 KiB
# (so the test can act mid-transfer) and at the end the byte count and
# SHA-256 of what it got.
TCP_SINK = r"""
import hashlib, socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
c, _ = s.accept()
h, n, mark = hashlib.sha256(), 0, 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
    if n - mark >= 1 << 18:
        mark = n
        print("at", n, flush=True)
print("done", n, h.hexdigest(), flush=True)
"""

# The sender: `size` bytes of a deterministic pseudo-random stream, paced to
# `rate` bytes a second (so a fault can land mid-transfer), then its digest.
TCP_SOURCE = r"""
import hashlib, random, socket, sys, time
host, port, size, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rnd = random.Random(12)
c = socket.create_connection((host, port), timeout=60)
h, n, t0 = hashlib.sha256(), 0, time.monotonic()
while n < size:
    b = rnd.randbytes(min(1 << 16, size - n))
    c.sendall(b)
    h.update(b)
    n += len(b)
    ahead = n / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print("sent", n, h.hexdigest(), flush=True)
"""


class TcpTransfer:
    """`size` bytes from `src` to `dst_addr` (a listener in `dst`), paced."""

    def __init__(self, lab: Lab, src: str, dst: str, dst_addr: str, size: int,
                 rate: float, port: int = 5201) -> None:
        self.size = size
        self.sink = lab.spawn(dst, [sys.executable, "-u", "-c", TCP_SINK, str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""
        self._read_until(b"listening", 10)
        self.source = lab.spawn(src, [sys.executable, "-u", "-c", TCP_SOURCE, dst_addr,
                                      str(port), str(size), str(rate)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def _read_until(self, needle: bytes, timeout: float) -> None:
        assert self.sink.stdout is not None
        fd = self.sink.stdout.fileno()
        deadline = time.monotonic() + timeout
        while needle not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"tcp sink: no {needle!r} within {timeout}s: {self._buf!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.sink.stderr.read() if self.sink.stderr else b""
                raise AssertionError(f"tcp sink exited: {self._buf!r} {err!r}")
            self._buf += chunk

    def received(self) -> int:
        """Bytes the sink has reported so far (reads what it printed)."""
        assert self.sink.stdout is not None
        fd = self.sink.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            self._buf += chunk
        got = re.findall(rb"(?:at|done) (\d+)", self._buf)
        return int(got[-1]) if got else 0

    def wait_received(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"tcp: only {self.received()} of {n} bytes in {timeout}s")
            time.sleep(0.02)

    def finish(self, timeout: float) -> tuple[str, str]:
        """Waits for both ends; returns (what the source sent, what the sink
        got) as "N DIGEST"; fails if either does not end in time."""
        try:
            out, err = self.source.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.source.kill()
            self.sink.kill()
            raise AssertionError(f"tcp: transfer not done within {timeout}s "
                                 f"({self.received()} of {self.size} bytes arrived)") from None
        assert self.source.returncode == 0, err.decode(errors="replace")
        self._read_until(b"done", 30)
        self.sink.wait(timeout=10)
        sink = re.search(rb"done (\d+ \w+)", self._buf)
        src = re.search(rb"sent (\d+ \w+)", out)
        assert sink and src, (self._buf, out)
        return src.group(1).decode(), sink.group(1).decode()

    def close(self) -> None:
        for p in (self.source, self.sink):
            if p.poll() is None:
                p.kill()
                p.communicate()


# ---- metrics from inside a namespace -----------------------------------------------

SCRAPE = ("import sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def scrape(lab: Lab, node: str, listen: str) -> dict[str, float]:
    """One scrape of http://LISTEN/metrics in the node: {"name{labels}": value}."""
    res = lab.run(node, [sys.executable, "-c", SCRAPE, f"http://{listen}/metrics"])
    out = {}
    for line in res.stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
