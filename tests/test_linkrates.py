"""Deadlines follow each peer's link: timeouts lengthen them, fast frames restore them."""

from __future__ import annotations

import pytest

from p2pfl.deadlines import Deadlines
from p2pfl.linkrates import MAX_PEERS, SLOWEST_FRACTION, LinkRates

pytestmark = pytest.mark.unit

PROMISED = 1_000_000.0  # 8 Mbit/s in bytes per second
MODEL = 4_500_000  # a 1.1M-parameter model, raw


def test_a_peer_starts_at_the_promised_rate_and_a_fast_link_never_shortens_deadlines() -> None:
    rates = LinkRates(PROMISED)
    assert rates.rate("a") == PROMISED
    rates.completed("a", MODEL, 0.1)  # 45 MB/s: far above the promise
    assert rates.rate("a") == PROMISED and rates.rates == {}


def test_timeouts_double_the_time_until_a_push_fits_then_the_measure_keeps_it() -> None:
    """A 1 Mbit/s link under the default 8 Mbit/s promise: the 4.5 MB push times out
    three times (its size's share of the deadline doubles each time), then fits, and
    what it achieved (half of it, for the link's other streams) is kept."""
    deadlines = Deadlines(send=5.0, read=10.0, min_link_bytes_per_s=PROMISED)
    rates = LinkRates(PROMISED)
    link = 125_000.0  # what the link carries, bytes per second
    needed = MODEL / link
    tries = []
    while (deadline := deadlines.push(MODEL, rates.rate("slow"))) < needed:
        tries.append(deadline)
        rates.timed_out("slow")
    assert [t - 5.0 for t in tries] == pytest.approx([4.5, 9.0, 18.0])
    rates.completed("slow", MODEL, needed)
    assert rates.rate("slow") == pytest.approx(link / 2)
    assert deadlines.push(MODEL, rates.rate("slow")) >= 2 * needed
    assert rates.rate("other") == PROMISED  # each peer its own


def test_a_large_slow_frame_lowers_the_rate_before_any_timeout_but_by_half_at_most() -> None:
    rates = LinkRates(PROMISED)
    rates.completed("a", MODEL, MODEL / (0.75 * PROMISED))  # half of it: 0.375 of the promise
    assert rates.rate("a") == pytest.approx(0.5 * PROMISED)
    rates.completed("a", MODEL, MODEL / (0.75 * PROMISED))
    assert rates.rate("a") == pytest.approx(0.375 * PROMISED)
    rates.completed("a", MODEL, 1000.0)  # one very slow one: half, not the floor
    assert rates.rate("a") == pytest.approx(0.1875 * PROMISED)


def test_a_small_frame_only_raises_the_rate_and_a_fast_one_restores_it() -> None:
    """A small frame's time is mostly latency, not the link's rate."""
    rates = LinkRates(PROMISED)
    rates.completed("a", 100, 1.0)  # 100 B/s
    assert rates.rate("a") == PROMISED
    rates.timed_out("a")
    rates.completed("a", 100, 1.0)
    assert rates.rate("a") == PROMISED / 2
    rates.completed("a", 200_000, 0.01)
    assert rates.rate("a") == PROMISED and rates.rates == {}


def test_the_rate_has_a_floor() -> None:
    rates = LinkRates(PROMISED)
    for _ in range(20):
        rates.timed_out("a")
    assert rates.rate("a") == PROMISED * SLOWEST_FRACTION


def test_remembered_peers_are_bounded() -> None:
    rates = LinkRates(PROMISED)
    for i in range(MAX_PEERS + 10):
        rates.timed_out(f"peer-{i}")
    assert len(rates.rates) == MAX_PEERS and "peer-0" not in rates.rates


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        LinkRates(0.0)
