"""The C helper through cffi: the pure functions against Python references,
and NativeBridge's error path and life cycle."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest
from helpers import wait_for
from rawsock import Port, netns

from tpb.errors import TpbError
from tpb.native import PORT_IN, PORT_OUT, NativeBridge, csum_fold, vlan_tag

LAB_SUFFIX = "n"


def ref_csum_fold(data: bytes, seed: int = 0) -> int:
    """RFC 1071: the 16-bit one's complement sum of big-endian words (an odd
    last byte padded with a zero byte), plus the seed, folded, not inverted."""
    if len(data) % 2:
        data += b"\0"
    total = seed + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# -- csum_fold -------------------------------------------------------------


def test_csum_fold_rfc1071_example():
    # RFC 1071 section 3: the sum of these bytes is ddf2 (folded, not inverted)
    assert csum_fold(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2


def test_csum_fold_empty_is_the_folded_seed():
    assert csum_fold(b"") == 0
    assert csum_fold(b"", 0x1234) == 0x1234
    assert csum_fold(b"", 0x1_0000) == 1
    assert csum_fold(b"", 0xFFFF_FFFF) == ref_csum_fold(b"", 0xFFFF_FFFF)


def test_csum_fold_odd_length_pads_with_zero():
    assert csum_fold(b"\xab") == 0xAB00
    assert csum_fold(b"\x12\x34\x56") == 0x1234 + 0x5600


def test_csum_fold_random_against_reference():
    rng = random.Random(1071)
    lengths = [*range(0, 70), 1499, 1500, 1501, 9000, 9001, 65535]
    for n in lengths:
        for _ in range(3):
            data = rng.randbytes(n)
            seed = rng.choice([0, rng.getrandbits(16), rng.getrandbits(32)])
            assert csum_fold(data, seed) == ref_csum_fold(data, seed), (n, seed, data[:32].hex())


def test_csum_fold_carries_many_times():
    # all ones: every addition carries; the sum must still fold to 0xffff
    for n in (2, 3, 1000, 1001, 65535):
        data = b"\xff" * n
        assert csum_fold(data, 0xFFFF_FFFF) == ref_csum_fold(data, 0xFFFF_FFFF)


def test_csum_fold_of_a_valid_ipv4_header_is_all_ones():
    # 192.0.2.1 -> 198.51.100.2, UDP, TTL 64, checksum filled in
    hdr = bytearray.fromhex("45000054abcd40004011" + "0000" + "c0000201c6336402")
    csum = ~ref_csum_fold(bytes(hdr)) & 0xFFFF
    hdr[10:12] = csum.to_bytes(2, "big")
    assert csum_fold(bytes(hdr)) == 0xFFFF


# -- vlan_tag --------------------------------------------------------------


@pytest.mark.parametrize(
    "tpid, tci, wire",
    [
        (0x8100, 100, "81000064"),
        (0x8100, (5 << 13) | (1 << 12) | 100, "8100b064"),  # PCP 5, DEI, VID 100
        (0x8100, 6 << 13, "8100c000"),  # priority tag: VLAN 0, PCP 6
        (0x8100, 0, "81000000"),
        (0x88A8, 200, "88a800c8"),
        (0x88A8, 0xFFFF, "88a8ffff"),
        (0x9100, 4095, "91000fff"),
    ],
)
def test_vlan_tag_bytes(tpid, tci, wire):
    assert vlan_tag(tpid, tci) == bytes.fromhex(wire)
    assert vlan_tag(tpid, tci) == struct.pack("!HH", tpid, tci)


# -- NativeBridge ----------------------------------------------------------

NO_SUCH_IFINDEX = 0x7FFF_FFF0


def _fds_and_maps() -> tuple[int, int]:
    """Open descriptors and mapped rings (socket:[inode] in the maps): not
    every mapping, which malloc may add to (AddressSanitizer's does)."""
    with open("/proc/self/maps") as f:
        rings = sum(1 for line in f if "socket:[" in line)
    return len(os.listdir("/proc/self/fd")), rings


@pytest.mark.netns
@pytest.mark.parametrize(
    "in_idx, out_idx",
    [(NO_SUCH_IFINDEX, NO_SUCH_IFINDEX), (1, NO_SUCH_IFINDEX), (NO_SUCH_IFINDEX, 1)],
    ids=["both", "out-only", "in-only"],
)
def test_native_bridge_nonexistent_ifindex(in_idx, out_idx):
    # ifindex 1 is the loopback of the test's own namespace: the C helper
    # opens the first port, fails on the second, and must undo the first.
    before = _fds_and_maps()
    with pytest.raises(TpbError) as ei:
        NativeBridge(in_idx, out_idx)
    msg = str(ei.value)
    assert msg and "\n" not in msg, repr(msg)
    assert "No such device" in msg, msg
    assert _fds_and_maps() == before, "a failed open leaked descriptors or the ring mapping"


@pytest.mark.netns
def test_native_bridge_life_cycle(lab):
    """Open on the lab's eth2/eth3, run in a thread, forward a frame, read
    the counters while running, stop from another thread, close twice."""
    ns = lab.ns("tpb")
    with netns(ns):  # if_nametoindex asks a socket, so: in the lab's namespace
        idx = {name: socket.if_nametoindex(name) for name in ("eth2", "eth3")}
    with netns(ns):
        br = NativeBridge(idx["eth2"], idx["eth3"], ring_frames=16, batch=8)
    failure: list[BaseException] = []

    def loop():
        try:
            br.run()
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    marker = os.urandom(16)
    frame = bytes.fromhex("02000000001302000000001288b5") + marker + bytes(30)
    try:
        with (
            Port(lab.ns("gw1"), "eth1") as tx,
            Port(lab.ns("gw2"), "eth0", capture=True) as rx,
        ):
            tx.send(frame)
            deadline = time.monotonic() + 5
            seen = None
            while seen is None and time.monotonic() < deadline:
                f = rx.recv(deadline - time.monotonic())
                if f is not None and marker in f.data:
                    seen = f.data
            assert seen == frame
        c = wait_for(
            lambda: (x := br.counters(PORT_IN)).rx_frames >= 1 and x, 5, "in.rx_frames >= 1"
        )
        assert c.kernel_packets >= c.rx_frames
        assert br.counters(PORT_OUT).tx_frames == c.rx_frames
        assert t.is_alive()
    finally:
        br.stop()
        t.join(5)
    assert not t.is_alive(), "run() did not return within 5 s of stop()"
    assert not failure, failure
    cin, cout = br.counters(PORT_IN), br.counters(PORT_OUT)
    assert cin.rx_frames == cout.tx_frames and cout.rx_frames == cin.tx_frames
    assert not any(cin.drops.values()) and not any(cout.drops.values()), (cin, cout)
    br.close()
    br.close()  # idempotent
