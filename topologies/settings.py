"""The settings of one simulator experiment, declared once: type, default, help and group.

:class:`ExperimentConfig` is the schema. Each field is one setting; its type
is the annotation, its default is the simulator's own
(:class:`~topologies.simulator.SimulationConfig`,
:class:`~topologies.network.NetworkConditions`) where the simulator has the
setting, and its help text, group, choices and range sit in the field's
metadata, declared with :func:`fltasks.settings_schema.setting` exactly as the
daemon declares its own (p2pfl/config.py). From it:

* :func:`add_flags` makes the argparse flags (``trim_fraction`` is
  ``--trim-fraction``), each parsed as text into the field's type;
* :func:`load_toml` reads the same settings from a TOML file, where a value
  of the wrong type (``rounds = "5"``) is refused, not converted;
* construction checks each setting's type, choices and declared range (the
  settings only an experiment has: nodes, degree, rewire, target, rounds >= 1);
* :meth:`ExperimentConfig.simulation_config` leaves the simulator's own ranges
  and cross-checks to :class:`~topologies.simulator.SimulationConfig`, checked
  once there, and adds the one an experiment combines (byzantine < nodes).
  Every error is a :class:`SettingError` naming its fields.

So a wrong value gets the same one-line error from a flag and from TOML.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fltasks import settings_schema
from fltasks.dp_defaults import DP_SGD_CLIP, DP_SGD_NOISE
from fltasks.settings_file import SettingsFileError, type_words, typed_value
from fltasks.settings_schema import Check, at_least, flag_name, setting, settings_of
from gossip.aggregation import AGGREGATORS
from gossip.robust import DEFAULT_CLIP_FRACTION, DEFAULT_TRIM_FRACTION
from topologies.attacks import ATTACKS
from topologies.graphs import TOPOLOGIES
from topologies.network import NetworkConditions
from topologies.ranks import DEFAULT_TIMEOUT_S
from topologies.settings_error import SettingError
from topologies.sim_config import FEATURE_STATS, SimulationConfig

__all__ = [
    "ExperimentConfig",
    "SettingError",
    "add_flags",
    "config_from_flags",
    "flag_name",
    "load_toml",
]


# Defaults the simulator owns are read from its dataclasses, so they are declared once.
_SIM = SimulationConfig
_NET = NetworkConditions()


@dataclass(frozen=True)
class ExperimentConfig:
    # graph
    topology: str = setting(
        "graph",
        "graph to simulate; 'all' runs every one. 'complete' (FedAvg) is always added as the "
        "baseline",
        "all",
        choices=(*TOPOLOGIES, "all"),
    )
    nodes: int = setting("graph", "number of nodes", 32, metavar="N", check=at_least(2))
    degree: int = setting(
        "graph",
        "neighbours per node for random (regular degree) and small-world (k, even)",
        6,
        metavar="K",
        check=at_least(2),
    )
    rewire: float = setting(
        "graph",
        "small-world rewiring probability",
        0.1,
        metavar="P",
        check=Check(lambda p: 0.0 <= p <= 1.0, "must be in [0, 1]"),
    )
    # learning
    task: str = setting(
        "learning",
        "digits, breast-cancer, csv:PATH (with --label), imagefolder:DIR, or module:function "
        "returning a fltasks.Task",
        "digits",
    )
    label: str | None = setting("learning", "csv tasks: the column to predict", None,
                                metavar="COLUMN")
    model: str | None = setting(
        "learning", "mlp:W,W, cnn or resnet18 in place of the task's default model", None
    )
    task_spec: str | None = setting(
        "learning", "csv/imagefolder: the members' shared task spec file", None, metavar="FILE"
    )
    partition: str = setting(
        "learning",
        "how the train split is shared: iid, dirichlet:ALPHA (label skew) or quantity:ALPHA "
        "(size skew)",
        "dirichlet:0.5",
    )
    # The simulator runs 0 rounds (an evaluation); an experiment needs one to compare.
    rounds: int = setting(
        "learning", "gossip rounds", _SIM.rounds, metavar="R", check=at_least(1)
    )
    linger_rounds: int = setting(
        "learning",
        "rounds after the last that only gossip, as a daemon lingers (--linger)",
        _SIM.linger_rounds,
        metavar="R",
    )
    local_epochs: int = setting(
        "learning",
        "epochs over its own shard each node runs per round",
        _SIM.local_epochs,
        metavar="E",
    )
    target: float | None = setting(
        "learning",
        "accuracy for rounds_to_target (default 0.98 x the centralized final accuracy)",
        None,
        metavar="ACC",
        check=Check(lambda acc: 0.0 < acc <= 1.0, "must be an accuracy in (0, 1]"),
    )
    # simulated network
    loss: float = setting(
        "simulated network",
        "probability in [0, 1) that a message is lost",
        _NET.loss,
        metavar="RATE",
    )
    delay: int = setting(
        "simulated network",
        "maximum per-link delay in rounds; each link's delay is drawn once from 0..ROUNDS",
        _NET.delay,
        metavar="ROUNDS",
    )
    churn: float = setting(
        "simulated network",
        "fraction in [0, 1) of nodes offline in each round, drawn afresh",
        _NET.churn,
        metavar="RATE",
    )
    push_sample: int = setting(
        "simulated network",
        "out-links each node pushes to per round, chosen afresh (time-varying neighbours); "
        "push-sum splits over those only. 0: every neighbour, every round",
        _NET.push_sample,
        metavar="K",
    )
    # hostile peers
    aggregator: str = setting(
        "hostile peers",
        "how a node folds in what it received: mean (exact push-sum) or gossip's robust rules",
        _SIM.aggregator,
        choices=tuple(AGGREGATORS),
    )
    trim_fraction: float | None = setting(
        "hostile peers",
        "trimmed-mean: fraction trimmed from each end; clipped: fraction of received "
        "estimates clipped; in (0, 0.5) (default gossip's: trimmed-mean "
        f"{DEFAULT_TRIM_FRACTION}, clipped {DEFAULT_CLIP_FRACTION})",
        _SIM.trim_fraction,
        metavar="BETA",
    )
    clip_radius: float | None = setting(
        "hostile peers",
        "clipped: fixed clipping radius (default adaptive)",
        _SIM.clip_radius,
        metavar="TAU",
    )
    byzantine: int = setting(
        "hostile peers",
        "number of Byzantine nodes, drawn with the seed",
        _SIM.byzantine,
        metavar="F",
    )
    attack: str = setting(
        "hostile peers", "what Byzantine nodes send", _SIM.attack, choices=ATTACKS
    )
    attack_scale: float | None = setting(
        "hostile peers",
        "sign-flip: -S z (default 1); scale: S z (default 10); noise: std S (default 1); "
        "alie: S std below the mean (default the paper's z_max for n and F)",
        _SIM.attack_scale,
        metavar="S",
    )
    # differential privacy
    dp: str = setting(
        "differential privacy (off by default)",
        "node: clip and noise each round's delta (default; needs --dp-clip and --dp-noise); "
        "sample: per-record DP-SGD with opacus, the daemon's code, node by node (slower; "
        "on with the daemon's defaults unless --dp-clip, --dp-noise, --dp-lr say otherwise)",
        _SIM.dp_mode,
        choices=("node", "sample"),
    )
    dp_clip: float | None = setting(
        "differential privacy (off by default)",
        f"clip to L2 norm C every honest node's round delta (node) or each record's gradient "
        f"(sample; default {DP_SGD_CLIP:g})",
        _SIM.dp_clip,
        metavar="C",
    )
    dp_noise: float | None = setting(
        "differential privacy (off by default)",
        f"add N(0, (SIGMA C)^2) per coordinate to the clipped delta or gradient sum "
        f"(sample; default {DP_SGD_NOISE:g})",
        _SIM.dp_noise,
        metavar="SIGMA",
    )
    dp_lr: float = setting(
        "differential privacy (off by default)",
        "sample only: DP-SGD's learning rate (the task's own rate is for non-private SGD)",
        _SIM.dp_lr,
        metavar="LR",
    )
    # compression
    compression: str = setting(
        "compression", "raw, fp16, int8 or topk:FRACTION", _SIM.compression, metavar="CODEC"
    )
    choco_step: float = setting(
        "compression",
        "topk only: step of the public-copy mixing, in (0, 1]",
        _SIM.choco_step,
        metavar="GAMMA",
    )
    choco_compensation: float = setting(
        "compression",
        "topk only: fraction in [0, 1] of the mass its sparse messages did not carry that a "
        "sender keeps; 1 conserves mass (CHOCO), 0 drops it",
        _SIM.choco_compensation,
        metavar="C",
    )
    feature_stats: str = setting(
        "learning",
        "how nodes standardise features: gossip (push-sum of per-feature count, sum and sum "
        "of squares before training: the network's mean and deviation), gossip-robust "
        "(iterated trimmed means: bounded against a lying member), local (each node's own "
        "shard). --dp sample keeps the published ranges",
        _SIM.feature_stats,
        choices=FEATURE_STATS,
    )
    momentum: float = setting(
        "learning",
        "beta of quasi-global momentum (Lin et al., ICML 2021) in each node's local SGD; "
        "0 turns it off. Not used under --dp sample",
        _SIM.momentum,
        metavar="BETA",
    )
    # run
    seed: int = setting("run", "seed of everything random", _SIM.seed)
    out: Path = setting("run", "output directory", Path("runs/simulate"), metavar="DIR")
    float64: bool = setting(
        "run", "keep and mix the stacked models in float64 (default float32)", False
    )
    node_chunk: int | None = setting(
        "run",
        "bound memory for large models: train, evaluate and mix at most this many nodes' "
        "models at a time (same results; the [n, P] models stay in memory once, 4 bytes a "
        "value; compression, attacks, DP and delay still hold extra [n, P] copies). "
        "Default: all at once",
        _SIM.node_chunk,
        metavar="NODES",
    )
    rank_timeout: float = setting(
        "run",
        "under torchrun: seconds a rank waits for the others, to join and at each exchange, "
        "before it fails",
        DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        """Each setting's type, choices and range, from its declaration."""
        for item in settings_of(ExperimentConfig):
            value = getattr(self, item.name)
            _check_type(item.name, value, item.hint)
            reason = item.problem(value)
            if reason is not None:
                raise SettingError(item.name, f"{reason}, got {value!r}")
        if self.dp == "sample":  # the daemon's --dp sample defaults, so summary.json shows them
            if self.dp_clip is None:
                object.__setattr__(self, "dp_clip", DP_SGD_CLIP)
            if self.dp_noise is None:
                object.__setattr__(self, "dp_noise", DP_SGD_NOISE)

    @property
    def network(self) -> NetworkConditions:
        return NetworkConditions(
            loss=self.loss, delay=self.delay, churn=self.churn, push_sample=self.push_sample
        )

    def simulation_config(self) -> SimulationConfig:
        """The simulator's config; every bad value raises :class:`SettingError`.

        Each setting's own range was checked on construction; the simulator's own
        settings are checked by SimulationConfig, once. Left here: what only an
        experiment combines.
        """
        if self.byzantine >= self.nodes:
            raise SettingError(
                ("byzantine", "nodes"), f"byzantine must be below nodes, got {self.byzantine}"
            )
        if not self.rank_timeout > 0:
            raise SettingError("rank_timeout", f"must be > 0, got {self.rank_timeout}")
        if self.dp_lr != _SIM.dp_lr and self.dp != "sample":
            raise SettingError("dp_lr", "is DP-SGD's learning rate: give it with --dp sample")
        passed = {name: getattr(self, name) for name in _PASSED_THROUGH}
        return SimulationConfig(
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            network=self.network,
            seed=self.seed,
            dtype=torch.float64 if self.float64 else torch.float32,
            dp_mode=self.dp,
            **passed,
        )


