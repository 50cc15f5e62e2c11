"""The peer policy in virtual time: events with an explicit ``now`` in, actions out.

No socket, no trio, no clock: each test feeds what a push or a dial did and checks
what the policy decides (refund or give, disconnect, mark unreachable, forget).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gossip.delivery import READY, Receipt
from gossip.keys import NodeKey
from p2pfl.linkrates import HEADROOM, MEASURE_MIN_BYTES
from p2pfl.peer_exchange import FORGET_UNREACHABLE_AFTER_S, MAX_CONSECUTIVE_FAILURES
from p2pfl.peer_policy import (
    FAILURES_BEFORE_REDIAL,
    Disconnect,
    Forget,
    MarkUnreachable,
    MemberBook,
    PeerPolicy,
    Push,
    Redial,
    Refund,
    Settle,
)

pytestmark = pytest.mark.unit

PROMISED = 1e6  # bytes per second


@dataclass(frozen=True)
class Share:
    seq: int
    weight: float


def peer_id() -> str:
    return NodeKey.generate().peer_id


def policy_with(*peers: str, members: frozenset[str] | None = None) -> PeerPolicy[Share]:
    book = MemberBook(peer_id(), members, clock=lambda: 0.0)
    for peer in peers:
        book.add(peer, [f"/ip4/10.0.0.1/tcp/1/p2p/{peer}"], observed_ip="10.0.0.1")
    return PeerPolicy.create(book, PROMISED)


def accepted() -> bytes:
    return Receipt("accepted", 3).encode()


def test_a_started_push_is_in_flight_until_it_ends() -> None:
    a, b = peer_id(), peer_id()
    policy = policy_with(a, b)
    share = Share(1, 0.25)
    assert policy.start_pushes(share, [a, b]) == [Push(a, share), Push(b, share)]
    assert policy.weight_in_flight == pytest.approx(0.5)
    assert policy.free([a, b]) == []
    policy.push_ended(a)
    assert policy.weight_in_flight == pytest.approx(0.25)
    assert policy.free([a, b]) == [a]


def test_a_peer_with_a_push_in_flight_gets_no_second_one() -> None:
    a = peer_id()
    policy = policy_with(a)
    policy.start_pushes(Share(1, 0.5), [a])
    assert policy.start_pushes(Share(2, 0.5), [a]) == []
    assert policy.weight_in_flight == 0.5


def test_an_offer_refused_is_refunded_and_the_peer_is_alive() -> None:
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    actions = policy.offer_refused(a, share, Receipt("not-neighbour", 0), now=10.0)
    assert actions == [Refund(a, share)]
    assert policy.deliveries.counts == {"refunded": 1}
    assert policy.pushes_refused == {"not-neighbour": 1}
    assert policy.book.reachable(a)


def test_a_refusal_after_the_payloads_is_given_and_disputed() -> None:
    """A receiver that keeps the payloads and says no earns no refund (gossip/delivery.py)."""
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    refusal = Receipt("replay", 1)
    actions = policy.answered(a, share, refusal.encode(), 1000, 0.1, now=1.0)
    assert actions == [Settle(a, share, refusal)]
    assert not any(isinstance(action, Refund) for action in actions)
    assert policy.deliveries.counts == {"disputed": 1}
    assert policy.deliveries.disputes == {a: 1}
    assert policy.updates_sent == 0


def test_an_accepted_push_is_delivered_and_counted() -> None:
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    assert policy.answered(a, share, accepted(), 1000, 0.1, now=1.0) == [
        Settle(a, share, Receipt.decode(accepted()))
    ]
    assert policy.updates_sent == 1
    assert policy.deliveries.counts == {"delivered": 1}


def test_a_garbled_receipt_counts_as_unanswered_and_the_share_is_given() -> None:
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    actions = policy.answered(a, share, b"\xff not a receipt", 1000, 0.1, now=1.0)
    assert actions == [Settle(a, share, None)]
    assert policy.deliveries.counts == {"unanswered": 1}
    assert policy.send_failures == {a: 1}


def test_a_push_that_failed_before_its_payloads_left_is_refunded() -> None:
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    actions = policy.send_failed(a, share, now=1.0, timed_out=False)
    assert actions == [Refund(a, share)]
    assert policy.deliveries.counts == {"refunded": 1}
    assert policy.send_failures == {a: 1}
    # A failed stream is not a failed dial: the peer stays reachable.
    assert policy.book.reachable(a)


def test_pushes_failing_in_a_row_close_the_connection_once_then_count_again() -> None:
    a = peer_id()
    policy = policy_with(a)
    outcomes = [
        policy.unanswered(a, Share(seq, 0.1), now=float(seq), timed_out=False)
        for seq in range(1, 2 * FAILURES_BEFORE_REDIAL + 1)
    ]
    disconnects = [[x for x in actions if isinstance(x, Disconnect)] for actions in outcomes]
    expected = ([[]] * (FAILURES_BEFORE_REDIAL - 1) + [[Disconnect(a)]]) * 2
    assert disconnects == expected


def test_an_answered_push_resets_the_failures_in_a_row() -> None:
    a = peer_id()
    policy = policy_with(a)
    for seq in range(FAILURES_BEFORE_REDIAL - 1):
        policy.send_failed(a, Share(seq, 0.1), now=0.0, timed_out=False)
    policy.answered(a, Share(9, 0.1), accepted(), 100, 0.01, now=1.0)
    actions = policy.send_failed(a, Share(10, 0.1), now=2.0, timed_out=False)
    assert not any(isinstance(action, Disconnect) for action in actions)


def test_a_timed_out_push_halves_that_peers_rate_only() -> None:
    a, b = peer_id(), peer_id()
    policy = policy_with(a, b)
    policy.unanswered(a, Share(1, 0.1), now=1.0, timed_out=True)
    assert policy.push_rates.rate(a) == PROMISED / 2
    assert policy.push_rates.rate(b) == PROMISED


def test_a_completed_large_push_sets_the_rate_it_showed() -> None:
    a = peer_id()
    policy = policy_with(a)
    size = 4 * MEASURE_MIN_BYTES
    policy.answered(a, Share(1, 0.1), accepted(), size, size / (PROMISED * 4), now=1.0)
    # The first large frame measures the link: a share of the rate achieved (headroom).
    first = PROMISED * 4 * HEADROOM
    assert policy.push_rates.rate(a) == first
    policy.answered(a, Share(2, 0.1), accepted(), size, size / (PROMISED / 256), now=2.0)
    # A later one lowers it by half at most.
    assert policy.push_rates.rate(a) == first / 2


def test_a_failed_dial_of_a_push_refunds_and_makes_the_peer_unreachable() -> None:
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    assert policy.dial_failed(a, now=0.0, share=share) == [Refund(a, share), MarkUnreachable(a)]
    assert a in policy.book.known() and not policy.book.reachable(a)
    assert policy.free([a]) == []
    assert policy.redials() == [Redial(a)]


def test_an_unreachable_peer_that_answers_is_reachable_again() -> None:
    a = peer_id()
    policy = policy_with(a)
    policy.dial_failed(a, now=0.0)
    policy.heard_from(a, now=5.0)
    assert policy.book.reachable(a) and policy.redials() == []


def test_a_peer_is_forgotten_only_after_failures_spread_over_the_forget_time() -> None:
    a = peer_id()
    policy = policy_with(a)
    # A partition's worth of failures in a short time: unreachable, never forgotten.
    for second in range(10 * MAX_CONSECUTIVE_FAILURES):
        assert policy.dial_failed(a, now=float(second)) == [MarkUnreachable(a)]
    assert a in policy.book.known()
    # The same run of failures, FORGET_UNREACHABLE_AFTER_S after its first: forgotten.
    assert policy.dial_failed(a, now=FORGET_UNREACHABLE_AFTER_S) == [Forget(a)]
    assert a not in policy.book and policy.redials() == []


def test_forgetting_a_peer_drops_its_rates_and_failures_in_a_row() -> None:
    """Forget has one owner: nothing kept per peer outlives the peer in the book."""
    a, b = peer_id(), peer_id()
    policy = policy_with(a, b)
    for who in (a, b):
        policy.unanswered(who, Share(1, 0.1), now=0.0, timed_out=True)
        policy.read_rates.timed_out(who)
    policy.dial_failed(a, now=0.0)
    policy.dial_failed(a, now=1.0)
    assert policy.dial_failed(a, now=FORGET_UNREACHABLE_AFTER_S) == [Forget(a)]
    assert a not in policy.push_rates.rates and a not in policy.read_rates.rates
    assert a not in policy.failures_in_a_row
    assert b in policy.push_rates.rates and b in policy.failures_in_a_row


def test_a_dial_that_failed_after_a_long_quiet_spell_does_not_forget_at_once() -> None:
    """The forget time counts from the first failure of the current run, not from when
    the peer was last seen: a peer quiet for long but answering is not gone."""
    a = peer_id()
    policy = policy_with(a)
    policy.heard_from(a, now=0.0)
    for n in range(MAX_CONSECUTIVE_FAILURES):
        assert policy.dial_failed(a, now=10 * FORGET_UNREACHABLE_AFTER_S + n) == [
            MarkUnreachable(a)
        ]


def test_a_second_hand_peer_is_forgotten_at_its_first_failed_dial() -> None:
    a, heard = peer_id(), peer_id()
    policy = policy_with(a)
    policy.book.add(heard, [f"/ip4/10.0.0.2/tcp/1/p2p/{heard}"], first_hand=False, source=a)
    assert policy.dial_failed(heard, now=0.0) == [Forget(heard)]


def test_a_non_member_is_never_recorded() -> None:
    member, outsider = peer_id(), peer_id()
    policy = policy_with(member, outsider, members=frozenset({member}))
    assert policy.book.known() == [member]
    assert policy.book.rejected["not-member"] == 1


def test_the_mass_in_flight_is_conserved_through_a_refund() -> None:
    """Weight split for a push is in flight from the split until the refund is carried
    out: at no step between does a poll see it in neither place."""
    a = peer_id()
    policy = policy_with(a)
    weight = 1.0
    share = Share(1, 0.5)
    weight -= share.weight  # the gossip core splits it off...
    policy.start_pushes(share, [a])  # ...and the policy holds it in the same step
    assert weight + policy.weight_in_flight == 1.0
    [refund] = policy.offer_refused(a, share, Receipt("stale", 0), now=1.0)
    assert weight + policy.weight_in_flight == 1.0  # not yet folded back: still in flight
    assert isinstance(refund, Refund)
    weight += refund.share.weight  # the driver carries the refund out...
    policy.push_ended(a)  # ...then ends the push
    assert weight + policy.weight_in_flight == 1.0


def test_ready_is_not_a_receipt_for_payloads_but_is_accepted_as_given() -> None:
    """A receiver that answers the payloads with ``ready`` confuses nobody: given, disputed."""
    a = peer_id()
    policy = policy_with(a)
    share = Share(1, 0.5)
    actions = policy.answered(a, share, Receipt(READY, 0).encode(), 10, 0.01, now=0.0)
    assert actions == [Settle(a, share, Receipt(READY, 0))]
    assert policy.deliveries.counts == {"disputed": 1}
