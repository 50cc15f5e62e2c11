"""Deadlines follow each peer's link: timeouts lengthen them, fast frames restore them."""

from __future__ import annotations

import pytest

from p2pfl.deadlines import Deadlines
from p2pfl.linkrates import MAX_PEERS, SLOWEST_FRACTION, LinkRates

PROMISED = 1_000_000.0  # 8 Mbit/s in bytes per second
MODEL = 4_500_000  # a 1.1M-parameter model, raw


def test_a_peer_starts_at_the_promised_rate_and_a_fast_link_never_shortens_deadlines() -> None:
    rates = LinkRates(PROMISED)
    assert rates.rate("a") == PROMISED
    rates.completed("a", MODEL, 0.1)  # 45 MB/s: far above the promise
    assert rates.rate("a") == PROMISED and rates.rates == {}


def test_timeouts_double_the_time_until_a_push_fits() -> None:
    """A 1 Mbit/s link under the default 8 Mbit/s promise: the 4.5 MB push times out
    three times (its size's share of the deadline doubles each time), then fits, and
    its completion does not take that back."""
    deadlines = Deadlines(send=5.0, read=10.0, min_link_bytes_per_s=PROMISED)
    rates = LinkRates(PROMISED)
    needed = MODEL / 125_000.0  # what the link carries, bytes per second
    tries = []
    while (deadline := deadlines.push(MODEL, rates.rate("slow"))) < needed:
        tries.append(deadline)
        rates.timed_out("slow")
    assert [t - 5.0 for t in tries] == pytest.approx([4.5, 9.0, 18.0])
    rates.completed("slow", MODEL, needed)
    assert deadlines.push(MODEL, rates.rate("slow")) > needed
    assert rates.rate("other") == PROMISED  # each peer its own


def test_a_slow_completion_never_lowers_the_rate_and_a_fast_one_restores_it() -> None:
    """A frame that waited on the receiver's lock, or a small one (mostly latency),
    completes slowly without the link being slow."""
    rates = LinkRates(PROMISED)
    rates.timed_out("a")
    rates.completed("a", 100, 1.0)  # 100 B/s
    assert rates.rate("a") == PROMISED / 2
    rates.completed("a", MODEL, MODEL / (0.75 * PROMISED))  # half of it: 0.375 of the promise
    assert rates.rate("a") == PROMISED / 2
    rates.completed("a", MODEL, MODEL / (1.5 * PROMISED))  # half of it: 0.75
    assert rates.rate("a") == pytest.approx(0.75 * PROMISED)
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
