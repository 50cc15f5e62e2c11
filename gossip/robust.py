"""Robust aggregation rules on plain vectors: one function per rule, numpy in, numpy out.

Each function takes the set a node aggregates, its own estimate and what it
received, stacked as rows, and returns one vector. They hold no state and
know nothing of push-sum. Each rule is written once, batched over many nodes'
sets at a time (trimmed mean and median: the ``*_sets`` functions, a padded
[n, m, P] stack with a mask of who is present; the clipped step: one function
that takes one node or n nodes); the one-set functions the per-node
aggregators in :mod:`gossip.aggregation` call are those applied to a single
set, and the simulator (:mod:`topologies.robust`) calls the batched ones on
its rows.

What the rules can and cannot do (see SECURITY.md): each assumes that the
honest members form a majority of the set a node aggregates, i.e. of its
neighbourhood, not of the whole network. Coordinate-wise trimming removes
values outside the honest range but not an attacker who stays inside it
("A Little Is Enough", Baruch et al., NeurIPS 2019); such an attacker can
still bias the result within the spread of the honest values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Each default fraction is declared here and only here: gossip's rules, the
# simulator's settings and their help texts all read these names.
DEFAULT_TRIM_FRACTION = 0.2
# ClippedGossip clips, it does not discard: clipping an honest neighbour only
# shortens its pull, so it can afford to treat more of the set as suspect. On
# real daemons with 2 attackers among 6 neighbours, 0.2 clipped only one of them.
DEFAULT_CLIP_FRACTION = 0.45


def _as_stack(stack: np.ndarray) -> np.ndarray:
    array = np.asarray(stack)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"expected a stack of shape [m, P] with m >= 1, got {array.shape}")
    return array


def _check_fraction(beta: float) -> float:
    beta = float(beta)
    if not 0.0 < beta < 0.5:
        raise ValueError(f"the trim fraction must be in (0, 0.5), got {beta}")
    return beta


def trim_count(members: int, beta: float = DEFAULT_TRIM_FRACTION) -> int:
    """How many values :func:`trimmed_mean` drops from each end of ``members`` values.

    ``floor(beta * members)``, raised to 1 once there are 3 members (with a
    20% fraction, floor alone would trim nothing below 5 members, and a node
    of degree 2 would have no protection at all), and capped so that at
    least one value remains.
    """
    beta = _check_fraction(beta)
    count = math.floor(beta * members)
    if members >= 3:
        count = max(count, 1)
    return min(count, (members - 1) // 2)


def farthest_count(received: int, beta: float = DEFAULT_CLIP_FRACTION) -> int:
    """How many of ``received`` vectors the adaptive radius clips: ``max(1, floor(beta k))``,
    capped at ``k - 1`` (with one neighbour there is nothing to compare)."""
    return max(0, min(max(1, math.floor(_check_fraction(beta) * received)), received - 1))


def _sorted_sets(members: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each set sorted per coordinate, absent rows as +inf (last), and each set's size."""
    members = np.asarray(members)
    present = np.asarray(present, dtype=bool)
    if members.ndim != 3 or present.shape != members.shape[:2]:
        raise ValueError(f"expected sets [n, m, P] and a mask [n, m], got {members.shape}")
    sizes = present.sum(axis=1)
    if (sizes == 0).any():
        raise ValueError("every set needs at least one present member")
    padded = np.where(present[:, :, None], members, np.inf).astype(members.dtype, copy=False)
    return np.sort(padded, axis=1), sizes


def trimmed_mean_sets(
    members: np.ndarray, present: np.ndarray, beta: float = DEFAULT_TRIM_FRACTION
) -> np.ndarray:
    """:func:`trimmed_mean` of each set of a padded [n, m, P] stack ([n, P] out)."""
    ordered, sizes = _sorted_sets(members, present)
    cuts = np.array([trim_count(int(size), beta) for size in sizes], dtype=np.int64)
    position = np.arange(ordered.shape[1])
    keep = (position >= cuts[:, None]) & (position < (sizes - cuts)[:, None])
    total = np.where(keep[:, :, None], ordered, ordered.dtype.type(0)).sum(axis=1)
    return total / (sizes - 2 * cuts)[:, None].astype(ordered.dtype)


def median_sets(members: np.ndarray, present: np.ndarray) -> np.ndarray:
    """:func:`median` of each set of a padded [n, m, P] stack ([n, P] out)."""
    ordered, sizes = _sorted_sets(members, present)
    middle = sizes // 2
    high = np.take_along_axis(ordered, middle[:, None, None], axis=1)[:, 0]
    low = np.take_along_axis(ordered, np.maximum(middle - 1, 0)[:, None, None], axis=1)[:, 0]
    with np.errstate(over="ignore", invalid="ignore"):  # only odd sets can overflow here
        midpoint = low + (high - low) / 2
    return np.where((sizes % 2 == 0)[:, None], midpoint, high)


def _row_norms(vectors: np.ndarray) -> np.ndarray:
    """The L2 norm over the last axis, without ``np.linalg.norm``'s [..., P] temporary of squares.

    The one norm of this module. A row whose squares overflow gets inf: the
    clipped step reads that as an infinitely far neighbour.
    """
    return np.sqrt(np.einsum("...i,...i->...", vectors, vectors))


