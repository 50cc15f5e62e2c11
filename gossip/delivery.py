"""Receipts and the delivery ledger: push-sum weight that no receiver can create.

A push-sum share must be counted exactly once: by the receiver if it folded
the share in, or by the sender (a refund) if not. The sender cannot check what
a receiver says it did with a message it was sent: a member that keeps every
update and answers each with a refusal would make its senders refund weight it
holds, creating mass at every push (measured on 5 daemons: total weight 2.5e7
times its start after 40 s, until honest pushes passed admission's weight cap).

So a push goes in two steps (``/p2pfl/update/1.2.0``, docs/PROTOCOL.md):

1. the sender writes the message's *offer* (its prefix and signed header), and
   the receiver answers with a :class:`Receipt`: ``ready``, or a refusal decided
   from the header alone (not a neighbour, replay, stale, wrong model, out of
   step, ...);
2. only after ``ready`` does the sender write the payloads, and the receiver
   answers with the final receipt.

The rule on the sender's side is then one a liar cannot bend:

* refused at the offer, or failed before the payloads' last byte was written:
  the receiver holds nothing of the share, which is refunded (a receiver drops
  a partial frame);
* once the payloads are wholly written, the share is given, whatever the
  receipt says (accepted, refused, or none at all). A refusal at this point
  (bad signature, values, a copy lost in between) is one an honest sender's
  message never earns from an honest receiver; it is counted as ``disputed``.

Weight may be lost (a refusal after the payloads, or a receiver that drops
the message after the last byte went out), never created: no receiver can
raise anyone's weight by what it answers.

Receipts also tell a top-k sender which neighbour holds which public copy
(:meth:`gossip.public_copy.LinkCopies.settled`).

Sans-I/O: it is fed peer names, shares and receipts, and returns what to
refund; the caller owns the network and the lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import msgpack

from gossip.admission import Verdict

ACCEPTED = "accepted"
# The answer to an offer that the receiver will take the payloads of.
READY = "ready"
# A receipt is a msgpack map of two short entries; anything longer is not one.
# The cap is on the frame's payload (the receipt's msgpack), not on its length prefix.
MAX_RECEIPT_BYTES = 128


class InvalidReceipt(ValueError):
    """A receipt that does not parse; the push counts as unanswered."""


@dataclass(frozen=True)
class Receipt:
    """The receiver's answer to an offer or to the payloads of one pushed update."""

    verdict: str
    """``ready`` (to an offer), ``accepted`` (to the payloads), or the rejection reason
    (``gossip.errors.Reason`` values)."""
    last_seq: int
    """The highest sequence the receiver had accepted from this sender before this message
    (0 if none). Informative: a sender never refunds on it."""

    @property
    def accepted(self) -> bool:
        return self.verdict == ACCEPTED

    @property
    def ready(self) -> bool:
        return self.verdict == READY

    @classmethod
    def of(cls, verdict: Verdict, last_seq: int | None) -> Receipt:
        name = ACCEPTED if verdict.accepted else verdict.reason.value  # type: ignore[union-attr]
        return cls(name, last_seq or 0)

    def encode(self) -> bytes:
        return msgpack.packb({"verdict": self.verdict, "last_seq": self.last_seq})

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        """Parse a receipt strictly; InvalidReceipt (one line) if it is not one."""
        if len(data) > MAX_RECEIPT_BYTES:
            raise InvalidReceipt(f"a receipt of {len(data)} bytes (at most {MAX_RECEIPT_BYTES})")
        try:
            body = msgpack.unpackb(
                data, raw=False, strict_map_key=True, ext_hook=_no_ext, max_str_len=64
            )
        except Exception as error:
            raise InvalidReceipt(f"not a msgpack receipt: {type(error).__name__}") from None
        if not isinstance(body, dict) or set(body) != {"verdict", "last_seq"}:
            raise InvalidReceipt("a receipt is a map of exactly 'verdict' and 'last_seq'")
        verdict, last_seq = body["verdict"], body["last_seq"]
        if not isinstance(verdict, str) or not verdict:
            raise InvalidReceipt("the receipt's verdict is not a name")
        if type(last_seq) is not int or not 0 <= last_seq < 2**63:
            raise InvalidReceipt("the receipt's last_seq is not an unsigned 63-bit integer")
        return cls(verdict, last_seq)


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError("ext types are not allowed")


class Share(Protocol):
    """What the ledger settles: a pushed message's sequence (and, for the caller, its mass)."""

    seq: int


S = TypeVar("S", bound=Share)


@dataclass
class DeliveryLedger(Generic[S]):
    """What became of each push, and the shares to refund; per-peer dispute counts."""

    counts: Counter[str] = field(default_factory=Counter)
    """delivered; refunded (refused at the offer, or never wholly sent); disputed (refused
    after the payloads: given, not refunded); unanswered (no final receipt: given)."""
    disputes: Counter[Hashable] = field(default_factory=Counter)
    """Per peer: refusals after the payloads, which an honest receiver gives an honest
    sender only when something broke in between."""

    def refused_at_offer(self, peer: Hashable, share: S, receipt: Receipt) -> list[S]:
        """The receiver refused the offer: it got no payload byte, so refund the share."""
        self.counts["refunded"] += 1
        return [share]

    def not_sent(self, peer: Hashable, share: S) -> list[S]:
        """The push failed before its payloads were wholly written: refund it."""
        self.counts["refunded"] += 1
        return [share]

    def answered(self, peer: Hashable, share: S, receipt: Receipt) -> list[S]:
        """The payloads went out whole and ``receipt`` came back: the share is given
        whatever it says (returns no share to refund; see the module's rule)."""
        if receipt.accepted:
            self.counts["delivered"] += 1
        else:
            self.counts["disputed"] += 1
            self.disputes[peer] += 1
        return []

    def unanswered(self, peer: Hashable, share: S) -> None:
        """The payloads went (maybe whole) but no receipt came: the share is given."""
        self.counts["unanswered"] += 1
