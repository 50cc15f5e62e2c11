"""Inbound pushes: judge each update by its offer, then admit its payloads.

A pushed update arrives in two steps (``/p2pfl/update/1.2.0``, gossip/delivery.py):
its offer is screened from the header alone, and only an offer answered
``ready`` has its payloads read. Every refusal is counted by reason and logged
in bounded lines.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from gossip import Reason
from gossip.attacks import RECEIPT_LIE
from gossip.delivery import Receipt
from gossip.keys import public_key_from_peer_id
from p2pfl.gossip_access import GuardedGossip
from p2pfl.membership import Membership
from p2pfl.peer_activity import PeerActivity
from p2pfl.phases import PhaseClock
from p2pfl.ratelimit import LogThrottle

logger = logging.getLogger(__name__)

REJECTION_LOG_INTERVAL_S = 10.0
MAX_REJECTION_DETAIL_CHARS = 200


class Inbound:
    """The update protocol's handlers, and what they refused before admission."""

    def __init__(
        self,
        core: GuardedGossip,
        membership: Membership,
        phases: PhaseClock,
        attack: str | None,
    ) -> None:
        self.core = core
        self.membership = membership
        self.phases = phases
        self.attack = attack
        # Rejections logged per (peer, reason) at most once per interval; see log_rejection.
        self._rejection_log = LogThrottle(REJECTION_LOG_INTERVAL_S)
        # Updates refused before admission, by reason (shown with updates_rejected).
        self.refused_updates: Counter[str] = Counter()
        # The same verdicts per sender, for the neighbour table of /status.
        self.by_peer = PeerActivity()
        # Told of each admitted share (the round loop's pacing: p2pfl/pacing.py).
        self.on_admitted: Callable[[str], None] = lambda peer_id: None

    async def on_offer(self, peer_id: str, offer: bytes) -> tuple[bytes, int | None]:
        """Judge a pushed update by its offer; the answer, and the payload bytes to read
        (None: refused, and the pusher takes its share back; gossip/delivery.py)."""
        try:
            sender_key = public_key_from_peer_id(peer_id)
        except ValueError:
            # Not an ed25519 identity (e.g. secp256k1): it cannot sign updates for us.
            self.refused_updates["unsupported-key"] += 1
            self.by_peer.refused(peer_id, "unsupported-key", time.monotonic())
            self.log_rejection(peer_id, "unsupported-key", "its peer id is not an ed25519 key")
            return Receipt("unsupported-key", 0).encode(), None
        await self.membership.refresh_peers()
        receipt, payload_bytes = await self.core.call(
            self.core.node.screen, offer, time.time(), sender_key
        )
        if not receipt.ready:
            self.by_peer.refused(peer_id, receipt.verdict, time.monotonic())
            self.log_rejection(peer_id, receipt.verdict, "refused at the offer")
            return receipt.encode(), None
        return receipt.encode(), payload_bytes

    async def on_update(self, peer_id: str, payload: bytes) -> bytes:
        """Admit one pushed update (its offer and payloads); the reply is its receipt."""
        sender_key = public_key_from_peer_id(peer_id)  # ed25519: its offer was screened
        deliver = self.phases.timed("admit", self.core.node.deliver)
        verdict, receipt = await self.core.call(deliver, payload, time.time(), sender_key)
        if verdict.accepted:
            self.by_peer.accepted(peer_id, time.monotonic())
            self.membership.policy.heard_from(peer_id, time.monotonic())
            self.on_admitted(peer_id)
            if self.attack == RECEIPT_LIE:  # experiments only: keep it, deny it
                return Receipt(Reason.REPLAY.value, receipt.last_seq).encode()
        else:
            self.by_peer.refused(peer_id, verdict.reason.value, time.monotonic())
            self.log_rejection(peer_id, verdict.reason.value, verdict.detail)
        return receipt.encode()

    def log_rejection(self, peer_id: str, reason: str, detail: str) -> None:
        """One bounded line per peer and reason every REJECTION_LOG_INTERVAL_S at most;
        the counters count every rejection."""
        held_back = self._rejection_log.admit((peer_id, reason), time.monotonic())
        if held_back is None:
            return
        if len(detail) > MAX_REJECTION_DETAIL_CHARS:
            detail = detail[:MAX_REJECTION_DETAIL_CHARS] + "...(cut)"
        more = f"; {held_back} more from this peer for this reason since" if held_back else ""
        logger.info("rejected an update from %s: %s (%s)%s", peer_id, reason, detail, more)
