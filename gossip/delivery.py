"""Receipts and the delivery ledger: push-sum weight that is never created by a timeout.

A push-sum share must be counted exactly once: by the receiver if it folded
the share in, or by the sender (a refund) if not. Without an answer from the
receiver, a sender cannot tell: a push that timed out may still have been
delivered and merged, and refunding it creates mass (measured in the lab:
receivers accepted 97 updates that senders counted 96 of). So every push is
answered with a :class:`Receipt`: the verdict, and the highest sequence the
receiver had accepted from this sender *before* this message.

The :class:`DeliveryLedger` keeps, per peer, the shares whose fate is not
known yet (the frame was written, no receipt came back). Pushes to one peer
go one at a time, in sequence order, and a receiver refuses any sequence not
above the last it accepted, so the next receipt from that peer settles them:

* a held share with ``seq > last_seq`` was not accepted: it is refunded;
* the one with ``seq == last_seq`` was accepted: it stays given;
* one with ``seq < last_seq`` cannot be told apart any more (a later one was
  accepted): it stays given, so weight may be lost but never created.

A push that failed before its frame was wholly written was certainly not
delivered and is refunded at once (:meth:`DeliveryLedger.not_sent`).

Receipts also tell a top-k sender which neighbour holds which public copy
(:meth:`gossip.public_copy.LinkCopies.settled`).

Sans-I/O: it is fed peer names, sequences and receipts, and returns what to
refund; the caller owns the network and the lock.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import msgpack

from gossip.admission import Verdict

ACCEPTED = "accepted"
# A receipt is a msgpack map of two short entries; anything longer is not one.
MAX_RECEIPT_BYTES = 128
# Shares held per peer while their fate is unknown. Older ones are given up as
# lost (weight lost, never created); each holds a model, so this bounds memory.
MAX_HELD_PER_PEER = 4


class InvalidReceipt(ValueError):
    """A receipt that does not parse; the push counts as unanswered."""


@dataclass(frozen=True)
class Receipt:
    """The receiver's answer to one pushed update."""

    verdict: str
    """``accepted``, or the rejection reason (``gossip.errors.Reason`` values)."""
    last_seq: int
    """The highest sequence the receiver had accepted from this sender before this message
    (0 if none)."""

    @property
    def accepted(self) -> bool:
        return self.verdict == ACCEPTED

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
    """What the ledger holds: a pushed message's sequence (and, for the caller, its mass)."""

    seq: int


S = TypeVar("S", bound=Share)


@dataclass
class DeliveryLedger(Generic[S]):
    """Per peer: the shares sent whose fate is unknown, and the last sequence it confirmed."""

    max_held_per_peer: int = MAX_HELD_PER_PEER
    held: dict[Hashable, deque[S]] = field(default_factory=dict)
    confirmed: dict[Hashable, int] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    """delivered, refused, refunded (refused or never sent), lost (given up or untellable)."""

    def not_sent(self, peer: Hashable, share: S) -> list[S]:
        """The push failed before its frame was wholly written: refund it."""
        self.confirmed.pop(peer, None)
        self.counts["refunded"] += 1
        return [share]

    def unanswered(self, peer: Hashable, share: S) -> None:
        """The frame went (maybe whole) but no receipt came: hold the share until the
        peer's next receipt tells."""
        self.confirmed.pop(peer, None)
        queue = self.held.setdefault(peer, deque())
        queue.append(share)
        while len(queue) > self.max_held_per_peer:
            queue.popleft()
            self.counts["lost"] += 1

    def answered(self, peer: Hashable, share: S, receipt: Receipt) -> list[S]:
        """Settle ``share`` and every held one by ``receipt``; returns the shares to refund."""
        refund: list[S] = []
        for held in self.held.pop(peer, ()):
            if held.seq > receipt.last_seq:
                refund.append(held)
                self.counts["refunded"] += 1
            elif held.seq == receipt.last_seq:
                self.counts["delivered"] += 1
            else:
                self.counts["lost"] += 1
        if receipt.accepted:
            self.confirmed[peer] = share.seq
            self.counts["delivered"] += 1
        else:
            self.confirmed.pop(peer, None)
            refund.append(share)
            self.counts["refused"] += 1
            self.counts["refunded"] += 1
        return refund

    def forget(self, peer: Hashable) -> None:
        """The peer is gone: what it holds is given up (lost, never refunded)."""
        self.counts["lost"] += len(self.held.pop(peer, ()))
        self.confirmed.pop(peer, None)

    def held_count(self) -> int:
        """How many shares are held, waiting for a receipt."""
        return sum(len(queue) for queue in self.held.values())
