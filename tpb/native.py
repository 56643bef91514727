"""The only module that imports the compiled C helper (cffi, API mode).

Everything packet-shaped happens behind these calls; Python only opens,
runs, stops and reads counters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tpb._tpb_c import ffi, lib
from tpb.errors import TpbError

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
    kernel_packets: int = 0
    kernel_drops: int = 0
    polls: int = 0
    batches: int = 0

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


class NativeBridge:
    """One C forwarding loop between two ports."""

    def __init__(
        self,
        in_ifindex: int,
        out_ifindex: int,
        *,
        ring_frames: int = 1024,
        batch: int = 64,
        spin_us: int = 0,
    ) -> None:
        cfg = ffi.new("struct tpb_bridge_config *")
        cfg.ifindex[PORT_IN] = in_ifindex
        cfg.ifindex[PORT_OUT] = out_ifindex
        cfg.ring_frames = ring_frames
        cfg.batch = batch
        cfg.spin_us = spin_us
        err = ffi.new("char[256]")
        br = lib.tpb_bridge_open(cfg, err, len(err))
        if br == ffi.NULL:
            raise TpbError(_err_text(err))
        self._br = ffi.gc(br, lib.tpb_bridge_close)

    def run(self) -> None:
        """Forward until stop(); cffi releases the GIL for the whole call."""
        rc = lib.tpb_bridge_run(self._br)
        if rc < 0:
            raise TpbError(f"forwarding loop failed: errno {-rc}")

    def stop(self) -> None:
        lib.tpb_bridge_stop(self._br)

    def counters(self, port: int) -> PortCounters:
        out = ffi.new("struct tpb_port_counters *")
        lib.tpb_bridge_counters(self._br, port, out)
        return PortCounters(**{f.name: getattr(out, f.name) for f in fields(PortCounters)})

    def close(self) -> None:
        """Closes the sockets now (the kernel drops promiscuous mode)."""
        if self._br is not None:
            ffi.release(self._br)  # runs tpb_bridge_close now, once
            self._br = None


def vlan_tag(tpid: int, tci: int) -> bytes:
    out = ffi.new("uint8_t[4]")
    lib.tpb_vlan_tag(tpid, tci, out)
    return bytes(ffi.buffer(out))


def csum_fold(data: bytes, seed: int = 0) -> int:
    return lib.tpb_csum_fold(data, len(data), seed)
