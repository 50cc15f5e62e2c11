"""The simulator's feature-statistics agreement: gossip's own class on every node of a graph.

Before training, as the daemon does over ``/p2pfl/feature-stats`` (p2pfl/feature_stats.py),
every node runs :class:`gossip.feature_stats.FeatureStatsGossip` from its
shard's aggregates; each synchronous step, every node splits its share over
its graph neighbours and every neighbour takes it. One Python object per node
is fine here: the vectors are 3 x features long (192 values for digits), and
this runs once per experiment, not per round.

Steps run until every node's mean and deviation agree with every other's to
``tolerance`` (relative to the deviation), or ``max_steps``; a ring needs
hundreds of steps (its spectral gap is O(1/n^2)), which costs milliseconds
for vectors this small.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np

from fltasks import Task
from fltasks.scaling import Statistics
from gossip.feature_stats import FeatureAggregates, FeatureStatsGossip

DEFAULT_MAX_STEPS = 2000
DEFAULT_TOLERANCE = 1e-4
# The simulator's fingerprint: every node runs the same task, so any constant will do.
SIMULATED_TASK = bytes(32)


def _spread(nodes: Sequence[FeatureStatsGossip]) -> float:
    """Largest disagreement between nodes' means, relative to the deviation."""
    stats = [node.estimate.mean_std() for node in nodes]
    means = np.stack([mean for mean, _ in stats])
    scale = np.stack([std for _, std in stats]).min(axis=0)
    return float(((means.max(axis=0) - means.min(axis=0)) / scale).max())


def agree_on_graph(
    graph: nx.Graph,
    own: Sequence[FeatureAggregates],
    *,
    robust: bool = False,
    forged: dict[int, FeatureAggregates] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[FeatureStatsGossip]:
    """Every node's agreement after synchronous push steps on ``graph`` (nodes 0..n-1).

    ``forged``: Byzantine nodes, each always sending the given aggregates at
    weight 1 (they never merge what they receive); their entries in the result
    are what they claimed.
    """
    n = graph.number_of_nodes()
    if len(own) != n:
        raise ValueError(f"{len(own)} aggregates for {n} nodes")
    forged = forged or {}
    nodes = [FeatureStatsGossip(own[i], SIMULATED_TASK, robust=robust) for i in range(n)]
    neighbours = [sorted(graph.neighbors(i)) for i in range(n)]
    honest = [nodes[i] for i in range(n) if i not in forged]
    for _ in range(max_steps):
        for i in range(n):
            if not neighbours[i]:
                continue
            if i in forged:
                fake = FeatureStatsGossip(forged[i], SIMULATED_TASK).prepare(0)
                for j in neighbours[i]:
                    nodes[j].receive(i.to_bytes(4, "big"), fake)
                continue
            share = nodes[i].prepare(len(neighbours[i]))
            for j in neighbours[i]:
                nodes[j].receive(i.to_bytes(4, "big"), share)
        for node in honest:
            node.merge()
        settled = all(node.categories == honest[0].categories for node in honest)
        if settled and _spread(honest) < tolerance:
            break
    return nodes


def agreed_statistics(
    task: Task, graph: nx.Graph, shards: Sequence[np.ndarray], mode: str
) -> list[Statistics] | None:
    """Each node's (mean, std) after agreeing on ``graph`` ("gossip" or "gossip-robust").

    None for a task without raw features: its one owner already scaled it.
    """
    if task.raw_features is None:
        return None
    x = task.raw_features.x_train
    own = [FeatureAggregates.of(x[np.asarray(shard, dtype=np.int64)]) for shard in shards]
    nodes = agree_on_graph(graph, own, robust=mode == "gossip-robust")
    return [node.estimate.mean_std() for node in nodes]
