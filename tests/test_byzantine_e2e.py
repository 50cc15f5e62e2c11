"""A Byzantine member on the live network: real daemons, one of them started with
``--attack sign-flip``, pushing its negated model to every peer it knows as fast as
it may. Under ``clipped`` the honest daemons still learn (scripts/bench_byzantine.py
measures every rule and attack; this is its few-daemon version)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.lab.localnet import LocalNetwork

pytestmark = pytest.mark.e2e

ATTACKER = 3
# Guards against a hang, not claims about speed (as in test_daemon_e2e.py).
GUARD_S = 600


def test_honest_daemons_learn_despite_a_sign_flipping_member_under_clipped(
    tmp_path: Path,
) -> None:
    with LocalNetwork(
        tmp_path,
        5,
        rounds=20,
        partition="dirichlet:0.5",
        degree=4,
        extra_args=("--aggregator", "clipped", "--linger", "5"),
        node_args={ATTACKER: ("--attack", "sign-flip")},
    ) as network:
        network.start_all()
        nodes = network.started()
        attacker = nodes[ATTACKER]
        honest = [n for n in nodes if n is not attacker]

        def attacked_and_voting() -> bool:
            # The attack is real: each honest daemon admitted many of the attacker's
            # updates, far more than one per round; and each has merged with a quorum.
            statuses = [n.status() or {} for n in honest]
            return all(
                s.get("last_seq", {}).get(attacker.peer_id, 0) > 40
                and s.get("merges", {}).get("quorum", 0) > 0
                for s in statuses
            )

        # Polled while the daemons run; gives up once they have all exited.
        assert network.wait_for(attacked_and_voting, GUARD_S, poll=0.2), (
            "the honest daemons never admitted a burst of attacks and merged with a quorum"
        )
        statuses = [n.status() or {} for n in honest]
        # Bursts count once: shares that arrived before the last one was merged coalesce.
        assert sum(s["coalesced"] for s in statuses) > 0
        assert network.wait_all_exited(GUARD_S), "some daemon did not finish"
        finals = [n.final_accuracy for n in honest]
        # Under `mean` the same attack leaves honest nodes near chance (0.15, docs/BENCHMARKS.md).
        # Clean, these 5 daemons end at 0.96. With each node scaling its own shard
        # (fltasks/scaling.py) the attacked honest nodes ended at 0.78-0.83 in three
        # runs (0.85 or more before per-node scaling): the defence holds, with a cost.
        assert all(a is not None and a >= 0.7 for a in finals), finals
        assert attacker.process.returncode == 0
