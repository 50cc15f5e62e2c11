"""Per-record differential privacy in training: DP-SGD with opacus.

Each step draws a Poisson batch (every record independently with probability
``q = batch_size / n``; opacus's ``DPDataLoader``), clips every record's
gradient to L2 norm ``C`` (opacus's ``GradSampleModule`` and ``DPOptimizer``),
sums them, adds ``N(0, (sigma C)^2)`` per coordinate and takes an SGD step
of ``lr / batch_size`` times that sum (the mean over the expected batch). Every
step is accounted by opacus's RDP accountant for the subsampled Gaussian
mechanism (Mironov, Talwar, Zhang 2019), whose neighbouring relation is
add/remove of one record; ``q`` and the number of steps are fixed when the
trainer is built and are not functions of the records' values.

Randomness comes from one torch generator, for both the batches and the
noise: opacus would otherwise draw noise from torch's global generator, which
experiments seed. The daemon passes ``reseed``, which refills the generator's
whole state from OS entropy before every step (p2pfl/dp.py); the simulator
passes a seeded generator and no reseed, to be reproducible. ``secure_mode``
of the optimizer draws each noise value as a sum of several Gaussians, which
closes the floating-point attack on the noise's low bits (opacus's notes).

Everything the trainer returns is computed from the noisy steps alone, so a
result that is not finite can be replaced by the starting point without any
further privacy cost (post-processing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import TensorDataset

History = list[tuple[float, float, int]]


def check_history(value: Any) -> History:
    """A checked accountant history ``[(noise_multiplier, sample_rate, steps), ...]``."""
    if not isinstance(value, list | tuple):
        raise ValueError("the DP-SGD history must be a list of [noise, sample_rate, steps]")
    history: History = []
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise ValueError("each DP-SGD history entry must be [noise, sample_rate, steps]")
        noise, rate, steps = entry
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"DP-SGD history: steps must be an integer >= 0, got {steps!r}")
        noise, rate = float(noise), float(rate)
        if not (math.isfinite(noise) and noise > 0 and 0 < rate <= 1):
            raise ValueError(f"DP-SGD history: bad noise {noise} or sample rate {rate}")
        history.append((noise, rate, steps))
    return history


def make_accountant(history: History) -> RDPAccountant:
    accountant = RDPAccountant()
    accountant.history = [entry for entry in history if entry[2] > 0]
    return accountant


def epsilon_of(history: History, delta: float) -> float:
    """Opacus's RDP epsilon at ``delta`` for ``history`` (0 before any step)."""
    accountant = make_accountant(history)
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def noise_for_target(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The least noise multiplier (to opacus's 0.01 in epsilon) whose ``steps`` spend at most
    ``epsilon``: opacus's ``get_noise_multiplier``, on the same RDP accountant."""
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )


def sample_rate_of(batch_size: int, records: int) -> float:
    """Poisson sampling's rate: each record joins a batch with this probability."""
    return min(1.0, batch_size / records)


def steps_per_epoch(sample_rate: float) -> int:
    """opacus's ``DPDataLoader`` length: ``1 / q`` batches, rounded down."""
    return int(1 / sample_rate)


class DpSgdTrainer:
    """DP-SGD on one node's records; :meth:`train` runs the steps of one local round.

    ``model`` is trained in place (opacus wraps it; the caller keeps loading
    weights into ``model`` itself). ``history`` resumes the accountant from a
    checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        batch_size: int,
        noise_multiplier: float,
        clip_norm: float,
        generator: torch.Generator,
        history: History | None = None,
        reseed: Callable[[torch.Generator], None] | None = None,
    ) -> None:
        if len(x) == 0:
            raise ValueError("cannot train on an empty shard: give every node at least one sample")
        # opacus's own check: BatchNorm mixes the records of a batch, so clipping each
        # record's gradient would not bound its influence, and the guarantee would be void.
        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            first = str(problems[0]).split(". ")[0]
            raise ValueError(
                f"--dp sample cannot train this model: {first}; "
                "use a model without BatchNorm (e.g. --model mlp:64)"
            )
        self.sample_rate = sample_rate_of(batch_size, len(x))
        self.generator = generator
        self.reseed = reseed
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.module = GradSampleModule(model, loss_reduction="sum")
        self.loader = DPDataLoader(
            TensorDataset(x, y), sample_rate=self.sample_rate, generator=generator
        )
        expected = max(1, round(self.sample_rate * len(x)))
        # Summed loss and lr / expected batch: the mean step of DP-SGD, and an empty
        # Poisson batch is a zero sum (plus noise), not the NaN of an empty mean.
        sgd = torch.optim.SGD(self.module.parameters(), lr=lr / expected)
        self.optimizer = DPOptimizer(
            sgd,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip_norm,
            expected_batch_size=expected,
            loss_reduction="sum",
            generator=generator,
            secure_mode=True,
        )
        self.accountant = make_accountant(list(history or []))
        self.optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def train(self, epochs: int) -> None:
        """``epochs`` passes of ``1/q`` Poisson batches each, every one a noisy step."""
        self.module.train()
        with warnings.catch_warnings():
            # torch notes that the first layer's input needs no gradient; opacus's
            # per-sample hooks need only the parameters' (a harmless warning).
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            for _ in range(epochs):
                batches = iter(self.loader)
                for _ in range(len(self.loader)):
                    if self.reseed is not None:  # before the batch and its noise are drawn
                        self.reseed(self.generator)
                    xb, yb = next(batches)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(self.module(xb), yb, reduction="sum")
                    loss.backward()
                    self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def history(self) -> History:
        return [(float(z), float(q), int(n)) for z, q, n in self.accountant.history]

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history(), delta)

    def epsilon_after(self, more_steps: int, delta: float) -> float:
        """Epsilon if ``more_steps`` further steps ran at the current settings."""
        step = (self.noise_multiplier, self.sample_rate, more_steps)
        return epsilon_of([*self.history(), step], delta)
