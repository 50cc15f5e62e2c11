"""The vote table in the gossip core: one vote per neighbour, a quorum, who may push,
freshness, and what becomes of push-sum's weight under a robust rule."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from consensus_sim import START, EventSimulation, build_network

from gossip import GossipNode, NodeKey, Reason, Rejected
from gossip.aggregation import aggregator_by_name
from gossip.node import GossipState

pytestmark = pytest.mark.unit

ROBUST = ["trimmed-mean", "median", "clipped"]
DIM = 6


def make(seed: int, value: float, rule: str = "mean", **options: object) -> GossipNode:
    model = {"w": np.full(DIM, value, dtype=np.float32)}
    return GossipNode.create(
        NodeKey(bytes([seed]) * 32), model, samples=10, aggregator=aggregator_by_name(rule),
        **options,
    )


def push(receiver: GossipNode, sender: GossipNode) -> None:
    verdict = receiver.receive(sender.prepare(1, START).message, START, sender.key.public_key)
    assert verdict.accepted, verdict


@pytest.mark.parametrize("rule", ROBUST)
def test_a_burst_from_one_member_moves_the_estimate_no_more_than_one_vote(rule: str) -> None:
    honest = [make(i, 0.1 * i) for i in (1, 2, 3)]

    def merged_after(pushes: int) -> np.ndarray:
        node = make(0, 0.0, rule)
        attacker = make(9, 1000.0)
        for sender in honest:
            push(node, sender)
        for _ in range(pushes):
            push(node, attacker)
        assert node.merge() == 4  # three honest votes and one attacker vote
        return node.estimate.copy()

    one_vote, burst = merged_after(1), merged_after(50)
    np.testing.assert_allclose(burst, one_vote, rtol=0, atol=1e-9)
    # And one vote among four is trimmed, out-voted or clipped: the estimate stays
    # within the honest values, far from the poison.
    assert np.abs(burst).max() <= 0.3 + 1e-9


def test_under_mean_a_burst_coalesces_exactly_as_push_sum_would() -> None:
    node, sender = make(0, 0.0), make(1, 1.0)
    for _ in range(3):
        push(node, sender)
    assert node.votes.coalesced == 2
    weight_before = node.pushsum.weight
    assert node.merge() == 1
    # The sender kept 1/2, 1/4 and 1/8 of its 10 and sent the same: 8.75 arrived.
    assert node.pushsum.weight == pytest.approx(weight_before + 8.75)
    np.testing.assert_allclose(node.estimate, 8.75 / 18.75)


@pytest.mark.parametrize("rule", ROBUST)
def test_below_the_quorum_no_neighbour_pulls_further_than_our_own_step(rule: str) -> None:
    node, attacker, honest = make(0, 0.0, rule), make(9, 1000.0), make(1, 0.0)
    honest.set_model({"w": np.linspace(-0.05, 0.02, DIM, dtype=np.float32)})
    push(node, attacker)
    push(node, honest)
    # No local step yet: nothing to bound a pull by, so two votes move nothing.
    node.merge()
    np.testing.assert_array_equal(node.estimate, 0.0)
    assert node.merges == {"quorum": 0, "bounded": 0}

    before = node.estimate.copy()
    node.apply_local_step(before, before + 0.01)
    step = node.last_step_norm
    start = node.estimate.copy()
    push(node, attacker)
    push(node, honest)
    node.merge()
    moved = float(np.linalg.norm(node.estimate - start))
    # Each of the two neighbours pulls at most `step`, averaged over the set of 3.
    assert 0 < moved <= 2 * step / 3 + 1e-12
    assert node.merges["bounded"] == 1


@pytest.mark.parametrize("rule", ROBUST)
def test_a_quorum_of_distinct_senders_applies_the_rule(rule: str) -> None:
    node = make(0, 0.0, rule)
    for index in (1, 2, 3):
        push(node, make(index, 1.0))
    node.merge()
    assert node.merges["quorum"] == 1
    assert node.estimate.min() > 0.0


def test_the_quorum_is_at_least_what_the_rule_needs() -> None:
    assert make(0, 0.0, "trimmed-mean", quorum=1).quorum == 2
    with pytest.raises(ValueError, match="quorum"):
        make(0, 0.0, "median", quorum=0)


def test_an_update_from_a_peer_that_is_not_a_neighbour_is_refused_and_counted() -> None:
    node, neighbour, stranger = make(0, 0.0), make(1, 1.0), make(2, 5.0)
    node.set_peers(frozenset({neighbour.key.public_key}))
    verdict = node.receive(stranger.prepare(1, START).message, START, stranger.key.public_key)
    assert isinstance(verdict, Rejected) and verdict.reason is Reason.NOT_NEIGHBOUR
    assert node.counters()["rejected"] == {"not-neighbour": 1}
    push(node, neighbour)
    assert node.votes.senders() == [neighbour.key.public_key]


def test_a_sender_leaving_the_neighbour_set_loses_its_vote_but_not_its_weight() -> None:
    node, sender = make(0, 0.0, "median"), make(1, 1.0)
    push(node, sender)
    weight = node.pushsum.weight
    node.set_peers(frozenset())
    assert len(node.votes) == 0
    assert node.pushsum.weight == pytest.approx(weight + 5.0)


@pytest.mark.parametrize("rule", ROBUST)
def test_a_vote_older_than_the_freshness_limit_no_longer_counts(rule: str) -> None:
    node = make(0, 0.0, rule)
    for index in (1, 2, 3):
        push(node, make(index, 1.0))
    for _ in range(node.votes.max_age + 1):
        node.prepare(1, START)  # our rounds pass; the neighbours fall silent
    before = node.estimate.copy()
    assert node.merge() == 0
    np.testing.assert_array_equal(node.estimate, before)
    assert len(node.votes) == 0


@pytest.mark.parametrize("rule", ROBUST)
def test_a_robust_rule_conserves_total_weight_through_asynchronous_gossip(rule: str) -> None:
    rng = np.random.default_rng(4)
    graph = nx.random_regular_graph(4, 12, seed=4)
    network = build_network(graph, dim=DIM, rng=rng)
    for node in network.nodes.values():
        node.aggregator = aggregator_by_name(rule)
    total = network.total_weight()
    simulation = EventSimulation(network, rng, dead=[5])
    simulation.run_until(START + 60)
    simulation.drain()
    assert simulation.refunds > 0  # shares to the dead node came back
    assert network.total_weight() == pytest.approx(total, rel=1e-12)
    estimates = np.stack([n.estimate for i, n in network.nodes.items() if i != 5])
    initial = np.stack(list(network.initial.values()))
    assert (estimates >= initial.min(axis=0) - 1e-9).all()
    assert (estimates <= initial.max(axis=0) + 1e-9).all()


def test_state_round_trips_and_a_forged_state_is_refused_in_one_line() -> None:
    node = make(0, 0.5)
    push(node, make(1, 1.0))
    node.merge()
    state = node.state()
    fresh = make(0, 0.0)
    fresh.restore(state)
    assert fresh.state().seq == state.seq and fresh.pushsum.weight == state.weight
    np.testing.assert_array_equal(fresh.estimate, state.estimate)
    assert fresh.admission.last_seq == state.last_seq

    good = dict(seq=1, weight=10.0, estimate=np.zeros(DIM), last_seq={})
    forged = [
        ({"weight": float("nan")}, "weight"),
        ({"weight": 0.0}, "weight"),
        ({"estimate": np.zeros(1)}, "shape"),
        ({"estimate": np.full(DIM, np.nan)}, "NaN"),
        ({"seq": 2**62}, "sequence"),
        ({"last_seq": {bytes(32): 2**63 - 1}}, "sequence"),
    ]
    for change, fragment in forged:
        target = make(0, 0.0)
        before = target.state()
        with pytest.raises(ValueError, match=fragment) as error:
            target.restore(GossipState(**{**good, **change}))
        assert "\n" not in str(error.value)
        after = target.state()
        assert after.seq == before.seq and after.weight == before.weight


def test_received_weight_waits_as_pending_until_the_merge_folds_it_in() -> None:
    receiver, first, second = make(1, 0.0), make(2, 1.0), make(3, 2.0)
    sent = 0.0
    for sender in (first, second, first):  # first's second share coalesces with its first
        outgoing = sender.prepare(1, START)
        sent += outgoing.weight
        assert receiver.receive(outgoing.message, START, sender.key.public_key).accepted
    held = receiver.pushsum.weight
    assert sent == pytest.approx(5 + 5 + 2.5)  # half of the sender's weight each time
    assert receiver.votes.pending_weight() == pytest.approx(sent)
    receiver.merge()
    assert receiver.votes.pending_weight() == 0.0
    assert receiver.pushsum.weight == pytest.approx(held + sent)


@pytest.mark.parametrize("rule", ["mean", *ROBUST])
def test_merged_from_counts_distinct_senders_whose_votes_a_merge_folded_in(rule: str) -> None:
    """What an exported model's card reports as the members it was trained with."""
    node = make(0, 0.0, rule)
    senders = [make(index, 1.0) for index in (1, 2, 3)]
    for sender in senders:
        push(node, sender)
    assert node.merged_from == set()  # received is not merged
    node.merge()
    push(node, senders[0])  # the same member again is not a new one
    node.merge()
    assert node.merged_from == {sender.key.public_key for sender in senders}
