"""Outer IPv4 fragments of GRE from the POP, reassembled by TPB (reasm.c).

The tunnel lab without `tpb pop`: GRE from the POP's address to TPB's is
made with scapy, its outer IPv4 packet fragmented, and the fragments sent
as Ethernet frames from gw2's eth0 to TPB's eth3 MAC (as gw2 would, having
asked TPB for the tunnel address by ARP).  What TPB delivers comes out of
its eth2, readdressed to gw1 (the in-side router it learned from one
tunneled ping), and is captured on gw1's eth1; pc's eth0 shows that gw1
routed it on.  The pop drops GRE (nftables), so nothing else comes back.
"""

from __future__ import annotations

import os
import struct
import time

import pytest
from pop_util import (
    Capture,
    FrameSender,
    mac,
    need_root,
    need_tool,
    ping,
    tunnel_args,
)
from scapy.layers.inet import ICMP, IP, fragment
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw

from tpb import lab as labmod
from tpb.lab import T_PC, T_POP, T_SERVER, T_TPB

pytestmark = pytest.mark.netns

LAB_PREFIX = "tpbras"
KEY = 7
TPB = tunnel_args(T_TPB, "--key", str(KEY))
INNER_SIZE = 1400  # inner IPv4 packet: it fits eth2 (MTU 1500) once decapsulated
FRAG = 512  # outer fragment data: three fragments of 1428-byte GRE


@pytest.fixture(scope="module")
def rlab():
    need_root()
    need_tool("nft", "nftables")
    with labmod.tunnel(LAB_PREFIX) as lb:
        # No `tpb pop`: the pop's kernel must not answer GRE with ICMP.
        lb.run(
            "pop",
            [
                "nft",
                "add table ip tpbras; "
                "add chain ip tpbras input { type filter hook input priority 0; policy accept; }; "
                "add rule ip tpbras input ip protocol gre drop",
            ],
        )
        yield lb


