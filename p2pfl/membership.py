"""Membership: whom we know, whom we link to, and how we reach them.

Bootstrapping, peer exchange (discovery), redialling unreachable peers, and the
neighbour choice over the ranked membership. The decisions about a failed dial
(unreachable, forgotten) are the peer policy's (p2pfl/peer_policy.py); this
module dials and reports.

Updates are admitted for merging only from the peers that may gossip to this
node (:func:`p2pfl.neighbours.in_candidates`: its in-neighbours and the spares
that stand in for down links); anyone else's is refused as ``not-neighbour``.
With an allowlist, links are ranked over the allowlist, never over what this
node happens to see, so one member hiding from us cannot move our neighbours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from gossip.keys import NodeKey, public_key_from_peer_id
from p2pfl.config import NodeConfig
from p2pfl.gossip_access import GuardedGossip
from p2pfl.member_source import MemberSource
from p2pfl.neighbours import choose_live, effective_quorum, in_candidates, ranked_membership
from p2pfl.peer_exchange import discovery_round, exchange_peers
from p2pfl.peer_policy import Action, Dropped, Forget, PeerPolicy
from p2pfl.reachability import Reachability, is_loopback
from p2pfl.reachability import maintain as maintain_reachability
from p2pfl.transport import Transport, TransportError

logger = logging.getLogger(__name__)

DISCOVERY_INTERVAL_S = 2.0
DISCOVERY_FANOUT = 3
WAIT_LOG_INTERVAL_S = 10.0


class Membership:
    """The peer book's owner's hands: dials, exchanges, and the neighbour choice."""

    def __init__(
        self,
        config: NodeConfig,
        key: NodeKey,
        members: MemberSource | None,
        policy: PeerPolicy[object],
        core: GuardedGossip,
        announce: Callable[[str], None],
    ) -> None:
        self.config = config
        self.key = key
        self.members = members
        self.policy = policy
        self.book = policy.book
        self.core = core
        self.announce = announce
        self.deadlines = config.deadlines
        self.transport: Transport | None = None
        self.neighbours: list[str] = []
        # Called with a bootstrap peer right after we reach it, before anything else is
        # asked of it: a network's newcomer shows its certificate there (member_service).
        self.on_connect: Callable[[str], Awaitable[None]] | None = None
        # Which of our addresses are public, NATed or relayed (p2pfl/reachability.py).
        self.reachability = Reachability()
        # The configured quorum (at least the rule's minimum); see refresh_peers.
        self._quorum = core.node.quorum
        # What refresh_peers last told the gossip core: (ranked members, quorum).
        self._peer_view: tuple[tuple[str, ...], int] | None = None

    # -- whom we link to ------------------------------------------------------------------

    def ranked(self) -> tuple[str, ...]:
        """What links are ranked over: the allowlist if any, else our first-hand peers."""
        return ranked_membership(self.key.peer_id, self.members, self.book.known())

    def choose_neighbours(self) -> list[str]:
        """Our links by the shared rule; a spare stands in for each we cannot reach."""
        ranked, degree = self.ranked(), self.config.degree
        self.neighbours = choose_live(self.key.peer_id, ranked, degree, self.policy.linkable)
        return self.neighbours

    async def refresh_peers(self) -> None:
        """Tell the gossip core whom it may hear from, and its quorum, when either changed.

        Senders come from the ranked membership alone (never from who is up), so
        every member that may push to us is accepted. The quorum counts only the
        in-neighbours we can reach (neighbours.effective_quorum): a listed member
        that is down must not hold every merge below it.
        """
        members = self.ranked()
        degree, own = self.config.degree, self.key.peer_id
        floor = self.core.node.aggregator.min_senders
        quorum = effective_quorum(self._quorum, floor, own, members, degree, self.book.reachable)
        if (members, quorum) == self._peer_view:
            return
        self._peer_view = (members, quorum)
        allowed = set()
        for peer_id in in_candidates(own, members, degree):
            try:
                allowed.add(public_key_from_peer_id(peer_id))
            except ValueError:
                continue  # not an ed25519 id: it could not sign an update anyway
        await self.core.call(self._set_peers, frozenset(allowed), quorum)

    def _set_peers(self, senders: frozenset[bytes], quorum: int) -> None:
        self.core.node.set_peers(senders)
        self.core.node.quorum = quorum

    def gossips_with(self) -> set[str]:
        """The peers we gossip with, either way: members for our relay (p2pfl/relay.py)."""
        senders = in_candidates(self.key.peer_id, self.ranked(), self.config.degree)
        return {*self.neighbours, *senders}

    # -- reaching them --------------------------------------------------------------------

    async def connect(self, peer_id: str) -> None:
        """Reach ``peer_id`` at the first of its known addresses that connects."""
        assert self.transport is not None
        await self.transport.dial_any(peer_id, self.book.addrs(peer_id), self.deadlines.handshake)

    def dial_failed(self, peer_id: str) -> bool:
        """Report a failed dial or exchange to the policy; True if the peer was forgotten."""
        actions = self.policy.dial_failed(peer_id, time.monotonic())
        for action in actions:
            self.note(action)
        return any(isinstance(action, Forget) for action in actions)

    def note(self, action: Action) -> None:
        """Carry out a reachability decision: the policy already updated the book."""
        if isinstance(action, Forget):
            logger.info("forgot %s: undialable for long", action.peer)
        elif isinstance(action, Dropped):
            logger.warning("dropped %s as a neighbour: it answers no receipt", action.peer)

    async def bootstrap(self) -> list[str]:
        """Dial every bootstrap address and learn its peers; returns the peers reached."""
        assert self.transport is not None
        reached = []
        for addr in self.config.bootstrap:
            try:
                # Persistent: backoff, never the per-address budget (issue 20).
                peer_id = await self.transport.connect(
                    addr, self.deadlines.handshake, persistent=True
                )
                if self.on_connect is not None:
                    await self.on_connect(peer_id)
                if self.members is not None and peer_id not in self.members:
                    logger.warning("bootstrap %s: not in the allowlist; skipped", addr)
                    await self.transport.disconnect(peer_id)
                    continue
                self.book.add(peer_id, [addr])
                await exchange_peers(
                    self.transport, peer_id, self.book, self.deadlines.peer_exchange
                )
                reached.append(peer_id)
            except (TransportError, ValueError) as error:
                logger.warning("bootstrap %s: %s", addr, error)
        return reached

    async def reachability_loop(self, bootstrapped: list[str]) -> None:
        """Learn which of our addresses are public; behind NAT, hold relay slots."""
        assert self.transport is not None
        if all(is_loopback(addr) for addr in self.transport.listen_addrs):
            # Only this machine can reach us: nothing to learn, and on a loopback test
            # network of many nodes the checks measurably slowed discovery (cause not
            # yet found; see the nat branch's report).
            self.announce("reachability loopback only: not checked")
            return
        await maintain_reachability(
            self.transport,
            self.book,
            self.reachability,
            lambda: bootstrapped,
            self.announce,
            self.deadlines.peer_exchange,  # a small request and reply, like peer exchange
        )

    async def discovery_loop(self) -> None:
        assert self.transport is not None
        while True:
            if not self.book.known() and self.config.bootstrap:
                await self.bootstrap()
            else:
                await self.redial_unreachable()
                await discovery_round(
                    self.transport,
                    self.book,
                    DISCOVERY_FANOUT,
                    self.deadlines.peer_exchange,
                    failed=self.dial_failed,
                )
            await trio.sleep(DISCOVERY_INTERVAL_S)

    async def redial_unreachable(self) -> None:
        """Dial every known peer whose last dial failed: how a healed partition is seen.

        Each address is dialled at most a few times a minute (the transport's budget),
        so this costs little while the peer stays away.
        """

        async def redial(peer_id: str) -> None:
            try:
                await self.connect(peer_id)
            except TransportError:
                self.dial_failed(peer_id)
                return
            self.policy.heard_from(peer_id, time.monotonic())

        async with trio.open_nursery() as nursery:
            for action in self.policy.redials():
                nursery.start_soon(redial, action.peer)

    async def wait_for_peers(self) -> None:
        next_log = time.monotonic()
        while len(self.book) < self.config.min_neighbours:
            if time.monotonic() >= next_log:
                logger.info(
                    "waiting for %d peer(s) before training (known: %d)",
                    self.config.min_neighbours,
                    len(self.book),
                )
                next_log += WAIT_LOG_INTERVAL_S
            await trio.sleep(0.1)
