"""The DUTs of TPB's tunnel: encapsulation into GRE (issue 3), two TPBs
terminating each other's tunnel (issue 5), TPB with `tpb pop` (issue 4),
each with the baseline it is compared with in the same topology.

    tpb-encap    bench lab: tpb run --local/--remote/--match "ip version 4";
                 every frame leaves as GRE toward an address nobody has
                 (the sink counts it and drops it: it cannot decapsulate)
    chain-kernel chain lab: Linux bridges in A and B
    chain-kseg   the same with TSO and GSO off on A's eth3: the kernel
                 segments every super-packet in software and sends each
                 1500-byte segment across the link, no GRE, no system
                 call, no copy: the floor of what a tunnel that must
                 segment costs here (chain-gre's reference)
    chain        chain lab: two plain TPBs back to back, both on CPU 1
    chain-gre    the same with A and B each other's tunnel end
    chain-udp    the same in GRE-in-UDP (--encap udp): A sends each
                 super-packet as UDP GSO messages, B takes them apart
    pop-bridge   pop lab: the Linux bridge, the pop a plain router
    pop-tpb      pop lab: plain TPB, the pop a plain router
    pop-gre      pop lab: TPB tunnels the flows to the sink's subnet to
                 `tpb pop`, which routes them on through its TUN device
    pop-udp      the same with GRE-in-UDP (RFC 8086)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.duts import Dut, KernelBridge, Target, TpbProc, TpbRun
from bench.topo import (
    CHAIN_A,
    CHAIN_B,
    POP_LINK,
    POP_SINK_NET,
    POP_SITE,
    POP_TPB,
)
from tpb.errors import TpbError
from tpb.lab import Lab

ALL_IPV4 = "ip version 4"
NO_DECAP = "the sink cannot decapsulate GRE: no replies, so no TCP and no ping"
ENCAP_LOCAL = "198.18.0.10"
ENCAP_REMOTE = "198.18.0.20"  # nobody's: the sink drops what it counts
POP_MATCH = f"ip daddr {POP_SINK_NET}"


def _runs(infos: list[dict[str, float]], key: str) -> str:
    return " ".join(str(int(i[key])) if key in i else "-" for i in infos)


def _rows(infos: list[dict[str, float]], tag: str, keys: list[tuple[str, str]]) -> str:
    """One line: a label, then per counter its value in every run (counters
    that are 0 in every run left out, but for the gso_packets checked)."""
    cols = [
        f"{title} {_runs(infos, key)}"
        for key, title in keys
        if any(i.get(key) for i in infos) or key.endswith("gso_packets")
    ]
    return f"  {tag:<5}" + ";  ".join(cols)


TUNNEL_ROWS = [
    ("tun_encap_packets", "encap"),
    ("tun_decap_packets", "decap"),
    ("tun_gso_packets", "gso_packets"),
    ("tun_gso_segments", "gso_segments"),
    ("tun_mss_clamped", "mss_clamped"),
    ("tun_fragments", "fragments"),
    ("tun_icmp_sent", "icmp_sent"),
    ("tun_udp_gso_sent", "udp_gso_sent"),
    ("tun_udp_gso_received", "udp_gso_received"),
    ("tun_udp_gso_coalesced", "udp_gso_coalesced"),
]


def _drops(infos: list[dict[str, float]], tag: str = "") -> str:
    """Every drop counter under tag that is not 0 in some run, by reason;
    the kernel's ring drops as ring_full."""
    keys = sorted({k for i in infos for k, v in i.items() if v and k.startswith(tag + "drop_")})
    cols = [f"{k[len(tag) + 5 :]} {_runs(infos, k)}" for k in keys]
    if any(i.get(tag + "kernel_drops") for i in infos):
        cols.insert(0, f"ring_full {_runs(infos, tag + 'kernel_drops')}")
    return ";  ".join(cols) or "none"


@dataclass
class TpbChain(Dut):
    """Several `tpb run` in a row (the chain lab's A and B): set up in
    order, torn down all (also when one fails), their counters kept apart
    under their labels ("A_...", "B_...")."""

    parts: list[tuple[str, TpbRun]] = field(default_factory=list)  # (label, bridge)
    check_gso: str = ""  # label of the part whose segmentation is checked

    def setup(self, lab: Lab) -> None:
        started: list[TpbRun] = []
        try:
            for _label, part in self.parts:
                part.setup(lab)
                started.append(part)
        except BaseException:
            for part in reversed(started):
                part.abort()
            raise

    def teardown(self, lab: Lab) -> dict[str, float]:
        stats: dict[str, float] = {}
        failed: list[str] = []
        for label, part in reversed(self.parts):
            try:
                part_stats = part.teardown(lab)
            except TpbError as e:
                failed.append(str(e))
                continue
            stats.update({f"{label}_{k}": v for k, v in part_stats.items()})
            for key in ("kernel_drops", "own_drops"):
                stats[key] = stats.get(key, 0) + part_stats.get(key, 0)
        if failed:
            raise TpbError("; ".join(failed))
        return stats

    def counter_lines(self, load: str, infos: list[dict[str, float]]) -> list[str]:
        lines = []
        for label, _part in self.parts:
            rows = [(f"{label}_{k}", t) for k, t in TUNNEL_ROWS]
            if any(k in i for k, _t in rows for i in infos):
                lines.append(_rows(infos, label, rows))
            lines.append(f"  {label:<5}drops: {_drops(infos, label + '_')}")
        if self.check_gso and load == "tcp":
            got = [int(i.get(f"{self.check_gso}_tun_gso_packets", 0)) for i in infos]
            lines.append(
                f"  segmentation check, {self.check_gso}'s gso_packets > 0 in every run: "
                + ("OK" if all(n > 0 for n in got) else "FAILED (no super-packet was segmented)")
            )
        return lines


