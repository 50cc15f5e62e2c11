"""Admission: the verdict on each incoming update, and the counters operators read.

A state machine fed with bytes and the caller's clock. Checks run cheapest
first so that junk costs little: the size cap, the header schema, the
allowlist, the current neighbours, the signature (before any tensor is decoded), replay, staleness,
the model fingerprint, the decoded tensors' layout (against that
fingerprint), then the values. A rejected update is never returned, so it
cannot touch a model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

import numpy as np

from gossip import codec
from gossip.compression import resolve_codec
from gossip.errors import InvalidUpdate, Reason
from gossip.layout import ALLOWED_DTYPES, TensorSpec, model_fingerprint
from gossip.pushsum import MAX_WEIGHT
from gossip.update import Update


@dataclass(frozen=True)
class Accepted:
    update: Update
    # The sender's last accepted sequence before this one, for :meth:`Admission.withdraw`.
    previous_seq: int | None = None

    @property
    def accepted(self) -> bool:
        return True


@dataclass(frozen=True)
class Rejected:
    reason: Reason
    detail: str

    @property
    def accepted(self) -> bool:
        return False


Verdict = Accepted | Rejected


@dataclass(frozen=True)
class AdmissionPolicy:
    """What this node accepts. ``allowlist`` None means any sender with a valid signature."""

    fingerprint: bytes
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    max_age_s: float = 600.0
    max_clock_skew_s: float = 60.0
    # Who is a member (public keys). Any Container: the daemon passes a live view that
    # changes as members join or are revoked (p2pfl/member_source.py).
    allowlist: Container[bytes] | None = None
    # Revoked keys: refused as ``revoked`` before the allowlist is consulted.
    revoked: Container[bytes] | None = None
    # The largest share taken (gossip.pushsum.MAX_WEIGHT: a node's own weight never
    # exceeds it, so no honest share is refused here).
    max_weight: float = MAX_WEIGHT
    # The shared task spec's hash that ``fingerprint`` includes (gossip.layout), or b"".
    task_spec_hash: bytes = b""


def all_finite(tensors: Iterable[np.ndarray]) -> bool:
    """True when no value is NaN or infinite; one cheap reduction per tensor in the usual case."""
    for array in tensors:
        if array.dtype.kind != "f" or array.size == 0:
            continue
        # A finite sum proves every term finite (NaN and inf propagate). Only a
        # sum that overflowed needs the exact, allocating check. A peer can send
        # such values on purpose, so the overflow is expected, not a warning.
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.sum(array, dtype=np.float64))
        if not math.isfinite(total) and not np.isfinite(array).all():
            return False
    return True


# Said on every wrong-model verdict: the fingerprint alone cannot tell which differs.
WRONG_MODEL_DETAIL = "the model fingerprint differs from ours: another model or task spec file"


def check_declared_layout(
    signed: codec.SignedHeader, fingerprint: bytes, task_spec_hash: bytes = b""
) -> None:
    """Raise unless the header's tensor entries are the model ``fingerprint`` names.

    Runs before any payload is decoded, so a signed header that declares a
    tensor of absurd size (a top-k payload "of" 10^13 values, say) is refused
    before anything is allocated for it. ``task_spec_hash`` is our own shared
    task spec's, which the fingerprint includes but no tensor entry carries.
    """
    specs = (
        TensorSpec(entry["name"], entry["dtype"], tuple(entry["shape"]))
        for entry in signed.header["tensors"]
    )
    if model_fingerprint(specs, task_spec_hash) != fingerprint:
        raise InvalidUpdate(
            Reason.WRONG_SHAPE, "the tensors' names, dtypes or shapes differ from the model's"
        )


def check_layout(update: Update, fingerprint: bytes, task_spec_hash: bytes = b"") -> None:
    """Raise unless the decoded tensors really are the model ``fingerprint`` names.

    The header's fingerprint is only a claim: a signed message may declare
    ours and still carry tensors of other names or shapes, which would crash
    or silently misalign a merge. This checks what was decoded, with our own
    ``task_spec_hash``, which the fingerprint includes but no tensor carries.
    """
    try:
        decoded = model_fingerprint(update.layout.specs, task_spec_hash)
    except ValueError as error:
        raise InvalidUpdate(Reason.MALFORMED, str(error)) from None
    if decoded != fingerprint:
        raise InvalidUpdate(
            Reason.WRONG_SHAPE, "the tensors' names, dtypes or shapes differ from the model's"
        )


@dataclass
class Admission:
    """Verdicts, per-sender replay state and per-reason counters for one node."""

    policy: AdmissionPolicy
    last_seq: dict[bytes, int] = field(default_factory=dict)
    rejected: Counter[Reason] = field(default_factory=Counter)
    accepted: int = 0
    # Who may push to us right now (our gossip neighbours); None: any sender.
    # Unlike the allowlist it changes as the overlay does, so it is not policy.
    neighbours: frozenset[bytes] | None = None

    def admit(
        self, data: bytes | bytearray | memoryview, now: float, remote_key: bytes | None = None
    ) -> Verdict:
        """Judge one message. ``remote_key``: the connection's peer key, if it came directly."""
        try:
            signed = codec.parse(data, self.policy.max_message_bytes)
            self._check_sender(signed, remote_key)
            codec.check_signature(signed)
            self._check_header(signed, now)
            update = codec.decode_tensors(signed)
            check_layout(update, self.policy.fingerprint, self.policy.task_spec_hash)
        except InvalidUpdate as error:
            return self._reject(error)
        return self._judge_values(update)

    def screen(
        self, offer: bytes | bytearray | memoryview, now: float, remote_key: bytes | None = None
    ) -> codec.SignedHeader | Rejected:
        """Judge a message by its offer (prefix and header) before any payload byte is
        sent: every check of :meth:`admit` that the header decides. The signature, the
        tensors and the values are judged once the payloads come (:meth:`admit`).

        A refusal here is the one a sender may take its share back on: it never sent
        what it would give (docs/PROTOCOL.md §4)."""
        try:
            signed = codec.parse_offer(offer, self.policy.max_message_bytes)
            self._check_sender(signed, remote_key)
            self._check_header(signed, now)
        except InvalidUpdate as error:
            return self._reject(error)
        return signed

    def _check_sender(self, signed: codec.SignedHeader, remote_key: bytes | None) -> None:
        if self.policy.revoked is not None and signed.sender in self.policy.revoked:
            raise InvalidUpdate(Reason.REVOKED, "the sender's key is revoked")
        allowlist = self.policy.allowlist
        if allowlist is not None and signed.sender not in allowlist:
            raise InvalidUpdate(Reason.UNKNOWN_SENDER, "the sender is not in the allowlist")
        if self.neighbours is not None and signed.sender not in self.neighbours:
            raise InvalidUpdate(Reason.NOT_NEIGHBOUR, "the sender is not one of our neighbours")
        if remote_key is not None and signed.sender != remote_key:
            raise InvalidUpdate(Reason.SENDER_MISMATCH, "signed by a key other than the peer's")

    def _check_header(self, signed: codec.SignedHeader, now: float) -> None:
        """The checks after the signature that need nothing but the header."""
        if signed.header["weight"] > self.policy.max_weight:
            raise InvalidUpdate(Reason.MALFORMED, "weight above the policy's cap")
        self._check_replay(signed.sender, signed.seq)
        self._check_fresh(signed.header["created_at"], now)
        if signed.header["fingerprint"] != self.policy.fingerprint:
            raise InvalidUpdate(Reason.WRONG_MODEL, WRONG_MODEL_DETAIL)
        check_declared_layout(signed, self.policy.fingerprint, self.policy.task_spec_hash)
        codec_id = signed.header["codec"]
        tensor_codec = resolve_codec(codec_id)
        if tensor_codec is None:
            raise InvalidUpdate(Reason.UNKNOWN_CODEC, f"codec {codec_id!r} is not known here")
        for entry in signed.header["tensors"]:
            # A declared size is a claim the offer's reader would act on (it reads and
            # buffers that many bytes): it must be what the codec makes of the shape.
            count = math.prod(entry["shape"])
            expected = tensor_codec.size_for(count, ALLOWED_DTYPES[entry["dtype"]])
            if entry["size"] != expected:
                raise InvalidUpdate(
                    Reason.MALFORMED,
                    f"tensor {entry['name']!r} declares {entry['size']} payload bytes; "
                    f"its shape takes {expected} in {codec_id}",
                )

    def _judge_values(self, update: Update) -> Verdict:
        if not all_finite(update.tensors.values()):
            return self._reject(InvalidUpdate(Reason.NON_FINITE, "a tensor holds NaN or inf"))
        previous = self.last_seq.get(update.sender)
        self.last_seq[update.sender] = update.seq
        self.accepted += 1
        return Accepted(update, previous)

    def withdraw(self, verdict: Accepted, error: InvalidUpdate) -> Rejected:
        """Refuse an admitted update after all (what it carries cannot be used), as if it
        had never been accepted: its sequence is not recorded, so the sender's next
        receipt does not count it as delivered (docs/PROTOCOL.md §4)."""
        sender = verdict.update.sender
        if verdict.previous_seq is None:
            self.last_seq.pop(sender, None)
        else:
            self.last_seq[sender] = verdict.previous_seq
        self.accepted -= 1
        return self._reject(error)

    def _check_replay(self, sender: bytes, seq: int) -> None:
        last = self.last_seq.get(sender)
        if last is not None and seq <= last:
            raise InvalidUpdate(Reason.REPLAY, f"sequence {seq} is not above {last}")

    def _check_fresh(self, created_at: float, now: float) -> None:
        age = now - created_at
        if age > self.policy.max_age_s:
            raise InvalidUpdate(Reason.STALE, f"created {age:.0f} s ago")
        if -age > self.policy.max_clock_skew_s:
            raise InvalidUpdate(Reason.STALE, f"created {-age:.0f} s in the future")

    def _reject(self, error: InvalidUpdate) -> Rejected:
        self.rejected[error.reason] += 1
        return Rejected(error.reason, error.detail)
