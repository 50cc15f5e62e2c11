"""The vectorized simulator follows the gossip core's push-sum rule, and learns."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from fltasks import load_task, partition
from gossip.pushsum import PushSum
from topologies.batched import PaddedShards, make_trainer
from topologies.graphs import ring, small_world, star
from topologies.mixing import push_sum_matrix
from topologies.network import DELIVERED, REFUNDED, NetworkConditions, NetworkModel
from topologies.simulator import Simulation, SimulationConfig
from topologies.stacked_pushsum import StackedPushSum, consensus_distance

pytestmark = pytest.mark.unit

HOSTILE = NetworkConditions(loss=0.2, delay=3, churn=0.25)
LATE_AND_AWAY = NetworkConditions(delay=2, churn=0.25)  # mass is delayed, never lost


def start_state(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size)), rng.integers(1, 60, size=n).astype(np.float64)


def consensus_only(
    graph: nx.Graph,
    estimates: np.ndarray,
    weights: np.ndarray,
    conditions: NetworkConditions,
    rounds: int,
    dtype: torch.dtype = torch.float64,
) -> Simulation:
    config = SimulationConfig(
        rounds=rounds, train=False, evaluate=False, network=conditions, seed=7, dtype=dtype
    )
    simulation = Simulation(graph, torch.from_numpy(estimates), weights, config)
    simulation.run()
    return simulation


def reference_pushsum(
    graph: nx.Graph,
    estimates: np.ndarray,
    weights: np.ndarray,
    conditions: NetworkConditions,
    rounds: int,
) -> list[PushSum]:
    """The gossip core's PushSum, node by node, replaying the simulator's network draws."""
    network = NetworkModel(graph, conditions, seed=7)
    nodes = [PushSum(z, w) for z, w in zip(estimates, weights, strict=True)]
    in_flight: list[tuple[int, int, object]] = []
    for t in range(rounds):
        plan = network.plan(t)
        shares = {
            i: nodes[i].split(int(plan.fanout[i])) for i in range(network.n) if plan.online[i]
        }
        for arc in range(network.num_arcs):
            sender, receiver = int(network.src[arc]), int(network.dst[arc])
            if plan.fate[arc] == REFUNDED:
                nodes[sender].absorb(shares[sender].estimate, shares[sender].weight)
            elif plan.fate[arc] == DELIVERED:
                in_flight.append((t + int(network.delay[arc]), receiver, shares[sender]))
        waiting = []
        for due, receiver, share in in_flight:
            if due <= t and plan.online[receiver]:
                nodes[receiver].absorb(share.estimate, share.weight)
            else:
                waiting.append((due, receiver, share))
        in_flight = waiting
    return nodes


@pytest.mark.parametrize(
    "conditions", [NetworkConditions(), HOSTILE], ids=["ideal", "loss-delay-churn"]
)
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_consensus_equals_gossip_core_pushsum(conditions, dtype, tolerance):
    graph = small_world(24, 4, 0.3, seed=3)
    estimates, weights = start_state(24, 9)
    simulation = consensus_only(graph, estimates, weights, conditions, rounds=30, dtype=dtype)
    nodes = reference_pushsum(graph, estimates, weights, conditions, rounds=30)
    expected = np.stack([node.estimate for node in nodes])
    np.testing.assert_allclose(
        simulation.estimates.double().numpy(), expected, rtol=0, atol=tolerance
    )
    np.testing.assert_allclose(simulation.weights, [node.weight for node in nodes], rtol=1e-12)


def test_one_ideal_round_is_the_push_sum_matrix():
    graph = star(7)
    n = graph.number_of_nodes()
    state = StackedPushSum(
        torch.eye(n, dtype=torch.float64),
        np.ones(n),
        NetworkModel(graph, NetworkConditions(), seed=0),
    )
    state.gossip(state.network.plan(0))
    mass = state.weights[:, None] * state.estimates.numpy()
    np.testing.assert_allclose(mass, push_sum_matrix(graph).toarray(), atol=1e-15)


def test_consensus_distance_falls_to_the_weighted_mean():
    graph = ring(16)
    estimates, weights = start_state(16, 5)
    initial = consensus_distance(torch.from_numpy(estimates))
    simulation = consensus_only(graph, estimates, weights, NetworkConditions(), rounds=300)
    assert consensus_distance(simulation.estimates) < 1e-12 * initial
    weighted_mean = weights @ estimates / weights.sum()
    np.testing.assert_allclose(
        simulation.estimates.numpy(), np.broadcast_to(weighted_mean, estimates.shape), atol=1e-7
    )


def test_delay_and_churn_still_reach_the_exact_weighted_mean():
    graph = small_world(20, 4, 0.2, seed=1)
    estimates, weights = start_state(20, 6, seed=1)
    simulation = consensus_only(graph, estimates, weights, LATE_AND_AWAY, rounds=250)
    in_flight = simulation.state.mass_in_flight
    assert simulation.weights.sum() + in_flight == pytest.approx(weights.sum(), rel=1e-12)
    weighted_mean = weights @ estimates / weights.sum()
    np.testing.assert_allclose(
        simulation.estimates.numpy(), np.broadcast_to(weighted_mean, estimates.shape), atol=1e-5
    )


def test_loss_delay_and_churn_still_reach_consensus():
    graph = small_world(20, 4, 0.2, seed=1)
    estimates, weights = start_state(20, 6, seed=2)
    initial = consensus_distance(torch.from_numpy(estimates))
    simulation = consensus_only(graph, estimates, weights, HOSTILE, rounds=250)
    assert consensus_distance(simulation.estimates) < 1e-8 * initial
    # Lost mass moves the limit, but it stays inside the hull of the starting models.
    final = simulation.estimates.numpy().mean(axis=0)
    assert (final >= estimates.min(axis=0)).all() and (final <= estimates.max(axis=0)).all()


def test_bytes_count_every_sent_message_at_its_encoded_size():
    graph = small_world(12, 4, 0.0, seed=0)
    estimates, weights = start_state(12, 3)
    config = SimulationConfig(rounds=1, train=False, evaluate=False)
    simulation = Simulation(graph, torch.from_numpy(estimates), weights, config)
    (metrics,) = simulation.run()
    assert metrics.bytes_per_node == 4 * simulation.message_bytes
    assert simulation.message_bytes > 3 * 4  # payload plus signed header


def small_digits_run(seed: int, rounds: int, conditions: NetworkConditions = HOSTILE):
    task = load_task("digits", seed=0)
    graph = small_world(8, 4, 0.1, seed=seed)
    shards = partition(task.y_train, 8, "iid", seed=seed)
    config = SimulationConfig(rounds=rounds, local_epochs=1, network=conditions, seed=seed)
    simulation = Simulation.for_task(task, graph, shards, config)
    return simulation, simulation.run()


def test_same_seed_same_run():
    first, first_history = small_digits_run(seed=5, rounds=3)
    second, second_history = small_digits_run(seed=5, rounds=3)
    assert first_history == second_history
    assert torch.equal(first.estimates, second.estimates)
    np.testing.assert_array_equal(first.weights, second.weights)


def test_training_improves_accuracy():
    simulation, history = small_digits_run(seed=0, rounds=4, conditions=NetworkConditions())
    before = (
        Simulation.for_task(
            simulation.task,
            simulation.graph,
            partition(simulation.task.y_train, 8, "iid", seed=0),
            SimulationConfig(rounds=0),
        )
        .accuracy()
        .mean()
    )
    assert float(before) < 0.3
    assert history[-1].accuracy_mean > 0.7
    assert history[-1].accuracy_min > 0.6


def test_generic_vmap_trainer_matches_the_mlp_fast_path():
    task = load_task("digits", seed=0)
    shards = PaddedShards(partition(task.y_train[:150], 6, "dirichlet:0.5", seed=0))
    results = []
    for generic in (False, True):
        trainer = make_trainer(task, generic=generic)
        flat = trainer.layout.flatten(task.make_model()).repeat(6, 1)
        trainer.train(flat, shards, epochs=1, generator=torch.Generator().manual_seed(1))
        results.append((flat, trainer.accuracy(flat, task.x_test, task.y_test)))
    assert type(make_trainer(task)).__name__ == "MLPTrainer"
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_batched_training_runs_the_task_train_steps_per_node():
    """One node, batched, does the same SGD steps as Task.train given the same order."""
    task = load_task("digits", seed=0)
    shard = np.arange(70)  # 3 minibatches of 32, 32 and 6
    trainer = make_trainer(task)
    model = task.make_model()
    flat = trainer.layout.flatten(model).unsqueeze(0)
    padded = PaddedShards([shard])
    order = padded.epoch_order(torch.Generator().manual_seed(3))[0]
    trainer.train(flat, padded, epochs=1, generator=torch.Generator().manual_seed(3))

    # Task.train visits x[perm]; feed it x laid out so that x[perm] is the batched order.
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(70)
    x, y = task.x_train[order][inverse], task.y_train[order][inverse]
    task.train(model, x, y, epochs=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flat[0], trainer.layout.flatten(model), rtol=0, atol=1e-6)
