"""service.serve(), the daemon life cycle shared by `tpb run` and `tpb pop`,
with a fake daemon: signals, sd_notify datagrams on a real AF_UNIX socket,
the watchdog following the heartbeat, reloads, failures.  Also the keepalive
state log, the POP's reload order with a refusing C side, and the journal's
priority prefixes.  No namespaces, no root.

(The real processes are in tests/test_daemon.py.)"""

from __future__ import annotations

import io
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tpb import log as logmod
from tpb import service, wakeup
from tpb.config import ConfigError, Source
from tpb.errors import RuntimeFailure, TpbError
from tpb.metrics import ReloadState
from tpb.native import RemoteState
from tpb.pop import Pop
from tpb.pop_config import Peer, PopSettings
from tpb.sdnotify import Notifier


class FakeDaemon:
    """A service.Daemon whose loop counts heartbeats every 10 ms (until
    `freeze` seconds after it started, if given) and whose reload returns
    or raises what the test says."""

    def __init__(self, freeze: float | None = None, fail_after: float | None = None,
                 reload: object = (), tick_error: BaseException | None = None) -> None:
        self.reload_state = ReloadState()
        self.beat = 0
        self.freeze = freeze
        self.fail_after = fail_after
        self.frozen_at: float | None = None
        self._reload = reload
        self.tick_error = tick_error
        self.stopped = threading.Event()
        self.calls: list[str] = []

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stopped.wait(0.01):
            now = time.monotonic() - t0
            if self.fail_after is not None and now > self.fail_after:
                raise RuntimeFailure("forwarding loop failed: Network is down")
            if self.freeze is not None and now > self.freeze:
                self.frozen_at = self.frozen_at or time.monotonic()
                continue
            self.beat += 1

    def stop(self) -> None:
        self.stopped.set()

    def heartbeat(self) -> int:
        return self.beat

    def ready(self) -> str:
        return "fake forwarding (ctrl-c to stop)"

    def status(self) -> str:
        return "fake forwarding"

    def tick(self) -> None:
        self.calls.append("tick")
        if self.tick_error is not None and self.calls.count("tick") > 2:
            raise self.tick_error

    def reload(self) -> list[str]:
        self.calls.append("reload")
        if isinstance(self._reload, BaseException):
            raise self._reload
        return list(self._reload)  # type: ignore[call-overload]

    def finish(self) -> None:
        self.calls.append("finish")


class Listener:
    """The systemd end: an AF_UNIX datagram socket, every message kept with
    the time it came."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"tpb-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="tpbn", dir="/tmp")  # short: sun_path is 108
            self.env = f"{self.dir}/notify"
            self.sock.bind(self.env)
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def close(self) -> list[str]:
        time.sleep(0.05)
        self.done.set()
        self.thread.join()
        self.sock.close()
        if not self.env.startswith("@"):
            os.unlink(self.env)
            os.rmdir(self.dir)
        return [m for _, m in self.got]

    def fields(self, name: str) -> list[float]:
        """When each message with the field `name` (e.g. "WATCHDOG=1") came."""
        return [t for t, m in self.got if name in m.split("\n")]


def after(seconds: float, *signums: int) -> threading.Timer:
    """Send ourselves these signals, one after another, `seconds` from now
    (serve() runs in the main thread, as in tpb)."""

    def send() -> None:
        for s in signums:
            os.kill(os.getpid(), s)
            time.sleep(0.3)

    t = threading.Timer(seconds, send)
    t.start()
    return t


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    if not lst.done.is_set():
        lst.close()


@pytest.fixture(autouse=True)
def logs_to_stderr():
    logmod.setup("debug")
    service._reload_requested.take()
    yield
    logmod.setup("info")


def test_ready_status_and_stopping_on_sigterm(listener, capsys):
    d = FakeDaemon()
    after(0.3, signal.SIGTERM)
    assert service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env})) == 0
    msgs = listener.close()
    assert msgs[0] == "READY=1\nSTATUS=fake forwarding", msgs
    assert msgs[-1] == "STOPPING=1\nSTATUS=stopping", msgs
    assert d.calls[-1] == "finish" and d.calls.count("finish") == 1
    assert "tpb: fake forwarding (ctrl-c to stop)" in capsys.readouterr().err.splitlines()


def test_signal_handlers_are_put_back(listener):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    after(0.2, signal.SIGINT)
    assert service.serve(FakeDaemon(), Notifier({"NOTIFY_SOCKET": listener.env})) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_watchdog_is_fed_only_while_the_heartbeat_moves(listener, capsys):
    d = FakeDaemon(freeze=0.8)
    env = {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "200000"}  # every 0.1 s
    after(1.8, signal.SIGTERM)
    start = time.monotonic()
    assert service.serve(d, Notifier(env)) == 0
    listener.close()
    pings = listener.fields("WATCHDOG=1")
    assert d.frozen_at is not None
    before = [t for t in pings if t < d.frozen_at]
    late = [t - d.frozen_at for t in pings if t > d.frozen_at + 0.15]
    assert len(before) >= 0.8 / 0.1 * 0.6, [t - start for t in pings]
    assert late == [], f"fed {len(late)} times after the loop stopped moving"
    err = capsys.readouterr().err
    assert "the forwarding loop has made no pass for" in err and "watchdog" in err


def test_watchdog_for_another_pid_is_not_ours(listener):
    env = {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    after(0.6, signal.SIGTERM)
    assert service.serve(FakeDaemon(), Notifier(env)) == 0
    listener.close()
    assert listener.fields("WATCHDOG=1") == []
    assert listener.fields("READY=1")


def test_abstract_notify_socket():
    lst = Listener(abstract=True)
    n = Notifier({"NOTIFY_SOCKET": lst.env})
    n.ready("up")
    n.close()
    assert lst.close() == ["READY=1\nSTATUS=up"]


def test_no_notify_socket_sends_nothing_and_fails_nothing():
    n = Notifier({})
    assert not n.enabled
    n.ready("x")
    n.watchdog()


def test_notifier_takes_the_variables_out_of_the_environment(monkeypatch, listener):
    """Children (nft, ip) must not notify in the service's name."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier()
    assert n.enabled and n.watchdog_interval == 0.5
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


