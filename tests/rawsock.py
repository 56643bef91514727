"""Raw Ethernet frames in and out of a lab namespace, byte-exact.

A packet socket belongs to the network namespace it was created in, for
its whole life.  So the test process steps into a lab namespace with
setns(2) just long enough to create (and bind) the socket, then steps back:
no helper process, no scapy on the capture path.

The capture side puts back the VLAN tag the receiving kernel moved out of
the frame (skb_vlan_untag() runs before any packet socket sees a frame):
recvmsg() with PACKET_AUXDATA reports it in tp_vlan_tci / tp_vlan_tpid.
Without that, every 802.1Q/802.1ad frame would look one tag short.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
CLONE_NEWNET = 0x40000000
# struct virtio_net_hdr (native byte order: packet sockets use the host's)
VNET_HDR = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
# struct tpacket_auxdata: status, len, snaplen (u32); mac, net, vlan_tci, vlan_tpid (u16)
AUXDATA = struct.Struct("=IIIHHHH")

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `name`."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({name}): {os.strerror(e)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover
                e = ctypes.get_errno()
                raise OSError(e, f"setns(back): {os.strerror(e)}")
    finally:
        os.close(home)


@dataclass(frozen=True)
class Frame:
    data: bytes  # the frame as it was on the wire, tag included
    pkttype: int  # PACKET_HOST, PACKET_BROADCAST, ... (never PACKET_OUTGOING)
    tag_from_aux: bool  # the outer tag came from PACKET_AUXDATA
    seq: int  # arrival order on this Port


class Port:
    """A packet socket on one interface of one namespace.

    `capture=True` binds it to ETH_P_ALL with PACKET_AUXDATA, to receive every
    incoming frame; otherwise it is bound to protocol 0 and only sends.
    `vnet=True` (sending only): every frame goes with a virtio_net_hdr, as
    TPB's own sockets send them: partial checksums, GSO super-packets.
    """

    def __init__(self, ns: str, ifname: str, capture: bool = False, vnet: bool = False) -> None:
        self.ns, self.ifname = ns, ifname
        self.received = 0
        with netns(ns):
            proto = ETH_P_ALL if capture else 0
            # created with protocol 0, so that it takes nothing in until bind()
            # names the port: created with proto, it would queue every
            # interface's frames until then
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                if capture:
                    self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
                    self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
                if vnet:
                    self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                self.sock.bind((ifname, proto))
            except BaseException:
                self.sock.close()
                raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Port:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        n = self.sock.send(frame)
        assert n == len(frame), f"sent {n} of {len(frame)} bytes"

    def send_vnet(
        self,
        frame: bytes,
        csum_start: int = 0,
        csum_offset: int = 0,
        gso_type: int = VIRTIO_NET_HDR_GSO_NONE,
        gso_size: int = 0,
        hdr_len: int = 0,
    ) -> None:
        """Send with a virtio_net_hdr (the socket needs vnet=True); a
        csum_start marks the frame CHECKSUM_PARTIAL."""
        flags = VIRTIO_NET_HDR_F_NEEDS_CSUM if csum_start else 0
        hdr = VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
        n = self.sock.send(hdr + frame)
        assert n == len(hdr) + len(frame), f"sent {n} of {len(hdr) + len(frame)} bytes"

    def recv(self, timeout: float) -> Frame | None:
        """The next incoming frame, or None after `timeout` seconds."""
        r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not r:
            return None
        data, anc, flags, addr = self.sock.recvmsg(1 << 17, socket.CMSG_SPACE(AUXDATA.size))
        assert not flags & socket.MSG_TRUNC, "capture buffer too small"
        assert not flags & socket.MSG_CTRUNC, "auxdata truncated"
        tagged = False
        for level, kind, cdata in anc:
            if level != SOL_PACKET or kind != PACKET_AUXDATA:
                continue
            status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack_from(cdata)
            if status & TP_STATUS_VLAN_VALID:
                if not status & TP_STATUS_VLAN_TPID_VALID:
                    tpid = ETH_P_8021Q
                data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
                tagged = True
        self.received += 1
        return Frame(data, addr[2], tagged, self.received)

    def drain(self) -> None:
        """Throw away whatever is queued now."""
        while self.recv(0) is not None:
            pass

    def collect(self, markers: list[bytes], fence: bytes, timeout: float = 5.0) -> dict:
        """Frames containing any of `markers`, grouped by marker, until the
        frame containing `fence` arrives (bounded by `timeout`).

        Sent last, the fence makes "arrived exactly once" decidable without a
        blind sleep: TPB forwards each direction in order, so a second copy
        of an earlier frame would be in before the fence.  After the fence
        the queue is drained once more, for copies from any other path.
        """
        got: dict[bytes, list[Frame]] = {m: [] for m in markers}
        deadline = time.monotonic() + timeout
        fenced = False
        while not fenced:
            f = self.recv(deadline - time.monotonic())
            if f is None:
                break
            fenced = fence in f.data
            for m in markers:
                if m in f.data:
                    got[m].append(f)
        assert fenced, f"fence frame never arrived at {self.ns}:{self.ifname} within {timeout}s"
        while (f := self.recv(0.05)) is not None:
            for m in markers:
                if m in f.data:
                    got[m].append(f)
        return got
