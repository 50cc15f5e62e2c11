"""Two hospitals' CSV files with different categories and classes, on real daemons.

Member A never saw ``smoker=former``; member B never saw the class ``severe``;
member C has a site the others lack. B and C are started first, A last:
they retry A until it is up, and A's answers say when its window ends, so they
wait for it (no race between their start-up and A's window).
Each alone builds a model of its own width. With the vocabulary agreement
(p2pfl/vocabulary.py) all build the union's shape and accept each other's
updates (B waits for A's union to freeze, then adopts it); with it turned off
(``--vocabulary-wait 0``) they refuse each other as ``wrong-model``, which is
what the agreement is for.
"""

from __future__ import annotations

import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from gossip.keys import NodeKey
from p2pfl.lab.localnet import LocalNetwork, LocalNode

pytestmark = pytest.mark.e2e

# Guards against a hang, not claims about speed (as in test_daemon_e2e.py).
GUARD_S = 300
# The first member serves the agreement this long before it starts; B and C are already
# asking when it comes up, so this bounds nothing tight.
WAIT_S = "8"


def _write_records(path: Path, smokers: tuple[str, ...], classes: tuple[str, ...],
                   seed: int, sites: tuple[str, ...] = ("east", "west"), rows: int = 90) -> None:
    rng = random.Random(seed)
    lines = ["age,smoker,site,outcome"]
    for i in range(rows):
        outcome = classes[i % len(classes)]
        age = 30 + 15 * classes.index(outcome) + rng.randint(0, 10)
        lines.append(f"{age},{rng.choice(smokers)},{rng.choice(sites)},{outcome}")
    path.write_text("\n".join(lines) + "\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _network(tmp_path: Path, count: int, extra: tuple[str, ...]) -> tuple[LocalNetwork, str]:
    """A (no smoker=former), B (no class severe) and C (a site the others lack), and A's
    address: known before A is ready, since its /status comes after its agreement window,
    so A gets a fixed port and a key made here."""
    files = [tmp_path / name for name in ("a.csv", "b.csv", "c.csv")]
    _write_records(files[0], ("never", "current"), ("healthy", "sick", "severe"), seed=1)
    _write_records(files[1], ("never", "current", "former"), ("healthy", "sick"), seed=2)
    _write_records(files[2], ("never", "current"), ("healthy", "sick"), seed=3,
                   sites=("east", "north"))
    port = _free_port()
    key = NodeKey.generate()
    (tmp_path / "node-0").mkdir(parents=True)
    key.save(tmp_path / "node-0" / "node.key")
    node_args = {i: ("--task", f"csv:{files[i]}") for i in range(count)}
    node_args[0] += ("--listen", f"/ip4/127.0.0.1/tcp/{port}")
    network = LocalNetwork(
        tmp_path, count, rounds=None, local_epochs=1,
        extra_args=("--label", "outcome", "--shard", "0/1", "--vocabulary-wait", WAIT_S,
                    "--feature-stats", "local", *extra),
        node_args=node_args,
    )
    return network, f"/ip4/127.0.0.1/tcp/{port}/p2p/{key.peer_id}"


def _start(network: LocalNetwork, first: str, *, members_first: bool) -> list[LocalNode]:
    if not members_first:
        nodes = [network.start(0), network.start(1, bootstrap=first)]
    else:
        # The others before A: they wait for A's window (its answers say when it ends),
        # however long A takes to come up, within twice --vocabulary-wait.
        others = [network.start(i, bootstrap=first) for i in range(1, network.count)]
        time.sleep(1)
        nodes = [network.start(0), *others]
    for node in nodes:
        network.wait_ready(node, GUARD_S)
    return nodes


def _statuses(nodes: list[LocalNode]) -> list[dict[str, Any]]:
    return [node.status() or {} for node in nodes]


def test_members_with_different_categories_and_classes_agree_and_accept_updates(
    tmp_path: Path,
) -> None:
    network, first = _network(tmp_path, 3, ())
    with network:
        nodes = _start(network, first, members_first=True)

        def all_accepted() -> bool:
            return all(s.get("updates_accepted", 0) > 0 for s in _statuses(nodes))

        assert network.wait_for(all_accepted, GUARD_S, poll=0.2), (
            "the members never accepted each other's updates; see node-*/node.log")
        states = [node.saved_state() for node in nodes]
        assert all(state is not None for state in states)
        assert len({state.fingerprint for state in states if state is not None}) == 1
        assert len({state.estimate.shape for state in states if state is not None}) == 1
        statuses = _statuses(nodes)
        for status in statuses:
            assert status["updates_rejected"].get("wrong-model", 0) == 0
            assert status["vocabulary"]["columns"]["smoker"] == 3
            assert status["vocabulary"]["columns"]["site"] == 3
            assert status["vocabulary"]["classes"] == 3
        assert statuses[0]["vocabulary"]["served"] > 0  # B and C asked A during its window
        agreed = [(s["vocabulary"]["columns"], s["vocabulary"]["classes"]) for s in statuses]
        assert all(one == agreed[0] for one in agreed), agreed
        logs = [node.log_path.read_text() for node in nodes]
        # Each log says what the union gained: A smoker=former and C's site, B the class
        # severe and C's site.
        assert re.search(r"the union added 2 categories and 0 classes", logs[0]), logs[0]
        assert re.search(r"the union added 1 categories and 1 classes", logs[1]), logs[1]
        for log in logs[1:]:
            # Waited for A's freeze, however late A started; a daemon slower than the
            # grace to answer frozen leaves the union used but not saved (the same one).
            assert ("adopted a bootstrap peer's frozen union" in log
                    or "not saved" in log), log


def test_without_the_agreement_they_refuse_each_other_by_fingerprint(tmp_path: Path) -> None:
    network, first = _network(tmp_path, 2, ("--vocabulary-wait", "0"))
    with network:
        nodes = _start(network, first, members_first=False)

        def refused() -> bool:
            return any(s.get("updates_rejected", {}).get("wrong-model", 0) > 0
                       for s in _statuses(nodes))

        assert network.wait_for(refused, GUARD_S, poll=0.2), (
            "neither member refused the other's differently shaped model")
        assert all(s.get("updates_accepted", 0) == 0 for s in _statuses(nodes))
        assert all(s.get("vocabulary", "absent") is None for s in _statuses(nodes))
