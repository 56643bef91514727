"""One daemon life cycle for `tpb run` and `tpb pop`.

The C loop runs in a thread of its own (cffi releases the GIL for the whole
call); the main thread wakes every half second for housekeeping — the
daemon's tick(), the systemd watchdog — and for signals:

- SIGINT, SIGTERM: stop the loop, print the summary, exit 0;
- SIGHUP: reload the configuration; a refused one leaves the running one
  in place (see Daemon.reload).

What a daemon is, bridge or POP, is the Daemon protocol; this module knows
nothing of ports, tunnels or peers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

from tpb.config import ConfigError, Keepalive, Source
from tpb.errors import RuntimeFailure, TpbError
from tpb.log import log
from tpb.sdnotify import Notifier
from tpb.wakeup import Flag, Wakeup

if TYPE_CHECKING:  # the compiled helper and the servers load with the daemon
    from tpb.metrics import Closeable, ReloadState
    from tpb.native import RemoteState

HOUSEKEEPING = 0.5  # seconds between the main thread's wake-ups
FIRST_PASS_TIMEOUT = 5.0

class Daemon(Protocol):
    """What `tpb run` (bridge.Bridge) and `tpb pop` (pop.Pop) provide."""

    reload_state: ReloadState

    def run(self) -> None:
        """The C loop, in the loop thread, until stop(); raises
        RuntimeFailure if it fails."""

    def stop(self) -> None:
        """Make run() return; safe from any thread."""

    def heartbeat(self) -> int:
        """Passes of the C loop so far (it wakes at least once a second)."""

    def ready(self) -> str:
        """The line that says forwarding has started (scripts wait for it)."""

    def status(self) -> str:
        """One short line of state for systemd's STATUS=."""

    def tick(self) -> None:
        """Housekeeping, every half second in the main thread; a
        RuntimeFailure stops the daemon (exit 1)."""

    def reload(self) -> list[str]:
        """Re-read and apply the configuration without closing the loop;
        returns what changed (empty: nothing).  Refuses with TpbError
        (ConfigError: one problem per line) and then keeps the running
        configuration unchanged."""

    def finish(self) -> None:
        """After the loop has stopped: the summary line on stdout and the
        --counters file; RuntimeFailure if that file cannot be written."""


# A SIGHUP that arrives while TPB is still starting is kept for the loop,
# not lost (nor fatal: SIGHUP's default action would end the process).
_reload_requested = Flag()


class Lifecycle:
    """`with` for a daemon: _open() on entry; close() on exit, and at once
    when _open() fails part way, so that what it had set up (nftables
    table, veth pair, TUN device, servers) is undone before the error
    reaches the user."""

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


S = TypeVar("S")


class Served(Lifecycle, Generic[S]):
    """What bridge.Bridge and pop.Pop share as daemons: their settings `s`
    and where these came from (reload() reads them again through `load`),
    the --counters file, the reload state the metrics show, the C side
    (`native`), the metrics and status servers that read its counters, and
    the stack that undoes what _open() made."""

    native: Any

    def __init__(
        self,
        s: S,
        src: Source | None,
        counters_file: str | None,
        load: Callable[[], tuple[S, Source]] | None,
    ) -> None:
        from tpb.metrics import ReloadState

        self.s = s
        self.src = src or Source()
        self.counters_file = counters_file
        self._load = load
        self.reload_state = ReloadState()
        self.native = None
        self._metrics: Closeable | None = None
        self._status: Closeable | None = None
        self._stack = ExitStack()

    def _close_servers(self) -> None:
        """Before the C side closes: a scrape or a status request must not
        read a closed loop's counters."""
        for srv in (self._metrics, self._status):
            if srv is not None:
                srv.close()
        self._metrics = self._status = None

    def close(self) -> None:
        self._close_servers()
        self._stack.close()

    def run(self) -> None:
        assert self.native is not None
        self.native.run()

    def stop(self) -> None:
        if self.native is not None:
            self.native.stop()

    def heartbeat(self) -> int:
        assert self.native is not None
        return int(self.native.heartbeat())


def request_reload(_signum: int = 0, _frame: object = None) -> None:
    _reload_requested.set()


