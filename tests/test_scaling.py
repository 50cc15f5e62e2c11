"""Each node scales the built-in tasks' features itself (fltasks/scaling.py).

- Without DP and under ``--dp node``: a shard's features come from its own
  records only; another node's records change nothing of them.
- Under ``--dp sample``: public ranges, so a record changes only its own row.
- The test split is scaled from its own features; the daemon and the
  simulator give a node the same features (one source).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from runtimes import make_runtime

from fltasks import Task, TaskError, partition
from fltasks.datasets import breast_cancer_published_ranges, load_breast_cancer_arrays
from fltasks.scaling import RawFeatures, node_view
from topologies.graphs import ring
from topologies.simulator import Simulation, SimulationConfig

pytestmark = pytest.mark.unit


def with_train_row(task: Task, row: int, values: np.ndarray) -> Task:
    """``task`` whose unscaled training row ``row`` holds ``values`` instead."""
    raw = task.raw_features
    assert raw is not None
    x_train = raw.x_train.copy()
    x_train[row] = values
    return dataclasses.replace(task, raw_features=dataclasses.replace(raw, x_train=x_train))


def test_each_shard_is_standardised_with_its_own_records(digits: Task) -> None:
    shards = partition(digits.y_train, 8, "iid", seed=0)
    view = node_view(digits, shards, record_private=False)
    for shard in shards:
        x = view.x_train[torch.from_numpy(shard)]
        std = x.std(dim=0, unbiased=False)
        varying = std > 0
        assert torch.allclose(x.mean(dim=0), torch.zeros(64), atol=1e-5)
        assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)


def test_another_nodes_records_do_not_change_a_nodes_features(digits: Task) -> None:
    shards = partition(digits.y_train, 8, "iid", seed=0)
    before = node_view(digits, shards, record_private=False)
    other = int(shards[5][0])
    after = node_view(with_train_row(digits, other, np.full(64, 16.0)), shards,
                      record_private=False)
    rows = torch.from_numpy(shards[0])
    assert torch.equal(before.x_train[rows], after.x_train[rows])
    changed = torch.from_numpy(shards[5])
    assert not torch.equal(before.x_train[changed], after.x_train[changed])  # the check bites


def test_under_dp_sample_a_record_changes_only_its_own_row(digits: Task) -> None:
    shards = partition(digits.y_train, 8, "iid", seed=0)
    before = node_view(digits, shards, record_private=True)
    row = int(shards[0][3])
    after = node_view(with_train_row(digits, row, np.full(64, 16.0)), shards,
                      record_private=True)
    differs = (before.x_train != after.x_train).any(dim=1)
    assert torch.equal(torch.nonzero(differs).flatten(), torch.tensor([row]))
    assert torch.equal(after.x_train[row], torch.ones(64))  # pixel 16 is the top of 0..16
    raw = digits.raw_features
    assert raw is not None
    assert torch.equal(before.x_test, torch.from_numpy(((raw.x_test - 8) / 8).astype(np.float32)))


def test_the_test_split_is_standardised_with_its_own_features(digits: Task) -> None:
    view = node_view(digits, partition(digits.y_train, 4, "iid", seed=0), record_private=False)
    assert torch.allclose(view.x_test.mean(dim=0), torch.zeros(64), atol=1e-5)
    assert torch.equal(view.y_test, digits.y_test)


def test_breast_cancer_ranges_are_the_published_table() -> None:
    low, high = breast_cancer_published_ranges()
    assert (low[0], high[0]) == (6.981, 28.11)  # mean radius, the table's first row
    assert (low[3], high[3]) == (143.5, 2501.0)  # mean area
    x, _ = load_breast_cancer_arrays()
    # The table rounds to about three significant digits.
    assert np.allclose(x.min(axis=0), low, rtol=0.02, atol=1e-3)
    assert np.allclose(x.max(axis=0), high, rtol=0.02, atol=1e-3)


def test_a_task_without_raw_features_is_left_as_its_owner_scaled_it(digits: Task) -> None:
    own = dataclasses.replace(digits, raw_features=None)
    assert node_view(own, [np.arange(len(own.y_train))], record_private=True) is own
    assert isinstance(digits.raw_features, RawFeatures)


@pytest.mark.parametrize("dp", [None, "sample"])
def test_the_daemon_and_the_simulator_give_a_node_the_same_features(
    digits: Task, tmp_path: Path, dp: str | None
) -> None:
    settings = {} if dp is None else {"dp": dp, "dp_clip": 1.0, "dp_noise": 1.0}
    node = make_runtime(digits, tmp_path, "2/4", min_neighbours=0, **settings)
    shards = partition(digits.y_train, 4, "iid", seed=0)
    # A daemon alone (no peer to agree with) falls back to its own shard's statistics.
    config = SimulationConfig(
        rounds=0, dp_mode=dp or "node", feature_stats="local",
        dp_clip=None if dp is None else 1.0, dp_noise=None if dp is None else 1.0,
    )
    simulation = Simulation.for_task(digits, ring(4), shards, config)
    assert simulation.task is not None
    assert torch.equal(node.training.x, simulation.task.x_train[torch.from_numpy(shards[2])])
    assert torch.equal(node.training.task.x_test, simulation.task.x_test)


def test_raw_features_must_have_the_labels_rows(digits: Task) -> None:
    keep = digits.y_train < 5
    with pytest.raises(TaskError, match="raw_features has 1347 train .* replace raw_features"):
        dataclasses.replace(digits, x_train=digits.x_train[keep], y_train=digits.y_train[keep])
