"""The only module that imports the compiled C helper (cffi, API mode).

Everything packet-shaped happens behind these calls; Python only opens,
runs, stops and reads counters.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from tpb._tpb_c import ffi, lib
from tpb.config import Tunnel
from tpb.errors import RuntimeFailure, TpbError

SMALL_MAX = lib.TPB_SMALL_MAX  # the longest frame a small ring slot takes
PORT_IN = lib.TPB_PORT_IN
PORT_OUT = lib.TPB_PORT_OUT
PORT_NAMES = {PORT_IN: "in", PORT_OUT: "out"}


@dataclass(frozen=True)
class PortCounters:
    """A snapshot of struct tpb_port_counters (see csrc/tpb.h)."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    drop_truncated: int = 0
    drop_too_big: int = 0
    drop_egress_full: int = 0
    drop_send_error: int = 0
    drop_gso_bad: int = 0
    kernel_packets: int = 0
    kernel_drops: int = 0
    polls: int = 0
    batches: int = 0
    drop_fill_empty: int = 0
    drop_xsk_rx: int = 0
    drop_xsk_invalid: int = 0
    drop_no_socket: int = 0
    xsk_tx_ring_empty: int = 0
    drop_shed: int = 0
    shed_engaged: int = 0
    shed_refused: int = 0

    @property
    def drops(self) -> dict[str, int]:
        """Drops by reason; the kernel's ring drops count as 'ring_full'."""
        out = {
            f.name[5:]: getattr(self, f.name) for f in fields(self) if f.name.startswith("drop_")
        }
        out["ring_full"] = self.kernel_drops
        return out


def _err_text(buf: object) -> str:
    return ffi.string(buf).decode(errors="replace")


_TUNNEL_FIELDS = ffi.typeof("struct tpb_tunnel_counters").fields
DROP_NAMES = [ffi.string(lib.tpb_drop_name(i)).decode() for i in range(lib.TPB_NDROP)]
DF_POLICY = {"copy": lib.TPB_DF_COPY, "set": lib.TPB_DF_SET, "clear": lib.TPB_DF_CLEAR}
FRAG_MODE = {"inner": lib.TPB_FRAG_INNER, "outer": lib.TPB_FRAG_OUTER}
ON_DOWN = {"bypass": lib.TPB_DOWN_BYPASS, "drop": lib.TPB_DOWN_DROP}
MAX_REMOTES = lib.TPB_MAX_REMOTES


def _ip_int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def tunnel_struct(t: Tunnel, out_mtu: int, out_mac: str) -> Any:
    """A struct tpb_tunnel_config from the settings."""
    c = ffi.new("struct tpb_tunnel_config *")
    c.local = _ip_int(t.local)
    c.nremotes = len(t.remote)
    for i, addr in enumerate(t.remote):
        c.remote[i] = _ip_int(addr)
    c.has_key = t.key is not None
    c.key = t.key or 0
    c.csum, c.seq, c.pmtud = t.csum, t.seq, t.pmtud
    c.df = DF_POLICY[t.df]
    c.ttl = -1 if t.ttl is None else t.ttl
    c.tos = -1 if t.tos is None else t.tos
    c.frag_mode = FRAG_MODE[t.fragment]
    c.mss = t.mss
    c.mtu = out_mtu
    c.icmp_rate = t.icmp_rate
    c.reasm_memory = t.reassembly_memory
    c.reasm_timeout_ms = int(t.reassembly_timeout * 1000)
    c.out_mac = bytes.fromhex(out_mac.replace(":", ""))
    if t.keepalive is not None:
        c.keepalive_ms = max(1, round(t.keepalive.period * 1000))
        c.keepalive_retries = t.keepalive.retries
    c.on_down = ON_DOWN[t.on_tunnel_down]
    c.encap = lib.TPB_ENCAP_UDP if t.encap == "udp" else lib.TPB_ENCAP_GRE
    if t.router_mac is not None:
        c.router_mac_set = 1
        c.router_mac = bytes.fromhex(t.router_mac.replace(":", ""))
    return c


