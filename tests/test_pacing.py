"""Rounds follow the network: whom a round waits for before merging, and until when."""

from __future__ import annotations

import pytest

from p2pfl.pacing import (
    ANYONE,
    FIRST_INTERVAL_S,
    MAX_SENDERS,
    OWN_FACTOR,
    WAIT_FACTOR,
    MixingPace,
)

pytestmark = pytest.mark.unit

OWN = 1000.0  # our own round without waits: long, so that it bounds nothing unless said


def test_nothing_is_awaited_before_the_first_merge() -> None:
    pace = MixingPace(max_wait=30)
    pace.arrived("a", now=1.0, round=0)
    assert pace.wait_until(round=0, now=1.0, own_round_s=OWN) is None


def test_a_live_sender_not_heard_since_the_merge_is_awaited_for_its_interval() -> None:
    pace = MixingPace(max_wait=30)
    pace.arrived("a", now=0.0, round=0)
    pace.arrived("a", now=2.0, round=1)  # its interval: 2 s
    pace.merged(now=2.5)
    assert pace.awaited(round=2, now=3.0, own_round_s=OWN) == {"a": 2.0 + WAIT_FACTOR * 2.0}
    pace.arrived("a", now=3.5, round=2)
    assert pace.wait_until(round=2, now=3.5, own_round_s=OWN) is None


def test_a_sender_heard_once_is_awaited_for_the_first_interval() -> None:
    pace = MixingPace(max_wait=30)
    pace.arrived("a", now=10.0, round=0)
    pace.merged(now=10.1)
    until = pace.wait_until(round=1, now=10.2, own_round_s=OWN)
    assert until == 10.0 + WAIT_FACTOR * FIRST_INTERVAL_S


def test_the_slowest_sender_sets_the_wait_and_max_wait_caps_it() -> None:
    pace = MixingPace(max_wait=5)
    for sender, gap in (("fast", 0.5), ("slow", 2.0)):
        pace.arrived(sender, now=0.0, round=0)
        pace.arrived(sender, now=gap, round=0)
    pace.merged(now=2.0)
    assert pace.wait_until(round=1, now=2.0, own_round_s=OWN) == 2.0 + WAIT_FACTOR * 2.0
    capped = MixingPace(max_wait=1)
    capped.arrived("slow", now=0.0, round=0)
    capped.arrived("slow", now=2.0, round=0)
    capped.merged(now=2.0)
    assert capped.wait_until(round=1, now=2.0, own_round_s=OWN) == 3.0


def test_a_sender_past_its_time_is_not_waited_for() -> None:
    pace = MixingPace(max_wait=30)
    pace.arrived("gone", now=0.0, round=0)
    pace.arrived("gone", now=1.0, round=0)
    pace.merged(now=1.5)
    assert pace.wait_until(round=1, now=1.0 + WAIT_FACTOR * 1.0 + 0.01, own_round_s=OWN) is None


def test_a_dead_sender_stops_being_live_after_live_rounds() -> None:
    pace = MixingPace(max_wait=1000, live_rounds=4)
    pace.arrived("dead", now=0.0, round=0)
    pace.arrived("dead", now=100.0, round=0)  # interval 100 s: its time is far off
    pace.merged(now=100.5)
    assert pace.wait_until(round=4, now=101.0, own_round_s=OWN) is not None
    assert pace.wait_until(round=5, now=101.0, own_round_s=OWN) is None


def test_zero_max_wait_never_waits() -> None:
    pace = MixingPace(max_wait=0)
    pace.arrived("a", now=0.0, round=0)
    pace.merged(now=0.1)
    assert not pace.enabled
    assert pace.wait_until(round=1, now=0.2, own_round_s=OWN) is None


def test_negative_max_wait_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0 seconds"):
        MixingPace(max_wait=-1)


def test_the_sender_table_is_bounded() -> None:
    pace = MixingPace(max_wait=30)
    for i in range(MAX_SENDERS + 10):
        pace.arrived(f"p{i}", now=float(i), round=0)
    pace.merged(now=MAX_SENDERS + 10.0)
    assert len(pace.awaited(round=0, now=0.0, own_round_s=OWN)) <= MAX_SENDERS


def test_one_slow_sender_holds_a_round_to_a_few_of_our_own_rounds_only() -> None:
    """Bounded by our own round, not by the senders' intervals: those grow when rounds
    wait, so bounding by them let one slow member set everyone's pace."""
    pace = MixingPace(max_wait=1000)
    pace.arrived("slow", now=0.0, round=0)
    pace.arrived("slow", now=100.0, round=0)  # every 100 s: its own bound is 300
    pace.merged(now=101.0)
    assert pace.wait_until(round=1, now=101.0, own_round_s=0.5) == 101.0 + OWN_FACTOR * 0.5
    assert pace.wait_until(round=1, now=101.0, own_round_s=1000) == 100.0 + WAIT_FACTOR * 100


def test_with_nobody_live_a_node_that_shared_waits_for_anyone_until_its_limit() -> None:
    pace = MixingPace(max_wait=30)
    pace.merged(now=0.0)  # our first round merged nothing: neighbours still starting
    assert pace.awaited(round=1, now=1.0, own_round_s=OWN, expecting=True) == {ANYONE: 30.0}
    assert pace.wait_until(round=1, now=1.0, own_round_s=OWN) is None  # we shared with no one
    pace.arrived("a", now=12.0, round=1)  # the first share, from whoever sent it
    assert pace.wait_until(round=1, now=12.0, own_round_s=OWN, expecting=True) is None


def test_the_wait_for_anyone_ends_at_the_limit_and_when_senders_are_no_longer_live() -> None:
    pace = MixingPace(max_wait=30, live_rounds=2)
    pace.arrived("a", now=0.0, round=0)
    pace.merged(now=1.0)
    assert pace.wait_until(round=5, now=2.0, own_round_s=OWN, expecting=True) == 31.0
    assert pace.wait_until(round=5, now=31.0, own_round_s=OWN, expecting=True) is None
    short = pace.wait_until(round=5, now=2.0, own_round_s=0.5, expecting=True)
    assert short == 1.0 + OWN_FACTOR * 0.5


def test_a_sender_not_heard_for_twice_its_interval_has_gone_quiet() -> None:
    pace = MixingPace(max_wait=30)
    pace.arrived("a", now=0.0, round=0)
    pace.arrived("a", now=10.0, round=1)  # every 10 s
    pace.arrived("b", now=19.0, round=1)  # heard once: the first interval
    assert pace.gone_quiet(now=25.0) == ["b"]  # 6 s > 2 x 1 s; a within 2 x 10 s
    assert sorted(pace.gone_quiet(now=31.0)) == ["a", "b"]
