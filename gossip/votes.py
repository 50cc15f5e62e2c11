"""The vote table: each in-neighbour's latest admitted estimate, and how fresh it is.

Why a table, not an inbox of "whatever arrived since the last merge": the
daemon is asynchronous. A member that pushes ten times between two merges of
ours turned an inbox into a batch that held only its own updates, and
trimming or clipping a batch of one does nothing (measured: a trimmed-mean
victim moved halfway to the poison on 50 of 433 merges). With the table a
robust rule always runs over one row per sender, the latest that sender
said, next to the rows of every other neighbour heard from recently. However
fast a member pushes, it has one vote.

Push-sum weight is kept apart from the vote. Every admitted share's weight is
recorded as pending until the next merge folds it in, so no weight is lost
whatever the rule (see :meth:`gossip.node.GossipNode.merge`). Shares that
arrive from one sender between two merges combine exactly, as push-sum
combines them (a weighted mean of the estimates, the weights summed), so
under ``mean`` coalescing changes nothing, and under a robust rule a burst
is still one vote.

Freshness is counted in our own local rounds (the core has no clock): a vote
older than ``max_age`` rounds no longer counts toward a quorum or a merge,
so a neighbour that died or left stops voting with the model it last sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gossip.pushsum import Share

# Rounds a vote stays fresh. Paced nodes push once a round, so an honest
# neighbour's vote is 0-1 rounds old; a neighbour half our speed, up to 2.
DEFAULT_MAX_AGE_ROUNDS = 4


@dataclass
class Vote:
    """One sender's row: its latest estimate, the weight not yet folded in, and when."""

    estimate: np.ndarray
    pending_weight: float
    round: int

    def share(self) -> Share:
        return Share(self.estimate, self.pending_weight)


class VoteTable:
    """Per sender, the latest vote; bounded by whoever may push to us."""

    def __init__(self, max_age: int = DEFAULT_MAX_AGE_ROUNDS) -> None:
        if max_age < 0:
            raise ValueError(f"a vote's maximum age must be >= 0 rounds, got {max_age}")
        self.max_age = max_age
        self._votes: dict[bytes, Vote] = {}
        # Shares that arrived while the sender's earlier share was still unmerged.
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._votes)

    def __contains__(self, sender: object) -> bool:
        return sender in self._votes

    def get(self, sender: bytes) -> Vote | None:
        return self._votes.get(sender)

    def senders(self) -> list[bytes]:
        return list(self._votes)

    def record(self, sender: bytes, estimate: np.ndarray, weight: float, round: int) -> None:
        """Make ``estimate`` the sender's vote; its share's weight waits for the next merge.

        A share that arrives while the sender's earlier share is still unmerged
        combines with it as push-sum would (weights add, estimates average by
        weight), so a burst from one sender is one vote and loses no mass.
        """
        earlier = self._votes.get(sender)
        if earlier is not None and earlier.pending_weight > 0:
            self.coalesced += 1
            total = earlier.pending_weight + weight
            if total > 0:
                estimate = earlier.estimate + (weight / total) * (estimate - earlier.estimate)
            self._votes[sender] = Vote(estimate, total, round)
        else:
            self._votes[sender] = Vote(estimate, weight, round)

    def fresh(self, round: int) -> dict[bytes, Vote]:
        """The votes recorded within the last ``max_age`` rounds before ``round``."""
        return {
            sender: vote
            for sender, vote in self._votes.items()
            if round - vote.round <= self.max_age
        }

    def pending_weight(self) -> float:
        """The weight of every share not yet folded in; read only (for the status page)."""
        return sum(vote.pending_weight for vote in self._votes.values())

    def take_pending_weight(self) -> float:
        """The weight of every share not yet folded in, marking it folded in."""
        total = 0.0
        for vote in self._votes.values():
            total += vote.pending_weight
            vote.pending_weight = 0.0
        return total

    def pending_shares(self) -> list[Share]:
        """The unmerged shares, one per sender, for exact push-sum."""
        return [vote.share() for vote in self._votes.values() if vote.pending_weight > 0]

    def forget_stale(self, round: int) -> None:
        """Drop votes too old to count again, once their weight has been folded in."""
        for sender in [s for s, v in self._votes.items() if round - v.round > self.max_age]:
            if self._votes[sender].pending_weight == 0:
                del self._votes[sender]

    def forget_merged(self) -> None:
        """Drop every vote whose weight has been folded in: frees the table when full."""
        for sender in [s for s, v in self._votes.items() if v.pending_weight == 0]:
            del self._votes[sender]

    def keep_only(self, senders: Iterable[bytes]) -> list[Vote]:
        """Forget every sender not in ``senders``; returns their votes (to fold in their weight)."""
        allowed = set(senders)
        return [self._votes.pop(s) for s in [s for s in self._votes if s not in allowed]]

    def clear(self) -> None:
        self._votes.clear()


def distances_from(own: np.ndarray, votes: dict[bytes, Vote]) -> dict[bytes, float]:
    """Each sender's vote's distance from ``own``, relative to ``own``'s norm."""
    scale = max(float(np.linalg.norm(own)), 1e-12)
    return {sender: float(np.linalg.norm(vote.estimate - own)) / scale
            for sender, vote in votes.items()}
