"""The peer book's rules against eclipse and reflection, on the book alone (no network)."""

from __future__ import annotations

import pytest

from gossip.keys import NodeKey
from p2pfl.peer_exchange import MAX_HEARD_ADDRS, PeerBook

pytestmark = pytest.mark.unit


def peer() -> str:
    return NodeKey.generate().peer_id


def addr(peer_id: str, host: str = "10.0.0.1", port: int = 4001) -> str:
    return f"/ip4/{host}/tcp/{port}/p2p/{peer_id}"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_second_hand_entry_is_stale_and_not_a_neighbour_candidate() -> None:
    clock = Clock()
    book = PeerBook(peer(), clock=clock)
    heard = peer()
    assert book.add(heard, [addr(heard)], first_hand=False, source="s")
    assert book.known() == [] and len(book) == 0
    assert heard in book and book.second_hand() == [heard]


def test_second_hand_entries_hold_at_most_two_addresses_and_first_hand_ones_replace_them() -> None:
    book = PeerBook(peer())
    target = peer()
    bogus = [addr(target, f"10.6.6.{i}") for i in range(8)]
    book.add(target, bogus, first_hand=False, source="liar")
    book.add(target, [addr(target, "10.7.7.7")], first_hand=False, source="other")
    assert book.addrs(target) == bogus[:MAX_HEARD_ADDRS]
    real = addr(target, "10.0.0.9")
    book.add(target, [real], observed_ip="10.0.0.9")
    assert book.addrs(target) == [real]


def test_a_flood_of_fake_ids_never_evicts_first_hand_peers() -> None:
    book = PeerBook(peer(), max_peers=16)
    honest = [peer() for _ in range(4)]
    for honest_peer in honest:
        book.add(honest_peer, [addr(honest_peer)], observed_ip="10.0.0.1")
    for source in range(17):
        for _ in range(64):
            fake = peer()
            book.add(fake, [addr(fake)], first_hand=False, source=f"liar{source}")
    assert book.known() == sorted(honest)
    assert len(book.second_hand()) <= book.max_second_hand


def test_one_source_gets_at_most_its_quota_of_second_hand_entries() -> None:
    book = PeerBook(peer(), per_source_quota=5)
    for _ in range(20):
        fake = peer()
        book.add(fake, [addr(fake)], first_hand=False, source="liar")
    assert len(book.second_hand()) == 5
    assert book.rejected["over-quota"] == 15


def test_only_first_hand_peers_at_verified_addresses_are_passed_on() -> None:
    book = PeerBook(peer())
    heard, claimed_elsewhere, honest = peer(), peer(), peer()
    book.add(heard, [addr(heard)], first_hand=False, source="s")
    # Claims an address on an IP other than the one its connection came from.
    book.add(claimed_elsewhere, [addr(claimed_elsewhere, "10.9.9.9")], observed_ip="10.0.0.2")
    book.add(honest, [addr(honest, "10.0.0.3"), addr(honest, "10.8.8.8")], observed_ip="10.0.0.3")
    assert book.sample(64) == [(honest, [addr(honest, "10.0.0.3")])]


def test_a_second_hand_entry_is_forgotten_at_its_first_failure() -> None:
    book = PeerBook(peer())
    heard = peer()
    book.add(heard, [addr(heard)], first_hand=False, source="s")
    assert book.mark_failed(heard) is True
    assert heard not in book
