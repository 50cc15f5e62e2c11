"""A member that lies in its receipts, on the live network: real daemons, one started
with ``--attack lie-receipts``. It keeps every update it is pushed and answers each
with a refusal. Under update/1.1.0 its neighbours refunded every such share, and the
network's total push-sum weight grew without bound (2.5e7 times its start after 40 s
on 5 daemons) until honest pushes were refused for their weight. Under 1.2.0 a share
is refunded only when the offer is refused (docs/PROTOCOL.md §4): no lie moves weight.
And a refusal after the payloads silences the liar (p2pfl/silence.py): its neighbours
send it weight-0 probes, then drop it as a neighbour.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.lab.localnet import LocalNetwork

pytestmark = pytest.mark.e2e

LIAR = 3
NODES = 5
# Guards against a hang, not claims about speed (as in test_daemon_e2e.py).
GUARD_S = 600


def _total_weight(statuses: list[dict]) -> float:
    return sum(s["weight"] + s["weight_pending"] + s["weight_in_flight"] for s in statuses)


def test_a_member_lying_in_its_receipts_creates_no_weight(tmp_path: Path) -> None:
    with LocalNetwork(
        tmp_path,
        NODES,
        rounds=12,
        partition="iid",
        degree=2,
        extra_args=("--aggregator", "mean", "--linger", "2"),
        node_args={LIAR: ("--attack", "lie-receipts")},
    ) as network:
        network.start_all()
        nodes = network.started()
        liar = nodes[LIAR]
        honest = [n for n in nodes if n is not liar]
        totals: list[float] = []
        start: list[float] = []

        def lied_to_enough() -> bool:
            statuses = [n.status() for n in nodes]
            if any(s is None or "weight" not in s for s in statuses):
                return False
            if not start:
                start.append(float(sum(max(s["samples"], 1) for s in statuses)))
            totals.append(_total_weight(statuses))
            # The attack is real: honest daemons pushed to the liar and were lied to,
            # until one of them dropped it (one share, then probes it refused).
            disputed = sum(s["disputed_by"].get(liar.peer_id, 0) for s in statuses)
            dropped = sum(s["silence"]["dropped"] for i, s in enumerate(statuses) if i != LIAR)
            return disputed >= 4 and dropped >= 1 and len(totals) >= 10

        assert network.wait_for(lied_to_enough, GUARD_S, poll=0.3), (
            "the honest daemons were never lied to and never dropped the liar"
        )
        statuses = [n.status() or {} for n in nodes]
        # No weight was created. Under 1.1.0 each lie created a share (a third of a
        # node's weight at degree 2). A poll is not
        # an atomic snapshot (a share moving between two nodes' polls may count twice
        # or not at all), so the typical poll must sit at the start, and none far off.
        totals.sort()
        assert abs(totals[len(totals) // 2] / start[0] - 1) <= 0.02, totals
        assert totals[-1] <= start[0] * 1.25, (totals[-1], start[0])
        # No honest push was refused for its weight (the cap is `malformed`).
        for status in statuses[:LIAR] + statuses[LIAR + 1 :]:
            assert "malformed" not in status["pushes_refused"], status["pushes_refused"]
        assert all(s["weight"] < start[0] for s in statuses)
        assert network.wait_all_exited(GUARD_S), "some daemon did not finish"
        assert all(n.final_accuracy is not None for n in honest)
