"""`make soak`: TPB under mixed traffic for SOAK_SECONDS (default 600), in
the tunnel lab (tpb/lab.py: tunnel(), prefix tpbsoak), with `tpb pop`:

- a 64-byte flood, gw1 → gw2, bridged (trafgen, FLOOD_PPS a second);
- TCP through the tunnel, pc → server (iperf3, TCP_RATE);
- fragments both ways: pings of 1500 bytes, pc → server, every 50 ms (TPB
  fragments the requests, the POP's kernel the replies' GRE, and TPB
  reassembles them);
- malformed and spoofed frames into --out (ATTACK_PPS a second): GRE with a
  wrong key, version or no room for its header, GRE from a stranger,
  spoofed fragments far out in their datagram (held, then evicted) and
  first fragments with a wrong key, IPv4 headers too short, UDP to the
  tunnel address.

Every 10 s one line: TPB's RSS, open descriptors, reassembly memory and
the running balance.  The balance is over the frames whose every one can
be counted at both ends — the flood and the attack frames, told apart by
their source MACs: offered = counted by nftables at TPB's own ports'
ingress (before TPB's chain), delivered = counted at the far ends' ingress
(gw2 eth0, gw1 eth1), dropped = TPB's drop counters, every reason, every
port.  TCP and pings run alongside and are checked by their own ends; a drop
of theirs would show as a surplus.  While traffic flows a few frames are
in flight; at the end, traffic stopped and reassembly empty (its 30 s
timeout), it must be exact.

Goals (issue 12): RSS and descriptors flat — within 5 % of their value at
the end of the first minute (or of half the run, if shorter) — and the
balance exact.  Exit status 0 if both hold, 1 if not, 2 if the soak could
not run.

Run it alone on the machine (as root): `make soak`, `make soak
SOAK_SECONDS=60`.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_util import ipv4_header, mac_bytes, scrape  # noqa: E402
from helpers import TpbDaemon  # noqa: E402
from rawsock import netns  # noqa: E402

from tpb import lab as labmod  # noqa: E402
from tpb.lab import T_PC, T_POP, T_SERVER, T_TPB  # noqa: E402

PREFIX = "tpbsoak"
KEY = 7
LISTEN = "127.0.0.1:9547"
REPORT_EVERY = 10.0
# The mix's rates; SOAK_FLOOD_PPS, SOAK_ATTACK_PPS, SOAK_TCP_RATE override
# them (to find which part of the mix a finding comes from).
FLOOD_PPS = int(os.environ.get("SOAK_FLOOD_PPS", "50000"))
ATTACK_PPS = int(os.environ.get("SOAK_ATTACK_PPS", "1000"))
TCP_RATE = os.environ.get("SOAK_TCP_RATE", "200M")
PING_INTERVAL = 0.05
FLAT = 0.05
FLOOD_MAC = "02:00:00:00:00:77"
ATTACK_MAC = "02:00:00:00:00:66"
NOBODY_MAC = "02:00:00:00:00:99"  # the flood's destination: no one takes it in
TPB_OUT_MAC = "02:00:00:00:00:44"
GW1_MAC = "02:00:00:00:00:42"
STRANGER = "198.51.100.77"


def log(msg: str) -> None:
    print(f"soak: {msg}", flush=True)


# ---- counting at the ports ------------------------------------------------------

# One table per counting port; nftables tables are per namespace, so the
# tpb node's two (eth2, eth3) have names of their own.
COUNT_TABLE = """\
table netdev {name}
delete table netdev {name}
table netdev {name} {{
  counter flood {{ }}
  counter attack {{ }}
  chain c {{
    type filter hook ingress device "{dev}" priority -100; policy accept;
    ether saddr {flood} counter name flood
    ether saddr {attack} counter name attack
  }}
}}
"""
COUNTING = {  # table: (node, device); TPB's chain on eth2 runs later, at 500
    "soak_in": ("tpb", "eth2"),
    "soak_out": ("tpb", "eth3"),
    "soak_gw1": ("gw1", "eth1"),
    "soak_gw2": ("gw2", "eth0"),
}


def count_tables(lab: labmod.Lab) -> None:
    for name, (node, dev) in COUNTING.items():
        script = COUNT_TABLE.format(name=name, dev=dev, flood=FLOOD_MAC, attack=ATTACK_MAC)
        subprocess.run(lab.cmd(node, ["nft", "-f", "-"]), input=script, text=True, check=True,
                       capture_output=True)


def counted(lab: labmod.Lab, name: str) -> dict[str, int]:
    node = COUNTING[name][0]
    doc = json.loads(lab.run(node, ["nft", "-j", "list", "counters", "table", "netdev",
                                    name]).stdout)
    return {i["counter"]["name"]: i["counter"]["packets"] for i in doc["nftables"]
            if "counter" in i}


# ---- the attack frames ------------------------------------------------------------


def gre(flags: int, proto: int = 0x0800, key: int | None = None, payload: bytes = b"") -> bytes:
    opt = struct.pack("!I", key) if key is not None else b""
    return struct.pack("!HH", flags | (0x2000 if key is not None else 0), proto) + opt + payload


def attack_frames() -> list[tuple[str, object]]:
    """(name, make()) of each kind of bad frame; make() builds a fresh one
    (random IP IDs: spoofed fragments must not complete each other)."""
    eth = mac_bytes(TPB_OUT_MAC) + mac_bytes(ATTACK_MAC) + b"\x08\x00"
    inner = ipv4_header(T_SERVER, T_PC, 17, 8 + 16) + struct.pack("!HHHH", 9, 9, 24, 0) + bytes(16)

    def ip(payload: bytes, src: str = T_POP, frag: int = 0, proto: int = 47,
           odd: int = 0) -> bytes:
        # Spoofed far fragments take even IDs, spoofed first fragments odd
        # ones: a first fragment refused by its key takes the datagram of its
        # ID with it, counted once for the datagram (reassembly counts
        # datagrams), and the far fragment held there would go uncounted in a
        # balance of frames.  Real fragments from the POP meet both: that is
        # the attack.
        ident = random.getrandbits(15) << 1 | odd
        return eth + ipv4_header(src, T_TPB, proto, len(payload), ident=ident,
                                 frag=frag) + payload

    def short_header() -> bytes:
        h = bytearray(ipv4_header(T_POP, T_TPB, 47, 8))
        h[0] = 0x43  # IHL 3: shorter than any IPv4 header
        return eth + bytes(h) + bytes(8)

    return [
        ("wrong key", lambda: ip(gre(0, key=KEY + 1, payload=inner))),
        ("GRE version 1", lambda: ip(gre(1, key=KEY, payload=inner))),
        ("GRE truncated", lambda: ip(b"\x20\x00")),
        ("from a stranger", lambda: ip(gre(0, key=KEY, payload=inner), src=STRANGER)),
        ("spoofed far fragment", lambda: ip(bytes(8), frag=8000)),
        ("spoofed first fragment, wrong key",
         lambda: ip(gre(0, key=KEY + 1, payload=inner), frag=0x2000, odd=1)),
        ("IPv4 header too short", short_header),
        ("UDP to the tunnel address", lambda: ip(struct.pack("!HHHH", 9, 9, 8, 0), proto=17)),
    ]


class Attacker:
    """ATTACK_PPS bad frames a second from gw2 eth0 into TPB's --out, the
    kinds in turn, until stop(); sent counts what the kernel took."""

    def __init__(self, lab: labmod.Lab) -> None:
        with netns(lab.ns("gw2")):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.bind(("eth0", 0))
        self.kinds = attack_frames()
        self.sent = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        burst = max(1, ATTACK_PPS // 100)  # every 10 ms
        due = time.monotonic()
        i = 0
        while not self.done.is_set():
            for _ in range(burst):
                _, make = self.kinds[i % len(self.kinds)]
                i += 1
                try:
                    self.sock.send(make())  # type: ignore[operator]
                    self.sent += 1
                except OSError:
                    pass  # the kernel refused it: never offered
            due += 0.01
            self.done.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.sock.close()


# ---- the flood --------------------------------------------------------------------


def flood_config(path: Path) -> None:
    """trafgen's configuration: one 60-byte frame (64 on the wire with the
    FCS), UDP from pc to gw2's address, to a MAC no one has."""
    payload = struct.pack("!HHHH", 40000, 9, 8 + 18, 0) + bytes(18)
    frame = (mac_bytes(NOBODY_MAC) + mac_bytes(FLOOD_MAC) + b"\x08\x00"
             + ipv4_header(T_PC, "198.51.100.2", 17, len(payload)) + payload)
    assert len(frame) == 60, len(frame)
    path.write_text("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")


