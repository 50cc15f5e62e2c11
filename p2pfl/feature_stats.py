"""The daemon's feature-statistics agreement over ``/p2pfl/feature-stats/1.0.0``, before round 1.

The rule is gossip's (:class:`gossip.feature_stats.FeatureStatsGossip`, the
class the simulator runs in topologies/feature_stats.py); this module only
carries its shares. Each step, the node splits its share over its current
neighbours and sends each one a request (one msgpack frame, docs/PROTOCOL.md);
the peer absorbs it and answers ``ok``. A share that never left (no stream,
no frame written) or that the peer refused is refunded, so push-sum loses no
mass to a peer that is not up yet; one whose answer was lost after it was
written is not refunded, since the peer may hold it (counting it twice would
bias the statistics more than losing it).

The wait is bounded (``--feature-stats-wait``): after ``STEPS`` steps that
reached a peer, or at the deadline, the node trains with what it has agreed,
a convex combination of the members' statistics it heard of. If no peer
answered at all, it trains with its own shard's statistics, and says so in
the log.

Members do not start together (8 daemons on a busy machine came up over
19 to 37 s), and a member that starts after the others agreed would
otherwise never count in their statistics. So the agreement goes on
in the background for the node's life, one step every ``BACKGROUND_STEP_S``,
and when the estimate moves more than ``RESCALE_AT`` of a deviation away from
the statistics in use (a late member's shard arrived: the membership changed
a lot), the node rescales its data before its next round. Once the members
have agreed, nothing moves and nothing is rescaled. A node restored from a
checkpoint keeps the statistics it saved and only answers: pushing its
shard's aggregates again would count them twice.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import trio

from fltasks.scaling import Statistics
from gossip.feature_stats import (
    FeatureStatsGossip,
    InvalidStats,
    StatsShare,
    decode_share,
    encode_share,
)
from gossip.keys import public_key_from_peer_id
from p2pfl.protocols import FEATURE_STATS_PROTOCOL
from p2pfl.streams import TransportError, Unanswered

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig
    from p2pfl.membership import Membership
    from p2pfl.training import LocalTraining
    from p2pfl.transport import Transport

logger = logging.getLogger(__name__)

# Push steps that reached at least one peer. On 8 daemons of degree 3 push-sum's
# error halves about every step; 40 leaves far below float32's resolution.
STEPS = 40
# Between steps, so that members still starting up can join in before we stop.
STEP_INTERVAL_S = 0.05
# After the first agreement: small vectors (1.5 KB for digits) to a few neighbours.
BACKGROUND_STEP_S = 0.25
# Rescale when a mean moves this many deviations, or a deviation this fraction.
RESCALE_AT = 0.02
OK = b"ok"


class StatsAgreement:
    """This node's part in the agreement; ``outcome`` says how it ended (/status, logs)."""

    def __init__(self, config: NodeConfig, training: LocalTraining) -> None:
        self.config = config
        self.training = training
        own = training.own_aggregates()
        fingerprint = training.layout.fingerprint
        robust = config.feature_stats == "gossip-robust"
        self.gossip = None if own is None else FeatureStatsGossip(own, fingerprint, robust=robust)
        self.delivered = 0
        self.refused = 0
        self.rescaled = 0
        self.outcome = "not needed" if own is None else "pending"

    async def serve(self, peer_id: str, payload: bytes) -> bytes:
        """Handler: take a neighbour's share; the answer says whether it was taken."""
        if self.gossip is None:
            return b"refused: this node does not gossip feature statistics"
        try:
            share = decode_share(payload, self.gossip.fingerprint, self.gossip.features)
            self.gossip.receive(public_key_from_peer_id(peer_id), share)
        except (InvalidStats, ValueError) as error:
            self.refused += 1
            return f"refused: {error}"[:200].encode()
        return OK

    async def _send(self, transport: Transport, peer_id: str, share: StatsShare,
                    timeout: float) -> None:
        assert self.gossip is not None
        try:
            reply = await transport.request(
                peer_id, FEATURE_STATS_PROTOCOL, encode_share(share), timeout, 256
            )
        except Unanswered:
            return  # the peer may hold it: no refund (module docstring)
        except TransportError:
            self.gossip.refund(share)
            return
        if reply == OK:
            self.delivered += 1
        else:
            self.gossip.refund(share)
            logger.debug("feature statistics refused by %s: %s", peer_id, reply[:200])

    async def run(self, transport: Transport, membership: Membership) -> Statistics | None:
        """Agree within ``--feature-stats-wait``; the agreed (mean, std), or None (own)."""
        if self.gossip is None:
            return None
        gossip = self.gossip
        steps = 0
        timeout = self.config.deadlines.handshake
        with trio.move_on_after(self.config.feature_stats_wait):
            while steps < STEPS:
                neighbours = membership.choose_neighbours() if len(membership.book) else []
                if neighbours:
                    before = self.delivered
                    share = gossip.prepare(len(neighbours))
                    async with trio.open_nursery() as nursery:
                        for peer_id in neighbours:
                            nursery.start_soon(self._send, transport, peer_id, share, timeout)
                    gossip.merge()
                    steps += self.delivered > before
                elif self.config.min_neighbours == 0:
                    break  # alone by design: nobody to agree with
                await trio.sleep(STEP_INTERVAL_S)
        if self.delivered == 0 and gossip.received == 0:
            self.outcome = "local: no peer answered"
            logger.warning("feature statistics: no peer answered within %g s; standardising "
                           "with this node's own shard's statistics",
                           self.config.feature_stats_wait)
            return None
        mean, std = gossip.estimate.mean_std()
        if not (all(map(math.isfinite, mean)) and all(map(math.isfinite, std))):
            self.outcome = "local: the agreed statistics are not finite"
            logger.warning("feature statistics: agreement not finite; using own statistics")
            return None
        self.outcome = f"agreed in {steps} steps ({self.delivered} shares delivered)"
        logger.info("feature statistics %s", self.outcome)
        return mean, std


    async def step(self, transport: Transport, membership: Membership) -> None:
        """One push of the background agreement; rescale if the estimate moved."""
        assert self.gossip is not None
        neighbours = membership.choose_neighbours() if len(membership.book) else []
        if neighbours:
            share = self.gossip.prepare(len(neighbours))
            timeout = self.config.deadlines.handshake
            async with trio.open_nursery() as nursery:
                for peer_id in neighbours:
                    nursery.start_soon(self._send, transport, peer_id, share, timeout)
            self.gossip.merge()
        mean, std = self.gossip.estimate.mean_std()
        used = self.training.statistics
        if used is None:
            if self.gossip.received == 0:
                return  # nobody heard from yet: own statistics stay
            moved = math.inf
        else:
            moved = max(float((abs(mean - used[0]) / used[1]).max()),
                        float(abs(std / used[1] - 1.0).max()))
        if moved > RESCALE_AT and np.isfinite(mean).all() and np.isfinite(std).all():
            self.training.rescale((mean, std))
            self.rescaled += 1
            logger.info("feature statistics moved by %.3g deviations (a member joined); "
                        "rescaled (%d times)", moved, self.rescaled)


async def agree_and_rescale(
    agreement: StatsAgreement, transport: Transport, membership: Membership,
    nursery: trio.Nursery,
) -> None:
    """Agree before the first round, rescale, then keep agreeing in the background."""
    if agreement.gossip is None:
        return
    statistics = await agreement.run(transport, membership)
    if statistics is not None:
        agreement.training.rescale(statistics)
    nursery.start_soon(_keep_agreeing, agreement, transport, membership)


async def _keep_agreeing(
    agreement: StatsAgreement, transport: Transport, membership: Membership
) -> None:
    while True:
        await trio.sleep(BACKGROUND_STEP_S)
        await agreement.step(transport, membership)
