"""Configuration: `tpb check`, `tpb run` and `tpb pop` with TOML files and
flags.  Every problem is one line `tpb: WHERE: what`, WHERE being
`file:line` or the flag; all problems at once; exit status 2; never a
traceback.  A flag wins over the file (checked on the wire in the lab).

Only the last test needs the lab (root, namespaces); the others run the
CLI as any user: a configuration is refused before privileges or
interfaces are looked at, and `tpb check --offline` checks the settings
alone (tests/test_service.py checks the host checks, in the lab).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TpbDaemon
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from tunnel_util import (
    GW1_MAC,
    GW2_MAC,
    Wire,
    exclusive_lab,
    lab_unavailable,
    marker,
    parse_gre,
    remove_tpb_leftovers,
    tpb_argv,
    tpb_leftovers,
)

from tpb import lab as labmod

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "appliance" / "tpb.toml"
LAB_PREFIX = "tpbcfg"
NO_IF = ("--in", "tpbcfg-none0", "--out", "tpbcfg-none1")  # exist nowhere


def tpb(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(res: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines; each must be one `tpb: ...` problem."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert all(ln.startswith("tpb: ") for ln in lines), lines
    return lines


GOOD = """\
[ports]
in = "eth2"
out = "eth3"

[tunnel]
local = "198.51.100.3"
remote = "198.51.100.34"
key = 7
csum = true
seq = false
ttl = "inherit"
tos = 0
df = "set"

[select]
match = ["ip daddr 203.0.113.0/24", "tcp dport { 80, 443 }"]

[bridge]
batch = 32
"""

BAD = """\
[ports]
in = "eth2"
out = "eth3"

[tunnel]
local = "198.51.100.3"
remote = "198.51.100.34"
key = "seven"
ttl = 0
colour = "blue"

[select]
match = "ip daddr 203.0.113.10"