@dataclass(frozen=True)
class RemoteState:
    """A snapshot of struct tpb_remote_state: one POP's keepalive state."""

    addr: str
    up: bool
    active: bool
    transitions: int
    keepalives_sent: int
    keepalives_unsent: int
    keepalives_received: int
    keepalives_reflected: int
    rtt: float | None  # seconds, of the last answered keepalive
    since_reply: float | None  # seconds since the last answer
    endpoint: str | None = None  # POP, GRE-in-UDP: "ADDR:PORT" the peer is answered at


def _remote_state(c: Any) -> RemoteState:
    return RemoteState(
        addr=str(ipaddress.IPv4Address(c.addr)),
        up=bool(c.up),
        active=bool(c.active),
        transitions=c.transitions,
        keepalives_sent=c.keepalives_sent,
        keepalives_unsent=c.keepalives_unsent,
        keepalives_received=c.keepalives_received,
        keepalives_reflected=c.keepalives_reflected,
        rtt=c.rtt_ns / 1e9 if c.rtt_ns else None,
        since_reply=c.since_reply_ns / 1e9 if c.since_reply_ns else None,
        endpoint=f"{ipaddress.IPv4Address(c.endpoint_addr)}:{c.endpoint_port}"
        if c.endpoint_port else None,
    )


def tunnel_counters(c: Any) -> dict[str, Any]:
    """A struct tpb_tunnel_counters as a dict, drops by reason (non-zero)."""
    out: dict[str, Any] = {name: getattr(c, name) for name, _ in _TUNNEL_FIELDS if name != "drop"}
    out["drop"] = {DROP_NAMES[i]: c.drop[i] for i in range(lib.TPB_NDROP) if c.drop[i]}
    return out


