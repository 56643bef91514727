"""Stand-in for `tpb run` / `tpb pop` serving metrics and status, until the
service module calls metrics.serve() and status.serve() itself (then the
tests run the real daemons and this file goes).

    ops_driver.py run LISTEN_ADDR PORT [LOCAL REMOTE[,REMOTE...]]
        a NativeBridge on eth2 <-> eth3 of the namespace it runs in: plain,
        or tunnelling 203.0.113.0/24 with key 7 and keepalives
    ops_driver.py pop LISTEN_ADDR PORT LOCAL TUN PEER [PEER...]
        a NativePop on a new TUN device; PEER as `tpb pop --peer` takes it

Serves both as the service will, prints "ready" on stderr, and stops
cleanly on SIGTERM/SIGINT: status and metrics closed before the C loop.
"""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from tpb import metrics, status
from tpb.config import Keepalive, Settings, Tunnel
from tpb.native import NativeBridge, NativePop, tunnel_struct
from tpb.pop import TUN_F_CSUM, TUNSETOFFLOAD
from tpb.pop_config import Peer, PopSettings, parse_peer_flag
from tpb.ports import lookup
from tpb.select import Selector

Opened = tuple[Any, Any, Callable[[], dict[str, Any]], list[Callable[[], None]]]


def open_run(tunnel: list[str]) -> Opened:
    ports = lookup({"in": "eth2", "out": "eth3"})
    settings = Settings(in_if="eth2", out_if="eth3")
    kw: dict[str, Any] = {}
    cleanup = []
    if tunnel:  # as tpb/bridge.py opens a tunnel
        settings.tunnel = Tunnel(tunnel[0], tunnel[1].split(","), key=7,
                                 keepalive=Keepalive(10.0, 3))
        settings.match = ["ip daddr 203.0.113.0/24"]
        selector = Selector("eth2", ports["in"].ifindex, settings.mark, settings.match)
        kw = {"tunnel": tunnel_struct(settings.tunnel, ports["out"].mtu, ports["out"].mac),
              "sel_ifindex": selector.start(), "mark": settings.mark}
        cleanup.append(selector.stop)
    bridge = NativeBridge(ports["in"].ifindex, ports["out"].ifindex, **kw)
    collector = metrics.BridgeCollector(bridge, ports, metrics.ReloadState(),
                                        tunnel=settings.tunnel is not None)
    return bridge, collector, lambda: status.bridge_snapshot(bridge, ports, settings), cleanup


def open_pop(local: str, tun_name: str, peers: list[str]) -> Opened:
    from pytun import IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunTapDevice

    s = PopSettings(local=local, tun=tun_name,
                    peers=[Peer(**parse_peer_flag(p)) for p in peers])
    tun = TunTapDevice(name=tun_name, flags=IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, TUN_F_CSUM)  # as tpb pop does
    subprocess.run(["ip", "link", "set", tun_name, "up"], check=True)
    pop = NativePop(s, tun.fileno(), tun.mtu, [])
    collector = metrics.PopCollector(pop, metrics.ReloadState())
    return pop, collector, lambda: status.pop_snapshot(pop, s), [tun.close]


def main(argv: list[str]) -> int:
    kind, addr, port = argv[0], argv[1], int(argv[2])
    if kind == "run":
        loop, collector, snapshot, cleanup = open_run(argv[3:])
        name = "eth2"
    else:
        loop, collector, snapshot, cleanup = open_pop(argv[3], argv[4], argv[5:])
        name = argv[4]
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    worker = threading.Thread(target=loop.run, name="tpb-loop", daemon=True)
    worker.start()
    served = [metrics.serve((addr, port), collector), status.serve(kind, name, snapshot)]
    print(f"ready: {kind} {name}", file=sys.stderr, flush=True)
    while not stopping.wait(0.5):
        pass
    for s in served:
        s.close()
    loop.stop()
    worker.join()
    loop.close()
    for done in cleanup:
        done()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
