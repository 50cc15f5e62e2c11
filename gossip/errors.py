"""The one error type of the gossip core, and the closed set of rejection reasons."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why an incoming update was rejected; operators see these names in counters."""

    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_SENDER = "unknown-sender"
    NOT_NEIGHBOUR = "not-neighbour"
    SENDER_MISMATCH = "sender-mismatch"
    REPLAY = "replay"
    STALE = "stale"
    WRONG_MODEL = "wrong-model"
    WRONG_SHAPE = "wrong-shape"
    NON_FINITE = "non-finite"
    OVERSIZE = "oversize"
    MALFORMED = "malformed"
    UNKNOWN_CODEC = "unknown-codec"
    # A top-k difference to a public copy the receiver does not hold (it missed the
    # message before): admitted as authentic, but nothing to fold in.
    OUT_OF_STEP = "out-of-step"
    # The sender's key is revoked in the network's revocation log (gossip/membership.py).
    REVOKED = "revoked"


class InvalidUpdate(Exception):
    """An update that must not be used; ``reason`` says which rule it broke."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
