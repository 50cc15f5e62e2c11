"""The node runtime: a trio driver that wires the daemon's parts together and runs their loops.

It owns no decision of its own. The gossip core (gossip/) merges and signs;
the peer policy (p2pfl/peer_policy.py) decides what becomes of each push and
whom to redial or forget; this driver runs the loops that feed them and
carries out what they answer, through its parts:

* :mod:`p2pfl.training`: the shard, the model, local train and evaluate;
* :mod:`p2pfl.privacy_budget`: the DP modes, their accountants, the target;
* :mod:`p2pfl.rounds`: the round (train, merge, evaluate, push, checkpoint);
* :mod:`p2pfl.pusher`: the push pipeline (offer, payloads, receipts);
* :mod:`p2pfl.receiving`: judging and admitting what peers push to us;
* :mod:`p2pfl.membership` and :mod:`p2pfl.joining`: bootstrap, discovery,
  redials, neighbours, and adopting the members' median model on joining;
* :mod:`p2pfl.status_view`: the /status dict.

With an allowlist (``--allow``) or a network (``--network``, issue 22) the node
talks to members only: the transport refuses every inbound stream of anyone else
before reading it (a network lets a stranger show its certificate first), and the
peer book never records a non-member, so none is dialed or chosen as a neighbour.
Who is a member is one live :class:`p2pfl.member_source.MemberSource` that every
layer reads; it changes on SIGHUP (``--allow``) or as certificates and revocations
arrive (p2pfl/member_service.py), and a peer that leaves it is disconnected.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from fltasks import Task
from gossip import NodeKey
from gossip.attacks import RECEIPT_LIE, Attacker
from gossip.codec import MAX_OFFER_BYTES
from gossip.feature_stats import MAX_STATS_MESSAGE_BYTES
from gossip.node import GossipState
from gossip.vocabulary import MAX_VOCABULARY_MESSAGE_BYTES, VocabularyState
from p2pfl.allowlist import allow_file_peers
from p2pfl.checkpoint import CheckpointError, CheckpointStore, NodeState
from p2pfl.config import NodeConfig, parse_host_port
from p2pfl.feature_stats import StatsAgreement, agree_and_rescale
from p2pfl.framing import MAX_UVARINT_BYTES
from p2pfl.gossip_access import GuardedGossip, build_gossip_node
from p2pfl.joining import Joining
from p2pfl.member_service import member_service
from p2pfl.member_source import MemberSource, reload_members
from p2pfl.membership import Membership
from p2pfl.model_meta import node_meta, restore_merged_from, write_meta_logged
from p2pfl.peer_exchange import serve_peer_exchange
from p2pfl.peer_policy import MemberBook, PeerPolicy
from p2pfl.phases import PhaseClock
from p2pfl.privacy_budget import PrivacyBudget
from p2pfl.protocols import (
    FEATURE_STATS_PROTOCOL,
    MODEL_PROTOCOL,
    UPDATE_PROTOCOL,
    VOCABULARY_PROTOCOL,
)
from p2pfl.pusher import Pusher
from p2pfl.ratelimit import MIB, PeerRateLimiter
from p2pfl.reachability import serve_reachability
from p2pfl.receiving import MAX_REJECTION_DETAIL_CHARS, Inbound
from p2pfl.rounds import RoundLoop
from p2pfl.status import serve_status
from p2pfl.status_history import StatusHistory, record_history
from p2pfl.status_view import node_status
from p2pfl.training import LocalTraining, load_arrays, model_arrays
from p2pfl.transport import Transport
from p2pfl.vocabulary import serve_frozen

__all__ = [
    "MAX_REJECTION_DETAIL_CHARS",
    "MODEL_PROTOCOL",
    "UPDATE_PROTOCOL",
    "NodeRuntime",
    "load_arrays",
    "model_arrays",
]

logger = logging.getLogger(__name__)


class NodeRuntime:
    """One daemon's parts and loops; :meth:`run` until done or cancelled."""

    def __init__(
        self, config: NodeConfig, key: NodeKey, task: Task, announce: Callable[[str], None] = print,
        vocabulary: VocabularyState | None = None,
    ) -> None:
        self.config = config
        # The frozen union a csv task was built over (p2pfl/vocabulary.py): answered to
        # members started later, never grown.
        self.vocabulary = vocabulary
        self.key = key
        self.announce = announce
        self.training = LocalTraining(config, task)
        self.stats = StatsAgreement(config, self.training)
        self.store = CheckpointStore(config.state_dir)
        self.member_service = member_service(config, key, announce)
        members = self._member_source(config)
        self.gossip = build_gossip_node(config, key, self.training, members)
        self.core = GuardedGossip(self.gossip)
        self.budget = PrivacyBudget(config, self.training, announce)
        self.store.lock()  # held until run() ends; the kernel drops it if we crash
        book = MemberBook(key.peer_id, members, rng=random.Random(key.seed + b"book"))
        self.policy: PeerPolicy[Any] = PeerPolicy.create(book, config.assumed_link_bytes_per_s)
        self.membership = Membership(config, key, members, self.policy, self.core, announce)
        # Seconds per phase of each round, peak RSS and the loop's worst stall (/status).
        self.phases = PhaseClock()
        # The last half hour of /status, sampled, for the web page (GET /history).
        self.history = StatusHistory()
        self.pusher = Pusher(self.policy, self.core, self.membership, self.phases)
        self.rounds = RoundLoop(
            config, self.core, self.training, self.budget, self.membership, self.pusher,
            self.phases, self.checkpoint, self._attacker(config),
        )
        self.inbound = Inbound(self.core, self.membership, self.phases, config.attack)
        self.inbound.on_admitted = self.rounds.admitted
        self.joining = Joining(self.membership, self.core, lambda: self.rounds.round)
        self.started = time.monotonic()
        self.resumed = self._restore()

    def _member_source(self, config: NodeConfig) -> MemberSource | None:
        """The one answer to "who is a member" (None: an open network)."""
        if self.member_service is not None:
            return self.member_service.source
        return MemberSource(allow_file_peers(config.allow)) if config.allow else None

    def reload(self) -> None:
        """SIGHUP: re-read --allow (a bad file keeps the old list), take the inbox now."""
        reload_members(self.config.allow, self.membership.members, self.member_service)

    def _cut_removed(self, added: frozenset[str], removed: frozenset[str]) -> None:
        """A member that left (revoked, expired, out of --allow) loses its connections."""
        transport = self.transport
        if transport is None:
            return
        for peer in removed:
            transport.nursery.start_soon(transport.disconnect, peer)

    def _attacker(self, config: NodeConfig) -> Attacker | None:
        if config.attack in (None, RECEIPT_LIE):
            return None
        return Attacker.create(self.gossip, config.attack)

    # -- state ----------------------------------------------------------------------------

    def _restore(self) -> bool:
        state = self.store.load(self.gossip.layout.fingerprint, self.gossip.layout.size)
        if state is None:
            return False
        try:
            saved = GossipState(state.seq, state.weight, state.estimate, state.last_seq)
            self.gossip.restore(saved)
        except ValueError as error:
            raise CheckpointError(f"{self.store.current}: {error}") from None
        self.core.refresh_view()
        self.rounds.round = state.round
        for peer_id, addrs in state.peers.items():
            self.policy.book.add(peer_id, addrs)
        self.budget.restore(state.privacy, state.round, self.store.current)
        restore_merged_from(self.store.directory, self.gossip)
        if self.training.restore(state.statistics, state.momentum):
            self.stats.outcome = "restored from the checkpoint"
        logger.info("resumed from checkpoint at round %d, sequence %d", state.round, state.seq)
        return True

    def saved_state(self, gossip: GossipState | None = None) -> NodeState:
        """What a checkpoint keeps: the gossip core's state, the round, peers, privacy."""
        gossip = gossip or self.gossip.state()
        book = self.policy.book
        return NodeState(
            round=self.rounds.round,
            seq=gossip.seq,
            weight=gossip.weight,
            estimate=gossip.estimate,
            fingerprint=self.gossip.layout.fingerprint,
            last_seq=gossip.last_seq,
            peers={peer_id: book.addrs(peer_id) for peer_id in book.known()},
            privacy=self.budget.state(),
            statistics=self.training.statistics,
            momentum={} if self.training.momentum is None else self.training.momentum.state(),
        )

    async def checkpoint(self) -> None:
        gossip = await self.core.call(self.gossip.state)
        state = self.saved_state(gossip)  # the peer book is read on the loop
        # An I/O error (full disk, EMFILE) is logged and counted, never fatal: the
        # last good checkpoint stays, and the next round tries again.
        if await trio.to_thread.run_sync(self.store.try_save, state):
            meta = node_meta(self.config, self.training, self.gossip, self.budget,
                             self.rounds, state.round)
            await trio.to_thread.run_sync(write_meta_logged, self.store.directory, meta)

    async def _sync_members(self, peer_id: str) -> None:
        assert self.member_service is not None
        await self.member_service.sync_with(peer_id, self.config.deadlines.peer_exchange)

    def status(self) -> dict[str, Any]:
        return node_status(self)

    # What the CLI and tests read of a running node.

    @property
    def transport(self) -> Transport | None:
        """The open transport while :meth:`run` runs, else None."""
        return self.membership.transport

    @property
    def round(self) -> int:
        return self.rounds.round

    @property
    def accuracy(self) -> float | None:
        return self.rounds.accuracy

    # -- the loops ------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``config.rounds`` are done or the caller cancels; always checkpoint."""
        config = self.config
        max_bytes = self.gossip.admission.policy.max_message_bytes
        # The burst is one largest frame, so a member can always deliver a full update.
        limiter = PeerRateLimiter(
            config.peer_mb_per_min * MIB / 60.0, max_bytes + MAX_UVARINT_BYTES
        )
        membership = self.membership
        async with Transport.open(
            self.key,
            config.listen,
            allowed_peers=membership.members,
            rate_limiter=limiter,
            relay=config.relay == "on",
            handshake_timeout=config.deadlines.handshake,
            known_peers=self.policy.book.is_first_hand,
        ) as transport:
            membership.transport = transport
            if membership.members is not None:
                membership.members.subscribe(self._cut_removed)
            if self.member_service is not None:
                self.member_service.serve(transport, config.read_timeout)
                membership.on_connect = self._sync_members
            if transport.nat is not None:
                transport.nat.policy.members = membership.gossips_with
            timeout, rates = config.read_timeout, self.policy.read_rates
            transport.set_handler(
                UPDATE_PROTOCOL, self.inbound.on_update, max_bytes, timeout, rates,
                screen=self.inbound.on_offer, max_offer_size=min(MAX_OFFER_BYTES, max_bytes),
            )
            transport.set_handler(
                MODEL_PROTOCOL, self.joining.serve_model_request, 0, timeout, rates
            )
            transport.set_handler(
                FEATURE_STATS_PROTOCOL, self.stats.serve, MAX_STATS_MESSAGE_BYTES, timeout, rates
            )
            if self.vocabulary is not None:
                transport.set_handler(
                    VOCABULARY_PROTOCOL, serve_frozen(self.vocabulary, membership.members),
                    MAX_VOCABULARY_MESSAGE_BYTES, timeout, rates,
                )
            serve_peer_exchange(transport, self.policy.book, read_timeout=timeout)
            membership.reachability.serve_relay = config.relay == "on"
            serve_reachability(transport, membership.reachability, timeout)
            try:
                async with trio.open_nursery() as nursery:
                    self.pusher.nursery = nursery
                    await self._serve(nursery, transport, task_status)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()
                membership.transport = None
                self.store.unlock()

    async def _serve(self, nursery: trio.Nursery, transport: Transport, task_status: Any) -> None:
        """Announce, join, start the background loops, then run the rounds."""
        host, port = parse_host_port(self.config.status_addr)
        bound = await nursery.start(
            partial(serve_status, history=self.history.view), host, port, self.status
        )
        nursery.start_soon(record_history, self.history, self.status)
        self.announce(f"peer-id {self.key.peer_id}")
        for addr in transport.addrs:
            self.announce(f"listen {addr}")
        self.announce(f"status http://{bound[0]}:{bound[1]}/status")
        task_status.started(self)
        reached = await self.membership.bootstrap()
        nursery.start_soon(self.membership.reachability_loop, reached)
        if reached and not self.resumed:
            await self.joining.adopt_current_model(reached)
        nursery.start_soon(self.membership.discovery_loop)
        if self.member_service is not None:
            nursery.start_soon(self.member_service.run, self.config.deadlines.peer_exchange)
        nursery.start_soon(self.phases.watchdog)
        if self.rounds.attacker is not None:
            nursery.start_soon(self.rounds.attack_loop)
        if self.training.statistics is None:  # not restored: agree before round 1
            await self.membership.wait_for_peers()
            await agree_and_rescale(self.stats, transport, self.membership, nursery)
        if self.resumed:
            # Report the restored model's accuracy before its first new round.
            restored = self.gossip.estimate.copy()
            self.rounds.accuracy = await trio.to_thread.run_sync(
                self.training.evaluate, restored
            )
        await self.rounds.run()