def serve(d: Daemon, notify: Notifier | None = None) -> int:
    """Run `d` until a stop signal or a failure; returns the exit status
    (0), or raises RuntimeFailure (exit 1)."""
    notify = notify or Notifier()
    with Wakeup() as wake:
        return _serve(d, notify, wake)


def _serve(d: Daemon, notify: Notifier, wake: Wakeup) -> int:
    # The handlers set flags and nothing else (tpb.wakeup says why); the
    # signal itself wakes the main thread's sleep.
    stopping = Flag()
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            d.run()
        except BaseException as e:  # reported by the main thread
            failure.append(e)
        finally:
            wake.set()

    def on_stop(_signum: int, _frame: object) -> None:
        stopping.set()

    def on_hup(_signum: int, _frame: object) -> None:
        _reload_requested.set()

    old = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, on_hup),
    }
    worker = threading.Thread(target=loop, name="tpb-loop", daemon=True)
    dog = Watchdog(notify, d.heartbeat)
    try:
        d.tick()  # before the first frame (the bridge's qdisc bypass)
        worker.start()
        if _first_pass(d, worker, stopping):
            log.info(d.ready())
            shown = d.status()
            notify.ready(shown)
            dog.start()
            while not stopping.value and worker.is_alive():
                if _reload_requested.take():
                    _reload(d, notify)
                d.tick()
                if (now := d.status()) != shown:
                    notify.status(now)
                    shown = now
                dog.check()
                wake.sleep(dog.timeout(HOUSEKEEPING))
    except TpbError as e:  # from tick(): the daemon cannot go on
        failure.append(e if isinstance(e, RuntimeFailure) else RuntimeFailure(str(e)))
    except Exception as e:  # a bug in housekeeping: stop as cleanly as for a failure
        log.debug("%s", traceback.format_exc().rstrip())
        failure.append(RuntimeFailure(f"internal error: {type(e).__name__}: {e}"))
    finally:
        notify.stopping()
        d.stop()
        if worker.ident is not None:
            worker.join()
    # A second signal while the counters are written must not cut them
    # short: the old handlers (which raise) come back only afterwards.
    try:
        d.finish()
    except RuntimeFailure as e:
        if not failure:
            raise
        log.error("%s", e)  # the loop's own failure is the one to exit with
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        notify.close()
    if failure:
        e = failure[0]
        if isinstance(e, TpbError) and not isinstance(e, RuntimeFailure):
            raise RuntimeFailure(str(e)) from None
        raise e
    return 0


def _first_pass(d: Daemon, worker: threading.Thread, stopping: Flag) -> bool:
    """Waits until the loop has made its first pass (its rings are being
    read): False if it stopped or failed first."""
    deadline = time.monotonic() + FIRST_PASS_TIMEOUT
    while worker.is_alive() and not stopping.value:
        beat = d.heartbeat()
        if beat > 0:
            return True
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"the forwarding loop made no pass in {FIRST_PASS_TIMEOUT:g}s")
        time.sleep(0.002)
    return False


