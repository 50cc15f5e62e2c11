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
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch

from fltasks import Task
from fltasks.dp_defaults import DP_SGD_LR
from fltasks.malloc import return_large_buffers
from fltasks.scaling import node_view
from topologies.attacks import ATTACKS, Adversary, choose_byzantine
from topologies.batched import BatchedTrainer, PaddedShards, make_trainer
from topologies.compression import (
    DEFAULT_CHOCO_STEP,
    DEFAULT_COMPENSATION,
    BatchedCodec,
    Compressor,
    resolve_codec,
)
from topologies.network import (
    DELIVERED,
    LOST,
    NetworkConditions,
    NetworkModel,
    RoundPlan,
    message_bytes,
)
from topologies.privacy import DELTA, BatchedGaussianMechanism, DpSgdNodes
from topologies.robust import BatchedRule, batched_rule
from topologies.settings_error import SettingError
from topologies.stacked_pushsum import StackedPushSum, consensus_distance

# Below this many stacked values per op, a second thread costs more in start-up and
# spin-waiting than it saves: measured 18x slower (14.7 s against 0.8 s) for the
# centralized digits baseline with 2 threads on the 2-core machine under load.
SINGLE_THREAD_BELOW = 1 << 20
# Rows centred at once for the consensus distance (see stacked_pushsum.consensus_distance).
CONSENSUS_CHUNK_NODES = 256


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
class SimulationConfig:
    rounds: int = 50
    # Rounds after the last training round that only gossip, as a daemon lingers
    # (--linger): a node's last noisy step is then averaged before it is measured.
    linger_rounds: int = 0
    # 10 epochs of each node's few dozen records per round: with 1, even FedAvg ends 5
    # points below centralized training on digits in 50 rounds (docs/SIMULATOR.md).
    local_epochs: int = 10
    train: bool = True
    evaluate: bool = True
    network: NetworkConditions = field(default_factory=NetworkConditions)
    seed: int = 0
    dtype: torch.dtype = torch.float32  # of the stacked estimates and the mixing product
    aggregator: str = "mean"  # or a robust rule of gossip.aggregation
    # beta of trimmed-mean and clipped; None: each rule's own default (gossip.robust)
    trim_fraction: float | None = None
    clip_radius: float | None = None  # fixed tau of clipped; None: adaptive
    byzantine: int = 0
    attack: str = "sign-flip"
    attack_scale: float | None = None  # None: the attack's default (topologies.attacks)
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_mode: str = "node"  # or "sample": per-record DP-SGD (the daemon's --dp)
    dp_lr: float = DP_SGD_LR  # DP-SGD's learning rate under "sample" (the daemon's --dp-lr)
    compression: str = "raw"  # raw, fp16, int8, topk:FRACTION (the daemon's codec ids)
    choco_step: float = DEFAULT_CHOCO_STEP  # gamma of top-k's public-copy mixing
    choco_compensation: float = DEFAULT_COMPENSATION  # residual mass a top-k sender keeps
    # Bounds working memory for large models: train, evaluate and measure this many
    # nodes at a time, and mix the plain push-sum in column blocks of the same size.
    node_chunk: int | None = None

    def __post_init__(self) -> None:
        """Every problem is a :class:`SettingError` naming the fields to change."""
        if self.rounds < 0:
            raise SettingError("rounds", f"must be >= 0, got {self.rounds}")
        if self.linger_rounds < 0:
            raise SettingError("linger_rounds", f"must be >= 0, got {self.linger_rounds}")
        if self.local_epochs < 1:
            raise SettingError("local_epochs", f"must be >= 1, got {self.local_epochs}")
        if self.dtype not in (torch.float32, torch.float64):
            raise SettingError("dtype", "must be torch.float32 or torch.float64")
        rule = self._robust_rule()
        if rule is None and (self.trim_fraction is not None or self.clip_radius is not None):
            raise SettingError(
                ("trim_fraction", "clip_radius"),
                "need a robust aggregator (trimmed-mean or clipped)",
            )
        if rule is not None and self.network.delay:
            raise SettingError(
                ("aggregator", "delay"),
                f"{self.aggregator!r} needs delay 0 in the simulator "
                "(delayed messages are only modelled for push-sum's mean)",
            )
        if self.node_chunk is not None and self.node_chunk < 1:
            raise SettingError("node_chunk", f"must be >= 1, got {self.node_chunk}")
        if self.byzantine < 0:
            raise SettingError("byzantine", f"must be >= 0, got {self.byzantine}")
        if self.attack not in ATTACKS:
            raise SettingError(
                "attack", f"unknown {self.attack!r}; choose one of: {', '.join(ATTACKS)}"
            )
        if self.attack_scale is not None and not math.isfinite(self.attack_scale):
            raise SettingError("attack_scale", f"must be a finite number, got {self.attack_scale}")
        if (self.dp_clip is None) != (self.dp_noise is None):
            raise SettingError(("dp_clip", "dp_noise"), "give both to turn DP on, or neither")
        if self.dp_clip is not None:
            try:
                BatchedGaussianMechanism(self.dp_clip, self.dp_noise, 1, 0)  # validates C, sigma
            except ValueError as error:
                raise SettingError(("dp_clip", "dp_noise"), str(error)) from None
        if self.dp_mode not in ("node", "sample"):
            raise SettingError("dp_mode", f"must be node or sample, got {self.dp_mode!r}")
        if not (math.isfinite(self.dp_lr) and self.dp_lr > 0):
            raise SettingError("dp_lr", f"must be a finite number > 0, got {self.dp_lr}")
        try:
            codec = resolve_codec(self.compression)
        except ValueError as error:
            raise SettingError("compression", str(error)) from None
        sparse = BatchedCodec(codec, []).sparse
        if sparse and not self.network.ideal:
            raise SettingError(
                ("compression", "loss", "delay", "churn"),
                f"{self.compression} keeps public copies that every neighbour must update: "
                "it needs loss, delay and churn 0",
            )
        if not (math.isfinite(self.choco_step) and 0 < self.choco_step <= 1):
            raise SettingError("choco_step", f"must be in (0, 1], got {self.choco_step}")
        if not 0 <= self.choco_compensation <= 1:
            raise SettingError(
                "choco_compensation", f"must be in [0, 1], got {self.choco_compensation}"
            )
        if not sparse and (
            self.choco_step != DEFAULT_CHOCO_STEP or self.choco_compensation != DEFAULT_COMPENSATION
        ):
            raise SettingError(
                ("choco_step", "choco_compensation"), "apply to topk compression only"
            )

    def _robust_rule(self) -> BatchedRule | None:
        """gossip's rule for these settings; each bad parameter named on its own."""
        given = {"trim_fraction": self.trim_fraction, "clip_radius": self.clip_radius}
        checked: dict[str, float | None] = {"trim_fraction": None, "clip_radius": None}
        try:
            rule = batched_rule(self.aggregator)
        except ValueError as error:
            raise SettingError("aggregator", str(error)) from None
        for name, value in given.items():
            checked[name] = value
            try:
                rule = batched_rule(
                    self.aggregator, checked["trim_fraction"], checked["clip_radius"]
                )
            except ValueError as error:
                raise SettingError(name, str(error)) from None
        return rule


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
    """One run on one graph. Build with :meth:`for_task`, or directly for consensus only."""

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
    ) -> None:
        if (config.train or config.evaluate) and (task is None or trainer is None):
            raise ValueError("training or evaluation needs a task and its trainer")
        if config.train and shards is None:
            raise ValueError("training needs the nodes' shards")
        self.graph = graph
        self.config = config
        if config.node_chunk is not None:
            return_large_buffers()  # else glibc's heap fragments, and grows with n
        self.task, self.trainer, self.shards = task, trainer, shards
        self.network = NetworkModel(graph, config.network, seed=config.seed)
        self.state = StackedPushSum(
            estimates.to(config.dtype),
            weights,
            self.network,
            mix_columns=_mix_columns(config, graph.number_of_nodes(), estimates.shape[1]),
        )
        self.round = 0
        self._generator = torch.Generator().manual_seed(config.seed)
        shapes = parameter_shapes or {"parameters": (estimates.shape[1],)}
        n = graph.number_of_nodes()
        codec = resolve_codec(config.compression)
        self.message_bytes = message_bytes(shapes, codec.id)
        self._rows_at_once = min(CONSENSUS_CHUNK_NODES, n, config.node_chunk or n)
        self._scratch = torch.empty(self._rows_at_once, estimates.shape[1], dtype=config.dtype)

        self.rule = batched_rule(config.aggregator, config.trim_fraction, config.clip_radius)
        self.byzantine = choose_byzantine(n, config.byzantine, config.seed)
        self.honest = ~self.byzantine
        self._honest_rows = torch.from_numpy(np.flatnonzero(self.honest))
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
                own = [shards.index[i, : int(shards.sizes[i])].numpy() for i in range(n)]
                self.dp_sgd = DpSgdNodes(
                    task, trainer.layout, own, config.dp_clip, config.dp_noise, config.seed,
                    lr=config.dp_lr,
                )
            elif config.dp_mode == "node":
                self.privacy = BatchedGaussianMechanism(
                    config.dp_clip, config.dp_noise, n, config.seed
                )
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
    ) -> Simulation:
        """Every node starts from the task's one initial model, weighted by its shard size.

        Each node's features are scaled as its daemon scales them
        (:func:`fltasks.scaling.node_view`): from its own shard, or from public
        ranges under ``--dp sample``.
        """
        n = graph.number_of_nodes()
        if len(shards) != n:
            raise ValueError(f"{len(shards)} shards for {n} nodes")
        record_private = config.dp_mode == "sample" and config.dp_clip is not None
        task = node_view(task, shards, record_private=record_private)
        model = task.make_model()
        trainer = make_trainer(task, model, generic=generic)
        initial = trainer.layout.flatten(model)
        # A broadcast view: the push-sum state makes the one [n, P] copy.
        estimates = initial.to(config.dtype).unsqueeze(0).expand(n, -1)
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
            shards=PaddedShards(shards),
            parameter_shapes=shapes,
        )

    @property
    def estimates(self) -> torch.Tensor:
        return self.state.estimates

    @property
    def weights(self) -> np.ndarray:
        return self.state.weights

    def epsilon(self, delta: float = DELTA) -> float | None:
        """The privacy spent so far by the most-trained honest node, or None without DP."""
        if self.dp_sgd is not None:
            return self.dp_sgd.epsilon(delta)
        return None if self.privacy is None else self.privacy.epsilon(delta)

    def step(self) -> RoundMetrics:
        """Train, gossip, measure: one round."""
        plan = self.network.plan(self.round)
        if self.config.train and self.round < self.config.rounds:  # then lingering
            self._train(torch.from_numpy(plan.online))
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
        estimates = self.state.estimates
        if self.adversary is not None:
            estimates = estimates.index_select(0, self._honest_rows)
        return RoundMetrics(
            round=self.round,
            accuracy_mean=None if acc is None else float(acc.mean()),
            accuracy_min=None if acc is None else float(acc.min()),
            accuracy_max=None if acc is None else float(acc.max()),
            consensus_distance=consensus_distance(estimates, self._scratch, self._rows_at_once),
            bytes_per_node=messages * self.message_bytes / self.network.n,
            online=int(plan.online.sum()),
            honest_accuracy_mean=None if honest_acc is None else float(honest_acc.mean()),
            honest_accuracy_min=None if honest_acc is None else float(honest_acc.min()),
        )

    def _what_is_sent(self, plan: RoundPlan) -> torch.Tensor:
        """Each node's message as its receivers decode it: attack, then compression."""
        targets = self.state.estimates
        if self.adversary is not None:
            targets = self.adversary.apply(targets)
        if self.compressor is None:
            return targets
        return self.compressor.encode(
            targets, torch.from_numpy(plan.online), torch.from_numpy(self.honest)
        )

    def _admit(self, plan: RoundPlan, sent: torch.Tensor) -> RoundPlan:
        """Receivers reject non-finite messages (gossip's admission): they count as lost."""
        finite = torch.isfinite(sent).all(dim=1).numpy()
        if finite.all():
            return plan
        fate = plan.fate.copy()
        fate[(fate == DELIVERED) & ~finite[self.network.src]] = LOST
        return RoundPlan(plan.round, plan.online, fate)

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
        """Test accuracy of every node's current estimate: a float tensor [n]."""
        assert self.task is not None and self.trainer is not None
        flat = self.state.estimates
        if flat.dtype != torch.float32:
            flat = flat.float()
        return self.trainer.accuracy(
            flat, self.task.x_test, self.task.y_test, self.config.node_chunk
        )

    def _train(self, active: torch.Tensor) -> None:
        assert self.trainer is not None and self.shards is not None
        estimates = self.state.estimates
        flat = estimates if estimates.dtype == torch.float32 else estimates.float()
        before = None if self.privacy is None else flat.clone()
        if self.dp_sgd is not None:
            honest = torch.from_numpy(self.honest)
            rows = torch.from_numpy(np.flatnonzero((active & honest).numpy()))
            self.dp_sgd.train(flat, rows, self.config.local_epochs)
            active = active & ~honest  # Byzantine rows still train the plain way
        self.trainer.train(
            flat, self.shards, self.config.local_epochs, self._generator, active,
            self.config.node_chunk,
        )
        if self.privacy is not None:
            rows = torch.from_numpy(np.flatnonzero(active.numpy() & self.honest))
            self.privacy.privatize(before, flat, rows)
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