[bogus]
x = 1
"""
# (line, words the problem must contain)
BAD_PROBLEMS = [
    (8, "tunnel.key"),
    (9, "tunnel.ttl"),
    (10, "unknown setting tunnel.colour"),
    (13, "select.match"),
    (15, "unknown section [bogus]"),
]


@pytest.mark.parametrize("path", ["good", "shipped"])
def test_check_valid(tmp_path, path):
    f = write(tmp_path, "good.toml", GOOD) if path == "good" else SHIPPED
    res = tpb("check", "--offline", "--config", str(f))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{f}: ok" and res.stderr == ""


def _assert_bad_problems(res, f: Path) -> None:
    lines = problems(res)
    assert res.returncode == 2
    assert len(lines) == len(BAD_PROBLEMS), lines
    for (line, words), got in zip(BAD_PROBLEMS, lines, strict=True):
        assert got.startswith(f"tpb: {f}:{line}: "), (line, got)
        assert words in got, (words, got)


def test_check_reports_every_problem_with_its_line(tmp_path):
    f = write(tmp_path, "bad.toml", BAD)
    res = tpb("check", "--config", str(f))
    _assert_bad_problems(res, f)
    assert res.stdout == ""


def test_run_refuses_the_invalid_file_the_same_way(tmp_path):
    f = write(tmp_path, "bad.toml", BAD)
    res = tpb("run", "--config", str(f))
    _assert_bad_problems(res, f)
    assert "bridging" not in res.stderr


@pytest.mark.parametrize("cmd", ["check", "run"])
def test_toml_syntax_error_has_its_line(tmp_path, cmd):
    f = write(tmp_path, "syntax.toml", '[ports]\nin = "eth2"\n\nout = = "eth3"\n')
    res = tpb(cmd, "--config", str(f))
    lines = problems(res)
    assert res.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"tpb: {f}:4: "), lines


def test_missing_file(tmp_path):
    f = tmp_path / "absent.toml"
    res = tpb("check", "--config", str(f))
    assert res.returncode == 2
    assert problems(res) == [f"tpb: {f}: no such file"]


def test_tunnel_problems_in_the_file(tmp_path):
    f = write(
        tmp_path,
        "t.toml",
        '[ports]\nin = "eth2"\nout = "eth3"\n[tunnel]\nlocal = "198.51.100.3"\n'
        "[select]\nmark = 0\n",
    )
    res = tpb("check", "--config", str(f))
    lines = problems(res)
    assert res.returncode == 2
    assert lines == [
        f"tpb: {f}:7: select.mark must be from 1 to 4294967295, not 0",
        f"tpb: {f}:4: tunnel needs tunnel.remote",
    ], lines


def test_flag_problems_name_the_flag():
    res = tpb(
        "run",
        *NO_IF,
        "--local",
        "198.51.100.3",
        "--remote",
        "198.51.100.3",
        "--ttl",
        "0",
    )
    lines = problems(res)
    assert res.returncode == 2
    assert sorted(lines) == sorted(
        [
            'tpb: --ttl: tunnel.ttl must be "inherit" or a number from 1 to 255',
            "tpb: --remote: tunnel.remote equals tunnel.local",
        ]
    ), lines


def test_workers_and_priority_ranges_name_the_flag():
    res = tpb("run", *NO_IF, "--workers", "0", "--priority", "100")
    lines = problems(res)
    assert res.returncode == 2
    assert sorted(lines) == sorted(
        [
            "tpb: --priority: bridge.priority must be from 0 to 99, not 100",
            "tpb: --workers: bridge.workers must be from 1 to 64, not 0",
        ]
    ), lines


def test_workers_are_for_plain_bridging_only():
    res = tpb("run", *NO_IF, "--workers", "2", "--local", "198.51.100.3",
              "--remote", "198.51.100.34")
    lines = problems(res)
    assert res.returncode == 2
    assert lines == [
        "tpb: --workers: bridge.workers 2: more than one worker is for plain bridging "
        "only (no tunnel)"
    ], lines


def test_mark_and_match_flags_exclude_each_other():
    res = tpb("run", *NO_IF, "--mark", "47", "--match", "ip daddr 203.0.113.10")
    lines = problems(res)
    assert res.returncode == 2
    assert len(lines) == 1 and "--match" in lines[0] and "--mark" in lines[0], lines


def test_mark_and_match_in_one_file_refused(tmp_path):
    f = write(
        tmp_path,
        "both.toml",
        '[ports]\nin = "eth2"\nout = "eth3"\n[tunnel]\nlocal = "198.51.100.3"\n'
        'remote = "198.51.100.34"\n[select]\nmark = 47\nmatch = ["udp dport 5000"]\n',
    )
    res = tpb("check", "--config", str(f))
    lines = problems(res)
    assert res.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"tpb: {f}:9: "), lines
    assert "exclude each other" in lines[0]


@pytest.mark.parametrize(
    "flag",
    [("--match", "ip daddr 203.0.113.10"), ("--mark", "99")],
    ids=["match-over-files-mark", "mark-over-files-match"],
)
def test_selection_flag_wins_over_the_file(tmp_path, flag):
    """A flag wins over the file: `tpb run --match EXPR` with a file that
    selects by mark (as the shipped appliance/tpb.toml does, `mark = 47`)
    must select by EXPR, not refuse the combination.  The run then fails
    only because the (nonexistent) interfaces are looked up: exit status 3,
    the host not ready, nothing wrong in the settings."""
    text = SHIPPED.read_text()
    if flag[0] == "--mark":
        text = text.replace("\nmark = 47", '\nmatch = ["udp dport 5000"]', 1)
    f = write(tmp_path, "tpb.toml", text)
    res = tpb("run", "--config", str(f), *NO_IF, *flag)
    lines = problems(res)
    assert res.returncode == 3, lines
    assert all("no such interface" in ln for ln in lines), lines


def test_dotted_key_problem_has_its_own_line(tmp_path):
    """TOML dotted keys (`bogus.x = 3` inside [tunnel]) are valid syntax;
    the unknown setting is on line 8, not on the [tunnel] header's line 5."""
    f = write(
        tmp_path,
        "dotted.toml",
        '[ports]\nin = "eth2"\nout = "eth3"\n\n[tunnel]\nlocal = "198.51.100.3"\n'
        'remote = "198.51.100.34"\nbogus.x = 3\n',
    )
    res = tpb("check", "--config", str(f))
    lines = problems(res)
    assert res.returncode == 2
    assert lines == [f"tpb: {f}:8: unknown setting tunnel.bogus"], lines


