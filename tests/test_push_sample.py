"""--push-sample K: each round a node pushes to K of its overlay out-links, chosen afresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_simulator import consensus_only, reference_pushsum, start_state

from topologies.graphs import complete, ring, small_world
from topologies.network import NOT_SENT, NetworkConditions, NetworkModel
from topologies.settings import ExperimentConfig
from topologies.settings_error import SettingError
from topologies.stacked_pushsum import StackedPushSum

pytestmark = pytest.mark.unit

HOSTILE_SAMPLED = NetworkConditions(loss=0.2, delay=3, churn=0.25, push_sample=2)


def test_each_node_pushes_to_k_of_its_overlay_out_links_only():
    graph = small_world(24, 6, 0.3, seed=3)
    network = NetworkModel(graph, NetworkConditions(push_sample=2), seed=5)
    links = {(u, v) for u, v in graph.edges} | {(v, u) for u, v in graph.edges}
    used = set()
    for t in range(20):
        plan = network.plan(t)
        sent = plan.fate != NOT_SENT
        arcs = {(int(a), int(b)) for a, b in zip(network.src[sent], network.dst[sent], strict=True)}
        assert arcs <= links
        assert (np.bincount(network.src[sent], minlength=network.n) == 2).all()
        assert (plan.fanout == 2).all()
        used |= arcs
    assert len(used) > network.num_arcs // 2  # fresh each round, not a fixed subgraph


def test_the_same_seed_gives_the_same_plans_and_rounds_differ():
    graph = small_world(24, 6, 0.3, seed=3)
    first = NetworkModel(graph, HOSTILE_SAMPLED, seed=5)
    second = NetworkModel(graph, HOSTILE_SAMPLED, seed=5)
    plans = [first.plan(t) for t in range(10)]
    for t, plan in enumerate(plans):
        again = second.plan(t)
        np.testing.assert_array_equal(plan.fate, again.fate)
        np.testing.assert_array_equal(plan.online, again.online)
        np.testing.assert_array_equal(first.chosen(t), second.chosen(t))
    assert not np.array_equal(first.chosen(0), first.chosen(1))
    other = NetworkModel(graph, HOSTILE_SAMPLED, seed=6)
    assert not np.array_equal(first.chosen(0), other.chosen(0))


@pytest.mark.parametrize("k", [6, 7, 100])
def test_k_at_least_the_degree_is_todays_plan(k):
    graph = small_world(24, 6, 0.0, seed=3)  # every degree is 6
    hostile = dict(loss=0.2, delay=3, churn=0.25)
    today = NetworkModel(graph, NetworkConditions(**hostile), seed=5)
    sampled = NetworkModel(graph, NetworkConditions(**hostile, push_sample=k), seed=5)
    np.testing.assert_array_equal(today.delay, sampled.delay)
    for t in range(15):
        a, b = today.plan(t), sampled.plan(t)
        np.testing.assert_array_equal(a.fate, b.fate)
        np.testing.assert_array_equal(a.online, b.online)
        np.testing.assert_array_equal(a.fanout, b.fanout)


def test_a_node_below_k_pushes_to_all_its_links():
    graph = small_world(16, 4, 0.5, seed=2)  # degrees vary around 4
    network = NetworkModel(graph, NetworkConditions(push_sample=4), seed=0)
    np.testing.assert_array_equal(network.fanout, np.minimum(network.degree, 4))
    plan = network.plan(0)
    sent = np.bincount(network.src[plan.fate != NOT_SENT], minlength=network.n)
    np.testing.assert_array_equal(sent, plan.fanout)


@pytest.mark.parametrize("k", [1, 2])
def test_each_round_is_column_stochastic_on_the_overlay(k):
    graph = ring(9)
    graph.add_edges_from([(0, 4), (2, 7), (3, 8)])
    n = graph.number_of_nodes()
    state = StackedPushSum(
        torch.eye(n, dtype=torch.float64),
        np.ones(n),
        NetworkModel(graph, NetworkConditions(push_sample=k), seed=1),
    )
    plan = state.network.plan(0)
    state.gossip(plan)
    push = state.weights[:, None] * state.estimates.numpy()  # column j: where j's mass went
    np.testing.assert_allclose(push.sum(axis=0), 1.0, atol=1e-14)
    allowed = np.eye(n, dtype=bool)
    for u, v in graph.edges:
        allowed[u, v] = allowed[v, u] = True
    assert (push[~allowed] == 0).all()
    np.testing.assert_allclose(np.diag(push), 1.0 / (k + 1))
    assert ((push > 0).sum(axis=0) == k + 1).all()


def test_mass_is_conserved_over_rounds_and_reaches_the_weighted_mean():
    graph = small_world(20, 4, 0.2, seed=1)
    estimates, weights = start_state(20, 6, seed=1)
    late_and_away = NetworkConditions(delay=2, churn=0.25, push_sample=1)
    simulation = consensus_only(graph, estimates, weights, late_and_away, rounds=400)
    in_flight = simulation.state.mass_in_flight
    assert simulation.weights.sum() + in_flight == pytest.approx(weights.sum(), rel=1e-12)
    weighted_mean = weights @ estimates / weights.sum()
    np.testing.assert_allclose(
        simulation.estimates.numpy(), np.broadcast_to(weighted_mean, estimates.shape), atol=1e-5
    )


def test_sampled_rounds_equal_gossip_core_pushsum_node_by_node():
    graph = small_world(24, 4, 0.3, seed=3)
    estimates, weights = start_state(24, 9)
    simulation = consensus_only(graph, estimates, weights, HOSTILE_SAMPLED, rounds=30)
    nodes = reference_pushsum(graph, estimates, weights, HOSTILE_SAMPLED, rounds=30)
    expected = np.stack([node.estimate for node in nodes])
    np.testing.assert_allclose(simulation.estimates.numpy(), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(simulation.weights, [node.weight for node in nodes], rtol=1e-12)


def test_complete_graph_with_k_1_sends_n_messages_a_round():
    network = NetworkModel(complete(10), NetworkConditions(push_sample=1), seed=0)
    assert int((network.plan(0).fate != NOT_SENT).sum()) == 10


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_a_bad_push_sample_is_a_setting_error(bad):
    with pytest.raises(SettingError, match="push_sample"):
        NetworkConditions(push_sample=bad)


def test_public_copy_compression_refuses_sampling():
    with pytest.raises(SettingError, match="push_sample"):
        ExperimentConfig(compression="topk:0.01", push_sample=1).simulation_config()