# ---- the process's resources ---------------------------------------------------------


def otherhost(lab: labmod.Lab, node: str, dev: str) -> int:
    """Frames dev took in but threw away as addressed to another host (the
    kernel's rx_otherhost_dropped, which ip(8) shows only once it is not
    0): TPB sending to a wrong MAC, a loss no counter of TPB's sees."""
    lines = lab.run(node, ["ip", "-s", "-s", "link", "show", dev]).stdout.splitlines()
    for head, values in zip(lines, lines[1:], strict=False):
        names = head.split()[2:]
        if head.split()[:2] == ["RX", "errors:"] and "otherhost" in names:
            return int(values.split()[names.index("otherhost")])
    return 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tpb_drops(m: dict[str, float]) -> int:
    """Every drop TPB counted: the tunnel's by reason and each port's
    (ring_full = the kernel's ring drops)."""
    total = 0.0
    for key, v in m.items():
        if key.startswith(("tpb_tunnel_drops_total{", "tpb_port_drops_total{")):
            total += v
    return int(total)


def reasm_memory(m: dict[str, float]) -> int:
    return int(m.get("tpb_reassembly_memory_bytes", 0))


class Balance:
    """offered = delivered + dropped, over the flood and attack frames."""

    def __init__(self, lab: labmod.Lab) -> None:
        self.lab = lab

    def read(self) -> tuple[dict[str, float], int, int, int]:
        """(a scrape, offered, delivered, dropped), read in the order that
        leaves the frames in flight never negative: far ends, TPB, ports."""
        g1, g2 = counted(self.lab, "soak_gw1"), counted(self.lab, "soak_gw2")
        delivered = g2["flood"] + g1["attack"]
        m = scrape(self.lab, "tpb", LISTEN)
        tin, tout = counted(self.lab, "soak_in"), counted(self.lab, "soak_out")
        offered = tin["flood"] + tin["attack"] + tout["flood"] + tout["attack"]
        return m, offered, delivered, tpb_drops(m)


