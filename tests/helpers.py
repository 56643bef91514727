"""Shared by the test modules: running `tpb run` in a lab, reading its
counters, and looking at the ports' state."""

from __future__ import annotations

import collections
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import pytest

from tpb.lab import Lab

COUNTER_NAMES = (
    "rx_frames",
    "rx_bytes",
    "tx_frames",
    "tx_bytes",
    "drop_truncated",
    "drop_too_big",
    "drop_egress_full",
    "drop_send_error",
    "drop_gso_bad",
    "kernel_packets",
    "kernel_drops",
    "polls",
    "batches",
    "drop_fill_empty",
    "drop_xsk_rx",
    "drop_xsk_invalid",
    "drop_no_socket",
    "xsk_tx_ring_empty",
    "drop_shed",
    "shed_engaged",
    "shed_refused",
)
DROP_NAMES = tuple(n for n in COUNTER_NAMES if n.startswith("drop_")) + ("kernel_drops",)
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def netns_unavailable() -> str | None:
    """Why the lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, AF_PACKET)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    return None


def need_tool(name: str, package: str | None = None) -> str:
    """The tool's path; skip the calling test if it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs `{name}` (apt-get install {package or name})")
    return path


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def _runtime_distributions(name: str, seen: set[str]) -> None:
    """`name` and what it needs at run time (extras left out), installed."""
    import importlib.metadata as md

    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return  # a requirement for another platform (win_inet_pton, say)
    seen.add(key)
    for req in md.requires(name) or []:
        if "extra ==" not in req:
            m = re.match(r"[A-Za-z0-9_.\-]+", req)
            if m:
                _runtime_distributions(m.group(0), seen)


