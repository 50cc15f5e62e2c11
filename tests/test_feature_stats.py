"""Feature statistics agreed by gossip: push-sum of aggregates on plain vectors, then robustness."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from gossip.feature_stats import (
    FeatureAggregates,
    FeatureStatsGossip,
    InvalidStats,
    StatsShare,
    decode_share,
    encode_share,
)
from topologies.feature_stats import agree_on_graph
from topologies.graphs import make_graph

pytestmark = pytest.mark.unit

TASK = bytes(range(32))


def _shards(n: int, features: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Shards of different sizes and very different means, as label skew gives."""
    rng = np.random.default_rng(seed)
    return [rng.normal(loc=3.0 * i, scale=1.0 + i % 3, size=(5 + 7 * (i % 4), features))
            for i in range(n)]


@pytest.mark.parametrize("topology", ["ring", "small-world", "random", "complete"])
def test_push_sum_converges_to_the_pooled_mean_and_deviation(topology: str) -> None:
    shards = _shards(16)
    graph = make_graph(topology, 16, 4, 0.1, seed=0)
    nodes = agree_on_graph(graph, [FeatureAggregates.of(x) for x in shards], tolerance=1e-9)
    pooled = np.concatenate(shards)
    for node in nodes:
        mean, std = node.estimate.mean_std()
        np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(std, pooled.std(axis=0), rtol=1e-6)


def test_categories_become_the_union_on_every_node() -> None:
    graph = nx.path_graph(5)
    own = [FeatureAggregates.of(np.ones((2, 1)), {"colour": frozenset({f"c{i}"})})
           for i in range(5)]
    nodes = agree_on_graph(graph, own, max_steps=5)
    for node in nodes:
        assert node.categories == {"colour": frozenset(f"c{i}" for i in range(5))}


def test_a_forged_member_moves_push_sum_anywhere_but_robust_stays_in_the_honest_range() -> None:
    shards = _shards(16)
    own = [FeatureAggregates.of(x) for x in shards]
    graph = make_graph("small-world", 16, 6, 0.1, seed=1)
    forged = FeatureAggregates(np.ones(5), np.full(5, 1e9), np.full(5, 1e18))
    honest_vectors = np.stack([own[i].vector for i in range(1, 16)])
    low, high = honest_vectors.min(axis=0), honest_vectors.max(axis=0)

    plain = agree_on_graph(graph, own, forged={0: forged}, max_steps=200)
    robust = agree_on_graph(graph, own, robust=True, forged={0: forged}, max_steps=200)

    assert max(abs(plain[i].estimate.mean_std()[0]).max() for i in range(1, 16)) > 1e6
    for node in robust[1:]:
        vector = node.estimate.vector
        assert (vector >= low - 1e-9).all() and (vector <= high + 1e-9).all()
        mean, _ = node.estimate.mean_std()
        assert np.abs(mean).max() < 3.0 * 16  # within the honest members' means


def test_a_refunded_share_loses_no_mass() -> None:
    node = FeatureStatsGossip(FeatureAggregates.of(np.arange(6.0).reshape(3, 2)), TASK)
    before = node.state.mass.copy()
    share = node.prepare(3)
    node.refund(share)
    node.refund(share)  # three messages went out and none arrived
    node.refund(share)
    np.testing.assert_allclose(node.state.mass, before)


def test_a_share_round_trips_the_codec() -> None:
    share = StatsShare(TASK, np.arange(6.0), 0.25, {"a": frozenset({"x", "y"})})
    decoded = decode_share(encode_share(share), TASK, features=2)
    np.testing.assert_array_equal(decoded.vector, share.vector)
    assert decoded.weight == 0.25 and decoded.categories == share.categories


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: StatsShare(bytes(32), s.vector, s.weight, {}), "another task"),
        (lambda s: StatsShare(TASK, np.array([1.0, np.nan, 0, 0, 0, 0]), 1.0, {}), "NaN"),
        (lambda s: StatsShare(TASK, np.arange(9.0), 1.0, {}), "6 float64"),
        (lambda s: StatsShare(TASK, s.vector, -1.0, {}), "weight"),
    ],
)
def test_a_bad_share_is_refused_with_its_reason(mutate, reason: str) -> None:
    good = StatsShare(TASK, np.arange(6.0), 1.0, {})
    with pytest.raises(InvalidStats, match=reason):
        decode_share(encode_share(mutate(good)), TASK, features=2)
