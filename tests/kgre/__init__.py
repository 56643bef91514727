"""A real Linux GRE peer for TPB's tests: the kernel's own ip_gre, in a tiny VM.

The host kernel has no ip_gre, so this boots Debian 12's kernel (which has
ip_gre.ko) under qemu with a busybox initramfs.  The VM's one NIC is a tap
device in a network namespace of the test's choosing; the VM configures the
NIC, a ``gre1`` tunnel (``ip link add gre1 type gre local L remote R [key K]
[csum] [seq] [ttl T]``), inner addresses and routes, then answers ping and runs
TCP/UDP echo (port 7), TCP/UDP sink (port 9) and ``iperf3 -s``.

    from kgre import KernelGrePeer, available

    reason = available()            # None, or why it cannot run (skip with it)
    with KernelGrePeer("lab-pop", "kgre0", addr="192.0.2.2/24", remote="192.0.2.1",
                       key=42, csum=True, inner_addr="10.255.0.2/30") as peer:
        peer.sh("ip -s link show gre1")         # a command in the VM, its output
        peer.link_stats("gre1")["rx"]["packets"]

Build the kernel and initramfs first: ``tests/kgre/build.sh`` (see README.md).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import build as _build
from ._cpio import CpioWriter

__all__ = [
    "GreEndpoint",
    "KernelGrePeer",
    "KgreError",
    "available",
    "build_command",
    "cache_dir",
    "gre_checksum",
    "gre_header",
    "netns_socket",
    "parse_gre",
    "temp_netns",
]

READY = "TPB-KGRE READY"
FAILED = "TPB-KGRE FAILED"
QEMU = "qemu-system-x86_64"
BUILD_SH = Path(__file__).resolve().parent / "build.sh"
_LIBC = ctypes.CDLL(None, use_errno=True)

cache_dir = _build.cache_dir


# the VM's NIC in qemu's object tree (`-device virtio-net-pci,id=nic0`)
NIC = "/machine/peripheral/nic0/virtio-backend"


class KgreError(RuntimeError):
    """The VM did not boot, failed its setup, or a command in it failed."""


def build_command() -> str:
    """The exact command that builds the artifacts."""
    return str(BUILD_SH)


def available() -> str | None:
    """None if a KernelGrePeer can run here, else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "kgre: needs root (tap devices, network namespaces)"
    if not shutil.which(QEMU):
        return ("kgre: no qemu-system-x86_64: "
                "apt-get install -y --no-install-recommends qemu-system-x86")
    if not shutil.which("ip"):
        return "kgre: no ip (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "kgre: no /dev/net/tun"
    cache = cache_dir()
    man = _build.read_manifest(cache)
    if not man or not (cache / _build.KERNEL).is_file() or not (cache / _build.INITRD).is_file():
        return f"kgre: VM artifacts not built in {cache}: run {build_command()}"
    if man.get("stamp") != _build.inputs_stamp():
        return (f"kgre: VM artifacts in {cache} are stale (tests/kgre changed): "
                f"run {build_command()}")
    return None


# --- KVM or TCG -----------------------------------------------------------------------

_KVM_PROBE = Path("/run/tpb-kgre-kvm")


