"""Differential privacy: the RDP accountant's epsilon against hand-computed values and its
monotonicity, and the Gaussian mechanism's clipping, noise scale and accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gossip.privacy import (
    DEFAULT_ORDERS,
    GaussianMechanism,
    RdpAccountant,
    clip_to_norm,
)

DELTA = 1e-5


def test_default_orders_are_opacus_defaults() -> None:
    assert len(DEFAULT_ORDERS) == 99 + 52
    assert DEFAULT_ORDERS[0] == pytest.approx(1.1)
    assert DEFAULT_ORDERS[98] == pytest.approx(10.9)
    assert DEFAULT_ORDERS[-1] == 63


@pytest.mark.parametrize(
    ("noise_multiplier", "steps", "best_order"),
    # epsilon = min_a steps * a / (2 z^2) + log(1/delta) / (a - 1); with log(1e5) = 11.5129...
    # z=1, 1 step:   continuous optimum a = 1 + sqrt(2 * 11.51) = 5.80, on the grid.
    # z=2, 10 steps: 1.25 a + 11.51 / (a - 1), optimum 1 + sqrt(11.51 / 1.25) = 4.03 -> 4.0.
    [(1.0, 1, 5.8), (2.0, 10, 4.0)],
)
def test_epsilon_matches_a_hand_computation(
    noise_multiplier: float, steps: int, best_order: float
) -> None:
    accountant = RdpAccountant(noise_multiplier)
    accountant.step(steps)
    expected = steps * best_order / (2 * noise_multiplier**2) + math.log(1 / DELTA) / (
        best_order - 1
    )
    assert accountant.epsilon(DELTA) == pytest.approx(expected, rel=1e-12)


def test_epsilon_for_one_step_at_sigma_one_is_5_2985() -> None:
    # 5.8 / 2 + ln(1e5) / 4.8 = 2.9 + 2.398526...
    accountant = RdpAccountant(1.0, steps=1)
    assert accountant.epsilon(DELTA) == pytest.approx(5.298526, abs=1e-6)


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
