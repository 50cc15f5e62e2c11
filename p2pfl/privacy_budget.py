"""The privacy budget: the two DP modes, their accountants, and when training must stop.

``--dp node`` adds Gaussian noise to each round's change (gossip/privacy.py) and
counts steps in an RDP accountant; ``--dp sample`` trains with DP-SGD (opacus).
Noise comes from OS entropy, never from the experiment seed: whoever can
reproduce the noise can subtract it. Without DP, each raw round is counted, so
that DP can never be claimed later for a model that has left unprotected
(p2pfl/dp.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fltasks.dp_defaults import DP_SGD_CLIP, DP_SGD_LR, DP_SGD_NOISE
from gossip.privacy import GaussianMechanism, RdpAccountant
from p2pfl.checkpoint import CheckpointError
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.dp import (
    NON_PRIVATE_ROUNDS,
    non_private_rounds,
    refuse_dp_after_raw_rounds,
    reseed_from_os_entropy,
)
from p2pfl.training import LocalTraining

if TYPE_CHECKING:
    from fltasks.dp_sgd import DpSgdTrainer  # opacus is imported only under --dp sample

logger = logging.getLogger(__name__)


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


class PrivacyBudget:
    """What this node has spent, and whether one more round fits ``--dp-target-epsilon``."""

    def __init__(
        self, config: NodeConfig, training: LocalTraining, announce: Callable[[str], None]
    ) -> None:
        self.config = config
        self.privacy: GaussianMechanism | None = None
        self.dp_sgd: DpSgdTrainer | None = None
        if config.dp_mode == "sample":
            from fltasks.dp_sgd import DpSgdTrainer

            self.dp_sgd = DpSgdTrainer(
                training.model,
                training.x,
                training.y,
                lr=config.dp_lr if config.dp_lr is not None else DP_SGD_LR,
                batch_size=training.task.batch_size,
                noise_multiplier=self._dp_sgd_noise(training, announce),
                clip_norm=config.dp_clip if config.dp_clip is not None else DP_SGD_CLIP,
                generator=training.generator,
                reseed=reseed_from_os_entropy,
            )
        elif config.dp_clip is not None and config.dp_noise is not None:
            self.privacy = GaussianMechanism(
                config.dp_clip, config.dp_noise, np.random.default_rng()
            )
        # --dp-target-epsilon reached: the node merges and serves but trains no more.
        self.exhausted = False
        # Kept from the checkpoint even while DP is off, so turning it back on resumes it.
        self.saved: dict[str, Any] = {}
        self.epsilon = self.epsilon_now()

    def _dp_sgd_noise(self, training: LocalTraining, announce: Callable[[str], None]) -> float:
        """--dp-noise, else the least noise that spends --dp-target-epsilon in --rounds
        (both given), else the default; announced, since it fixes the epsilon a run spends."""
        config = self.config
        if config.dp_noise is not None:
            return config.dp_noise
        if config.dp_target_epsilon is None or config.rounds is None:
            return DP_SGD_NOISE
        from fltasks.dp_sgd import noise_for_target, sample_rate_of, steps_per_epoch

        rate = sample_rate_of(training.task.batch_size, training.samples)
        steps = config.rounds * config.local_epochs * steps_per_epoch(rate)
        noise = noise_for_target(config.dp_target_epsilon, config.dp_delta, rate, steps)
        announce(
            f"--dp sample: noise {noise:.3f} spends epsilon {config.dp_target_epsilon:g} "
            f"(delta {config.dp_delta:g}) in {config.rounds} rounds of {steps // config.rounds} "
            f"steps at sample rate {rate:.3f}"
        )
        return noise

    # -- across restarts ------------------------------------------------------------------

    def restore(self, saved: dict[str, Any], round_number: int, where: object) -> None:
        """Resume the accountants from a checkpoint's privacy record (taken at ``round_number``)."""
        self.saved = dict(saved)
        self.saved[NON_PRIVATE_ROUNDS] = non_private_rounds(saved, round_number)
        if self.config.dp_enabled:
            refuse_dp_after_raw_rounds(saved, round_number, str(where))
        if self.privacy is not None:
            if saved.get("dp_history"):
                raise ConfigError(
                    f"--dp node: the state in {where} spent its budget under "
                    "--dp sample; keep --dp sample, or start from a fresh --state-dir"
                )
            self.privacy.accountant.steps = _dp_steps_from(saved, self.privacy.noise_multiplier)
        if self.dp_sgd is not None:
            self.dp_sgd.accountant.history = _dp_sgd_history(saved, where)
        self.epsilon = self.epsilon_now()

    def state(self) -> dict[str, Any]:
        """The privacy record a checkpoint keeps."""
        if self.dp_sgd is not None:
            return {
                "dp_mode": "sample",
                "dp_history": [list(entry) for entry in self.dp_sgd.history()],
                NON_PRIVATE_ROUNDS: 0,
            }
        if self.privacy is None:
            return dict(self.saved)
        return {
            "dp_steps": self.privacy.accountant.steps,
            "dp_noise": self.privacy.noise_multiplier,
            NON_PRIVATE_ROUNDS: 0,  # DP refuses to start otherwise (p2pfl/dp.py)
        }

    # -- each round -----------------------------------------------------------------------

    def epsilon_now(self) -> float | None:
        """Epsilon spent so far at --dp-delta, or None with DP off.

        Computed on the loop between rounds (the accountant changes only in the
        training thread), and cached in ``epsilon`` for /status.
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

    def allows_a_round(self) -> bool:
        """False, once and for good, when the next round would push epsilon past the target.

        The decision reads only the accountant, never the data, so stopping
        costs no privacy.
        """
        target = self.config.dp_target_epsilon
        if self.exhausted:
            return False
        if target is None:
            return True
        after = self._epsilon_after_next_round()
        if after is None or after <= target:
            return True
        self.exhausted = True
        logger.warning(
            "privacy budget reached: epsilon %.4g now, %.4g after one more round > target %g "
            "(delta %g); training stops, merging and serving go on",
            self.epsilon or 0.0,
            after,
            target,
            self.config.dp_delta,
        )
        return False

    def release(self, before: np.ndarray, after: np.ndarray, round_number: int) -> np.ndarray:
        """What round ``round_number``'s training may release: ``after`` noised (--dp node),
        as trained (--dp sample: its steps were noised), or raw and counted as such."""
        if self.privacy is not None:
            try:
                after = self.privacy.privatize_step(before, after)
            except ValueError as error:
                # Training diverged. Whether it does depends on the data, so the round
                # must look like any other: a zero change, noised and accounted.
                logger.warning("round %d: diverged, released noise only: %s", round_number, error)
                after = self.privacy.privatize_step(before, before)
        elif self.dp_sgd is None:
            # A raw update leaves with the next push: DP can never be claimed for this
            # model again (p2pfl/dp.py), so the checkpoint must remember it.
            self.saved[NON_PRIVATE_ROUNDS] = self.saved.get(NON_PRIVATE_ROUNDS, 0) + 1
        self.epsilon = self.epsilon_now()
        return after
