"""A member that hides from one victim cannot starve its quorum (issue 20, part 5).

Real daemons on loopback, every one run with an allow file. The hider is a stock
daemon whose allow file leaves out the victim (tests/attackers.py): it closes the
victim's connections right after Noise and talks normally to everyone else. When
links were ranked over each node's first-hand peers, the victim ranked the ring
without the hider and everyone else with it: honest pushes to the victim were
refused as ``not-neighbour`` and its merges fell from quorum to bounded steps
(8 daemons, degree 4: 40/0 quorum/bounded became 4/36, accuracy 0.871 to 0.729).
Ranked over the allow file, the victim's in-neighbours are the peers that push
to it, whoever hides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from attackers import allow_args, seeded_keys

from p2pfl.localnet import LocalNetwork
from p2pfl.neighbours import in_neighbours

VICTIM = 1  # never node 0: everyone bootstraps from it
# Guards against a hang, not claims about speed (as in test_daemon_e2e.py).
GUARD_S = 600


@dataclass
class Outcome:
    quorum_merges: int
    bounded_merges: int
    not_neighbour: int
    victim_accuracy: float | None
    honest_accuracies: list[float | None]


def hider_for(peer_ids: list[str], degree: int) -> int:
    """An in-neighbour of the victim (by the shared rule) other than node 0: the one
    whose silence costs the victim a vote, and whose absence shifted its ranks."""
    chosen = in_neighbours(peer_ids[VICTIM], peer_ids, degree)
    return next(peer_ids.index(p) for p in chosen if peer_ids.index(p) != 0)


def run_network(
    directory: Path, count: int, degree: int, quorum: int, rounds: int, hide: bool
) -> Outcome:
    peer_ids = seeded_keys(directory, count, f"p2pfl-hiding-{count}")
    hider = hider_for(peer_ids, degree)
    node_args = allow_args(directory, peer_ids, hider if hide else None, VICTIM)
    with LocalNetwork(
        directory,
        count,
        rounds=rounds,
        partition="dirichlet:0.5",
        degree=degree,
        extra_args=("--aggregator", "clipped", "--quorum", str(quorum), "--linger", "5"),
        node_args=node_args,
    ) as network:
        network.start_all()
        victim = network.started()[VICTIM]
        last: dict[str, Any] = {}

        def victim_exited() -> bool:
            status = victim.status()
            if status:
                last.update(status)
            return not victim.running

        network.wait_for(victim_exited, GUARD_S, poll=0.5)
        assert network.wait_all_exited(GUARD_S), "some daemon did not finish"
        assert last, "the victim never answered /status"
        honest = [n for n in network.started() if n.index not in (hider, VICTIM)]
        return Outcome(
            quorum_merges=last["merges"]["quorum"],
            bounded_merges=last["merges"]["bounded"],
            not_neighbour=last["updates_rejected"].get("not-neighbour", 0),
            victim_accuracy=victim.final_accuracy,
            honest_accuracies=[n.final_accuracy for n in honest],
        )


def test_a_hiding_member_does_not_get_honest_pushes_to_the_victim_refused(
    tmp_path: Path,
) -> None:
    # 6 daemons, degree 3 (so not everyone links to everyone), quorum 2: like the
    # issue's degree 4 and quorum 3, one silent in-neighbour leaves just a quorum.
    # The victim refuses no honest push and merges with its quorum.
    outcome = run_network(tmp_path, 6, degree=3, quorum=2, rounds=15, hide=True)
    print(outcome)
    assert outcome.not_neighbour == 0, outcome
    assert outcome.quorum_merges >= 10, outcome
    assert outcome.quorum_merges >= 3 * outcome.bounded_merges, outcome


@pytest.mark.slow
def test_a_hiding_member_leaves_the_victims_merges_and_accuracy_as_clean(
    tmp_path: Path,
) -> None:
    # The network: 8 daemons, Dirichlet(0.5), degree 4, quorum 3, the same
    # keys and seeds clean and attacked.
    clean = run_network(tmp_path / "clean", 8, degree=4, quorum=3, rounds=30, hide=False)
    attacked = run_network(tmp_path / "attacked", 8, degree=4, quorum=3, rounds=30, hide=True)
    print("clean", clean)
    print("attacked", attacked)
    assert attacked.not_neighbour == 0, attacked
    assert attacked.quorum_merges >= 3 * attacked.bounded_merges, attacked
    assert clean.victim_accuracy is not None and attacked.victim_accuracy is not None
    assert attacked.victim_accuracy >= clean.victim_accuracy - 0.05, (clean, attacked)
