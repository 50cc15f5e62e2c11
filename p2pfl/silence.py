"""Silent peers, sans-I/O: a peer that answers no receipt is handed no more weight.

A push's share is given once its payloads have wholly left (gossip/delivery.py),
whether or not a final receipt comes: that is what keeps a lying receiver from
creating weight. A neighbour that takes the payloads and never answers would so
take a share at every push (measured before this rule: 6 unanswered pushes and
a refusal took a daemon's push-sum weight from 684 to 171). So
(docs/PROTOCOL.md §4, "Silent peers"):

* after its first unanswered push a peer is *silent*: its later pushes carry
  weight 0 (probes: the current model, a new ``seq``, nothing to lose);
* any final receipt, to a share or a probe, makes it an ordinary neighbour
  again, and the share it was given stays given (it was settled as given when
  its payloads left);
* after ``PROBES_BEFORE_DROP`` unanswered probes in a row it is *dropped* as a
  neighbour (a spare takes its place), counted, and the one share it was given
  is counted as lost, here and only here. An update it pushes to us and that we
  admit makes it a neighbour again, still silent (probes only) until it answers.

So a silent neighbour costs a node at most one share of its weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Unanswered probes in a row before a silent peer stops being a neighbour.
PROBES_BEFORE_DROP = 3


@dataclass
class _Silence:
    given: float  # the weight of the one share it was given and never answered
    probes: int = 0  # unanswered probes since
    dropped: bool = False


@dataclass
class SilentPeers:
    """Which peers are silent or dropped, and what silence cost."""

    _peers: dict[str, _Silence] = field(default_factory=dict)
    dropped_count: int = 0
    """Times a peer was dropped as a neighbour for silence."""
    recovered_count: int = 0
    """Times a silent peer answered again."""
    weight_lost: float = 0.0
    """Shares given to peers that then stayed silent until dropped or forgotten."""

    def is_silent(self, peer: str) -> bool:
        """Pushes to ``peer`` carry weight 0 (a probe)."""
        return peer in self._peers

    def is_dropped(self, peer: str) -> bool:
        """``peer`` is not a neighbour now (a spare stands in)."""
        silence = self._peers.get(peer)
        return silence is not None and silence.dropped

    def count(self) -> int:
        return len(self._peers)

    def unanswered(self, peer: str, weight: float) -> bool:
        """A push to ``peer`` carrying ``weight`` got no receipt; True if this drops it."""
        silence = self._peers.get(peer)
        if silence is None:
            self._peers[peer] = _Silence(weight)
            return False
        silence.probes += 1
        if silence.dropped or silence.probes < PROBES_BEFORE_DROP:
            return False
        silence.dropped = True
        self.dropped_count += 1
        self.weight_lost += silence.given
        silence.given = 0.0  # counted as lost once
        return True

    def answered(self, peer: str) -> None:
        """``peer`` sent a final receipt: an ordinary neighbour again."""
        if self._peers.pop(peer, None) is not None:
            self.recovered_count += 1

    def spoke(self, peer: str) -> None:
        """We admitted an update from ``peer``: alive, so a neighbour again (still probed)."""
        silence = self._peers.get(peer)
        if silence is not None and silence.dropped:
            silence.dropped = False
            silence.probes = 0

    def forget(self, peer: str) -> None:
        """``peer`` is forgotten: a share it was given and never answered is lost."""
        silence = self._peers.pop(peer, None)
        if silence is not None:
            self.weight_lost += silence.given
