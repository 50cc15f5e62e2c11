"""Feature statistics agreed by gossip: push-sum over per-feature aggregates, sans-I/O.

Each node standardises its inputs. With its own shard's mean and deviation,
a node under label skew sees inputs scaled differently from every other
member's, and the averaged model fits none of them well (issue 25: 95 rounds
instead of 26 on 8 daemons). The pooled statistics are a ratio of sums,
``mean = sum_i S_i / sum_i N_i`` and ``E[x^2] = sum_i Q_i / sum_i N_i``, so
push-sum over each node's vector ``[N, S, Q]`` (count, sum and sum of squares
of each feature, aggregates only, never rows) gives every node the network's
statistics: push-sum converges to the *average* of the vectors, and the
average's ratios are the sums' ratios.

Categorical vocabularies (CSV tasks) travel in the same message, unioned, but
only as information: the model's width is fixed before this agreement runs, by
the vocabulary agreement (gossip/vocabulary.py, which owns the bounds, the
decoder and the union rule used here).

Two ways to merge, one class:

* ``robust=False``: push-sum (:class:`gossip.pushsum.PushSum`), exact under
  delay and reordering, but one Byzantine member can claim any sums it likes
  and drag every node's mean anywhere.
* ``robust=True``: each node keeps a table of every in-neighbour's latest
  estimate (one vote per neighbour, as DESIGN.md asks of the daemon) and
  replaces its own with the coordinate-wise trimmed mean of its own and the
  table's. Each honest estimate then stays inside the per-coordinate range of
  the honest members' vectors as long as attackers are fewer than the trimmed
  count of every honest neighbourhood; the price is a consensus near, not at,
  the pooled average (iterated trimmed means weigh nodes by their position in
  the graph). Vectors are per unit of push-sum weight here, so both rules
  act on the same numbers.

Nothing here does I/O or reads a clock: :meth:`FeatureStatsGossip.prepare`
answers what to send, :meth:`receive` and :meth:`refund` take what arrived or
what came back, and the caller owns the streams (p2pfl/feature_stats.py) or
the simulated graph (topologies/feature_stats.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from gossip.pushsum import MAX_WEIGHT, PushSum
from gossip.robust import trimmed_mean
from gossip.vocabulary import (
    MAX_CATEGORIES,
    InvalidVocabulary,
    decode_categories,
    union,
)

STATS_FORMAT = 1
# Bounds checked before a message is trusted: digits has 64 features, a wide CSV
# a few thousand one-hot columns; the categories' bounds are gossip/vocabulary.py's.
MAX_FEATURES = 65_536
MAX_CATEGORIES_PER_COLUMN = MAX_CATEGORIES
MAX_STATS_MESSAGE_BYTES = 3 * 8 * MAX_FEATURES + 4 * 1024 * 1024
FINGERPRINT_BYTES = 32


class InvalidStats(ValueError):
    """A feature-statistics message that cannot be trusted; the text names the field."""


@dataclass(frozen=True, eq=False)
class FeatureAggregates:
    """Per-feature count, sum and sum of squares, and each categorical column's values."""

    count: np.ndarray  # float64 [F]
    total: np.ndarray  # float64 [F]
    squares: np.ndarray  # float64 [F]
    categories: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, x: np.ndarray, categories: Mapping[str, frozenset[str]] | None = None
           ) -> FeatureAggregates:
        """The aggregates of the rows of ``x`` [rows, F] (every feature counted on every row)."""
        x = np.asarray(x, dtype=np.float64)
        count = np.full(x.shape[1], float(x.shape[0]))
        return cls(count, x.sum(axis=0), np.square(x).sum(axis=0), dict(categories or {}))

    @property
    def vector(self) -> np.ndarray:
        """``[N, S, Q]`` concatenated: what push-sum averages."""
        return np.concatenate([self.count, self.total, self.squares])

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean and (population) standard deviation of each feature.

        A feature with no count, or constant (variance 0 or a rounding error
        below it), keeps a deviation of 1, as :func:`fltasks.scaling.standardize`
        does for a constant column, instead of dividing by zero.
        """
        count = np.where(self.count > 0, self.count, 1.0)
        mean = self.total / count
        variance = self.squares / count - np.square(mean)
        std = np.sqrt(np.maximum(variance, 0.0))
        tiny = np.sqrt(np.finfo(np.float64).eps) * np.maximum(np.abs(mean), 1.0)
        std = np.where(std > tiny, std, 1.0)
        return mean, std


def _split(vector: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count, total, squares = np.split(vector, 3)
    return count, total, squares


@dataclass(frozen=True, eq=False)
class StatsShare:
    """One message: an estimate of the network's aggregates (per unit weight) and a weight."""

    fingerprint: bytes  # the task's: members of different tasks must not mix statistics
    vector: np.ndarray  # float64 [3F]
    weight: float
    categories: Mapping[str, frozenset[str]]


