"""The node's network decisions, sans-I/O: events and ``now`` in, actions out.

Like :mod:`gossip` (and h11), this holds no socket, no trio and no clock. The
daemon (:mod:`p2pfl.pusher`, :mod:`p2pfl.membership`) tells it what happened
to a push or a dial, with the time, and carries out what it answers:
:class:`Push`, :class:`Refund`, :class:`Settle`, :class:`Disconnect`,
:class:`Forget`, :class:`MarkUnreachable`, :class:`Redial`, :class:`Dropped`. Tests feed the same
events with an explicit ``now`` and check every decision in virtual time.

It owns, so that each decision is made in one place:

* the member book's reachability bookkeeping: a failed dial makes a peer
  unreachable, and a peer gone long enough is forgotten
  (:meth:`p2pfl.peer_exchange.PeerBook.mark_failed`); forgetting also drops
  everything else kept per peer (link rates, failures in a row), here and
  nowhere else;
* the delivery ledger (:mod:`gossip.delivery`): a share is refunded only when
  the offer was refused or its payloads never wholly left; once they did, it
  is given whatever the receipt says;
* the link rates (:mod:`p2pfl.linkrates`) that push and read deadlines assume;
* the pushes in flight: at most one per peer, and the weight each carries, so
  that ``weight + weight_pending + weight_in_flight`` holds at every moment;
* when a link that keeps failing is closed so that the next push redials it;
* silent peers (:mod:`p2pfl.silence`): after one unanswered push, weight-0
  probes instead of shares, and no longer a neighbour after unanswered probes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from gossip.delivery import DeliveryLedger, InvalidReceipt, Receipt
from p2pfl.linkrates import MAX_PEERS, LinkRates
from p2pfl.peer_exchange import PeerBook
from p2pfl.silence import SilentPeers

# Pushes to one peer that fail in a row before its connection is closed and redialled.
# Not at the first failure: closing also cuts the peer's pushes to us on that
# connection, and on a congested link one slow stream made every push fail in turn
# (measured in the lab).
FAILURES_BEFORE_REDIAL = 2


class MemberBook(PeerBook):
    """A peer book that records members of the allowlist only (None: everyone)."""

    def __init__(self, own_peer_id: str, members: frozenset[str] | None, **options: Any) -> None:
        super().__init__(own_peer_id, **options)
        self.members = members

    def add(self, peer_id: str, addrs: Iterable[str], **how: Any) -> bool:
        if self.members is not None and peer_id not in self.members:
            self.rejected["not-member"] += 1
            return False
        return super().add(peer_id, addrs, **how)


class Share(Protocol):
    """What a push carries, as the policy sees it: a sequence and a weight."""

    @property
    def seq(self) -> int: ...

    @property
    def weight(self) -> float: ...


S = TypeVar("S", bound=Share)


# -- actions: what the driver carries out ---------------------------------------------------


@dataclass(frozen=True)
class Push(Generic[S]):
    """Send ``share`` to ``peer`` (offer, then payloads; report the outcome back)."""

    peer: str
    share: S


@dataclass(frozen=True)
class Refund(Generic[S]):
    """``peer`` holds nothing of ``share``: fold it back (and tell top-k its copy is unchanged)."""

    peer: str
    share: S


@dataclass(frozen=True)
class Settle(Generic[S]):
    """``share``'s payloads left whole; ``receipt`` (None: unanswered) says what ``peer``
    did with it. The share is given: only top-k's link copy learns from this."""

    peer: str
    share: S
    receipt: Receipt | None


@dataclass(frozen=True)
class Disconnect:
    """Close the connection to ``peer`` so that the next push redials it."""

    peer: str


@dataclass(frozen=True)
class MarkUnreachable:
    """``peer`` could not be dialled: it is skipped until a redial reaches it."""

    peer: str


@dataclass(frozen=True)
class Forget:
    """``peer`` was undialable for long: dropped from the book and every per-peer table."""

    peer: str


@dataclass(frozen=True)
class Redial:
    """Dial ``peer`` (known, unreachable) and report the outcome: how a healed cut is seen."""

    peer: str


@dataclass(frozen=True)
class Dropped:
    """``peer`` stayed silent to probes: no longer a neighbour (p2pfl/silence.py)."""

    peer: str


Action = (
    Push[Any] | Refund[Any] | Settle[Any] | Disconnect | MarkUnreachable | Forget | Redial
    | Dropped
)


