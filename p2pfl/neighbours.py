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
"""

from __future__ import annotations

import random
from collections.abc import Sequence

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
