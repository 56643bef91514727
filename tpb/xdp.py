"""The Python side of `backend = "afxdp"`: what the ports look like to it
(receive queues, the XDP program on a port) and, with busy polling, the
ports' NAPI settings in sysfs, restored by close().

The XDP programs themselves are attached by the C helper as bpf_links
(csrc/xsk.c), so the kernel detaches them when TPB's process ends, even
by SIGKILL; a netlink (IFLA_XDP) attachment would outlive the process and
leave the port dropping every frame.
"""

from __future__ import annotations

import os
from pathlib import Path

from tpb.errors import TpbError

# Preferred busy polling (Documentation/networking/napi.rst): the port's
# interrupts stay masked while TPB polls, and gro_flush_timeout re-arms
# the NAPI if TPB stops polling.
BUSY_POLL_SYSFS = {"napi_defer_hard_irqs": "2", "gro_flush_timeout": "200000"}


def rx_queues(name: str) -> int:
    """The port's receive queues in use (real_num_rx_queues, which sysfs
    lists; IFLA_NUM_RX_QUEUES is how many it could have): a socket bound
    to a queue past them is refused (EINVAL)."""
    try:
        queues = os.listdir(f"/sys/class/net/{name}/queues")
    except OSError as e:
        raise TpbError(f"{name}: its queues in sysfs: {e.strerror}") from None
    return max(1, sum(q.startswith("rx-") for q in queues))


def xdp_prog_id(ifindex: int) -> int:
    """The id of the XDP program on the port, 0 for none."""
    from pyroute2 import IPRoute  # slow to import: only when needed

    with IPRoute() as ipr:
        xdp = ipr.get_links(ifindex)[0].get_attr("IFLA_XDP")
    return 0 if xdp is None else (xdp.get_attr("IFLA_XDP_PROG_ID") or 0)


class NapiSettings:
    """The ports' sysfs NAPI knobs for busy polling; close() restores the
    values found, also after a failure part way."""

    def __init__(self) -> None:
        self._saved: list[tuple[Path, str]] = []

    def busy_poll(self, name: str) -> None:
        for knob, value in BUSY_POLL_SYSFS.items():
            path = Path("/sys/class/net") / name / knob
            try:
                old = path.read_text().strip()
                path.write_text(value)
            except OSError as e:
                raise TpbError(f"{path}: {e.strerror}") from None
            self._saved.append((path, old))

    def close(self) -> None:
        for path, old in reversed(self._saved):
            try:
                path.write_text(old)
            except OSError:
                pass  # the port is gone
        self._saved.clear()
