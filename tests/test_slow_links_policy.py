"""Issue 24's network decisions in virtual time: silence costs one share, training waits
for the network within a bound, and "done" means the neighbours have the final model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gossip.delivery import Receipt
from gossip.keys import NodeKey
from p2pfl.peer_policy import MAX_ROUNDS_AHEAD, Dropped, MemberBook, PeerPolicy, Settle
from p2pfl.silence import PROBE_AFTER_S, PROBES_BEFORE_DROP

pytestmark = pytest.mark.unit

RATE = 1e6  # bytes per second


@dataclass(frozen=True)
class Share:
    seq: int
    weight: float


def peer_id() -> str:
    return NodeKey.generate().peer_id


def policy_with(*peers: str) -> PeerPolicy[Share]:
    book = MemberBook(peer_id(), None, clock=lambda: 0.0)
    for peer in peers:
        book.add(peer, [f"/ip4/10.0.0.1/tcp/1/p2p/{peer}"], observed_ip="10.0.0.1")
    return PeerPolicy.create(book, RATE)


def accepted() -> bytes:
    return Receipt("accepted", 3).encode()


def test_a_silent_neighbour_costs_at_most_one_share_over_many_rounds() -> None:
    """A node pushes each second to an honest and a silent neighbour for ten minutes of
    virtual time, splitting push-sum weight as the daemon does. The silent one (payloads
    taken, no final receipt) gets one share, then only weight-0 probes; it is dropped,
    counted, and its share accounted as lost once."""
    honest, silent = peer_id(), peer_id()
    policy = policy_with(honest, silent)
    weight, seq, given_to_silent, dropped = 100.0, 0, [], []
    for second in range(600):
        now = float(second)
        targets = policy.free([honest, silent])
        probes = policy.probes_due(now)
        seq += 1
        share = Share(seq, weight / (len(targets) + 1))
        weight = share.weight
        probe = Share(seq, 0.0)
        pushes = [*policy.start_pushes(share, targets), *policy.start_pushes(probe, probes)]
        for push in pushes:
            if push.peer == honest:
                policy.answered(honest, push.share, accepted(), 1000, 0.01, now)
                weight += push.share.weight  # the honest neighbour sends as much back
            else:
                given_to_silent.append(push.share.weight)
                actions = policy.unanswered(silent, push.share, now, timed_out=True)
                assert Settle(silent, push.share, None) in actions
                dropped += [a for a in actions if isinstance(a, Dropped)]
            policy.push_ended(push.peer)
    assert [w for w in given_to_silent if w > 0] == [pytest.approx(100 / 3)]
    # Probes back off: at 20, 60, 140 (the drop), then 300 s; never a share again.
    assert len(given_to_silent) == 1 + 4
    assert dropped == [Dropped(silent)]
    assert policy.silence.is_dropped(silent) and policy.silence.dropped_count == 1
    assert policy.silence.weight_lost == pytest.approx(100 / 3)  # once, not per probe
    assert weight == pytest.approx(100 - 100 / 3)


def test_a_silent_peer_gets_probes_not_shares_until_it_answers() -> None:
    a = peer_id()
    policy = policy_with(a)
    policy.start_pushes(Share(1, 0.5), [a])
    policy.unanswered(a, Share(1, 0.5), now=0.0, timed_out=True)
    policy.push_ended(a)
    assert policy.free([a]) == []  # no further share
    assert policy.probes_due(PROBE_AFTER_S - 1) == []
    assert policy.probes_due(PROBE_AFTER_S) == [a]
    policy.start_pushes(Share(2, 0.0), [a])
    policy.answered(a, Share(2, 0.0), accepted(), 1000, 0.01, now=PROBE_AFTER_S + 1)
    policy.push_ended(a)
    assert policy.free([a]) == [a] and policy.silence.recovered_count == 1
    assert policy.silence.weight_lost == 0  # answered before the drop: given, not lost


def test_a_forgotten_silent_peer_accounts_its_share_as_lost_once() -> None:
    a = peer_id()
    policy = policy_with(a)
    policy.unanswered(a, Share(1, 0.5), now=0.0, timed_out=False)
    policy._forget(a)
    policy._forget(a)
    assert policy.silence.weight_lost == pytest.approx(0.5)


def test_training_waits_for_the_network_only_while_a_push_is_in_flight() -> None:
    a, b = peer_id(), peer_id()
    policy = policy_with(a, b)
    done = 1 + MAX_ROUNDS_AHEAD  # rounds trained; the first one's model is on its way
    policy.start_pushes(Share(1, 0.3), [a, b], round=1)
    assert all(policy.may_train(r) for r in range(done))
    assert not policy.may_train(done)  # its round-1 model reached nobody yet
    policy.answered(a, Share(1, 0.3), accepted(), 1000, 0.01, now=1.0)
    policy.push_ended(a)
    assert policy.reached_round == 1 and policy.may_train(done)
    assert not policy.may_train(done + 1)  # b's push is still in flight
    policy.send_failed(b, Share(1, 0.3), now=2.0, timed_out=True)
    policy.push_ended(b)
    assert policy.may_train(done + 1)  # nothing in flight: nothing to wait for


def test_a_lone_node_is_never_held() -> None:
    policy = policy_with()
    assert all(policy.may_train(r) for r in range(100))


def test_the_final_model_has_reached_every_neighbour_but_a_dropped_one() -> None:
    a, b, c = peer_id(), peer_id(), peer_id()
    policy = policy_with(a, b, c)
    policy.start_pushes(Share(1, 0.2), [a, b, c], round=10)
    policy.answered(a, Share(1, 0.2), accepted(), 1000, 0.01, now=1.0)
    assert not policy.final_model_reached([a, b, c], 10)
    policy.answered(b, Share(1, 0.2), Receipt("stale", 1).encode(), 1000, 0.01, now=1.0)
    assert not policy.final_model_reached([a, b], 10)  # refused: b does not have it
    for probe in range(PROBES_BEFORE_DROP + 1):
        policy.unanswered(c, Share(2 + probe, 0.0), now=float(probe), timed_out=True)
    assert policy.silence.is_dropped(c)
    assert policy.final_model_reached([a, c], 10)
