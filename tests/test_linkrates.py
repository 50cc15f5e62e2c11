"""Deadlines follow each peer's measured link: the first large frame measures it, timeouts
lengthen it, fast frames restore it."""

from __future__ import annotations

import pytest

from p2pfl.config import NodeConfig
from p2pfl.deadlines import Deadlines
from p2pfl.linkrates import (
    FLOOR_MBIT,
    HEADROOM,
    MAX_PEERS,
    SLOWEST_FRACTION,
    UNMEASURED_MBIT,
    LinkRates,
)

pytestmark = pytest.mark.unit

ASSUMED = 1_000_000.0  # 8 Mbit/s in bytes per second
MODEL = 4_500_000  # a 1.1M-parameter model, raw


def test_the_first_large_frame_measures_the_link_above_or_below_the_assumption() -> None:
    rates = LinkRates(ASSUMED)
    assert rates.rate("a") == ASSUMED and not rates.measured("a")
    rates.completed("a", MODEL, 0.1)  # 45 MB/s: far above the assumption
    assert rates.rate("a") == pytest.approx(45_000_000.0 * HEADROOM) and rates.measured("a")
    rates.completed("b", MODEL, MODEL / 125_000)  # 1 Mbit/s: below, taken down to the floor
    assert rates.rate("b") == pytest.approx(max(125_000.0 * HEADROOM, rates.slowest))


def test_default_flags_fit_the_first_push_of_a_shared_10_mbit_uplink() -> None:
    """Issue 24: three pushes of 4.5 MB share a 10 Mbit/s uplink (~11 s each). The
    unmeasured assumption lets the first one through, and the measured rate still fits
    the next ones with the link shared."""
    config = NodeConfig()
    assert config.min_link_mbit is None
    rates, deadlines = LinkRates(config.assumed_link_bytes_per_s), config.deadlines
    assert config.assumed_link_bytes_per_s == UNMEASURED_MBIT * 1e6 / 8
    shared = 10e6 / 8 / 3
    assert deadlines.push(MODEL, rates.rate("a")) > MODEL / shared
    rates.completed("a", MODEL, MODEL / shared)
    assert deadlines.push(MODEL, rates.rate("a")) > MODEL / shared


def test_timeouts_double_the_time_until_a_push_fits_then_the_measure_keeps_it() -> None:
    """A 1 Mbit/s link under an 8 Mbit/s assumption: the 4.5 MB push times out three
    times (its size's share of the deadline doubles each time), then fits, and what it
    achieved (a quarter of it, for the link's other streams) is kept."""
    deadlines = Deadlines(send=5.0, read=10.0, min_link_bytes_per_s=ASSUMED)
    rates = LinkRates(ASSUMED)
    link = 125_000.0  # what the link carries, bytes per second
    needed = MODEL / link
    tries = []
    while (deadline := deadlines.push(MODEL, rates.rate("slow"))) < needed:
        tries.append(deadline)
        rates.timed_out("slow")
    assert [t - 5.0 for t in tries] == pytest.approx([4.5, 9.0, 18.0])
    rates.completed("slow", MODEL, needed)
    assert rates.rate("slow") == pytest.approx(max(link * HEADROOM, rates.slowest))
    assert deadlines.push(MODEL, rates.rate("slow")) >= 2 * needed
    assert rates.rate("other") == ASSUMED  # each peer its own


def test_a_large_slow_frame_lowers_a_measured_rate_but_by_half_at_most() -> None:
    rates = LinkRates(ASSUMED)
    rates.completed("a", MODEL, MODEL * HEADROOM / ASSUMED)  # measured: the assumption
    assert rates.rate("a") == pytest.approx(ASSUMED)
    rates.completed("a", MODEL, MODEL * HEADROOM / (0.375 * ASSUMED))  # to 0.375: only half
    assert rates.rate("a") == pytest.approx(0.5 * ASSUMED)
    rates.completed("a", MODEL, 1000.0)  # one very slow one: half, not the floor
    assert rates.rate("a") == pytest.approx(0.25 * ASSUMED)


def test_a_small_frame_only_raises_the_rate() -> None:
    """A small frame's time is mostly latency, not the link's rate."""
    rates = LinkRates(ASSUMED)
    rates.completed("a", 100, 1.0)  # 100 B/s
    assert rates.rate("a") == ASSUMED
    rates.timed_out("a")
    rates.completed("a", 100, 1.0)
    assert rates.rate("a") == ASSUMED / 2
    rates.completed("a", 200_000, 200_000 * HEADROOM / ASSUMED)
    assert rates.rate("a") == pytest.approx(ASSUMED)


def test_the_rate_has_a_floor() -> None:
    rates = LinkRates(ASSUMED)
    for _ in range(20):
        rates.timed_out("a")
    assert rates.rate("a") == ASSUMED * SLOWEST_FRACTION


def test_remembered_peers_are_bounded() -> None:
    rates = LinkRates(ASSUMED)
    for i in range(MAX_PEERS + 10):
        rates.timed_out(f"peer-{i}")
    assert len(rates.rates) == MAX_PEERS and "peer-0" not in rates.rates


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        LinkRates(0.0)


def test_a_trickling_peer_cannot_drive_a_rate_below_the_floor() -> None:
    rates = LinkRates(UNMEASURED_MBIT * 1e6 / 8)
    for _ in range(20):
        rates.timed_out("a")
    assert rates.rate("a") == FLOOR_MBIT * 1e6 / 8
