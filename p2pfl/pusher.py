"""The push pipeline: send each share, tell the peer policy what happened, carry out its answer.

A round never waits for its pushes: each runs in the background, at most one
per link (p2pfl/peer_policy.py decides who is free). A push offers the update
(prefix and signed header) and writes the payloads only once the receiver
answers ``ready`` (``/p2pfl/update/1.2.0``); the receipts decide, by the
ledger's rule, whether a share is refunded or given (gossip/delivery.py), so
weight is never created by a timeout or by what a receiver answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from gossip import Outgoing
from gossip.codec import offer_length
from gossip.delivery import MAX_RECEIPT_BYTES, InvalidReceipt, Receipt
from gossip.keys import public_key_from_peer_id
from p2pfl.gossip_access import GuardedGossip
from p2pfl.membership import Membership
from p2pfl.peer_policy import Action, Disconnect, PeerPolicy, Push, Refund, Settle
from p2pfl.phases import PhaseClock
from p2pfl.protocols import UPDATE_PROTOCOL
from p2pfl.transport import TransportError, Unanswered

logger = logging.getLogger(__name__)


# Weight of the newest answered push in ``Pusher.push_seconds``.
PUSH_SMOOTHING = 0.3


def _timed_out(error: Exception) -> bool:
    return bool(getattr(error, "timed_out", False))


class Pusher:
    """Runs the pushes the policy hands out, in ``nursery`` (set while the node runs)."""

    def __init__(
        self,
        policy: PeerPolicy[Any],
        core: GuardedGossip,
        membership: Membership,
        phases: PhaseClock,
    ) -> None:
        self.policy = policy
        self.core = core
        self.membership = membership
        self.phases = phases
        self.deadlines = membership.deadlines
        self.nursery: trio.Nursery | None = None
        # Told when any push ends (the round loop waits on it: p2pfl/pacing.py).
        self.on_push_end: Callable[[], None] = lambda: None
        # Smoothed seconds an answered push took, offer to receipt: how long our links
        # take to carry one update (bounds the round's wait, p2pfl/pacing.py); 0 until
        # a push was answered.
        self.push_seconds = 0.0

    def push(self, pushes: list[Push[Outgoing]]) -> None:
        """Start each push in the background; the policy already holds their weight
        in flight (:meth:`PeerPolicy.start_pushes`)."""
        assert self.nursery is not None
        for push in pushes:
            self.nursery.start_soon(self._push_alone, push)

    async def _push_alone(self, push: Push[Outgoing]) -> None:
        try:
            await self._push_one(push.peer, push.share)
        finally:
            # After its outcome (a refund included) is carried out: the weight is
            # in flight until it is back in ours, never in neither.
            self.policy.push_ended(push.peer)
            self.on_push_end()

    async def _push_one(self, peer_id: str, outgoing: Outgoing) -> None:
        transport = self.membership.transport
        assert transport is not None
        peer_key = public_key_from_peer_id(peer_id)
        addressed = self.phases.timed("prepare", self.core.node.addressed)
        outgoing = await self.core.call(addressed, outgoing, peer_key, time.time())
        self.policy.addressed(peer_id, outgoing, outgoing.resync)
        message = outgoing.message
        try:
            await self.membership.connect(peer_id)
        except TransportError as error:
            # Not dialled: certainly not delivered. Unreachable until discovery
            # reaches it again; forgotten only once gone a long while.
            logger.debug("push to %s: dial failed: %s", peer_id, error)
            await self.carry_out(self.policy.dial_failed(peer_id, time.monotonic(), outgoing))
            return
        deadline = self.deadlines.push(len(message), self.policy.push_rates.rate(peer_id))
        split = offer_length(message)
        view = memoryview(message)
        started = trio.current_time()
        try:
            with self.phases.timing("send"):  # in the background: overlaps the round
                first, reply = await transport.offer(
                    peer_id, UPDATE_PROTOCOL, view[:split], view[split:], deadline,
                    MAX_RECEIPT_BYTES, lambda answer: Receipt.decode(answer).ready,
                )
            if reply is None:
                # Refused at the offer: it holds nothing of the share.
                refusal = Receipt.decode(first)
                actions = self.policy.offer_refused(peer_id, outgoing, refusal, time.monotonic())
            else:
                seconds = trio.current_time() - started
                self.push_seconds = seconds if not self.push_seconds else (
                    self.push_seconds + PUSH_SMOOTHING * (seconds - self.push_seconds))
                actions = self.policy.answered(
                    peer_id, outgoing, reply, len(message), seconds, time.monotonic()
                )
        except (Unanswered, InvalidReceipt) as error:
            # The payloads went out whole: the share is given (gossip/delivery.py).
            logger.debug("push to %s failed: %s", peer_id, error)
            actions = self.policy.unanswered(
                peer_id, outgoing, time.monotonic(), _timed_out(error)
            )
        except TransportError as error:
            logger.debug("push to %s failed: %s", peer_id, error)
            actions = self.policy.send_failed(
                peer_id, outgoing, time.monotonic(), _timed_out(error)
            )
        await self.carry_out(actions)

    async def carry_out(self, actions: list[Action]) -> None:
        transport = self.membership.transport
        assert transport is not None
        for action in actions:
            if isinstance(action, Refund):
                key = public_key_from_peer_id(action.peer)
                await self.core.call(self._take_back, key, action.share)
            elif isinstance(action, Settle):
                key = public_key_from_peer_id(action.peer)
                await self.core.call(self.core.node.settled, key, action.share, action.receipt)
                if action.receipt is not None and not action.receipt.accepted:
                    logger.info("%s refused our update after its payloads (%s): the share "
                                "stays given", action.peer, action.receipt.verdict)
            elif isinstance(action, Disconnect):
                transport.nursery.start_soon(transport.disconnect, action.peer)
            else:
                self.membership.note(action)

    def _take_back(self, peer_key: bytes, share: Outgoing) -> None:
        """The peer holds none of ``share``: its top-k copy is unchanged, and the weight
        comes back to us (one call, so no poll sees the one without the other)."""
        self.core.node.not_sent(peer_key, share)
        self.core.node.refund(share)
