"""The node's settings, declared once: one dataclass, filled from a TOML file and then from flags.

Each field of :class:`NodeConfig` is one setting, declared with
:func:`fltasks.settings_schema.setting` (type, default, help, group, choices,
range), the way the simulator declares its own (topologies/settings.py). The
``p2pfl node`` flags (``--state-dir``), the TOML keys of ``--config FILE``
(``state_dir``), the checks and the reference page docs/CONFIG.md
(``python -m p2pfl.config --reference docs/CONFIG.md``) are all made from it;
flags override the file. Validation happens here, once, and each problem is a
``ConfigError`` whose message is one line naming the setting and the fix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fltasks.dp_defaults import DP_SGD_CLIP, DP_SGD_LR, DP_SGD_NOISE
from fltasks.momentum import DEFAULT_BETA
from fltasks.settings_file import SettingsFileError
from fltasks.settings_schema import (
    Check,
    above,
    at_least,
    first_problem,
    load_toml,
    setting,
    typed_settings,
)
from gossip.aggregation import AGGREGATORS, Aggregator, aggregator_by_name
from gossip.attacks import DAEMON_ATTACKS
from gossip.compression import resolve_codec
from gossip.node import DEFAULT_QUORUM
from gossip.robust import DEFAULT_CLIP_FRACTION, DEFAULT_TRIM_FRACTION
from gossip.vocabulary import FREEZE_GRACE_S
from p2pfl.deadlines import HANDSHAKE_LINK_MBIT, Deadlines
from p2pfl.linkrates import UNMEASURED_MBIT


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line."""


LOG_FORMATS = ("text", "json")
DP_MODES = ("node", "sample")
RELAY_MODES = ("on", "off")
FEATURE_STATS_MODES = ("gossip", "gossip-robust", "local")


def _shard_ok(text: str) -> bool:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit()):
        return False
    return int(count) >= 1 and 0 <= int(index) < int(count)


def _host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


_HOST_PORT = Check(lambda text: _host_port(text) is not None,
                   "expected HOST:PORT, e.g. 127.0.0.1:8080")
_POSITIVE = above(0, "must be a finite number > 0")
_AT_LEAST_1 = at_least(1, "must be at least 1")
_NODE = "node"
_LEARNING = "learning"
_GOSSIP = "gossip and robustness"
_LIMITS = "network limits"
_DP = "differential privacy (SECURITY.md)"
_EXPERIMENTS = "experiments only"