@dataclass
class PeerPolicy(Generic[S]):
    """Who can take a push, what became of each one, and whom to redial or forget."""

    book: PeerBook
    push_rates: LinkRates
    """Our uplink to each peer, as its pushes showed it (push deadlines)."""
    read_rates: LinkRates
    """Each peer's uplink to us (read deadlines; the transport reports frames to it)."""
    deliveries: DeliveryLedger[Any] = field(default_factory=DeliveryLedger)
    updates_sent: int = 0
    """Pushes whose receiver accepted them."""
    whole_copies_sent: int = 0
    """Top-k pushes that carried the link's whole copy afresh (the peer was not in step)."""
    send_failures: Counter[str] = field(default_factory=Counter)
    pushes_refused: Counter[str] = field(default_factory=Counter)
    """By receipt verdict: refused at the offer (refunded) or after the payloads (given)."""
    failures_in_a_row: Counter[str] = field(default_factory=Counter)
    """Failed pushes per peer since its last answered one (see FAILURES_BEFORE_REDIAL)."""
    in_flight: dict[str, float] = field(default_factory=dict)
    """Peers with a push in flight, and the weight it carries."""
    silence: SilentPeers = field(default_factory=SilentPeers)
    """Peers that took a share without accepting it: probed with weight 0 (silence.py)."""
    accepted_seq: dict[str, int] = field(default_factory=dict)
    """Per peer, the highest ``seq`` of ours it accepted: whether it has our final model."""

    @classmethod
    def create(cls, book: PeerBook, assumed_bytes_per_s: float) -> PeerPolicy[S]:
        """Link rates start at ``assumed_bytes_per_s`` until measured (p2pfl/linkrates.py)."""
        return cls(book, LinkRates(assumed_bytes_per_s), LinkRates(assumed_bytes_per_s))

    # -- who can take a push ---------------------------------------------------------------

    def free(self, peers: Iterable[str]) -> list[str]:
        """``peers`` that can take a push now: reachable, with no push in flight.

        A neighbour whose link is still busy skips a round: a whole model supersedes
        the last, and a top-k link's residual (gossip/public_copy.py) carries what
        the skipped difference would have to its next one.
        """
        return [p for p in peers if self.book.reachable(p) and p not in self.in_flight]

    def linkable(self, peer: str) -> bool:
        """May ``peer`` be one of our neighbours now: reachable, and not dropped for
        silence (a spare stands in for either)."""
        return self.book.reachable(peer) and not self.silence.is_dropped(peer)

    def silent(self, peers: Iterable[str]) -> list[str]:
        """Of ``peers``, those that get a weight-0 probe instead of a share."""
        return [p for p in peers if self.silence.is_silent(p)]

    def have_seq(self, peers: Iterable[str], seq: int) -> bool:
        """Has each of ``peers`` accepted a message of ours numbered ``seq`` or later?"""
        return all(self.accepted_seq.get(p, 0) >= seq for p in peers)

    def start_pushes(self, share: S, peers: Iterable[str]) -> list[Push[S]]:
        """The weight of ``share`` was split off for each of ``peers``: from now on it is
        in flight. Call it as the weight is split, before anything else runs, so that no
        poll of the mass count sees it nowhere. A peer already being pushed to is skipped
        (only an --attack member's second loop gets there)."""
        pushes = []
        for peer in peers:
            if peer in self.in_flight:
                continue
            self.in_flight[peer] = share.weight
            pushes.append(Push(peer, share))
        return pushes

    def addressed(self, peer: str, share: S, whole_copy: bool) -> None:
        """The share as addressed to ``peer`` (top-k: its link's difference, or its
        whole copy afresh when the peer was not in step)."""
        self.whole_copies_sent += whole_copy

    def push_ended(self, peer: str) -> None:
        """The push to ``peer`` is over and its outcome carried out (refund included):
        its weight is no longer in flight."""
        self.in_flight.pop(peer, None)

    @property
    def weight_in_flight(self) -> float:
        return sum(self.in_flight.values())

    # -- what became of a push -------------------------------------------------------------

    def dial_failed(self, peer: str, now: float, share: S | None = None) -> list[Action]:
        """``peer`` could not be dialled (by a push carrying ``share``, a redial or peer
        exchange): not delivered for sure; unreachable until a redial reaches it, and
        forgotten once gone a long while. Being slow forgets nobody."""
        actions: list[Action] = []
        if share is not None:
            actions += self._refunds(peer, self.deliveries.not_sent(peer, share))
            self.send_failures[peer] += 1
        actions.append(self._failed_dial(peer, now))
        return actions

    def offer_refused(self, peer: str, share: S, receipt: Receipt, now: float) -> list[Action]:
        """The receiver refused the offer: it holds nothing of the share (refund)."""
        self._answered(peer, now)  # alive, but not un-silenced: a refusal costs it nothing
        self.pushes_refused[receipt.verdict] += 1
        return self._refunds(peer, self.deliveries.refused_at_offer(peer, share, receipt))

    def send_failed(self, peer: str, share: S, now: float, timed_out: bool) -> list[Action]:
        """The push failed before its payloads were wholly written: refund it."""
        refunds = self._refunds(peer, self.deliveries.not_sent(peer, share))
        return [*refunds, *self._push_failed(peer, timed_out)]

    def answered(
        self, peer: str, share: S, reply: bytes, size: int, seconds: float, now: float
    ) -> list[Action]:
        """The payloads (``size`` bytes with the offer) went out whole in ``seconds`` and
        ``reply`` came back: the share is given, whatever the receipt says."""
        self.push_rates.completed(peer, size, seconds)
        try:
            receipt = Receipt.decode(reply)
        except InvalidReceipt:
            return self.unanswered(peer, share, now, timed_out=False)
        self._answered(peer, now)
        self.deliveries.answered(peer, share, receipt)
        if receipt.accepted:
            self.updates_sent += 1
            self.accepted_seq[peer] = max(self.accepted_seq.pop(peer, 0), share.seq)
            if len(self.accepted_seq) > MAX_PEERS:  # the longest unheard-from goes
                del self.accepted_seq[next(iter(self.accepted_seq))]
            self.silence.accepted(peer, share.weight)
            return [Settle(peer, share, receipt)]
        # Refused after the payloads: the share is given and not accepted (silence.py).
        self.pushes_refused[receipt.verdict] += 1
        actions: list[Action] = [Settle(peer, share, receipt)]
        if self.silence.not_accepted(peer, share.weight):
            actions.append(Dropped(peer))
        return actions

    def unanswered(self, peer: str, share: S, now: float, timed_out: bool) -> list[Action]:
        """The payloads went out whole but no receipt came: the share is given, and the
        peer is silent (p2pfl/silence.py): probes only, dropped if it stays silent."""
        self.deliveries.unanswered(peer, share)
        actions: list[Action] = [Settle(peer, share, None), *self._push_failed(peer, timed_out)]
        if self.silence.not_accepted(peer, share.weight):
            actions.append(Dropped(peer))
        return actions

    # -- reachability ------------------------------------------------------------------------

    def heard_from(self, peer: str, now: float) -> None:
        """``peer`` itself answered (a dial, a receipt, an accepted update): reachable,
        and a neighbour again if it was dropped for silence (still probed)."""
        self.book.mark_alive(peer, now)
        self.silence.spoke(peer)

    def redials(self) -> list[Redial]:
        """Every known peer whose last dial failed: redial them all (the transport's
        per-address budget keeps this cheap while one stays away)."""
        return [Redial(p) for p in self.book.known() if not self.book.reachable(p)]

    def unreachable_count(self) -> int:
        return sum(not self.book.reachable(p) for p in self.book.known())

    # -- inside ------------------------------------------------------------------------------

    def _refunds(self, peer: str, shares: list[S]) -> list[Action]:
        return [Refund(peer, share) for share in shares]

    def _answered(self, peer: str, now: float) -> None:
        self.book.mark_alive(peer, now)
        self.failures_in_a_row.pop(peer, None)

    def _failed_dial(self, peer: str, now: float) -> Action:
        if self.book.mark_failed(peer, now):
            self._forget(peer)
            return Forget(peer)
        return MarkUnreachable(peer)

    def _forget(self, peer: str) -> None:
        """The one place a forgotten peer's state goes (the book already dropped it)."""
        self.failures_in_a_row.pop(peer, None)
        self.silence.forget(peer)
        self.accepted_seq.pop(peer, None)
        self.push_rates.rates.pop(peer, None)
        self.read_rates.rates.pop(peer, None)

    def _push_failed(self, peer: str, timed_out: bool) -> list[Action]:
        self.send_failures[peer] += 1
        self.failures_in_a_row[peer] += 1
        if timed_out:
            self.push_rates.timed_out(peer)  # slow, not gone: the next push gets longer
        # After a network heals, TCP connections sit ESTABLISHED in retransmission
        # backoff for minutes and every new stream queues behind them: close the
        # connection so the next push redials.
        if self.failures_in_a_row[peer] >= FAILURES_BEFORE_REDIAL:
            self.failures_in_a_row.pop(peer, None)
            return [Disconnect(peer)]
        return []
