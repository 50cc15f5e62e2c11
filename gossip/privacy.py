"""Differential privacy for what a node shares: a Gaussian mechanism on its update, and its cost.

What is privatized. In one local round a node trains from ``before`` (its
estimate after merging) to ``after``; the *update delta* is
``after - before``, everything that round's training on the node's private
data changed. :class:`GaussianMechanism` clips that delta to L2 norm ``C``
and adds ``N(0, (sigma C)^2)`` to every coordinate, and the node applies the
noisy delta instead of the real one (the runtime hook, one line before
``GossipNode.apply_local_step``)::

    after = mechanism.privatize_step(before, after)
    node.apply_local_step(before, after)

The node's estimate then changes only by noisy deltas and by merging what
neighbours sent, so every message it sends later (and every snapshot) is
post-processing of privatized releases, and one round costs one step of the
accountant. The node must also train from that estimate, never from a
private copy of the un-noised model.

What is protected, and how much. Neighbouring datasets differ in one
training sample of this node. The whole round's delta is clipped (not
per-sample gradients), so one sample can move it anywhere in the ball of
radius ``C``: the L2 sensitivity is ``2 C``, and the accountant is run with
the effective noise multiplier ``sigma / 2`` (:attr:`GaussianMechanism.accountant`).
Not protected: the sample count (it is the node's push-sum weight and the
``samples`` field, both sent in clear), the fact that the node takes part,
and anything an attacker learns beyond ``epsilon`` from the final model. No
amplification by subsampling is assumed (every round uses all local data).
See SECURITY.md.
"""

from __future__ import annotations

import math

import numpy as np

# The orders opacus uses by default (opacus.accountants.rdp.RDPAccountant.DEFAULT_ALPHAS).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)


class RdpAccountant:
    """Rényi-DP accounting of the Gaussian mechanism, composed over steps, without subsampling.

    Mironov, "Rényi Differential Privacy", CSF 2017: the Gaussian mechanism
    with noise standard deviation ``z`` times the L2 sensitivity is
    ``(alpha, alpha / (2 z^2))``-RDP for every order ``alpha > 1`` (its
    table of basic mechanisms); RDP of a fixed order adds up over adaptive steps
    (Proposition 1); and ``(alpha, r)``-RDP implies
    ``(r + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1), delta)``-DP
    (Balle et al., "Hypothesis testing interpretations and Renyi differential
    privacy", AISTATS 2020, Theorem 21; Canonne, Kamath, Steinke 2020,
    Proposition 12), minimized over ``orders``. That is the conversion opacus
    and Google's dp-accounting use, so on the same orders all three report the
    same epsilon (tests/test_accounting_crosscheck.py); Mironov's original
    ``r + log(1/delta) / (alpha - 1)`` is up to about 20% looser.

    ``noise_multiplier`` is ``z``: noise std divided by L2 sensitivity.
    ``steps`` restores a count from a checkpoint; the spent budget must
    survive a restart, or epsilon is under-reported.
    """

    def __init__(
        self, noise_multiplier: float, steps: int = 0, orders: tuple[float, ...] = DEFAULT_ORDERS
    ) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"the noise multiplier must be > 0, got {noise_multiplier}")
        if not orders or min(orders) <= 1:
            raise ValueError("RDP orders must all be > 1")
        self.noise_multiplier = float(noise_multiplier)
        self.orders = np.asarray(orders, dtype=np.float64)
        self.steps = 0
        self.step(steps)

    def step(self, n: int = 1) -> None:
        """Account for ``n`` more releases of the mechanism."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of steps must be an integer >= 0, got {n!r}")
        self.steps += n

    def rdp(self) -> np.ndarray:
        """The RDP epsilon at each order after all steps so far."""
        return self.steps * self.orders / (2.0 * self.noise_multiplier**2)

    def epsilon(self, delta: float) -> float:
        """The least epsilon over the orders: the steps so far are (epsilon, delta)-DP."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if self.steps == 0:
            return 0.0
        a = self.orders
        bounds = self.rdp() + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
        return max(0.0, float(bounds.min()))

    def spent(self, delta: float) -> dict[str, float]:
        """The budget spent so far, as ``{"epsilon": ..., "delta": ...}`` (for status and logs)."""
        return {"epsilon": self.epsilon(delta), "delta": float(delta)}