@dataclass(frozen=True)
class NodeConfig:
    # -- the node -------------------------------------------------------------------------
    key: str = setting(_NODE, "node key file from `p2pfl keygen`", "node.key")
    listen: tuple[str, ...] = setting(
        _NODE,
        "address to listen on, repeatable",
        ("/ip4/127.0.0.1/tcp/0",),
        metavar="MULTIADDR",
        check=Check(bool, "give at least one multiaddr, e.g. /ip4/0.0.0.0/tcp/4001"),
    )
    bootstrap: tuple[str, ...] = setting(
        _NODE,
        "a member's /ip4/.../tcp/N/p2p/ID address, repeatable",
        (),
        metavar="MULTIADDR",
        default_text="none: the first node",
    )
    state_dir: str = setting(_NODE, "checkpoints go here", "p2pfl-state", metavar="DIR")
    status_addr: str = setting(
        _NODE,
        "serve /status and /metrics; port 0 is a free port, and the bound address is printed",
        "127.0.0.1:0",
        metavar="HOST:PORT",
        check=_HOST_PORT,
    )
    allow: str | None = setting(
        _NODE,
        "serve and gossip with only these peer ids (one per line); others are refused",
        None,
        metavar="FILE",
    )
    # A network without a server (issue 22): its genesis file, and this node's
    # certificate (a founder needs none: the genesis is its certificate).
    network: str | None = setting(
        _NODE,
        "a network without a server: its genesis file (`p2pfl network create`); members "
        "are who hold k members' signatures",
        None,
        metavar="GENESIS",
    )
    cert: str | None = setting(
        _NODE,
        "with --network: this node's certificate (`p2pfl member sign`); a founder needs none",
        None,
        metavar="FILE",
    )
    log_format: str = setting(_NODE, "log lines on stderr", "text", choices=LOG_FORMATS)
    # Serve as a circuit relay (p2pfl/relay.py) for members behind NAT. Members reserve
    # slots only on relays that peers can dial back (p2pfl/reachability.py), so a
    # NATed node serving it costs nothing; "off" for a member that must not carry
    # others' traffic.
    relay: str = setting(
        _NODE,
        "carry traffic for members behind NAT as a circuit relay; they use it only if "
        "peers can dial this node",
        "on",
        choices=RELAY_MODES,
    )
    # -- learning -------------------------------------------------------------------------
    task: str = setting(
        _LEARNING,
        "digits, breast-cancer, csv:PATH (your table; with --label), imagefolder:DIR, "
        "or module:function",
        "digits",
    )
    label: str | None = setting(_LEARNING, "csv tasks: the column to predict", None,
                                metavar="COLUMN")
    # fltasks/models.py
    model: str | None = setting(
        _LEARNING,
        "mlp:W,W (hidden widths), cnn or resnet18, in place of the task's default model",
        None,
    )
    # fltasks/spec.py; its hash joins the fingerprint.
    task_spec: str | None = setting(
        _LEARNING,
        "csv/imagefolder: the spec file every member shares (classes, input shape, "
        "model); a member with another spec is refused as wrong-model",
        None,
        metavar="FILE",
    )
    # Checked by fltasks.device.resolve_device when the task loads (it needs torch).
    device: str = setting(
        _LEARNING,
        "where training runs: auto (CUDA when there is one, else the CPU), cpu, cuda or cuda:N",
        "auto",
    )
    shard: str = setting(
        _LEARNING,
        "train on shard I of N of the task's data",
        "0/1",
        metavar="I/N",
        check=Check(_shard_ok, "expected I/N with 0 <= I < N, e.g. 0/8"),
    )
    partition: str = setting(
        _LEARNING, "how shards are cut: iid, dirichlet:ALPHA, quantity:ALPHA", "iid"
    )
    seed: int = setting(_LEARNING, "seed of the task, shards and training", 0)
    rounds: int | None = setting(
        _LEARNING,
        "stop after this many local rounds",
        None,
        check=at_least(1, "must be >= 1 (omit it to run forever)"),
        default_text="run until stopped",
    )
    local_epochs: int = setting(
        _LEARNING, "epochs over the local shard per round", 1, check=_AT_LEAST_1
    )
    # Rounds are paced by default: unpaced rounds take ~75 ms, so nodes started
    # 2 s apart ended 30 rounds apart and a clean run varied by 6 points.
    round_interval: float = setting(
        _LEARNING,
        "shortest time between round starts",
        0.5,
        metavar="SECONDS",
        check=at_least(0, "must be seconds >= 0"),
    )
    # Rounds follow the network (p2pfl/pacing.py): unpaced rounds outran gossip.
    mix_wait: float = setting(
        _LEARNING,
        "longest a round waits for its live in-neighbours' shares before merging, and for "
        "one of its last pushes to land before training (0: never wait)",
        30.0,
        metavar="SECONDS",
        check=at_least(0, "must be seconds >= 0"),
    )
    # So that members who started later are not left to train alone; "done" means the
    # neighbourhood has the final model (p2pfl/rounds.py), so this is only a cap.
    linger: float = setting(
        _LEARNING,
        "after the last round, keep gossiping without training until the neighbours have "
        "this node's final model and it is close to theirs, at most this long",
        120.0,
        metavar="SECONDS",
        check=at_least(0, "must be seconds >= 0"),
    )
    # Issue 25: gossiped statistics (p2pfl/feature_stats.py), and momentum; see README.
    feature_stats: str = setting(
        _LEARNING, "feature scaling: gossip (the network's mean and deviation, agreed before "
        "round 1), gossip-robust (bounded against a lying member) or local (own shard)",
        "gossip", choices=FEATURE_STATS_MODES)
    feature_stats_wait: float = setting(
        _LEARNING, "longest wait for that agreement (no peer answered: own statistics, "
        "logged)", 20.0, metavar="SECONDS", check=_POSITIVE)
    # Issue 25: csv members agree on their categories and classes before the model is
    # built (p2pfl/vocabulary.py), so that every member's model has the same shape.
    vocabulary_wait: float = setting(
        _LEARNING, "csv tasks without --task-spec: how long the first member gathers the "
        "members' categories and classes before building its model (the others wait for its "
        f"union until {FREEZE_GRACE_S:g} s after its window ends; 0: off, own file's only)", 20.0,
        metavar="SECONDS", check=at_least(0, "must be seconds >= 0"))
    momentum: float = setting(
        _LEARNING, "beta of quasi-global momentum in local SGD (0: plain SGD; not under --dp "
        "sample)", DEFAULT_BETA, metavar="BETA", check=Check(lambda b: 0 <= b < 1, "in [0, 1)"))
    # -- gossip and robustness ------------------------------------------------------------
    degree: int = setting(_GOSSIP, "gossip neighbours per node", 4, check=_AT_LEAST_1)
    min_neighbours: int = setting(
        _GOSSIP, "peers to know before training starts", 1, check=at_least(0)
    )
    # raw float32, fp16/int8 for 2x/4x fewer bytes, or topk:F, differences to a public
    # copy (gossip/public_copy.py).
    compression: str = setting(
        _GOSSIP,
        "how updates travel: raw, fp16 (2x fewer bytes), int8 (~4x) or topk:F "
        "(differences to a public copy, e.g. topk:0.01)",
        "raw",
        check=Check(
            lambda codec: resolve_codec(codec) is not None,
            "choose raw, fp16, int8 or topk:F with 0 < F <= 1 (e.g. topk:0.01)",
        ),
    )
    # Chosen from measurements on real daemons (docs/BENCHMARKS.md): clipped costs
    # nothing in clean runs and holds against the attacks that break mean.
    aggregator: str = setting(
        _GOSSIP,
        "how received models are combined; clipped resists bad members at no cost in "
        "clean runs, mean is exact push-sum",
        "clipped",
        choices=tuple(AGGREGATORS),
    )
    # Fraction of a neighbourhood a robust rule treats as suspect; None: the rule's own.
    trim_fraction: float | None = setting(
        _GOSSIP,
        "trimmed-mean/clipped: fraction treated as outliers",
        None,
        metavar="BETA",
        check=Check(lambda beta: 0.0 < beta < 0.5, "must be in (0, 0.5)"),
        default_text=f"trimmed-mean {DEFAULT_TRIM_FRACTION}, clipped {DEFAULT_CLIP_FRACTION}",
    )
    clip_radius: float | None = setting(
        _GOSSIP,
        "clipped: fixed radius",
        None,
        metavar="TAU",
        check=at_least(0, "must be a finite number >= 0"),
        default_text="adaptive",
    )
    # Below the quorum of distinct fresh neighbours, a robust merge takes a bounded step.
    quorum: int = setting(
        _GOSSIP,
        "distinct fresh neighbours a robust merge needs; below it the node takes a "
        "bounded step",
        DEFAULT_QUORUM,
        check=at_least(1, "must be at least 1 neighbour"),
    )
    # -- network limits -------------------------------------------------------------------
    max_message_mb: float = setting(_LIMITS, "largest update accepted", 64.0, check=above(0))
    send_timeout: float = setting(
        _LIMITS, "per push", 5.0, metavar="SECONDS", check=above(0, "must be seconds > 0")
    )
    # Every push and frame deadline grows by the message's size at the peer's link rate,
    # measured per link (p2pfl/linkrates.py): with a configured 8 Mbit/s, every first
    # 4.5 MB push over a shared 10 Mbit/s uplink timed out. Given, it replaces the slow
    # assumption a link starts from until it is measured.
    min_link_mbit: float | None = setting(
        _LIMITS,
        "link rate push and read deadlines assume for an update's size until a peer's "
        "link is measured by its first large frame (p2pfl/linkrates.py)",
        None,
        metavar="MBIT",
        check=above(0, "must be a rate > 0"),
        default_text=f"measured; {UNMEASURED_MBIT:g} until then",
    )
    # One deadline per whole frame.
    read_timeout: float = setting(
        _LIMITS,
        "a whole inbound message must arrive within this",
        10.0,
        metavar="SECONDS",
        check=above(0, "must be seconds > 0"),
    )
    peer_mb_per_min: float = setting(
        _LIMITS,
        "inbound MiB per peer and minute, plus a burst of one largest message",
        64.0,
        metavar="MIB",
        check=above(0),
    )
    # -- differential privacy --------------------------------------------------------------
    # "node" clips and noises each round's whole update (gossip/privacy.py), "sample" runs
    # DP-SGD with opacus (fltasks/dp_sgd.py). Without --dp, giving --dp-clip and
    # --dp-noise means "node", as it always has. Under "sample" all three have defaults
    # (fltasks/dp_defaults.py); the noise is then chosen to spend --dp-target-epsilon in
    # --rounds when both are given.
    dp: str | None = setting(
        _DP,
        "'sample' runs DP-SGD (per-record clipping, Poisson batches); 'node' clips and "
        "noises each round's whole update (the default when --dp-clip and --dp-noise are "
        "given)",
        None,
        choices=DP_MODES,
        default_text="off",
    )
    dp_clip: float | None = setting(
        _DP,
        "clip to L2 norm C each record's gradient (sample) or each round's update (node)",
        None,
        metavar="C",
        check=_POSITIVE,
        default_text=f"sample: {DP_SGD_CLIP:g}",
    )
    dp_noise: float | None = setting(
        _DP,
        "Gaussian noise of std SIGMA*C",
        None,
        metavar="SIGMA",
        check=_POSITIVE,
        default_text=f"sample: {DP_SGD_NOISE:g}, or the least noise that keeps --rounds "
        "within --dp-target-epsilon",
    )
    dp_lr: float | None = setting(
        _DP,
        "--dp sample: DP-SGD's learning rate (the task's own rate is for non-private SGD)",
        None,
        metavar="LR",
        check=_POSITIVE,
        default_text=f"{DP_SGD_LR:g}",
    )
    dp_delta: float = setting(
        _DP,
        "delta of the reported (epsilon, delta)",
        1e-5,
        check=Check(lambda delta: 0.0 < delta < 1.0, "must be in (0, 1), e.g. 1e-5"),
    )
    dp_target_epsilon: float | None = setting(
        _DP,
        "stop training before epsilon would pass E; keep merging and serving",
        None,
        metavar="E",
        check=_POSITIVE,
    )
    # -- experiments ------------------------------------------------------------------------
    attack: str | None = setting(
        _EXPERIMENTS,
        "act as a Byzantine member that pushes this attack as fast as it may, or "
        "(lie-receipts) keeps every update it is sent and answers it with a refusal "
        "(gossip/attacks.py, scripts/bench_byzantine.py)",
        None,
        choices=DAEMON_ATTACKS,
    )

    @property
    def shard_index(self) -> tuple[int, int]:
        index, count = self.shard.split("/")
        return int(index), int(count)

    @property
    def min_link_bytes_per_s(self) -> float:
        """What handshakes and joining's model fetch assume a link carries."""
        return (self.min_link_mbit or HANDSHAKE_LINK_MBIT) * 1e6 / 8

    @property
    def assumed_link_bytes_per_s(self) -> float:
        """What an update's deadlines assume of a link until it is measured."""
        return (self.min_link_mbit or UNMEASURED_MBIT) * 1e6 / 8

    @property
    def deadlines(self) -> Deadlines:
        """Every network deadline these settings give (p2pfl/deadlines.py)."""
        return Deadlines(self.send_timeout, self.read_timeout, self.min_link_bytes_per_s)

    @property
    def dp_mode(self) -> str | None:
        """``"node"``, ``"sample"``, or None with DP off."""
        if self.dp is not None:
            return self.dp
        return "node" if self.dp_clip is not None else None

    @property
    def dp_enabled(self) -> bool:
        return self.dp_mode is not None

    def _fraction(self) -> dict[str, float]:
        return {} if self.trim_fraction is None else {"beta": self.trim_fraction}

    def make_aggregator(self) -> Aggregator:
        """The averaging rule these settings name, with its parameters."""
        if self.aggregator == "trimmed-mean":
            return aggregator_by_name(self.aggregator, **self._fraction())
        if self.aggregator == "clipped":
            return aggregator_by_name(self.aggregator, tau=self.clip_radius, **self._fraction())
        return aggregator_by_name(self.aggregator)

    def validate(self) -> NodeConfig:
        """Check every setting; return self so calls chain.

        Each setting's own choices and range come from its declaration; what is
        left here are the settings that only make sense together.
        """
        problem = first_problem(self, NodeConfig)
        if problem is not None:
            item, reason = problem
            raise ConfigError(f"{_named(item.flag, getattr(self, item.name))}: {reason}")
        if self.cert is not None and self.network is None:
            raise ConfigError("--cert: give the network's genesis with --network too")
        if self.network is not None and self.allow is not None:
            raise ConfigError("--network and --allow: choose one way to say who is a member")
        if self.clip_radius is not None and self.aggregator != "clipped":
            raise ConfigError("--clip-radius: only used with --aggregator clipped; drop it")
        self._validate_privacy()
        return self

    def _validate_privacy(self) -> None:
        if self.dp == "node" and (self.dp_clip is None or self.dp_noise is None):
            raise ConfigError(f"--dp {self.dp}: needs --dp-clip C and --dp-noise SIGMA")
        if self.dp is None and (self.dp_clip is None) != (self.dp_noise is None):
            raise ConfigError("--dp-clip and --dp-noise: give both to turn DP on, or neither")
        if self.dp_lr is not None and self.dp_mode != "sample":
            raise ConfigError("--dp-lr: the DP-SGD learning rate is only used with --dp sample")
        if self.dp_target_epsilon is not None and not self.dp_enabled:
            raise ConfigError("--dp-target-epsilon: only used with DP on (--dp); drop it")