# ---- the run ----------------------------------------------------------------------------


def soak(seconds: float, workdir: Path) -> int:
    with labmod.tunnel(PREFIX) as lab:
        lab.sysctl("pop", "net.ipv6.conf.default.disable_ipv6", "1")
        pop = TpbDaemon(lab, "pop", [sys.executable, "-m", "tpb", "pop", "--local", T_POP,
                                     "--peer", f"{T_TPB},key={KEY},prefix=192.0.2.0/26",
                                     "--metrics-listen", "off", "--counters",
                                     str(workdir / "pop.json")], "tpb: pop ",
                        workdir / "pop.json")
        pop.start()
        tpb = TpbDaemon(lab, "tpb", [sys.executable, "-m", "tpb", "run", "--in", "eth2",
                                     "--out", "eth3", "--local", T_TPB, "--remote", T_POP,
                                     "--key", str(KEY), "--match", "ip daddr 203.0.113.0/24",
                                     "--metrics-listen", LISTEN, "--counters",
                                     str(workdir / "tpb.json")], "tpb: bridging",
                        workdir / "tpb.json")
        tpb.start()
        pid = tpb.pid
        count_tables(lab)
        bal = Balance(lab)
        flood_cfg = workdir / "flood.cfg"
        flood_config(flood_cfg)
        iperf_s = lab.spawn("server", ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        _wait_port(lab, "server", 5201)
        iperf = lab.spawn("pc", ["iperf3", "-c", T_SERVER, "-t", str(int(seconds)), "-b",
                                 TCP_RATE, "-J"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        pings = lab.spawn("pc", ["ping", "-n", "-s", "1472", "-M", "dont", "-i",
                                 str(PING_INTERVAL), "-w", str(int(seconds)), T_SERVER],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        flood = lab.spawn("gw1", ["trafgen", "-o", "eth1", "-i", str(flood_cfg), "-b",
                                  f"{FLOOD_PPS}pps", "-n", str(int(FLOOD_PPS * seconds)),
                                  "-P", "1", "-q"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
        attacker = Attacker(lab)
        t0 = time.monotonic()
        samples: list[tuple[float, int, int]] = []
        log(f"{seconds:.0f} s: flood {FLOOD_PPS}/s, TCP {TCP_RATE}, pings of 1500 B every "
            f"{PING_INTERVAL * 1000:.0f} ms, {ATTACK_PPS} bad frames/s; TPB pid {pid}")
        log("   t    RSS KiB  fds  reasm B   offered  delivered   dropped  in flight")
        next_at = t0 + REPORT_EVERY
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            time.sleep(max(0.0, min(next_at, t0 + seconds) - now))
            if time.monotonic() < next_at:
                continue
            next_at += REPORT_EVERY
            if tpb.proc.poll() is not None:
                log(f"TPB exited ({tpb.proc.returncode})")
                return 1
            m, off, dlv, drp = bal.read()
            r, f = rss_kib(pid), fds(pid)
            t = time.monotonic() - t0
            samples.append((t, r, f))
            log(f"{t:5.0f}  {r:8d}  {f:3d}  {reasm_memory(m):7d}  {off:9d}  {dlv:9d}  "
                f"{drp:8d}  {off - dlv - drp:9d}")
        attacker.stop()
        flood_out = _finish(flood, 60)
        ping_out = _finish(pings, 30)
        iperf_out = _finish(iperf, 60)
        iperf_s.kill()
        # traffic stopped: wait for reassembly to empty (its timeout) before the
        # final count, so nothing is left in flight
        deadline = time.monotonic() + 40
        while True:
            m = scrape(lab, "tpb", LISTEN)
            if reasm_memory(m) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        m, off, dlv, drp = bal.read()
        strays = {f"{n}:{d}": otherhost(lab, n, d) for n, d in (("gw1", "eth1"), ("pc", "eth0"))}
        c = tpb.stop()
        pop.stop()
    return _report(seconds, samples, off, dlv, drp, attacker.sent, c, flood_out, ping_out,
                   iperf_out, strays)


def _finish(p: subprocess.Popen, timeout: float) -> str:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return (out or "") + (err or "")


def _wait_port(lab: labmod.Lab, node: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in lab.run(node, ["ss", "-ltn"]).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {node}:{port}")
        time.sleep(0.05)


def _report(seconds: float, samples: list[tuple[float, int, int]], off: int, dlv: int,
            drp: int, attacks: int, c: dict, flood_out: str, ping_out: str,
            iperf_out: str, strays: dict[str, int]) -> int:
    ok = True
    warm = min(60.0, seconds / 2)
    base = next(((r, f) for t, r, f in samples if t >= warm), None)
    later = [(r, f) for t, r, f in samples if t >= warm]
    if base and later:
        rmin, rmax = min(r for r, _ in later), max(r for r, _ in later)
        fmin, fmax = min(f for _, f in later), max(f for _, f in later)
        rss_ok = rmax <= base[0] * (1 + FLAT) and rmin >= base[0] * (1 - FLAT)
        fd_ok = fmax <= base[1] * (1 + FLAT) and fmin >= base[1] * (1 - FLAT)
        log(f"RSS after {warm:.0f} s: {base[0]} KiB, then {rmin}..{rmax} KiB "
            f"({'flat' if rss_ok else 'NOT flat'}, within {FLAT:.0%}); descriptors {base[1]}, "
            f"then {fmin}..{fmax} ({'flat' if fd_ok else 'NOT flat'})")
        ok = ok and rss_ok and fd_ok
    else:
        log("too short a run to judge RSS and descriptors")
        ok = False
    exact = off == dlv + drp
    log(f"balance: {off} offered = {dlv} delivered + {drp} dropped: "
        f"{'exact' if exact else f'OFF BY {off - dlv - drp}'}")
    ok = ok and exact
    t = c["tunnel"]
    log(f"TPB: tunnel drops {t['drop']}; in drops "
        f"{ {k: v for k, v in c['in'].items() if k.startswith('drop_') and v} } ring_full "
        f"{c['in']['kernel_drops']}; out drops "
        f"{ {k: v for k, v in c['out'].items() if k.startswith('drop_') and v} } ring_full "
        f"{c['out']['kernel_drops']}; reassembled {t['reasm_done']}, reassembly peak "
        f"{t['reasm_memory_peak']} B; encap {t['encap_packets']}, decap {t['decap_packets']}")
    log(f"attack frames sent: {attacks}")
    # What TPB sends toward the site must be addressed to it: a frame the
    # in-side router drops as another host's is lost where no counter of
    # TPB's sees it (as the unwrapped replies once were, readdressed to the
    # flood's source MAC).
    log(f"frames dropped as addressed to another host: {strays} "
        f"({'none' if not any(strays.values()) else 'LOST'})")
    ok = ok and not any(strays.values())
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_out)
    if m:
        seqs = {int(n) for n in re.findall(r"icmp_seq=(\d+)", ping_out)}
        lost = sorted(set(range(1, int(m[1]) + 1)) - seqs)
        log(f"pings of 1500 B: {m[2]} of {m[1]} answered; unanswered: "
            f"{lost[:20]}{' ...' if len(lost) > 20 else ''}")
    try:
        end = json.loads(iperf_out[iperf_out.index("{"):])["end"]
        log(f"TCP through the tunnel: {end['sum_received']['bits_per_second'] / 1e6:.0f} "
            f"Mbit/s received, {end['sum_sent'].get('retransmits', 0)} retransmits")
    except (ValueError, KeyError):
        log(f"iperf3: {iperf_out.strip()[-300:]}")
        ok = False
    flood_sent = re.search(r"(\d+) packets outgoing", flood_out)
    log(f"flood: {flood_sent[1] if flood_sent else '?'} frames sent by trafgen")
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, AF_PACKET, nftables)", file=sys.stderr)
        return 2
    raw = os.environ.get("SOAK_SECONDS", "600")
    try:
        seconds = float(raw)
        if not 20 <= seconds <= 86400:
            raise ValueError
    except ValueError:
        print(f"soak: SOAK_SECONDS={raw}: a number of seconds from 20 to 86400",
              file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tpb-soak-") as d:
        try:
            return soak(seconds, Path(d))
        except (AssertionError, RuntimeError, subprocess.CalledProcessError) as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
