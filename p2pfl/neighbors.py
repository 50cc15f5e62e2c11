"""Choosing gossip neighbours: mostly near peers on an id ring, plus a few random long links.

This is the small-world recipe (Watts and Strogatz 1998; Kleinberg 2000) made
local: every node places every known peer on a ring by a hash of its peer id
and links to its nearest successors and predecessors, which alone makes a
connected ring once peers know each other, and adds a few uniformly random
long links, which shrink the diameter and speed up mixing. Nodes agree on the
ring without talking, so each node's in-degree stays near K as well.
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


def choose_neighbors(
    own: str, known: Sequence[str], degree: int, rng: random.Random, keep: Sequence[str] = ()
) -> list[str]:
    """Up to ``degree`` peers of ``known``: ring neighbours first, then long links.

    ``keep`` are the current long links: they stay while still known, so that
    the overlay does not churn every round.
    """
    peers = sorted(set(known) - {own}, key=ring_position)
    if len(peers) <= degree:
        return peers
    near_count = degree - long_link_count(degree)
    own_position = ring_position(own)
    successors = [p for p in peers if ring_position(p) > own_position] + [
        p for p in peers if ring_position(p) <= own_position
    ]
    predecessors = list(reversed(successors))
    near: list[str] = []
    for index in range(len(peers)):
        for side in (successors, predecessors):
            if len(near) < near_count and side[index] not in near:
                near.append(side[index])
        if len(near) >= near_count:
            break
    others = [p for p in peers if p not in near]
    long_links = [p for p in keep if p in others][: degree - len(near)]
    remaining = [p for p in others if p not in long_links]
    long_links += rng.sample(remaining, min(degree - len(near) - len(long_links), len(remaining)))
    return near + long_links
