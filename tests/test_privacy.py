"""Differential privacy: the RDP accountant's epsilon against hand-computed values and its
monotonicity, and the Gaussian mechanism's clipping, noise scale and accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy.stats import norm

from gossip.privacy import (
    DEFAULT_ORDERS,
    GaussianMechanism,
    RdpAccountant,
    clip_to_norm,
)

pytestmark = pytest.mark.unit

DELTA = 1e-5


def test_default_orders_are_a_grid_from_1_1_to_63() -> None:
    # The grid opacus documents as RDPAccountant.DEFAULT_ALPHAS (copied, since opacus is
    # not a dependency): steps of 0.1 from 1.1 to 10.9, then every integer from 12 to 63.
    orders = np.asarray(DEFAULT_ORDERS)
    assert (orders > 1).all() and (np.diff(orders) > 0).all()
    fine, coarse = orders[orders < 11], orders[orders >= 11]
    np.testing.assert_allclose(fine, np.linspace(1.1, 10.9, 99))
    np.testing.assert_array_equal(coarse, np.arange(12, 64))


@pytest.mark.parametrize("noise_multiplier", [0.7, 1.0, 3.0])
@pytest.mark.parametrize("order", [1.5, 4.0, 32.0])
def test_rdp_per_step_is_the_renyi_divergence_of_the_two_gaussians(
    noise_multiplier: float, order: float
) -> None:
    """Independent of the closed form: integrate D_a(N(1, z^2) || N(0, z^2)) numerically."""

    def log_integrand(x: float) -> float:
        p = norm.logpdf(x, loc=1.0, scale=noise_multiplier)
        q = norm.logpdf(x, loc=0.0, scale=noise_multiplier)
        return order * p + (1 - order) * q

    centre = order  # the integrand is a Gaussian around order * 1 + (1 - order) * 0
    peak = log_integrand(centre)
    reach = 40 * noise_multiplier
    area, _ = integrate.quad(
        lambda x: math.exp(log_integrand(x) - peak), centre - reach, centre + reach, limit=200
    )
    divergence = (peak + math.log(area)) / (order - 1)
    accountant = RdpAccountant(noise_multiplier, steps=1, orders=(order,))
    assert accountant.rdp()[0] == pytest.approx(divergence, rel=1e-6)


@pytest.mark.parametrize(
    ("noise_multiplier", "steps"), [(1.0, 1), (2.0, 10), (0.8, 50), (5.0, 1000)]
)
def test_epsilon_bounds_the_exact_gaussian_privacy_curve_and_is_not_loose(
    noise_multiplier: float, steps: int
) -> None:
    """Against the exact curve of the composed Gaussian mechanism, mu = sqrt(T) / z
    (Balle and Wang, ICML 2018, Theorem 8): RDP's epsilon is an upper bound on the
    exact one (else it under-reports) and at most 25% above it (else it wastes budget)."""
    mu = math.sqrt(steps) / noise_multiplier

    def delta_at(epsilon: float) -> float:
        return norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon) * norm.cdf(
            -mu / 2 - epsilon / mu
        )

    exact = optimize.brentq(lambda e: delta_at(e) - DELTA, 0.0, 500.0)
    reported = RdpAccountant(noise_multiplier, steps=steps).epsilon(DELTA)
    assert exact <= reported <= 1.25 * exact


def test_epsilon_grows_with_steps() -> None:
    accountant = RdpAccountant(1.5)
    epsilons = []
    for steps in (1, 1, 3, 5, 90):
        accountant.step(steps)
        epsilons.append(accountant.epsilon(DELTA))
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))


def test_epsilon_shrinks_with_the_noise_multiplier() -> None:
    epsilons = [RdpAccountant(sigma, steps=50).epsilon(DELTA) for sigma in (0.8, 1.0, 2.0, 8.0)]
    assert all(a > b for a, b in zip(epsilons, epsilons[1:], strict=False))


def test_no_step_spends_nothing_and_spent_reports_both_numbers() -> None:
    accountant = RdpAccountant(1.0)
    assert accountant.spent(DELTA) == {"epsilon": 0.0, "delta": DELTA}
    accountant.step()
    assert accountant.spent(DELTA) == {"epsilon": accountant.epsilon(DELTA), "delta": DELTA}


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_step_rejects_a_non_count(bad) -> None:
    with pytest.raises(ValueError, match="integer >= 0"):
        RdpAccountant(1.0).step(bad)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_epsilon_rejects_a_delta_outside_zero_one(delta: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        RdpAccountant(1.0, steps=1).epsilon(delta)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e200])
def test_clip_to_norm_bounds_the_norm_and_keeps_the_direction(scale: float) -> None:
    unit = np.random.default_rng(0).normal(size=1000)
    unit /= np.linalg.norm(unit)
    vector = unit * scale
    clipped = clip_to_norm(vector, 0.5)
    assert np.linalg.norm(clipped) <= 0.5 * (1 + 1e-12)
    if scale > 0.5:
        np.testing.assert_allclose(clipped, 0.5 * unit, rtol=1e-12)
    else:
        np.testing.assert_array_equal(clipped, vector)


def test_the_mechanism_releases_the_clipped_delta_plus_noise() -> None:
    delta = np.random.default_rng(1).normal(size=500) * 10.0
    # The same seed twice: the noise cancels and what remains is the clipped delta.
    noisy = GaussianMechanism(2.0, 1.0, np.random.default_rng(7)).privatize(delta)
    noise = GaussianMechanism(2.0, 1.0, np.random.default_rng(7)).privatize(np.zeros(500))
    released = noisy - noise
    assert np.linalg.norm(released) <= 2.0 * (1 + 1e-9)
    np.testing.assert_allclose(released, delta * (2.0 / np.linalg.norm(delta)), atol=1e-9)


def test_noise_has_std_sigma_times_c() -> None:
    mechanism = GaussianMechanism(clip_norm=0.5, noise_multiplier=3.0, rng=np.random.default_rng(2))
    noise = mechanism.privatize(np.zeros(200_000))
    assert mechanism.noise_std == 1.5
    # The sample std of 200k normals is within 1% of the true one with overwhelming odds.
    assert np.std(noise) == pytest.approx(1.5, rel=0.01)
    assert abs(np.mean(noise)) < 0.02


def test_privatize_step_applies_the_private_delta_to_the_start_point() -> None:
    before, after = np.ones(4), np.array([1.0, 1.0, 1.0, 101.0])
    mechanism = GaussianMechanism(1.0, 1e-9, np.random.default_rng(3))
    np.testing.assert_allclose(mechanism.privatize_step(before, after), [1, 1, 1, 2], atol=1e-6)


def test_each_release_is_one_step_accounted_at_sensitivity_two_c() -> None:
    mechanism = GaussianMechanism(1.0, 2.0, np.random.default_rng(4))
    for _ in range(3):
        mechanism.privatize(np.ones(8))
    assert mechanism.sensitivity == 2.0
    assert mechanism.accountant.steps == 3
    # sigma = 2 with sensitivity 2C is noise multiplier 1 in the accountant's terms.
    assert mechanism.spent(DELTA) == RdpAccountant(1.0, steps=3).spent(DELTA)


def test_a_diverged_delta_is_refused_not_noised() -> None:
    mechanism = GaussianMechanism(1.0, 1.0, np.random.default_rng(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        mechanism.privatize(np.array([1.0, np.nan]))
    assert mechanism.accountant.steps == 0


@pytest.mark.parametrize(("clip_norm", "sigma"), [(0.0, 1.0), (1.0, 0.0), (math.inf, 1.0)])
def test_the_mechanism_rejects_meaningless_parameters(clip_norm: float, sigma: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        GaussianMechanism(clip_norm, sigma, np.random.default_rng())
