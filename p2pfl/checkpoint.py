"""Crash-safe node state: written atomically after every round, checked before it is trusted.

File layout: ``b"P2CK"``, 32-byte BLAKE3 digest of the body, then the body, a
msgpack map (never a pickle: a checkpoint may have been copied from anywhere).
Writes go to a temporary file (random name, created exclusively, never through a
symlink, mode 0600 in a 0700 directory) that is fsynced and renamed over the
current one after the current one is kept as ``.prev``. A torn or corrupt
current file is detected by its digest, and a decoded state is checked field by
field (finite positive weight, finite float64 estimate, bounded round, sequence
numbers and tables) before it is trusted; either way the previous one is tried
instead. A failed write (full disk, no file descriptors left) leaves both files
as they were.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgpack
import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"P2CK"
FORMAT = "p2pfl-checkpoint-v1"
FILE_NAME = "checkpoint.p2ck"
# Sanity bounds of a decoded state. An honest node adds 1 to its round and sequence
# per round, so it never gets near these; a sequence number at the codec's maximum
# would make peers refuse this node (or it refuse a peer) for good.
MAX_ROUND = 2**40
MAX_SEQ = 2**62
MAX_LAST_SEQ_ENTRIES = 65_536
MAX_SAVED_PEERS = 4_096
MAX_SAVED_ADDRS = 8
MAX_ADDR_CHARS = 256
SENDER_BYTES = 32


class CheckpointError(Exception):
    """A checkpoint file that cannot be trusted (torn, corrupt, or of another model)."""


@dataclass
class NodeState:
    """Everything a node needs to resume where it stopped."""

    round: int
    seq: int
    weight: float
    estimate: np.ndarray
    fingerprint: bytes
    last_seq: dict[bytes, int] = field(default_factory=dict)
    peers: dict[str, list[str]] = field(default_factory=dict)
    # The privacy budget spent so far (p2pfl/dp.py: accountant steps, DP-SGD history,
    # rounds trained without DP), so a restart never under-reports epsilon.
    privacy: dict[str, Any] = field(default_factory=dict)
    # The agreed (mean, std) the node standardises with (p2pfl/feature_stats.py): a
    # restart keeps its scaling instead of adding its shard to the agreement twice.
    statistics: tuple[np.ndarray, np.ndarray] | None = None
    # Quasi-global momentum's buffer, anchor and steps (fltasks/momentum.py), or empty.
    momentum: dict[str, Any] = field(default_factory=dict)


def encode_state(state: NodeState) -> bytes:
    return b"".join(_encoded_parts(state))


def _encoded_parts(state: NodeState) -> tuple[bytes, bytes, bytes]:
    """``MAGIC``, the body's digest and the body: written one after the other, so that a
    large model's checkpoint is never held twice (once packed, once joined)."""
    # Packed from a view of the estimate, not a bytes copy of it (89 MB at 11M parameters).
    estimate = memoryview(np.ascontiguousarray(state.estimate, dtype="<f8")).cast("B")
    body = msgpack.packb(
        {
            "format": FORMAT,
            "round": state.round,
            "seq": state.seq,
            "weight": float(state.weight),
            "estimate": estimate,
            "fingerprint": state.fingerprint,
            "last_seq": [[sender, seq] for sender, seq in state.last_seq.items()],
            "peers": state.peers,
            "privacy": state.privacy,
            "statistics": None if state.statistics is None else [
                _f8(array) for array in state.statistics],
            "momentum": {k: _f8(v) if isinstance(v, np.ndarray) else v
                         for k, v in state.momentum.items()},
        },
        use_bin_type=True,
    )
    return MAGIC, blake3.blake3(body).digest(), body