def kvm_usable() -> bool:
    """True if qemu can really run a guest with KVM here (checked once per host boot).

    /dev/kvm can exist and still not work (nested virtualisation without the
    features qemu asks for): a guest that prints nothing for 10 s means no.
    """
    if os.environ.get("TPB_KGRE_ACCEL") in ("tcg", "kvm"):
        return os.environ["TPB_KGRE_ACCEL"] == "kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError:
        return False
    try:
        return _KVM_PROBE.read_text().strip() == "yes"
    except OSError:
        pass
    ok = False
    with tempfile.TemporaryDirectory(prefix="kgre-kvm-") as tmp:
        log = Path(tmp) / "console"
        cmd = [QEMU, "-accel", "kvm", "-cpu", "host", "-M", "pc", "-m", "128", "-nodefaults",
               "-no-user-config", "-display", "none", "-no-reboot",
               "-kernel", str(cache_dir() / _build.KERNEL),
               "-append", "console=ttyS0 panic=-1",
               "-chardev", f"file,id=con,path={log}", "-serial", "chardev:con"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            if log.exists() and b"Linux version" in log.read_bytes():
                ok = True
                break
            time.sleep(0.1)
        p.kill()
        p.wait()
    with contextlib.suppress(OSError):
        _KVM_PROBE.write_text("yes\n" if ok else "no\n")
    return ok


# --- network namespaces -----------------------------------------------------------------

_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_socket(netns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket created inside network namespace ``netns`` (None: this one).

    The calling thread steps into the namespace with setns(2) only for the
    socket() call; the socket stays in that namespace for its whole life.
    """
    if netns is None:
        return socket.socket(family, type_, proto)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.socket(family, type_, proto)
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def _ns(netns: str | None, *cmd: str) -> list[str]:
    return (["ip", "netns", "exec", netns] if netns else []) + list(cmd)


def _sh(netns: str | None, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(_ns(netns, *cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise KgreError(f"{shlex.join(_ns(netns, *cmd))}: exit {p.returncode}: "
                        f"{p.stderr.strip()}")
    return p


# --- GRE, in user space ----------------------------------------------------------------

GRE_C, GRE_K, GRE_S = 0x8000, 0x2000, 0x1000
IPPROTO_GRE = 47


def gre_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def gre_header(payload: bytes, proto: int = 0x0800, key: int | None = None,
               csum: bool = False, seq: int | None = None) -> bytes:
    """GRE header (RFC 2890) + payload, with the optional checksum/key/sequence."""
    flags = (GRE_C if csum else 0) | (GRE_K if key is not None else 0) | \
        (GRE_S if seq is not None else 0)
    hdr = struct.pack("!HH", flags, proto)
    if csum:
        hdr += b"\0\0\0\0"
    if key is not None:
        hdr += struct.pack("!I", key)
    if seq is not None:
        hdr += struct.pack("!I", seq)
    pkt = hdr + payload
    if csum:
        pkt = pkt[:4] + struct.pack("!H", gre_checksum(pkt)) + pkt[6:]
    return pkt


def parse_gre(ip_packet: bytes) -> dict:
    """Splits an IPv4 packet carrying GRE into its parts.

    Returns src, dst, ttl, flags (set of "C", "K", "S"), proto, key, seq,
    csum (as sent), csum_ok (None without a checksum) and payload.
    """
    ihl = (ip_packet[0] & 0x0F) * 4
    if ip_packet[9] != IPPROTO_GRE:
        raise ValueError(f"IP protocol {ip_packet[9]}, not GRE")
    g = ip_packet[ihl:]
    flags_word, proto = struct.unpack("!HH", g[:4])
    off = 4
    out: dict = {
        "src": socket.inet_ntoa(ip_packet[12:16]), "dst": socket.inet_ntoa(ip_packet[16:20]),
        "ttl": ip_packet[8], "tos": ip_packet[1], "proto": proto,
        "version": flags_word & 7, "flags": set(), "key": None, "seq": None, "csum": None,
        "csum_ok": None,
    }
    if flags_word & GRE_C:
        out["flags"].add("C")
        out["csum"] = struct.unpack("!H", g[4:6])[0]
        out["csum_ok"] = gre_checksum(g) == 0
        off += 4
    if flags_word & GRE_K:
        out["flags"].add("K")
        out["key"] = struct.unpack("!I", g[off:off + 4])[0]
        off += 4
    if flags_word & GRE_S:
        out["flags"].add("S")
        out["seq"] = struct.unpack("!I", g[off:off + 4])[0]
        off += 4
    out["payload"] = g[off:]
    return out


class GreEndpoint:
    """The far end of the VM's tunnel, in user space, in a namespace of the host.

    The host kernel cannot terminate GRE, so this is a raw IPPROTO_GRE socket
    made in ``netns``: ``send()`` wraps a payload (an inner IPv4 packet, as
    bytes) in GRE with the given key/checksum/sequence numbers and sends it to
    ``remote``; ``recv()`` returns what arrives, parsed by ``parse_gre``.  While
    it is open, the namespace's kernel does not answer GRE with "protocol
    unreachable".
    """

    def __init__(self, netns: str | None, local: str, remote: str, *, key: int | None = None,
                 csum: bool = False, seq: bool = False, proto: int = 0x0800,
                 ttl: int = 64) -> None:
        self.remote, self.key, self.csum, self.proto = remote, key, csum, proto
        self.seq = 1 if seq else None
        self.sock = netns_socket(netns, socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
        self.sock.bind((local, 0))
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)

    def send(self, payload: bytes, **override: object) -> None:
        """Sends one GRE packet; ``override`` may set key/csum/seq/proto for this one."""
        args: dict = {"proto": self.proto, "key": self.key, "csum": self.csum, "seq": self.seq}
        args.update(override)
        self.sock.sendto(gre_header(payload, **args), (self.remote, 0))
        if "seq" not in override and self.seq is not None:
            self.seq = (self.seq + 1) & 0xFFFFFFFF

    def recv(self, timeout: float = 5.0, match: object = None) -> dict | None:
        """The next GRE packet from ``remote`` (for which ``match(parsed)`` is true), or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, (src, _) = self.sock.recvfrom(65535)
            except TimeoutError:
                return None
            if src != self.remote:
                continue
            g = parse_gre(data)
            if match is None or match(g):  # type: ignore[operator]
                return g
        return None

    def drain(self) -> None:
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(65535)
        self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GreEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the VM ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends, so a
    killed test run leaves no qemu behind (ip netns exec execs, keeping this)."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG



def _strip_prefix(addr: str) -> str:
    return str(ipaddress.ip_interface(addr).ip)


class KernelGrePeer:
    """A qemu VM whose kernel's ip_gre is the far end of a GRE tunnel.

    ``netns``/``tap``: the tap device (created there with ``ip tuntap``, MTU
    ``tap_mtu``) that is the VM's one NIC, ``mac`` its MAC address inside the
    VM.  The test wires the tap into its topology (bridge it, route to it), any
    time after ``create_tap()`` (``start()`` calls it).

    Outer side: ``addr`` (with prefix) on the NIC (on a VLAN subinterface
    ``eth0.<vlan>`` if ``vlan`` is given), NIC MTU ``mtu``, ``gateway`` as
    default route, ``routes`` ("198.51.100.0/24 via 192.0.2.254": ``ip route
    add`` arguments; "dev <nic>" is added when absent).

    Tunnel: ``mode`` "gre" (IPv4 in GRE) or "gretap" (Ethernet in GRE);
    ``local`` (default: ``addr``'s address) and ``remote``; ``key`` (or
    ``ikey``/``okey`` apart), ``csum``, ``seq``, ``ttl``, ``tos``,
    ``pmtudisc`` (False: nopmtudisc); ``gre_mtu`` (default: the kernel's,
    NIC MTU less the GRE overhead); ``gre_args``: more ``ip link add`` words.

    Inner side: ``inner_addr`` (one or a list, with prefix) on gre1,
    ``inner_routes`` (prefixes, or ``ip route add`` arguments; "dev gre1" is
    added when absent).  ``forwarding`` turns on IPv4 forwarding.  ``ipv6``:
    leave IPv6 on (off by default, so the VM sends nothing unasked: no router
    solicitations or MLD reports on the NIC or through the tunnel).

    ``setup``: more shell lines run in the VM after all that, before READY
    (``run CMD`` stops the boot if CMD fails).  ``servers``: start tpb-echod
    (TCP/UDP echo on 7, sink on 9) and ``iperf3 -s``.  ``offloads``: let the
    virtio NIC use checksum/segmentation offloads (default off: every frame
    on the tap is a complete, checksummed, at most MTU-sized frame, as on a
    wire).

    qemu gets SIGKILL when the thread that called ``start()`` ends (so a killed
    test run leaves no VM behind): start and use a peer from a thread that
    outlives it, e.g. the main thread, as pytest fixtures are.
    """

    def __init__(
        self,
        netns: str | None,
        tap: str = "kgre0",
        mac: str = "02:00:00:00:00:77",
        *,
        addr: str,
        gateway: str | None = None,
        routes: Sequence[str] = (),
        remote: str,
        local: str | None = None,
        key: int | None = None,
        ikey: int | None = None,
        okey: int | None = None,
        csum: bool = False,
        seq: bool = False,
        ttl: int | None = None,
        tos: str | None = None,
        pmtudisc: bool | None = None,
        mode: str = "gre",
        gre_args: Sequence[str] = (),
        inner_addr: str | Sequence[str],
        inner_routes: Sequence[str] = (),
        mtu: int = 1500,
        tap_mtu: int | None = None,
        gre_mtu: int | None = None,
        vlan: int | None = None,
        forwarding: bool = False,
        ipv6: bool = False,
        setup: Sequence[str] = (),
        servers: bool = True,
        offloads: bool = False,
        memory_mb: int = 256,
        accel: str | None = None,
        kernel_log: bool = False,
        workdir: str | None = None,
    ) -> None:
        if mode not in ("gre", "gretap"):
            raise ValueError(f"mode must be gre or gretap, not {mode!r}")
        self.netns, self.tap, self.mac = netns, tap, mac.lower()
        self.addr, self.gateway, self.routes = addr, gateway, list(routes)
        self.local = local or _strip_prefix(addr)
        self.remote = remote
        self.key, self.ikey, self.okey = key, ikey, okey
        self.csum, self.seq, self.ttl, self.tos, self.pmtudisc = csum, seq, ttl, tos, pmtudisc
        self.mode, self.gre_args = mode, list(gre_args)
        self.inner_addrs = [inner_addr] if isinstance(inner_addr, str) else list(inner_addr)
        self.inner_routes = list(inner_routes)
        self.mtu, self.tap_mtu, self.gre_mtu, self.vlan = mtu, tap_mtu or mtu, gre_mtu, vlan
        self.forwarding, self.ipv6 = forwarding, ipv6
        self.setup, self.servers = list(setup), servers
        self.offloads, self.memory_mb, self.kernel_log = offloads, memory_mb, kernel_log
        self.accel = accel or os.environ.get("TPB_KGRE_ACCEL") or "auto"
        self.nic = f"eth0.{vlan}" if vlan is not None else "eth0"
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.boot_seconds: float | None = None
        self.guest_uptime: float | None = None
        self.accel_used: str | None = None
        self._tap_created = False
        self._console_cache = ""
        self._ctl: socket.socket | None = None
        self._ctl_buf = b""
        self._ctl_lock = threading.Lock()
        self._mon_lock = threading.Lock()
        self._nic_watch: tuple[threading.Thread, threading.Event] | None = None
        self.nic_stalls: list[str] = []  # what _watch_nic() found and healed
        self.nic_samples: list[str] = []  # its last samples of the TX queue
        self._ctl_seq = 0

    # -- configuration ------------------------------------------------------------------

    def gre_link_args(self) -> list[str]:
        """The ``ip link add`` words after ``gre1``."""
        a = ["type", self.mode, "local", self.local, "remote", self.remote]
        if self.key is not None:
            a += ["key", str(self.key)]
        if self.ikey is not None:
            a += ["ikey", str(self.ikey)]
        if self.okey is not None:
            a += ["okey", str(self.okey)]
        if self.csum:
            a.append("csum")
        if self.seq:
            a.append("seq")
        if self.ttl is not None:
            a += ["ttl", str(self.ttl)]
        if self.tos is not None:
            a += ["tos", str(self.tos)]
        if self.pmtudisc is False:
            a.append("nopmtudisc")
        elif self.pmtudisc:
            a.append("pmtudisc")
        return a + self.gre_args

    def setup_script(self) -> str:
        """The /etc/tpbgre/setup.sh that the VM's /init sources."""
        q = shlex.join
        lines = ["# written by tests/kgre for one boot", f"TPBGRE_SERVERS={int(self.servers)}"]

        def run(*words: str) -> None:
            lines.append("run " + q(words))

        if not self.ipv6:  # no router solicitations, MLD... through the tunnel unasked
            for scope in ("all", "default"):
                run("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        run("ip", "link", "set", "dev", "eth0", "mtu", str(self.mtu), "up")
        if self.vlan is not None:
            run("ip", "link", "add", "link", "eth0", "name", self.nic, "type", "vlan",
                "id", str(self.vlan))
            run("ip", "link", "set", "dev", self.nic, "up")
        run("ip", "addr", "add", self.addr, "dev", self.nic)
        if self.gateway:
            run("ip", "route", "add", "default", "via", self.gateway, "dev", self.nic)
        for r in self.routes:
            words = r.split()
            run("ip", "route", "add", *words, *([] if "dev" in words else ["dev", self.nic]))
        if self.forwarding:
            run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("ip", "link", "add", "gre1", *self.gre_link_args())
        if self.gre_mtu is not None:
            run("ip", "link", "set", "dev", "gre1", "mtu", str(self.gre_mtu))
        run("ip", "link", "set", "dev", "gre1", "up")
        for a in self.inner_addrs:
            run("ip", "addr", "add", a, "dev", "gre1")
        for r in self.inner_routes:
            words = r.split()
            run("ip", "route", "add", *words, *([] if "dev" in words else ["dev", "gre1"]))
        lines += self.setup
        return "\n".join(lines) + "\n"

    def qemu_command(self, initrd: Path, console: Path, ctl: Path, accel: str) -> list[str]:
        cache = cache_dir()
        append = "console=ttyS0 panic=-1 reboot=t" + ("" if self.kernel_log else " quiet")
        net = f"virtio-net-pci,id=nic0,netdev=n0,mac={self.mac}"
        if not self.offloads:
            net += "".join(f",{f}=off" for f in (
                "csum", "gso", "host_tso4", "host_tso6", "host_ecn", "host_ufo",
                "guest_csum", "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo"))
        cpu = "host" if accel == "kvm" else "max"
        return [
            QEMU, "-accel", accel, "-cpu", cpu, "-M", "pc", "-smp", "1",
            "-m", str(self.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(cache / _build.KERNEL), "-initrd", str(initrd),
            "-append", append,
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off", "-serial", "chardev:ctl",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", net,
            # qemu's own view of the NIC's queues, for a hang report (nic_state)
            "-monitor", f"unix:{ctl.with_name('monitor.sock')},server=on,wait=off",
        ]

    # -- life cycle ---------------------------------------------------------------------

    def create_tap(self) -> None:
        """Creates the tap in the namespace (if not there yet) and sets it up."""
        if _sh(self.netns, "ip", "link", "show", "dev", self.tap, check=False).returncode != 0:
            _sh(self.netns, "ip", "tuntap", "add", "dev", self.tap, "mode", "tap")
            self._tap_created = True
        _sh(self.netns, "ip", "link", "set", "dev", self.tap, "mtu", str(self.tap_mtu), "up")

    def start(self, timeout: float = 90) -> None:
        """Boots the VM and waits for READY; raises KgreError with the console tail."""
        reason = available()
        if reason:
            raise KgreError(reason)
        if self.proc is not None:
            raise KgreError("already started")
        self.workdir = Path(self._workdir_arg or tempfile.mkdtemp(prefix="kgre-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        cpio = CpioWriter()
        cpio.file("etc/tpbgre/setup.sh", self.setup_script().encode())
        base = (cache_dir() / _build.INITRD).read_bytes()
        initrd = self.workdir / "initrd"
        # Concatenated archives: the kernel unpacks the gzip'ed base, then the
        # plain config cpio (which must start 4-byte aligned).
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + cpio.getvalue())
        console, ctl = self.workdir / "console.log", self.workdir / "ctl.sock"
        for p in (console, ctl):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.create_tap()
        accel = self.accel
        if accel == "auto":
            accel = "kvm" if kvm_usable() else "tcg"
        self.accel_used = accel
        t0 = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as qlog:
            self.proc = subprocess.Popen(
                _ns(self.netns, *self.qemu_command(initrd, console, ctl, accel)),
                stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(t0, timeout)
            self._connect_ctl()
        except BaseException:
            self.stop()
            raise
        if accel == "tcg":
            stop = threading.Event()
            thread = threading.Thread(target=self._watch_nic, args=(stop,), daemon=True)
            thread.start()
            self._nic_watch = (thread, stop)

    def _wait_ready(self, t0: float, timeout: float) -> None:
        assert self.proc is not None
        while True:
            text = self.console()
            if READY in text:
                self.boot_seconds = time.monotonic() - t0
                m = re.search(READY + r" uptime=([\d.]+)", text)
                self.guest_uptime = float(m.group(1)) if m else None
                return
            if FAILED in text:
                raise KgreError(self._why("the VM's setup failed"))
            if "Kernel panic" in text:
                raise KgreError(self._why("the VM's kernel panicked"))
            if self.proc.poll() is not None:
                raise KgreError(self._why(f"qemu exited with {self.proc.returncode}"))
            if time.monotonic() - t0 > timeout:
                raise KgreError(self._why(f"no {READY!r} within {timeout:.0f}s "
                                          f"(accel {self.accel_used})"))
            time.sleep(0.05)

    def _why(self, what: str, lines: int = 40) -> str:
        tail = "\n".join(self.console().splitlines()[-lines:])
        qlog = ""
        if self.workdir and (self.workdir / "qemu.log").exists():
            qlog = (self.workdir / "qemu.log").read_text(errors="replace").strip()
        return (f"kgre: {what}\n--- console (last {lines} lines) ---\n{tail}\n"
                + (f"--- qemu ---\n{qlog}\n" if qlog else ""))

    def _connect_ctl(self) -> None:
        assert self.workdir is not None
        path = str(self.workdir / "ctl.sock")
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                self._ctl = s
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise KgreError(self._why(f"cannot connect to {path}")) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stops qemu, deletes the tap (if this made it) and the work folder."""
        if self._nic_watch is not None:
            self._nic_watch[1].set()
            self._nic_watch[0].join()
            self._nic_watch = None
            for stall in self.nic_stalls:  # on the test's output: pytest -rA, -s
                print(f"kgre: the VM's NIC was healed: {stall}")
        if self.proc is not None:
            self._console_cache = self.console()
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.proc = None
        if self._tap_created:
            _sh(self.netns, "ip", "link", "del", "dev", self.tap, check=False)
            self._tap_created = False
        if self.workdir is not None and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def __enter__(self) -> KernelGrePeer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console(self) -> str:
        """Everything the VM wrote on its console (ttyS0) so far."""
        if self.workdir is not None:
            with contextlib.suppress(FileNotFoundError):
                return (self.workdir / "console.log").read_bytes().decode(errors="replace")
        return self._console_cache

    # -- commands in the VM --------------------------------------------------------------

    def run(self, script: str, timeout: float = 30) -> tuple[int, str]:
        """Runs ``script`` with the VM's sh; returns (exit status, stdout+stderr).

        The VM's ``timeout`` ends the script after ``timeout`` seconds (status
        143); the real iproute2 ``ip`` is used, not busybox's.
        """
        if self._ctl is None or not self.running:
            raise KgreError("the VM is not running")
        with self._ctl_lock:
            self._ctl_seq += 1
            rid = f"{os.getpid()}x{self._ctl_seq}"
            b64 = base64.b64encode(script.encode()).decode()
            self._ctl.sendall(f"{rid} {max(1, int(timeout))} {b64}\n".encode())
            end = re.compile(rb"@@TPB-END " + rid.encode() + rb" (\d+)\n")
            deadline = time.monotonic() + timeout + 15
            while not (m := end.search(self._ctl_buf)):
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    raise KgreError(self._why(f"no answer from the VM's agent to {script!r}"))
                self._ctl.settimeout(min(left, 0.5))
                with contextlib.suppress(TimeoutError):
                    chunk = self._ctl.recv(65536)
                    if not chunk:
                        raise KgreError(self._why("the VM's agent channel closed"))
                    self._ctl_buf += chunk
            begin = self._ctl_buf.rfind(b"@@TPB-BEGIN " + rid.encode() + b"\n", 0, m.start())
            if begin < 0:
                raise KgreError(f"kgre: garbled agent answer: {self._ctl_buf[:m.end()]!r}")
            body = self._ctl_buf[begin:m.start()].split(b"\n", 1)[1].strip()
            self._ctl_buf = self._ctl_buf[m.end():]
            return int(m.group(1)), base64.b64decode(body).decode(errors="replace")

    def sh(self, script: str, timeout: float = 30, check: bool = True) -> str:
        """Runs ``script`` in the VM and returns its output; KgreError if it fails."""
        rc, out = self.run(script, timeout)
        if check and rc != 0:
            raise KgreError(f"kgre: {script!r} exited {rc} in the VM:\n{out}")
        return out

    def link_stats(self, dev: str = "gre1") -> dict:
        """``ip -s -j link show dev`` in the VM: stats64 {"rx": {...}, "tx": {...}}."""
        info = json.loads(self.sh(f"ip -s -j link show dev {shlex.quote(dev)}"))[0]
        return info["stats64"]

    def monitor(self, command: str, timeout: float = 5) -> str:
        """One command on qemu's human monitor; its answer."""
        assert self.workdir is not None
        with self._mon_lock, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.workdir / "monitor.sock"))
            buf = b""
            for send in (b"", command.encode() + b"\n"):
                s.sendall(send)
                while not buf.endswith(b"(qemu) "):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                answer, buf = buf, b""
        # the monitor echoes the command with terminal escapes before the answer
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", answer.decode(errors="replace"))
        return text.replace("\r", "").rsplit("(qemu) ", 1)[0].split("\n", 1)[-1]

    def _queue(self, q: int) -> tuple[str, dict[str, int]]:
        """Queue q of the NIC (0 RX, 1 TX) as qemu's monitor shows it, and
        the numbers that matter here: its size, its rings' addresses, qemu's
        last_avail_idx and the avail index the guest has written (read from
        the guest's memory)."""
        st = self.monitor(f"info virtio-queue-status {NIC} {q}")
        fields = {k: int(m.group(1), 0) for k in ("num", "avail", "used", "last_avail_idx")
                  if (m := re.search(rf"\b{k}:\s+(0x[0-9a-f]+|\d+)", st))}
        if "avail" in fields:
            words = self.monitor(f"xp /2hx {fields['avail']:#x}").split(":")[-1].split()
            if len(words) == 2:
                fields["guest_avail_idx"] = int(words[1], 16)
        return st, fields

    def nic_state(self) -> str:
        """The virtio NIC as qemu sees it: each queue's indexes (0 is RX, 1 TX),
        and the guest's side of each ring read from its memory: a TX queue
        whose guest avail index runs ahead of qemu's last_avail_idx holds
        frames qemu has not taken."""
        out = []
        try:
            for q in (0, 1):
                st, f = self._queue(q)
                out.append(st)
                if {"num", "avail", "used"} <= f.keys():
                    n, a, u = f["num"], f["avail"], f["used"]
                    # vring_avail {flags, idx, ring[n], used_event}, vring_used
                    # {flags, idx, ring[n] of 8 bytes, avail_event}: le16 each
                    for what, addr in (("guest avail flags, idx", a), ("used_event", a + 4 + 2 * n),
                                       ("used flags, idx", u), ("avail_event", u + 4 + 8 * n)):
                        out.append(f"{what}: {self.monitor(f'xp /2hx {addr:#x}').strip()}")
        except OSError as e:
            out.append(f"qemu's monitor: {e}")
        return "\n".join(out)

    def _tx_indexes(self) -> tuple[int, int, int] | None:
        """The TX queue: (the guest's avail index, qemu's last_avail_idx, size)."""
        f = self._queue(1)[1]
        if not {"guest_avail_idx", "last_avail_idx", "num"} <= f.keys():
            return None
        return f["guest_avail_idx"], f["last_avail_idx"], f["num"]

    def _watch_nic(self, stop: threading.Event, period: float = 3.0) -> None:
        """Under TCG, qemu 7.2's virtio-net can stop taking the guest's
        frames for good (seen here about one FOU test in fifteen with both
        host CPUs busy): the guest has made descriptors available on the TX
        queue, qemu's last_avail_idx stays behind them and so does its
        avail_event, so the guest, already past it, never kicks again; its
        queue is not full, so its watchdog never fires.  Every frame the VM
        sends waits there and its TCP retransmits nothing (the segments are
        still in the host queue): a transfer through TPB hangs for a fault
        of the peer.  A TX queue whose qemu index stood still for a whole
        period with frames waiting at both ends of it is such a stall --
        whether or not the guest queued more meanwhile (TPB's keepalives,
        reflected by the VM, may go on adding frames behind the stuck ones;
        a stall went unhealed for 40 s under a rule that also wanted the
        guest's index unchanged, or after a timeout had ended the watch).
        It is healed as a NIC's driver would be, by a reset of
        the queue: a link flap (qemu's set_link drops what waits and takes
        notifications again, if it thought a flush was still to come), then
        a resize of the guest's TX ring (ethtool -G: a queue reset, after
        which the guest's next frame kicks); TCP retransmits.  Each one is
        noted in nic_stalls; the last samples are kept in nic_samples for a
        hang report.  A monitor or agent that answers late (a busy host)
        costs one sample, not the watch: it ends only with qemu."""
        last = None
        while not stop.wait(period):
            if self.proc is None or self.proc.poll() is not None:
                return
            try:
                idx = self._tx_indexes()
            except (OSError, KgreError) as e:
                idx = None
                self.nic_samples.append(f"{time.strftime('%T')}: {str(e).splitlines()[0]}")
            else:
                self.nic_samples.append(f"{time.strftime('%T')}: {idx}")
            del self.nic_samples[:-20]
            if idx is not None and last is not None and idx[0] != idx[1] and \
                    last[0] != last[1] and idx[1] == last[1]:
                self.nic_stalls.append(f"{time.strftime('%T')}: TX queue stalled, "
                                       f"guest avail {last[0]} then {idx[0]}, "
                                       f"qemu's last_avail {idx[1]}")
                try:
                    self.monitor("set_link n0 off")
                    time.sleep(0.2)
                    self.monitor("set_link n0 on")
                    self.run(f"ethtool -G eth0 tx {idx[2] // 2} && ethtool -G eth0 tx {idx[2]}")
                except (OSError, KgreError) as e:
                    self.nic_stalls.append(f"{time.strftime('%T')}: healing failed: "
                                           f"{str(e).splitlines()[0]}")
                idx = None
            last = idx

    def read_file(self, path: str) -> str:
        return self.sh(f"cat {shlex.quote(path)}")


@contextlib.contextmanager
def temp_netns(name: str) -> Iterator[str]:
    """A fresh network namespace for the duration (deleted after)."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
