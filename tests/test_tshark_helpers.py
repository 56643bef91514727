"""The tshark helpers' judgement of TCP resets (helpers.tshark_problems):
an end that resets after every byte it was sent is acknowledged, or that
answers a late segment with a bare reset after it closed, did so of its
own; a reset before that is reported.  Frames wrapped in GRE, as the
tunnel captures that use it hold them."""

import itertools
from pathlib import Path

from helpers import tshark_problems, tshark_resets_early
from scapy.all import GRE, IP, TCP, Ether, Raw, wrpcap

CLIENT, SERVER = ("192.0.2.10", 35918), ("203.0.113.10", 5201)
OPTS = ("-o", "tcp.analyze_sequence_numbers:FALSE")
IP_IDS = itertools.count(1)


def wrapped(src: tuple[str, int], dst: tuple[str, int], flags: str, seq: int, ack: int,
            data: bytes = b"") -> Ether:
    # every packet its own IP ID, as a sender's are
    inner = IP(src=src[0], dst=dst[0], id=next(IP_IDS)) / TCP(
        sport=src[1], dport=dst[1], flags=flags, seq=seq, ack=ack)
    return (Ether() / IP(src="198.51.100.3", dst="198.51.100.34") / GRE() / inner
            / (Raw(data) if data else b""))


def connection(reset_ack: int) -> list[Ether]:
    """A handshake near the top of the sequence space (the raw numbers wrap
    round 2^32 during it), 3000 bytes from the client, the server's ACK of
    all of them, then the server's reset acknowledging reset_ack bytes."""
    c0, s0 = 0xFFFFFC00, 1000
    frames = [wrapped(CLIENT, SERVER, "S", c0, 0),
              wrapped(SERVER, CLIENT, "SA", s0, c0 + 1),
              wrapped(CLIENT, SERVER, "A", c0 + 1, s0 + 1)]
    for k in range(3):
        frames.append(wrapped(CLIENT, SERVER, "PA", (c0 + 1 + 1000 * k) % 2**32, s0 + 1,
                              bytes(1000)))
    frames.append(wrapped(SERVER, CLIENT, "A", s0 + 1, (c0 + 3001) % 2**32))
    frames.append(wrapped(SERVER, CLIENT, "RA", s0 + 1, (c0 + 1 + reset_ack) % 2**32))
    return frames


def test_a_reset_after_everything_was_acknowledged_is_the_ends_own(tmp_path: Path) -> None:
    pcap = tmp_path / "after.pcap"
    wrpcap(str(pcap), connection(3000))
    assert tshark_resets_early(pcap, *OPTS) == []
    assert tshark_problems(pcap, *OPTS) == []


def test_a_reset_before_the_data_was_acknowledged_is_reported(tmp_path: Path) -> None:
    pcap = tmp_path / "before.pcap"
    wrpcap(str(pcap), connection(2000))
    early = tshark_resets_early(pcap, *OPTS)
    assert len(early) == 1 and early[0].startswith("reset before delivery"), early
    assert tshark_problems(pcap, *OPTS) == early


def test_a_bare_reset_after_the_end_reset_is_its_own(tmp_path: Path) -> None:
    """The client's last segment, sent again, arrives after the server
    reset: its kernel answers with a bare reset (RFC 9293, 3.10.7.1)."""
    frames = connection(3000)
    late = frames[-3].copy()
    frames += [late, wrapped(SERVER, CLIENT, "R", 1001, 0)]
    pcap = tmp_path / "bare.pcap"
    wrpcap(str(pcap), frames)
    assert tshark_resets_early(pcap, *OPTS) == []


def test_a_bare_reset_of_a_connection_still_open_is_reported(tmp_path: Path) -> None:
    frames = connection(3000)[:-1] + [wrapped(SERVER, CLIENT, "R", 1001, 0)]
    pcap = tmp_path / "bare-open.pcap"
    wrpcap(str(pcap), frames)
    early = tshark_resets_early(pcap, *OPTS)
    assert len(early) == 1, early