def test_sighup_reloads_between_reloading_and_ready(listener, capsys):
    d = FakeDaemon(reload=["tunnel.key 7 -> 8"])
    d.reload_state.timestamp = 0.0
    after(0.3, signal.SIGHUP, signal.SIGTERM)
    assert service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env})) == 0
    msgs = listener.close()
    i = next(i for i, m in enumerate(msgs) if m.startswith("RELOADING=1\nMONOTONIC_USEC="))
    assert msgs[i + 1].startswith("READY=1\n"), msgs
    assert d.calls.count("reload") == 1
    assert d.reload_state.successful and d.reload_state.timestamp > 0
    assert "tpb: configuration reloaded: tunnel.key 7 -> 8" in capsys.readouterr().err


def test_refused_reload_logs_every_problem_and_keeps_running(listener, capsys):
    d = FakeDaemon(reload=ConfigError(["f.toml:3: bad one", "f.toml:4: bad two"]))
    after(0.3, signal.SIGHUP, signal.SIGHUP, signal.SIGTERM)
    assert service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env})) == 0
    msgs = listener.close()
    assert d.calls.count("reload") == 2
    assert not d.reload_state.successful
    assert sum(m.startswith("READY=1") for m in msgs) == 3, msgs  # start, and after each
    err = capsys.readouterr().err.splitlines()
    assert err.count("tpb: reload refused: f.toml:3: bad one") == 2, err
    assert err.count("tpb: reload refused: f.toml:4: bad two") == 2, err


def test_a_bug_in_reload_is_a_refusal_not_a_crash(listener, capsys):
    d = FakeDaemon(reload=KeyError("x"))
    after(0.3, signal.SIGHUP, signal.SIGTERM)
    assert service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env})) == 0
    listener.close()
    assert not d.reload_state.successful
    assert "tpb: reload refused: internal error: KeyError: 'x'" in capsys.readouterr().err


def test_sighup_while_starting_is_kept_for_the_loop(listener):
    service.request_reload()
    d = FakeDaemon(reload=[])
    after(0.4, signal.SIGTERM)
    assert service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env})) == 0
    listener.close()
    assert d.calls.count("reload") == 1


STORM_DAEMON = """
import sys, threading
from tpb import log, service
from tpb.metrics import ReloadState

class D:
    reload_state = ReloadState()
    def __init__(self):
        self.done = threading.Event()
        self.beat = 0
    def run(self):
        while not self.done.wait(0.001):
            self.beat += 1
    def stop(self): self.done.set()
    def heartbeat(self): return self.beat
    def ready(self): return "storm ready"
    def status(self): return "storm"
    def tick(self): pass
    def reload(self): return []
    def finish(self): print("finished", flush=True)

log.setup("warning")
sys.exit(service.serve(D()))
"""


