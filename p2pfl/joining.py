"""Joining a running network: adopt the median of several members' models; serve ours.

A fresh node asks up to ``ADOPT_FROM`` members for a signed snapshot
(``/p2pfl/model/1.0.0``) and starts from their coordinate-wise median, never
one member's word (SECURITY.md, robust joining).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from gossip import InvalidUpdate, Reason
from gossip.keys import public_key_from_peer_id
from p2pfl.gossip_access import GuardedGossip
from p2pfl.membership import Membership
from p2pfl.protocols import MODEL_PROTOCOL
from p2pfl.transport import TransportError

logger = logging.getLogger(__name__)

# A joining node asks this many members for their models and adopts the median.
ADOPT_FROM = 5


class Joining:
    """How this node joined (``adopted_from``, ``join_refused``), and the snapshots it serves."""

    def __init__(
        self, membership: Membership, core: GuardedGossip, round_number: Callable[[], int]
    ) -> None:
        self.membership = membership
        self.core = core
        self.round_number = round_number
        # The members whose median model this node started from (None: it did not adopt).
        self.adopted_from: dict[str, Any] | None = None
        # Snapshots a joining node could not use, by reason (shown in /status).
        self.join_refused: Counter[str] = Counter()

    async def serve_model_request(self, peer_id: str, payload: bytes) -> bytes:
        # The reply carries our round so the joiner can pick the most advanced peer.
        snapshot = await self.core.call(self.core.node.snapshot, time.time())
        return self.round_number().to_bytes(8, "big") + bytes(snapshot)

    async def adopt_current_model(self, reached: list[str]) -> None:
        """A fresh node starts from the median of several members' models, never one's.

        It asks up to ``ADOPT_FROM`` members (those it bootstrapped from first)
        for a signed snapshot. A claimed round is only reported, never trusted:
        the median of three or more models cannot be moved outside the honest
        values by a minority. Every snapshot that cannot be used is logged and
        counted in ``join_refused``; with none usable the node keeps its
        initial model. Nothing here can crash the node.
        """
        membership, node = self.membership, self.core.node
        transport = membership.transport
        assert transport is not None
        book = membership.policy.book
        # Second-hand peers too: a joiner knows the others only from its bootstrap's
        # reply, and asking them is how one hostile bootstrap is outvoted. Noise
        # proves each one's id when we dial it.
        heard_of = [*reached, *book.known(), *book.second_hand()]
        candidates = list(dict.fromkeys(heard_of))[:ADOPT_FROM]
        models: list[np.ndarray] = []
        sources: list[dict[str, Any]] = []
        # A snapshot is about our own model's size (float32 parameters).
        deadline = membership.deadlines.model_fetch(node.layout.size)
        for peer_id in candidates:
            try:
                sender = public_key_from_peer_id(peer_id)
                await membership.connect(peer_id)
                reply = await transport.request(
                    peer_id,
                    MODEL_PROTOCOL,
                    b"",
                    deadline,
                    node.admission.policy.max_message_bytes + 8,
                )
                if len(reply) < 8:
                    raise InvalidUpdate(Reason.MALFORMED, "the reply is too short")
                snapshot = memoryview(reply)[8:]
                models.append(await self.core.call(node.read_snapshot, snapshot, sender))
            except InvalidUpdate as error:
                self.join_refused[error.reason.value] += 1
                logger.warning("not adopting the model of %s: %s", peer_id, error)
                continue
            except ValueError as error:  # a peer id that is not an ed25519 key
                self.join_refused["not-ed25519"] += 1
                logger.warning("not asking %s for its model: %s", peer_id, error)
                continue
            except TransportError as error:
                self.join_refused["unreachable"] += 1
                logger.warning("asking %s for its model: %s", peer_id, error)
                continue
            claimed = int.from_bytes(reply[:8], "big")
            sources.append({"peer_id": peer_id, "claimed_round": claimed})
        if not models:
            return
        await self.core.call(node.adopt, models)
        self.adopted_from = {"rule": "median", "peers": sources}
        logger.info("adopted the median of %d member model(s)", len(models))