@dataclass
class TpbTunnel(TpbRun):
    """`tpb run` in tunnel mode: its tunnel counters shown with the results."""

    def counter_lines(self, load: str, infos: list[dict[str, float]]) -> list[str]:
        del load
        return [_rows(infos, "TPB", TUNNEL_ROWS), f"  {'TPB':<5}drops: {_drops(infos)}"]


@dataclass
class TpbWithPop(TpbTunnel):
    """`tpb run` in the dut node and `tpb pop` in the pop node: the pop
    starts first (its TUN device and the site's route must be there when
    the first GRE packet comes) and stops last; its per-peer counters are
    kept as pop_<peer>_*."""

    pop_args: list[str] = field(default_factory=list)
    _pop: TpbProc | None = field(default=None, init=False, repr=False)

    def setup(self, lab: Lab) -> None:
        self._pop = TpbProc(
            f"{self.name}-pop", "pop", ["pop", *self.pop_args], "tpb: pop", self.workdir
        )
        self._pop.start(lab)
        try:
            super().setup(lab)
        except BaseException:
            self._pop.stop()
            self._pop = None
            raise

    def teardown(self, lab: Lab) -> dict[str, float]:
        pop, self._pop = self._pop, None
        try:
            raw_drops = _raw_gre_drops(lab) if pop else None  # before tpb pop closes it
            stats = super().teardown(lab)
        finally:
            data = pop.finish() if pop else {}
        if raw_drops is not None:
            stats["pop_raw_drops"] = raw_drops
        for peer, c in data.get("peers", {}).items():
            stats[f"pop_{peer}_in"] = c["decap_packets"]
            stats[f"pop_{peer}_out"] = c["encap_packets"]
            for key in ("gso_packets", "gso_segments", "gro_packets", "gro_segments"):
                stats[f"pop_{peer}_{key}"] = c.get(key, 0)
            for reason, n in c["drop"].items():
                stats[f"pop_{peer}_drop_{reason}"] = n
        for reason, n in data.get("other", {}).get("drop", {}).items():
            stats[f"pop_nopeer_drop_{reason}"] = n
        if "learned" in data:
            stats["pop_learned"] = data["learned"]
        return stats

    def counter_lines(self, load: str, infos: list[dict[str, float]]) -> list[str]:
        ins = {k for i in infos for k in i if k.startswith("pop_") and k.endswith("_in")}
        peers = sorted(k.split("_")[1] for k in ins)
        lines = super().counter_lines(load, infos)
        for peer in peers:
            tag = f"pop_{peer}_"
            rows = [(tag + "in", "in (GRE decapsulated)"), (tag + "out", "out (encapsulated)"),
                    (tag + "gro_packets", "coalesced into"), (tag + "gro_segments", "of"),
                    (tag + "gso_packets", "split"), (tag + "gso_segments", "into")]
            lines.append(_rows(infos, "pop", rows) + f"   (peer {peer})")
            lines.append(f"  {'pop':<5}drops, peer {peer}: {_drops(infos, tag)}")
        lines.append(f"  {'pop':<5}drops, no peer: {_drops(infos, 'pop_nopeer_')}")
        if any("pop_raw_drops" in i for i in infos):
            raw = _runs(infos, "pop_raw_drops")
            lines.append(f"  {'pop':<5}raw GRE socket drops (kernel, receive buffer full): {raw}")
        return lines


def _raw_gre_drops(lab: Lab) -> int | None:
    """The drops the pop's kernel counted on its raw GRE sockets
    (/proc/net/raw: local port 002F = protocol 47; last column)."""
    res = lab.run("pop", ["cat", "/proc/net/raw"], check=False)
    rows = [line.split() for line in res.stdout.splitlines()[1:]]
    drops = [int(r[-1]) for r in rows if len(r) > 2 and r[1].endswith(":002F")]
    return sum(drops) if drops else None


