"""Neighbour sets agree whatever one member shows to whom (issue 20, part 5).

Pure tests of the rule in ``p2pfl/neighbours.py``, no network. The attack they
model: one member with a valid key closes its connections to a victim after
Noise and talks normally to everyone else, so the victim's first-hand view
lacks it while everyone else's has it. Ranked over first-hand views that shifted
ranks and long-link offsets; ranked over the shared membership (the allow file)
it moves nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.keys import NodeKey
from p2pfl.neighbours import (
    choose_live,
    choose_neighbours,
    effective_quorum,
    in_candidates,
    in_neighbours,
    out_candidates,
    ranked_membership,
    spare_link_count,
)

pytestmark = pytest.mark.property


def peer_ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [NodeKey(rng.randbytes(32)).peer_id for _ in range(count)]


def views_with_a_hider(ids: list[str], hider: str, victim: str) -> dict[str, list[str]]:
    """Each node's first-hand peers when ``hider`` hides from ``victim`` only."""
    views = {own: [p for p in ids if p != own] for own in ids}
    views[victim] = [p for p in views[victim] if p != hider]
    views[hider] = [p for p in views[hider] if p != victim]
    return views


def sets_per_node(
    ids: list[str], views: dict[str, list[str]], allow: frozenset[str] | None, degree: int
) -> dict[str, tuple[list[str], list[str]]]:
    """(out-neighbours, in-neighbours) of every node, as the runtime ranks them."""
    result = {}
    for own in ids:
        ranked = ranked_membership(own, allow, views[own])
        result[own] = (choose_neighbours(own, ranked, degree), in_neighbours(own, ranked, degree))
    return result


def test_the_attack_moves_neighbours_when_ranked_over_first_hand_views() -> None:
    # The bug this file guards against, shown on the old rule: without a shared
    # membership the victim's in-neighbours no longer match who chooses it.
    ids = peer_ids(8, seed=1)
    moved = 0
    for hider in ids:
        for victim in ids:
            if hider == victim:
                continue
            sets = sets_per_node(ids, views_with_a_hider(ids, hider, victim), None, 4)
            choosers = {a for a in ids if a != hider and victim in sets[a][0]}
            moved += choosers != set(sets[victim][1]) - {hider}
    assert moved > 0


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=2, max_value=40),
    degree=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**32),
    picks=st.tuples(st.integers(min_value=0), st.integers(min_value=0)),
)
def test_a_member_hiding_from_a_victim_moves_nobodys_neighbours(
    size: int, degree: int, seed: int, picks: tuple[int, int]
) -> None:
    ids = peer_ids(size, seed)
    hider = ids[picks[0] % size]
    victim = ids[(picks[0] + 1 + picks[1] % (size - 1)) % size]
    allow = frozenset(ids)
    full = {own: [p for p in ids if p != own] for own in ids}
    clean = sets_per_node(ids, full, allow, degree)
    attacked = sets_per_node(ids, views_with_a_hider(ids, hider, victim), allow, degree)
    assert attacked == clean
    for own in ids:
        ranked = ranked_membership(own, allow, views_with_a_hider(ids, hider, victim)[own])
        assert in_candidates(own, ranked, degree) == in_candidates(own, ids, degree)
        assert out_candidates(own, ranked, degree) == out_candidates(own, ids, degree)


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=40),
    degree=st.integers(min_value=1, max_value=10),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_a_chooses_b_iff_b_counts_a_as_in_neighbour(size: int, degree: int, seed: int) -> None:
    ids = peer_ids(size, seed)
    for a in ids:
        chosen = set(choose_neighbours(a, ids, degree))
        candidates = set(out_candidates(a, ids, degree))
        for b in ids:
            if b == a:
                continue
            assert (b in chosen) == (a in in_neighbours(b, ids, degree))
            assert (b in candidates) == (a in in_candidates(b, ids, degree))
    for own in ids:
        assert len(in_candidates(own, ids, degree)) <= degree + spare_link_count(degree)
        assert own not in in_candidates(own, ids, degree)
        # The links of the rule come first among the candidates.
        assert out_candidates(own, ids, degree)[:degree] == choose_neighbours(own, ids, degree)


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(min_value=2, max_value=40),
    degree=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**32),
    down_seed=st.integers(min_value=0, max_value=2**32),
)
def test_whatever_a_pusher_sees_as_down_its_receivers_accept_it(
    size: int, degree: int, seed: int, down_seed: int
) -> None:
    # Each node has its own (possibly wrong) view of who is down; pushes still land.
    ids = peer_ids(size, seed)
    rng = random.Random(down_seed)
    for a in ids:
        down = {p for p in ids if rng.random() < 0.3}
        pushed = choose_live(a, ids, degree, lambda p, down=down: p not in down)
        assert len(pushed) <= degree and not set(pushed) & down
        for b in pushed:
            assert a in in_candidates(b, ids, degree)


