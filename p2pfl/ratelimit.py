"""Per-peer byte budgets: a token bucket for each remote peer, with the time passed in.

A peer may send ``rate`` bytes per second on average and up to ``burst`` bytes at
once (the transport sets the burst to one largest message, so that an honest peer
can always deliver one full update). Bytes are charged as they are read, so a
peer's budget is what it actually made us read; a bucket may go into debt (a
reply we served it, say), and then the peer's next streams are refused until
the debt is paid off by time. No I/O and no clock here: callers pass ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 1024 * 1024
DEFAULT_PEER_MB_PER_MIN = 64.0
# Buckets are dropped once full again (a full bucket is the same as a fresh one), and
# the table is capped so that many identities cannot grow it without bound.
DEFAULT_MAX_TRACKED_PEERS = 4096


@dataclass
class TokenBucket:
    """``tokens`` bytes available, refilled at ``rate`` per second up to ``burst``."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)

    @property
    def full(self) -> bool:
        return self.tokens >= self.burst


class PeerRateLimiter:
    """One :class:`TokenBucket` per peer id, created full on first sight."""

    def __init__(
        self,
        bytes_per_second: float,
        burst_bytes: float,
        *,
        max_tracked_peers: int = DEFAULT_MAX_TRACKED_PEERS,
    ) -> None:
        if not (math.isfinite(bytes_per_second) and bytes_per_second > 0):
            raise ValueError(f"the byte rate must be > 0, got {bytes_per_second}")
        if not (math.isfinite(burst_bytes) and burst_bytes >= 1):
            raise ValueError(f"the burst must be at least one byte, got {burst_bytes}")
        self.rate = float(bytes_per_second)
        self.burst = float(burst_bytes)
        self.max_tracked_peers = max_tracked_peers
        self._buckets: dict[str, TokenBucket] = {}

    def available(self, peer_id: str, now: float) -> float:
        """Bytes ``peer_id`` may still send right now (negative while in debt)."""
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            return self.burst
        bucket.refill(now)
        return bucket.tokens

    def allows(self, peer_id: str, nbytes: int, now: float) -> bool:
        """Whether ``nbytes`` more fit in the peer's budget (nothing is charged)."""
        return self.available(peer_id, now) >= nbytes

    def charge(self, peer_id: str, nbytes: int, now: float) -> None:
        """Take ``nbytes`` from the peer's budget, into debt if need be."""
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[peer_id] = TokenBucket(self.rate, self.burst, self.burst, now)
        bucket.refill(now)
        bucket.tokens -= nbytes

    def __len__(self) -> int:
        return len(self._buckets)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_tracked_peers:
            return
        for peer_id, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.full:
                del self._buckets[peer_id]
        if len(self._buckets) >= self.max_tracked_peers:
            # Every tracked peer is spending: forget the one with the most budget left,
            # which gains the least by being forgotten.
            richest = max(self._buckets, key=lambda p: self._buckets[p].tokens)
            del self._buckets[richest]


class LogThrottle:
    """At most one log line per key (say, peer and reason) per ``interval`` seconds.

    A hostile peer can make every message fail; without this each failure is a log
    line, and the logs grow as fast as it can send. Counters still count everything;
    the line that gets through says how many were held back since the last one.
    """

    def __init__(self, interval: float, *, max_keys: int = DEFAULT_MAX_TRACKED_PEERS) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"the interval must be > 0 seconds, got {interval}")
        self.interval = float(interval)
        self.max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}

    def admit(self, key: object, now: float) -> int | None:
        """None: hold this line back. Otherwise log it, noting the returned number of
        lines held back since the key's previous line."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self.max_keys:
            # Forget the key whose line is oldest: it is the first allowed again anyway.
            del self._last[min(self._last, key=lambda k: self._last[k][0])]
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0
