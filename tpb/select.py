"""Flow selection by nftables, and the paths --in's frames take in tunnel mode.

A packet socket bound to ETH_P_ALL sees a frame *before* the netdev ingress
hook (mark still 0); one bound to a protocol sees it after, but without its
VLAN tag.  So in tunnel mode TPB installs one netdev table of its own whose
ingress chain on --in runs last (priority 500) and sets the selection mark
where `match` rules are given.  Then:

1. an untagged IPv4 frame (`ether type ip`: nftables puts a tag the
   kernel took out of the frame back in front of the EtherType it reads)
   is accepted, and the C helper's sockets on --in bound to ETH_P_IP take
   it, its mark set;
2. every other frame — tagged, whose tag an ETH_P_IP socket would not
   see, or not IPv4 — is forwarded (`fwd`) into a veth pair, whose far end
   the C helper reads with sockets bound to ETH_P_ALL.

A flow never changes ways: a way chosen by frame length would let a short
frame overtake a super-packet of its flow still crossing the veth.

Every frame is seen once, after the operator's own chains, with its mark
and its VLAN tag; each way is split by a cBPF filter on the mark.  The
first way spares the bulk of the frames the veth pair's transmit and
receive (README, "Selecting flows", has the figures).

The table is loaded atomically (`nft -f`) and removed on exit and on
failure; the veth pair likewise.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass

from tpb.errors import TpbError
from tpb.log import log
from tpb.ports import IFF_UP

PRIORITY = 500  # after the operator's chains (use priority < 500)
VETH_MTU = 65535  # never the narrow point: jumbo frames and GSO pass


def table_name(in_if: str) -> str:
    return "tpb_" + re.sub(r"[^A-Za-z0-9_]", "_", in_if)


def ruleset(table: str, in_if: str, veth: str, mark: int, match: list[str]) -> str:
    """The nft script; each match expression on a line of its own, so an
    error can be traced back to it (line 6 + index)."""
    lines = [
        f"table netdev {table}",
        f"delete table netdev {table}",
        f"table netdev {table} {{",
        "  chain select {",
        f'    type filter hook ingress device "{in_if}" priority {PRIORITY}; policy accept;',
    ]
    lines += [f"    {expr} meta mark set {mark}" for expr in match]
    lines += ["    ether type ip accept", f'    fwd to "{veth}"', "  }", "}"]
    return "\n".join(lines) + "\n"


MATCH_FIRST_LINE = 6


def _nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        if script is None:
            return subprocess.run(["nft", *args], capture_output=True, text=True)
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(script)
            f.flush()
            return subprocess.run(["nft", *args, "-f", f.name], capture_output=True, text=True)
    except FileNotFoundError:
        raise TpbError("nft not found: install the nftables package") from None


def _nft_error(stderr: str, match: list[str]) -> str:
    """nft's own first error line, with the match expression it is about."""
    for line in stderr.splitlines():
        m = re.match(r"\S+?:(\d+):[\d\-:]+: (Error: .*)", line)
        if m:
            idx = int(m.group(1)) - MATCH_FIRST_LINE
            if 0 <= idx < len(match):
                return f'select.match "{match[idx]}": {m.group(2)}'
            return f"nftables: {m.group(2)}"
    return "nftables: " + (stderr.strip().splitlines() or ["failed"])[0]


def _check(script: str, match: list[str]) -> None:
    r = _nft(["-c"], script)
    if r.returncode:
        raise TpbError(_nft_error(r.stderr, match))


def check_rules(in_if: str, mark: int, match: list[str]) -> None:
    """What a Selector on `in_if` would load, checked with `nft -c` only
    (`tpb check`): TpbError with nft's own error.  The veth the chain
    forwards into does not exist yet, and nft resolves a `fwd` device by
    name, so the check forwards to `in_if` itself: the same script in
    every other respect."""
    _check(ruleset(table_name(in_if), in_if, in_if, mark, match), match)


IFF_NOARP = 0x80


def _netlink_error(e: Exception) -> str:
    # pyroute2's NetlinkError is (errno, message); say it as ip(8) would
    return getattr(e, "args", [None, None])[1] or str(e)


def _sysctl_write(key: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
            f.write(value)
    except OSError:
        pass  # no IPv6 in this kernel: nothing to silence


@dataclass
class Selector:
    in_if: str
    in_ifindex: int
    mark: int
    match: list[str]

    def __post_init__(self) -> None:
        self.table = table_name(self.in_if)
        self.veth_tx = f"tpbsel{self.in_ifindex}a"  # nftables sends into this end
        self.veth_rx = f"tpbsel{self.in_ifindex}b"  # TPB's rings read this end
        self.active = False
        self.sel_ifindex = 0

    def start(self) -> int:
        """Create the veth pair and load the table; returns the ifindex TPB
        reads --in's frames from."""
        self.stop()  # leftovers of a killed TPB
        self.active = True
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> int:
        from pyroute2 import IPRoute  # slow to import: only when needed
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=self.veth_tx, mtu=VETH_MTU, kind="veth",
                         peer={"ifname": self.veth_rx, "mtu": VETH_MTU})
            except NetlinkError as e:
                raise TpbError(f"cannot create veth {self.veth_tx}: "
                               f"{_netlink_error(e)}") from None
            # The pair must never speak itself: no IPv6 (router solicitations,
            # MLD), no ARP. Whatever enters it is --in's traffic only.
            for dev in (self.veth_tx, self.veth_rx):
                _sysctl_write(f"net.ipv6.conf.{dev}.disable_ipv6", "1")
                idx = ipr.link_lookup(ifname=dev)[0]
                ipr.link("set", index=idx, flags=IFF_UP | IFF_NOARP,
                         change=IFF_UP | IFF_NOARP)
            self.sel_ifindex = ipr.link_lookup(ifname=self.veth_rx)[0]
        self.check(self.mark, self.match)
        self.load(self.mark, self.match)
        return self.sel_ifindex

    def check(self, mark: int, match: list[str]) -> None:
        """`nft -c` of the table for this mark and these rules: TpbError
        with nft's own error, nothing loaded."""
        _check(ruleset(self.table, self.in_if, self.veth_tx, mark, match), match)

    def load(self, mark: int, match: list[str]) -> None:
        """Loads the table for this mark and these rules, replacing the one
        in place in the same `nft -f` transaction (ruleset() deletes and
        recreates it in one script): the kernel commits it at once, so the
        chain that forwards --in's frames into the veth is never missing
        and no frame escapes selection, also on a reload."""
        r = _nft([], ruleset(self.table, self.in_if, self.veth_tx, mark, match))
        if r.returncode:
            raise TpbError(_nft_error(r.stderr, match))
        self.mark, self.match = mark, list(match)
        log.debug("nftables: table netdev %s loaded (%d match rule(s), mark %d)",
                  self.table, len(match), mark)

    def stop(self) -> None:
        """Remove the table and the veth pair (quietly: they may be gone)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        _nft(["delete", "table", "netdev", self.table])
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.veth_tx):
                try:
                    ipr.link("del", index=idx)  # its peer goes with it
                except NetlinkError:
                    pass  # gone meanwhile
        self.active = False
