"""How signals and the loop thread wake the daemon's main thread.

A Python signal handler runs in the main thread between two of its
bytecodes — possibly while that thread holds a lock.  threading.Event.set()
takes the Event's lock, so a handler that calls it deadlocks when the
signal lands inside the main thread's own Event.wait() or Event.clear():
`tpb run` hung for good on a SIGTERM that way (a futex wait; twice in
full test runs, and most times under a storm of signals).  So here a
handler only sets a Flag (no lock), and the main thread sleeps in poll()
on a socket pair that the kernel-level signal handler writes to
(signal.set_wakeup_fd) and the loop thread writes to when it ends; a
signal that arrives before the sleep still ends it.
"""

from __future__ import annotations

import math
import select
import signal
import socket


class Flag:
    """A flag a signal handler may set: a plain attribute, no lock.  The
    handler runs in the main thread, so it never races the main thread's
    own test-and-clear; a set between the two is taken by the action the
    clear stands for (a reload that reads the configuration afterwards)."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def take(self) -> bool:
        """Whether it was set; clears it."""
        was, self.value = self.value, False
        return was


class Wakeup:
    """The main thread's sleep.  Used as `with`: installs the wake-up fd
    for signals on entry (main thread only), restores the previous one on
    exit."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old = -1
        self._poll = select.poll()  # not select(): the fd may be past 1023
        self._poll.register(self._r, select.POLLIN)

    def __enter__(self) -> Wakeup:
        self._old = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old)
        self._r.close()
        self._w.close()

    def set(self) -> None:
        """From any thread: ends the current or next sleep."""
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (nobody sleeps)

    def sleep(self, timeout: float) -> None:
        """Up to `timeout` seconds, less if woken; empties the wake-ups.
        Signal handlers have run when it returns (PEP 475: poll retries
        after them, and then finds the byte their signal wrote)."""
        if self._poll.poll(max(0, math.ceil(timeout * 1000))):
            try:
                while self._r.recv(4096):
                    pass
            except BlockingIOError:
                pass
