"""What each peer's pushes to us came to: accepted, refused by reason, and when last heard.

/status shows it per in-neighbour (the page's neighbour table). The table is an
LRU capped at MAX_PEERS: a member set is small, but every refused offer of any
peer id lands here, and a flood of fresh ids must not grow the daemon's memory.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_PEERS = 256


@dataclass
class _Activity:
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    last_heard: float = 0.0


class PeerActivity:
    """Per sender: updates accepted, refused by reason, and the last time it pushed."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self.max_peers = max_peers
        self._peers: OrderedDict[str, _Activity] = OrderedDict()

    def _entry(self, peer_id: str, now: float) -> _Activity:
        entry = self._peers.pop(peer_id, None) or _Activity()
        entry.last_heard = now
        self._peers[peer_id] = entry  # most recent last
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return entry

    def accepted(self, peer_id: str, now: float) -> None:
        self._entry(peer_id, now).accepted += 1

    def refused(self, peer_id: str, reason: str, now: float) -> None:
        self._entry(peer_id, now).refused[reason] += 1

    def view(self, now: float) -> dict[str, dict[str, Any]]:
        """Peer id -> ``accepted``, ``refused`` (reason -> count), ``last_heard_s_ago``."""
        return {
            peer_id: {
                "accepted": entry.accepted,
                "refused": dict(entry.refused),
                "last_heard_s_ago": round(now - entry.last_heard, 1),
            }
            for peer_id, entry in self._peers.items()
        }
