"""The node runtime: train off the event loop, push signed updates, merge what arrives.

There is no barrier anywhere. Each local round trains in a worker thread
(so libp2p streams keep draining: yamux fails a sender whose receiver stops
reading for 5 s), merges its neighbours' votes once (gossip/votes.py: one
vote per neighbour, a quorum for robust rules), checkpoints, and starts one
push of a signed update to each current neighbour in the background: a round
never waits for its pushes. A neighbour whose previous push is still in
flight is skipped that round (its share is not split off), so at most one
update per link is in flight and pushes to a slow link cannot pile up. Each
push is answered by a receipt (gossip/delivery.py), so a share is refunded
only when the receiver did not take it, and weight is never created by a
timeout. A peer that cannot be dialled is marked unreachable and skipped
until discovery reaches it again; being slow forgets nobody. Rounds are paced
(``--round-interval``), and a node that has finished its ``--rounds`` keeps
gossiping without training for ``--linger`` seconds, so members that started
later are not left to train alone.

Updates are admitted for merging only from the peers that may gossip to this
node (:func:`p2pfl.neighbours.in_candidates`: its in-neighbours and the spares
that stand in for down links); anyone else's is refused as ``not-neighbour``.
With an allowlist, links are ranked over the allowlist, never over what this
node happens to see, so one member hiding from us cannot move our neighbours.

With an allowlist (``--allow``) the node talks to members only: the transport
refuses every inbound stream of anyone else before reading it, and the peer book
never records a non-member, so none is dialed or chosen as a neighbour.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import trio

from fltasks import Task, partition
from fltasks.dp_defaults import DP_SGD_CLIP, DP_SGD_LR, DP_SGD_NOISE
from fltasks.scaling import node_view
from gossip import AdmissionPolicy, GossipNode, InvalidUpdate, NodeKey, Outgoing, Reason
from gossip.attacks import RECEIPT_LIE, Attacker
from gossip.codec import MAX_OFFER_BYTES, offer_length
from gossip.delivery import MAX_RECEIPT_BYTES, DeliveryLedger, InvalidReceipt, Receipt
from gossip.keys import peer_id_from_public_key, public_key_from_peer_id
from gossip.node import GossipState
from gossip.privacy import GaussianMechanism, RdpAccountant
from p2pfl.checkpoint import CheckpointError, CheckpointStore, NodeState
from p2pfl.config import ConfigError, NodeConfig, load_allowlist, parse_host_port
from p2pfl.dp import (
    NON_PRIVATE_ROUNDS,
    non_private_rounds,
    os_entropy_generator,
    refuse_dp_after_raw_rounds,
    reseed_from_os_entropy,
)
from p2pfl.framing import MAX_UVARINT_BYTES
from p2pfl.linkrates import LinkRates
from p2pfl.neighbours import choose_live, effective_quorum, in_candidates, ranked_membership
from p2pfl.peer_exchange import PeerBook, discovery_round, exchange_peers, serve_peer_exchange
from p2pfl.phases import PhaseClock
from p2pfl.ratelimit import MIB, LogThrottle, PeerRateLimiter
from p2pfl.reachability import Reachability, is_loopback, serve_reachability
from p2pfl.reachability import maintain as maintain_reachability
from p2pfl.reachability import status_view as reachability_view
from p2pfl.status import serve_status
from p2pfl.transport import Transport, TransportError, Unanswered

if TYPE_CHECKING:
    from fltasks.dp_sgd import DpSgdTrainer  # opacus is imported only under --dp sample

logger = logging.getLogger(__name__)
T = TypeVar("T")

# 1.2.0: an update is offered (prefix and header) before its payloads are sent, and
# a share is refunded only on a refusal of the offer (gossip/delivery.py).
UPDATE_PROTOCOL = "/p2pfl/update/1.2.0"
MODEL_PROTOCOL = "/p2pfl/model/1.0.0"
DISCOVERY_INTERVAL_S = 2.0
DISCOVERY_FANOUT = 3
WAIT_LOG_INTERVAL_S = 10.0
# A joining node asks this many members for their models and adopts the median.
ADOPT_FROM = 5
# An --attack member pushes this often, whatever its rounds do (bounded by the
# receivers' per-peer rate limit).
ATTACK_PUSH_INTERVAL_S = 0.03
# From this many parameters on, gossip work (verify and decode, merge, encode and
# sign) runs in a worker thread: at 10M parameters one such step takes from tens
# of milliseconds to seconds, and the loop must keep every stream draining.
OFFLOAD_MIN_PARAMETERS = 1_000_000
REJECTION_LOG_INTERVAL_S = 10.0
MAX_REJECTION_DETAIL_CHARS = 200
# Pushes to one peer that fail in a row before its connection is closed and redialled.
FAILURES_BEFORE_REDIAL = 2


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

    def add(self, peer_id: str, addrs: Iterable[str], **how: Any) -> bool:
        if self.members is not None and peer_id not in self.members:
            self.rejected["not-member"] += 1
            return False
        return super().add(peer_id, addrs, **how)


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


def _dp_sgd_history(saved: dict[str, Any], where: object) -> list[tuple[float, float, int]]:
    """The DP-SGD accountant history a checkpoint records, node-mode steps included.

    Steps taken under ``--dp node`` are Gaussian releases of sensitivity 2C with
    no subsampling: in opacus's terms, noise multiplier sigma/2 at sample rate
    1, so they compose exactly into the same RDP accountant.
    """
    from fltasks.dp_sgd import check_history

    try:
        history = check_history(saved.get("dp_history", []))
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    steps, noise = int(saved.get("dp_steps", 0)), saved.get("dp_noise")
    if steps > 0 and noise is not None:
        history.insert(0, (float(noise) / 2.0, 1.0, steps))
    return history


class NodeRuntime:
    """One daemon's state and loops; :meth:`run` until done or cancelled."""

    def __init__(
        self, config: NodeConfig, key: NodeKey, task: Task, announce: Callable[[str], None] = print
    ) -> None:
        self.config = config
        self.key = key
        self.announce = announce
        index, count = config.shard_index
        shards = partition(task.y_train.numpy(), count, config.partition, config.seed)
        # Features scaled from this node's own shard (or public ranges under --dp sample).
        task = node_view(task, shards, record_private=config.dp_mode == "sample")
        self.task = task
        self.shard = torch.as_tensor(shards[index], dtype=torch.long)
        self.x, self.y = task.x_train[self.shard], task.y_train[self.shard]
        self.model = task.make_model()
        # With DP on, batches must be secret (p2pfl/dp.py); without it, reproducible.
        self.generator = (
            os_entropy_generator()
            if config.dp_enabled
            else torch.Generator().manual_seed(config.seed * 100_003 + index)
        )
        initial = model_arrays(self.model)
        # Under --dp sample the node announces weight 1 and samples 1 instead of its
        # record count, so that DP-SGD's add/remove-one-record guarantee is not undone
        # by a count sent in clear (SECURITY.md); models are then averaged equally.
        public_samples = 1 if config.dp_mode == "sample" else len(self.shard)
        allowlist = load_allowlist(config.allow) if config.allow else None
        self.members: frozenset[str] | None = (
            None
            if allowlist is None
            else frozenset(peer_id_from_public_key(member) for member in allowlist)
        )
        spec_hash = task.spec_hash  # the shared task spec joins the fingerprint
        probe = GossipNode.create(key, initial, samples=public_samples, task_spec_hash=spec_hash)
        policy = AdmissionPolicy(
            fingerprint=probe.layout.fingerprint,
            max_message_bytes=int(config.max_message_mb * MIB),
            allowlist=allowlist,
            task_spec_hash=spec_hash,
        )
        self.gossip = GossipNode.create(
            key,
            initial,
            samples=public_samples,
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
        self.attacker = (
            Attacker.create(self.gossip, config.attack)
            if config.attack not in (None, RECEIPT_LIE)
            else None
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
        self.dp_sgd: DpSgdTrainer | None = None
        if config.dp_mode == "sample":
            from fltasks.dp_sgd import DpSgdTrainer

            self.dp_sgd = DpSgdTrainer(
                self.model,
                self.x,
                self.y,
                lr=config.dp_lr if config.dp_lr is not None else DP_SGD_LR,
                batch_size=task.batch_size,
                noise_multiplier=self._dp_sgd_noise(),
                clip_norm=config.dp_clip if config.dp_clip is not None else DP_SGD_CLIP,
                generator=self.generator,
                reseed=reseed_from_os_entropy,
            )
        elif config.dp_clip is not None and config.dp_noise is not None:
            self.privacy = GaussianMechanism(
                config.dp_clip, config.dp_noise, np.random.default_rng()
            )
        # --dp-target-epsilon reached: the node merges and serves but trains no more.
        self.dp_exhausted = False
        # Kept from the checkpoint even while DP is off, so turning it back on resumes it.
        self._saved_privacy: dict[str, Any] = {}
        self.store = CheckpointStore(config.state_dir)
        self.store.lock()  # held until run() ends; the kernel drops it if we crash
        self.round = 0
        self.accuracy: float | None = None
        self.deadlines = config.deadlines
        # What each peer's link has shown it carries, per direction: push deadlines
        # follow our uplink to it, read deadlines its uplink to us (p2pfl/linkrates.py).
        self.push_rates = LinkRates(config.min_link_bytes_per_s)
        self.read_rates = LinkRates(config.min_link_bytes_per_s)
        self.updates_sent = 0
        self.send_failures: Counter[str] = Counter()
        # Failed pushes in a row per peer, since its last answered push (see _push_failed).
        self._failures_in_a_row: Counter[str] = Counter()
        # Pushes refused by their receiver, by the receipt's reason (refused at the
        # offer: the share came back; after the payloads: it did not).
        self.pushes_refused: Counter[str] = Counter()
        # What became of each pushed share (gossip/delivery.py).
        self.deliveries: DeliveryLedger[Outgoing] = DeliveryLedger()
        # Peers with a push in flight: never two at once on one link.
        self._pushing: set[str] = set()
        # Top-k pushes that carried the link's whole copy afresh (the peer was not in step).
        self.whole_copies_sent = 0
        # The weight each push in flight carries, for the status page's mass count.
        self._pushing_weight: dict[str, float] = {}
        self._push_nursery: trio.Nursery | None = None
        self.neighbours: list[str] = []
        self.started = time.monotonic()
        self.transport: Transport | None = None
        self.book = MemberBook(key.peer_id, self.members, rng=random.Random(key.seed + b"book"))
        self.adopted_from: dict[str, Any] | None = None
        # Snapshots a joining node could not use, by reason (shown in /status).
        self.join_refused: Counter[str] = Counter()
        self.serving = False  # finished its rounds; gossiping without training
        # What _refresh_peers last told the gossip core: (ranked members, quorum).
        self._peer_view: tuple[tuple[str, ...], int] | None = None
        # The configured quorum (at least the rule's minimum); see _refresh_peers.
        self._quorum = self.gossip.quorum
        # Every call into the gossip core holds this lock, one at a time, so that a
        # call running in a worker thread never races another (see _gossip).
        self._gossip_lock = trio.Lock()
        self.offload = self.gossip.layout.size >= OFFLOAD_MIN_PARAMETERS
        # Rejections logged per (peer, reason) at most once per interval; see _log_rejection.
        self._rejection_log = LogThrottle(REJECTION_LOG_INTERVAL_S)
        # Updates refused before admission, by reason (shown with updates_rejected).
        self.refused_updates: Counter[str] = Counter()
        # Which of our addresses are public, NATed or relayed (p2pfl/reachability.py).
        self.reachability = Reachability()
        # Seconds per phase of each round, peak RSS and the loop's worst stall (/status).
        self.phases = PhaseClock()
        self.resumed = self._restore()
        self.epsilon = self._epsilon_now()
        self._status_view = self._gossip_view()

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
        self.round = state.round
        for peer_id, addrs in state.peers.items():
            self.book.add(peer_id, addrs)
        self._saved_privacy = dict(state.privacy)
        self._saved_privacy[NON_PRIVATE_ROUNDS] = non_private_rounds(state.privacy, state.round)
        if self.config.dp_enabled:
            refuse_dp_after_raw_rounds(state.privacy, state.round, str(self.store.current))
        if self.privacy is not None:
            if state.privacy.get("dp_history"):
                raise ConfigError(
                    f"--dp node: the state in {self.store.current} spent its budget under "
                    "--dp sample; keep --dp sample, or start from a fresh --state-dir"
                )
            accountant = self.privacy.accountant
            accountant.steps = _dp_steps_from(state.privacy, self.privacy.noise_multiplier)
        if self.dp_sgd is not None:
            self.dp_sgd.accountant.history = _dp_sgd_history(state.privacy, self.store.current)
        logger.info("resumed from checkpoint at round %d, sequence %d", state.round, state.seq)
        return True

    def _state(self, gossip: GossipState | None = None) -> NodeState:
        gossip = gossip or self.gossip.state()
        return NodeState(
            round=self.round,
            seq=gossip.seq,
            weight=gossip.weight,
            estimate=gossip.estimate,
            fingerprint=self.gossip.layout.fingerprint,
            last_seq=gossip.last_seq,
            peers={peer_id: self.book.addrs(peer_id) for peer_id in self.book.known()},
            privacy=self._privacy_state(),
        )

    def _privacy_state(self) -> dict[str, Any]:
        if self.dp_sgd is not None:
            return {
                "dp_mode": "sample",
                "dp_history": [list(entry) for entry in self.dp_sgd.history()],
                NON_PRIVATE_ROUNDS: 0,
            }
        if self.privacy is None:
            return dict(self._saved_privacy)
        privacy = self.privacy
        return {
            "dp_steps": privacy.accountant.steps,
            "dp_noise": privacy.noise_multiplier,
            NON_PRIVATE_ROUNDS: 0,  # DP refuses to start otherwise (p2pfl/dp.py)
        }

    async def checkpoint(self) -> None:
        gossip = await self._gossip(self.gossip.state)
        state = self._state(gossip)  # the peer book is read on the loop
        # An I/O error (full disk, EMFILE) is logged and counted, never fatal: the
        # last good checkpoint stays, and the next round tries again.
        await trio.to_thread.run_sync(self.store.try_save, state)

    async def _gossip(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work`` on the gossip core: one call at a time, off the loop for large models.

        The status endpoint reads a view refreshed here, under the same lock,
        so it never iterates a table that a worker thread is changing.
        """
        async with self._gossip_lock:
            if self.offload:
                result = await trio.to_thread.run_sync(work, *args)
            else:
                result = work(*args)
            self._status_view = self._gossip_view()
            return result

    def _gossip_view(self) -> dict[str, Any]:
        gossip = self.gossip
        return {
            "counters": gossip.counters(),
            "weight": gossip.pushsum.weight,
            "weight_pending": gossip.votes.pending_weight(),
            "sequence": gossip.seq,
            "last_seq": dict(gossip.admission.last_seq),
        }

    def status(self) -> dict[str, Any]:
        transport = self.transport
        view = self._status_view
        counters = view["counters"]
        rejected: Counter[str] = Counter(counters["rejected"])  # type: ignore[arg-type]
        rejected.update(self.refused_updates)
        if transport is not None:
            rejected.update(transport.frame_errors)
            for reason in ("busy", "rate-limited"):
                if transport.stream_errors.get(reason):
                    rejected[reason] += transport.stream_errors[reason]
            # A non-member's update stream is refused unread: its sender is unknown.
            if transport.streams_refused.get(UPDATE_PROTOCOL):
                rejected["unknown-sender"] += transport.streams_refused[UPDATE_PROTOCOL]
        return {
            "peer_id": self.key.peer_id,
            "addrs": transport.addrs if transport else [],
            # Each address's kind (public, nated, firewalled, relayed), our relays, and
            # the peers we reach through a relay (p2pfl/reachability.py).
            "reachability": reachability_view(transport, self.reachability),
            # Our relay service: what it granted, carried, refused and cut, by reason.
            "relay": transport.nat.policy.view() if transport and transport.nat else None,
            "round": self.round,
            "neighbours": list(self.neighbours),
            "accuracy": self.accuracy,
            "updates_sent": self.updates_sent,
            "updates_accepted": counters["accepted"],
            # training, then serving: finished its rounds, still gossiping (--linger);
            # dp-exhausted: --dp-target-epsilon reached, merging and serving only
            "state": self._state_name(),
            # Fresh neighbour votes, robust merges with a quorum or bounded below one,
            # and pushes that arrived before the sender's previous one was merged.
            "votes": counters["votes"],
            "merges": counters["merges"],
            "coalesced": counters["coalesced"],
            "updates_rejected": dict(rejected),
            "bytes_sent": transport.bytes_sent if transport else 0,
            "bytes_received": transport.bytes_received if transport else 0,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "samples": len(self.shard),
            "weight": view["weight"],
            # Where the rest of the push-sum mass is: received shares not merged yet,
            # and shares being pushed (until refunded or given; gossip/delivery.py).
            # Summed over all nodes with "weight", it stays at the nodes' starting
            # total unless shares are lost (docs/PROTOCOL.md §4).
            "weight_pending": view["weight_pending"],
            "weight_in_flight": sum(self._pushing_weight.values()),
            "sequence": view["sequence"],
            "known_peers": len(self.book),
            # Known peers that could not be dialled lately (kept, redialled by discovery).
            "peers_unreachable": sum(not self.book.reachable(p) for p in self.book.known()),
            # Highest sequence accepted from each sender: shows whose updates get through.
            "last_seq": {
                peer_id_from_public_key(sender): seq
                for sender, seq in view["last_seq"].items()
            },
            "send_failures": dict(self.send_failures),
            # Peers whose links showed less than --min-link-mbit: the Mbit/s deadlines
            # assume, for our pushes to them and for their frames to us.
            "link_mbit": {
                direction: {peer: round(r * 8 / 1e6, 3) for peer, r in rates.rates.items()}
                for direction, rates in (("push", self.push_rates), ("read", self.read_rates))
            },
            # What became of pushed shares: delivered, refunded, disputed, unanswered
            # (docs/PROTOCOL.md §4); and per peer, refusals after the payloads.
            "deliveries": dict(self.deliveries.counts),
            "disputed_by": dict(self.deliveries.disputes),
            "pushes_refused": dict(self.pushes_refused),
            "pushes_in_flight": len(self._pushing),
            # top-k: pushes that carried the link's whole copy afresh (peer not in step)
            "whole_copies_sent": self.whole_copies_sent,
            "streams_refused": dict(transport.streams_refused) if transport else {},
            # Connections cut before any stream (p2pfl.gating), by reason.
            "connections_refused": dict(transport.connections_refused) if transport else {},
            # Checkpoint writes that failed, by errno name (the node kept running).
            "checkpoint_failures": dict(self.store.failures),
            "aggregator": self.gossip.aggregator.name,
            "compression": self.gossip.codec_id,
            # The members whose median model this node started from when it joined.
            "adopted_from": self.adopted_from,
            "join_refused": dict(self.join_refused),
            "attack": self.config.attack,
            "dp": self.config.dp_mode,
            "epsilon": self.epsilon,
            "delta": self.config.dp_delta if self.config.dp_enabled else None,
            "dp_target_epsilon": self.config.dp_target_epsilon,
            "dp_exhausted": self.dp_exhausted,
            "task": self.task.name,
            # The last round's seconds per phase, peak RSS, the loop's worst stall.
            "phases": self.phases.status(),
        }

    def _dp_sgd_noise(self) -> float:
        """--dp-noise, else the least noise that spends --dp-target-epsilon in --rounds
        (both given), else the default; announced, since it fixes the epsilon a run spends."""
        config = self.config
        if config.dp_noise is not None:
            return config.dp_noise
        if config.dp_target_epsilon is None or config.rounds is None:
            return DP_SGD_NOISE
        from fltasks.dp_sgd import noise_for_target, sample_rate_of, steps_per_epoch

        rate = sample_rate_of(self.task.batch_size, len(self.shard))
        steps = config.rounds * config.local_epochs * steps_per_epoch(rate)
        noise = noise_for_target(config.dp_target_epsilon, config.dp_delta, rate, steps)
        self.announce(
            f"--dp sample: noise {noise:.3f} spends epsilon {config.dp_target_epsilon:g} "
            f"(delta {config.dp_delta:g}) in {config.rounds} rounds of {steps // config.rounds} "
            f"steps at sample rate {rate:.3f}"
        )
        return noise

    def _state_name(self) -> str:
        if self.serving:
            return "serving"
        return "dp-exhausted" if self.dp_exhausted else "training"

    # -- privacy --------------------------------------------------------------------------

    def _epsilon_now(self) -> float | None:
        """Epsilon spent so far at --dp-delta, or None with DP off.

        Computed on the loop between rounds (the accountant changes only in the
        training thread), and cached for /status.
        """
        delta = self.config.dp_delta
        if self.privacy is not None:
            return self.privacy.spent(delta)["epsilon"]
        if self.dp_sgd is not None:
            return self.dp_sgd.epsilon(delta)
        return None

    def _epsilon_after_next_round(self) -> float | None:
        delta = self.config.dp_delta
        if self.privacy is not None:
            accountant = self.privacy.accountant
            return RdpAccountant(accountant.noise_multiplier, accountant.steps + 1).epsilon(delta)
        if self.dp_sgd is not None:
            steps = self.config.local_epochs * self.dp_sgd.steps_per_epoch
            return self.dp_sgd.epsilon_after(steps, delta)
        return None

    def _budget_allows_a_round(self) -> bool:
        """False, once and for good, when the next round would push epsilon past the target.

        The decision reads only the accountant, never the data, so stopping
        costs no privacy.
        """
        target = self.config.dp_target_epsilon
        if self.dp_exhausted:
            return False
        if target is None:
            return True
        after = self._epsilon_after_next_round()
        if after is None or after <= target:
            return True
        self.dp_exhausted = True
        logger.warning(
            "privacy budget reached: epsilon %.4g now, %.4g after one more round > target %g "
            "(delta %g); training stops, merging and serving go on",
            self.epsilon or 0.0,
            after,
            target,
            self.config.dp_delta,
        )
        return False

    # -- inbound --------------------------------------------------------------------------

    def _ranked(self) -> tuple[str, ...]:
        """What links are ranked over: the allowlist if any, else our first-hand peers."""
        return ranked_membership(self.key.peer_id, self.members, self.book.known())

    async def _refresh_peers(self) -> None:
        """Tell the gossip core whom it may hear from, and its quorum, when either changed.

        Senders come from the ranked membership alone (never from who is up), so
        every member that may push to us is accepted. The quorum counts only the
        in-neighbours we can reach (neighbours.effective_quorum): a listed member
        that is down must not hold every merge below it.
        """
        members = self._ranked()
        degree, own = self.config.degree, self.key.peer_id
        floor = self.gossip.aggregator.min_senders
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
        await self._gossip(self._set_peers, frozenset(allowed), quorum)

    def _set_peers(self, senders: frozenset[bytes], quorum: int) -> None:
        self.gossip.set_peers(senders)
        self.gossip.quorum = quorum

    def _gossips_with(self) -> set[str]:
        """The peers we gossip with, either way: members for our relay (p2pfl/relay.py)."""
        senders = in_candidates(self.key.peer_id, self._ranked(), self.config.degree)
        return {*self.neighbours, *senders}

    async def _on_offer(self, peer_id: str, offer: bytes) -> tuple[bytes, int | None]:
        """Judge a pushed update by its offer; the answer, and the payload bytes to read
        (None: refused, and the pusher takes its share back; gossip/delivery.py)."""
        try:
            sender_key = public_key_from_peer_id(peer_id)
        except ValueError:
            # Not an ed25519 identity (e.g. secp256k1): it cannot sign updates for us.
            self.refused_updates["unsupported-key"] += 1
            self._log_rejection(peer_id, "unsupported-key", "its peer id is not an ed25519 key")
            return Receipt("unsupported-key", 0).encode(), None
        await self._refresh_peers()
        receipt, payload_bytes = await self._gossip(
            self.gossip.screen, offer, time.time(), sender_key
        )
        if not receipt.ready:
            self._log_rejection(peer_id, receipt.verdict, "refused at the offer")
            return receipt.encode(), None
        return receipt.encode(), payload_bytes

    async def _on_update(self, peer_id: str, payload: bytes) -> bytes:
        """Admit one pushed update (its offer and payloads); the reply is its receipt."""
        sender_key = public_key_from_peer_id(peer_id)  # ed25519: its offer was screened
        deliver = self.phases.timed("admit", self.gossip.deliver)
        verdict, receipt = await self._gossip(deliver, payload, time.time(), sender_key)
        if verdict.accepted:
            self.book.mark_alive(peer_id)
            if self.config.attack == RECEIPT_LIE:  # experiments only: keep it, deny it
                return Receipt(Reason.REPLAY.value, receipt.last_seq).encode()
        else:
            self._log_rejection(peer_id, verdict.reason.value, verdict.detail)
        return receipt.encode()

    def _log_rejection(self, peer_id: str, reason: str, detail: str) -> None:
        """One bounded line per peer and reason every REJECTION_LOG_INTERVAL_S at most;
        the counters count every rejection."""
        held_back = self._rejection_log.admit((peer_id, reason), time.monotonic())
        if held_back is None:
            return
        if len(detail) > MAX_REJECTION_DETAIL_CHARS:
            detail = detail[:MAX_REJECTION_DETAIL_CHARS] + "...(cut)"
        more = f"; {held_back} more from this peer for this reason since" if held_back else ""
        logger.info("rejected an update from %s: %s (%s)%s", peer_id, reason, detail, more)

    async def _on_model_request(self, peer_id: str, payload: bytes) -> bytes:
        # The reply carries our round so the joiner can pick the most advanced peer.
        snapshot = await self._gossip(self.gossip.snapshot, time.time())
        return self.round.to_bytes(8, "big") + bytes(snapshot)

    # -- network loops --------------------------------------------------------------------

    async def _connect(self, peer_id: str) -> None:
        assert self.transport is not None
        if peer_id in self.transport.connected_peers():
            return
        last: Exception | None = None
        for addr in self.book.addrs(peer_id):
            try:
                await self.transport.connect(addr, self.deadlines.handshake)
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
                # Persistent: backoff, never the per-address budget (issue 20).
                peer_id = await self.transport.connect(
                    addr, self.deadlines.handshake, persistent=True
                )
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

    async def _reachability_loop(self, bootstrapped: list[str]) -> None:
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

    async def _discovery_loop(self) -> None:
        assert self.transport is not None
        while True:
            if not self.book.known() and self.config.bootstrap:
                await self._bootstrap()
            else:
                await self._redial_unreachable()
                await discovery_round(
                    self.transport, self.book, DISCOVERY_FANOUT, self.deadlines.peer_exchange
                )
            await trio.sleep(DISCOVERY_INTERVAL_S)

    async def _redial_unreachable(self) -> None:
        """Dial every known peer whose last dial failed: how a healed partition is seen.

        Each address is dialled at most a few times a minute (the transport's budget),
        so this costs little while the peer stays away.
        """

        async def redial(peer_id: str) -> None:
            try:
                await self._connect(peer_id)
            except TransportError:
                if self.book.mark_failed(peer_id):
                    logger.info("forgot %s: undialable for long", peer_id)
                return
            self.book.mark_alive(peer_id)

        async with trio.open_nursery() as nursery:
            for peer_id in self.book.known():
                if not self.book.reachable(peer_id):
                    nursery.start_soon(redial, peer_id)

    async def _adopt_current_model(self, reached: list[str]) -> None:
        """A fresh node starts from the median of several members' models, never one's.

        It asks up to ``ADOPT_FROM`` members (those it bootstrapped from first)
        for a signed snapshot. A claimed round is only reported, never trusted:
        the median of three or more models cannot be moved outside the honest
        values by a minority. Every snapshot that cannot be used is logged and
        counted in ``join_refused``; with none usable the node keeps its
        initial model. Nothing here can crash the node.
        """
        assert self.transport is not None
        # Second-hand peers too: a joiner knows the others only from its bootstrap's
        # reply, and asking them is how one hostile bootstrap is outvoted. Noise
        # proves each one's id when we dial it.
        heard_of = [*reached, *self.book.known(), *self.book.second_hand()]
        candidates = list(dict.fromkeys(heard_of))[:ADOPT_FROM]
        models: list[np.ndarray] = []
        sources: list[dict[str, Any]] = []
        # A snapshot is about our own model's size (float32 parameters).
        deadline = self.deadlines.model_fetch(self.gossip.layout.size)
        for peer_id in candidates:
            try:
                sender = public_key_from_peer_id(peer_id)
                await self._connect(peer_id)
                reply = await self.transport.request(
                    peer_id,
                    MODEL_PROTOCOL,
                    b"",
                    deadline,
                    self.gossip.admission.policy.max_message_bytes + 8,
                )
                if len(reply) < 8:
                    raise InvalidUpdate(Reason.MALFORMED, "the reply is too short")
                snapshot = memoryview(reply)[8:]
                models.append(await self._gossip(self.gossip.read_snapshot, snapshot, sender))
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
        await self._gossip(self.gossip.adopt, models)
        self.adopted_from = {"rule": "median", "peers": sources}
        logger.info("adopted the median of %d member model(s)", len(models))

    async def _wait_for_peers(self) -> None:
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

    def _push(self, outgoing: Outgoing, peers: list[str]) -> None:
        """Push ``outgoing`` to each of ``peers`` in the background.

        The caller chose the peers (:meth:`_free`) and split the
        weight for exactly these, so every share is accounted for.
        """
        assert self._push_nursery is not None
        for peer_id in peers:
            if peer_id in self._pushing:
                # Only an --attack member gets here (its attack loop pushes too); an
                # honest node's rounds are the only pushers, so its shares are all sent.
                continue
            self._pushing.add(peer_id)
            self._push_nursery.start_soon(self._push_alone, outgoing, peer_id)

    def _free(self, peers: Iterable[str]) -> list[str]:
        """``peers`` that can take a push now: reachable, with no push in flight.

        A neighbour whose link is still busy skips a round: a whole model supersedes
        the last, and a top-k link's residual (gossip/public_copy.py) carries what
        the skipped difference would have to its next one.
        """
        return [p for p in peers if self.book.reachable(p) and p not in self._pushing]

    async def _push_alone(self, outgoing: Outgoing, peer_id: str) -> None:
        try:
            await self._push_one(outgoing, peer_id)
        finally:
            self._pushing.discard(peer_id)

    async def _push_one(self, outgoing: Outgoing, peer_id: str) -> None:
        # Its weight is in flight until the receipt (or failure) says where it went.
        self._pushing_weight[peer_id] = outgoing.weight
        try:
            assert self.transport is not None
            transport = self.transport
            peer_key = public_key_from_peer_id(peer_id)
            addressed = self.phases.timed("prepare", self.gossip.addressed)
            outgoing = await self._gossip(addressed, outgoing, peer_key, time.time())
            self.whole_copies_sent += outgoing.resync
            message = outgoing.message
            try:
                await self._connect(peer_id)
            except TransportError as error:
                # Not dialled: certainly not delivered. Unreachable until discovery
                # reaches it again; forgotten only once gone a long while.
                await self._not_sent(peer_id, outgoing)
                self.send_failures[peer_id] += 1
                if self.book.mark_failed(peer_id):
                    logger.info("forgot neighbour %s: undialable for long", peer_id)
                logger.debug("push to %s: dial failed: %s", peer_id, error)
                return
            deadline = self.deadlines.push(len(message), self.push_rates.rate(peer_id))
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
                    self.book.mark_alive(peer_id)
                    self._failures_in_a_row.pop(peer_id, None)
                    self.pushes_refused[refusal.verdict] += 1
                    await self._gossip(self.gossip.not_sent, peer_key, outgoing)
                    await self._refund(self.deliveries.refused_at_offer(peer_id, outgoing, refusal))
                    return
                self.push_rates.completed(peer_id, len(message), trio.current_time() - started)
                receipt = Receipt.decode(reply)
            except (Unanswered, InvalidReceipt) as error:
                # The payloads went out whole: the share is given (gossip/delivery.py).
                await self._gossip(self.gossip.settled, peer_key, outgoing, None)
                self.deliveries.unanswered(peer_id, outgoing)
                self._push_failed(peer_id, error)
                return
            except TransportError as error:
                await self._not_sent(peer_id, outgoing)
                self._push_failed(peer_id, error)
                return
            await self._gossip(self.gossip.settled, peer_key, outgoing, receipt)
            self.book.mark_alive(peer_id)
            self._failures_in_a_row.pop(peer_id, None)
            self.deliveries.answered(peer_id, outgoing, receipt)
            if receipt.accepted:
                self.updates_sent += 1
            else:
                self.pushes_refused[receipt.verdict] += 1
                logger.info("%s refused our update after its payloads (%s): the share "
                            "stays given", peer_id, receipt.verdict)
        finally:
            self._pushing_weight.pop(peer_id, None)

    def _push_failed(self, peer_id: str, error: Exception) -> None:
        assert self.transport is not None
        self.send_failures[peer_id] += 1
        self._failures_in_a_row[peer_id] += 1
        if getattr(error, "timed_out", False):
            self.push_rates.timed_out(peer_id)  # slow, not gone: the next push gets longer
        logger.debug("push to %s failed: %s", peer_id, error)
        # After a network heals, TCP connections sit ESTABLISHED in retransmission
        # backoff for minutes and every new stream queues behind them: close the
        # connection so the next push redials. Not at the first failure: closing
        # also cuts the peer's pushes to us on that connection, and on a congested
        # link one slow stream made every push fail in turn (measured in the lab).
        if self._failures_in_a_row[peer_id] >= FAILURES_BEFORE_REDIAL:
            self._failures_in_a_row.pop(peer_id, None)
            self.transport.nursery.start_soon(self.transport.disconnect, peer_id)

    async def _not_sent(self, peer_id: str, outgoing: Outgoing) -> None:
        """The push failed before its frame was wholly written: the peer holds none of it."""
        await self._gossip(self.gossip.not_sent, public_key_from_peer_id(peer_id), outgoing)
        await self._refund(self.deliveries.not_sent(peer_id, outgoing))

    async def _refund(self, shares: list[Outgoing]) -> None:
        for share in shares:
            await self._gossip(self.gossip.refund, share)

    # -- the round ------------------------------------------------------------------------

    def _train(self, estimate: np.ndarray) -> np.ndarray:
        """Runs in a worker thread: train from ``estimate``, return the trained vector."""
        load_arrays(self.model, self.gossip.layout.unflatten(estimate))
        if self.dp_sgd is not None:
            self.dp_sgd.train(self.config.local_epochs)
            trained = self.gossip.layout.flatten(model_arrays(self.model))
            # Computed from noisy steps only: falling back is post-processing, free.
            return trained if np.isfinite(trained).all() else estimate
        self.task.train(self.model, self.x, self.y, self.config.local_epochs, self.generator)
        return self.gossip.layout.flatten(model_arrays(self.model))

    def _estimate(self) -> np.ndarray:
        return self.gossip.estimate.copy()

    def _evaluate(self, estimate: np.ndarray) -> float:
        load_arrays(self.model, self.gossip.layout.unflatten(estimate))
        return float(self.task.evaluate(self.model))

    async def _one_round(self) -> None:
        """Train (unless serving), merge the votes once, evaluate, push, checkpoint."""
        started = time.perf_counter()
        if not self.serving and self._budget_allows_a_round():
            await self._train_step()
        await self._refresh_peers()
        await self._gossip(self.phases.timed("merge", self.gossip.merge))
        snapshot = await self._gossip(self._estimate)
        evaluate = self.phases.timed("evaluate", self._evaluate)
        self.accuracy = await trio.to_thread.run_sync(evaluate, snapshot)
        # Our links by the shared rule; a spare stands in for each we cannot reach.
        ranked, degree = self._ranked(), self.config.degree
        self.neighbours = choose_live(self.key.peer_id, ranked, degree, self.book.reachable)
        keys = [public_key_from_peer_id(peer_id) for peer_id in self.neighbours]
        await self._gossip(self.gossip.keep_links, keys)
        targets = self._free(self.neighbours)
        outgoing: Outgoing | None = None
        if targets:  # nobody to push to: no message to build, no sequence number spent
            if self.attacker is not None:
                prepare = self.phases.timed("prepare", self.attacker.prepare)
                outgoing = await self._gossip(prepare, time.time())
            else:
                prepare = self.phases.timed("prepare", self.gossip.prepare)
                outgoing = await self._gossip(prepare, len(targets), time.time())
        if not self.serving:
            self.round += 1
        # Checkpoint before sending: a restart then never reuses a sequence number
        # that peers have already seen.
        with self.phases.timing("checkpoint"):
            await self.checkpoint()
        if outgoing is not None:
            self._push(outgoing, targets)
        record = self.phases.end_round(self.round, time.perf_counter() - started)
        logger.info("round %d phases %s", self.round, json.dumps(record))
        logger.info(
            "round %d accuracy %.4f neighbours %d%s",
            self.round,
            self.accuracy,
            len(self.neighbours),
            " (serving)" if self.serving else "",
        )

    async def _train_step(self) -> None:
        before = await self._gossip(self._estimate)
        after = await trio.to_thread.run_sync(self.phases.timed("train", self._train), before)
        if self.privacy is not None:
            try:
                after = self.privacy.privatize_step(before, after)
            except ValueError as error:
                # Training diverged. Whether it does depends on the data, so the round
                # must look like any other: a zero change, noised and accounted.
                logger.warning("round %d: diverged, released noise only: %s", self.round + 1, error)
                after = self.privacy.privatize_step(before, before)
        elif self.dp_sgd is None:
            # A raw update leaves with the next push: DP can never be claimed for this
            # model again (p2pfl/dp.py), so the checkpoint must remember it.
            raw = self._saved_privacy.get(NON_PRIVATE_ROUNDS, 0)
            self._saved_privacy[NON_PRIVATE_ROUNDS] = raw + 1
        self.epsilon = self._epsilon_now()
        await self._gossip(self.gossip.apply_local_step, before, after)

    async def _paced(self, started: float) -> None:
        await trio.sleep(max(0.0, self.config.round_interval - (time.monotonic() - started)))

    async def _training_loop(self) -> None:
        await self._wait_for_peers()
        while self.config.rounds is None or self.round < self.config.rounds:
            started = time.monotonic()
            await self._one_round()
            await self._paced(started)
        # Finished: stay a member for a while, merging and pushing but not training,
        # so that late starters are not left alone (and still learn from us).
        self.serving = True
        if self.config.linger > 0:
            logger.info("finished %d rounds; serving for %g s", self.round, self.config.linger)
        with trio.move_on_after(self.config.linger):
            while True:
                started = time.monotonic()
                await self._one_round()
                await self._paced(started)

    async def _attack_loop(self) -> None:
        """An --attack member pushes its attack to every peer it knows, as fast as allowed."""
        assert self.attacker is not None
        while True:
            peers = self._free(self.book.known())
            if peers:
                outgoing = await self._gossip(self.attacker.prepare, time.time())
                self._push(outgoing, peers)
            await trio.sleep(ATTACK_PUSH_INTERVAL_S)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``config.rounds`` are done or the caller cancels; always checkpoint."""
        config = self.config
        max_bytes = self.gossip.admission.policy.max_message_bytes
        # The burst is one largest frame, so a member can always deliver a full update.
        limiter = PeerRateLimiter(
            config.peer_mb_per_min * MIB / 60.0, max_bytes + MAX_UVARINT_BYTES
        )
        async with Transport.open(
            self.key,
            config.listen,
            allowed_peers=self.members,
            rate_limiter=limiter,
            relay=config.relay == "on",
            handshake_timeout=self.deadlines.handshake,
            known_peers=self.book.is_first_hand,
        ) as transport:
            self.transport = transport
            if transport.nat is not None:
                transport.nat.policy.members = self._gossips_with
            timeout, rates = config.read_timeout, self.read_rates
            transport.set_handler(
                UPDATE_PROTOCOL, self._on_update, max_bytes, timeout, rates,
                screen=self._on_offer, max_offer_size=min(MAX_OFFER_BYTES, max_bytes),
            )
            transport.set_handler(MODEL_PROTOCOL, self._on_model_request, 0, timeout, rates)
            serve_peer_exchange(transport, self.book, read_timeout=timeout)
            self.reachability.serve_relay = config.relay == "on"
            serve_reachability(transport, self.reachability, timeout)
            try:
                async with trio.open_nursery() as nursery:
                    self._push_nursery = nursery
                    host, port = parse_host_port(config.status_addr)
                    bound = await nursery.start(serve_status, host, port, self.status)
                    self.announce(f"peer-id {self.key.peer_id}")
                    for addr in transport.addrs:
                        self.announce(f"listen {addr}")
                    self.announce(f"status http://{bound[0]}:{bound[1]}/status")
                    task_status.started(self)
                    reached = await self._bootstrap()
                    nursery.start_soon(self._reachability_loop, reached)
                    if reached and not self.resumed:
                        await self._adopt_current_model(reached)
                    nursery.start_soon(self._discovery_loop)
                    nursery.start_soon(self.phases.watchdog)
                    if self.attacker is not None:
                        nursery.start_soon(self._attack_loop)
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
