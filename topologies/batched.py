"""Train and evaluate every node's model at once, from one stacked [n, P] parameter tensor.

The semantics are :meth:`fltasks.Task.train`'s, per node: each epoch is one
pass over the node's own shard in a fresh random order, in minibatches of the
task's batch size (the last one partial), plain SGD on the mean cross-entropy
of the batch, no optimizer state. Nodes with different shard sizes run the
same number of batched steps (that of the largest shard); a node whose shard
is used up is masked out of the remaining steps (zero loss, zero gradient), so
each node does exactly ``ceil(n_i / batch)`` SGD steps per epoch on its own
data, as the daemon would. Sampling with replacement would be cheaper for
skewed shards but would change what an "epoch" means between the simulator
and the real node.

Two implementations behind one interface:

* :class:`MLPTrainer`, for ``nn.Sequential`` of ``Linear`` and ``ReLU`` (the
  built-in tasks): batched matmuls (``torch.baddbmm``) on the stacked
  weights, gradients by autograd through the sum of the nodes' losses (nodes
  are independent, so each node's gradient is that of its own loss).
* :class:`FunctionalTrainer`, for any other module: ``torch.func.vmap`` of
  ``grad`` of ``functional_call`` over the stacked parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fltasks import Task

# Nodes evaluated per batched forward pass: big enough that each op's thread start-up
# is amortized, small enough that the [chunk, test, hidden] activations (30 MB for
# digits) do not grow with n.
EVAL_CHUNK_NODES = 256


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of a model's trainable parameters in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        names, shapes, offsets, offset = [], [], [], 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(offset)
            offset += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), offset)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        return torch.cat([params[name].detach().reshape(-1).float() for name in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views [n, *shape] into the stacked flat tensor [n, P] (no copy)."""
        n = flat.shape[0]
        return {
            name: flat[:, off : off + math.prod(shape)].view(n, *shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True)
        }


class PaddedShards:
    """Each node's sample indices as rows of one [rows, L] tensor, padded, with their sizes.

    ``rows``: the block of nodes kept (a rank's; default all). The width ``L``
    and the epochs' random orders are the whole population's, so a node's
    order is the same whatever block it is in.
    """

    def __init__(self, shards: list[np.ndarray], rows: range | None = None) -> None:
        rows = range(len(shards)) if rows is None else rows
        every = torch.tensor([len(s) for s in shards], dtype=torch.int64)
        if (every == 0).any():
            raise ValueError("every node needs at least one training sample")
        self.total, self.first = len(shards), rows.start
        self.sizes = every[rows.start : rows.stop]
        width = int(every.max())
        index = np.zeros((len(rows), width), dtype=np.int64)
        for i, node in enumerate(rows):
            index[i, : len(shards[node])] = shards[node]
        self.index = torch.from_numpy(index)
        self.valid = torch.arange(width).unsqueeze(0) < self.sizes.unsqueeze(1)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """A fresh random order of each node's own samples, padding last.

        The keys are drawn for every node of the population, then this block's
        rows kept: the generator moves as on one rank.
        """
        keys = torch.rand((self.total, self.index.shape[1]), generator=generator)
        keys = keys[self.first : self.first + len(self.index)]
        keys.masked_fill_(~self.valid, 2.0)
        return torch.gather(self.index, 1, keys.argsort(dim=1))


