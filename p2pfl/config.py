"""The node's settings: one dataclass, filled from a TOML file and then from flags.

Every setting is both a flag (``--state-dir``) and a TOML key (``state_dir``);
flags override the file. Validation happens here, once, and each problem is a
``ConfigError`` whose message is one line naming the setting and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from fltasks.settings_file import SettingsFileError, read_toml_table, typed_value
from gossip.aggregation import AGGREGATORS, Aggregator, aggregator_by_name
from gossip.attacks import DAEMON_ATTACKS
from gossip.compression import resolve_codec
from gossip.keys import peer_id_from_public_key, public_key_from_peer_id
from gossip.node import DEFAULT_QUORUM
from p2pfl.deadlines import Deadlines


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line."""


LOG_FORMATS = ("text", "json")
DP_MODES = ("node", "sample")
RELAY_MODES = ("on", "off")


@dataclass(frozen=True)
class NodeConfig:
    key: str = "node.key"
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    task: str = "digits"
    # The column to predict, for --task csv:PATH.
    label: str | None = None
    # mlp:W,W, cnn or resnet18 in place of the task's default model (fltasks/models.py).
    model: str | None = None
    # The task spec file every member shares (fltasks/spec.py); its hash joins the fingerprint.
    task_spec: str | None = None
    # Where training runs: auto (CUDA when torch sees it, else the CPU), cpu, cuda or cuda:N.
    # Checked by fltasks.device.resolve_device when the task loads (it needs torch).
    device: str = "auto"
    shard: str = "0/1"
    partition: str = "iid"
    seed: int = 0
    state_dir: str = "p2pfl-state"
    status_addr: str = "127.0.0.1:0"
    allow: str | None = None
    # A network without a server (issue 22): its genesis file, and this node's
    # certificate (a founder needs none: the genesis is its certificate).
    network: str | None = None
    cert: str | None = None
    degree: int = 4
    rounds: int | None = None
    local_epochs: int = 1
    min_neighbours: int = 1
    # Rounds are paced by default: unpaced rounds take ~75 ms, so nodes started
    # 2 s apart ended 30 rounds apart and a clean run varied by 6 points.
    round_interval: float = 0.5
    # After its last round a node keeps gossiping, without training, this long,
    # so that members who started later are not left to train alone.
    linger: float = 30.0
    max_message_mb: float = 64.0
    send_timeout: float = 5.0
    # The slowest link (Mbit/s) a whole update must cross: every push and frame
    # deadline grows by the message's size at this rate, so large models are not
    # cut off by a fixed deadline (a 4.5 MB update never crossed 10 Mbit/s in 5 s).
    min_link_mbit: float = 8.0
    # A whole inbound frame must arrive within this many seconds (one deadline per frame).
    read_timeout: float = 10.0
    # Inbound bytes per peer and minute, on top of a burst of one largest message.
    peer_mb_per_min: float = 64.0
    # Chosen from measurements on real daemons (README, live network): clipped costs
    # nothing in clean runs and holds against the attacks that break mean.
    aggregator: str = "clipped"
    # How update tensors travel: raw float32, fp16/int8 for 2x/4x fewer bytes, or
    # topk:F, differences to a public copy (gossip/public_copy.py).
    compression: str = "raw"
    # Fraction of a neighbourhood a robust rule treats as suspect; None: the rule's
    # own default (trimmed-mean 0.2, clipped 0.45, see gossip/robust.py).
    trim_fraction: float | None = None
    # Distinct fresh neighbours a robust merge needs; below it, a bounded step.
    quorum: int = DEFAULT_QUORUM
    clip_radius: float | None = None
    # Differential privacy (SECURITY.md): "node" clips and noises each round's whole
    # update (gossip/privacy.py), "sample" runs DP-SGD with opacus (fltasks/dp_sgd.py).
    # Without --dp, giving --dp-clip and --dp-noise means "node", as it always has.
    # Under "sample" all three have defaults (fltasks/dp_defaults.py); the noise is
    # then chosen to spend --dp-target-epsilon in --rounds when both are given.
    dp: str | None = None
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_lr: float | None = None
    dp_delta: float = 1e-5
    # Stop training before epsilon would pass this; keep merging and serving.
    dp_target_epsilon: float | None = None
    log_format: str = "text"
    # Serve as a circuit relay (p2pfl/relay.py) for members behind NAT. Members reserve
    # slots only on relays that peers can dial back (p2pfl/reachability.py), so a
    # NATed node serving it costs nothing; "off" for a member that must not carry
    # others' traffic.
    relay: str = "on"
    # Experiments only: run as a Byzantine member with this attack (gossip/attacks.py).
    attack: str | None = None

    @property
    def shard_index(self) -> tuple[int, int]:
        index, count = self.shard.split("/")
        return int(index), int(count)

    @property
    def min_link_bytes_per_s(self) -> float:
        return self.min_link_mbit * 1e6 / 8

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
        """Check every setting; return self so calls chain."""
        try:
            index, count = self.shard_index
        except ValueError:
            raise ConfigError(f"--shard {self.shard!r}: expected I/N, e.g. 0/8") from None
        if not (count >= 1 and 0 <= index < count):
            raise ConfigError(f"--shard {self.shard!r}: need 0 <= I < N")
        if self.degree < 1:
            raise ConfigError(f"--degree {self.degree}: must be at least 1")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds}: must be >= 1 (omit it to run forever)")
        if self.local_epochs < 1:
            raise ConfigError(f"--local-epochs {self.local_epochs}: must be at least 1")
        if self.min_neighbours < 0:
            raise ConfigError(f"--min-neighbours {self.min_neighbours}: must be >= 0")
        if self.round_interval < 0 or self.send_timeout <= 0 or self.max_message_mb <= 0:
            raise ConfigError(
                "--round-interval must be >= 0; --send-timeout and --max-message-mb must be > 0"
            )
        if not (math.isfinite(self.min_link_mbit) and self.min_link_mbit > 0):
            raise ConfigError(f"--min-link-mbit {self.min_link_mbit}: must be a rate > 0")
        if not (math.isfinite(self.linger) and self.linger >= 0):
            raise ConfigError(f"--linger {self.linger}: must be seconds >= 0")
        if self.quorum < 1:
            raise ConfigError(f"--quorum {self.quorum}: must be at least 1 neighbour")
        if self.attack is not None and self.attack not in DAEMON_ATTACKS:
            choices = ", ".join(DAEMON_ATTACKS)
            raise ConfigError(f"--attack {self.attack!r}: choose one of {choices}")
        if not (math.isfinite(self.read_timeout) and self.read_timeout > 0):
            raise ConfigError(f"--read-timeout {self.read_timeout}: must be seconds > 0")
        if not (math.isfinite(self.peer_mb_per_min) and self.peer_mb_per_min > 0):
            raise ConfigError(f"--peer-mb-per-min {self.peer_mb_per_min}: must be > 0")
        self._validate_aggregation()
        self._validate_privacy()
        if resolve_codec(self.compression) is None:
            raise ConfigError(
                f"--compression {self.compression!r}: choose raw, fp16, int8 or topk:F "
                "with 0 < F <= 1 (e.g. topk:0.01)"
            )
        if self.relay not in RELAY_MODES:
            raise ConfigError(f"--relay {self.relay!r}: choose on or off")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format {self.log_format!r}: choose text or json")
        if not self.listen:
            raise ConfigError("--listen: give at least one multiaddr, e.g. /ip4/0.0.0.0/tcp/4001")
        parse_host_port(self.status_addr)
        if self.cert is not None and self.network is None:
            raise ConfigError("--cert: give the network's genesis with --network too")
        if self.network is not None and self.allow is not None:
            raise ConfigError("--network and --allow: choose one way to say who is a member")
        return self

    def _validate_aggregation(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(
                f"--aggregator {self.aggregator!r}: choose one of {', '.join(AGGREGATORS)}"
            )
        if self.trim_fraction is not None and not 0.0 < self.trim_fraction < 0.5:
            raise ConfigError(f"--trim-fraction {self.trim_fraction}: must be in (0, 0.5)")
        if self.clip_radius is not None:
            if self.aggregator != "clipped":
                raise ConfigError("--clip-radius: only used with --aggregator clipped; drop it")
            if not (math.isfinite(self.clip_radius) and self.clip_radius >= 0):
                raise ConfigError(f"--clip-radius {self.clip_radius}: must be a finite number >= 0")

    def _validate_privacy(self) -> None:
        if self.dp is not None and self.dp not in DP_MODES:
            raise ConfigError(f"--dp {self.dp!r}: choose node or sample")
        if self.dp == "node" and (self.dp_clip is None or self.dp_noise is None):
            raise ConfigError(f"--dp {self.dp}: needs --dp-clip C and --dp-noise SIGMA")
        if self.dp is None and (self.dp_clip is None) != (self.dp_noise is None):
            raise ConfigError("--dp-clip and --dp-noise: give both to turn DP on, or neither")
        if self.dp_lr is not None:
            if self.dp_mode != "sample":
                raise ConfigError("--dp-lr: the DP-SGD learning rate is only used with --dp sample")
            if not (math.isfinite(self.dp_lr) and self.dp_lr > 0):
                raise ConfigError(f"--dp-lr {self.dp_lr}: must be a finite number > 0")
        if self.dp_target_epsilon is not None:
            if not self.dp_enabled:
                raise ConfigError("--dp-target-epsilon: only used with DP on (--dp); drop it")
            if not (math.isfinite(self.dp_target_epsilon) and self.dp_target_epsilon > 0):
                raise ConfigError(
                    f"--dp-target-epsilon {self.dp_target_epsilon}: must be a finite number > 0"
                )
        for flag, value in (("--dp-clip", self.dp_clip), ("--dp-noise", self.dp_noise)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} {value}: must be a finite number > 0")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"--dp-delta {self.dp_delta}: must be in (0, 1), e.g. 1e-5")


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--status-addr {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


_LIST_KEYS = {"listen", "bootstrap"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, as a dict of known keys."""
    source = Path(path)
    try:
        raw = read_toml_table(source, {item.name for item in fields(NodeConfig)})
    except SettingsFileError as error:
        raise ConfigError(f"--config {source}: {error}") from None
    settings: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _LIST_KEYS:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"--config {source}: {name} must be a list of strings")
            value = tuple(value)
        settings[name] = value
    return settings


def build_config(file_settings: dict[str, Any], flag_settings: dict[str, Any]) -> NodeConfig:
    """Defaults, overridden by the file, overridden by flags that were given (not None).

    Each value must have its field's declared type (``rounds = "5"`` and
    ``allow = 5`` are refused, with one line naming the key); an int is taken
    for a float.
    """
    merged = dict(file_settings)
    merged.update({k: v for k, v in flag_settings.items() if v is not None})
    hints = get_type_hints(NodeConfig)
    typed: dict[str, Any] = {}
    for item in fields(NodeConfig):
        if item.name not in merged:
            continue
        value = merged[item.name]
        if item.name in _LIST_KEYS:
            typed[item.name] = tuple(value)
            continue
        try:
            typed[item.name] = typed_value(value, hints[item.name])
        except SettingsFileError as error:
            raise ConfigError(f"{item.name}: {error}") from None
    return replace(NodeConfig(), **typed).validate()


def load_allowlist(path: str | Path) -> frozenset[bytes]:
    """Peer ids, one per line (``#`` comments allowed), as ed25519 public keys.

    Keys, because gossip/'s admission is keyed by the signer's public key. The network
    layers (p2pfl.transport, p2pfl.gating, p2pfl.relay) take peer-id strings
    (p2pfl.gating.Members); the runtime converts this set to those once, with
    ``gossip.keys.peer_id_from_public_key``, right after loading it.
    """
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"--allow {source}: cannot read ({error.strerror})") from None
    keys = set()
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = public_key_from_peer_id(text)
        except ValueError:
            raise ConfigError(
                f"--allow {source}:{number}: {text!r} is not an ed25519 peer id (12D3KooW...)"
            ) from None
        assert peer_id_from_public_key(key) == text
        keys.add(key)
    return frozenset(keys)
