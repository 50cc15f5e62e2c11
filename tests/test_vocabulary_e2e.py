"""Two hospitals' CSV files with different categories and classes, on real daemons.

Member A never saw ``smoker=former``; member B never saw the class ``severe``.
Each alone builds a model of its own width. With the vocabulary agreement
(p2pfl/vocabulary.py) both build the union's shape and accept each other's
updates; with it turned off (``--vocabulary-wait 0``) they refuse each other
as ``wrong-model``, which is what the agreement is for.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import pytest

from gossip.keys import NodeKey
from p2pfl.lab.localnet import LocalNetwork, LocalNode

pytestmark = pytest.mark.e2e

# Guards against a hang, not claims about speed (as in test_daemon_e2e.py).
GUARD_S = 300
# The first member serves the agreement this long before it starts; B settles in ~1 s.
WAIT_S = "8"


def _write_records(path: Path, smokers: tuple[str, ...], classes: tuple[str, ...],
                   seed: int, rows: int = 90) -> None:
    rng = random.Random(seed)
    lines = ["age,smoker,site,outcome"]
    for i in range(rows):
        outcome = classes[i % len(classes)]
        age = 30 + 15 * classes.index(outcome) + rng.randint(0, 10)
        lines.append(f"{age},{rng.choice(smokers)},{rng.choice(('east', 'west'))},{outcome}")
    path.write_text("\n".join(lines) + "\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_pair(tmp_path: Path, extra: tuple[str, ...]) -> tuple[LocalNetwork, list[LocalNode]]:
    a_csv, b_csv = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_records(a_csv, ("never", "current"), ("healthy", "sick", "severe"), seed=1)
    _write_records(b_csv, ("never", "current", "former"), ("healthy", "sick"), seed=2)
    # A's address must be known while A is still in its agreement window (its /status
    # comes after it), so A gets a fixed port and a key made here.
    port = _free_port()
    key = NodeKey.generate()
    (tmp_path / "node-0").mkdir(parents=True)
    key.save(tmp_path / "node-0" / "node.key")
    network = LocalNetwork(
        tmp_path, 2, rounds=None, local_epochs=1,
        extra_args=("--label", "outcome", "--shard", "0/1", "--vocabulary-wait", WAIT_S,
                    "--feature-stats", "local", *extra),
        node_args={0: ("--task", f"csv:{a_csv}", "--listen", f"/ip4/127.0.0.1/tcp/{port}"),
                   1: ("--task", f"csv:{b_csv}")},
    )
    network.__enter__()
    first = network.start(0)
    second = network.start(1, bootstrap=f"/ip4/127.0.0.1/tcp/{port}/p2p/{key.peer_id}")
    for node in (first, second):
        network.wait_ready(node, GUARD_S)
    return network, [first, second]


def _statuses(nodes: list[LocalNode]) -> list[dict[str, Any]]:
    return [node.status() or {} for node in nodes]


def test_members_with_different_categories_and_classes_agree_and_accept_updates(
    tmp_path: Path,
) -> None:
    network, nodes = _start_pair(tmp_path, ())
    with network:
        def both_accepted() -> bool:
            return all(s.get("updates_accepted", 0) > 0 for s in _statuses(nodes))

        assert network.wait_for(both_accepted, GUARD_S, poll=0.2), (
            "the members never accepted each other's updates; see node-*/node.log")
        states = [node.saved_state() for node in nodes]
        assert all(state is not None for state in states)
        a, b = states
        assert a is not None and b is not None
        assert a.fingerprint == b.fingerprint
        assert a.estimate.shape == b.estimate.shape
        statuses = _statuses(nodes)
        for status in statuses:
            assert status["updates_rejected"].get("wrong-model", 0) == 0
            assert status["vocabulary"]["columns"] == {"site": 2, "smoker": 3}
            assert status["vocabulary"]["classes"] == 3
        assert statuses[0]["vocabulary"]["served"] > 0  # B asked A during A's window
        logs = [node.log_path.read_text() for node in nodes]
        # age, smoker (3), site (2): 6 inputs; 3 classes; each log says what it gained.
        assert all("3 classes" in log and "smoker (3)" in log for log in logs), logs
        assert "added 1 categories and 0 classes" in logs[0]
        assert "added 0 categories and 1 classes" in logs[1]


def test_without_the_agreement_they_refuse_each_other_by_fingerprint(tmp_path: Path) -> None:
    network, nodes = _start_pair(tmp_path, ("--vocabulary-wait", "0"))
    with network:
        def refused() -> bool:
            return any(s.get("updates_rejected", {}).get("wrong-model", 0) > 0
                       for s in _statuses(nodes))

        assert network.wait_for(refused, GUARD_S, poll=0.2), (
            "neither member refused the other's differently shaped model")
        assert all(s.get("updates_accepted", 0) == 0 for s in _statuses(nodes))
        assert all(s.get("vocabulary", "absent") is None for s in _statuses(nodes))
