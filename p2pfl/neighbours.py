"""Choosing gossip neighbours: ring neighbours plus a few long links, with bounded in-degree.

This is the small-world recipe (Watts and Strogatz 1998; Kleinberg 2000) made
local. Every node places every known peer on a ring by a hash of its peer id
and links to its nearest successors and predecessors, which alone makes a
connected ring once peers know each other. It then adds a few long links,
which shrink the diameter and speed up mixing.

The long links are random, but every node draws the *same* rank offsets: the
random generator is seeded by a hash of the membership itself (the sorted
peer ids). Node at rank ``r`` links to rank ``r + offset``; since adding an
offset is a bijection on ranks, each node receives exactly as many long
links as it makes. Uniformly random long links would instead give some
nodes many incoming links (in a 200-node network almost always more than
twice the degree). Nodes agree on the offsets without talking; when their
knowledge differs the offsets differ too, and the links are simply random.

What is ranked matters for safety, not just for mixing. Ranked over each node's
own first-hand view, one member that hides from a victim (closes the victim's
connections after Noise, talks normally to everyone else) makes the victim rank
the ring without it while everyone else ranks it with it: ranks and long-link
offsets shift, honest pushes to the victim are refused as ``not-neighbour`` and
the victim's quorum starves (issue 20: 40/0 quorum/bounded merges became 4/36).
So :func:`ranked_membership` ranks over the membership every honest node shares
(the allow file) whenever there is one, and only an open network falls back to
the node's own view. Liveness never enters the ranking; it only decides which
of a node's *candidates* it pushes to (:func:`choose_live`): the ``degree``
links of the rule, then a few spare ring links (:func:`spare_link_count`) that
stand in for candidates it cannot reach. A receiver accepts a push from every
member whose candidates include it (:func:`in_candidates`), computed from the
shared membership alone, so whatever one member shows to whom, the senders a
node accepts and the peers that push to it agree.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

import blake3


def ring_position(peer_id: str) -> int:
    return int.from_bytes(blake3.blake3(peer_id.encode()).digest()[:8], "big")


def long_link_count(degree: int) -> int:
    """One long link per four neighbours, at least one once there are two neighbours."""
    return 0 if degree < 2 else max(1, degree // 4)


def _membership_offsets(members: Sequence[str], count: int, near_span: int) -> list[int]:
    """``count`` distinct rank offsets outside the near neighbourhood, the same on every node."""
    size = len(members)
    candidates = list(range(near_span + 1, size - near_span))
    seed = blake3.blake3("\n".join(members).encode()).digest()[:8]
    return random.Random(int.from_bytes(seed, "big")).sample(candidates,
                                                             min(count, len(candidates)))


def _link_offsets(members: Sequence[str], degree: int) -> list[int]:
    """Rank offsets of every link, ring neighbours first: the same for every member.

    A member at rank ``r`` links to ``r + o`` for each offset ``o``; so the
    member at ``r`` hears from ``r - o``. Near offsets alternate +1, -1, +2, ...
    """
    size = len(members)
    near_count = degree - long_link_count(degree)
    near: list[int] = []
    for step in range(1, size):
        for offset in (step % size, -step % size):
            if len(near) < near_count and offset != 0 and offset not in near:
                near.append(offset)
        if len(near) >= near_count:
            break
    # The near part spans at most ceil(near_count / 2) ranks on each side.
    near_span = (near_count + 1) // 2
    return near + _membership_offsets(members, degree - len(near), near_span)


def _ranked(own: str, known: Sequence[str]) -> tuple[list[str], int]:
    members = sorted(set(known) | {own}, key=lambda p: (ring_position(p), p))
    return members, members.index(own)


def choose_neighbours(own: str, known: Sequence[str], degree: int) -> list[str]:
    """Up to ``degree`` peers of ``known``: ring neighbours first, then long links."""
    peers = set(known) - {own}
    if len(peers) <= degree:
        return sorted(peers, key=ring_position)
    members, rank = _ranked(own, known)
    size = len(members)
    chosen = [members[(rank + offset) % size] for offset in _link_offsets(members, degree)]
    return list(dict.fromkeys(chosen))


def in_neighbours(own: str, known: Sequence[str], degree: int) -> list[str]:
    """The peers of ``known`` that choose ``own`` as a neighbour, when they know what we know.

    Every member runs :func:`choose_neighbours` with the same offsets, so the
    peers that link to us sit at our rank minus each offset: at most
    ``degree`` of them, found without running everyone's choice.
    """
    peers = set(known) - {own}
    if len(peers) <= degree:
        return sorted(peers, key=ring_position)
    members, rank = _ranked(own, known)
    size = len(members)
    return list(
        dict.fromkeys(members[(rank - offset) % size] for offset in _link_offsets(members, degree))
    )


# -- ranking over a shared membership ------------------------------------------------------


def ranked_membership(
    own: str, members: Collection[str] | None, known: Sequence[str]
) -> tuple[str, ...]:
    """What to rank: the shared membership when there is one, else our first-hand view.

    With an allow file every honest member ranks the same list, so nothing a
    member shows or hides moves anyone's links. Without one (an open network)
    there is no shared list, and each node ranks the peers it knows first-hand:
    a member's selective silence can then still shift ranks (SECURITY.md).
    Sorted, with ``own`` in it, so equal memberships give equal tuples.
    """
    ranked = set(members) if members is not None else set(known)
    return tuple(sorted(ranked | {own}))


def spare_link_count(degree: int) -> int:
    """Spare ring links per node: half the degree, at least one.

    Enough to replace one long-link and one ring neighbour that are down at
    once; each spare is one more sender a node accepts, so they are kept few.
    """
    return max(1, degree // 2)


def _candidate_offsets(members: Sequence[str], degree: int) -> list[int]:
    """The ``degree`` link offsets, then the spares: the next ring offsets not yet used.

    Spares continue the near alternation (+1, -1, +2, ...), so a down ring
    neighbour is replaced by the next one along the ring, which keeps the ring
    connected. Needs ``len(members) - 1 > degree + spares`` (else everyone is a
    candidate), so there is always room for every spare.
    """
    size = len(members)
    offsets = _link_offsets(members, degree)
    wanted = len(offsets) + spare_link_count(degree)
    for step in range(1, size):
        for offset in (step % size, -step % size):
            if len(offsets) < wanted and offset != 0 and offset not in offsets:
                offsets.append(offset)
    return offsets


def out_candidates(own: str, members: Sequence[str], degree: int) -> list[str]:
    """Whom ``own`` may push to, in order of preference: its links, then its spares."""
    peers = set(members) - {own}
    if len(peers) <= degree + spare_link_count(degree):
        chosen = choose_neighbours(own, members, degree)
        rest = sorted(peers - set(chosen), key=lambda p: (ring_position(p), p))
        return chosen + rest
    ranked, rank = _ranked(own, members)
    size = len(ranked)
    return list(
        dict.fromkeys(ranked[(rank + o) % size] for o in _candidate_offsets(ranked, degree))
    )


def in_candidates(own: str, members: Sequence[str], degree: int) -> list[str]:
    """The members whose :func:`out_candidates` include ``own``: whom it accepts pushes from.

    At most ``degree + spare_link_count(degree)``. Every offset is a bijection
    on ranks, so ``A`` is here iff ``own`` is among ``A``'s candidates, when
    both rank the same ``members``.
    """
    peers = set(members) - {own}
    if len(peers) <= degree + spare_link_count(degree):
        return sorted(peers, key=lambda p: (ring_position(p), p))
    ranked, rank = _ranked(own, members)
    size = len(ranked)
    return list(
        dict.fromkeys(ranked[(rank - o) % size] for o in _candidate_offsets(ranked, degree))
    )


def choose_live(
    own: str, members: Sequence[str], degree: int, alive: Callable[[str], bool]
) -> list[str]:
    """Up to ``degree`` of our candidates that ``alive`` says we can reach, in order.

    A down link is replaced by the first spare that is up, so a node keeps
    pushing to ``degree`` live peers while at most ``spare_link_count`` of its
    links are down. Which peers are alive is our own view, and may differ
    from others': that is safe, because every candidate accepts us anyway.
    """
    return [p for p in out_candidates(own, members, degree) if alive(p)][:degree]


def effective_quorum(
    quorum: int,
    floor: int,
    own: str,
    members: Sequence[str],
    degree: int,
    alive: Callable[[str], bool],
) -> int:
    """The merge quorum, counted against the in-neighbours we can reach.

    A listed member that is down cannot vote, so a quorum that counts it could
    never be met with enough members down. While any of our ``degree``
    in-neighbours (by the rule, not the spares) is down, the quorum is at most
    the number of those that are alive, and never below ``floor`` (what the
    robust rule needs to discard one value). With none down it is ``quorum``
    unchanged, even in a network too small to meet it. Only a member we cannot
    reach lowers it, and such a member is not voting either, so the votes that
    do count all come from peers we reach.
    """
    expected = in_neighbours(own, members, degree)
    live = sum(1 for p in expected if alive(p))
    if live == len(expected):
        return quorum
    return max(floor, min(quorum, live))
