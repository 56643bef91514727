"""Keeps TPB's own nftables table in place while it runs (tunnel mode).

The table `tpb_<in>` holds the chain that forwards every frame of --in into
the veth pair TPB reads (tpb/select.py).  Someone else may delete or flush
it — `nft flush ruleset` in a provisioning script, an operator tidying up —
and then --in's frames go nowhere.  TableGuard.check(), called from the
main thread's housekeeping every half second, finds that and loads the
table again with the Selector's own `nft -f` (one transaction, as at
start), logs one line and counts it (tpb_nft_restored_total).

The check must cost next to nothing while nothing changes: it asks the
kernel for the ruleset's generation (NFT_MSG_GETGEN, one netlink round
trip; the number moves with every committed nftables transaction in this
network namespace) and only when that moved does it list the table (`nft
-j list table`, a subprocess) and look at what is there.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from typing import Any

from tpb.errors import TpbError
from tpb.log import log
from tpb.select import PRIORITY, Selector

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15  # the answer
NFT_MSG_GETGEN = 16  # the question
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFTA_GEN_ID = 1
NLMSG_HDR = struct.Struct("=IHHII")
NFGENMSG = struct.Struct("=BBH")
NLA_HDR = struct.Struct("=HH")


class Generation:
    """The nftables ruleset generation of this network namespace, read over
    a netlink socket kept open (no process per check)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(1.0)  # the kernel answers at once; never hang housekeeping
        self._sock.bind((0, 0))
        self._seq = 0

    def read(self) -> int | None:
        """The generation id, or None if the kernel did not say (then the
        caller looks at the table itself)."""
        self._seq += 1
        ask = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        body = NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
        msg = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), ask, NLM_F_REQUEST, self._seq, 0) + body
        try:
            self._sock.send(msg)
            while True:
                data = self._sock.recv(65536)
                gen = self._parse(data, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN)
                if gen is not False:
                    return gen  # type: ignore[return-value]
        except OSError:
            return None

    def _parse(self, data: bytes, kind: int) -> int | None | bool:
        """The id from an answer to our request; False: not ours, read on."""
        off = 0
        while off + NLMSG_HDR.size <= len(data):
            length, mtype, _flags, seq, _pid = NLMSG_HDR.unpack_from(data, off)
            if length < NLMSG_HDR.size:
                return None
            if seq == self._seq:
                if mtype == NLMSG_ERROR:
                    return None
                if mtype == kind:
                    pos = off + NLMSG_HDR.size + NFGENMSG.size
                    end = off + length
                    while pos + NLA_HDR.size <= end:
                        alen, atype = NLA_HDR.unpack_from(data, pos)
                        if alen < NLA_HDR.size:
                            break
                        if atype & 0x3FFF == NFTA_GEN_ID and alen >= 8:
                            return int(struct.unpack_from("!I", data, pos + 4)[0])
                        pos += (alen + 3) & ~3
                    return None
            off += (length + 3) & ~3
        return False

    def close(self) -> None:
        self._sock.close()


def list_table(table: str) -> dict[str, Any] | None:
    """`nft -j list table netdev TABLE` as JSON, or None if there is no such
    table (or nft could not say)."""
    try:
        r = subprocess.run(["nft", "-j", "list", "table", "netdev", table],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode:
        return None
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def problem(doc: dict[str, Any] | None, sel: Selector) -> str | None:
    """What is wrong with the table as listed (None: it is as TPB loaded
    it): the chain on --in's ingress hook at PRIORITY, one rule per match
    expression setting the mark, one accepting untagged IPv4 (for TPB's
    sockets on --in) and the last one forwarding into the veth.
    Only the shape is compared (nft prints expressions its own way): a table
    gone, flushed, a rule or the chain deleted or added all show here."""
    if doc is None:
        return "was deleted"
    items = doc.get("nftables", [])
    chains = [i["chain"] for i in items if "chain" in i]
    rules = [i["rule"] for i in items if "rule" in i]
    select = [c for c in chains if c.get("name") == "select"]
    if not select:
        return "lost its chain"
    c = select[0]
    dev = c.get("dev")  # nft 1.0.6 (Debian 12) leaves a netdev chain's device out
    devs = dev if isinstance(dev, list) else [dev]
    if (c.get("hook") != "ingress" or c.get("prio") != PRIORITY
            or (dev is not None and sel.in_if not in devs)):
        return "had its chain changed"
    if len(chains) != 1 or len(rules) != len(sel.match) + 2:
        return "was flushed or changed" if rules else "was flushed"
    last = json.dumps(rules[-1].get("expr", []))
    if '"fwd"' not in last or f'"{sel.veth_tx}"' not in last:
        return "was changed"
    ipv4 = json.dumps(rules[-2].get("expr", []))
    if ('"accept"' not in ipv4 or '"ether"' not in ipv4 or '"type"' not in ipv4
            or '"ip"' not in ipv4):
        return "was changed"
    for r in rules[:-2]:
        text = json.dumps(r.get("expr", []))
        if '"mangle"' not in text or '"mark"' not in text:
            return "was changed"
    return None


class TableGuard:
    """Finds TPB's table missing or changed and loads it again (see the
    module's doc).  restored counts the times; the metrics export it."""

    def __init__(self, sel: Selector) -> None:
        self.sel = sel
        self.restored = 0
        self._gen = Generation()
        self._seen: int | None = None  # the generation at which the table was last fine
        self._failing: str | None = None  # the last restore failure, logged once

    def check(self) -> None:
        gen = self._gen.read()
        if gen is not None and gen == self._seen:
            return
        why = problem(list_table(self.sel.table), self.sel)
        if why is None:
            self._seen = gen
            return
        self._seen = None  # look again at the next check, whatever comes of this
        try:
            self.sel.load(self.sel.mark, self.sel.match)
        except TpbError as e:
            if str(e) != self._failing:
                log.error("nftables: table netdev %s %s and cannot be loaded again: %s",
                          self.sel.table, why, e)
                self._failing = str(e)
            return
        self._failing = None
        self.restored += 1
        log.warning("nftables: table netdev %s %s by someone else: loaded it again "
                    "(%d time%s)", self.sel.table, why, self.restored,
                    "" if self.restored == 1 else "s")

    def close(self) -> None:
        self._gen.close()