class BatchedTrainer:
    """Shared driver: epochs, shuffles, masks; subclasses give the batched SGD step."""

    def __init__(self, task: Task, layout: ParameterLayout) -> None:
        self.task = task
        self.layout = layout

    def train(
        self,
        flat: torch.Tensor,
        shards: PaddedShards,
        epochs: int,
        generator: torch.Generator,
        active: torch.Tensor | None = None,
        node_chunk: int | None = None,
        anywhere: bool | None = None,
        direction: torch.Tensor | None = None,
    ) -> None:
        """Run ``epochs`` of local SGD for every active node, updating ``flat`` [n, P] in place.

        ``direction`` [n, P] is added to every step's gradient of each node
        (quasi-global momentum's ``beta * m``, fltasks/momentum.py), only on
        the steps where that node still has samples.

        ``node_chunk`` trains that many nodes at a time, one chunk after the
        other, so the working copies, gradients and activations are those of a
        chunk, not of all n nodes. The epochs' sample orders are drawn for every
        node first, in the same order as without chunks, and nodes never
        interact while training, so each node follows the same steps either way.
        ``anywhere``: whether any node of the population trains (default: any of
        these rows); over ranks, every rank draws the orders when one trains.
        """
        sizes = shards.sizes if active is None else torch.where(active, shards.sizes, 0)
        busy = len(sizes) > 0 and int(sizes.max()) > 0
        if not (busy if anywhere is None else anywhere):
            return
        orders = [shards.epoch_order(generator) for _ in range(epochs)]
        n = flat.shape[0]
        chunk = n if node_chunk is None else max(1, node_chunk)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            if int(sizes[rows].max()) > 0:
                self._train_rows(
                    flat[rows], sizes[rows], [order[rows] for order in orders],
                    None if direction is None else direction[rows],
                )

    def steps_per_round(self, shards: PaddedShards, epochs: int) -> torch.Tensor:
        """Each node's SGD steps in one round of ``epochs``: [n, 1]."""
        batch = self.task.batch_size
        return (epochs * ((shards.sizes + batch - 1) // batch)).unsqueeze(1)

    def _train_rows(
        self, flat: torch.Tensor, sizes: torch.Tensor, orders: list[torch.Tensor],
        direction: torch.Tensor | None = None,
    ) -> None:
        """Local SGD for the rows of ``flat`` (a view, updated in place), one order per epoch."""
        x_all, y_all, batch = self.task.x_train, self.task.y_train, self.task.batch_size
        steps = math.ceil(int(sizes.max()) / batch)
        params = {
            k: v.detach().clone().requires_grad_(True) for k, v in self.layout.views(flat).items()
        }
        pull = None if direction is None else self.layout.views(direction.to(flat.dtype))
        for order in orders:
            for step in range(steps):
                start = step * batch
                idx = order[:, start : start + batch]
                mask = (
                    torch.arange(start, start + idx.shape[1]).unsqueeze(0) < sizes.unsqueeze(1)
                ).to(torch.float32)
                self.sgd_step(params, x_all[idx], y_all[idx], mask)
                if pull is not None:
                    moving = mask[:, :1]  # the node still has samples on this step
                    with torch.no_grad():
                        for name, p in params.items():
                            shape = (-1,) + (1,) * (p.dim() - 1)
                            p.sub_(pull[name] * moving.view(shape), alpha=self.task.lr)
        for name, view in self.layout.views(flat).items():
            view.copy_(params[name].detach())

    def accuracy(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, node_chunk: int | None = None
    ) -> torch.Tensor:
        """Accuracy of every node's model on (x, y): a float tensor [n]."""
        out = []
        chunk = min(EVAL_CHUNK_NODES, node_chunk or EVAL_CHUNK_NODES)
        with torch.no_grad():
            for start in range(0, flat.shape[0], chunk):
                params = self.layout.views(flat[start : start + chunk])
                logits = self.predict(params, x)
                out.append((logits.argmax(dim=-1) == y).float().mean(dim=1))
        return torch.cat(out)

    def sgd_step(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def predict(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MLPTrainer(BatchedTrainer):
    """Fast path for ``nn.Sequential`` of ``Linear`` and ``ReLU``: batched matmuls."""

    def __init__(self, task: Task, layout: ParameterLayout, model: nn.Sequential) -> None:
        super().__init__(task, layout)
        self.ops: list[tuple[str, str | None]] = []
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                self.ops.append(("linear", name))
            else:
                self.ops.append(("relu", None))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return (
            isinstance(model, nn.Sequential)
            and len(model) > 0
            and all(isinstance(m, nn.Linear | nn.ReLU) for m in model)
            and all(m.bias is not None for m in model if isinstance(m, nn.Linear))
            and all(p.requires_grad for p in model.parameters())
        )

    def forward(self, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """``h`` is [n, B, in], or [B, in] shared by every node (evaluation)."""
        for op, name in self.ops:
            if op == "relu":
                h = torch.relu(h) if h.requires_grad else h.relu_()
                continue
            weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
            if h.dim() == 2:  # an input shared by every node, broadcast without a copy
                h = h.expand(weight.shape[0], *h.shape)
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return h

    def sgd_step(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> None:
        logits = self.forward(params, x)
        per_sample = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
        ).view_as(mask)
        per_node = (per_sample * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        grads = torch.autograd.grad(per_node.sum(), list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                p.sub_(g, alpha=self.task.lr)

    def predict(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.forward(params, x)


class FunctionalTrainer(BatchedTrainer):
    """Any module: ``vmap(grad(functional_call))`` over the stacked parameters."""

    def __init__(self, task: Task, layout: ParameterLayout, model: nn.Module) -> None:
        super().__init__(task, layout)
        self.model = model
        self.buffers = dict(model.named_buffers())
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers.update(frozen)

        def node_loss(params, x, y, mask):
            logits = functional_call(self.model, (params, self.buffers), (x,))
            per_sample = F.cross_entropy(logits, y, reduction="none")
            return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)

        self._grads = vmap(grad(node_loss), randomness="different")
        self._predict = vmap(
            lambda params, x: functional_call(self.model, (params, self.buffers), (x,)),
            in_dims=(0, None),
            randomness="different",
        )

    def sgd_step(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> None:
        self.model.train()
        with torch.no_grad():
            grads = self._grads({k: v.detach() for k, v in params.items()}, x, y, mask)
            for name, p in params.items():
                p.sub_(grads[name], alpha=self.task.lr)

    def predict(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self._predict(params, x)


def make_trainer(
    task: Task, model: nn.Module | None = None, generic: bool = False
) -> BatchedTrainer:
    """The fastest trainer that handles ``task``'s model (``generic`` forces vmap)."""
    model = model if model is not None else task.make_model()
    layout = ParameterLayout.of(model)
    if not generic and MLPTrainer.supports(model):
        return MLPTrainer(task, layout, model)  # type: ignore[arg-type]
    return FunctionalTrainer(task, layout, model)
