"""Silent peers in virtual time: one unanswered push, then weight-0 probes, then a drop.

A neighbour that takes our payloads and never answers a receipt must cost at most one
share of our weight (p2pfl/silence.py, docs/PROTOCOL.md §4).
"""

from __future__ import annotations

import pytest
from test_peer_policy import Share, accepted, peer_id, policy_with

from gossip.delivery import Receipt
from p2pfl.peer_policy import Dropped, Settle
from p2pfl.silence import MAX_STRIKES, PROBES_BEFORE_DROP, SilentPeers

pytestmark = pytest.mark.unit


def test_after_one_unanswered_push_a_peer_gets_probes_not_shares() -> None:
    a, b = peer_id(), peer_id()
    policy = policy_with(a, b)
    assert policy.silent([a, b]) == []
    actions = policy.unanswered(a, Share(1, 0.25), now=1.0, timed_out=True)
    assert Settle(a, Share(1, 0.25), None) in actions
    assert policy.silent([a, b]) == [a]
    assert policy.linkable(a)  # still a neighbour: probed


def test_a_silent_peer_that_answers_is_an_ordinary_neighbour_again() -> None:
    a = peer_id()
    policy = policy_with(a)
    policy.unanswered(a, Share(1, 0.25), now=1.0, timed_out=True)
    policy.answered(a, Share(2, 0.0), accepted(), 100, 0.1, now=2.0)
    assert policy.silent([a]) == []
    assert policy.silence.recovered_count == 1
    assert policy.silence.weight_lost == 0  # the share was given, not lost to silence


def test_unanswered_probes_drop_the_peer_and_count_its_one_share_once() -> None:
    a = peer_id()
    policy = policy_with(a)
    policy.unanswered(a, Share(1, 0.25), now=1.0, timed_out=True)
    drops = []
    for probe in range(PROBES_BEFORE_DROP + 3):
        actions = policy.unanswered(a, Share(2 + probe, 0.0), now=2.0 + probe, timed_out=True)
        drops += [action for action in actions if isinstance(action, Dropped)]
    assert drops == [Dropped(a)]
    assert not policy.linkable(a)  # a spare stands in
    assert policy.silence.dropped_count == 1
    assert policy.silence.weight_lost == pytest.approx(0.25)


def test_a_dropped_peer_that_speaks_is_linkable_again_but_still_probed() -> None:
    a = peer_id()
    policy = policy_with(a)
    for seq in range(PROBES_BEFORE_DROP + 1):
        policy.unanswered(a, Share(seq, 0.25 if seq == 0 else 0.0), now=seq, timed_out=True)
    assert not policy.linkable(a)
    policy.heard_from(a, now=10.0)
    assert policy.linkable(a)
    assert policy.silent([a]) == [a]


def test_a_refusal_at_the_offer_does_not_unsilence() -> None:
    """A refusal at the offer costs the peer nothing: alternating it with silence
    must not earn a share each time."""
    a = peer_id()
    policy = policy_with(a)
    policy.unanswered(a, Share(1, 0.25), now=1.0, timed_out=True)
    policy.offer_refused(a, Share(2, 0.0), Receipt("replay", 0), now=2.0)
    assert policy.silent([a]) == [a]


def test_a_refusal_after_the_payloads_silences_like_no_answer() -> None:
    a = peer_id()
    policy = policy_with(a)
    refused = Receipt("replay", 0).encode()
    policy.answered(a, Share(1, 0.25), refused, 100, 0.1, now=1.0)
    assert policy.silent([a]) == [a]


def test_forgetting_a_silent_peer_counts_its_share_as_lost() -> None:
    silence = SilentPeers()
    silence.not_accepted("p", 0.5)
    silence.forget("p")
    assert silence.weight_lost == 0.5
    assert not silence.is_silent("p")


def test_accepting_free_probes_between_silences_takes_at_most_max_strikes_shares() -> None:
    """The alternating attacker: leaves each share unanswered, accepts the weight-0
    probe that follows (free), and is an ordinary neighbour again."""
    a = peer_id()
    policy = policy_with(a)
    taken = 0
    for round in range(40):
        silent = bool(policy.silent([a]))
        share = Share(round, 0.0 if silent else 0.1)
        if silent:
            policy.answered(a, share, accepted(), 100, 0.1, now=round)
        else:
            taken += 1
            policy.unanswered(a, share, now=round, timed_out=True)
    assert taken == MAX_STRIKES


def test_a_peer_that_never_answers_costs_at_most_one_share_over_many_rounds() -> None:
    """The daemon's loop in miniature: each round a silent neighbour gets a probe of
    weight 0 instead of a share, so whatever it never answers, it took one share."""
    a, b = peer_id(), peer_id()
    policy = policy_with(a, b)
    weight, given_to_a = 1.0, 0.0
    for round in range(20):
        sharing = [p for p in policy.free([a, b]) if p not in policy.silent([a, b])]
        share = weight / (len(sharing) + 1)
        weight -= share * len(sharing)
        for peer in policy.free([a, b]):
            carried = share if peer in sharing else 0.0
            policy.start_pushes(Share(round, carried), [peer])
            if peer == a:  # takes everything, answers nothing
                given_to_a += carried
                policy.unanswered(a, Share(round, carried), now=round, timed_out=True)
            else:  # b accepts, and sends back an equal share to keep weight level
                policy.answered(b, Share(round, carried), accepted(), 100, 0.1, now=round)
                weight += carried
            policy.push_ended(peer)
    assert given_to_a == pytest.approx(1.0 / 3)  # the first round's one share
    assert weight == pytest.approx(2.0 / 3)


def test_a_slow_honest_peer_that_sometimes_times_out_keeps_getting_shares() -> None:
    """Every fourth push times out (a slow link); the others are accepted: each
    accepted share forgives a strike, so it never falls to probes only."""
    a = peer_id()
    policy = policy_with(a)
    shares = 0
    for round in range(60):
        silent = bool(policy.silent([a]))
        share = Share(round, 0.0 if silent else 0.1)
        shares += not silent
        if round % 4 == 3:
            policy.unanswered(a, share, now=round, timed_out=True)
        else:
            policy.answered(a, share, accepted(), 100, 0.1, now=round)
    assert shares >= 40  # with strikes never forgiven: 3 timeouts, then probes only (~12)
