"""Boots one kernel GRE peer by hand, for poking at it (see README.md).

    cd tests && sudo python3 -m kgre --netns lab-pop --addr 192.0.2.2/24 \\
        --remote 192.0.2.1 --key 42 --csum --inner-addr 10.255.0.2/30 [--cmd 'ip -s link']

Without --cmd it prints the console, then runs each line typed on stdin in the
VM, until end of input or Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from . import KernelGrePeer, KgreError, available


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m kgre", description=__doc__.splitlines()[0])
    ap.add_argument("--netns", default=None, help="namespace for the tap (default: this one)")
    ap.add_argument("--tap", default="kgre0")
    ap.add_argument("--mac", default="02:00:00:00:00:77")
    ap.add_argument("--addr", required=True, help="NIC address with prefix")
    ap.add_argument("--gateway")
    ap.add_argument("--route", action="append", default=[], help="outer route (repeatable)")
    ap.add_argument("--remote", required=True)
    ap.add_argument("--local")
    ap.add_argument("--key", type=lambda v: int(v, 0))
    ap.add_argument("--csum", action="store_true")
    ap.add_argument("--seq", action="store_true")
    ap.add_argument("--ttl", type=int)
    ap.add_argument("--mode", default="gre", choices=["gre", "gretap"])
    ap.add_argument("--inner-addr", action="append", required=True)
    ap.add_argument("--inner-route", action="append", default=[])
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--gre-mtu", type=int)
    ap.add_argument("--vlan", type=int)
    ap.add_argument("--forwarding", action="store_true")
    ap.add_argument("--cmd", action="append", default=[], help="run in the VM, then stop")
    args = ap.parse_args(argv)
    reason = available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    peer = KernelGrePeer(
        args.netns, args.tap, args.mac, addr=args.addr, gateway=args.gateway, routes=args.route,
        remote=args.remote, local=args.local, key=args.key, csum=args.csum, seq=args.seq,
        ttl=args.ttl, mode=args.mode, inner_addr=args.inner_addr, inner_routes=args.inner_route,
        mtu=args.mtu, gre_mtu=args.gre_mtu, vlan=args.vlan, forwarding=args.forwarding)
    try:
        peer.start()
        print(peer.console())
        print(f"kgre: READY after {peer.boot_seconds:.1f}s (accel {peer.accel_used})")
        lines = args.cmd or sys.stdin
        for line in lines:
            if line.strip():
                rc, out = peer.run(line)
                print(out, end="")
                print(f"[exit {rc}]")
    except KgreError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