def _named(flag: str, value: Any) -> str:
    """How an error names a bad value: ``--shard '9/4'``, ``--degree 0``, ``--listen``."""
    if isinstance(value, tuple):
        return flag
    return f"{flag} {value!r}" if isinstance(value, str) else f"{flag} {value}"


def parse_host_port(text: str) -> tuple[str, int]:
    parsed = _host_port(text)
    if parsed is None:
        raise ConfigError(f"--status-addr {text!r}: {_HOST_PORT.reason}")
    return parsed


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, as a dict of known keys (checked by build_config)."""
    source = Path(path)
    try:
        return load_toml(source, NodeConfig)
    except SettingsFileError as error:
        raise ConfigError(f"--config {source}: {error}") from None


def build_config(file_settings: dict[str, Any], flag_settings: dict[str, Any]) -> NodeConfig:
    """Defaults, overridden by the file, overridden by flags that were given (not None).

    Each value must have its setting's declared type (``rounds = "5"`` and
    ``allow = 5`` are refused, with one line naming the key); an int is taken
    for a float.
    """
    merged = dict(file_settings)
    merged.update({k: v for k, v in flag_settings.items() if v is not None})
    typed, wrong = typed_settings(merged, NodeConfig)
    if wrong is not None:
        name, reason = wrong
        raise ConfigError(f"{name}: {reason}")
    return replace(NodeConfig(), **typed).validate()


if __name__ == "__main__":  # python -m p2pfl.config --reference docs/CONFIG.md
    from p2pfl.config_reference import main

    sys.exit(main())