def duts(workdir: Path) -> list[Dut]:
    cpu = ["--cpu", "1"]
    # issue 15.6: through the POP against the same path with TPB plain and
    # the pop routing
    pop_targets = {
        "tcp_gbps": Target(">=", 0.7),
        "tcp_down_gbps": Target(">=", 0.7),
        "udp64_mpps": Target(">=", 0.8),
    }
    chain_skip = {"udp64": "the chain lab is measured with TCP and RTT only"}
    gre_a = [*cpu, "--local", CHAIN_A, "--remote", CHAIN_B, "--match", ALL_IPV4]
    gre_b = [*cpu, "--local", CHAIN_B, "--remote", CHAIN_A, "--match", ALL_IPV4]

    def chain_part(name: str, label: str, args: list[str]) -> tuple[str, TpbRun]:
        node = label.lower()
        return label, TpbRun(f"{name}-{label}", "", args=args, workdir=workdir, node=node)

    return [
        TpbTunnel(
            "tpb-sel",
            f"tpb run --cpu 1 --local {ENCAP_LOCAL} --remote {ENCAP_REMOTE} (tunnel mode, "
            "nothing selected: what a tunnelling TPB costs the traffic it bridges)",
            baselines={"tpb": {}},
            args=[*cpu, "--local", ENCAP_LOCAL, "--remote", ENCAP_REMOTE],
            workdir=workdir,
        ),
        TpbTunnel(
            "tpb-encap",
            f'tpb run --cpu 1 --local {ENCAP_LOCAL} --remote {ENCAP_REMOTE} --match "{ALL_IPV4}"',
            baselines={"tpb": {"udp64_mpps": Target(">=", 0.8)}, "bridge": {}},
            ring_check=True,
            skip={"tcp": NO_DECAP, "rtt": NO_DECAP},
            pingable=False,
            args=[*cpu, "--local", ENCAP_LOCAL, "--remote", ENCAP_REMOTE, "--match", ALL_IPV4],
            workdir=workdir,
        ),
        KernelBridge(
            "chain-kernel",
            "Linux bridges in A and B",
            baselines={"tpb": {}},
            topo="chain",
            skip=chain_skip,
            nodes=("a", "b"),
        ),
        KernelBridge(
            "chain-kseg",
            "Linux bridges in A and B, A's eth3 without TSO and GSO (software segmentation)",
            baselines={"chain-kernel": {}, "tpb": {}},
            topo="chain",
            skip=chain_skip,
            nodes=("a", "b"),
            no_gso=(("a", "eth3"),),
        ),
        TpbChain(
            "chain",
            "A and B plain (tpb run --cpu 1 each)",
            baselines={"chain-kernel": {}, "tpb": {}},
            topo="chain",
            skip=chain_skip,
            parts=[chain_part("chain", "A", cpu), chain_part("chain", "B", cpu)],
        ),
        TpbChain(
            "chain-gre",
            f'A --local {CHAIN_A} --remote {CHAIN_B}, B the reverse, --match "{ALL_IPV4}", '
            "--cpu 1 each",
            # issue 15.4: plain GRE against the kernel's own segmenting
            baselines={"tpb": {"tcp_gbps": Target(">=", 0.5)}, "chain": {},
                       "chain-kseg": {"tcp_gbps": Target(">=", 0.9)}},
            topo="chain",
            skip=chain_skip,
            parts=[chain_part("chain-gre", "A", gre_a), chain_part("chain-gre", "B", gre_b)],
            check_gso="A",
        ),
        TpbChain(
            "chain-udp",
            "chain-gre with --encap udp: GRE-in-UDP, A's super-packets out as UDP GSO messages",
            baselines={"tpb": {"tcp_gbps": Target(">=", 0.8)}, "chain": {}, "chain-gre": {}},
            topo="chain",
            skip=chain_skip,
            parts=[chain_part("chain-udp", "A", [*gre_a, "--encap", "udp"]),
                   chain_part("chain-udp", "B", [*gre_b, "--encap", "udp"])],
            check_gso="A",
        ),
        KernelBridge("pop-bridge", "Linux bridge as `bridge`; the pop a plain router", topo="pop"),
        TpbRun(
            "pop-tpb",
            "tpb run --cpu 1; the pop a plain router",
            baselines={"pop-bridge": {}},
            topo="pop",
            args=cpu,
            workdir=workdir,
        ),
        TpbWithPop(
            "pop-gre",
            f'tpb run --cpu 1 --local {POP_TPB} --remote {POP_LINK} --match "{POP_MATCH}"; '
            f"tpb pop --local {POP_LINK} --peer {POP_TPB},prefix={POP_SITE}",
            baselines={"pop-tpb": pop_targets, "pop-bridge": {}},
            topo="pop",
            args=[*cpu, "--local", POP_TPB, "--remote", POP_LINK, "--match", POP_MATCH],
            pop_args=["--local", POP_LINK, "--peer", f"{POP_TPB},prefix={POP_SITE}"],
            workdir=workdir,
        ),
        TpbWithPop(
            "pop-udp",
            "pop-gre with GRE-in-UDP: tpb run ... --encap udp; tpb pop --peer ...,udp",
            baselines={"pop-tpb": pop_targets, "pop-gre": {}},
            topo="pop",
            args=[*cpu, "--local", POP_TPB, "--remote", POP_LINK, "--match", POP_MATCH,
                  "--encap", "udp"],
            pop_args=["--local", POP_LINK, "--peer", f"{POP_TPB},udp,prefix={POP_SITE}"],
            workdir=workdir,
        ),
    ]
