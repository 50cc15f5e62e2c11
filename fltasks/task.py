"""A learning task: the model factory, the data, the train step and the evaluation.

One `Task` is shared by the simulator and the node daemon, so that a model trained
in simulation and one trained across real nodes go through exactly the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fltasks.inputs import InputSpec
    from fltasks.scaling import RawFeatures


class TaskError(ValueError):
    """A task is malformed or cannot be loaded; the message is one line naming the fix."""


@dataclass(frozen=True, eq=False)
class Task:
    """Model factory, standardized data and hyperparameters of one learning problem.

    `make_model` must return identical initial weights on every call: nodes average
    their models, and averaging models that start from different points of a
    non-convex loss gives a model worse than either.
    """

    name: str
    make_model: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    lr: float
    batch_size: int
    # Where train and evaluate run; the model is handed back on the CPU either way,
    # so callers (the daemon reads weights as numpy) never see a device tensor.
    device: str = "cpu"
    # SHA-256 of the task spec file every member shares (fltasks/spec.py), or b""
    # without one; it joins the model fingerprint so that members with different
    # specs refuse each other as wrong-model.
    spec_hash: bytes = b""
    # A built-in task's unscaled features: each node then scales its own shard
    # (fltasks/scaling.py, node_view). None when the data is already one owner's.
    raw_features: RawFeatures | None = None
    # A data-file task's preprocessing as data (fltasks/inputs.py), so that an exported
    # model, `p2pfl predict` and `p2pfl.load_model` apply it without the training data.
    inputs: InputSpec | None = None

    def __post_init__(self) -> None:
        # A user's own task is checked here, once, rather than failing deep in training.
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32 or x.dim() < 2:
                raise TaskError(f"task {self.name!r}: x_{split} must be a float32 tensor of "
                                f"2 or more dims (samples first), "
                                f"got {x.dtype} of shape {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1:
                raise TaskError(f"task {self.name!r}: y_{split} must be a 1-D int64 tensor, "
                                f"got {y.dtype} of shape {tuple(y.shape)}")
            if len(x) != len(y):
                raise TaskError(f"task {self.name!r}: x_{split} has {len(x)} rows "
                                f"but y_{split} has {len(y)}")
        raw = self.raw_features
        if raw is not None and (len(raw.x_train), len(raw.x_test)) != (len(self.y_train),
                                                                          len(self.y_test)):
            raise TaskError(f"task {self.name!r}: raw_features has {len(raw.x_train)} train and "
                            f"{len(raw.x_test)} test rows, but the labels {len(self.y_train)} and "
                            f"{len(self.y_test)}; replace raw_features with the same rows")
        if self.num_classes < 2:
            raise TaskError(f"task {self.name!r}: num_classes must be >= 2, "
                            f"got {self.num_classes}")
        if not self.lr > 0:
            raise TaskError(f"task {self.name!r}: lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise TaskError(f"task {self.name!r}: batch_size must be >= 1, "
                            f"got {self.batch_size}")

    def train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
              generator: torch.Generator,
              direction: Mapping[str, torch.Tensor] | None = None) -> float:
        """Run plain minibatch SGD with cross-entropy in place; return the mean sample loss.

        No optimizer state survives the call: after gossip replaces the weights,
        local momentum would push them back toward the node's own model. The
        caller may pass ``direction`` (by parameter name), added to every step's
        gradient: quasi-global momentum's ``beta * m`` (fltasks/momentum.py), built
        from how the model moved between rounds, gossip included.
        Shuffling draws only from `generator`, so a run is reproducible per node.
        """
        if len(x) == 0:
            raise ValueError("cannot train on an empty shard: give every node at least one sample")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        was_training = model.training
        model.train()
        model.to(self.device)
        x, y = x.to(self.device), y.to(self.device)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        pulls = None if direction is None else [
            direction[name].to(self.device, p.dtype) for name, p in named]
        fold_tail = normalises_over_batch(model)
        total_loss, total_count = 0.0, 0
        for _ in range(epochs):
            # Drawn on the CPU from the caller's generator: the same order on any device.
            order = torch.randperm(len(x), generator=generator).to(self.device)
            for batch in batches(order, self.batch_size, fold_tail):
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p.sub_(g, alpha=self.lr)
                    for p, pull in zip(params, pulls or (), strict=False):
                        p.sub_(pull, alpha=self.lr)
                total_loss += loss.item() * len(batch)
                total_count += len(batch)
        model.train(was_training)
        model.to("cpu")
        return total_loss / total_count

    def evaluate(self, model: nn.Module, x: torch.Tensor | None = None,
                 y: torch.Tensor | None = None) -> float:
        """Return the accuracy of `model` on (x, y), by default the task's test split."""
        if (x is None) != (y is None):
            raise ValueError("pass both x and y, or neither to use the test split")
        if x is None or y is None:
            x, y = self.x_test, self.y_test
        if len(x) == 0:
            raise ValueError("cannot evaluate on an empty set")
        was_training = model.training
        model.eval()
        model.to(self.device)
        with torch.no_grad():
            predicted = model(x.to(self.device)).argmax(dim=1).cpu()
            correct = (predicted == y).sum().item()
        model.train(was_training)
        model.to("cpu")
        return correct / len(y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape, without the batch dimension."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def num_parameters(self) -> int:
        """Number of trainable scalars in the model, i.e. the size of one update."""
        return sum(p.numel() for p in self.make_model().parameters() if p.requires_grad)

    def steps_per_round(self, rows: int, epochs: int, fold_tail: bool = False) -> int:
        """SGD steps :meth:`train` runs on ``rows`` samples for ``epochs``
        (``fold_tail``: the model normalises over the batch, see :func:`batches`)."""
        full, tail = divmod(rows, self.batch_size)
        if tail and not (fold_tail and full):
            full += 1
        return epochs * full


def normalises_over_batch(model: nn.Module) -> bool:
    """True when a layer of ``model`` normalises with the statistics of the batch in hand."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
               for m in model.modules())


def batches(order: torch.Tensor, size: int, fold_tail: bool) -> list[torch.Tensor]:
    """``order`` cut into batches of ``size``; with ``fold_tail``, a short last batch joins
    the one before it.

    Why: BatchNorm in batch-statistics mode normalises each channel over the batch,
    and over the 3 images that 1,347 leave after 42 batches of 32 its variance is
    noise. One such step at the image task's learning rate took a lone node's CNN
    from 0.96 to 0.22 held-out accuracy (gradient norm 16 against 0.1 to 5 for a
    full batch; measured, issue 23). Folding keeps every sample once per epoch.
    Models without such a layer keep the plain cut, which the simulator's batched
    trainer reproduces step for step.
    """
    chunks = list(torch.split(order, size))
    if fold_tail and len(chunks) > 1 and len(chunks[-1]) < size:
        tail = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], tail])
    return chunks