# -- tpb pop -------------------------------------------------------------------

POP_LOCAL = ("--local", "198.51.100.34")


@pytest.mark.parametrize(
    "peers, want",
    [
        (
            ["198.51.100.3", "198.51.100.3"],
            ["tpb: --peer 198.51.100.3: peer 198.51.100.3 is given twice"],
        ),
        (
            ["198.51.100.3,prefix=192.0.2.1/26"],
            ["tpb: --peer 198.51.100.3,prefix=192.0.2.1/26: peer prefixes not a prefix"],
        ),
        (
            ["198.51.100.3,prefix=192.0.2.0/33"],
            ["tpb: --peer 198.51.100.3,prefix=192.0.2.0/33: peer prefixes not a prefix"],
        ),
        (
            ["198.51.100.3,prefix=192.0.2.0/26", "198.51.100.4,prefix=192.0.2.0/26"],
            [
                "tpb: --peer 198.51.100.4,prefix=192.0.2.0/26: prefix 192.0.2.0/26 "
                "is already behind peer 198.51.100.3"
            ],
        ),
        (["198.51.100.3,bogus=1"], ["tpb: --peer 198.51.100.3,bogus=1: unknown peer option"]),
        (["198.51.100.3,key=x"], ["tpb: --peer 198.51.100.3,key=x: peer key must be"]),
        (["not-an-address"], ["tpb: --peer not-an-address: peer address not an IPv4 address"]),
        (["any,key=7"], ["tpb: --peer any,key=7: a peer behind NAT (address any) needs udp "
                         "and a key"]),
        (["any,udp"], ["tpb: --peer any,udp: a peer behind NAT (address any) needs udp and a key"]),
        (["any,udp,key=7,keepalive=1s,3"], ["tpb: --peer any,udp,key=7,keepalive=1s,3: a peer "
                                            "behind NAT (address any) takes no keepalive"]),
        (["any,udp,key=7", "any,udp,key=7,csum"],
         ["tpb: --peer any,udp,key=7,csum: peer any/key=7 is given twice"]),
        (["198.51.100.3,encap=ip"], ["tpb: --peer 198.51.100.3,encap=ip: unknown peer option"]),
    ],
    ids=[
        "duplicate-peer",
        "host-bits",
        "bad-length",
        "prefix-twice",
        "bad-option",
        "bad-key",
        "bad-addr",
        "nat-without-udp",
        "nat-without-key",
        "nat-with-pop-keepalive",
        "nat-key-twice",
        "bad-encap",
    ],
)
def test_pop_flag_errors_one_line_each(peers, want):
    argv = ["pop", *POP_LOCAL]
    for p in peers:
        argv += ["--peer", p]
    res = tpb(*argv)
    lines = problems(res)
    assert res.returncode == 2
    assert len(lines) == len(want), lines
    for w, got in zip(want, lines, strict=True):
        assert got.startswith(w), (w, got)


POP_FILE = """\
[pop]
local = "198.51.100.34"

[[pop.peer]]
address = "198.51.100.3"
prefixes = ["192.0.2.0/26"]

[[pop.peer]]
address = "198.51.100.3"
prefixes = ["192.0.2.64/26", "192.0.2.1/26"]
"""


def test_pop_file_errors_with_lines(tmp_path):
    f = write(tmp_path, "pop.toml", POP_FILE)
    res = tpb("pop", "--config", str(f))
    lines = problems(res)
    assert res.returncode == 2
    assert sorted(lines) == sorted(
        [
            f"tpb: {f}:10: peer prefixes not a prefix: '192.0.2.1/26' "
            "(192.0.2.1/26 has host bits set)",
            f"tpb: {f}:8: peer 198.51.100.3 is given twice",
        ]
    ), lines


