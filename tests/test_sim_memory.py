"""--node-chunk: the simulator's memory-bounded path gives the stacked path's results."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from fltasks import load_task, partition
from topologies.graphs import small_world
from topologies.network import NetworkConditions
from topologies.settings import ExperimentConfig, SettingError
from topologies.simulator import Simulation, SimulationConfig

pytestmark = pytest.mark.unit

NODES = 8
LATE_AND_AWAY = NetworkConditions(delay=2, churn=0.25)  # arrivals and offline nodes


def digits_run(node_chunk: int | None, conditions: NetworkConditions, generic: bool,
               ) -> tuple[Simulation, list]:
    task = load_task("digits", seed=0)
    graph: nx.Graph = small_world(NODES, 4, 0.2, seed=1)
    # Skewed shard sizes: chunks whose nodes run different numbers of steps.
    shards = partition(task.y_train.numpy(), NODES, "quantity:1.0", seed=2)
    config = SimulationConfig(rounds=3, network=conditions, seed=3, node_chunk=node_chunk)
    simulation = Simulation.for_task(task, graph, shards, config, generic=generic)
    return simulation, simulation.run()


@pytest.mark.parametrize("conditions", [NetworkConditions(), LATE_AND_AWAY],
                         ids=["ideal", "delay-churn"])
@pytest.mark.parametrize("generic", [False, True], ids=["mlp", "vmap"])
def test_chunked_nodes_train_and_gossip_as_the_stacked_run(
    conditions: NetworkConditions, generic: bool
) -> None:
    stacked, stacked_history = digits_run(None, conditions, generic)
    chunked, chunked_history = digits_run(3, conditions, generic)  # 3 + 3 + 2 nodes
    torch.testing.assert_close(chunked.estimates, stacked.estimates, rtol=0, atol=1e-6)
    assert chunked.weights.tolist() == stacked.weights.tolist()
    for ours, theirs in zip(chunked_history, stacked_history, strict=True):
        assert ours.accuracy_mean == pytest.approx(theirs.accuracy_mean, abs=1e-6)
        assert ours.consensus_distance == pytest.approx(theirs.consensus_distance, rel=1e-4)
        assert ours.online == theirs.online and ours.bytes_per_node == theirs.bytes_per_node
    assert not torch.equal(stacked.estimates[0], stacked.estimates[1])  # it trained


def test_a_chunked_run_mixes_through_a_chunk_sized_buffer() -> None:
    simulation, _ = digits_run(3, NetworkConditions(), generic=False)
    size = simulation.estimates.shape[1]
    buffer = simulation.state._spare.numel()
    assert buffer == NODES * math.ceil(3 * size / NODES)  # about 3 models, not 8
    stacked, _ = digits_run(None, NetworkConditions(), generic=False)
    assert stacked.state._spare.numel() == NODES * size


@pytest.mark.parametrize("value", [0, -2])
def test_node_chunk_below_one_is_one_line_naming_the_setting(value: int) -> None:
    with pytest.raises(SettingError) as info:
        ExperimentConfig(node_chunk=value).simulation_config()
    assert "node_chunk" in str(info.value) or "node-chunk" in str(info.value)
    assert "\n" not in str(info.value)