def test_a_storm_of_signals_never_deadlocks_the_main_thread():
    """Thousands of SIGHUPs, then SIGTERM: each handler runs between two
    bytecodes of the main thread, wherever it is (inside its own sleep's
    lock, once: threading.Event.set() from the handler hung `tpb run` for
    good).  In a child, so that a hang fails the test instead of the run."""
    child = subprocess.Popen([sys.executable, "-c", STORM_DAEMON], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not _catches(child.pid, signal.SIGHUP):  # SIGHUP's default would end it
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never installed its handlers"
            time.sleep(0.01)
        for _ in range(100_000):
            os.kill(child.pid, signal.SIGHUP)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        stack = Path(f"/proc/{child.pid}/stack").read_text()
        child.kill()
        child.communicate()
        raise AssertionError(
            f"serve() did not return after SIGTERM; main thread: {stack}") from None
    assert child.returncode == 0, err
    assert out == "finished\n"


def test_the_main_threads_sleep_works_with_descriptors_past_1023():
    """A POP with many peers, or a process started with many descriptors
    open: its wake-up socket may be past 1023, where select() refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    fillers: list[int] = []
    try:
        while len(fillers) < 1100 and (not fillers or fillers[-1] < 1024):
            fillers.append(os.open("/dev/null", os.O_RDONLY))
        with wakeup.Wakeup() as w:
            assert w._r.fileno() > 1023
            t0 = time.monotonic()
            w.sleep(0.05)  # nothing to wake it: the whole timeout
            assert 0.04 <= time.monotonic() - t0 < 2
            w.set()
            t0 = time.monotonic()
            w.sleep(10)
            assert time.monotonic() - t0 < 2
            os.kill(os.getpid(), signal.SIGWINCH)  # no handler: no byte, no wake-up
            signal.signal(signal.SIGUSR1, lambda *_: None)
            try:
                os.kill(os.getpid(), signal.SIGUSR1)  # a handler: its byte ends the sleep
                t0 = time.monotonic()
                w.sleep(10)
                assert time.monotonic() - t0 < 2
            finally:
                signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _catches(pid: int, signum: int) -> bool:
    """Whether `pid` has a handler for `signum` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_loop_failure_is_a_runtime_failure_after_the_summary(listener):
    d = FakeDaemon(fail_after=0.2)
    with pytest.raises(RuntimeFailure, match="forwarding loop failed") as e:
        service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env}))
    assert e.value.exit_code == 1
    assert d.calls[-1] == "finish"
    assert listener.close()[-1].startswith("STOPPING=1")


def test_housekeeping_failure_stops_with_exit_1(listener):
    d = FakeDaemon(tick_error=TpbError("eth3: the port went away"))
    with pytest.raises(RuntimeFailure, match="eth3: the port went away") as e:
        service.serve(d, Notifier({"NOTIFY_SOCKET": listener.env}))
    assert e.value.exit_code == 1 and d.calls[-1] == "finish"
    listener.close()


def test_counters_file_failure_after_a_clean_stop_is_exit_1(listener):
    class Unwritable(FakeDaemon):
        def finish(self) -> None:
            super().finish()
            raise RuntimeFailure("--counters /x/y: No such file or directory")

    after(0.2, signal.SIGTERM)
    with pytest.raises(RuntimeFailure, match="--counters"):
        service.serve(Unwritable(), Notifier({"NOTIFY_SOCKET": listener.env}))
    listener.close()


# -- the keepalive state log ----------------------------------------------------


def state(addr: str, up: bool, active: bool = False) -> RemoteState:
    return RemoteState(addr, up, active, 0, 0, 0, 0, 0, 0.0012 if up else None, None)


