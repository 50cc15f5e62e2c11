"""The vectorized simulator: n nodes training on their own shards and gossiping by push-sum.

Each round, every online node runs ``local_epochs`` of SGD on its shard
(:mod:`topologies.batched`), then one push-sum step on the graph under the
simulated network (:mod:`topologies.network`, :mod:`topologies.stacked_pushsum`),
then the round's metrics are taken. All node models are rows of one [n, P]
tensor; nothing loops over nodes in Python.

Metrics per round (:class:`RoundMetrics`):

* test accuracy of every node's model (mean, min, max over nodes);
* consensus distance: mean over nodes of ``||z_i - mean_j z_j||^2``, the plain
  (unweighted) mean, because it measures disagreement, not the target;
* bytes sent per node: messages that left their sender (delivered or lost;
  refused connections carry nothing) times the exact encoded size of one update
  from :func:`topologies.network.message_bytes`, divided by n.

Hostile peers and fewer bytes plug in around that loop, each off by default
and each a small piece with the gossip core's own rules:

* ``aggregator``: gossip's robust rules, batched (:mod:`topologies.robust`);
* ``byzantine``/``attack``: nodes that send attack vectors (:mod:`topologies.attacks`).
  They are left out of the honest metrics (``honest_accuracy_*``, and the
  consensus distance, taken over honest nodes only when there are attackers);
  a non-finite message is dropped as gossip's admission would reject it;
* ``dp_clip``/``dp_noise``: with ``dp_mode`` "node", gossip's Gaussian mechanism
  on every honest node's round delta; with "sample", the daemon's DP-SGD run
  node by node (:mod:`topologies.privacy`), and every node weighs 1;
* ``compression``: gossip's codecs, batched, with error feedback or CHOCO
  public copies (:mod:`topologies.compression`).

Under torchrun, each rank holds a block of the nodes (:mod:`topologies.ranks`)
and the same run gives the same metrics on every rank and any number of
ranks: every random draw is made for the whole population (network plans,
training orders, attack noise) or per node (DP noise, DP-SGD), never per rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from fltasks import Task
from fltasks.malloc import return_large_buffers
from fltasks.momentum import QuasiGlobalMomentum
from fltasks.scaling import node_view
from topologies.attacks import Adversary, choose_byzantine
from topologies.batched import BatchedTrainer, PaddedShards, make_trainer
from topologies.compression import BatchedCodec, Compressor, resolve_codec
from topologies.feature_stats import agreed_statistics
from topologies.network import DELIVERED, LOST, NetworkModel, RoundPlan, message_bytes
from topologies.privacy import DELTA, BatchedGaussianMechanism, DpSgdNodes
from topologies.ranks import Halo, Ranks
from topologies.robust import batched_rule
from topologies.sim_config import SimulationConfig
from topologies.stacked_pushsum import StackedPushSum, consensus_distance

__all__ = ["RoundMetrics", "Simulation", "SimulationConfig", "centralized_baseline"]

# Below this many stacked values per op, a second thread costs more in start-up and
# spin-waiting than it saves: measured 18x slower (14.7 s against 0.8 s) for the
# centralized digits baseline with 2 threads on the 2-core machine under load.
SINGLE_THREAD_BELOW = 1 << 20
# Rows centred at once for the consensus distance (see stacked_pushsum.consensus_distance).
CONSENSUS_CHUNK_NODES = 256
FEATURE_STATS = ("gossip", "gossip-robust", "local")


def _mix_columns(config: SimulationConfig, n: int, size: int) -> int | None:
    """Columns per mixing block under ``node_chunk``: n x columns is a chunk's worth."""
    return None if config.node_chunk is None else max(1, -(-config.node_chunk * size // n))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads inside the block (at most the current number)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    accuracy_mean: float | None
    accuracy_min: float | None
    accuracy_max: float | None
    consensus_distance: float
    bytes_per_node: float
    online: int
    honest_accuracy_mean: float | None = None  # over honest nodes (all nodes without attackers)
    honest_accuracy_min: float | None = None


class Simulation:
    """One run on one graph. Build with :meth:`for_task`, or directly for consensus only.

    Over several ranks (``ranks``, :mod:`topologies.ranks`) this process holds
    the block of nodes its rank owns; the metrics it returns are the whole
    population's, the same on every rank.
    """

    def __init__(
        self,
        graph: nx.Graph,
        estimates: torch.Tensor,
        weights: np.ndarray,
        config: SimulationConfig,
        *,
        task: Task | None = None,
        trainer: BatchedTrainer | None = None,
        shards: PaddedShards | None = None,
        parameter_shapes: dict[str, tuple[int, ...]] | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        """``estimates``: every node's [n, P] or this rank's block of rows; ``weights``:
        every node's; ``shards``: this rank's block (:meth:`for_task` makes them)."""
        if (config.train or config.evaluate) and (task is None or trainer is None):
            raise ValueError("training or evaluation needs a task and its trainer")
        if config.train and shards is None:
            raise ValueError("training needs the nodes' shards")
        self.graph = graph
        self.config = config
        self.ranks = ranks if ranks is not None else Ranks()
        n = graph.number_of_nodes()
        if n < self.ranks.world:
            raise ValueError(f"{n} nodes cannot be shared by {self.ranks.world} ranks")
        if config.node_chunk is not None:
            return_large_buffers()  # else glibc's heap fragments, and grows with n
        self.task, self.trainer, self.shards = task, trainer, shards
        self.network = NetworkModel(graph, config.network, seed=config.seed)
        self.halo = Halo(self.ranks, n, self.network.src, self.network.dst)
        lo, hi = self.halo.lo, self.halo.hi
        self.rows = slice(lo, hi)
        if estimates.shape[0] == n:
            estimates = estimates[lo:hi]
        self.state = StackedPushSum(
            estimates.to(config.dtype),
            weights,
            self.network,
            mix_columns=_mix_columns(config, self.halo.size, estimates.shape[1]),
            halo=self.halo,
        )
        self.round = 0
        self._generator = torch.Generator().manual_seed(config.seed)
        shapes = parameter_shapes or {"parameters": (estimates.shape[1],)}
        codec = resolve_codec(config.compression)
        self.message_bytes = message_bytes(shapes, codec.id)
        # The same on every rank: the consensus distance's blocks follow node ids.
        self._rows_at_once = min(CONSENSUS_CHUNK_NODES, n, config.node_chunk or n)
        self._scratch = torch.empty(self._rows_at_once, estimates.shape[1], dtype=config.dtype)

        self.rule = batched_rule(config.aggregator, config.trim_fraction, config.clip_radius)
        # Whole-population masks (a byte a node, the same on every rank) and this block's.
        self.byzantine = choose_byzantine(n, config.byzantine, config.seed)
        self.honest = ~self.byzantine
        self._honest_rows = torch.from_numpy(np.flatnonzero(self.honest))
        self._honest_here = torch.from_numpy(np.flatnonzero(self.honest[lo:hi]))
        self._ids = np.arange(lo, hi)
        self.adversary = None
        if config.byzantine:
            net = self.network
            neighbours = np.split(net.dst, np.cumsum(net.degree)[:-1])
            self.adversary = Adversary(
                self.byzantine, config.attack, config.attack_scale, neighbours, config.seed
            )
        batched = BatchedCodec(codec, [math.prod(shape) for shape in shapes.values()])
        self.compressor = (
            None
            if batched.lossless
            else Compressor(batched, self.state.estimates, config.choco_step)
        )
        self.privacy: BatchedGaussianMechanism | None = None
        self.dp_sgd: DpSgdNodes | None = None
        if config.dp_clip is not None and config.dp_noise is not None:
            if config.dp_mode == "sample" and config.train:
                assert task is not None and trainer is not None and shards is not None
                own = [shards.index[i, : int(shards.sizes[i])].numpy() for i in range(hi - lo)]
                self.dp_sgd = DpSgdNodes(
                    task, trainer.layout, own, config.dp_clip, config.dp_noise, config.seed,
                    lr=config.dp_lr, first=lo,
                )
            elif config.dp_mode == "node":
                self.privacy = BatchedGaussianMechanism(
                    config.dp_clip, config.dp_noise, n, config.seed
                )
        use_momentum = config.momentum > 0 and config.train and self.dp_sgd is None
        self.momentum = QuasiGlobalMomentum(config.momentum) if use_momentum else None
        self._plain = self.rule is None and self.adversary is None and self.compressor is None

    @classmethod
    def for_task(
        cls,
        task: Task,
        graph: nx.Graph,
        shards: list[np.ndarray],
        config: SimulationConfig,
        *,
        generic: bool = False,
        ranks: Ranks | None = None,
    ) -> Simulation:
        """Every node starts from the task's one initial model, weighted by its shard size.

        Each node's features are scaled as its daemon scales them
        (:func:`fltasks.scaling.node_view`): with the statistics the nodes agree
        on by gossip, from its own shard (``feature_stats="local"``), or from
        public ranges under ``--dp sample``. ``shards``: every node's (index
        arrays, the same on every rank); a rank keeps its block's. Every rank
        runs the whole (deterministic) agreement itself: it is small.
        """
        n = graph.number_of_nodes()
        if len(shards) != n:
            raise ValueError(f"{len(shards)} shards for {n} nodes")
        ranks = ranks if ranks is not None else Ranks()
        lo, hi = ranks.block(n)
        record_private = config.dp_mode == "sample" and config.dp_clip is not None
        agreed = None
        if config.dp_clip is None and config.feature_stats != "local":  # DP: not released
            agreed = agreed_statistics(task, graph, shards, config.feature_stats)
        task = node_view(task, shards, record_private=record_private, agreed=agreed)
        model = task.make_model()
        trainer = make_trainer(task, model, generic=generic)
        initial = trainer.layout.flatten(model)
        # A broadcast view: the push-sum state makes the one [rows, P] copy.
        estimates = initial.to(config.dtype).unsqueeze(0).expand(hi - lo, -1)
        weights = np.array([len(s) for s in shards], dtype=np.float64)
        if config.dp_mode == "sample" and config.dp_clip is not None:
            weights = np.ones(n)  # as a --dp sample daemon sends: counts stay private
        shapes = dict(zip(trainer.layout.names, trainer.layout.shapes, strict=True))
        return cls(
            graph,
            estimates,
            weights,
            config,
            task=task,
            trainer=trainer,
            shards=PaddedShards(shards, rows=range(lo, hi)),
            parameter_shapes=shapes,
            ranks=ranks,
        )

    @property
    def estimates(self) -> torch.Tensor:
        """This rank's block of estimates (every node's on one rank)."""
        return self.state.estimates

    @property
    def weights(self) -> np.ndarray:
        return self.state.weights

    def epsilon(self, delta: float = DELTA) -> float | None:
        """The privacy spent so far by the most-trained honest node, or None without DP."""
        if self.dp_sgd is not None:
            return self.ranks.max(self.dp_sgd.epsilon(delta))
        return None if self.privacy is None else self.ranks.max(self.privacy.epsilon(delta))

    def step(self) -> RoundMetrics:
        """Train, gossip, measure: one round."""
        plan = self.network.plan(self.round)
        if self.config.train and self.round < self.config.rounds:  # then lingering
            self._train(plan.online)
        if self._plain:
            self.state.gossip(plan)
        else:
            sent = self._what_is_sent(plan)
            plan = self._admit(plan, sent)
            if self.rule is not None:
                self.state.gossip_robust(plan, sent, self.rule)
            else:
                public = self.compressor is not None and self.compressor.uses_public_copies
                self.state.gossip_sent(
                    plan,
                    sent,
                    compensation=self.config.choco_compensation if public else 0.0,
                    step=self.config.choco_step if public else 1.0,
                )
        self.round += 1
        messages = int(np.count_nonzero((plan.fate == DELIVERED) | (plan.fate == LOST)))
        acc = self.accuracy() if self.config.evaluate else None
        honest_acc = acc if acc is None or self.adversary is None else acc[self._honest_rows]
        estimates, ids = self.state.estimates, self._ids
        if self.adversary is not None:
            estimates = estimates.index_select(0, self._honest_here)
            ids = ids[self._honest_here.numpy()]
        distance = consensus_distance(
            estimates, self._scratch, self._rows_at_once, self.ranks, ids
        )
        return RoundMetrics(
            round=self.round,
            accuracy_mean=None if acc is None else float(acc.mean()),
            accuracy_min=None if acc is None else float(acc.min()),
            accuracy_max=None if acc is None else float(acc.max()),
            consensus_distance=distance,
            bytes_per_node=messages * self.message_bytes / self.network.n,
            online=int(plan.online.sum()),
            honest_accuracy_mean=None if honest_acc is None else float(honest_acc.mean()),
            honest_accuracy_min=None if honest_acc is None else float(honest_acc.min()),
        )

    def _what_is_sent(self, plan: RoundPlan) -> torch.Tensor:
        """Each node's message as its receivers decode it: attack, then compression."""
        targets = self.state.estimates
        if self.adversary is not None:
            targets = self.adversary.apply(targets, first=self.halo.lo)
        if self.compressor is None:
            return targets
        return self.compressor.encode(
            targets,
            torch.from_numpy(plan.online[self.rows]),
            torch.from_numpy(self.honest[self.rows]),
        )

    def _admit(self, plan: RoundPlan, sent: torch.Tensor) -> RoundPlan:
        """Receivers reject non-finite messages (gossip's admission): they count as lost."""
        finite_here = torch.isfinite(sent).all(dim=1).to(torch.uint8)
        finite = self.ranks.gather_rows(finite_here, self.network.n).numpy().astype(bool)
        if finite.all():
            return plan
        fate = plan.fate.copy()
        fate[(fate == DELIVERED) & ~finite[self.network.src]] = LOST
        return RoundPlan(plan.round, plan.online, fate, plan.fanout)

    def run(self, on_round: Callable[[RoundMetrics], None] | None = None) -> list[RoundMetrics]:
        history = []
        small = self.state.estimates.numel() < SINGLE_THREAD_BELOW
        with torch_threads(1) if small else contextlib.nullcontext():
            for _ in range(self.config.rounds + self.config.linger_rounds):
                metrics = self.step()
                history.append(metrics)
                if on_round is not None:
                    on_round(metrics)
        return history

    def accuracy(self) -> torch.Tensor:
        """Test accuracy of every node's current estimate: a float tensor [n], all ranks'."""
        assert self.task is not None and self.trainer is not None
        flat = self.state.estimates
        if flat.dtype != torch.float32:
            flat = flat.float()
        local = self.trainer.accuracy(
            flat, self.task.x_test, self.task.y_test, self.config.node_chunk
        )
        return self.ranks.gather_rows(local, self.network.n)

    def _train(self, online: np.ndarray) -> None:
        """Local SGD for this block's online nodes; ``online``: every node's (bool [n])."""
        assert self.trainer is not None and self.shards is not None
        estimates = self.state.estimates
        flat = estimates if estimates.dtype == torch.float32 else estimates.float()
        before = None if self.privacy is None else flat.clone()
        active = torch.from_numpy(online[self.rows])
        training = online
        if self.dp_sgd is not None:
            honest = torch.from_numpy(self.honest[self.rows])
            rows = torch.from_numpy(np.flatnonzero((active & honest).numpy()))
            self.dp_sgd.train(flat, rows, self.config.local_epochs)
            active = active & ~honest  # Byzantine rows still train the plain way
            training = online & self.byzantine
        direction = None
        if self.momentum is not None:
            assert self.task is not None
            steps = self.trainer.steps_per_round(self.shards, self.config.local_epochs)
            direction = self.momentum.begin_round(flat, steps, self.task.lr)
        self.trainer.train(
            flat, self.shards, self.config.local_epochs, self._generator, active,
            self.config.node_chunk, anywhere=bool(training.any()), direction=direction,
        )
        if self.privacy is not None:
            rows = np.flatnonzero(active.numpy() & self.honest[self.rows])
            self.privacy.privatize(before, flat, torch.from_numpy(rows), first=self.halo.lo)
        if flat is not estimates:
            estimates.copy_(flat)  # push-sum's replace_estimate: the weight does not move


@dataclass(frozen=True)
class CentralizedResult:
    final_accuracy: float
    seconds: float


def centralized_baseline(task: Task, epochs: int, seed: int) -> CentralizedResult:
    """One model trained on the union of all train data with the task's own train step."""
    start = time.perf_counter()
    model = task.make_model()
    small = sum(p.numel() for p in model.parameters()) * task.batch_size < SINGLE_THREAD_BELOW
    with torch_threads(1) if small else contextlib.nullcontext():
        if epochs > 0:
            task.train(
                model, task.x_train, task.y_train, epochs, torch.Generator().manual_seed(seed)
            )
        accuracy = task.evaluate(model)
    return CentralizedResult(accuracy, time.perf_counter() - start)
