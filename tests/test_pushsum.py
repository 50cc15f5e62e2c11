"""Push-sum on plain vectors: real GossipNodes exchanging real signed bytes reach the
sample-weighted mean on rings, random regular and small-world graphs, in rounds and
asynchronously; mass and weight are conserved; a dead neighbour changes nothing."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from consensus_sim import START, EventSimulation, Network, build_network, synchronous_round
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import GossipNode, NodeKey, PushSum, Reason, Rejected

pytestmark = pytest.mark.property

DIM = 16
TOLERANCE = 1e-6


def graph_of(kind: str, n: int, seed: int) -> nx.Graph:
    if kind == "ring":
        return nx.cycle_graph(n)
    if kind == "regular":
        return nx.random_regular_graph(4, n, seed=seed)
    if kind == "small-world":
        return nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=seed)
    raise ValueError(kind)


def run_rounds(network: Network, rng: np.random.Generator, max_rounds: int) -> int:
    target = network.weighted_mean()
    for round_index in range(max_rounds):
        synchronous_round(network, START + round_index, rng)
        # Synchronous rounds leave nothing in flight: the estimates are final.
        if network.max_relative_error(target) <= TOLERANCE:
            return round_index + 1
    return max_rounds


def run_async(
    simulation: EventSimulation, target: np.ndarray, members: list[int], horizon: float
) -> None:
    """Run until the live estimates are well inside the tolerance, then drain the wire."""
    network = simulation.network
    step = 5.0
    while simulation.now < START + horizon:
        simulation.run_until(simulation.now + step)
        if network.max_relative_error(target, members) < TOLERANCE / 10:
            break
    simulation.drain()


@pytest.mark.parametrize(
    ("kind", "n", "max_rounds"),
    [
        ("ring", 8, 300),
        ("ring", 16, 800),
        ("regular", 8, 200),
        ("regular", 64, 400),
        ("small-world", 16, 400),
        ("small-world", 24, 600),
    ],
)
def test_rounds_reach_the_sample_weighted_mean(kind: str, n: int, max_rounds: int) -> None:
    rng = np.random.default_rng(n)
    network = build_network(graph_of(kind, n, seed=n), DIM, rng)
    target = network.weighted_mean()
    run_rounds(network, rng, max_rounds)
    assert network.max_relative_error(target) <= TOLERANCE


def test_the_limit_is_weighted_by_samples_not_a_plain_mean() -> None:
    rng = np.random.default_rng(7)
    network = build_network(nx.cycle_graph(8), DIM, rng)
    plain = np.mean([network.initial[i] for i in network.graph.nodes], axis=0)
    run_rounds(network, rng, 300)
    weighted = network.weighted_mean()
    assert np.linalg.norm(plain - weighted) / np.linalg.norm(weighted) > 100 * TOLERANCE
    assert network.max_relative_error(weighted) <= TOLERANCE


@pytest.mark.parametrize(
    ("kind", "n", "seed"), [("ring", 8, 1), ("regular", 16, 2), ("small-world", 16, 3)]
)
def test_random_order_and_delays_reach_the_sample_weighted_mean(
    kind: str, n: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    network = build_network(graph_of(kind, n, seed), DIM, rng)
    target = network.weighted_mean()
    # Delays up to twice the longest wake-up period: messages from different
    # senders arrive in an order unrelated to the order they were sent in.
    simulation = EventSimulation(network, rng, period=(0.5, 1.5), delay=(0.0, 3.0))
    run_async(simulation, target, list(network.graph.nodes), horizon=2000.0)
    assert simulation.delivered > 0
    assert all(not node.admission.rejected for node in network.nodes.values())
    assert network.max_relative_error(target) <= TOLERANCE


def test_a_straggler_neither_stalls_nor_biases_the_others() -> None:
    rng = np.random.default_rng(11)
    network = build_network(graph_of("regular", 8, 11), DIM, rng)
    target = network.weighted_mean()
    simulation = EventSimulation(network, rng, slow={0: 8.0})
    run_async(simulation, target, list(network.graph.nodes), horizon=3000.0)
    assert network.max_relative_error(target) <= TOLERANCE


def test_a_dead_neighbour_with_refunds_does_not_change_the_limit() -> None:
    rng = np.random.default_rng(5)
    graph = graph_of("regular", 12, 5)
    dead = 3
    live = [i for i in graph.nodes if i != dead]
    assert nx.is_connected(graph.subgraph(live))
    network = build_network(graph, DIM, rng)
    # The dead node never sent anything, so the limit is the live nodes' weighted mean,
    # exactly what the same nodes reach on the graph without it.
    target = network.weighted_mean(live)
    simulation = EventSimulation(network, rng, dead={dead})
    run_async(simulation, target, live, horizon=2000.0)
    assert simulation.refunds > 0
    assert network.max_relative_error(target, live) <= TOLERANCE


def test_without_refunds_a_dead_neighbour_biases_the_limit() -> None:
    """The control for the test above: losing the shares sent to the dead node does matter."""
    rng = np.random.default_rng(5)
    graph = graph_of("regular", 16, 5)
    dead = 3
    live = [i for i in graph.nodes if i != dead]
    network = build_network(graph, DIM, rng)
    target = network.weighted_mean(live)
    for round_index in range(60):
        deliveries = []
        for i in live:
            neighbours = list(graph.neighbors(i))
            outgoing = network.nodes[i].prepare(len(neighbours), START + round_index)
            deliveries += [(i, j, outgoing) for j in neighbours if j != dead]  # dropped, no refund
        for _, j, outgoing in deliveries:
            network.nodes[j].receive(outgoing.message, START + round_index)
        for i in live:
            network.nodes[i].merge()
    assert network.max_relative_error(target, live) > 100 * TOLERANCE


def test_survivors_still_agree_after_a_node_dies_mid_run() -> None:
    rng = np.random.default_rng(9)
    graph = graph_of("regular", 12, 9)
    dead = 0
    live = [i for i in graph.nodes if i != dead]
    assert nx.is_connected(graph.subgraph(live))
    network = build_network(graph, DIM, rng)
    simulation = EventSimulation(network, rng)
    simulation.run_until(START + 10.0)
    simulation.kill(dead)
    while simulation.now < START + 1000.0:
        simulation.run_until(simulation.now + 5.0)
        reference = network.nodes[live[0]].estimate
        if network.max_relative_error(reference, live) < TOLERANCE / 10:
            break
    simulation.drain()
    # What the dead node held is gone, so the value may move, but nobody stalls:
    # the survivors agree with each other.
    reference = network.nodes[live[0]].estimate
    assert network.max_relative_error(reference, live) <= TOLERANCE


def test_a_round_conserves_total_weight_and_mass() -> None:
    rng = np.random.default_rng(3)
    network = build_network(graph_of("small-world", 16, 3), DIM, rng)
    weight, mass = network.total_weight(), network.total_mass()
    for round_index in range(5):
        synchronous_round(network, START + round_index, rng)
    assert network.total_weight() == pytest.approx(weight, rel=1e-12)
    np.testing.assert_allclose(network.total_mass(), mass, rtol=1e-11)


def test_asynchronous_gossip_conserves_mass_once_the_wire_is_drained() -> None:
    rng = np.random.default_rng(4)
    network = build_network(graph_of("regular", 16, 4), DIM, rng)
    weight, mass = network.total_weight(), network.total_mass()
    simulation = EventSimulation(network, rng)
    simulation.run_until(START + 20.0)
    simulation.drain()
    assert network.total_weight() == pytest.approx(weight, rel=1e-12)
    np.testing.assert_allclose(network.total_mass(), mass, rtol=1e-11)


@settings(max_examples=100, deadline=None)
@given(
    initial=st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3)), min_size=2, max_size=5),
    steps=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4))),
)
def test_split_and_absorb_conserve_mass_and_weight(
    initial: list[tuple[float, float]], steps: list[tuple[int, int, int]]
) -> None:
    states = [PushSum(np.full(3, value), weight) for value, weight in initial]
    total_weight = sum(s.weight for s in states)
    total_mass = sum(s.mass for s in states)
    for source, fanout, first_target in steps:
        source %= len(states)
        share = states[source].split(fanout)
        for k in range(fanout):
            states[(first_target + k) % len(states)].absorb(share.estimate, share.weight)
    assert sum(s.weight for s in states) == pytest.approx(total_weight, rel=1e-9)
    np.testing.assert_allclose(sum(s.mass for s in states), total_mass, rtol=1e-9, atol=1e-6)


def test_split_keeps_one_share_and_gives_each_message_the_same() -> None:
    state = PushSum(np.arange(4.0), 12.0)
    share = state.split(3)
    assert share.weight == 3.0
    assert state.weight == 3.0
    np.testing.assert_array_equal(share.estimate, np.arange(4.0))


def test_split_share_does_not_alias_the_state() -> None:
    state = PushSum(np.zeros(4), 1.0)
    share = state.split(1)
    state.absorb(np.ones(4), 1.0)
    np.testing.assert_array_equal(share.estimate, np.zeros(4))


def test_refunding_every_share_restores_the_state() -> None:
    node = GossipNode.create(NodeKey(bytes(32)), {"v": np.linspace(-1.0, 1.0, DIM)}, 40)
    before = node.estimate.copy()
    outgoing = node.prepare(3, START)
    for _ in range(3):
        node.refund(outgoing)
    assert node.pushsum.weight == pytest.approx(40.0, rel=1e-15)
    np.testing.assert_allclose(node.estimate, before, rtol=0, atol=1e-15)


def test_absorb_ignores_a_share_without_weight() -> None:
    state = PushSum(np.zeros(2), 1.0)
    state.absorb(np.full(2, 1e6), 0.0)
    assert state.weight == 1.0
    np.testing.assert_array_equal(state.estimate, np.zeros(2))


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_initial_weight_must_be_positive(weight: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        PushSum(np.zeros(2), weight)


def test_an_older_message_overtaking_a_newer_one_is_rejected_as_replay() -> None:
    """Why links must be FIFO: sequence numbers only increase per sender."""
    template = {"v": np.zeros(DIM)}
    sender = GossipNode.create(NodeKey(bytes([1]) * 32), template, 5)
    receiver = GossipNode.create(NodeKey(bytes([2]) * 32), template, 5)
    older = sender.prepare(1, START)
    newer = sender.prepare(1, START)
    assert receiver.receive(newer.message, START).accepted
    verdict = receiver.receive(older.message, START)
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.REPLAY