class NativeBridge:
    """One C forwarding loop between two ports (plain or tunnel mode)."""

    def __init__(
        self,
        in_ifindex: int,
        out_ifindex: int,
        *,
        ring_frames: int = 8192,
        batch: int = 64,
        spin_us: int = 0,
        shed: bool = False,
        tunnel: Any = None,
        sel_ifindex: int = 0,
        mark: int = 0,
        fanout: list[int] | None = None,
    ) -> None:
        """fanout: None, this loop alone sees every frame; [], the first of
        several workers (its rings make new PACKET_FANOUT_HASH groups); the
        first worker's fanout_ids(), another worker joining them."""
        self._ports = (in_ifindex, out_ifindex)
        self._data = dict(ring_frames=ring_frames, batch=batch, spin_us=spin_us, shed=int(shed))
        self._fanout = fanout
        cfg = self._config(tunnel, sel_ifindex, mark)
        err = ffi.new("char[256]")
        br = lib.tpb_bridge_open(cfg, err, len(err))
        if br == ffi.NULL:
            raise TpbError(_err_text(err))
        self._br = ffi.gc(br, lib.tpb_bridge_close)

    def _config(self, tunnel: Any, sel_ifindex: int, mark: int) -> Any:
        cfg = ffi.new("struct tpb_bridge_config *")
        cfg.ifindex[PORT_IN], cfg.ifindex[PORT_OUT] = self._ports
        cfg.ring_frames = self._data["ring_frames"]
        cfg.batch = self._data["batch"]
        cfg.spin_us = self._data["spin_us"]
        cfg.shed = self._data["shed"]
        if self._fanout is not None:
            cfg.fanout = lib.TPB_FANOUT_JOIN if self._fanout else lib.TPB_FANOUT_NEW
            for i, gid in enumerate(self._fanout):
                cfg.fanout_id[i] = gid
        if tunnel is not None:
            cfg.tunnel = 1
            cfg.sel_ifindex = sel_ifindex
            cfg.mark = mark
            cfg.tun = tunnel[0]
        return cfg

    def shed_error(self) -> str:
        """Why overload shedding was asked for and could not be loaded ("")."""
        return _err_text(lib.tpb_bridge_shed_error(self._br))

    def reconfigure(self, tunnel: Any = None, sel_ifindex: int = 0, mark: int = 0) -> None:
        """Applies new tunnel settings at the loop's next pass (rings stay
        open); TpbError with the C helper's reason if it refuses them."""
        err = ffi.new("char[256]")
        rc = lib.tpb_bridge_reconfigure(self._br, self._config(tunnel, sel_ifindex, mark),
                                        err, len(err))
        if rc < 0:
            raise TpbError(_err_text(err) or os.strerror(-rc))

    def remotes(self) -> list[RemoteState]:
        out = ffi.new("struct tpb_remote_state[]", MAX_REMOTES)
        n = lib.tpb_bridge_remotes(self._br, out, MAX_REMOTES)
        return [_remote_state(out[i]) for i in range(n)]

    def heartbeat(self) -> int:
        return lib.tpb_bridge_heartbeat(self._br)

    def fanout_ids(self) -> list[int]:
        """Each ring's fanout group id, for the other workers to join."""
        out = ffi.new("uint16_t[]", lib.TPB_FANOUT_RINGS)
        n = lib.tpb_bridge_fanout_ids(self._br, out)
        return [out[i] for i in range(n)]

    def run(self) -> None:
        """Forward until stop(); cffi releases the GIL for the whole call."""
        rc = lib.tpb_bridge_run(self._br)
        if rc < 0:
            raise RuntimeFailure(f"forwarding loop failed: {os.strerror(-rc)}")

    def stop(self) -> None:
        lib.tpb_bridge_stop(self._br)

    def bypass_qdisc(self, port: int, on: bool) -> None:
        rc = lib.tpb_bridge_bypass_qdisc(self._br, port, int(on))
        if rc < 0:
            raise TpbError(f"PACKET_QDISC_BYPASS: {os.strerror(-rc)}")

    def counters(self, port: int) -> PortCounters:
        out = ffi.new("struct tpb_port_counters *")
        lib.tpb_bridge_counters(self._br, port, out)
        return PortCounters(**{f.name: getattr(out, f.name) for f in fields(PortCounters)})

    def tunnel_counters(self) -> dict[str, Any]:
        """The tunnel's counters, and each remote's keepalive state under
        "remotes" (in configured order)."""
        out = ffi.new("struct tpb_tunnel_counters *")
        lib.tpb_bridge_tunnel_counters(self._br, out)
        c = tunnel_counters(out)
        c["remotes"] = [asdict(r) for r in self.remotes()]
        return c

    def close(self) -> None:
        """Closes the sockets now (the kernel drops promiscuous mode)."""
        if self._br is not None:
            ffi.release(self._br)  # runs tpb_bridge_close now, once
            self._br = None


class ShedProgram:
    """Overload shedding's XDP program on its own (csrc/shed.c), for tests:
    BPF_PROG_TEST_RUN on one frame at a time."""

    def __init__(self) -> None:
        err = ffi.new("char[256]")
        p = lib.tpb_shed_new(err, len(err))
        if p == ffi.NULL:
            raise TpbError(_err_text(err))
        self._p = ffi.gc(p, lib.tpb_shed_free)

    def run(self, frame: bytes, quota: int) -> int:
        """The verdict on frame with this quota: XDP_DROP 1, XDP_PASS 2."""
        rc = lib.tpb_shed_run(self._p, frame, len(frame), quota)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return int(rc)

    def map(self, key: int) -> int:
        """0: the quota; 1..256: a bucket, slot << 32 | count; 257: drops."""
        return int(lib.tpb_shed_map(self._p, key))


