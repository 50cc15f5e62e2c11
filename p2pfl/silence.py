"""Silent peers, sans-I/O: a peer that answers no receipt is not handed more weight.

A push's share is given once its payloads have wholly left (gossip/delivery.py),
whether or not a final receipt comes. A neighbour that answers ``ready`` and then
never sends a final receipt would so take a share at every push: measured before
this rule, 6 unanswered pushes and a refusal took a daemon's push-sum weight from
684 to 171. So (docs/PROTOCOL.md §4, "Silent peers"):

* after its first unanswered push, a peer is *silent*: it gets no further shares;
* it is probed instead, with a weight-0 update (``seq`` spent, nothing to lose),
  after ``PROBE_AFTER_S`` and then at twice the interval each time; a final
  receipt to any push, probe or not, makes it an ordinary neighbour again;
* after ``PROBES_BEFORE_DROP`` unanswered probes it is dropped as a neighbour
  (a spare takes its place), counted, and the one share it was given is
  accounted as lost, here and only here; it is still probed, at the longest
  interval, and a final receipt brings it back.

So a silent neighbour costs a node at most one share of its weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The first probe of a silent peer, seconds after its unanswered push; it doubles after
# each unanswered probe, up to PROBE_MAX_S. Long enough that a slow link's receipt
# (which a push deadline already waited for) is not what is missing.
PROBE_AFTER_S = 20.0
PROBE_MAX_S = 320.0
# Unanswered probes before a silent peer is dropped as a neighbour (20 + 40 + 80 s).
PROBES_BEFORE_DROP = 3


@dataclass
class Silence:
    """One silent peer: since when, the share it was given, its probes."""

    since: float
    given: float
    """The weight of the share its unanswered push carried (the one it may have cost)."""
    probes: int = 0
    next_probe: float = 0.0
    dropped: bool = False


@dataclass
class SilentPeers:
    """Which peers are silent or dropped, and what silence cost."""

    peers: dict[str, Silence] = field(default_factory=dict)
    dropped_count: int = 0
    """Peers ever dropped as neighbours for silence."""
    recovered_count: int = 0
    """Silent peers that answered again."""
    weight_lost: float = 0.0
    """Shares given to peers that then fell silent and were dropped or forgotten."""

    def is_silent(self, peer: str) -> bool:
        return peer in self.peers

    def is_dropped(self, peer: str) -> bool:
        silence = self.peers.get(peer)
        return silence is not None and silence.dropped

    def unanswered(self, peer: str, weight: float, now: float) -> bool:
        """A push to ``peer`` carrying ``weight`` went unanswered; True if this drops it."""
        silence = self.peers.get(peer)
        if silence is None:
            self.peers[peer] = Silence(now, weight, next_probe=now + PROBE_AFTER_S)
            return False
        silence.probes += 1
        silence.next_probe = now + min(PROBE_AFTER_S * 2**silence.probes, PROBE_MAX_S)
        if silence.dropped or silence.probes < PROBES_BEFORE_DROP:
            return False
        silence.dropped = True
        self.dropped_count += 1
        self.weight_lost += silence.given
        silence.given = 0.0  # accounted once
        return True

    def answered(self, peer: str) -> bool:
        """``peer`` sent a final receipt: an ordinary neighbour again. True if it was silent."""
        if self.peers.pop(peer, None) is None:
            return False
        self.recovered_count += 1
        return True

    def probes_due(self, now: float) -> list[str]:
        return [p for p, s in self.peers.items() if s.next_probe <= now]

    def forget(self, peer: str) -> None:
        """``peer`` is forgotten: a share it was given and never answered is lost."""
        silence = self.peers.pop(peer, None)
        if silence is not None:
            self.weight_lost += silence.given

    def view(self) -> dict[str, object]:
        return {
            "silent": sorted(p for p, s in self.peers.items() if not s.dropped),
            "dropped": sorted(p for p, s in self.peers.items() if s.dropped),
            "dropped_count": self.dropped_count,
            "recovered_count": self.recovered_count,
            "weight_lost": self.weight_lost,
        }