def _distances(own: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """``||z_j - z||`` for each of the k received rows, one [..., P] temporary at a time."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.stack([_row_norms(np.asarray(row) - own) for row in others])


def _adaptive_radius(distances: np.ndarray, present: np.ndarray, beta: float) -> np.ndarray:
    """:func:`adaptive_tau` of each node from its distances [k, ...] and mask [k, ...]."""
    received = present.sum(axis=0)
    farthest = np.array(
        [farthest_count(int(count), beta) for count in received.reshape(-1)], dtype=np.int64
    ).reshape(received.shape)
    rank = np.maximum(received - 1 - farthest, 0)
    ordered = np.sort(np.where(present, distances, np.inf), axis=0)
    return np.take_along_axis(ordered, rank[None], axis=0)[0]


def clipped_step(
    own: np.ndarray,
    others: Sequence[np.ndarray] | np.ndarray,
    tau: float | None = None,
    beta: float = DEFAULT_CLIP_FRACTION,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """One self-centred clipping step: ``z + (1/m) sum_j clip(z_j - z, tau)``.

    ClippedGossip (He, Karimireddy and Jaggi, "Byzantine-Robust Decentralized
    Learning via ClippedGossip", arXiv:2202.01545, later revised as "... via
    Self-Centered Clipping"). The mean runs over the ``m = k + 1`` members of
    the set, the node itself included with a zero difference: uniform mixing
    weights ``1/m``, as in the paper's gossip matrix with a self loop. Without
    clipping it is the plain average of the set; leaving the node out would
    make two nodes swap values forever on a bipartite graph. No neighbour can
    move the node by more than ``tau / m``. ``tau`` fixed, or None for
    :func:`adaptive_tau`'s radius with ``beta``.

    The one clipped step, for one node and for many: ``own`` is [P] and
    ``others`` its k received rows (a list of [P], or [k, P]); or ``own`` is
    [n, P] for n nodes, ``others`` k rows of [n, P] (a [k, n, P] stack, the
    j-th received vector of every node) and ``present`` [k, n] says which
    are real. It walks the k received rows one at a time, so its temporaries
    are [..., P], never [k, ..., P]: for a node merging three ResNet-18
    votes, 180 MB instead of 625 MB. A row whose distance overflowed to inf
    is an infinitely far neighbour, clipped to nothing (scaling it would give
    inf * 0 = NaN). A node that received nothing keeps its estimate.
    """
    own = np.asarray(own)
    if tau is not None and not tau >= 0:
        raise ValueError(f"the clipping radius must be >= 0, got {tau}")
    if len(others) == 0:
        return own.copy()
    distances = _distances(own, others)
    mask = (
        np.ones(distances.shape, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    )
    if mask.shape != distances.shape:
        raise ValueError(f"expected a mask of shape {distances.shape}, got {mask.shape}")
    radius = _adaptive_radius(distances, mask, beta) if tau is None else tau
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # radius / distance in the estimates' dtype (a fixed tau is a weak Python float).
        scales = np.where(distances > radius, radius / distances, 1.0).astype(own.dtype)
        keep = mask & np.isfinite(distances)
        step = np.zeros_like(own)
        for row, scale, kept in zip(others, scales, keep, strict=True):
            if not kept.any():
                continue
            difference = np.asarray(row) - own
            difference *= scale[..., None]
            np.add(step, difference, out=step, where=kept[..., None])
    step /= np.asarray(mask.sum(axis=0) + 1)[..., None].astype(own.dtype)
    step += own
    return step


def trimmed_mean(stack: np.ndarray, beta: float = DEFAULT_TRIM_FRACTION) -> np.ndarray:
    """Coordinate-wise trimmed mean of the rows of ``stack`` ([m, P] -> [P]).

    In each coordinate, the :func:`trim_count` smallest and largest values are
    dropped and the rest averaged (Yin et al., "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018). Robust while
    fewer than ``trim_count`` of the ``m`` rows are Byzantine in any
    coordinate.
    """
    stack = _as_stack(stack)
    return trimmed_mean_sets(stack[None], np.ones((1, len(stack)), dtype=bool), beta)[0]


def median(stack: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of ``stack`` ([m, P] -> [P]).

    For an even count, the midpoint of the two middle values, computed as
    ``low + (high - low) / 2`` so that identical rows give back exactly that
    row. Robust while fewer than half of the rows are Byzantine.
    """
    stack = _as_stack(stack)
    return median_sets(stack[None], np.ones((1, len(stack)), dtype=bool))[0]


def adaptive_tau(own: np.ndarray, others: np.ndarray, beta: float = DEFAULT_CLIP_FRACTION) -> float:
    """The clipping radius that clips the ``b`` farthest of the ``k`` received vectors.

    ``b = max(1, floor(beta * k))`` (capped at ``k - 1``, :func:`farthest_count`)
    and ``tau`` is the ``(k - b)``-th smallest distance ``||z_j - z||``: the
    ``b`` farthest neighbours are pulled in to that radius, the others pass
    unchanged. With ``b = 1`` this is the rule of the ClippedGossip authors'
    code (the second largest distance,
    epfml/byzantine-robust-decentralized-optimizer, ``SelfCenteredClipping``).
    Their theory instead sets ``tau`` from the honest neighbours' spread,
    which a node cannot observe. The radius is set by the received vectors
    themselves, so it bounds the attackers' pull only while at most ``b`` of
    them are Byzantine; more than ``b`` can enlarge it. With one neighbour
    there is nothing to compare, and nothing is clipped.
    """
    distances = _distances(own, _as_stack(others))
    return float(_adaptive_radius(distances, np.ones(distances.shape, dtype=bool), beta))