def decode_state(data: bytes, expected_length: int | None = None) -> NodeState:
    """Decode and check a checkpoint; CheckpointError (one line) if it cannot be trusted.

    ``expected_length`` is the number of parameters of the model it must hold.
    """
    if len(data) < 36 or data[:4] != MAGIC:
        raise CheckpointError("not a p2pfl checkpoint (bad magic or too short)")
    digest, body = data[4:36], data[36:]
    if blake3.blake3(body).digest() != digest:
        raise CheckpointError("checksum mismatch: the file is torn or corrupt")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as error:
        raise CheckpointError(f"unreadable checkpoint body ({type(error).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError("unknown checkpoint format")
    try:
        state = NodeState(
            round=_bounded_int(raw["round"], MAX_ROUND, "round"),
            seq=_bounded_int(raw["seq"], MAX_SEQ, "seq"),
            weight=_positive_weight(raw["weight"]),
            estimate=_estimate(raw["estimate"], expected_length),
            fingerprint=_bytes_of(raw["fingerprint"], SENDER_BYTES, "fingerprint"),
            last_seq=_last_seq(raw["last_seq"]),
            peers=_peers(raw["peers"]),
            privacy=_privacy(raw["privacy"] if "privacy" in raw else raw["optimizer"]),
            statistics=_statistics(raw.get("statistics")),
            momentum=_momentum(raw.get("momentum", {}), expected_length),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        detail = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"malformed checkpoint field ({detail:.80})") from None
    return state


def _bounded_int(value: Any, limit: int, name: str) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise CheckpointError(f"{name} must be an integer in [0, {limit}], got {value!r:.40}")
    return value


def _positive_weight(value: Any) -> float:
    if type(value) is not float or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"weight must be a finite float > 0, got {value!r:.40}")
    return value


def _bytes_of(value: Any, length: int, name: str) -> bytes:
    if type(value) is not bytes or len(value) != length:
        raise CheckpointError(f"{name} must be {length} bytes")
    return value


def _estimate(value: Any, expected_length: int | None) -> np.ndarray:
    if type(value) is not bytes or len(value) % 8:
        raise CheckpointError("estimate must be float64 bytes")
    estimate = np.frombuffer(value, dtype="<f8").copy()
    if expected_length is not None and len(estimate) != expected_length:
        raise CheckpointError(
            f"estimate holds {len(estimate)} values, the model has {expected_length}"
        )
    if not np.isfinite(estimate).all():
        raise CheckpointError("estimate holds NaN or infinite values")
    return estimate


def _last_seq(value: Any) -> dict[bytes, int]:
    if type(value) is not list or len(value) > MAX_LAST_SEQ_ENTRIES:
        raise CheckpointError(f"last_seq must be a list of at most {MAX_LAST_SEQ_ENTRIES} pairs")
    table = {}
    for pair in value:
        if type(pair) is not list or len(pair) != 2:
            raise CheckpointError("last_seq entries must be [sender, seq] pairs")
        sender = _bytes_of(pair[0], SENDER_BYTES, "a last_seq sender")
        table[sender] = _bounded_int(pair[1], MAX_SEQ, "a last_seq value")
    return table


def _peers(value: Any) -> dict[str, list[str]]:
    if type(value) is not dict or len(value) > MAX_SAVED_PEERS:
        raise CheckpointError(f"peers must be a map of at most {MAX_SAVED_PEERS} entries")
    peers = {}
    for peer_id, addrs in value.items():
        if (
            type(peer_id) is not str
            or type(addrs) is not list
            or len(addrs) > MAX_SAVED_ADDRS
            or not all(type(a) is str and len(a) <= MAX_ADDR_CHARS for a in addrs)
        ):
            raise CheckpointError("peers must map peer ids to at most 8 address strings")
        peers[peer_id] = list(addrs)
    return peers


def _privacy(value: Any) -> dict[str, Any]:
    # Checkpoints written before the rename call this map "optimizer"; it held the same.
    if type(value) is not dict or not all(type(key) is str for key in value):
        raise CheckpointError("privacy must be a map with string keys")
    return dict(value)


def _f8(array: np.ndarray | None) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype="<f8").tobytes()


def _finite_vector(value: Any, name: str, length: int | None = None) -> np.ndarray:
    if type(value) is not bytes or len(value) % 8:
        raise CheckpointError(f"{name} must be float64 bytes")
    vector = np.frombuffer(value, dtype="<f8").copy()
    if (length is not None and len(vector) != length) or not np.isfinite(vector).all():
        raise CheckpointError(f"{name} must be {length or 'some'} finite values")
    return vector


