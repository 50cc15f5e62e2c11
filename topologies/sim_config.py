"""The settings of one simulation run, each checked with a one-line error naming it.

:class:`SimulationConfig` is the simulator's; :mod:`topologies.settings` builds
it from flags and TOML. Every problem is a
:class:`~topologies.settings_error.SettingError` naming the fields to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fltasks.dp_defaults import DP_SGD_LR
from fltasks.momentum import DEFAULT_BETA
from topologies.attacks import ATTACKS
from topologies.compression import (
    DEFAULT_CHOCO_STEP,
    DEFAULT_COMPENSATION,
    BatchedCodec,
    resolve_codec,
)
from topologies.network import NetworkConditions
from topologies.privacy import BatchedGaussianMechanism
from topologies.robust import BatchedRule, batched_rule
from topologies.settings_error import SettingError

FEATURE_STATS = ("gossip", "gossip-robust", "local")


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
    # How each node standardises its features (issue 25): "gossip" agrees on the
    # network's mean and deviation by push-sum of aggregates before training
    # (topologies/feature_stats.py), "gossip-robust" by iterated trimmed means,
    # "local" uses the node's own shard's. --dp sample keeps public ranges.
    feature_stats: str = "gossip"
    # beta of quasi-global momentum (fltasks/momentum.py) in local SGD; 0: plain SGD.
    # Off under --dp sample, whose DP-SGD steps are the accountant's.
    momentum: float = DEFAULT_BETA

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
        if self.feature_stats not in FEATURE_STATS:
            raise SettingError("feature_stats", f"must be one of {', '.join(FEATURE_STATS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise SettingError("momentum", f"must be in [0, 1), got {self.momentum}")
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
                ("compression", "loss", "delay", "churn", "push_sample"),
                f"{self.compression} keeps public copies that every neighbour must update: "
                "it needs loss, delay, churn and push-sample 0",
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