def test_state_log_says_each_change_once(capsys):
    sl = service.StateLog("tunnel to", lambda _a: 3, lambda: "no POP is up: dropped")
    a, b = "198.51.100.34", "198.51.100.35"
    sl.update({a: state(a, True, True), b: state(b, True)})  # the baseline: silent
    sl.update({a: state(a, True, True), b: state(b, True)})
    sl.update({a: state(a, False), b: state(b, True, True)})
    sl.update({a: state(a, False), b: state(b, True, True)})
    sl.update({a: state(a, False), b: state(b, False)})
    sl.update({a: state(a, True, True), b: state(b, False)})
    assert capsys.readouterr().err.splitlines() == [
        f"tpb: tunnel to {a} is down (3 keepalives unanswered)",
        f"tpb: traffic now goes to {b}",
        f"tpb: tunnel to {b} is down (3 keepalives unanswered)",
        "tpb: no POP is up: dropped",
        f"tpb: tunnel to {a} is up (round trip 1.2 ms)",
        f"tpb: traffic now goes to {a}",
    ]
    assert sl.active() == a


# -- the POP's reload: routes first, C, then old routes; a refusal undoes --------


class FakeNativePop:
    def __init__(self, events: list[str], refuse: bool) -> None:
        self.events, self.refuse = events, refuse

    def reconfigure(self, s: PopSettings, prefixes: list) -> None:
        self.events.append(f"reconfigure {len(s.peers)} peers {len(prefixes)} prefixes")
        if self.refuse:
            raise TpbError("live reload is not implemented yet")


class FakeRoutes:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def add(self, pfx: str, peer: str) -> None:
        self.events.append(f"add {pfx}")

    def remove(self, pfx: str) -> None:
        self.events.append(f"remove {pfx}")


def pop_with(refuse: bool, new_peers: list[Peer]) -> tuple[Pop, list[str]]:
    old = PopSettings("198.51.100.34", peers=[Peer("198.51.100.3", prefixes=["192.0.2.0/26"])],
                      metrics_listen=None)
    new = PopSettings("198.51.100.34", peers=new_peers, metrics_listen=None)
    pop = Pop(old, Source(), None, lambda: (new, Source()))
    events: list[str] = []
    pop.native = FakeNativePop(events, refuse)
    pop.routes = FakeRoutes(events)  # type: ignore[assignment]
    return pop, events


MOVED = [Peer("198.51.100.19", prefixes=["192.0.2.64/26"])]


def test_pop_reload_routes_new_prefixes_before_c_and_old_ones_go_after():
    pop, events = pop_with(False, MOVED)
    changes = pop.reload()
    assert events == ["add 192.0.2.64/26", "reconfigure 1 peers 1 prefixes",
                      "remove 192.0.2.0/26"]
    assert changes == ["peer 198.51.100.19 added", "peer 198.51.100.3 removed"]
    assert pop.s.peers == MOVED


def test_pop_reload_refused_by_c_leaves_routes_and_peers_as_they_were():
    pop, events = pop_with(True, MOVED)
    before = pop.s
    with pytest.raises(TpbError, match="refused the new peers: live reload is not implemented"):
        pop.reload()
    assert events == ["add 192.0.2.64/26", "reconfigure 1 peers 1 prefixes",
                      "remove 192.0.2.64/26"]
    assert pop.s is before


def test_pop_reload_refuses_a_new_tun_or_address():
    pop, events = pop_with(False, MOVED)
    pop._load = lambda: (PopSettings("198.51.100.35", tun="tpbpop9", peers=MOVED), Source())
    with pytest.raises(ConfigError) as e:
        pop.reload()
    local, tun = e.value.problems
    assert "pop.local cannot change on reload (198.51.100.34 -> 198.51.100.35)" in local
    assert "pop.tun cannot change on reload (tpbpop0 -> tpbpop9): restart" in tun
    assert events == []


# -- journald's priorities --------------------------------------------------------


def test_journal_stream_gets_syslog_priorities(monkeypatch, tmp_path: Path):
    out = open(tmp_path / "stderr", "w+")  # noqa: SIM115
    st = os.fstat(out.fileno())
    monkeypatch.setattr("sys.stderr", out)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    logmod.setup("debug")
    logmod.log.debug("d")
    logmod.log.info("i")
    logmod.log.warning("w")
    logmod.log.error("e\nsecond line")
    out.seek(0)
    assert out.read().splitlines() == [
        "<7>tpb: d", "<6>tpb: i", "<4>tpb: w", "<3>tpb: e", "<3>tpb: second line",
    ]


def test_journal_stream_of_another_file_gets_no_prefix(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    logmod.setup("info")
    logmod.log.info("plain")
    logmod.log.debug("hidden")
    assert buf.getvalue() == "tpb: plain\n"
