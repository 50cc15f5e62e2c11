"""How each node scales the built-in tasks' features: from its own records, or from public ranges.

A built-in task (digits, breast-cancer) is one table split into shards, one per
node. Scaling every shard with statistics of the whole training split would
make each node's inputs a function of every other node's records, which no
real member could compute and which DP accounts for nowhere. So the daemon
and the simulator both take :func:`node_view` of the task, built here once:

* without DP, and under ``--dp node``: each shard is standardised with the
  mean and standard deviation of its own rows. Under ``--dp node`` the unit of
  privacy is a node's whole data set, and the released round delta is clipped
  whatever function of that data it is, so own statistics are covered.
* under ``--dp sample``: per-record DP-SGD bounds one record's influence by
  clipping its own gradient. Standardising with the shard's own statistics
  would let one record shift every other record's inputs, outside that bound,
  so features are scaled with the ranges the data set publishes with itself
  (digits: pixels 0..16; breast-cancer: the min/max table of scikit-learn's
  description), which depend on no node's records: ``(x - mid) / half_range``.

The test split belongs to no node: it is standardised with its own statistics
(features only, no labels), or with the public ranges under ``--dp sample``,
so the accuracy a node reports depends on no other node's records either.

With statistics agreed by gossip (issue 25; gossip/feature_stats.py), each
node standardises with the network's mean and deviation instead of its own
shard's: ``node_view(..., agreed=[(mean, std) per node])``. Only the
statistics change; the scaling is the same ``(x - mean) / std``. The test
split is then scaled with the statistics the model was trained under (the
first node's; agreed statistics differ between nodes only by the gossip's
residual), as a member scoring new records would.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fltasks.task import Task


@dataclass(frozen=True, eq=False)
class RawFeatures:
    """A built-in task's features before scaling, and the range its data set publishes."""

    x_train: np.ndarray  # float64 [rows, features], rows in the task's y_train order
    x_test: np.ndarray
    low: np.ndarray  # published minimum of each feature
    high: np.ndarray  # published maximum of each feature


def standardize(x: np.ndarray, reference: np.ndarray) -> torch.Tensor:
    """``x`` scaled with the mean and standard deviation of ``reference`` (float32).

    A feature constant in ``reference`` (digits' blank border pixels, or any
    pixel in a small shard) keeps a scale of 1 instead of dividing by zero.
    """
    mean = reference.mean(axis=0)
    std = reference.std(axis=0)
    std[std == 0] = 1.0
    return torch.from_numpy(((x - mean) / std).astype(np.float32))


def standardize_with(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``x`` scaled with a given mean and standard deviation (float32; a zero std as 1)."""
    std = np.where(std > 0, std, 1.0)
    return torch.from_numpy(((x - mean) / std).astype(np.float32))


def scale_to_range(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> torch.Tensor:
    """``x`` mapped from ``[low, high]`` onto ``[-1, 1]``, per feature (float32)."""
    half = (high - low) / 2.0
    half = np.where(half > 0, half, 1.0)
    return torch.from_numpy(((x - (low + high) / 2.0) / half).astype(np.float32))


def standardize_shards(x: np.ndarray, shards: Sequence[np.ndarray]) -> torch.Tensor:
    """Every shard's rows of ``x`` standardised with that shard's own statistics."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for shard in shards:
        rows = np.asarray(shard, dtype=np.int64)
        if len(rows):
            out[torch.from_numpy(rows)] = standardize(x[rows], x[rows])
    return out


Statistics = tuple[np.ndarray, np.ndarray]  # (mean, std) per feature


def node_view(task: Task, shards: Sequence[np.ndarray], *, record_private: bool,
              agreed: Sequence[Statistics] | None = None) -> Task:
    """``task`` with its features scaled as the nodes holding ``shards`` scale them.

    ``record_private`` is ``--dp sample``: public ranges instead of own
    statistics (module docstring). ``agreed``: each shard's node's (mean, std)
    agreed by gossip, in shard order, used instead of the shard's own. A task
    without raw features (a data file, or a user's own ``module:function``)
    already scaled its data as its one owner, and is returned unchanged.
    """
    raw = task.raw_features
    if raw is None:
        return task
    if record_private:
        x_train = scale_to_range(raw.x_train, raw.low, raw.high)
        x_test = scale_to_range(raw.x_test, raw.low, raw.high)
    elif agreed is not None:
        if len(agreed) != len(shards):
            raise ValueError(f"{len(agreed)} agreed statistics for {len(shards)} shards")
        x_train = torch.empty(raw.x_train.shape, dtype=torch.float32)
        for shard, (mean, std) in zip(shards, agreed, strict=True):
            rows = np.asarray(shard, dtype=np.int64)
            if len(rows):
                x_train[torch.from_numpy(rows)] = standardize_with(raw.x_train[rows], mean, std)
        x_test = standardize_with(raw.x_test, *agreed[0])
    else:
        x_train = standardize_shards(raw.x_train, shards)
        x_test = standardize(raw.x_test, raw.x_test)
    return dataclasses.replace(task, x_train=x_train, x_test=x_test)


_RANGE_ROW = re.compile(r"^(?P<name>[a-z ]+\([a-z ]+\)):\s+(?P<low>[\d.]+)\s+(?P<high>[\d.]+)\s*$")


def published_ranges(description: str) -> tuple[np.ndarray, np.ndarray]:
    """The (min, max) columns of a scikit-learn description's summary table, in row order."""
    rows = [m for line in description.splitlines() if (m := _RANGE_ROW.match(line.strip()))]
    low = np.array([float(m["low"]) for m in rows])
    high = np.array([float(m["high"]) for m in rows])
    return low, high