def unprivileged_python(dest: Path) -> list[str]:
    """An argv prefix that runs `-m tpb` as nobody from a copy of TPB and of
    what it needs at run time, made world-readable in `dest` (a fresh
    directory).  The checkout and its venv may sit where nobody can read
    them (a mode-0700 home), which would make the test fail with "No
    module named tpb" instead of TPB's own refusal.

    The interpreter is one nobody can run, of this Python's version (the
    compiled modules are built for it); the test is skipped, saying so,
    if there is none."""
    import importlib.metadata as md

    import tpb

    shutil.copytree(Path(tpb.__file__).parent, dest / "tpb",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dists: set[str] = set()
    for dep in md.requires("tpb") or []:
        if "extra ==" not in dep:
            _runtime_distributions(re.match(r"[A-Za-z0-9_.\-]+", dep).group(0), dists)
    for name in dists:
        dist = md.distribution(name)
        for f in dist.files or []:
            if f.parts[0] == ".." or "__pycache__" in f.parts:
                continue  # scripts in bin/, byte code
            src = Path(str(dist.locate_file(f)))
            if src.is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / f)
    for root, _dirs, files in os.walk(dest):
        os.chmod(root, 0o755)
        for n in files:
            os.chmod(os.path.join(root, n), 0o644)
    dest.chmod(0o755)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable, os.path.realpath(sys.executable),
                  getattr(sys, "_base_executable", ""), f"/usr/bin/python{version}",
                  f"/usr/local/bin/python{version}"]
    env = ["env", "--chdir=/", f"PYTHONPATH={dest}"]
    for py in dict.fromkeys(c for c in candidates if c):
        probe = subprocess.run(
            [*NOBODY, *env, py, "-s", "-c", "import sys, tpb.errors; print(sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30,
        )
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return [*env, py, "-s"]
    pytest.skip(f"no Python {version} that user nobody may run")


def tpb_argv(*args: str) -> list[str]:
    """`python -m tpb run ...` with this interpreter (the venv's)."""
    return [sys.executable, "-m", "tpb", "run", *args]


def _proc_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return "?"


def task_stacks(pid: int, depth: int = 12) -> str:
    """Where each thread of a process that will not exit waits: its name,
    wait channel and the top of its kernel stack (root reads those), so that
    a hang seen once says whether it was a send, a join or a netlink call."""
    parts = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        stack = " < ".join(ln.split()[-1]
                           for ln in _proc_text(task / "stack").splitlines()[:depth])
        parts.append(f"[{task.name} {_proc_text(task / 'comm')} "
                     f"wchan={_proc_text(task / 'wchan')} {stack}]")
    return " ".join(parts) or "(gone)"


class TpbDaemon:
    """`tpb run` or `tpb pop` in a lab node, started and stopped the way an
    operator would: wait for its ready line on stderr, stop it with a
    signal, expect exit 0 with one summary line and no traceback, read the
    --counters file."""

    def __init__(
        self, lab: Lab, node: str, argv: list[str], ready: str, counters: Path,
        what: str | None = None,
    ) -> None:
        self.lab, self.node, self.argv, self.ready = lab, node, argv, ready
        self.counters_file = Path(counters)
        self.what = what or f"{node}: {' '.join(argv[2:])}"
        self.proc: subprocess.Popen | None = None
        self.stdout = ""
        self.stderr = ""
        self._line = 0  # stderr lines wait_line() has passed
        self.returncode: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def describe(self) -> str:
        return self.what

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start, and return once it says `ready` on stderr; fail with its
        stderr if it exits first or takes longer than `timeout`."""
        if self.counters_file.exists():
            self.counters_file.unlink()
        self.proc, self.stderr = spawn_until(self.lab, self.node, self.argv, self.ready,
                                             timeout, self.what)
        self._line = 0
        return self

    def wait_line(self, needle: str, timeout: float = 10.0) -> str:
        """The next line on its stderr that contains `needle`, after the
        lines an earlier wait_line() returned; fail after `timeout` or when
        it exits first, with what it printed.  (Everything read stays in
        self.stderr.)"""
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while True:
            lines = self.stderr.splitlines(keepends=True)
            for i in range(self._line, len(lines)):
                if lines[i].endswith("\n") and needle in lines[i]:
                    self._line = i + 1
                    return lines[i].rstrip("\n")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.what}: no {needle!r} on stderr within {timeout}s; "
                                     f"stderr: {self.stderr!r}")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"{self.what}: exited before {needle!r}; "
                                     f"stderr: {self.stderr!r}")
            self.stderr += chunk.decode(errors="replace")

    def _collect(self, out: bytes | None, err: bytes | None) -> None:
        assert self.proc is not None
        self.returncode = self.proc.returncode
        self.stdout += out.decode(errors="replace") if out else ""
        self.stderr += err.decode(errors="replace") if err else ""

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self._collect(*self.proc.communicate(timeout=STOP_TIMEOUT))

    def send_signal(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum`, wait (bounded) for the exit, return the status."""
        assert self.proc is not None and self.returncode is None, f"{self.what}: not running"
        self.proc.send_signal(signum)
        try:
            out, err = self.proc.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            stuck = task_stacks(self.proc.pid)
            self.kill()
            raise AssertionError(
                f"{self.what}: did not exit within {STOP_TIMEOUT}s of signal {signum}; "
                f"stderr: {self.stderr!r}; its threads: {stuck}"
            ) from None
        self._collect(out, err)
        return self.returncode

    def stop(self, signum: int = signal.SIGTERM) -> dict:
        """Stop it like an operator; assert a clean exit; return the counters."""
        rc = self.send_signal(signum)
        assert rc == 0, f"{self.what}: exited with {rc}; stderr: {self.stderr!r}"
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tpb: "), self.stdout
        assert self.counters_file.exists(), f"{self.what}: no counters file"
        return self.read_counters()

    def read_counters(self) -> dict:
        return json.loads(self.counters_file.read_text())


class TpbProcess(TpbDaemon):
    """`tpb run --in IN --out OUT` in a lab node; its counters checked for
    every per-port counter."""

    def __init__(
        self,
        lab: Lab,
        counters_file: Path,
        in_if: str = "eth2",
        out_if: str = "eth3",
        node: str = "tpb",
        extra: tuple[str, ...] = (),
    ) -> None:
        argv = tpb_argv("--in", in_if, "--out", out_if, "--counters", str(counters_file))
        super().__init__(lab, node, [*argv, *extra], "bridging", counters_file, "tpb run")

    def read_counters(self) -> dict:
        return read_counters(self.counters_file)


def read_counters(path: Path) -> dict:
    """The --counters JSON: {"in": {...}, "out": {...}} with every per-port
    counter (other sections, such as a tunnel's, may follow)."""
    data = json.loads(Path(path).read_text())
    for port in ("in", "out"):
        assert port in data, data
        missing = set(COUNTER_NAMES) - set(data[port])
        assert not missing, f"{port}: missing {missing}: {data[port]}"
        assert all(isinstance(v, int) and v >= 0 for v in data[port].values()), data[port]
    return data


def assert_consistent(c: dict, ring_full_ok: bool = False) -> None:
    """What holds for any run of a loss-free bridge: nothing dropped, every
    frame taken from one port went out of the other, and the kernel handed
    over what TPB counted (PACKET_STATISTICS counts delivered + dropped).

    ring_full_ok: under a TCP flood a ring may overflow (the kernel drops,
    TCP backs off): allowed, but every other drop reason must stay zero."""
    names = [n for n in DROP_NAMES if not (ring_full_ok and n == "kernel_drops")]
    for port in ("in", "out"):
        drops = {k: c[port][k] for k in names if c[port][k]}
        assert not drops, f"{port}: drops {drops}; all counters {c}"
        delivered = c[port]["kernel_packets"] - c[port]["kernel_drops"]
        assert delivered >= c[port]["rx_frames"], c
    assert c["in"]["rx_frames"] == c["out"]["tx_frames"], c
    assert c["out"]["rx_frames"] == c["in"]["tx_frames"], c


def port_drops(port: dict) -> dict[str, int]:
    """A port's drops by reason from its --counters section (the kernel's
    ring drops as ring_full), for assert_balance()."""
    out = {k[5:]: v for k, v in port.items() if k.startswith("drop_")}
    out["ring_full"] = port["kernel_drops"]
    return out


def assert_balance(sent: int, counters: dict | list[dict], delivered: int) -> None:
    """"Every drop has a counter": of `sent` frames offered, `delivered`
    arrived and each of the others is in exactly one drop counter.
    `counters`: drops by reason ({"gre_key": 3}, a --counters "drop"
    section, port_drops()), or a list of such dicts, summed."""
    dicts = [counters] if isinstance(counters, dict) else counters
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        for reason, n in d.items():
            assert isinstance(n, int) and n >= 0, (reason, n, d)
            total[reason] += n
    dropped = sum(total.values())
    assert sent == delivered + dropped, (
        f"{sent} offered != {delivered} delivered + {dropped} dropped "
        f"{ {k: v for k, v in total.items() if v} }"
    )


def port_state(lab: Lab, node: str, ifname: str) -> dict:
    """What TPB must leave as it found it: flags and promiscuity count."""
    res = lab.run(node, ["ip", "-d", "-j", "link", "show", "dev", ifname])
    link = json.loads(res.stdout)[0]
    return {
        "flags": sorted(link["flags"]),
        "promiscuity": link["promiscuity"],
        "allmulti": link.get("allmulti"),
        "mtu": link["mtu"],
        "operstate": link["operstate"],
    }


def ports_state(lab: Lab, node: str = "tpb", ifnames: tuple[str, ...] = ("eth2", "eth3")) -> dict:
    return {i: port_state(lab, node, i) for i in ifnames}


def spawn_until(lab: Lab, node: str, argv: list[str], ready: str, timeout: float,
                what: str) -> tuple[subprocess.Popen, str]:
    """Start `argv` in `node`; return (the process, its stderr so far) once
    `ready` shows on its stderr.  If it exits first or takes longer than
    `timeout`, it is reaped (killed if need be) and the test fails with
    what it printed."""
    proc = lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while ready.encode() not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            _, err = proc.communicate(timeout=STOP_TIMEOUT)
            raise AssertionError(f"{what}: no {ready!r} within {timeout}s; "
                                 f"stderr: {(buf + err).decode(errors='replace')!r}")
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # EOF: it exited
            _, err = proc.communicate(timeout=STOP_TIMEOUT)
            raise AssertionError(f"{what}: exited with status {proc.returncode} before "
                                 f"{ready!r}; stderr: {(buf + err).decode(errors='replace')!r}")
        buf += chunk
    return proc, buf.decode(errors="replace")


def read_until(stream, needle: bytes, timeout: float, what: str) -> bytes:
    """Read a child's pipe (unbuffered, by its fd) until `needle` shows up;
    fail on end of file or after `timeout` seconds, with what was read."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while needle not in buf:
        left = deadline - time.monotonic()
        r, _, _ = select.select([fd], [], [], max(left, 0))
        if not r:
            raise AssertionError(f"{what}: no {needle!r} within {timeout}s; got {buf!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"{what}: exited before {needle!r}; got {buf!r}")
        buf += chunk
    return buf


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns something true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def received(ping: subprocess.CompletedProcess[str]) -> int:
    """How many replies ping(8) counted (0 when it printed no summary)."""
    m = re.search(r"(\d+) received", ping.stdout)
    return int(m.group(1)) if m else 0


def inet_sum(data: bytes) -> int:
    """The Internet checksum's one's complement sum (RFC 1071), folded to
    16 bits, not inverted: a packet checks when this is 0xffff."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_sum(frame: bytes, l3: int, v6: bool, proto: int) -> int:
    """The L4 pseudo-header's one's complement sum (RFC 793, RFC 8200 8.1)
    of the IP packet at `l3` that runs to the end of `frame`."""
    if v6:
        l4len = len(frame) - l3 - 40
        return inet_sum(frame[l3 + 8 : l3 + 40] + struct.pack("!IxxxB", l4len, proto))
    ihl = (frame[l3] & 0x0F) * 4
    return inet_sum(frame[l3 + 12 : l3 + 20] + struct.pack("!BBH", 0, proto, len(frame) - l3 - ihl))


def zero_sum_partial(ip: bytes) -> tuple[bytes, int, int]:
    """An IPv4 TCP or UDP packet with its first payload word changed so
    that its L4 checksum computes to zero, as a stack hands it over
    CHECKSUM_PARTIAL: the field holds the pseudo-header sum.  Returns
    (packet, L4 offset, checksum offset in L4)."""
    p = bytearray(ip)
    ihl = (p[0] & 15) * 4
    proto = p[9]
    coff, hl = (16, (p[ihl + 12] >> 4) * 4) if proto == 6 else (6, 8)
    field = slice(ihl + coff, ihl + coff + 2)
    pseudo = pseudo_sum(bytes(p), 0, False, proto)
    p[field] = b"\0\0"
    whole = inet_sum(bytes(p[ihl:])) + pseudo
    # adding the would-be checksum to a word makes the sum all ones
    word = struct.unpack_from("!H", p, ihl + hl)[0] + 0xFFFF - ((whole & 0xFFFF) + (whole >> 16))
    struct.pack_into("!H", p, ihl + hl, (word & 0xFFFF) + (word >> 16))
    p[field] = struct.pack("!H", pseudo)
    return bytes(p), ihl, coff


def l4_sum_ok(ip: bytes) -> bool:
    """Whether an IPv4 packet's TCP or UDP checksum verifies."""
    ihl = (ip[0] & 15) * 4
    total = inet_sum(ip[ihl:]) + pseudo_sum(ip, 0, False, ip[9])
    return (total & 0xFFFF) + (total >> 16) == 0xFFFF


def assert_zero_sum_completed(inner: bytes, sent: bytes, l4_at: int, coff: int, want: int) -> None:
    """That `inner`, what came of `sent` (a zero_sum_partial() packet),
    carries the completed checksum `want` in its field, verifies, and has
    every byte after the field unchanged."""
    field = l4_at + coff
    assert inner[field : field + 2] == struct.pack("!H", want), inner.hex()
    assert l4_sum_ok(inner)
    assert inner[field + 2 :] == sent[field + 2 :]


def tshark(pcap: Path, *args: str) -> str:
    """tshark on a pcap file, checksums of IPv4, UDP and TCP checked too."""
    res = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-o",
            "tcp.check_checksum:TRUE",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def tshark_expert(pcap: Path, *args: str, only: str | None = None) -> list[str]:
    """tshark's expert items of severity warning or error, one per line:
    "count group protocol summary"; `only`: of the packets this display
    filter takes."""
    out = tshark(pcap, *args, "-q", "-z", "expert,warn" + (f",{only}" if only else ""))
    items, headings = [], []
    for ln in out.splitlines():
        first = ln.split(None, 1)
        if first and first[0].isdigit():
            items.append(" ".join(ln.split()))
        elif re.match(r"(Errors|Warns) \(\d+\)", ln):
            headings.append(ln)
    # a heading whose rows this parser missed must still fail the caller
    return items or headings


# What TCP's ends do on a busy machine, not what a bridge made: a tail-loss
# probe or a spurious timeout retransmits a segment that was only late, and
# the receiver reports the copy with a D-SACK (RFC 2883).  That it was the
# sender's copy, not one sent twice on the way, tshark_repeats() shows.
ENDPOINTS_OWN = {"Sequence TCP D-SACK Sequence"}


# An application that closes a socket with data it has not read makes its
# kernel send a reset (RFC 9293, 3.10.4; iperf3's server does so at a
# test's end on a loaded machine), and a segment still on its way then gets
# a bare reset from a connection that is gone (3.10.7.1): the end's own
# doing, as tshark_resets_early() tells them apart from a reset a mangled or
# misdelivered segment would draw.
RESET = "Sequence TCP Connection reset (RST)"


def tshark_problems(pcap: Path, *args: str) -> list[str]:
    """tshark_expert() less what TCP's ends do of their own (ENDPOINTS_OWN,
    and resets after every byte was acknowledged), and any packet the pcap
    holds twice (tshark_repeats())."""
    items = [p for p in tshark_expert(pcap, *args) if p.split(" ", 1)[-1] not in ENDPOINTS_OWN]
    resets = [p for p in items if p.split(" ", 1)[-1] == RESET]
    if resets:
        items = [p for p in items if p not in resets] + tshark_resets_early(pcap, *args)
    return items + tshark_repeats(pcap, *args)


def _set(flag: str) -> bool:
    """A tshark flag field: 1 or True, by its version."""
    return flag in ("1", "True")


def tshark_resets_early(pcap: Path, *args: str) -> list[str]:
    """TCP resets (of the innermost TCP, as PACKET_KEY's fields) that are
    not an end's own: one with an ACK that does not acknowledge all that the
    other end sent on the connection before it, or a bare one (no ACK: the
    answer of a connection that does not exist) from an end that had not
    closed or reset that connection before."""
    fields = ("tcp.stream", "ip.src", "tcp.srcport", "tcp.nxtseq", "tcp.ack",
              "tcp.flags.ack", "tcp.flags.fin", "tcp.flags.reset")
    # relative numbers (the caller's options may have turned them off): a
    # connection's raw ones may wrap round 2^32 within the capture
    relative = ("-o", "tcp.analyze_sequence_numbers:TRUE",
                "-o", "tcp.relative_sequence_numbers:TRUE")
    sent: dict[tuple[str, str, str], int] = {}
    closed: set[tuple[str, str, str]] = set()
    early = []
    for row in tshark_inner_fields(pcap, fields, *args, *relative, "-Y", "tcp"):
        stream, src, sport, nxt, ack, has_ack, fin, rst = (row.split("\t") + [""] * 8)[:8]
        end = (stream, src, sport)
        if _set(rst):
            peer = max((n for (st, s2, p2), n in sent.items()
                        if st == stream and (s2, p2) != (src, sport)), default=0)
            if _set(has_ack):
                own = bool(ack) and int(ack) >= peer
            else:
                own = end in closed
            if not own:
                early.append(f"reset before delivery: {row}")
            closed.add(end)
            continue
        if nxt:
            sent[end] = max(sent.get(end, 0), int(nxt))
        if _set(fin):
            closed.add(end)
    return early


# Fields of the innermost IPv4 packet and its TCP segment, or the fragment,
# that together name one packet a sender made: a retransmission carries a
# new IP ID, a copy of the same packet does not.
PACKET_KEY = ("ip.src", "ip.dst", "ip.id", "ip.frag_offset", "ip.flags.mf", "ip.proto",
              "tcp.seq_raw", "tcp.ack_raw", "tcp.len")


def tshark_inner_fields(pcap: Path, fields: tuple[str, ...], *args: str) -> list[str]:
    """One tab-separated row of `fields` per packet, each field of the
    innermost header that has it (occurrence=l: inside the GRE)."""
    out = tshark(pcap, *args, "-T", "fields", "-E", "occurrence=l",
                 *[a for f in fields for a in ("-e", f)])
    return out.splitlines()


def tshark_repeats(pcap: Path, *args: str) -> list[str]:
    """Packets a pcap holds more than once (by PACKET_KEY): what a bridge
    that sent something twice leaves, unlike a sender's retransmission."""
    seen = collections.Counter(tshark_inner_fields(pcap, PACKET_KEY, *args))
    return [f"{n}x {row}" for row, n in seen.items() if n > 1]
