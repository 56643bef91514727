"""systemd's notification protocol (sd_notify(3)), without libsystemd.

Type=notify (or notify-reload) units learn from these datagrams when TPB
forwards (READY=1), what it is doing (STATUS=), that it reloads
(RELOADING=1, then READY=1 again) and that it stops (STOPPING=1).  With
WatchdogSec= set, systemd expects WATCHDOG=1 at least every WATCHDOG_USEC
and kills a unit that stays silent; the service sends it only while the C
loop's heartbeat moves, so a stuck loop gets TPB restarted.

Outside systemd (NOTIFY_SOCKET unset) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

from tpb.log import log


def _address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an AF_UNIX address: a path, or '@name' for the
    abstract namespace (a leading NUL byte)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not for a local daemon


class Notifier:
    """Sends sd_notify messages to NOTIFY_SOCKET; the watchdog interval is
    half of WATCHDOG_USEC (as sd_watchdog_enabled(3) advises), if it is set
    for this process."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self._sock: socket.socket | None = None
        self._failed = False
        if environ is None:
            # Children (nft, ip) are not the service: they must not notify
            # in its name (sd_notify's unset_environment).
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """One datagram of NAME=VALUE lines; a failure is logged once, not
        fatal: systemd's bookkeeping must never stop the forwarding."""
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failed:
                log.warning("NOTIFY_SOCKET: %s", e.strerror or e)
                self._failed = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # Type=notify-reload wants the time the reload began with it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
