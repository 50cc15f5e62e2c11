"""Robust aggregation rules on plain vectors: one function per rule, numpy in, numpy out.

Each function takes the set a node aggregates, its own estimate and what it
received, stacked as rows, and returns one vector. They hold no state and
know nothing of push-sum, so the per-node aggregators in
:mod:`gossip.aggregation` and a batched simulator (which converts its torch
rows to numpy) run the very same arithmetic.

What the rules can and cannot do (see SECURITY.md): each assumes that the
honest members form a majority of the set a node aggregates, i.e. of its
neighbourhood, not of the whole network. Coordinate-wise trimming removes
values outside the honest range but not an attacker who stays inside it
("A Little Is Enough", Baruch et al., NeurIPS 2019); such an attacker can
still bias the result within the spread of the honest values.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_TRIM_FRACTION = 0.2


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


def trimmed_mean(stack: np.ndarray, beta: float = DEFAULT_TRIM_FRACTION) -> np.ndarray:
    """Coordinate-wise trimmed mean of the rows of ``stack`` ([m, P] -> [P]).

    In each coordinate, the :func:`trim_count` smallest and largest values are
    dropped and the rest averaged (Yin et al., "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018). Robust while
    fewer than ``trim_count`` of the ``m`` rows are Byzantine in any
    coordinate.
    """
    stack = _as_stack(stack)
    members = stack.shape[0]
    cut = trim_count(members, beta)
    if cut == 0:
        return stack.mean(axis=0)
    ordered = np.sort(stack, axis=0)
    return ordered[cut : members - cut].mean(axis=0)


def median(stack: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of ``stack`` ([m, P] -> [P]).

    For an even count, the midpoint of the two middle values, computed as
    ``low + (high - low) / 2`` so that identical rows give back exactly that
    row. Robust while fewer than half of the rows are Byzantine.
    """
    stack = _as_stack(stack)
    members = stack.shape[0]
    middle = members // 2
    if members % 2:
        return np.partition(stack, middle, axis=0)[middle].astype(stack.dtype, copy=True)
    parted = np.partition(stack, (middle - 1, middle), axis=0)
    low, high = parted[middle - 1], parted[middle]
    return low + (high - low) / 2


def adaptive_tau(own: np.ndarray, others: np.ndarray, beta: float = DEFAULT_TRIM_FRACTION) -> float:
    """The clipping radius that clips the ``b`` farthest of the ``k`` received vectors.

    ``b = max(1, floor(beta * k))`` (capped at ``k - 1``) and ``tau`` is the
    ``(k - b)``-th smallest distance ``||z_j - z||``: the ``b`` farthest
    neighbours are pulled in to that radius, the others pass unchanged. With
    ``b = 1`` this is the rule of the ClippedGossip authors' code (the second
    largest distance, epfml/byzantine-robust-decentralized-optimizer,
    ``SelfCenteredClipping``). Their theory instead sets ``tau`` from the
    honest neighbours' spread, which a node cannot observe. The radius is set
    by the received vectors themselves, so it bounds the attackers' pull only
    while at most ``b`` of them are Byzantine; more than ``b`` can enlarge it.
    With one neighbour there is nothing to compare, and nothing is clipped.
    """
    others = _as_stack(others)
    with np.errstate(over="ignore", invalid="ignore"):
        distances = np.sort(np.linalg.norm(others - own, axis=1))
    received = len(distances)
    farthest = min(max(1, math.floor(_check_fraction(beta) * received)), received - 1)
    return float(distances[received - 1 - farthest])


def clip(vectors: np.ndarray, tau: float) -> np.ndarray:
    """Scale each row of ``vectors`` to norm at most ``tau`` (rows so long they overflow -> 0)."""
    vectors = _as_stack(vectors)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors, axis=1)
        scale = np.where(norms > tau, tau / norms, 1.0)
        clipped = vectors * scale[:, None]
    # A row whose norm overflowed to inf has scale 0, and inf * 0 is NaN: it
    # counts as an infinitely far neighbour, clipped to nothing at all.
    clipped[~np.isfinite(norms)] = 0.0
    return clipped


def clipped_step(own: np.ndarray, others: np.ndarray, tau: float) -> np.ndarray:
    """One self-centred clipping step: ``z + (1/m) sum_j clip(z_j - z, tau)`` ([P], [k, P] -> [P]).

    ClippedGossip (He, Karimireddy and Jaggi, "Byzantine-Robust Decentralized
    Learning via ClippedGossip", arXiv:2202.01545, later revised as "... via
    Self-Centered Clipping"). The mean runs over the ``m = k + 1`` members of the set, the
    node itself included with a zero difference: uniform mixing weights
    ``1/m``, as in the paper's gossip matrix with a self loop. Without
    clipping it is the plain average of the set; leaving the node out would
    make two nodes swap values forever on a bipartite graph. No neighbour can
    move the node by more than ``tau / m``.
    """
    own = np.asarray(own)
    others = _as_stack(others)
    if not tau >= 0:
        raise ValueError(f"the clipping radius must be >= 0, got {tau}")
    with np.errstate(over="ignore", invalid="ignore"):
        differences = others - own
    return own + clip(differences, tau).sum(axis=0) / (len(others) + 1)