def l2_norm(vector: np.ndarray) -> float:
    """The L2 norm, without overflowing to inf for large finite values."""
    return float(row_norms(np.asarray(vector).reshape(1, -1))[0])


def row_norms(rows: np.ndarray) -> np.ndarray:
    """The L2 norm of each row of ``rows`` ([n, P], float64), without overflowing to inf
    for large finite values: an overflowing row is divided by its largest magnitude first."""
    rows = np.asarray(rows)
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(rows, axis=1).astype(np.float64)
    for row in np.flatnonzero(np.isinf(norms) & np.isfinite(rows).all(axis=1)):
        largest = float(np.max(np.abs(rows[row])))
        norms[row] = largest * float(np.linalg.norm(rows[row] / largest))
    return norms


def clip_rows(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row of ``rows`` ([n, P]) scaled down to L2 norm at most ``clip_norm`` (float64 copy).

    The one clipping rule: :func:`clip_to_norm` is this on one row, and the
    simulator applies it to all nodes' deltas at once. ValueError if any
    value is NaN or inf, since neither has a direction to keep.
    """
    rows = np.array(rows, dtype=np.float64)
    if not np.isfinite(rows).all():
        raise ValueError("the update delta holds NaN or inf; local training diverged")
    norms = row_norms(rows)
    over = norms > clip_norm
    # Divide first, then multiply: the single factor clip_norm / norm would be
    # subnormal for a huge row and a tiny C (1e-30 / 4.5e288) and lose its digits.
    rows[over] = rows[over] / norms[over][:, None] * clip_norm
    return rows


def clip_to_norm(vector: np.ndarray, clip_norm: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm at most ``clip_norm`` (a float64 copy)."""
    vector = np.asarray(vector, dtype=np.float64)
    return clip_rows(vector.reshape(1, -1), clip_norm).reshape(vector.shape)


class GaussianMechanism:
    """Sender-side DP: clip the round's update delta to ``clip_norm``, add Gaussian noise.

    Noise is ``N(0, (noise_multiplier * clip_norm)^2)`` per coordinate. Every
    call of :meth:`privatize` is one step of :attr:`accountant`, which runs at
    the effective multiplier ``noise_multiplier / 2`` because the sensitivity
    of a clipped whole-round delta is ``2 * clip_norm`` (see the module text).

    ``rng`` must be seeded from OS entropy (``np.random.default_rng()``),
    never from the experiment's seed: anyone who can reproduce the noise can
    subtract it. numpy's generators are not cryptographic, and floating-point
    Gaussian sampling is not a certified discrete Gaussian; both are limits
    stated in SECURITY.md.
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        rng: np.random.Generator,
        steps: int = 0,
    ) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"the clipping norm C must be > 0, got {clip_norm}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"the noise multiplier sigma must be > 0, got {noise_multiplier}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.rng = rng
        self.accountant = RdpAccountant(self.noise_multiplier / 2.0, steps=steps)

    @property
    def sensitivity(self) -> float:
        """L2 distance between the clipped deltas of two neighbouring datasets, at most."""
        return 2.0 * self.clip_norm

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def privatize(self, delta: np.ndarray) -> np.ndarray:
        """The clipped, noised ``delta`` (float64); ValueError if it holds NaN or inf."""
        clipped = clip_to_norm(delta, self.clip_norm)  # refuses NaN and inf
        noisy = clipped + self.rng.normal(0.0, self.noise_std, size=clipped.shape)
        self.accountant.step()
        return noisy

    def privatize_step(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """The model to apply instead of ``after``: ``before + privatize(after - before)``."""
        before = np.asarray(before, dtype=np.float64)
        return before + self.privatize(np.asarray(after, dtype=np.float64) - before)

    def spent(self, delta: float) -> dict[str, float]:
        return self.accountant.spent(delta)
