"""Split a training set into per-node shards: IID, label skew, or quantity skew.

Label skew follows Hsu et al., "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification" (2019): each class is spread
over the shards with Dirichlet(alpha) proportions, so a small alpha gives each
node a few dominant labels. Quantity skew draws shard sizes from Dirichlet(alpha)
with IID content, as in Li et al., "Federated Learning on Non-IID Data Silos"
(NIID-Bench, 2021).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEMES = ("iid", "dirichlet:ALPHA", "quantity:ALPHA")
MIN_SHARD_SIZE = 2


def parse_partition(text: str) -> tuple[str, float | None]:
    """Parse 'iid', 'dirichlet:ALPHA' or 'quantity:ALPHA' into (kind, alpha or None)."""
    kind, sep, value = text.strip().partition(":")
    if kind == "iid" and not sep:
        return "iid", None
    if kind in ("dirichlet", "quantity") and sep:
        try:
            alpha = float(value)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return kind, alpha
    raise ValueError(f"bad partition {text!r}: use 'iid', 'dirichlet:ALPHA' or "
                     f"'quantity:ALPHA' with ALPHA a positive number, e.g. 'dirichlet:0.5'")


def partition(labels: np.ndarray | torch.Tensor, num_shards: int, scheme: str,
              seed: int) -> list[np.ndarray]:
    """Split sample indices into `num_shards` disjoint, covering, non-empty shards.

    Each shard is a sorted int64 index array into `labels`. Every shard gets at
    least two samples (one if there are fewer than two per shard) so that every
    node can train; shards left short by a skewed draw take samples from the
    largest shard, which keeps the result deterministic under `seed`.
    """
    kind, alpha = parse_partition(scheme)
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    n = len(y)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if n < num_shards:
        raise ValueError(f"cannot give {num_shards} shards a sample each from {n} samples: "
                         f"use at most {n} shards")
    min_size = min(MIN_SHARD_SIZE, n // num_shards)
    rng = np.random.default_rng(seed)
    if kind == "iid":
        shards = np.array_split(rng.permutation(n), num_shards)
    elif kind == "quantity":
        assert alpha is not None
        sizes = _sizes(rng.dirichlet(np.full(num_shards, alpha)), n, min_size)
        shards = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
    else:
        assert alpha is not None
        shards = _label_skew(y, num_shards, alpha, rng)
        shards = _top_up(shards, min_size, rng)
    return [np.sort(s).astype(np.int64) for s in shards]


def _sizes(proportions: np.ndarray, n: int, min_size: int) -> np.ndarray:
    """Turn proportions into integer sizes summing to n, each at least `min_size`.

    The floor is given first and the rest shared by largest remainder, so no
    redraw loop is needed however small alpha is.
    """
    spare = n - min_size * len(proportions)
    exact = proportions * spare
    sizes = np.floor(exact).astype(np.int64)
    leftover = spare - int(sizes.sum())
    sizes[np.argsort(exact - sizes, kind="stable")[::-1][:leftover]] += 1
    return sizes + min_size


def _label_skew(y: np.ndarray, num_shards: int, alpha: float,
                rng: np.random.Generator) -> list[np.ndarray]:
    """Spread each class over the shards with Dirichlet(alpha) proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_shards, alpha)))[:-1]
                * len(members)).astype(np.int64)
        for shard, piece in enumerate(np.split(members, cuts)):
            parts[shard].append(piece)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _top_up(shards: list[np.ndarray], min_size: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest shard to each shard below `min_size`."""
    shards = [rng.permutation(s) for s in shards]
    sizes = np.array([len(s) for s in shards])
    for short in np.flatnonzero(sizes < min_size):
        while len(shards[short]) < min_size:
            donor = int(np.argmax([len(s) for s in shards]))
            shards[short] = np.append(shards[short], shards[donor][-1])
            shards[donor] = shards[donor][:-1]
    return shards