def _statistics(value: Any) -> tuple[np.ndarray, np.ndarray] | None:
    # Written before issue 25, a checkpoint has none: the node agrees again.
    if value is None:
        return None
    if type(value) is not list or len(value) != 2:
        raise CheckpointError("statistics must be [mean, std]")
    mean = _finite_vector(value[0], "statistics mean")
    std = _finite_vector(value[1], "statistics std", len(mean))
    return mean, std


MOMENTUM_KEYS = {"buffer", "anchor", "steps"}


def _momentum(value: Any, expected_length: int | None) -> dict[str, Any]:
    if value == {}:
        return {}
    if type(value) is not dict or set(value) != MOMENTUM_KEYS:
        raise CheckpointError("momentum must be a map of buffer, anchor and steps")
    buffer = _finite_vector(value["buffer"], "momentum buffer", expected_length)
    anchor = _finite_vector(value["anchor"], "momentum anchor", len(buffer))
    steps = value["steps"]
    if type(steps) is not float or not 1.0 <= steps <= MAX_ROUND:
        raise CheckpointError("momentum steps must be a float >= 1")
    return {"buffer": buffer, "anchor": anchor, "steps": steps}


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The current and previous checkpoint of one node in its state directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.current = self.directory / FILE_NAME
        self.previous = self.directory / (FILE_NAME + ".prev")
        self._lock_fd: int | None = None
        self.failures: Counter[str] = Counter()
        """Checkpoint writes that failed, by errno name (``try_save``)."""

    def lock(self) -> None:
        """Claim the directory for this process: two nodes writing one state would corrupt it.

        The lock is an ``flock`` on ``.lock``, released by the kernel when the
        process ends however it ends, so a crash never leaves it stale.
        """
        if self._lock_fd is not None:
            return
        self._make_private_directory()
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"state dir {self.directory} is in use by another node (pid {holder}); "
                "stop it or give this node its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def save(self, state: NodeState) -> None:
        """Write ``state`` atomically; OSError leaves the current and previous files intact."""
        self._make_private_directory()
        parts = _encoded_parts(state)
        # A random name opened O_EXCL|O_NOFOLLOW: nobody can pre-create it, or plant a
        # symlink there, to make us write somewhere else.
        temporary = self.directory / f"{FILE_NAME}.tmp-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(temporary, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                for part in parts:
                    handle.write(part)
                handle.flush()
                os.fsync(handle.fileno())
            if self.current.exists():
                os.replace(self.current, self.previous)
            os.replace(temporary, self.current)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)

    def try_save(self, state: NodeState) -> bool:
        """``save``, but an I/O error is logged in one line and counted, never raised.

        The node keeps running on its last good checkpoint and tries again next time
        (a full disk, ``EMFILE`` under a descriptor flood, a revoked permission).
        """
        try:
            self.save(state)
        except OSError as error:
            reason = errno.errorcode.get(error.errno or 0, "OSError")
            self.failures[reason] += 1
            logger.warning(
                "checkpoint not written (%s: %s); keeping %s, retrying next round",
                reason,
                error.strerror or error,
                self.current.name if self.current.exists() else "no checkpoint yet",
            )
            return False
        return True

    def _make_private_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = self.directory.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(self.directory, 0o700)

    def load(self, fingerprint: bytes, expected_length: int | None = None) -> NodeState | None:
        """The newest trustworthy state for this model, or None on a fresh start.

        ``expected_length``: the model's parameter count, checked when given.
        """
        problems = []
        candidates = [(self.current, self.previous), (self.previous, None)]
        for path, fallback in candidates:
            if not path.exists():
                continue
            try:
                state = decode_state(path.read_bytes(), expected_length)
            except (CheckpointError, OSError) as error:
                problems.append(f"{path.name}: {error}")
                then = f"trying {fallback.name}" if fallback is not None else "no older one"
                logger.warning("ignoring checkpoint %s: %s; %s", path, error, then)
                continue
            if state.fingerprint != fingerprint:
                raise CheckpointError(
                    f"{path} holds a different model (another --task?); "
                    "use a fresh --state-dir or the task it was made with"
                )
            return state
        if problems:
            raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
        return None