def test_spares_keep_a_node_pushing_to_degree_live_peers() -> None:
    ids = peer_ids(30, seed=3)
    degree = 4
    for own in ids:
        links = choose_neighbours(own, ids, degree)
        for gone in range(spare_link_count(degree) + 1):
            down = set(links[:gone])
            live = choose_live(own, ids, degree, lambda p, down=down: p not in down)
            assert len(live) == degree
            assert not set(live) & down
            assert [p for p in links if p not in down] == live[: degree - gone]


def alive_except(down: set[str]) -> Callable[[str], bool]:
    return lambda p: p not in down


def test_quorum_counts_only_reachable_in_neighbours() -> None:
    ids = peer_ids(8, seed=5)
    own, degree = ids[0], 4
    expected = in_neighbours(own, ids, degree)
    assert len(expected) == 4
    # Nobody down: the configured quorum, even if the network could not meet it.
    assert effective_quorum(3, 2, own, ids, degree, alive_except(set())) == 3
    assert effective_quorum(5, 2, own, ids, degree, alive_except(set())) == 5
    # One down of four: three can still vote, the quorum of three stands.
    assert effective_quorum(3, 2, own, ids, degree, alive_except(set(expected[:1]))) == 3
    # Two down: only two can vote; never below the rule's floor.
    assert effective_quorum(3, 2, own, ids, degree, alive_except(set(expected[:2]))) == 2
    assert effective_quorum(3, 2, own, ids, degree, alive_except(set(expected))) == 2
    # Members that are not our in-neighbours being down changes nothing.
    others = {p for p in ids[1:] if p not in expected}
    assert effective_quorum(3, 2, own, ids, degree, alive_except(others)) == 3


def test_open_network_ranks_the_first_hand_view_and_allowlist_ranks_the_list() -> None:
    ids = peer_ids(6, seed=9)
    own = ids[0]
    assert ranked_membership(own, None, ids[1:4]) == tuple(sorted(ids[:4]))
    assert ranked_membership(own, frozenset(ids), ids[1:2]) == tuple(sorted(ids))


def _doc_in_candidates(own: str, members: list[str], k: int) -> set[str]:
    """docs/PROTOCOL.md §4.1 written out afresh, without p2pfl.neighbours: what an
    independent implementer would compute."""
    import blake3

    def position(p: str) -> int:
        return int.from_bytes(blake3.blake3(p.encode()).digest()[:8], "big")

    ranked = sorted(set(members) | {own}, key=lambda p: (position(p), p))
    n, rank = len(ranked), ranked.index(own)
    long_count = 0 if k < 2 else max(1, k // 4)
    spares = max(1, k // 2)
    if n - 1 <= k + spares:
        return set(ranked) - {own}
    alternation = [o for step in range(1, n) for o in (step % n, -step % n)]
    near: list[int] = []
    for o in alternation:
        if len(near) < k - long_count and o != 0 and o not in near:
            near.append(o)
    h = (len(near) + 1) // 2
    seed = int.from_bytes(blake3.blake3("\n".join(ranked).encode()).digest()[:8], "big")
    pool = list(range(h + 1, n - h))
    offsets = near + random.Random(seed).sample(pool, min(long_count, len(pool)))
    for o in alternation:
        if len(offsets) < k + spares and o != 0 and o not in offsets:
            offsets.append(o)
    return {ranked[(rank - o) % n] for o in offsets}


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=60),
    degree=st.integers(min_value=1, max_value=10),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_the_protocol_document_predicts_the_in_candidates(
    size: int, degree: int, seed: int
) -> None:
    ids = peer_ids(size, seed)
    for own in ids:
        assert set(in_candidates(own, ids, degree)) == _doc_in_candidates(own, ids, degree)
