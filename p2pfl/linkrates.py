"""What each peer's link has shown it carries, so that a deadline fits the link.

A deadline for a large frame is a fixed part plus its size at a rate
(:func:`p2pfl.framing.frame_deadline`). ``--min-link-mbit`` is the rate an
operator promises; a link that turns out slower (measured in the lab: every
4.5 MB push timed out at 1 Mbit/s with the default 8) must not fail every
push for good. So each peer's rate starts at the promised one and follows
its frames, TCP-style:

* a frame that timed out halves the rate, so the next one gets twice the
  time, down to ``SLOWEST_FRACTION`` of the promise, which bounds how long a
  dead or trickling peer can hold a stream;
* a frame that completed moves the rate to half of what it achieved
  (headroom for the link's other streams), never above the promise, so a
  deadline is never shorter than the promise allows. Only a large frame
  (``MEASURE_MIN_BYTES``), whose time is mostly its transfer, may lower it,
  and by half at most, as a timeout would: one slow completion (a frame that
  waited on the peer's lock) cannot drop it to the floor. A small frame's
  time is mostly latency; it may only raise the rate.

The daemon keeps one instance per direction: our uplink and a peer's
uplink are different links.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# Frames of at least this size are timed mostly by their transfer, not the round trip.
MEASURE_MIN_BYTES = 256 * 1024
# Deadlines allow this share of the rate a frame achieved.
HEADROOM = 0.5
# A link is never assumed slower than this share of --min-link-mbit.
SLOWEST_FRACTION = 1 / 16
# Peers remembered (any member can make an entry); the oldest is dropped beyond it.
MAX_PEERS = 4096


@dataclass
class LinkRates:
    """Per peer, the rate in bytes per second its deadlines assume."""

    promised: float
    """``--min-link-mbit`` in bytes per second: the rate assumed until measured."""
    rates: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not self.promised > 0:
            raise ValueError("the promised link rate must be > 0 bytes per second")

    @property
    def slowest(self) -> float:
        return self.promised * SLOWEST_FRACTION

    def rate(self, peer: str) -> float:
        """The bytes per second a deadline for ``peer`` assumes now."""
        return self.rates.get(peer, self.promised)

    def completed(self, peer: str, size: int, seconds: float) -> None:
        """A frame of ``size`` bytes to or from ``peer`` took ``seconds``."""
        if seconds <= 0:
            return
        achieved, current = size / seconds * HEADROOM, self.rate(peer)
        if size >= MEASURE_MIN_BYTES:
            self._set(peer, max(achieved, current / 2))
        elif achieved > current:
            self._set(peer, achieved)

    def timed_out(self, peer: str) -> None:
        """A frame to or from ``peer`` missed its deadline: allow it twice the time."""
        self._set(peer, self.rate(peer) / 2)

    def _set(self, peer: str, rate: float) -> None:
        rate = min(max(rate, self.slowest), self.promised)
        if rate == self.promised:
            self.rates.pop(peer, None)
            return
        self.rates[peer] = rate
        self.rates.move_to_end(peer)
        while len(self.rates) > MAX_PEERS:
            self.rates.popitem(last=False)