def test_check_validates_a_pop_file(tmp_path):
    good = write(
        tmp_path,
        "popok.toml",
        POP_FILE.replace(', "192.0.2.1/26"', "").replace(
            'address = "198.51.100.3"\nprefixes = ["192.0.2.64/26"]',
            'address = "198.51.100.19"\nprefixes = ["192.0.2.64/26"]',
        ),
    )
    res = tpb("check", "--offline", "--config", str(good))
    assert res.returncode == 0 and res.stdout.strip() == f"{good}: ok", res.stderr
    bad = write(tmp_path, "pop.toml", POP_FILE)
    res = tpb("check", "--config", str(bad))
    assert res.returncode == 2
    assert sorted(problems(res)) == sorted(
        [
            f"tpb: {bad}:10: peer prefixes not a prefix: '192.0.2.1/26' "
            "(192.0.2.1/26 has host bits set)",
            f"tpb: {bad}:8: peer 198.51.100.3 is given twice",
        ]
    ), res.stderr


def test_pop_needs_local_and_a_peer():
    res = tpb("pop", "--config", "/dev/null")
    lines = problems(res)
    assert res.returncode == 2
    assert len(lines) == 1 and "--local" in lines[0], lines


# -- a flag wins over the file, on the wire ------------------------------------


@pytest.fixture(scope="module")
def clab():
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with exclusive_lab(labmod.tunnel, LAB_PREFIX) as lb:
        yield lb


FILE_FOR_FLAGS = """\
[ports]
in = "eth2"
out = "eth3"

[tunnel]
local = "198.51.100.3"
remote = "198.51.100.34"
key = 1
ttl = 10

[select]
match = ["udp dport 9"]
"""


@pytest.mark.netns
def test_flags_win_over_the_file_on_the_wire(clab, tmp_path):
    """File: key 1, TTL 10, match udp dport 9.  Flags: --key 2 --ttl 20
    --match 'ip daddr 203.0.113.10'.  On the wire: key 2, TTL 20, only the
    flag's flow tunneled; the file's ports and addresses still used."""
    f = write(tmp_path, "tpb.toml", FILE_FOR_FLAGS)
    counters = tmp_path / "c.json"
    argv = tpb_argv(
        "run",
        "--config",
        str(f),
        "--key",
        "2",
        "--ttl",
        "20",
        "--match",
        f"ip daddr {labmod.T_SERVER}",
        "--counters",
        str(counters),
    )
    p = TpbDaemon(clab, "tpb", argv, "tpb: bridging", counters)
    try:
        with (
            Wire(clab, "gw1", "eth1", outgoing=False) as w1,
            Wire(clab, "gw2", "eth0", outgoing=False) as w2,
        ):
            p.start()
            by_flag, by_file = marker("flag"), marker("file")
            for m, dst, dport in ((by_flag, labmod.T_SERVER, 5000), (by_file, "203.0.113.99", 9)):
                w1.send(
                    bytes(
                        Ether(src=GW1_MAC, dst=GW2_MAC)
                        / IP(src=labmod.T_PC, dst=dst, ttl=63)
                        / UDP(sport=40000, dport=dport)
                        / Raw(m + bytes(32))
                    )
                )
            got_flag = w2.until(lambda fr: by_flag in fr.data, 5.0, "the flag's flow")
            got_file = w2.until(lambda fr: by_file in fr.data, 5.0, "the file's flow")
        c = p.stop()
    finally:
        p.kill()
        left = tpb_leftovers(clab)
        remove_tpb_leftovers(clab)
    assert not left, left
    g = parse_gre(got_flag.data)
    assert g is not None, "the flag's flow was not tunneled"
    assert (g.key, g.outer[8], g.src, g.dst) == (2, 20, labmod.T_TPB, labmod.T_POP)
    assert parse_gre(got_file.data) is None, "the file's match was used"
    assert c["tunnel"]["encap_packets"] == 1


