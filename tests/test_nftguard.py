"""tpb/nftguard.py without namespaces: what counts as TPB's table being
intact, from `nft -j list table` as nft 1.0.6 prints it (the netdev chain's
device left out), and the guard's reaction to each change."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tpb import nftguard
from tpb.select import Selector


def sel(match: list[str]) -> Selector:
    return Selector("eth2", 3, 47, match)


def listed(rules: int = 1, fwd: str = "tpbsel3a", prio: int = 500,
           ipv4: str = "ip") -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "netdev", "name": "tpb_eth2", "handle": 1}},
        {"chain": {"family": "netdev", "table": "tpb_eth2", "name": "select", "handle": 1,
                   "type": "filter", "hook": "ingress", "prio": prio, "policy": "accept"}},
    ]
    for i in range(rules):
        items.append({"rule": {"chain": "select", "handle": 2 + i, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": "203.0.113.0", "len": 24}}}},
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 47}}]}})
    items.append({"rule": {"chain": "select", "handle": 8, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}},
                   "right": ipv4}},
        {"accept": None}]}})
    items.append({"rule": {"chain": "select", "handle": 9, "expr": [{"fwd": {"dev": fwd}}]}})
    return {"nftables": items}


def test_intact_table_is_no_problem():
    assert nftguard.problem(listed(), sel(["ip daddr 203.0.113.0/24"])) is None
    assert nftguard.problem(listed(rules=0), sel([])) is None


def test_each_change_is_named():
    s = sel(["ip daddr 203.0.113.0/24"])
    assert nftguard.problem(None, s) == "was deleted"
    flushed = listed()
    flushed["nftables"] = [i for i in flushed["nftables"] if "rule" not in i]
    assert nftguard.problem(flushed, s) == "was flushed"
    one_gone = listed()
    del one_gone["nftables"][3]
    assert nftguard.problem(one_gone, s) == "was flushed or changed"
    assert nftguard.problem(listed(fwd="eth9"), s) == "was changed"
    assert nftguard.problem(listed(ipv4="ip6"), s) == "was changed"
    assert nftguard.problem(listed(prio=0), s) == "had its chain changed"
    no_chain = copy.deepcopy(listed())
    no_chain["nftables"] = [i for i in no_chain["nftables"] if "chain" not in i]
    assert nftguard.problem(no_chain, s) == "lost its chain"


class FakeGen:
    def __init__(self) -> None:
        self.value = 1

    def read(self) -> int:
        return self.value

    def close(self) -> None:
        pass


def test_guard_lists_only_when_the_generation_moves_and_restores(monkeypatch, caplog):
    s = sel(["ip daddr 203.0.113.0/24"])
    state = {"doc": listed(), "lists": 0, "loads": 0}

    def fake_list(_table: str):
        state["lists"] += 1
        return state["doc"]

    def fake_load(mark: int, match: list[str]) -> None:
        state["loads"] += 1
        state["doc"] = listed()

    monkeypatch.setattr(nftguard, "list_table", fake_list)
    monkeypatch.setattr(nftguard, "Generation", FakeGen)
    monkeypatch.setattr(s, "load", fake_load)
    g = nftguard.TableGuard(s)
    g.check()
    g.check()
    g.check()
    assert (state["lists"], state["loads"], g.restored) == (1, 0, 0)  # one look, then quiet
    g._gen.value = 2  # someone committed something
    state["doc"] = None
    with caplog.at_level("WARNING", logger="tpb"):
        g.check()
    assert (state["loads"], g.restored) == (1, 1)
    assert caplog.messages == ["nftables: table netdev tpb_eth2 was deleted by someone else: "
                               "loaded it again (1 time)"]
    g.check()  # looked at again after a restore, found whole
    assert g.restored == 1


@pytest.mark.skipif(not hasattr(nftguard.socket, "AF_NETLINK"), reason="Linux only")
def test_generation_reads_a_number():
    try:
        gen = nftguard.Generation()
    except OSError as e:
        pytest.skip(f"no netfilter netlink here: {e}")
    try:
        value = gen.read()
    finally:
        gen.close()
    assert value is None or value >= 0
