"""What each peer's link has shown it carries, so that a deadline fits the link.

A deadline for a large frame is a fixed part plus its size at a rate
(:func:`p2pfl.framing.frame_deadline`). Rates are measured, not configured
(issue 24): with default flags a 10 Mbit/s link shared by three pushes
carries about 3.3 Mbit/s each, and the 8 Mbit/s that deadlines used to
assume until told otherwise cut every first 4.5 MB push (measured in the
lab). So each peer's rate starts at an assumption that is slow on purpose,
``--min-link-mbit`` if the operator gives one (an override), else
``UNMEASURED_MBIT``, and follows its frames, TCP-style:

* the first large frame (``MEASURE_MIN_BYTES``) that completes measures the
  link: the rate becomes ``HEADROOM`` (a quarter) of what it achieved, room for
  the link's other streams, above or below the assumption;
* a later large frame moves the rate to a quarter of what it achieved, lowering
  it by half at most, as a timeout would: one slow completion (a frame that
  waited on the peer's lock) cannot drop it to the floor; a small frame's
  time is mostly latency, so it may only raise the rate;
* a frame that timed out halves the rate, so the next one gets twice the
  time, down to ``SLOWEST_FRACTION`` of the assumption and never below
  ``FLOOR_MBIT``, which bounds how long a dead or trickling peer can hold a
  stream (a 4.5 MB frame: 6 minutes at most).

The daemon keeps one instance per direction: our uplink and a peer's
uplink are different links.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# Frames of at least this size are timed mostly by their transfer, not the round trip.
MEASURE_MIN_BYTES = 256 * 1024
# Deadlines allow this share of the rate a frame achieved: a frame measured while its
# stream had the uplink alone must still fit when a round's pushes to three neighbours
# share it (a third each) and jitter on top. At a half, 8 hosts at 1 Mbit/s cut 356
# of their frames in 480 s, and a cut frame wastes the link time it took.
HEADROOM = 0.25
# A link is never assumed slower than this share of its starting assumption.
SLOWEST_FRACTION = 1 / 16
# And never slower than this, in Mbit/s: a member that trickles its frames cannot drive
# its read rate to 1/16 of the slow unmeasured assumption (0.03 Mbit/s, 19 minutes
# per 4.5 MB frame). One push of three over a 1 Mbit/s uplink gets about 0.33.
FLOOR_MBIT = 0.1
# What a link not yet measured is assumed to carry, in Mbit/s, without --min-link-mbit:
# slow on purpose, so that the first large push (which measures the link) fits: a
# 4.5 MB model gets 72 s plus the fixed part, and one push of three on a 10 Mbit/s
# uplink takes about 11 s.
UNMEASURED_MBIT = 0.5
# Peers remembered (any member can make an entry); the oldest is dropped beyond it.
MAX_PEERS = 4096


@dataclass
class LinkRates:
    """Per peer, the rate in bytes per second its deadlines assume."""

    assumed: float
    """Bytes per second assumed until a link is measured (``--min-link-mbit``, or
    ``UNMEASURED_MBIT``)."""
    rates: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Measured links only."""

    def __post_init__(self) -> None:
        if not self.assumed > 0:
            raise ValueError("the assumed link rate must be > 0 bytes per second")

    @property
    def slowest(self) -> float:
        return max(self.assumed * SLOWEST_FRACTION, FLOOR_MBIT * 1e6 / 8)

    def rate(self, peer: str) -> float:
        """The bytes per second a deadline for ``peer`` assumes now."""
        return self.rates.get(peer, self.assumed)

    def measured(self, peer: str) -> bool:
        return peer in self.rates

    def completed(self, peer: str, size: int, seconds: float) -> None:
        """A frame of ``size`` bytes to or from ``peer`` took ``seconds``."""
        if seconds <= 0:
            return
        achieved, current = size / seconds * HEADROOM, self.rate(peer)
        if size >= MEASURE_MIN_BYTES:
            first = not self.measured(peer)
            self._set(peer, achieved if first else max(achieved, current / 2))
        elif achieved > current:
            self._set(peer, achieved)

    def timed_out(self, peer: str) -> None:
        """A frame to or from ``peer`` missed its deadline: allow it twice the time."""
        self._set(peer, self.rate(peer) / 2)

    def _set(self, peer: str, rate: float) -> None:
        self.rates[peer] = max(rate, self.slowest)
        self.rates.move_to_end(peer)
        while len(self.rates) > MAX_PEERS:
            self.rates.popitem(last=False)