@pytest.mark.parametrize(
    "extra, want",
    [({"encap": "udp"}, "20s,3"), ({"encap": "udp", "keepalive": "off"}, None),
     ({"encap": "udp", "keepalive": "5s,2"}, "5s,2"), ({}, None)],
    ids=["udp-default", "udp-off", "udp-given", "gre-default"],
)
def test_gre_in_udp_keepalives_on_by_default(extra, want):
    """With encap = "udp" keepalives keep the NAT's mapping open: on (20 s,
    under Linux conntrack's 30 s for an unanswered UDP flow) unless set."""
    from tpb import config

    data = {"ports": {"in": "a", "out": "b"},
            "tunnel": {"local": "198.51.100.3", "remote": "198.51.100.34", **extra}}
    s = config.build_settings(data, config.Source())
    assert s.tunnel is not None
    assert (str(s.tunnel.keepalive) if s.tunnel.keepalive else None) == want
    assert s.tunnel.encap == extra.get("encap", "gre")


def test_backend_must_be_packet_or_afxdp():
    res = tpb("run", *NO_IF, "--backend", "dpdk")
    assert res.returncode == 2
    assert problems(res) == [
        "tpb: --backend: bridge.backend must be one of packet, afxdp"
    ], res.stderr


def test_backend_afxdp_is_for_one_plain_worker():
    res = tpb("run", *NO_IF, "--backend", "afxdp", "--local", "198.51.100.3",
              "--remote", "198.51.100.34")
    assert res.returncode == 2
    assert problems(res) == [
        "tpb: --backend: bridge.backend afxdp is for plain bridging only (no tunnel): "
        "selection by nftables mark needs backend packet"
    ], res.stderr
    res = tpb("run", *NO_IF, "--backend", "afxdp", "--workers", "2")
    assert res.returncode == 2
    assert problems(res) == [
        "tpb: --workers: bridge.workers 2: backend afxdp runs one worker (one queue per port)"
    ], res.stderr


def test_busy_poll_needs_backend_afxdp(tmp_path):
    f = write(tmp_path, "bp.toml", '[ports]\nin = "a"\nout = "b"\n[bridge]\nbusy_poll = 50\n')
    res = tpb("run", "--config", str(f))
    assert res.returncode == 2
    lines = problems(res)
    assert len(lines) == 1 and "bridge.busy_poll is for backend afxdp only" in lines[0], lines


@pytest.mark.parametrize(
    "mac, want",
    [("01:00:5e:00:00:01", "not a unicast MAC address: 01:00:5e:00:00:01"),
     ("00:00:00:00:00:00", "not a unicast MAC address: 00:00:00:00:00:00"),
     ("02:00:00:00:00", "not a MAC address (aa:bb:cc:dd:ee:ff): '02:00:00:00:00'")],
    ids=["multicast", "zero", "short"],
)
def test_router_mac_must_be_a_unicast_mac(mac, want):
    res = tpb("run", *NO_IF, "--local", "198.51.100.3", "--remote", "198.51.100.34",
              "--router-mac", mac)
    assert res.returncode == 2
    assert problems(res) == [f"tpb: --router-mac: tunnel.router_mac {want}"], res.stderr


def test_router_mac_is_taken_in_any_spelling():
    from tpb import config

    data = {"ports": {"in": "a", "out": "b"},
            "tunnel": {"local": "198.51.100.3", "remote": "198.51.100.34",
                       "router_mac": "02-AB-00-00-00-42"}}
    s = config.build_settings(data, config.Source())
    assert s.tunnel is not None and s.tunnel.router_mac == "02:ab:00:00:00:42"


@pytest.mark.parametrize("bridge, want", [({}, True), ({"shed": False}, False),
                                          ({"shed": True}, True)],
                         ids=["default", "off", "on"])
def test_overload_shedding_is_on_unless_turned_off(bridge, want):
    from tpb import config

    data = {"ports": {"in": "a", "out": "b"}, "bridge": bridge}
    assert config.build_settings(data, config.Source()).shed is want


def test_shed_must_be_a_boolean(tmp_path):
    f = write(tmp_path, "shed.toml", '[ports]\nin = "a"\nout = "b"\n[bridge]\nshed = "yes"\n')
    res = tpb("run", "--config", str(f))
    assert res.returncode == 2
    lines = problems(res)
    assert len(lines) == 1 and "bridge.shed" in lines[0] and "Traceback" not in res.stderr, lines
