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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch

from fltasks import Task
from topologies.batched import BatchedTrainer, PaddedShards, make_trainer
from topologies.network import (
    DELIVERED,
    LOST,
    NetworkConditions,
    NetworkModel,
    message_bytes,
)
from topologies.stacked_pushsum import StackedPushSum, consensus_distance

# Below this many stacked values per op, a second thread costs more in start-up and
# spin-waiting than it saves: measured 18x slower (14.7 s against 0.8 s) for the
# centralized digits baseline with 2 threads on the 2-core machine under load.
SINGLE_THREAD_BELOW = 1 << 20


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
    local_epochs: int = 1
    train: bool = True
    evaluate: bool = True
    network: NetworkConditions = field(default_factory=NetworkConditions)
    seed: int = 0
    dtype: torch.dtype = torch.float32  # of the stacked estimates and the mixing product

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError("dtype must be torch.float32 or torch.float64")


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    accuracy_mean: float | None
    accuracy_min: float | None
    accuracy_max: float | None
    consensus_distance: float
    bytes_per_node: float
    online: int


class Simulation:
    """One run on one graph. Build with :meth:`for_task`, or directly for consensus only."""

    def __init__(self, graph: nx.Graph, estimates: torch.Tensor, weights: np.ndarray,
                 config: SimulationConfig, *, task: Task | None = None,
                 trainer: BatchedTrainer | None = None, shards: PaddedShards | None = None,
                 parameter_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        if (config.train or config.evaluate) and (task is None or trainer is None):
            raise ValueError("training or evaluation needs a task and its trainer")
        if config.train and shards is None:
            raise ValueError("training needs the nodes' shards")
        self.graph = graph
        self.config = config
        self.task, self.trainer, self.shards = task, trainer, shards
        self.network = NetworkModel(graph, config.network, seed=config.seed)
        self.state = StackedPushSum(estimates.to(config.dtype), weights, self.network)
        self.round = 0
        self._generator = torch.Generator().manual_seed(config.seed)
        shapes = parameter_shapes or {"parameters": (estimates.shape[1],)}
        self.message_bytes = message_bytes(shapes)
        self._scratch = torch.empty(min(256, graph.number_of_nodes()), estimates.shape[1],
                                    dtype=config.dtype)

    @classmethod
    def for_task(cls, task: Task, graph: nx.Graph, shards: list[np.ndarray],
                 config: SimulationConfig, *, generic: bool = False) -> Simulation:
        """Every node starts from the task's one initial model, weighted by its shard size."""
        n = graph.number_of_nodes()
        if len(shards) != n:
            raise ValueError(f"{len(shards)} shards for {n} nodes")
        model = task.make_model()
        trainer = make_trainer(task, model, generic=generic)
        initial = trainer.layout.flatten(model)
        estimates = initial.unsqueeze(0).expand(n, -1).to(config.dtype).contiguous()
        weights = np.array([len(s) for s in shards], dtype=np.float64)
        shapes = dict(zip(trainer.layout.names, trainer.layout.shapes, strict=True))
        return cls(graph, estimates, weights, config, task=task, trainer=trainer,
                   shards=PaddedShards(shards), parameter_shapes=shapes)

    @property
    def estimates(self) -> torch.Tensor:
        return self.state.estimates

    @property
    def weights(self) -> np.ndarray:
        return self.state.weights

    def step(self) -> RoundMetrics:
        """Train, gossip, measure: one round."""
        plan = self.network.plan(self.round)
        if self.config.train:
            self._train(torch.from_numpy(plan.online))
        self.state.gossip(plan)
        self.round += 1
        sent = int(np.count_nonzero((plan.fate == DELIVERED) | (plan.fate == LOST)))
        acc = self.accuracy() if self.config.evaluate else None
        return RoundMetrics(
            round=self.round,
            accuracy_mean=None if acc is None else float(acc.mean()),
            accuracy_min=None if acc is None else float(acc.min()),
            accuracy_max=None if acc is None else float(acc.max()),
            consensus_distance=consensus_distance(self.state.estimates, self._scratch),
            bytes_per_node=sent * self.message_bytes / self.network.n,
            online=int(plan.online.sum()),
        )

    def run(self, on_round: Callable[[RoundMetrics], None] | None = None) -> list[RoundMetrics]:
        history = []
        small = self.state.estimates.numel() < SINGLE_THREAD_BELOW
        with torch_threads(1) if small else contextlib.nullcontext():
            for _ in range(self.config.rounds):
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
        return self.trainer.accuracy(flat, self.task.x_test, self.task.y_test)

    def _train(self, active: torch.Tensor) -> None:
        assert self.trainer is not None and self.shards is not None
        estimates = self.state.estimates
        flat = estimates if estimates.dtype == torch.float32 else estimates.float()
        self.trainer.train(flat, self.shards, self.config.local_epochs, self._generator, active)
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
            task.train(model, task.x_train, task.y_train, epochs,
                       torch.Generator().manual_seed(seed))
        accuracy = task.evaluate(model)
    return CentralizedResult(accuracy, time.perf_counter() - start)
