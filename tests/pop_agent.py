"""A POP in one process, driven line by line, for the tests of what only the C
API offers while the loop runs (NativePop.reconfigure, heartbeat).  Run it in
the pop's namespace (`ip netns exec NS python pop_agent.py TUN`): it creates
the TUN device TUN, opens a NativePop on it and runs the loop in a thread, as
`tpb pop` does.

Every stdin line is one JSON command, answered by one JSON line on stdout:

    {"op": "start", "local": ADDR, "peers": [PEER, ...]}       -> {"ok": true}
    {"op": "reconfigure", "local": ADDR, "peers": [...],
     "other_tun_fd": false}                        -> {"ok": true} | {"error": TEXT}
    {"op": "counters"}                             -> NativePop.counters()
    {"op": "heartbeat"}                            -> {"heartbeat": N}
    {"op": "stop"}                                 -> the last counters; exit

PEER: {"address": ADDR, "key": N, "csum": bool, "seq": bool, "prefixes": [...],
"keepalive": "1s,3"}, all but the address optional.  Prefix indexes follow the
peers' order, as in tpb/pop.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from typing import Any

from pytun import IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunTapDevice

from tpb import config
from tpb.errors import TpbError
from tpb.native import NativePop
from tpb.pop import TUN_F_CSUM, TUNSETOFFLOAD, _prefix_struct
from tpb.pop_config import Peer, PopSettings


def settings(cmd: dict[str, Any], tun: str) -> tuple[PopSettings, list[tuple[bytes, int, int]]]:
    peers = []
    for p in cmd["peers"]:
        p = dict(p)
        ka = p.pop("keepalive", None)
        peers.append(Peer(**p, keepalive=config._keepalive(ka) if ka else None))
    s = PopSettings(local=cmd["local"], tun=tun, learn_timeout=300, peers=peers)
    prefixes = [(*_prefix_struct(x), i) for i, p in enumerate(peers) for x in p.prefixes]
    return s, prefixes


def main() -> int:
    name = sys.argv[1]
    tun = TunTapDevice(name=name, flags=IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, TUN_F_CSUM)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    pop: NativePop | None = None
    worker: threading.Thread | None = None
    failure: list[BaseException] = []

    def run() -> None:
        try:
            assert pop is not None
            pop.run()
        except BaseException as e:  # reported with the next answer
            failure.append(e)

    def answer(obj: Any) -> None:
        if failure:
            obj = {"error": f"loop failed: {failure[0]}"}
        print(json.dumps(obj), flush=True)

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "start":
            s, prefixes = settings(cmd, name)
            pop = NativePop(s, tun.fileno(), tun.mtu, prefixes)
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            answer({"ok": True})
        elif op == "reconfigure":
            assert pop is not None
            s, prefixes = settings(cmd, name)
            saved = pop._tun
            spare = os.dup(tun.fileno()) if cmd.get("other_tun_fd") else None
            if spare is not None:
                pop._tun = (spare, *saved[1:])  # the same device, another fd
            try:
                pop.reconfigure(s, prefixes)
                answer({"ok": True})
            except TpbError as e:
                answer({"error": str(e)})
            finally:
                pop._tun = saved
                if spare is not None:
                    os.close(spare)
        elif op == "counters":
            assert pop is not None
            answer(pop.counters())
        elif op == "heartbeat":
            assert pop is not None
            answer({"heartbeat": pop.heartbeat()})
        elif op == "stop":
            break
    if pop is not None:
        pop.stop()
        if worker is not None:
            worker.join(timeout=5)
        answer(pop.counters())
        pop.close()
    tun.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