def encode_share(share: StatsShare) -> bytes:
    """msgpack, floats as raw little-endian float64: no pickle, no ext types."""
    return msgpack.packb(
        {
            "v": STATS_FORMAT,
            "task": share.fingerprint,
            "weight": float(share.weight),
            "vector": np.ascontiguousarray(share.vector, dtype="<f8").tobytes(),
            "categories": {k: sorted(v) for k, v in sorted(share.categories.items())},
        },
        use_bin_type=True,
    )


def decode_share(data: bytes, fingerprint: bytes, features: int) -> StatsShare:
    """Parse and check one message; :class:`InvalidStats` names what is wrong."""
    if len(data) > MAX_STATS_MESSAGE_BYTES:
        raise InvalidStats(f"message of {len(data)} bytes exceeds {MAX_STATS_MESSAGE_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data))
    except Exception as error:
        raise InvalidStats(f"not a msgpack map ({type(error).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != {"v", "task", "weight", "vector", "categories"}:
        raise InvalidStats("expected the keys v, task, weight, vector, categories")
    if raw["v"] != STATS_FORMAT:
        raise InvalidStats(f"unknown format {raw['v']!r:.20}")
    if raw["task"] != fingerprint:
        raise InvalidStats("statistics of another task (fingerprint differs)")
    weight = raw["weight"]
    if type(weight) is not float or not 0 < weight <= MAX_WEIGHT:
        raise InvalidStats(f"weight must be a float in (0, {MAX_WEIGHT:g}]")
    vector = raw["vector"]
    if type(vector) is not bytes or len(vector) != 3 * 8 * features:
        raise InvalidStats(f"vector must be {3 * features} float64 values")
    values = np.frombuffer(vector, dtype="<f8").astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidStats("vector holds NaN or infinite values")
    return StatsShare(fingerprint, values, weight, _categories(raw["categories"]))


def _categories(value: object) -> dict[str, frozenset[str]]:
    try:
        return decode_categories(value)
    except InvalidVocabulary as error:
        raise InvalidStats(str(error)) from None


class FeatureStatsGossip:
    """One node's agreement on the network's feature statistics.

    Starts from the node's own aggregates with push-sum weight 1 (one node,
    one vote: the counts inside the vector already weigh by rows).
    """

    def __init__(self, own: FeatureAggregates, fingerprint: bytes, *, robust: bool = False,
                 trim_fraction: float = 0.2) -> None:
        features = len(own.count)
        if not 0 < features <= MAX_FEATURES:
            raise ValueError(f"between 1 and {MAX_FEATURES} features, got {features}")
        self.features = features
        self.fingerprint = fingerprint
        self.robust = robust
        self.trim_fraction = trim_fraction
        self.state = PushSum(own.vector, 1.0)
        self.categories: dict[str, frozenset[str]] = dict(own.categories)
        # robust: each in-neighbour's latest estimate, one vote each
        self.latest: dict[bytes, np.ndarray] = {}
        self.received = 0

    @property
    def estimate(self) -> FeatureAggregates:
        """The current estimate of the network's aggregates (per node: ratios are exact)."""
        count, total, squares = _split(self.state.estimate)
        return FeatureAggregates(count.copy(), total.copy(), squares.copy(), dict(self.categories))

    def prepare(self, fanout: int) -> StatsShare:
        """What each of ``fanout`` messages carries; push-sum keeps ``1/(fanout+1)``.

        Robust mode sends the estimate without moving weight: the trimmed mean
        ignores weights, and a weight that never moves cannot be stolen.
        """
        weight = self.state.weight if self.robust else self.state.split_weight(fanout)
        return StatsShare(self.fingerprint, self.state.estimate.copy(), weight,
                          dict(self.categories))

    def refund(self, share: StatsShare) -> None:
        """A share that was not delivered comes back: push-sum loses no mass."""
        if not self.robust:
            self.state.absorb(share.vector, share.weight)

    def receive(self, sender: bytes, share: StatsShare) -> None:
        """Take a neighbour's share (push-sum) or record its vote (robust)."""
        if len(share.vector) != 3 * self.features:
            raise InvalidStats(f"vector must be {3 * self.features} values")
        self.received += 1
        self.categories = union(self.categories, share.categories)
        if self.robust:
            self.latest[sender] = share.vector.copy()
        else:
            self.state.absorb(share.vector, share.weight)

    def merge(self) -> None:
        """Robust mode: own estimate := trimmed mean of own and every neighbour's latest."""
        if self.robust and self.latest:
            stack = np.stack([self.state.estimate, *self.latest.values()])
            self.state.replace_estimate(trimmed_mean(stack, self.trim_fraction))
