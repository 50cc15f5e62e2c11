"""The gossip core as the daemon's tasks share it: one call at a time, large models off the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from gossip import GossipNode

T = TypeVar("T")

# From this many parameters on, gossip work (verify and decode, merge, encode and
# sign) runs in a worker thread: at 10M parameters one such step takes from tens
# of milliseconds to seconds, and the loop must keep every stream draining.
OFFLOAD_MIN_PARAMETERS = 1_000_000


class GuardedGossip:
    """Every call into the gossip core holds one lock, so that a call running in a
    worker thread never races another; ``view`` is what /status reads of the core."""

    def __init__(self, node: GossipNode) -> None:
        self.node = node
        self._lock = trio.Lock()
        self.offload = node.layout.size >= OFFLOAD_MIN_PARAMETERS
        self.view = self._view()

    def refresh_view(self) -> None:
        """Re-read the core outside :meth:`call` (only before any task runs: a restore)."""
        self.view = self._view()

    async def call(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work`` on the gossip core: one call at a time, off the loop for large models.

        The status endpoint reads a view refreshed here, under the same lock, so it
        never iterates a table that a worker thread is changing. Nothing yields
        between the refresh and the return, so a caller that records what the call
        did (weight split off, say) before its next await is seen with it together.
        """
        async with self._lock:
            if self.offload:
                result = await trio.to_thread.run_sync(work, *args)
            else:
                result = work(*args)
            self.view = self._view()
            return result

    def _view(self) -> dict[str, Any]:
        node = self.node
        return {
            "counters": node.counters(),
            "weight": node.pushsum.weight,
            "weight_pending": node.votes.pending_weight(),
            "sequence": node.seq,
            "last_seq": dict(node.admission.last_seq),
        }