class Pop:
    """GRE as the POP would send it, made by hand, into TPB's eth3."""

    def __init__(self, lab) -> None:
        self.lab = lab
        self.src = mac(lab, "gw2", "eth0")
        self.dst = mac(lab, "tpb", "eth3")
        self.tx = FrameSender(lab, "gw2", "eth0")
        # IDs from 0x8000 up: the flood below uses 1..2000
        self.ident = 0x8000 | int.from_bytes(os.urandom(2), "big") & 0x3FFF

    def close(self) -> None:
        self.tx.close()

    def next_id(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

    @staticmethod
    def inner(marker: bytes, size: int = INNER_SIZE) -> bytes:
        """An ICMP echo reply to pc (pc drops it quietly: no ping of its own)."""
        head = IP(src=T_SERVER, dst=T_PC, ttl=60, id=0x1234) / ICMP(type=0, id=0xBEEF, seq=1)
        body = (marker * (size // len(marker) + 1))[: size - len(head)]
        return bytes(head / Raw(body))

    def outer(self, inner: bytes, ident: int | None = None) -> IP:
        return (
            IP(src=T_POP, dst=T_TPB, ttl=64, id=self.next_id() if ident is None else ident)
            / GRE(key_present=1, key=KEY, proto=0x0800)
            / Raw(inner)
        )

    def frame(self, ip: bytes) -> bytes:
        return bytes(Ether(src=self.src, dst=self.dst, type=0x0800)) + ip

    def send(self, ips) -> None:
        for ip in ips:
            self.tx.send(self.frame(bytes(ip)))

    def fragments(self, inner: bytes) -> list[bytes]:
        """The outer packet cut by scapy's fragment() at FRAG data bytes."""
        return [bytes(f) for f in fragment(self.outer(inner), fragsize=FRAG)]


def cut(outer: bytes, start: int, end: int, mf: bool) -> bytes:
    """A hand-made fragment: outer payload bytes [start, end) of a whole
    outer IPv4 packet (start a multiple of 8)."""
    assert start % 8 == 0
    hdr = bytearray(outer[:20])
    data = outer[20:][start:end]
    struct.pack_into("!HH", hdr, 2, 20 + len(data), 0)
    struct.pack_into("!H", hdr, 6, (0x2000 if mf else 0) | start // 8)
    struct.pack_into("!H", hdr, 10, 0)
    struct.pack_into("!H", hdr, 10, _csum(bytes(hdr)))
    return bytes(hdr) + data


def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@pytest.fixture
def pop(rlab):
    p = Pop(rlab)
    yield p
    p.close()


def start_tpb(rlab, daemons, *extra: str, config: str | None = None):
    t = daemons.run(rlab, *TPB, *extra, config=config)
    # One tunneled packet: TPB learns the in-side router's MAC (gw1), to
    # which it readdresses what it decapsulates.
    ping(rlab, "pc", T_SERVER, count=1, wait=0.5)
    return t


class Delivered:
    """What TPB delivers toward gw1 (on gw1's eth1) and what gw1 routes on
    to pc (pc's eth0), frames carrying one of our markers."""

    def __init__(self, lab, *markers: bytes) -> None:
        self.markers = markers

        def keep(f: bytes) -> bool:
            return any(m in f for m in markers)

        self.gw1 = Capture(lab, "gw1", "eth1", keep=keep, incoming_only=True)
        self.pc = Capture(lab, "pc", "eth0", keep=keep, incoming_only=True)

    def fence(self, pop: Pop, marker: bytes, timeout: float = 5, resend: bool = False) -> None:
        """An unfragmented GRE packet after everything else: once it is
        through, so is everything TPB was going to deliver before it.  After
        a burst, the kernel may have dropped it on the way (a full backlog):
        with `resend`, it is sent again each second."""
        deadline = time.monotonic() + timeout
        while True:
            pop.send([pop.outer(Pop.inner(marker, 200))])
            left = deadline - time.monotonic()
            try:
                for cap in (self.gw1, self.pc):
                    cap.wait(
                        lambda fr: any(marker in f.data for f in fr),
                        min(left, 1.0) if resend else left,
                        f"fence {marker!r}",
                    )
                return
            except AssertionError:
                if not resend or time.monotonic() >= deadline:
                    raise

    def count(self, marker: bytes) -> tuple[int, int]:
        return tuple(sum(marker in f.data for f in cap.snapshot()) for cap in (self.gw1, self.pc))

    def frames(self, marker: bytes) -> list[bytes]:
        return [f.data for f in self.gw1.snapshot() if marker in f.data]

    def stop(self) -> None:
        self.gw1.stop()
        self.pc.stop()


def assert_delivered_intact(lab, frames: list[bytes], inner: bytes) -> None:
    assert len(frames) == 1, f"delivered {len(frames)} times"
    eth = frames[0]
    assert eth[:6] == bytes.fromhex(mac(lab, "gw1", "eth1").replace(":", "")), eth[:14].hex()
    assert eth[6:12] == bytes.fromhex(mac(lab, "gw2", "eth0").replace(":", "")), eth[:14].hex()
    assert eth[12:14] == b"\x08\x00"
    assert eth[14:] == inner, "the inner packet changed on the way"


# ---- complete datagrams ----------------------------------------------------------

ORDERS = {
    "in-order": [0, 1, 2],
    "reversed": [2, 1, 0],
    "middle-first": [1, 2, 0],
    "duplicates": [0, 1, 0, 1, 2],
    "last-twice-first": [2, 2, 0, 1],
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_fragments_reassembled_once(rlab, daemons, pop, order):
    tpb = start_tpb(rlab, daemons)
    marker, fence = b"RASM-" + order.encode(), b"FENCE-" + order.encode()
    inner = Pop.inner(marker)
    frags = pop.fragments(inner)
    assert len(frags) == 3
    seq = ORDERS[order]
    got = Delivered(rlab, marker, fence)
    try:
        pop.send(frags[i] for i in seq)
        got.fence(pop, fence)
        assert got.count(marker) == (1, 1), got.count(marker)
        assert_delivered_intact(rlab, got.frames(marker), inner)
    finally:
        got.stop()
    c = tpb.stop()["tunnel"]
    dups = len(seq) - len(set(seq))
    assert c["reasm_fragments"] == len(seq), c
    assert c["reasm_done"] == 1, c
    assert c["decap_packets"] == 2, c  # the datagram and the fence
    assert c["drop"] == ({"reasm_duplicate": dups} if dups else {}), c
    assert c["reasm_memory"] == 0 and 0 < c["reasm_memory_peak"] <= 4096, c


# ---- overlaps: the whole datagram is dropped ----------------------------------------


OVERLAPS = {
    # (start, end, MF) in outer payload bytes (1428 - 20 = 1408 of them), in
    # the order sent; after the overlap, the missing piece comes late: it
    # must not complete what was dropped.
    "into-previous": [(0, 512, 1), (1024, 1408, 0), (504, 1024, 1), (512, 1024, 1)],
    "into-next": [(0, 512, 1), (1024, 1408, 0), (512, 1032, 1), (512, 1024, 1)],
    "covers-previous": [(512, 1024, 1), (1024, 1408, 0), (0, 600, 1), (0, 512, 1)],
    "inside-other": [(0, 512, 1), (512, 1024, 1), (520, 528, 1), (1024, 1408, 0)],
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_overlapping_fragments_drop_the_datagram(rlab, daemons, pop, case):
    tpb = start_tpb(rlab, daemons)
    marker, fence = b"OVLP-" + case.encode(), b"FENCE-" + case.encode()
    inner = Pop.inner(marker)
    whole = bytes(pop.outer(inner))
    assert len(whole) == 1428
    got = Delivered(rlab, marker, fence)
    try:
        pop.send(cut(whole, a, b, bool(mf)) for a, b, mf in OVERLAPS[case])
        got.fence(pop, fence)
        assert got.count(marker) == (0, 0), "overlapping datagram delivered"
    finally:
        got.stop()
    c = tpb.stop()["tunnel"]
    assert c["drop"] == {"reasm_overlap": 1}, c
    assert c["reasm_done"] == 0 and c["decap_packets"] == 1, c  # the fence only


# ---- never completed: the timeout ---------------------------------------------------


def test_incomplete_datagram_times_out(rlab, daemons, pop):
    tpb = start_tpb(rlab, daemons, config="[tunnel]\nreassembly_timeout = 1\n")
    late, quick = b"LATE-ONE", b"QUICK-ONE"
    fences = [b"FENCE-1", b"FENCE-2"]
    got = Delivered(rlab, late, quick, *fences)
    try:
        a = pop.fragments(Pop.inner(late))
        pop.send(a[:2])
        # well inside the timeout: a datagram completes
        b = pop.fragments(Pop.inner(quick))
        pop.send(b[:2])
        time.sleep(0.2)
        pop.send(b[2:])
        got.fence(pop, fences[0])
        assert got.count(quick) == (1, 1)
        # past it: the first one's fragments are gone, the last piece alone
        # completes nothing (and times out in its turn)
        time.sleep(3)
        pop.send(a[2:])
        got.fence(pop, fences[1])
        assert got.count(late) == (0, 0), "completed from expired fragments"
        time.sleep(3)
    finally:
        got.stop()
    c = tpb.stop()["tunnel"]
    assert c["drop"] == {"reasm_timeout": 2}, c
    assert c["reasm_done"] == 1 and c["reasm_fragments"] == 6, c
    assert c["reasm_memory"] == 0, c


# ---- a flood of fragments that never complete: memory stays bounded -----------------
#
# Memory is charged for what is held (reasm.c): a fragment's bytes and the
# heap blocks around them, a fixed few hundred bytes per datagram.  Over the
# bound the oldest datagrams are evicted (reasm_evicted); datagrams whose
# first fragment, the one with the GRE key, has not come are unverified and
# at most UNVERIFIED of them are kept.

MEMORY = 262144
FLOOD = 2000
FLOOD_TIMEOUT = 4
UNVERIFIED = 64  # reasm.c MAX_UNVERIFIED
OVERHEAD = 512  # more than reasm.c charges around one fragment's bytes


def flood_frames(pop: Pop, kind: str) -> list[bytes]:
    """FLOOD fragments of as many 60 KB outer datagrams (IP IDs 1..FLOOD):
    each its first 1480 bytes ("first": GRE header and key right, so each
    one is a verified datagram) or its last 1000 ("last": unverified)."""
    template = bytearray(bytes(pop.outer(Pop.inner(b"FLOOD-", 60000), ident=0))[: 20 + 1480])
    if kind == "first":
        struct.pack_into("!H", template, 2, 1500)
        struct.pack_into("!H", template, 6, 0x2000)  # MF, offset 0
    else:
        template = template[:20] + bytes(1000)
        struct.pack_into("!H", template, 2, 1020)
        struct.pack_into("!H", template, 6, 60000 // 8)  # last: no MF
    out = []
    for ident in range(1, FLOOD + 1):
        struct.pack_into("!H", template, 4, ident)
        struct.pack_into("!H", template, 10, 0)
        struct.pack_into("!H", template, 10, _csum(bytes(template[:20])))
        out.append(pop.frame(bytes(template)))
    return out


@pytest.mark.parametrize("kind", ["first", "last"])
def test_fragment_flood_memory_bounded(rlab, daemons, pop, kind):
    """2000 datagrams that never complete, at a 256 KiB bound: memory stays
    within it, the oldest are evicted, and a real datagram sent right after
    the flood is reassembled (nothing is refused), as is one after the rest
    has timed out.  Every flood datagram ends evicted or timed out."""
    tpb = start_tpb(
        rlab,
        daemons,
        "--reassembly-memory",
        str(MEMORY),
        config=f"[tunnel]\nreassembly_timeout = {FLOOD_TIMEOUT}\n",
    )
    frames = flood_frames(pop, kind)
    during, after = b"DURING-FLOOD", b"AFTER-FLOOD"
    got = Delivered(rlab, during, after, b"FENCE-")
    real = 0
    try:
        t0 = time.monotonic()
        for i, f in enumerate(frames):
            pop.tx.send(f)
            if i % 100 == 99:
                time.sleep(0.002)  # a burst, not more than the kernel's backlog
        sent = time.monotonic() - t0
        pop.send(pop.fragments(Pop.inner(during)))
        real += 1
        got.fence(pop, b"FENCE-0", resend=True)
        assert got.count(during) == (1, 1), "the datagram right after the flood was lost"
        time.sleep(FLOOD_TIMEOUT + 1.5)
        pop.send(pop.fragments(Pop.inner(after)))
        real += 1
        got.fence(pop, b"FENCE-1", resend=True)
        assert got.count(after) == (1, 1), "the datagram after the timeout was lost"
    finally:
        got.stop()
    c = tpb.stop()
    t = c["tunnel"]
    drop = t["drop"]
    taken = t["reasm_fragments"] - 3 * real
    print(
        f"flood of {FLOOD} {kind} fragments in {sent:.2f}s: reasm_memory_peak "
        f"{t['reasm_memory_peak']} (bound {MEMORY}), drops {drop}, "
        f"fragments taken {t['reasm_fragments']}, ring drops {c['out']['kernel_drops']}"
    )
    assert FLOOD // 2 <= taken <= FLOOD, t
    assert set(drop) <= {"reasm_evicted", "reasm_timeout"}, drop
    assert drop.get("reasm_evicted", 0) + drop.get("reasm_timeout", 0) == taken, drop
    assert t["reasm_done"] == real and t["reasm_memory"] == 0, t
    assert t["reasm_memory_peak"] <= MEMORY, t
    if kind == "first":
        # verified datagrams fill the bound, each new one evicting the oldest
        per = 1480 + OVERHEAD
        assert t["reasm_memory_peak"] > MEMORY - per, t
        assert drop["reasm_evicted"] >= taken - MEMORY // 1480, drop
    else:
        # unverified: the newest UNVERIFIED are kept until they time out
        assert drop["reasm_timeout"] == UNVERIFIED, drop
        assert drop["reasm_evicted"] == taken - UNVERIFIED, drop
        assert t["reasm_memory_peak"] <= UNVERIFIED * (1000 + OVERHEAD) + 3 * (512 + OVERHEAD), t


# ---- what one far fragment costs: what it holds ---------------------------------


def far_fragments(pop: Pop, n: int, first_id: int) -> list[bytes]:
    """n outer fragments of 8 bytes at offset 65000, MF set (the issue's
    attack: charged by their reach, each took 64 KiB), IDs from first_id."""
    out = []
    for k in range(n):
        hdr = bytearray(bytes(IP(src=T_POP, dst=T_TPB, proto=47, ttl=64, id=first_id + k))[:20])
        struct.pack_into("!H", hdr, 2, 28)
        struct.pack_into("!H", hdr, 6, 0x2000 | 65000 // 8)
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, _csum(bytes(hdr)))
        out.append(pop.frame(bytes(hdr) + b"FARFRAG!"))
    return out


@pytest.mark.parametrize("n", [UNVERIFIED, 1000])
def test_far_fragments_hold_what_they_carry(rlab, daemons, pop, n):
    """8-byte fragments far out in their datagrams cost what they hold, a
    few hundred bytes, not 64 KiB each: 64 of them no longer fill the
    default 4 MiB, and a real datagram after them is reassembled.  Past 64
    such unverified datagrams the oldest are evicted, each counted."""
    tpb = start_tpb(rlab, daemons)
    marker = b"AFTER-FAR-%d" % n
    got = Delivered(rlab, marker, b"FENCE-FAR")
    try:
        for i, f in enumerate(far_fragments(pop, n, 1)):
            pop.tx.send(f)
            if i % 100 == 99:
                time.sleep(0.002)
        pop.send(pop.fragments(Pop.inner(marker)))
        got.fence(pop, b"FENCE-FAR", resend=True)
        assert got.count(marker) == (1, 1), "the real datagram was refused"
    finally:
        got.stop()
    t = tpb.stop()["tunnel"]
    held = min(n, UNVERIFIED)
    assert t["reasm_done"] == 1 and t["reasm_fragments"] == n + 3, t
    assert t["drop"] == ({"reasm_evicted": n - held} if n > held else {}), t["drop"]
    # what is held at exit: the far fragments' datagrams, each alike
    assert t["reasm_memory"] % held == 0, t
    assert 8 < t["reasm_memory"] // held <= 8 + OVERHEAD, t


# ---- the first fragment's GRE key: checked before anything is kept ----------------


FIRST_KEY_ORDERS = {
    # bad0: the first fragment with the wrong key; the datagram completes
    # from the good first fragment and the others, whatever came before
    "bad-first-then-rest": (["bad0", 1, 2, 0], 1),
    # bad0 after 1 and 2 takes them with it: 0 alone completes nothing
    # until 1 and 2 come again
    "bad-first-after-rest": ([1, 2, "bad0", 0, 1, 2], 1),
}


@pytest.mark.parametrize("case", list(FIRST_KEY_ORDERS))
def test_first_fragment_with_wrong_key_dropped_at_once(rlab, daemons, pop, case):
    tpb = start_tpb(rlab, daemons)
    marker, fence = b"KEY0-" + case.encode(), b"FENCE-" + case.encode()
    inner = Pop.inner(marker)
    ident = pop.next_id()
    frags = [bytes(f) for f in fragment(pop.outer(inner, ident=ident), fragsize=FRAG)]
    wrong = bytes(
        fragment(
            IP(src=T_POP, dst=T_TPB, ttl=64, id=ident)
            / GRE(key_present=1, key=KEY + 1, proto=0x0800)
            / Raw(inner),
            fragsize=FRAG,
        )[0]
    )
    order, delivered = FIRST_KEY_ORDERS[case]
    got = Delivered(rlab, marker, fence)
    try:
        pop.send(wrong if i == "bad0" else frags[i] for i in order)
        got.fence(pop, fence)
        assert got.count(marker) == (delivered, delivered), got.count(marker)
        assert_delivered_intact(rlab, got.frames(marker), inner)
    finally:
        got.stop()
    t = tpb.stop()["tunnel"]
    assert t["drop"] == {"gre_key": 1}, t["drop"]
    # the wrong first fragment never entered reassembly
    assert t["reasm_fragments"] == len(order) - 1 and t["reasm_done"] == 1, t
    assert t["reasm_memory"] == 0, t
