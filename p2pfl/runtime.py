"""The node runtime: train off the event loop, push signed updates, merge what arrives.

There is no barrier anywhere. Each local round merges what has arrived,
trains in a worker thread (so libp2p streams keep draining: yamux fails a
sender whose receiver stops reading for 5 s), pushes one signed update to
the current neighbours concurrently, each push under a timeout, and
checkpoints. A dead neighbour costs one timeout and its weight share is
refunded; a slow one costs nothing at all.

With an allowlist (``--allow``) the node talks to members only: the transport
refuses every inbound stream of anyone else before reading it, and the peer book
never records a non-member, so none is dialed or chosen as a neighbour.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import trio

from fltasks import Task, partition
from gossip import AdmissionPolicy, GossipNode, InvalidUpdate, NodeKey, Outgoing
from gossip.keys import peer_id_from_public_key, public_key_from_peer_id
from gossip.privacy import GaussianMechanism
from p2pfl.checkpoint import CheckpointStore, NodeState
from p2pfl.config import ConfigError, NodeConfig, load_allowlist, parse_host_port
from p2pfl.framing import MAX_UVARINT_BYTES
from p2pfl.neighbors import choose_neighbors
from p2pfl.peer_exchange import PeerBook, discovery_round, exchange_peers, serve_peer_exchange
from p2pfl.ratelimit import MIB, PeerRateLimiter
from p2pfl.status import serve_status
from p2pfl.transport import Transport, TransportError

logger = logging.getLogger(__name__)

UPDATE_PROTOCOL = "/p2pfl/update/1.0.0"
MODEL_PROTOCOL = "/p2pfl/model/1.0.0"
DIAL_TIMEOUT_S = 5.0
READ_TIMEOUT_S = NodeConfig.read_timeout  # the default; config.read_timeout is what runs
DISCOVERY_INTERVAL_S = 2.0
DISCOVERY_FANOUT = 3
WAIT_LOG_INTERVAL_S = 10.0


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays sharing memory with the tensors."""
    return {name: value.detach().numpy() for name, value in model.state_dict().items()}


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    model.load_state_dict(
        {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    )


class MemberBook(PeerBook):
    """A peer book that records members of the allowlist only (None: everyone)."""

    def __init__(self, own_peer_id: str, members: frozenset[str] | None, **options: Any) -> None:
        super().__init__(own_peer_id, **options)
        self.members = members

    def add(self, peer_id: str, addrs: Iterable[str], *, first_hand: bool = True) -> bool:
        if self.members is not None and peer_id not in self.members:
            self.rejected["not_allowed"] += 1
            return False
        return super().add(peer_id, addrs, first_hand=first_hand)


def _dp_steps_from(saved: dict[str, Any], noise_multiplier: float) -> int:
    """Accountant steps at ``noise_multiplier`` that cost at least what ``saved`` records.

    RDP per step scales as 1/sigma^2, so steps taken at another sigma convert to
    ``steps * (sigma_now / sigma_then)^2`` of the current one, rounded up: the
    budget is never under-reported when an operator changes ``--dp-noise``.
    """
    steps = int(saved.get("dp_steps", 0))
    then = saved.get("dp_noise")
    if steps <= 0 or then is None or float(then) == noise_multiplier:
        return max(steps, 0)
    return math.ceil(steps * (noise_multiplier / float(then)) ** 2)


class NodeRuntime:
    """One daemon's state and loops; :meth:`run` until done or cancelled."""

    def __init__(
        self, config: NodeConfig, key: NodeKey, task: Task, announce: Callable[[str], None] = print
    ) -> None:
        self.config = config
        self.key = key
        self.task = task
        self.announce = announce
        index, count = config.shard_index
        shards = partition(task.y_train.numpy(), count, config.partition, config.seed)
        self.shard = torch.as_tensor(shards[index], dtype=torch.long)
        self.x, self.y = task.x_train[self.shard], task.y_train[self.shard]
        self.model = task.make_model()
        self.generator = torch.Generator().manual_seed(config.seed * 100_003 + index)
        initial = model_arrays(self.model)
        allowlist = load_allowlist(config.allow) if config.allow else None
        self.members: frozenset[str] | None = (
            None
            if allowlist is None
            else frozenset(peer_id_from_public_key(member) for member in allowlist)
        )
        spec_hash = task.spec_hash  # the shared task spec joins the fingerprint
        probe = GossipNode.create(key, initial, samples=len(self.shard), task_spec_hash=spec_hash)
        policy = AdmissionPolicy(
            fingerprint=probe.layout.fingerprint,
            max_message_bytes=int(config.max_message_mb * MIB),
            allowlist=allowlist,
            task_spec_hash=spec_hash,
        )
        self.gossip = GossipNode.create(
            key,
            initial,
            samples=len(self.shard),
            policy=policy,
            task_spec_hash=spec_hash,
            aggregator=config.make_aggregator(),
            codec_id=config.compression,
        )
        non_float = [s.name for s in self.gossip.layout.specs if not s.dtype.startswith("float")]
        if config.compression != "raw" and non_float:
            raise ConfigError(
                f"--compression {config.compression}: the model has non-float tensors "
                f"({', '.join(non_float[:3])}); use --compression raw"
            )
        # Noise from OS entropy, never from the experiment seed: whoever can
        # reproduce the noise can subtract it.
        self.privacy: GaussianMechanism | None = None
        if config.dp_clip is not None and config.dp_noise is not None:
            self.privacy = GaussianMechanism(
                config.dp_clip, config.dp_noise, np.random.default_rng()
            )
        # Kept from the checkpoint even while DP is off, so turning it back on resumes it.
        self._saved_privacy: dict[str, Any] = {}
        self.store = CheckpointStore(config.state_dir)
        self.store.lock()  # held until run() ends; the kernel drops it if we crash
        self.round = 0
        self.accuracy: float | None = None
        self.updates_sent = 0
        self.send_failures: Counter[str] = Counter()
        self.neighbors: list[str] = []
        self.started = time.monotonic()
        self.transport: Transport | None = None
        self.book = MemberBook(key.peer_id, self.members, rng=random.Random(key.seed + b"book"))
        self.adopted_from: dict[str, Any] | None = None
        self.resumed = self._restore()

    # -- state ----------------------------------------------------------------------------

    def _restore(self) -> bool:
        state = self.store.load(self.gossip.layout.fingerprint)
        if state is None:
            return False
        self.round = state.round
        self.gossip.seq = state.seq
        self.gossip.pushsum.weight = state.weight
        self.gossip.pushsum.replace_estimate(state.estimate)
        self.gossip.admission.last_seq.update(state.last_seq)
        for peer_id, addrs in state.peers.items():
            self.book.add(peer_id, addrs)
        self._saved_privacy = dict(state.optimizer)
        if self.privacy is not None:
            accountant = self.privacy.accountant
            accountant.steps = _dp_steps_from(state.optimizer, self.privacy.noise_multiplier)
        logger.info("resumed from checkpoint at round %d, sequence %d", state.round, state.seq)
        return True

    def _state(self) -> NodeState:
        return NodeState(
            round=self.round,
            seq=self.gossip.seq,
            weight=self.gossip.pushsum.weight,
            estimate=self.gossip.estimate.copy(),
            fingerprint=self.gossip.layout.fingerprint,
            last_seq=dict(self.gossip.admission.last_seq),
            peers={peer_id: self.book.addrs(peer_id) for peer_id in self.book.known()},
            optimizer=self._privacy_state(),
        )

    def _privacy_state(self) -> dict[str, Any]:
        if self.privacy is None:
            return dict(self._saved_privacy)
        privacy = self.privacy
        return {"dp_steps": privacy.accountant.steps, "dp_noise": privacy.noise_multiplier}

    async def checkpoint(self) -> None:
        state = self._state()  # taken on the loop, written in a thread
        await trio.to_thread.run_sync(self.store.save, state)

    def status(self) -> dict[str, Any]:
        transport = self.transport
        rejected: Counter[str] = Counter(
            {reason.value: n for reason, n in self.gossip.admission.rejected.items()}
        )
        if transport is not None:
            rejected.update(transport.frame_errors)
            for reason in ("busy", "rate-limited"):
                if transport.stream_errors.get(reason):
                    rejected[reason] += transport.stream_errors[reason]
            # A non-member's update stream is refused unread: its sender is unknown.
            if transport.streams_refused.get(UPDATE_PROTOCOL):
                rejected["unknown-sender"] += transport.streams_refused[UPDATE_PROTOCOL]
        spent = self.privacy.spent(self.config.dp_delta) if self.privacy else None
        return {
            "peer_id": self.key.peer_id,
            "addrs": transport.addrs if transport else [],
            "round": self.round,
            "neighbors": list(self.neighbors),
            "accuracy": self.accuracy,
            "updates_sent": self.updates_sent,
            "updates_accepted": self.gossip.admission.accepted,
            "updates_rejected": dict(rejected),
            "bytes_sent": transport.bytes_sent if transport else 0,
            "bytes_received": transport.bytes_received if transport else 0,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "samples": len(self.shard),
            "weight": self.gossip.pushsum.weight,
            "sequence": self.gossip.seq,
            "known_peers": len(self.book),
            # Highest sequence accepted from each sender: shows whose updates get through.
            "last_seq": {
                peer_id_from_public_key(sender): seq
                for sender, seq in self.gossip.admission.last_seq.items()
            },
            "send_failures": dict(self.send_failures),
            "streams_refused": dict(transport.streams_refused) if transport else {},
            "aggregator": self.gossip.aggregator.name,
            "compression": self.gossip.codec_id,
            # The peer whose model this node started from when it joined, if any.
            "adopted_from": self.adopted_from,
            # Top-k differences that arrived when our copy of the sender was stale.
            "out_of_step": self.gossip.public_copies.out_of_step,
            "epsilon": spent["epsilon"] if spent else None,
            "delta": spent["delta"] if spent else None,
            "task": self.task.name,
        }

    # -- inbound --------------------------------------------------------------------------

    async def _on_update(self, peer_id: str, payload: bytes) -> None:
        verdict = self.gossip.receive(payload, time.time(), public_key_from_peer_id(peer_id))
        if verdict.accepted:
            self.book.mark_alive(peer_id)
        else:
            logger.info(
                "rejected an update from %s: %s (%s)", peer_id, verdict.reason.value, verdict.detail
            )
        return None

    async def _on_model_request(self, peer_id: str, payload: bytes) -> bytes:
        # The reply carries our round so the joiner can pick the most advanced peer.
        return self.round.to_bytes(8, "big") + bytes(self.gossip.snapshot(time.time()))

    # -- network loops --------------------------------------------------------------------

    async def _connect(self, peer_id: str) -> None:
        assert self.transport is not None
        if peer_id in self.transport.connected_peers():
            return
        last: Exception | None = None
        for addr in self.book.addrs(peer_id):
            try:
                await self.transport.connect(addr, DIAL_TIMEOUT_S)
                return
            except (TransportError, ValueError) as error:
                last = error
        raise TransportError(str(last) if last else f"no address known for {peer_id}")

    async def _bootstrap(self) -> list[str]:
        """Dial every bootstrap address and learn its peers; returns the peers reached."""
        assert self.transport is not None
        reached = []
        for addr in self.config.bootstrap:
            try:
                peer_id = await self.transport.connect(addr, DIAL_TIMEOUT_S)
                if self.members is not None and peer_id not in self.members:
                    logger.warning("bootstrap %s: not in the allowlist; skipped", addr)
                    await self.transport.disconnect(peer_id)
                    continue
                self.book.add(peer_id, [addr])
                await exchange_peers(self.transport, peer_id, self.book, DIAL_TIMEOUT_S)
                reached.append(peer_id)
            except (TransportError, ValueError) as error:
                logger.warning("bootstrap %s: %s", addr, error)
        return reached

    async def _discovery_loop(self) -> None:
        assert self.transport is not None
        while True:
            if not self.book.known() and self.config.bootstrap:
                await self._bootstrap()
            else:
                await discovery_round(self.transport, self.book, DISCOVERY_FANOUT, DIAL_TIMEOUT_S)
            await trio.sleep(DISCOVERY_INTERVAL_S)

    async def _adopt_current_model(self, peers: list[str]) -> None:
        """A fresh node joining a running network starts from its most advanced peer's model."""
        assert self.transport is not None
        best_round, best_peer, best_snapshot = 0, None, b""
        for peer_id in peers:
            try:
                reply = await self.transport.request(
                    peer_id,
                    MODEL_PROTOCOL,
                    b"",
                    DIAL_TIMEOUT_S,
                    self.gossip.admission.policy.max_message_bytes + 8,
                )
            except TransportError as error:
                logger.warning("asking %s for its model: %s", peer_id, error)
                continue
            peer_round = int.from_bytes(reply[:8], "big")
            if peer_round > best_round:
                best_round, best_peer, best_snapshot = peer_round, peer_id, reply[8:]
        if best_peer is None:
            return
        try:
            self.gossip.adopt(best_snapshot, public_key_from_peer_id(best_peer))
        except InvalidUpdate as error:
            logger.warning("not adopting the model of %s: %s", best_peer, error)
            return
        self.adopted_from = {"peer_id": best_peer, "round": best_round}
        logger.info("adopted the model of %s at its round %d", best_peer, best_round)

    async def _wait_for_peers(self) -> None:
        next_log = time.monotonic()
        while len(self.book) < self.config.min_neighbors:
            if time.monotonic() >= next_log:
                logger.info(
                    "waiting for %d peer(s) before training (known: %d)",
                    self.config.min_neighbors,
                    len(self.book),
                )
                next_log += WAIT_LOG_INTERVAL_S
            await trio.sleep(0.1)

    async def _push(self, outgoing: Outgoing, peers: list[str]) -> None:
        assert self.transport is not None
        transport = self.transport

        async def push_one(peer_id: str) -> None:
            try:
                with trio.fail_after(self.config.send_timeout):
                    await self._connect(peer_id)
                    await transport.send(
                        peer_id, UPDATE_PROTOCOL, outgoing.message, self.config.send_timeout
                    )
            except (TransportError, trio.TooSlowError) as error:
                # Not delivered: take the weight share back so no mass is lost.
                self.gossip.refund(outgoing)
                self.send_failures[peer_id] += 1
                if self.book.mark_failed(peer_id):
                    logger.info("forgot neighbour %s after repeated failures", peer_id)
                logger.debug("push to %s failed: %s", peer_id, error)
                return
            self.updates_sent += 1

        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                nursery.start_soon(push_one, peer_id)

    # -- the round ------------------------------------------------------------------------

    def _train(self, estimate: np.ndarray) -> np.ndarray:
        """Runs in a worker thread: train from ``estimate``, return the trained vector."""
        load_arrays(self.model, self.gossip.layout.unflatten(estimate))
        self.task.train(self.model, self.x, self.y, self.config.local_epochs, self.generator)
        return self.gossip.layout.flatten(model_arrays(self.model))

    def _evaluate(self, estimate: np.ndarray) -> float:
        load_arrays(self.model, self.gossip.layout.unflatten(estimate))
        return float(self.task.evaluate(self.model))

    async def _one_round(self) -> None:
        self.gossip.merge()
        before = self.gossip.estimate.copy()
        after = await trio.to_thread.run_sync(self._train, before)
        if self.privacy is not None:
            try:
                after = self.privacy.privatize_step(before, after)
            except ValueError as error:
                # Training diverged: releasing nothing this round costs no privacy.
                logger.warning("round %d: local step dropped: %s", self.round + 1, error)
                after = before
        self.gossip.apply_local_step(before, after)
        self.gossip.merge()  # what arrived while training
        snapshot = self.gossip.estimate.copy()
        self.accuracy = await trio.to_thread.run_sync(self._evaluate, snapshot)
        self.neighbors = choose_neighbors(self.key.peer_id, self.book.known(), self.config.degree)
        outgoing = self.gossip.prepare(len(self.neighbors), time.time())
        self.round += 1
        # Checkpoint before sending: a restart then never reuses a sequence number
        # that peers have already seen.
        await self.checkpoint()
        await self._push(outgoing, self.neighbors)
        logger.info(
            "round %d accuracy %.4f neighbours %d", self.round, self.accuracy, len(self.neighbors)
        )

    async def _training_loop(self) -> None:
        await self._wait_for_peers()
        while self.config.rounds is None or self.round < self.config.rounds:
            started = time.monotonic()
            await self._one_round()
            await trio.sleep(max(0.0, self.config.round_interval - (time.monotonic() - started)))

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``config.rounds`` are done or the caller cancels; always checkpoint."""
        config = self.config
        max_bytes = self.gossip.admission.policy.max_message_bytes
        # The burst is one largest frame, so a member can always deliver a full update.
        limiter = PeerRateLimiter(
            config.peer_mb_per_min * MIB / 60.0, max_bytes + MAX_UVARINT_BYTES
        )
        async with Transport.open(
            self.key, config.listen, allowed_peers=self.members, rate_limiter=limiter
        ) as transport:
            self.transport = transport
            timeout = config.read_timeout
            transport.set_handler(UPDATE_PROTOCOL, self._on_update, max_bytes, timeout)
            transport.set_handler(MODEL_PROTOCOL, self._on_model_request, 0, timeout)
            serve_peer_exchange(transport, self.book, read_timeout=timeout)
            try:
                async with trio.open_nursery() as nursery:
                    host, port = parse_host_port(config.status_addr)
                    bound = await nursery.start(serve_status, host, port, self.status)
                    self.announce(f"peer-id {self.key.peer_id}")
                    for addr in transport.addrs:
                        self.announce(f"listen {addr}")
                    self.announce(f"status http://{bound[0]}:{bound[1]}/status")
                    task_status.started(self)
                    reached = await self._bootstrap()
                    if reached and not self.resumed:
                        await self._adopt_current_model(reached)
                    nursery.start_soon(self._discovery_loop)
                    if self.resumed:
                        # Report the restored model's accuracy before its first new round.
                        restored = self.gossip.estimate.copy()
                        self.accuracy = await trio.to_thread.run_sync(self._evaluate, restored)
                    await self._training_loop()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()
                self.transport = None
                self.store.unlock()
