"""The gossip core as the daemon's tasks share it: one call at a time, large models off the loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from gossip import AdmissionPolicy, GossipNode, NodeKey
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.member_source import MemberSource
from p2pfl.ratelimit import MIB
from p2pfl.training import LocalTraining

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


def build_gossip_node(
    config: NodeConfig, key: NodeKey, training: LocalTraining, members: MemberSource | None
) -> GossipNode:
    """The node's gossip core: its admission policy, aggregator, codec and first seq."""
    # Under --dp sample the node announces weight 1 and samples 1 instead of its
    # record count, so that DP-SGD's add/remove-one-record guarantee is not undone
    # by a count sent in clear (SECURITY.md); models are then averaged equally.
    samples = 1 if config.dp_mode == "sample" else training.samples
    spec_hash = training.task.spec_hash  # the shared task spec joins the fingerprint
    policy = AdmissionPolicy(
        fingerprint=training.layout.fingerprint,
        max_message_bytes=int(config.max_message_mb * MIB),
        allowlist=None if members is None else members.keys,
        revoked=None if members is None else members.revoked_keys,
        task_spec_hash=spec_hash,
    )
    node = GossipNode.create(
        key,
        training.initial,
        samples=samples,
        policy=policy,
        task_spec_hash=spec_hash,
        aggregator=config.make_aggregator(),
        codec_id=config.compression,
        quorum=config.quorum,
        # A fresh state numbers its updates from the clock (microseconds), so a node
        # that lost its state dir is not refused as a replay by peers that saw its
        # old sequence numbers; a checkpoint, when there is one, overrides this.
        seq=time.time_ns() // 1000,
    )
    non_float = [s.name for s in node.layout.specs if not s.dtype.startswith("float")]
    if config.compression != "raw" and non_float:
        raise ConfigError(
            f"--compression {config.compression}: the model has non-float tensors "
            f"({', '.join(non_float[:3])}); use --compression raw"
        )
    return node
