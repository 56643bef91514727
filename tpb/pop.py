"""`tpb pop`: the far end of many bridges' tunnels.

    tpb pop --local ADDR --peer ADDR[,key=N][,csum][,seq][,keepalive=10s,3][,prefix=CIDR...] ...
            [--tun NAME]

or the same in the TOML file's [pop] table with [[pop.peer]] entries.  GRE
arrives on a raw IPv4 socket (the host reassembles fragments), inner
packets leave through a TUN device that TPB creates, and the host routes
them on; what the host routes back into the TUN device goes to the bridge
behind whose prefix (or learned address) the destination is.  The C helper
does every packet; Python creates the TUN device, adds the prefixes' routes,
reads counters, and reloads peers and prefixes on SIGHUP (Pop, a
service.Daemon).
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import socket
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import fields
from typing import Any

from tpb import config, metrics, status
from tpb.config import ConfigError, Source
from tpb.errors import TpbError
from tpb.log import log, set_level
from tpb.metrics import Closeable
from tpb.pop_config import Peer, PopSettings, settings_from
from tpb.service import Served

TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
# include/uapi/linux/if_tun.h: what the POP's C loop takes from the TUN
# device (csrc/pop_tx.c: vnet_check, split): partial checksums, TCP
# super-packets (TSO, with ECN's CWR), UDP super-packets (USO, Linux >= 6.2)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN


# ---- the checks before the TUN device is made (`tpb pop` and `tpb check`) --


RTN_NAMES = {2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable", 8: "prohibit",
             9: "throw"}


def _route_exists(pfx: str) -> str | None:
    """The route the main table has for exactly this prefix (as `ip route
    show exact` finds it), or None."""
    from pyroute2 import IPRoute  # slow to import: only when needed

    net = ipaddress.ip_network(pfx)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        for r in ipr.get_routes(family=family, table=254):
            dst = r.get_attr("RTA_DST")
            if r["dst_len"] != net.prefixlen or (
                    dst is not None and ipaddress.ip_address(dst) != net.network_address):
                continue
            if (oif := r.get_attr("RTA_OIF")) is not None:
                link = ipr.get_links(oif)
                return f"dev {link[0].get_attr('IFLA_IFNAME') if link else oif}"
            return RTN_NAMES.get(r["type"], "a route")
    return None


def preflight(s: PopSettings, src: Source, counters_file: str | None = None) -> None:
    """Every check `tpb pop` makes before it creates anything: the TUN
    name is free, the tunnel address is this host's, no prefix is routed
    already (TPB would take the route over and lose it at exit), and the
    --counters file can be written.  ConfigError with every problem."""
    from tpb.ports import host_addresses, link_exists
    from tpb.service import counters_file_problem

    problems: list[str] = []
    if link_exists(s.tun):
        problems.append(f"{src.where('pop', 'tun')}: {s.tun}: an interface of this name "
                        "exists already (--tun NAME)")
    if s.local not in host_addresses():
        problems.append(f"{src.where('pop', 'local')}: {s.local} is not an address of this "
                        "host: GRE to it would never arrive here")
    for i, peer in enumerate(s.peers):
        where = src.flags.get(("pop", "peer", str(i))) or src.where("pop", "peer", str(i))
        for pfx in peer.prefixes:
            if (route := _route_exists(pfx)) is not None:
                problems.append(f"{where}: peer {peer.name}: prefix {pfx}: cannot route it "
                                f"into {s.tun}: it is routed already ({route})")
    if (why := counters_file_problem(counters_file)) is not None:
        problems.append(why)
    if problems:
        raise ConfigError(problems)


# ---- the TUN device and its routes -------------------------------------------


class TunRoutes:
    """The prefixes routed into the TUN device.  They go away with the
    device at exit; only a reload removes one by hand."""

    def __init__(self, tun: str) -> None:
        self.tun = tun

    def _route(self, cmd: str, pfx: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.tun)
            if not idx:
                raise TpbError(f"{self.tun}: the TUN device is gone")
            ipr.route(cmd, dst=pfx, oif=idx[0])

    def add(self, pfx: str, peer: str) -> None:
        # `add`, not `replace`: a prefix that is already routed (the POP's
        # own link, say) is a configuration error to show, not a route to
        # take over and lose at exit.
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._route("add", pfx)
        except NetlinkError as e:
            raise TpbError(f"peer {peer}: prefix {pfx}: cannot route it into {self.tun}: "
                           f"{e.args[1] if len(e.args) > 1 else e}") from None

    def remove(self, pfx: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._route("del", pfx)
        except NetlinkError as e:
            raise TpbError(f"prefix {pfx}: cannot remove its route from {self.tun}: "
                           f"{e.args[1] if len(e.args) > 1 else e}") from None


def _prefix_struct(pfx: str) -> tuple[bytes, int]:
    net = ipaddress.ip_network(pfx)
    if net.version == 4:
        return bytes(10) + b"\xff\xff" + net.network_address.packed, net.prefixlen + 96
    return net.network_address.packed, net.prefixlen


def prefix_table(s: PopSettings) -> list[tuple[bytes, int, int]]:
    """(address, length, peer index) of every configured prefix, for C."""
    return [(*_prefix_struct(p), i) for i, peer in enumerate(s.peers) for p in peer.prefixes]


def _routed(s: PopSettings) -> dict[str, str]:
    return {pfx: peer.name for peer in s.peers for pfx in peer.prefixes}


def peer_changes(old: list[Peer], new: list[Peer]) -> list[str]:
    """What a reload does to the peers, one item per peer."""
    before = {p.name: p for p in old}
    after = {p.name: p for p in new}
    out = []
    for addr, p in after.items():
        q = before.get(addr)
        if q is None:
            out.append(f"peer {addr} added")
        elif p != q:
            diffs = [
                f"{f.name} {config.show(getattr(q, f.name))} -> {config.show(getattr(p, f.name))}"
                for f in fields(Peer)
                if getattr(p, f.name) != getattr(q, f.name)
            ]
            out.append(f"peer {addr}: " + ", ".join(diffs))
    out += [f"peer {addr} removed" for addr in before if addr not in after]
    return out


def pop_items(s: PopSettings) -> dict[str, Any]:
    return {f"pop.{k}": getattr(s, k) for k in
            ("local", "tun", "learn_timeout", "metrics_listen", "log_level")}


RESTART_SETTINGS = ("pop.local", "pop.tun")  # the socket and the device are made for them


class Pop(Served[PopSettings]):
    """`tpb pop` as a service.Daemon: the TUN device, its routes and the C
    loop; reload() takes new peers and prefixes without closing either."""

    def __init__(
        self,
        s: PopSettings,
        src: Source | None = None,
        counters_file: str | None = None,
        load: Callable[[], tuple[PopSettings, Source]] | None = None,
    ) -> None:
        from tpb.service import StateLog

        super().__init__(s, src, counters_file, load)
        self._tun: Any = None
        self.routes = TunRoutes(s.tun)
        self._states = StateLog("peer", self._retries)

    def _retries(self, addr: str) -> int | None:
        peer = next((p for p in self.s.peers if p.name == addr), None)
        return peer.keepalive.retries if peer and peer.keepalive else None

    # -- life cycle ------------------------------------------------------------

    def _open(self) -> None:
        from tpb.native import NativePop
        from tpb.ports import require_privileges
        from tpb.service import serve_status

        s = self.s
        require_privileges()
        preflight(s, self.src, self.counters_file)
        try:
            from pytun import IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunTapDevice
        except ImportError:
            raise TpbError("python-pytun is not installed") from None
        try:
            # A vnet header on every packet: what the host's GRO merged goes
            # back to the kernel as a super-packet (pop.c: tun_write).
            self._tun = TunTapDevice(name=s.tun, flags=IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        except Exception as e:  # pytun raises its own Error for every failure
            raise TpbError(f"cannot create TUN device {s.tun}: {e}") from None
        # A non-persistent TUN device goes away with its fd, routes and all.
        self._stack.callback(self._tun.close)
        # Checksum, TSO and USO offloads: the host hands over a flow toward
        # a bridge as super-packets of up to 64 KB, which the C loop cuts
        # into tunnel packets (csrc/pop_tx.c), one read for ~45 packets.  A
        # partial checksum reaches the C loop, which completes it as RFC
        # 1071 computes it: Linux's own completion writes a TCP checksum of
        # zero as 0xffff, which decoders flag.  A kernel before 6.2 refuses
        # USO (EINVAL): then TSO alone, and the C loop writes no UDP
        # super-packet either (its vnet header would be refused).
        uso = True
        try:
            fcntl.ioctl(self._tun.fileno(), TUNSETOFFLOAD,
                        TUN_OFFLOADS | TUN_F_USO4 | TUN_F_USO6)
        except OSError:
            fcntl.ioctl(self._tun.fileno(), TUNSETOFFLOAD, TUN_OFFLOADS)
            uso = False
        self._tun.up()
        for pfx, peer in _routed(s).items():
            self.routes.add(pfx, peer)
        self.native = NativePop(s, self._tun.fileno(), self._tun.mtu, prefix_table(s), uso)
        self._stack.callback(self.native.close)
        log.debug("TUN device %s up (MTU %d), %d prefix(es) routed into it", s.tun,
                  self._tun.mtu, len(_routed(s)))
        self._metrics = self._serve_metrics(s.metrics_listen)
        self._status = serve_status("pop", s.tun, lambda: status.pop_snapshot(self.native, self.s))

    def _serve_metrics(self, listen: tuple[str, int] | None) -> Closeable | None:
        from tpb.service import serve_metrics

        return serve_metrics(listen, lambda: metrics.PopCollector(self.native, self.reload_state))

    # -- service.Daemon ----------------------------------------------------------

    def status(self) -> str:
        return f"pop {self.s.local} on {self.s.tun} for {len(self.s.peers)} bridge(s)"

    def ready(self) -> str:
        return self.status() + " (ctrl-c to stop)"

    def tick(self) -> None:
        self._states.update(self.native.peer_states())

    def finish(self) -> None:
        self._close_servers()
        counters = self.native.counters()
        self.native.close()
        try:
            print(summary(counters), flush=True)
        except OSError:
            pass  # stdout gone: the --counters file may still be written
        if self.counters_file:
            from tpb.service import write_counters

            write_counters(self.counters_file, counters)

    # -- reload -------------------------------------------------------------------

    def reload(self) -> list[str]:
        """Peers and prefixes read again (same file, same flags) and applied
        without closing the socket or the TUN device: new prefixes are routed
        into the device first, then C takes the new table, then the routes of
        prefixes that went away are removed — so no packet for a prefix
        finds the device without its route, nor C without its peer.  Any
        refusal (ConfigError) leaves everything as it was."""
        assert self._load is not None
        new, src = self._load()
        old_items, new_items = pop_items(self.s), pop_items(new)
        problems = [
            f"{src.where(*key.split('.'))}: {key} cannot change on reload "
            f"({config.show(old_items[key])} -> {config.show(new_items[key])}): restart tpb pop"
            for key in RESTART_SETTINGS
            if old_items[key] != new_items[key]
        ]
        if problems:
            raise ConfigError(problems)
        changed = config.changes(old_items, new_items) + peer_changes(self.s.peers, new.peers)
        if not changed:
            return []
        old_routes, new_routes = _routed(self.s), _routed(new)
        to_c = new.peers != self.s.peers or new.learn_timeout != self.s.learn_timeout
        with ExitStack() as undo:
            if new.metrics_listen != self.s.metrics_listen:
                srv = self._serve_metrics(new.metrics_listen)
                if srv is not None:
                    undo.callback(srv.close)
            else:
                srv = self._metrics
            for pfx, peer in new_routes.items():
                if pfx not in old_routes:
                    self.routes.add(pfx, peer)
                    undo.callback(self._unroute, pfx)
            if to_c:
                try:
                    self.native.reconfigure(new, prefix_table(new))
                except TpbError as e:
                    raise TpbError(f"the POP's loop refused the new peers: {e}") from None
            undo.pop_all()
        for pfx in old_routes:
            if pfx not in new_routes:
                self._unroute(pfx)
        if new.metrics_listen != self.s.metrics_listen and self._metrics is not None:
            self._metrics.close()
        self._metrics = srv
        set_level(new.log_level)
        self.s, self.src = new, src
        return changed

    def _unroute(self, pfx: str) -> None:
        try:
            self.routes.remove(pfx)
        except TpbError as e:
            log.warning("%s", e)


def main(args: argparse.Namespace) -> int:
    """`tpb pop` until a signal: exit status 0, or TpbError (2) before
    forwarding started, RuntimeFailure (1) after."""
    from tpb.service import serve

    s, src = settings_from(args)
    set_level(s.log_level)
    with Pop(s, src, args.counters, lambda: settings_from(args)) as pop:
        return serve(pop)


def summary(counters: dict[str, Any]) -> str:
    parts = []
    for name, c in counters["peers"].items():
        drops = " ".join(f"{k}={v}" for k, v in c["drop"].items()) or "none"
        parts.append(
            f"{name}: in {c['decap_packets']} packets, out {c['encap_packets']} "
            f"packets, drops {drops}"
        )
    other = " ".join(f"{k}={v}" for k, v in counters["other"]["drop"].items()) or "none"
    parts.append(f"no peer: drops {other}")
    return "tpb: " + "; ".join(parts)
