"""Crash-safe node state: written atomically after every round, checked before it is trusted.

File layout: ``b"P2CK"``, 32-byte BLAKE3 digest of the body, then the body, a
msgpack map (never a pickle: a checkpoint may have been copied from anywhere).
Writes go to a temporary file that is fsynced and renamed over the current
one after the current one is kept as ``.prev``; a torn or corrupt current file
is detected by its digest and the previous one is used instead.
"""

from __future__ import annotations

import fcntl
import logging
import os
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
    # Task.train runs plain SGD with no state between rounds; kept so that an
    # optimizer with state can be added without a format change.
    optimizer: dict[str, Any] = field(default_factory=dict)


def encode_state(state: NodeState) -> bytes:
    body = msgpack.packb(
        {
            "format": FORMAT,
            "round": state.round,
            "seq": state.seq,
            "weight": float(state.weight),
            "estimate": np.ascontiguousarray(state.estimate, dtype="<f8").tobytes(),
            "fingerprint": state.fingerprint,
            "last_seq": [[sender, seq] for sender, seq in state.last_seq.items()],
            "peers": state.peers,
            "optimizer": state.optimizer,
        },
        use_bin_type=True,
    )
    return MAGIC + blake3.blake3(body).digest() + body


def decode_state(data: bytes) -> NodeState:
    if len(data) < 36 or data[:4] != MAGIC:
        raise CheckpointError("not a p2pfl checkpoint (bad magic or too short)")
    digest, body = data[4:36], data[36:]
    if blake3.blake3(body).digest() != digest:
        raise CheckpointError("checksum mismatch: the file is torn or corrupt")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=False)
        if raw["format"] != FORMAT:
            raise CheckpointError(f"unknown checkpoint format {raw['format']!r}")
        return NodeState(
            round=int(raw["round"]),
            seq=int(raw["seq"]),
            weight=float(raw["weight"]),
            estimate=np.frombuffer(raw["estimate"], dtype="<f8").copy(),
            fingerprint=bytes(raw["fingerprint"]),
            last_seq={bytes(sender): int(seq) for sender, seq in raw["last_seq"]},
            peers={str(k): [str(a) for a in v] for k, v in raw["peers"].items()},
            optimizer=dict(raw["optimizer"]),
        )
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"unreadable checkpoint body ({type(error).__name__})") from None


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

    def lock(self) -> None:
        """Claim the directory for this process: two nodes writing one state would corrupt it.

        The lock is an ``flock`` on ``.lock``, released by the kernel when the
        process ends however it ends, so a crash never leaves it stale.
        """
        if self._lock_fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
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
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / (FILE_NAME + f".tmp-{os.getpid()}")
        with temporary.open("wb") as handle:
            handle.write(encode_state(state))
            handle.flush()
            os.fsync(handle.fileno())
        if self.current.exists():
            os.replace(self.current, self.previous)
        os.replace(temporary, self.current)
        _fsync_directory(self.directory)

    def load(self, fingerprint: bytes) -> NodeState | None:
        """The newest trustworthy state for this model, or None on a fresh start."""
        problems = []
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                state = decode_state(path.read_bytes())
            except (CheckpointError, OSError) as error:
                problems.append(f"{path.name}: {error}")
                logger.warning("ignoring checkpoint %s: %s", path, error)
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