class Watchdog:
    """WATCHDOG=1 every half WATCHDOG_USEC, but only while the loop's
    heartbeat has moved since the last one: a stuck loop falls silent and
    systemd restarts TPB."""

    RECHECK = 0.1  # a late heartbeat is looked at again this soon

    def __init__(self, notify: Notifier, heartbeat: Callable[[], int]) -> None:
        self.notify = notify
        self.heartbeat = heartbeat
        self.interval = notify.watchdog_interval if notify.enabled else None
        self.due = 0.0
        self.last = 0
        self.stuck_since: float | None = None

    def start(self) -> None:
        if self.interval is not None:
            self.last = self.heartbeat()
            self.notify.watchdog()
            self.due = time.monotonic() + self.interval

    def timeout(self, default: float) -> float:
        if self.interval is None:
            return default
        return max(0.0, min(default, self.due - time.monotonic()))

    def check(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now < self.due:
            return
        beat = self.heartbeat()
        if beat != self.last:
            if self.stuck_since is not None:
                log.warning("the forwarding loop moves again")
                self.stuck_since = None
            self.notify.watchdog()
            self.last = beat
            self.due = now + self.interval
            return
        if self.stuck_since is None:
            self.stuck_since = now
            log.error("the forwarding loop has made no pass for %.1fs: the watchdog is not "
                      "fed", self.interval)
        self.due = now + self.RECHECK


def _reload(d: Daemon, notify: Notifier) -> None:
    """SIGHUP: RELOADING=1, the daemon's reload, READY=1 again (whatever
    came of it: the running configuration is in place either way)."""
    notify.reloading()
    try:
        changes = d.reload()
    except ConfigError as e:
        _refused(d, e.problems)
    except TpbError as e:
        _refused(d, [str(e)])
    except Exception as e:  # a bug must not take the forwarding down with it
        log.debug("%s", traceback.format_exc())
        _refused(d, [f"internal error: {type(e).__name__}: {e}"])
    else:
        d.reload_state.successful = True
        d.reload_state.timestamp = time.time()
        log.info("configuration reloaded: %s", "; ".join(changes) if changes else "no change")
    notify.ready(d.status())


def _refused(d: Daemon, problems: list[str]) -> None:
    d.reload_state.successful = False
    for problem in problems:
        log.error("reload refused: %s", problem)


class StateLog:
    """One log line per change of a far end's keepalive state (up/down) and
    of where selected traffic goes (the active one), never per keepalive.
    The first reading is the baseline: only changes are news."""

    def __init__(self, noun: str, retries: Callable[[str], int | None],
                 nothing_active: Callable[[], str] | None = None) -> None:
        self.noun = noun  # "tunnel to" / "peer"
        self.retries = retries
        self.nothing_active = nothing_active  # what it means; None: no notion of active
        self.last: dict[str, RemoteState] | None = None

    def update(self, states: Mapping[str, RemoteState]) -> None:
        before, self.last = self.last, dict(states)
        if before is None:
            return
        for addr, st in states.items():
            was = before.get(addr)
            if was is None or was.up == st.up:
                continue
            if st.up:
                rtt = f" (round trip {st.rtt * 1000:.1f} ms)" if st.rtt else ""
                log.info("%s %s is up%s", self.noun, addr, rtt)
            else:
                n = self.retries(addr)
                why = f" ({n} keepalives unanswered)" if n else ""
                log.warning("%s %s is down%s", self.noun, addr, why)
        if self.nothing_active is not None and states:
            was_active, now = _active(before), _active(self.last)
            if now != was_active:
                if now is not None:
                    log.info("traffic now goes to %s", now)
                else:
                    log.warning("%s", self.nothing_active())

    def active(self) -> str | None:
        return _active(self.last or {})


def _active(states: Mapping[str, RemoteState]) -> str | None:
    return next((addr for addr, st in states.items() if st.active), None)


def keepalive_retries(k: Keepalive | None) -> int | None:
    return k.retries if k is not None else None


def serve_metrics(listen: tuple[str, int] | None,
                  collector: Callable[[], Any]) -> Closeable | None:
    """metrics.serve() on `listen` (None: off) with collector(); a bind
    failure is the operator's (TpbError, exit 2)."""
    from tpb import metrics

    if listen is None:
        return None
    return metrics.serve(listen, collector())


def serve_status(kind: str, name: str, snapshot: Callable[[], dict[str, Any]]) -> Closeable | None:
    """status.serve() for `tpb status` from another shell."""
    from tpb import status

    return status.serve(kind, name, snapshot)


def write_counters(path: str, data: Any) -> None:
    """The --counters file at exit; RuntimeFailure if it cannot be written."""
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError as e:
        raise RuntimeFailure(f"--counters {path}: {e.strerror or e}") from None


def counters_file_problem(path: str | None) -> str | None:
    """Why the --counters file could not be written at exit, checked at
    start: better refused now than lost after a day of counting.  Nothing
    is created (a killed TPB leaves no file)."""
    if path is None:
        return None
    where = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--counters {path}: is a directory"
    if not os.path.isdir(where):
        return f"--counters {path}: no such directory {where}"
    if not os.access(where, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"--counters {path}: not writable"
    return None