_PASSED_THROUGH = (
    "linger_rounds",
    "aggregator",
    "trim_fraction",
    "clip_radius",
    "byzantine",
    "attack",
    "attack_scale",
    "dp_clip",
    "dp_noise",
    "dp_lr",
    "compression",
    "choco_step",
    "choco_compensation",
    "node_chunk",
    "feature_stats",
    "momentum",
)


def _check_type(name: str, value: Any, hint: Any) -> None:
    try:
        typed_value(value, hint, finite=True)
    except SettingsFileError as error:
        raise SettingError(name, str(error)) from None


def _parse_text(name: str, kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise SettingError(name, f"expected {type_words(kind)}, got {text!r}") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, grouped as declared; values stay text until checked."""
    settings_schema.add_flags(parser, ExperimentConfig, parse=False)


def config_from_flags(
    flags: argparse.Namespace, file_settings: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Defaults, then the TOML file's settings, then the flags that were given."""
    values = dict(file_settings or {})
    for item in settings_of(ExperimentConfig):
        text = getattr(flags, item.name, None)
        if text is None:
            continue
        kind = item.kind
        values[item.name] = text if kind is bool else _parse_text(item.name, kind, text)
    return ExperimentConfig(**values)


def load_toml(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, by field name; unknown keys are refused."""
    try:
        raw = settings_schema.load_toml(path, ExperimentConfig)
    except SettingsFileError as error:
        raise SettingError("config", f"{path}: {error}") from None
    if isinstance(raw.get("out"), str):
        raw["out"] = Path(raw["out"])
    return raw
