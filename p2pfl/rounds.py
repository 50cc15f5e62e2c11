"""The round: train (unless serving), merge the votes once, evaluate, push, checkpoint.

There is no barrier anywhere. Each local round trains in a worker thread (so
libp2p streams keep draining: yamux fails a sender whose receiver stops
reading for 5 s), merges its neighbours' votes once (gossip/votes.py: one vote
per neighbour, a quorum for robust rules), checkpoints, and starts one push of
a signed update to each free neighbour in the background. Rounds follow the
network (p2pfl/pacing.py: a round merges once its live in-neighbours have
delivered, and trains only once one of its last pushes has ended, each wait
bounded by ``--mix-wait``), are paced (``--round-interval``), and a node that
has finished its ``--rounds`` keeps gossiping without training until its
neighbours have its final model and it is close to theirs (``--linger``
seconds at most), so members that started later are not left to train alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import trio

from gossip.attacks import Attacker
from gossip.keys import public_key_from_peer_id
from p2pfl.config import NodeConfig
from p2pfl.gossip_access import GuardedGossip
from p2pfl.membership import Membership
from p2pfl.pacing import MixingPace
from p2pfl.peer_policy import PeerPolicy, Push
from p2pfl.phases import PhaseClock
from p2pfl.privacy_budget import PrivacyBudget
from p2pfl.pusher import Pusher
from p2pfl.step_guard import judge_step
from p2pfl.training import LocalTraining
from p2pfl.wakeup import Wakeup

logger = logging.getLogger(__name__)

# An --attack member pushes this often, whatever its rounds do (bounded by the
# receivers' per-peer rate limit).
ATTACK_PUSH_INTERVAL_S = 0.03
# A finished node is done serving once its in-neighbours' models are this close to
# its own, relative to its model's norm (and its neighbours accepted its final model),
# or twice what its codec alone leaves (int8: about 1%). In the lab (4 hosts, 10 rounds)
# 1% let nodes leave 3.5 accuracy points apart.
SETTLED_DISTANCE = 0.002
# Weight of the newest round in the smoothed work time of a round (p2pfl/pacing.py).
WORK_SMOOTHING = 0.3


class RoundLoop:
    """This node's rounds: how many are done, the last accuracy, training or serving."""

    def __init__(
        self,
        config: NodeConfig,
        core: GuardedGossip,
        training: LocalTraining,
        budget: PrivacyBudget,
        membership: Membership,
        pusher: Pusher,
        phases: PhaseClock,
        checkpoint: Callable[[], Awaitable[None]],
        attacker: Attacker | None = None,
    ) -> None:
        self.config = config
        self.core = core
        self.training = training
        self.budget = budget
        self.membership = membership
        self.pusher = pusher
        self.policy: PeerPolicy[Any] = pusher.policy
        self.phases = phases
        self.checkpoint = checkpoint
        self.attacker = attacker
        self.round = 0
        self.accuracy: float | None = None
        self.serving = False  # finished its rounds; gossiping without training
        self.loss: float | None = None  # held-out loss after the last local step
        self.rejected_steps = 0  # local steps the step guard dropped
        self._last_logged: tuple[object, ...] | None = None
        # Rounds follow the network (p2pfl/pacing.py); pokes come from admitted
        # shares (admitted) and ended pushes (the pusher's on_push_end).
        self.pace = MixingPace(config.mix_wait)
        self.wakeup = Wakeup()
        pusher.on_push_end = self.wakeup.poke
        self._last_targets: list[str] = []
        # Smoothed seconds of our rounds without their waits (p2pfl/pacing.py).
        self._work_s = 0.0
        # How close a finished node's in-neighbours must be (see SETTLED_DISTANCE).
        self._settled_at = SETTLED_DISTANCE

    def state_name(self) -> str:
        """training; serving: finished its rounds, still gossiping (--linger);
        dp-exhausted: --dp-target-epsilon reached, merging and serving only."""
        if self.serving:
            return "serving"
        return "dp-exhausted" if self.budget.exhausted else "training"

    def admitted(self, peer_id: str) -> None:
        """A share from ``peer_id`` was admitted: a round waiting to mix may go on."""
        self.pace.arrived(peer_id, time.monotonic(), self.round)
        self.wakeup.poke()

    async def _wait_until(self, ready: Callable[[], float | None]) -> bool:
        """Wait while ``ready()`` gives a time to wait until; False if that time came first.
        ``ready`` is asked again at each poke, so nothing it depends on is missed."""
        while True:
            armed = self.wakeup.armed()
            until = ready()
            if until is None:
                return True
            with trio.move_on_after(max(0.0, until - time.monotonic())):
                await armed.wait()
                continue
            return False

    async def _wait_to_mix(self) -> None:
        """Before merging: until every live in-neighbour delivered, within its bound."""
        # Until a push of ours was answered we do not know what our links take: only
        # --mix-wait bounds the wait (a bound from our work alone let the first rounds
        # race ahead of slow links, measured in the lab).
        pushed = self.pusher.push_seconds
        own_round_s = self._work_s + pushed if pushed else math.inf

        # We share with someone, and a push of ours was answered (a member that refuses
        # or never answers us would hold every round to --mix-wait): they share back.
        expecting = bool(self._last_targets) and pushed > 0

        def until() -> float | None:
            return self.pace.wait_until(self.round, time.monotonic(), own_round_s, expecting)

        if not await self._wait_until(until):
            self.pace.waited_out += 1

    async def _wait_for_a_landing(self) -> None:
        """Before training: until one of the last round's shares ended its push (each
        push has its deadline; --mix-wait bounds the wait too). Probes do not count."""
        targets, limit = self._last_targets, time.monotonic() + self.pace.max_wait
        if not targets or not self.pace.enabled:
            return
        in_flight = self.policy.in_flight
        await self._wait_until(
            lambda: None if any(p not in in_flight for p in targets) else limit)

    def _estimate(self) -> np.ndarray:
        return self.core.node.estimate.copy()

    async def evaluate_current(self) -> None:
        """Report the current model's accuracy (a restored one's, before its first round)."""
        snapshot = await self.core.call(self._estimate)
        evaluate = self.phases.timed("evaluate", self.training.evaluate)
        self.accuracy = await trio.to_thread.run_sync(evaluate, snapshot)

    async def one_round(self) -> None:
        """Wait for the network, merge the votes once, train (unless serving), evaluate,
        push, checkpoint."""
        started = time.perf_counter()
        node = self.core.node
        training = not self.serving and self.budget.allows_a_round()
        if training:
            with self.phases.timing("wait"):
                await self._wait_for_a_landing()
                await self._wait_to_mix()
        # Combine, then adapt: the round trains on what its neighbours sent from their
        # last round. Merging after training instead mixed our newest step with their
        # step of the round before, a round of lag: 10 rounds on 10 Mbit/s links ended
        # at 0.83 to 0.89 that way, and at 0.96 this way (docs/NETLAB.md).
        await self.membership.refresh_peers()
        await self.core.call(self.phases.timed("merge", node.merge))
        self.pace.merged(time.monotonic())
        if training:
            await self._train_step()
        await self.evaluate_current()
        neighbours = self.membership.choose_neighbours()
        keys = [public_key_from_peer_id(peer_id) for peer_id in neighbours]
        await self.core.call(node.keep_links, keys)
        targets = self.policy.free(neighbours)
        probed = self.policy.silent(targets)  # silent peers get weight 0 (p2pfl/silence.py)
        sharing = [peer for peer in targets if peer not in probed]
        pushes: list[Push[Any]] = []
        if sharing:  # nobody to share with: no message to build, no sequence number spent
            if self.attacker is not None:
                prepare = self.phases.timed("prepare", self.attacker.prepare)
                outgoing = await self.core.call(prepare, time.time())
            else:
                prepare = self.phases.timed("prepare", node.prepare)
                outgoing = await self.core.call(prepare, len(sharing), time.time())
            # In the same step as the split (no await between): the weight split off
            # is in flight from here, so /status's mass count never dips while the
            # checkpoint below is written.
            pushes = self.policy.start_pushes(outgoing, sharing)
        if probed:
            probe = await self.core.call(self.phases.timed("prepare", node.probe), time.time())
            pushes += self.policy.start_pushes(probe, probed)
        if not self.serving:
            self.round += 1
        # Checkpoint before sending: a restart then never reuses a sequence number
        # that peers have already seen.
        with self.phases.timing("checkpoint"):
            await self.checkpoint()
        self.pusher.push(pushes)
        self._last_targets = [push.peer for push in pushes if push.peer in sharing]
        record = self.phases.end_round(self.round, time.perf_counter() - started)
        work_s = record.get("round_s", 0.0) - record.get("wait_s", 0.0)
        self._work_s += WORK_SMOOTHING * (work_s - self._work_s)
        # A serving node ticks twice a second with nothing new: it logs when what it
        # would say changes, not every tick.
        said = (self.round, f"{self.accuracy:.4f}", len(neighbours), self.serving)
        if said == self._last_logged:
            return
        self._last_logged = said
        if not self.serving:
            logger.info("round %d phases %s", self.round, json.dumps(record))
        logger.info(
            "round %d accuracy %.4f neighbours %d%s",
            self.round,
            self.accuracy,
            len(neighbours),
            " (serving)" if self.serving else "",
        )

    async def _train_step(self) -> None:
        before = await self.core.call(self._estimate)
        train = self.phases.timed("train", self.training.train)
        after = await trio.to_thread.run_sync(train, before, self.budget.dp_sgd)
        if not self.config.dp_enabled and not await self._step_is_good(before, after):
            return  # the last good model (before) stays; see p2pfl/step_guard.py
        after = self.budget.release(before, after, self.round + 1)
        await self.core.call(self.core.node.apply_local_step, before, after)

    async def _step_is_good(self, before: np.ndarray, after: np.ndarray) -> bool:
        """Judge this node's own training step on its held-out split (step_guard)."""
        held_out = self.phases.timed("evaluate", self.training.held_out)
        start = await trio.to_thread.run_sync(held_out, before)
        end = await trio.to_thread.run_sync(held_out, after)
        self.loss = end[1]
        verdict = judge_step(start, end)
        if not verdict.keep:
            self.rejected_steps += 1
            logger.warning("round %d: local step dropped, keeping the model it started from "
                           "(%s)", self.round + 1, verdict.reason)
        return verdict.keep

    async def _paced(self, started: float) -> None:
        await trio.sleep(max(0.0, self.config.round_interval - (time.monotonic() - started)))

    async def run(self) -> None:
        """Wait for peers, run ``--rounds`` rounds, then serve until the neighbourhood
        has the final model, ``--linger`` seconds at most."""
        await self.membership.wait_for_peers()
        while self.config.rounds is None or self.round < self.config.rounds:
            started = time.monotonic()
            await self.one_round()
            await self._paced(started)
        # Finished: stay a member, merging and pushing but not training, until our
        # neighbours have our final model and we are close to theirs, so that late
        # starters are not left alone (and still learn from us); --linger at most.
        self.serving = True
        if self.alone():
            logger.info("finished %d rounds; no peers to serve, stopping", self.round)
            return
        final_seq = self.core.node.seq + 1  # the first message signed after training
        self.core.node.measure_distance = True
        self._settled_at = max(SETTLED_DISTANCE, 2 * await self.core.call(
            self.core.node.codec_error))
        logger.info("finished %d rounds; serving until the neighbourhood has the final "
                    "model, at most %g s", self.round, self.config.linger)
        started = time.monotonic()
        with trio.move_on_after(self.config.linger):
            while not self._neighbourhood_has_it(final_seq):
                started_round = time.monotonic()
                await self.one_round()
                await self._paced(started_round)
            logger.info("the neighbourhood has the final model after %.1f s: done",
                        time.monotonic() - started)
            return
        logger.info("stopping at --linger (%g s): %s", self.config.linger,
                    self._what_is_missing(final_seq))

    def _what_is_missing(self, final_seq: int) -> str:
        """Why serving did not end by itself: for the operator's log."""
        lacking = [peer for peer in self.membership.neighbours
                   if not self.policy.have_seq([peer], final_seq)]
        far = {key.hex()[:8]: round(distance, 5)
               for key, distance in self.core.node.vote_distances.items()
               if distance > self._settled_at}
        return (f"neighbours without our final model: {lacking or 'none'}; in-neighbours "
                f"farther than {self._settled_at:.4g} of our norm: {far or 'none'}")

    def _neighbourhood_has_it(self, final_seq: int) -> bool:
        """Every neighbour accepted a model of ours from after training, and every
        in-neighbour still sending has its latest model a merge saw within
        SETTLED_DISTANCE of ours (or twice our codec's own error)."""
        # A neighbour that finished before us and left keeps its last vote in the table;
        # we go on mixing with the others and drift from it (0.3 to 0.4% in the lab), so
        # it would hold us to --linger: only those still sending count.
        left = frozenset(public_key_from_peer_id(peer)
                         for peer in self.pace.gone_quiet(time.monotonic()))
        return (self.policy.have_seq(self.membership.neighbours, final_seq)
                and self.core.node.close_to_neighbours(self._settled_at, left))

    def alone(self) -> bool:
        """A lone node (--min-neighbours 0, no bootstrap, nobody dialled in) serves no one."""
        config = self.config
        return (config.min_neighbours == 0 and not config.bootstrap
                and not self.policy.book.known())

    async def attack_loop(self) -> None:
        """An --attack member pushes its attack to every peer it knows, as fast as allowed."""
        assert self.attacker is not None
        while True:
            peers = self.policy.free(self.policy.book.known())
            if peers:
                outgoing = await self.core.call(self.attacker.prepare, time.time())
                self.pusher.push(self.policy.start_pushes(outgoing, peers))
            await trio.sleep(ATTACK_PUSH_INTERVAL_S)
