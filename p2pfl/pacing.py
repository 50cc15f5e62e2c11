"""When a round may go on: rounds follow the network, within a bound (sans-I/O).

Unpaced rounds outran gossip: a round of 5 local epochs on digits took 0.2 to
0.36 s on 8 loaded daemons, and a neighbour whose push was still in flight
was skipped, so node 0 admitted an update in 33 of its 92 rounds and under
label skew each unmixed round drifted toward its own classes (92 rounds to
0.93, against 7 in the synchronous simulator). On a 10 Mbit/s link a 4.5 MB
push takes 3.6 s while a round takes 2 s, and nodes finished their rounds
having merged almost nothing. Two rules, both with the shape of asynchronous
SGP's bounded staleness and of hivemind's averaging, which waits for its
group but not for ever:

* **Mix what the neighbourhood sent.** Before merging, a round waits until
  every *live* in-neighbour (one whose share we admitted within the last
  ``live_rounds`` of our rounds) has delivered a share since our last merge.
  It waits for each no longer than ``WAIT_FACTOR`` times that sender's own
  interval between shares after its last one (a sender on a slow link has a
  long interval, so we wait longer for it: the round follows the link), and
  never longer than ``max_wait`` after the last merge, nor than
  ``OWN_FACTOR`` times this node's own round without waiting (its work, and
  how long its own pushes take: on a slow link those are long, so the wait
  may be too). One member that pushes slowly on purpose, or sits behind a
  much slower link than ours, therefore holds our rounds to a few of our own,
  not to its pace; its update is merged whenever it comes. (Bounding by the
  senders' intervals instead fed back: a node that waits has longer rounds, so
  its neighbours' bound grew, and one slow member set the whole network's
  pace.) A neighbour that died
  is waited for at most ``live_rounds`` times, then it is no longer live.
  Because every node pushes at the end of its round before it waits again, a
  node waits only for shares its neighbours sent in their previous round:
  there is no cycle to deadlock on. With nobody live yet (its neighbours are
  still starting) a node that shared last round, and had a push answered,
  waits within the same bounds for the first share from anyone: a member that
  started first otherwise trained its first rounds alone.
* **Training is never more than one round ahead of what it pushed** (a
  staleness bound of one round): a round does not train while none of the
  previous round's pushes has ended. Each push has its own deadline
  (p2pfl/deadlines.py), so this wait is bounded too.

A node with idle, fast links waits for nothing and runs at full speed; a lone
node (nobody live) never waits. ``--mix-wait 0`` turns both rules off.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gossip.votes import DEFAULT_MAX_AGE_ROUNDS

# How long past a sender's own interval we wait for its next share: 2x absorbs
# jitter (a round that checkpointed, a push that waited on the receiver's lock).
WAIT_FACTOR = 2.0
# A sender heard once has no interval yet: wait this long for its second share.
FIRST_INTERVAL_S = 1.0
# No round waits longer than this many times our own round without its waits.
OWN_FACTOR = 4.0
# Weight of the newest interval in a sender's running average.
INTERVAL_SMOOTHING = 0.3
# What :meth:`MixingPace.awaited` names when nobody is live yet and we wait for the first
# share from anyone (a member that started before its neighbours trains alone otherwise:
# 3 of its 10 rounds on its own shard in the lab, docs/NETLAB.md).
ANYONE = "*"
# Senders remembered (only admitted senders make an entry); the oldest goes first.
MAX_SENDERS = 1024


@dataclass
class _Sender:
    last_at: float  # when its newest share was admitted (monotonic seconds)
    last_round: int  # our round then
    interval: float | None  # smoothed seconds between its shares


class MixingPace:
    """Who we still wait for before a merge, and until when (times are passed in)."""

    def __init__(self, max_wait: float, live_rounds: int = DEFAULT_MAX_AGE_ROUNDS) -> None:
        if max_wait < 0:
            raise ValueError(f"the longest wait must be >= 0 seconds, got {max_wait}")
        self.max_wait = max_wait
        self.live_rounds = live_rounds
        self._senders: OrderedDict[str, _Sender] = OrderedDict()
        self._merged_at: float | None = None
        # Merges that went on without every live sender: waited out, per round.
        self.waited_out = 0

    @property
    def enabled(self) -> bool:
        return self.max_wait > 0

    def arrived(self, sender: str, now: float, round: int) -> None:
        """A share from ``sender`` was admitted at ``now``, in our round ``round``."""
        known = self._senders.pop(sender, None)
        interval = None
        if known is not None:
            gap = max(0.0, now - known.last_at)
            interval = gap if known.interval is None else (
                INTERVAL_SMOOTHING * gap + (1 - INTERVAL_SMOOTHING) * known.interval)
        self._senders[sender] = _Sender(now, round, interval)
        while len(self._senders) > MAX_SENDERS:
            self._senders.popitem(last=False)

    def merged(self, now: float) -> None:
        """Our merge at ``now`` folded in every share admitted before it."""
        self._merged_at = now

    def awaited(self, round: int, now: float, own_round_s: float,
                expecting: bool = False) -> dict[str, float]:
        """Live senders not heard since our last merge, each with the time we wait
        for it until (only those whose time is still to come). ``own_round_s``: our
        round without its waits (work, and a push's typical duration). ``expecting``:
        we shared with neighbours last round, so with nobody live we wait for
        :data:`ANYONE`, the first share from whoever sends."""
        if not self.enabled or self._merged_at is None:
            return {}  # before our first merge every share so far is still unmerged
        limit = self._merged_at + min(self.max_wait, OWN_FACTOR * own_round_s)
        live = {sender: seen for sender, seen in self._senders.items()
                if round - seen.last_round <= self.live_rounds}
        if not live:
            return {ANYONE: limit} if expecting and limit > now else {}
        waits = {}
        for sender, seen in live.items():
            if seen.last_at > self._merged_at:
                continue  # already delivered since the merge
            interval = FIRST_INTERVAL_S if seen.interval is None else seen.interval
            until = min(seen.last_at + WAIT_FACTOR * interval, limit)
            if until > now:
                waits[sender] = until
        return waits

    def gone_quiet(self, now: float) -> list[str]:
        """Senders not heard for longer than we would wait for them (``WAIT_FACTOR`` times
        their interval): a neighbour that finished and left, or died."""
        return [sender for sender, seen in self._senders.items()
                if now - seen.last_at > WAIT_FACTOR * (seen.interval or FIRST_INTERVAL_S)]

    def wait_until(self, round: int, now: float, own_round_s: float,
                   expecting: bool = False) -> float | None:
        """The time to wait until before merging, or None to merge now."""
        waits = self.awaited(round, now, own_round_s, expecting)
        return max(waits.values()) if waits else None
