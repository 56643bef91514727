"""The appliance image (`make image`, image/README.md) booted under qemu for
tests/test_image.py: a plain qemu-system-x86_64 with Debian's OVMF, the
image behind a throw-away qcow2 overlay, each NIC a tap device in a network
namespace of the test's, a configuration handed in as a systemd credential
(fw_cfg), the serial console on a socket, and commands run in the guest
through its qemu guest agent.

    reason = available()       # None, or why the image cannot be booted here
    vm = ApplianceVM(workdir, nics=[Nic("tpbi-pc", "tpbi-in", MAC, 3), ...],
                     credentials={"tpb.toml": b"..."})
    vm.create_taps()           # the taps exist in their namespaces, wire them now
    vm.start()                 # power on (vm.t0 is the moment, time.monotonic())
    vm.agent(timeout=300).sh("systemctl is-active tpb")
    vm.kill(); vm.start()      # a power cut, and on again from the same disk
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import rawsock

ROOT = Path(__file__).resolve().parent.parent
IMAGE_OUT = Path(os.environ.get("TPB_IMAGE_OUT", ROOT / "image" / "out"))
IMAGE = IMAGE_OUT / "tpb.img"
MANIFEST = IMAGE_OUT / "manifest.json"
QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The PCI slots the image's default .link files match (image/build.sh), and
# the disk's and the agent's slots, away from them.
SLOT_DISK, SLOT_IN, SLOT_OUT, SLOT_MGMT, SLOT_SERIAL = 2, 3, 4, 5, 6
DEFAULT_SETTINGS = {
    "TPB_IMAGE_IN_MATCH": f"Path=pci-0000:00:{SLOT_IN:02x}.0",
    "TPB_IMAGE_OUT_MATCH": f"Path=pci-0000:00:{SLOT_OUT:02x}.0",
    "TPB_IMAGE_MGMT_MATCH": f"Path=pci-0000:00:{SLOT_MGMT:02x}.0",
}

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
_LIBC = ctypes.CDLL(None, use_errno=True)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z=]|\x1b[=>]|\r")


def _stamp() -> str:
    spec = importlib.util.spec_from_file_location("image_stamp", ROOT / "image" / "stamp.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.stamp()


def manifest() -> dict | None:
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None


def available() -> str | None:
    """None if the built image can be booted here, else why not (for a skip)."""
    if os.geteuid() != 0:
        return "the image test needs root (tap devices, network namespaces)"
    for tool, pkg in ((QEMU, "qemu-system-x86"), ("qemu-img", "qemu-utils"),
                      ("dnsmasq", "dnsmasq-base")):
        if not shutil.which(tool):
            return f"the image test needs {tool}: apt-get install {pkg}"
    if not OVMF_CODE.exists() or not OVMF_VARS.exists():
        return f"the image test needs {OVMF_CODE}: apt-get install ovmf"
    m = manifest()
    if m is None or not IMAGE.exists():
        return (f"no appliance image in {IMAGE_OUT}: build it with `make image` "
                "(or `make test-image`)")
    if m.get("stamp") != _stamp():
        return (f"the image in {IMAGE_OUT} was built from other sources than these "
                "(image/stamp.py): rebuild it with `make image`")
    for key, want in DEFAULT_SETTINGS.items():
        if m.get("settings", {}).get(key) != want:
            return (f"the image was built with {key}={m['settings'].get(key)!r}; the test "
                    f"wires its NICs for the default {want!r}")
    return None


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Nic:
    netns: str
    tap: str  # the tap device's name in netns, the host's end of the guest's NIC
    mac: str  # the guest NIC's MAC address
    slot: int  # its PCI slot on bus 0


class GuestError(AssertionError):
    pass


class GuestAgent:
    """A client of the qemu guest agent (qemu-ga, in the image) on its
    virtio-serial port: guest-exec for commands, nothing else."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.lock = threading.Lock()

    def connect(self, timeout: float) -> None:
        """Connect and synchronise (guest-sync-delimited); the agent starts
        when systemd does, so this waits for it up to `timeout`."""
        deadline = time.monotonic() + timeout
        while self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to {self.path}") from None
                time.sleep(0.2)
        sync = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        while True:
            sync += 1
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync}})
            try:
                reply = self._read(min(3.0, max(0.1, deadline - time.monotonic())),
                                   lambda r, s=sync: r.get("return") == s)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise GuestError(f"the guest agent did not answer within {timeout:.0f}s") \
                        from None
                continue
            if reply is not None:
                return

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send(self, obj: dict) -> None:
        assert self.sock is not None
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def _read(self, timeout: float, want=lambda r: True) -> dict:  # noqa: ANN001
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                line = line.replace(b"\xff", b"").strip()
                if not line:
                    continue
                reply = json.loads(line)
                if want(reply):
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError from None
            if not chunk:
                raise GuestError("the guest agent's channel closed")
            self.buf += chunk

    def call(self, command: str, timeout: float = 30, **args: object) -> object:
        with self.lock:
            self._send({"execute": command, **({"arguments": args} if args else {})})
            try:
                reply = self._read(timeout, lambda r: "return" in r or "error" in r)
            except TimeoutError:
                raise GuestError(f"no answer from the guest agent to {command}") from None
        if "error" in reply:
            raise GuestError(f"{command}: {reply['error']}")
        return reply["return"]

    def run(self, script: str, timeout: float = 60) -> tuple[int, str, str]:
        """`sh -c script` in the guest, as root: (exit status, stdout, stderr)."""
        pid = self.call("guest-exec", path="/bin/sh", arg=["-c", script],
                        **{"capture-output": True})["pid"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while True:
            st = self.call("guest-exec-status", pid=pid)
            assert isinstance(st, dict)
            if st["exited"]:
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return st.get("exitcode", -st.get("signal", 0)), out, err
            if time.monotonic() > deadline:
                raise GuestError(f"{script!r} still running after {timeout}s in the guest")
            time.sleep(0.05)

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        rc, out, err = self.run(script, timeout)
        if check and rc != 0:
            raise GuestError(f"{script!r} exited {rc} in the guest:\n{out}{err}")
        return out

    def write_file(self, path: str, data: bytes, mode: str = "0644") -> None:
        """Replace `path` the way an editor saving a file does (a new file
        renamed over the old one), synced."""
        b64 = base64.b64encode(data).decode()
        self.sh(f"echo {b64} | base64 -d > {path}.new && chmod {mode} {path}.new && "
                f"sync {path}.new && mv -f {path}.new {path} && sync {os.path.dirname(path)}")


def _open_tap(netns: str, name: str) -> int:
    """A file descriptor of the tap `name` in `netns` (TUNSETIFF attaches to
    the persistent device made by create_taps), for qemu's -netdev tap,fd=."""
    with rawsock.netns(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
    return fd


def _die_with_parent() -> None:
    """In qemu before exec: SIGKILL when the thread that started it ends, so
    that a killed test run leaves no VM behind."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ApplianceVM:
    """The image in qemu (TCG here: this machine's KVM does not work)."""

    def __init__(self, workdir: Path, nics: list[Nic], credentials: dict[str, bytes],
                 memory_mb: int = 1024, smp: int = 2) -> None:
        self.workdir = workdir
        self.nics, self.credentials = nics, credentials
        self.memory_mb, self.smp = memory_mb, smp
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0  # time.monotonic() at power on
        self.boots = 0
        self._agent: GuestAgent | None = None
        self._console_mark = 0
        self.heartbeat: Heartbeat | None = None  # the fixture's, set once it runs
        self.disk = workdir / "disk.qcow2"
        self.vars = workdir / "OVMF_VARS.fd"
        self.console_log = workdir / "console.log"
        self.console_sock = workdir / "console.sock"
        self.agent_sock = workdir / "qga.sock"

    # -- set-up ---------------------------------------------------------------

    def create_taps(self) -> None:
        """Each NIC's tap, persistent, up, in its namespace (it has carrier
        while qemu holds it)."""
        for n in self.nics:
            subprocess.run(["ip", "-n", n.netns, "tuntap", "add", "dev", n.tap, "mode", "tap"],
                           check=True, capture_output=True)
            subprocess.run(["ip", "-n", n.netns, "link", "set", "dev", n.tap, "up"], check=True,
                           capture_output=True)

    def _prepare_disk(self) -> None:
        """The image stays as built: the guest writes to an overlay."""
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(IMAGE), "-F", "raw",
                        str(self.disk)], check=True, capture_output=True)
        shutil.copyfile(OVMF_VARS, self.vars)

    def command(self, fds: dict[str, int]) -> list[str]:
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-M", "q35", "-smp", str(self.smp),
            "-m", str(self.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars}",
            "-drive", f"if=none,id=disk,format=qcow2,file={self.disk}",
            "-device", f"virtio-blk-pci,drive=disk,addr={SLOT_DISK:#x},bootindex=1",
        ]
        for n in self.nics:
            cmd += ["-netdev", f"tap,id={n.tap},fd={fds[n.tap]}",
                    "-device", f"virtio-net-pci,netdev={n.tap},addr={n.slot:#x},mac={n.mac}"]
        cmd += [
            "-chardev", f"socket,id=con,path={self.console_sock},server=on,wait=off,"
                        f"logfile={self.console_log},logappend=on",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=qga,path={self.agent_sock},server=on,wait=off",
            "-device", f"virtio-serial-pci,addr={SLOT_SERIAL:#x}",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        ]
        for name in self.credentials:
            cmd += ["-fw_cfg", f"name=opt/io.systemd.credentials/{name},"
                               f"file={self.workdir / ('credential.' + name)}"]
        return cmd

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Power on: from the image the first time, from the same disk after."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.boots == 0:
            self._prepare_disk()
        for name, data in self.credentials.items():
            (self.workdir / f"credential.{name}").write_bytes(data)
        for p in (self.console_sock, self.agent_sock):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._console_mark = self.console_log.stat().st_size if self.console_log.exists() else 0
        fds = {n.tap: _open_tap(n.netns, n.tap) for n in self.nics}
        try:
            with open(self.workdir / "qemu.log", "ab") as qlog:
                self.t0 = time.monotonic()
                self.proc = subprocess.Popen(
                    self.command(fds), stdin=subprocess.DEVNULL, stdout=qlog,
                    stderr=subprocess.STDOUT, pass_fds=tuple(fds.values()),
                    start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            for fd in fds.values():
                os.close(fd)
        self.boots += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Power off at once (qemu killed: what the guest had not written to
        its disk is lost, as in a power cut)."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    # -- console and agent ----------------------------------------------------

    def console(self, this_boot: bool = True) -> str:
        """What the guest wrote on its serial console (this boot's part), the
        terminal's escape sequences taken out."""
        try:
            data = self.console_log.read_bytes()
        except FileNotFoundError:
            return ""
        if this_boot:
            data = data[self._console_mark:]
        return strip_ansi(data.decode(errors="replace"))

    def wait_console(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            if m := rx.search(self.console()):
                return m
            if not self.running:
                raise GuestError(self.why(f"qemu exited ({self.proc.returncode}) before "
                                          f"{pattern!r} on the console"))
            if time.monotonic() > deadline:
                raise GuestError(self.why(f"no {pattern!r} on the console within {timeout}s"))
            time.sleep(0.1)

    def why(self, what: str, lines: int = 40) -> str:
        tail = "\n".join(self.console().splitlines()[-lines:])
        qlog = (self.workdir / "qemu.log").read_text(errors="replace").strip()
        return f"{what}\n--- console (last {lines} lines) ---\n{tail}\n--- qemu ---\n{qlog}"

    def agent(self, timeout: float = 30) -> GuestAgent:
        if self._agent is None:
            a = GuestAgent(self.agent_sock)
            try:
                a.connect(timeout)
            except GuestError as e:
                a.close()
                raise GuestError(self.why(str(e))) from None
            self._agent = a
        return self._agent

    def wait_forwarding(self, after: float, timeout: float) -> float:
        """When the first heartbeat frame crossed the bridge after `after`;
        if none does within `timeout`, fails with what the guest shows (its
        console, and tpb's state and journal when the agent answers)."""
        hb = self.heartbeat
        assert hb is not None, "no heartbeat crosses this VM"
        try:
            return hb.wait_arrival(after, timeout, alive=lambda: self.running)
        except AssertionError as failed:
            e = (f"{failed} (qemu {'running' if self.running else 'exited'}; "
                 f"heartbeat: {hb.describe(after)})")
            try:
                guest = self.agent(20).sh(
                    "systemctl status tpb tpb-provision tpb-ifnames --no-pager -n 20; "
                    "systemctl --failed --no-pager; ip -br link; "
                    "journalctl -b -n 80 --no-pager",
                    timeout=60, check=False)
            except Exception as why:  # noqa: BLE001 - a diagnosis, whatever fails
                guest = f"(the guest agent did not answer: {why})"
            raise AssertionError(self.why(f"{e}\n--- in the guest ---\n{guest}")) from None

    def console_chat(self, steps: list[tuple[str, str]], timeout: float = 60) -> str:
        """On the serial console, for each (line, expect): type the line,
        then wait for `expect` in what comes back. Returns the whole exchange."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.console_sock))
        text = ""
        try:
            for line, expect in steps:
                s.sendall(line.encode() + b"\r")
                got = ""
                deadline = time.monotonic() + timeout
                while expect not in got:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GuestError(f"typed {line!r} on the console, no {expect!r} within "
                                         f"{timeout}s; got {got[-2000:]!r}")
                    s.settimeout(left)
                    with contextlib.suppress(TimeoutError):
                        chunk = s.recv(65536)
                        if not chunk:
                            raise GuestError("the console closed")
                        got += strip_ansi(chunk.decode(errors="replace"))
                text += got
        finally:
            s.close()
        return text


def http_get(netns: str, url: str, timeout: float = 5.0) -> str:
    """GET `url` from inside `netns` (this thread steps in for the call)."""
    import urllib.request

    with rawsock.netns(netns), urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample `name` whose labels include `labels`,
    in a Prometheus text scrape, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class Heartbeat:
    """A small frame every `interval` seconds from one tap to the other,
    and when each arrived: the bridge's uptime as the traffic sees it."""

    ETHERTYPE = 0x88B5  # IEEE 802 local experimental
    MAGIC = b"TPB-HEARTBEAT"

    def __init__(self, src: tuple[str, str], dst: tuple[str, str], src_mac: str,
                 dst_mac: str, interval: float = 0.01) -> None:
        self.src, self.dst, self.interval = src, dst, interval
        self.run_id = os.urandom(4)
        self.header = (bytes.fromhex(dst_mac.replace(":", "")) +
                       bytes.fromhex(src_mac.replace(":", "")) +
                       struct.pack("!H", self.ETHERTYPE) + self.MAGIC + self.run_id)
        self.sent: list[float] = []  # by sequence number
        self.arrivals: list[tuple[int, float]] = []  # (seq, time.monotonic())
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._threads: list[threading.Thread] = []
        self.tx = rawsock.Port(*src)
        self.rx = rawsock.Port(*dst, capture=True)

    def start(self) -> Heartbeat:
        for fn in (self._send, self._receive):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _send(self) -> None:
        seq = 0
        nxt = time.monotonic()
        while not self._stop.is_set():
            if not self._paused.is_set():
                frame = self.header + struct.pack("!Q", seq)
                frame += bytes(max(0, 60 - len(frame)))
                self.sent.append(time.monotonic())
                with contextlib.suppress(OSError):  # the tap without carrier yet
                    self.tx.send(frame)
                seq += 1
            nxt += self.interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def _receive(self) -> None:
        prefix = self.header
        while not self._stop.is_set():
            f = self.rx.recv(0.2)
            if f is not None and f.data.startswith(prefix):
                seq = struct.unpack_from("!Q", f.data, len(prefix))[0]
                self.arrivals.append((seq, time.monotonic()))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No heartbeat for the block (a capture that waits for quiet, such as
        rawsock.Port.collect, would otherwise wait for ever)."""
        self._paused.set()
        try:
            time.sleep(2 * self.interval)
            yield
        finally:
            self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.tx.close()
        self.rx.close()

    def first_arrival(self, after: float = 0.0) -> float | None:
        return next((t for _, t in list(self.arrivals) if t >= after), None)

    def wait_arrival(self, after: float, timeout: float,
                     alive: Callable[[], bool] = lambda: True) -> float:
        """The first arrival after `after`, waiting up to `timeout` s while
        `alive()` (the VM) holds."""
        deadline = time.monotonic() + timeout
        while (t := self.first_arrival(after)) is None:
            if not alive():
                raise AssertionError("no heartbeat frame crossed: the VM is gone")
            if time.monotonic() > deadline:
                raise AssertionError(f"no heartbeat frame crossed within {timeout}s")
            time.sleep(0.05)
        return t

    def describe(self, since: float) -> str:
        """How the heartbeat itself fares since `since`: did it send, are
        its threads alive (a failed wait is then the bridge's, not its)."""
        sent = sum(1 for t in list(self.sent) if t >= since)
        alive = "/".join("alive" if t.is_alive() else "DEAD" for t in self._threads)
        last = self.arrivals[-1][1] - since if self.arrivals else None
        return (f"{sent} frames sent since, sender/receiver {alive}, last arrival "
                f"{'never' if last is None else f'{last:+.1f} s'}")

    def longest_gap(self, since: float, until: float) -> tuple[float, int]:
        """The longest time without an arrival between `since` and `until`
        (both inside the heartbeat's life), and the frames lost in it."""
        arr = [(s, t) for s, t in list(self.arrivals) if since <= t <= until]
        assert len(arr) >= 2, "no heartbeat frames in that window"
        gap, lost = 0.0, 0
        for (s0, t0), (s1, t1) in zip(arr, arr[1:], strict=False):
            if t1 - t0 > gap:
                gap, lost = t1 - t0, s1 - s0 - 1
        return gap, lost
