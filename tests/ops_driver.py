"""Stand-in for `tpb run` / `tpb pop` serving metrics and status, until the
service module calls metrics.serve() and status.serve() itself (then the
tests run the real daemons and this file goes).

    ops_driver.py run LISTEN_ADDR PORT
        a plain NativeBridge on eth2 <-> eth3 of the namespace it runs in
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
from typing import Any

from tpb import metrics, status
from tpb.config import Settings
from tpb.native import NativeBridge, NativePop
from tpb.pop import TUN_F_CSUM, TUNSETOFFLOAD, Peer, PopSettings, parse_peer_flag
from tpb.ports import lookup


def open_run() -> tuple[Any, Any, Any, list[Any]]:
    ports = lookup({"in": "eth2", "out": "eth3"})
    settings = Settings(in_if="eth2", out_if="eth3")
    bridge = NativeBridge(ports["in"].ifindex, ports["out"].ifindex)
    collector = metrics.BridgeCollector(bridge, ports, metrics.ReloadState())
    return bridge, collector, lambda: status.bridge_snapshot(bridge, ports, settings), []


def open_pop(local: str, tun_name: str, peers: list[str]) -> tuple[Any, Any, Any, list[Any]]:
    from pytun import IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunTapDevice

    s = PopSettings(local=local, tun=tun_name,
                    peers=[Peer(**parse_peer_flag(p)) for p in peers])
    tun = TunTapDevice(name=tun_name, flags=IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, TUN_F_CSUM)  # as tpb pop does
    subprocess.run(["ip", "link", "set", tun_name, "up"], check=True)
    pop = NativePop(s, tun.fileno(), tun.mtu, [])
    collector = metrics.PopCollector(pop, metrics.ReloadState())
    return pop, collector, lambda: status.pop_snapshot(pop, s), [tun]


def main(argv: list[str]) -> int:
    kind, addr, port = argv[0], argv[1], int(argv[2])
    if kind == "run":
        loop, collector, snapshot, keep = open_run()
        name = "eth2"
    else:
        loop, collector, snapshot, keep = open_pop(argv[3], argv[4], argv[5:])
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
    for k in keep:
        k.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