class NativeXsk:
    """The AF_XDP loop (csrc/xsk.c) between two ports, plain bridging: the
    same methods as NativeBridge; its XDP programs are on the ports while
    it is open (and no longer than the process lives)."""

    def __init__(
        self,
        in_ifindex: int,
        out_ifindex: int,
        *,
        names: tuple[str, str],
        ring_frames: int = 8192,
        batch: int = 64,
        spin_us: int = 0,
        busy_poll_us: int = 0,
        **_: Any,
    ) -> None:
        from tpb.xdp import NapiSettings, rx_queues

        cfg = ffi.new("struct tpb_xsk_config *")
        cfg.ifindex[PORT_IN], cfg.ifindex[PORT_OUT] = in_ifindex, out_ifindex
        # A socket per receive queue (an XDP socket gets the frames of the
        # queue it is bound to only), all sharing one UMEM of 4 KB chunks,
        # five rings' worth per socket (the fill ring counts twice): 80 MB
        # with 4096 descriptors in all.
        queues = [rx_queues(name) for name in names]
        for name, n in zip(names, queues, strict=True):
            if n > lib.TPB_XSK_MAX_QUEUES:
                raise TpbError(f"{name}: {n} receive queues: backend afxdp binds one socket "
                               f"to each, {lib.TPB_XSK_MAX_QUEUES} at most")
        cfg.queues = queues
        size = 64
        while size < min(ring_frames, 4096 // sum(queues)):
            size *= 2
        cfg.ring_size = size
        cfg.batch, cfg.spin_us, cfg.busy_poll_us = batch, spin_us, busy_poll_us
        err = ffi.new("char[256]")
        x = lib.tpb_xsk_open(cfg, err, len(err))
        if x == ffi.NULL:
            raise TpbError(_err_text(err))
        self._x = ffi.gc(x, lib.tpb_xsk_close)
        self._napi: NapiSettings | None = NapiSettings()
        try:
            for name in names if busy_poll_us else ():
                self._napi.busy_poll(name)
        except BaseException:
            self.close()
            raise

    def zerocopy(self) -> bool:
        return lib.tpb_xsk_zerocopy(self._x) == 1

    def run(self) -> None:
        rc = lib.tpb_xsk_run(self._x)
        if rc < 0:
            raise RuntimeFailure(f"AF_XDP loop failed: {os.strerror(-rc)}")

    def stop(self) -> None:
        lib.tpb_xsk_stop(self._x)

    def heartbeat(self) -> int:
        return lib.tpb_xsk_heartbeat(self._x)

    def bypass_qdisc(self, port: int, on: bool) -> None:
        """AF_XDP transmits past the qdisc always (copy mode: dev_direct_xmit)."""

    def reconfigure(self, tunnel: Any = None, sel_ifindex: int = 0, mark: int = 0) -> None:
        """Plain bridging has nothing a reload changes here."""

    def remotes(self) -> list[RemoteState]:
        return []

    def fanout_ids(self) -> list[int]:
        return []

    def counters(self, port: int) -> PortCounters:
        out = ffi.new("struct tpb_port_counters *")
        lib.tpb_xsk_counters(self._x, port, out)
        return PortCounters(**{f.name: getattr(out, f.name) for f in fields(PortCounters)})

    def tunnel_counters(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Detaches the XDP programs (frames go to the stack again), closes
        the sockets, frees the UMEM, restores the NAPI settings."""
        if self._napi is not None:
            self._napi.close()
            self._napi = None
        if self._x is not None:
            ffi.release(self._x)
            self._x = None


def vlan_tag(tpid: int, tci: int) -> bytes:
    out = ffi.new("uint8_t[4]")
    lib.tpb_vlan_tag(tpid, tci, out)
    return bytes(ffi.buffer(out))


def csum_fold(data: bytes, seed: int = 0) -> int:
    return lib.tpb_csum_fold(data, len(data), seed)


class NativePop:
    """The POP's C loop: raw GRE socket <-> TUN device."""

    def __init__(
        self,
        s: Any,
        tun_fd: int,
        tun_mtu: int,
        prefixes: list[tuple[bytes, int, int]],
        tun_uso: bool = False,
    ) -> None:
        self._tun = (tun_fd, tun_mtu, int(tun_uso))
        args = self._config(s, prefixes)
        err = ffi.new("char[256]")
        pop = lib.tpb_pop_open(*args, err, len(err))
        if pop == ffi.NULL:
            raise TpbError(_err_text(err))
        self._pop = ffi.gc(pop, lib.tpb_pop_close)
        self._names = [p.name for p in s.peers]

    def _config(self, s: Any, prefixes: list[tuple[bytes, int, int]]) -> tuple[Any, Any, Any]:
        cfg = ffi.new("struct tpb_pop_config *")
        cfg.local = _ip_int(s.local)
        cfg.tun_fd, cfg.tun_mtu, cfg.tun_uso = self._tun
        cfg.npeers = len(s.peers)
        cfg.nprefixes = len(prefixes)
        cfg.learn_timeout_s = s.learn_timeout
        cfg.batch = 64
        peers = ffi.new("struct tpb_pop_peer_config[]", max(1, len(s.peers)))
        for i, p in enumerate(s.peers):
            peers[i].addr = 0 if p.address == "any" else _ip_int(p.address)
            peers[i].encap = lib.TPB_ENCAP_UDP if p.encap == "udp" else lib.TPB_ENCAP_GRE
            peers[i].has_key = p.key is not None
            peers[i].key = p.key or 0
            peers[i].csum, peers[i].seq = p.csum, p.seq
            peers[i].ttl = -1 if p.ttl is None else p.ttl
            peers[i].tos = -1 if p.tos is None else p.tos
            if p.keepalive is not None:
                peers[i].keepalive_ms = max(1, round(p.keepalive.period * 1000))
                peers[i].keepalive_retries = p.keepalive.retries
        pfx = ffi.new("struct tpb_pop_prefix[]", max(1, len(prefixes)))
        for i, (addr, length, peer) in enumerate(prefixes):
            pfx[i].addr = addr
            pfx[i].len = length
            pfx[i].peer = peer
        return cfg, peers, pfx

    def run(self) -> None:
        rc = lib.tpb_pop_run(self._pop)
        if rc < 0:
            raise RuntimeFailure(f"pop loop failed: {os.strerror(-rc)}")

    def stop(self) -> None:
        lib.tpb_pop_stop(self._pop)

    def reconfigure(self, s: Any, prefixes: list[tuple[bytes, int, int]]) -> None:
        """New peers and prefixes at the loop's next pass; a peer kept by
        address keeps its counters and state."""
        err = ffi.new("char[256]")
        rc = lib.tpb_pop_reconfigure(self._pop, *self._config(s, prefixes), err, len(err))
        if rc < 0:
            raise TpbError(_err_text(err) or os.strerror(-rc))
        self._names = [p.name for p in s.peers]

    def peer_states(self) -> dict[str, RemoteState]:
        out = ffi.new("struct tpb_remote_state *")
        states = {}
        for i, name in enumerate(self._names):
            if lib.tpb_pop_peer_state(self._pop, i, out) == 0:
                states[name] = _remote_state(out)
        return states

    def heartbeat(self) -> int:
        return lib.tpb_pop_heartbeat(self._pop)

    def counters(self) -> dict[str, Any]:
        """Per peer its counters, and its keepalive state under "state"."""
        out = ffi.new("struct tpb_tunnel_counters *")
        states = self.peer_states()
        peers = {}
        for i, name in enumerate(self._names):
            lib.tpb_pop_counters(self._pop, i, out)
            peers[name] = tunnel_counters(out)
            if name in states:
                peers[name]["state"] = asdict(states[name])
        lib.tpb_pop_counters(self._pop, len(self._names), out)
        return {
            "peers": peers,
            "other": tunnel_counters(out),
            "learned": lib.tpb_pop_learned(self._pop),
        }

    def close(self) -> None:
        if self._pop is not None:
            ffi.release(self._pop)
            self._pop = None
