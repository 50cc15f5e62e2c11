"""Silent peers, sans-I/O: a peer that does not accept what it takes is handed no more weight.

A push's share is given once its payloads have wholly left (gossip/delivery.py),
whether or not an accepting receipt comes: that is what keeps a lying receiver
from creating weight. A neighbour that takes the payloads and then answers
nothing, or refuses, would so take a share at every push (measured before this
rule: 6 unanswered pushes and a refusal took a daemon's push-sum weight from
684 to 171). So (docs/PROTOCOL.md §4, "Silent peers"):

* after a share whose payloads it took without accepting them (no final
  receipt, or a refusal after the payloads), a peer is *silent*: its later
  pushes carry weight 0 (probes: the current model, a new ``seq``, nothing to
  lose);
* a final receipt *accepting* a push, a probe or a share, makes it an ordinary
  neighbour again; a refusal at the offer does not (it costs nothing, so an
  attacker could alternate it with silence);
* after ``PROBES_BEFORE_DROP`` unanswered probes in a row it is *dropped* as a
  neighbour (a spare takes its place), counted, and the one share it was given
  is counted as lost, here and only here. An update of its that we admit, or a
  redial that reaches it, makes it a neighbour again, still probed, and one
  more unanswered probe drops it again;
* a peer that has taken ``MAX_STRIKES`` more shares without accepting them
  than it accepted since, gets probes only: each share it takes and does not
  accept is a strike, each share it accepts forgives one. An honest peer on a
  slow link, whose push sometimes times out, keeps getting shares; one that
  alternates (accepting free probes between unanswered shares, say) takes at
  most ``MAX_STRIKES`` shares more than it accepted.

So a neighbour that falls silent costs a node one share of its weight, and any
peer at most ``MAX_STRIKES`` beyond the shares it accepted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from p2pfl.linkrates import MAX_PEERS  # one bound for every per-peer table of the policy

# Unanswered probes in a row before a silent peer stops being a neighbour.
PROBES_BEFORE_DROP = 3
# Shares a peer may take without accepting them, beyond those it accepted, before it gets
# probes only.
MAX_STRIKES = 3


@dataclass
class _Silence:
    given: float  # the weight of the share it took and never accepted
    probes: int = 0  # unanswered probes since
    dropped: bool = False


@dataclass
class SilentPeers:
    """Which peers are silent or dropped, and what silence cost."""

    _peers: OrderedDict[str, _Silence] = field(default_factory=OrderedDict)
    _strikes: OrderedDict[str, int] = field(default_factory=OrderedDict)
    dropped_count: int = 0
    """Times a peer was dropped as a neighbour for silence."""
    recovered_count: int = 0
    """Times a silent peer accepted a push again."""
    weight_lost: float = 0.0
    """Shares given to peers that then stayed silent until dropped or forgotten."""

    def is_silent(self, peer: str) -> bool:
        """Pushes to ``peer`` carry weight 0 (a probe)."""
        return peer in self._peers or self._strikes.get(peer, 0) >= MAX_STRIKES

    def is_dropped(self, peer: str) -> bool:
        """``peer`` is not a neighbour now (a spare stands in)."""
        silence = self._peers.get(peer)
        return silence is not None and silence.dropped

    def count(self) -> int:
        return len(self._peers)

    def not_accepted(self, peer: str, weight: float) -> bool:
        """A push to ``peer`` carrying ``weight`` left whole and was not accepted (no
        final receipt, or a refusal after the payloads); True if this drops it."""
        if weight > 0:
            self._strikes[peer] = self._strikes.pop(peer, 0) + 1
            self._bound(self._strikes)
        silence = self._peers.get(peer)
        if silence is None:
            self._peers[peer] = _Silence(weight)
            self._bound(self._peers)
            return False
        silence.probes += 1
        if silence.dropped or silence.probes < PROBES_BEFORE_DROP:
            return False
        silence.dropped = True
        self.dropped_count += 1
        self.weight_lost += silence.given
        silence.given = 0.0  # counted as lost once
        return True

    def accepted(self, peer: str, weight: float) -> None:
        """``peer`` accepted a push carrying ``weight``: an ordinary neighbour again, and
        an accepted share (not a probe) forgives one strike."""
        if self._peers.pop(peer, None) is not None:
            self.recovered_count += 1
        strikes = self._strikes.get(peer, 0)
        if weight > 0 and strikes:
            self._strikes[peer] = strikes - 1

    def spoke(self, peer: str) -> None:
        """We admitted an update from ``peer`` or reached it: a neighbour again, still
        probed; its next unanswered probe drops it again."""
        silence = self._peers.get(peer)
        if silence is not None:
            silence.dropped = False

    def forget(self, peer: str) -> None:
        """``peer`` is forgotten: a share it was given and never accepted is lost."""
        silence = self._peers.pop(peer, None)
        self._strikes.pop(peer, None)
        if silence is not None:
            self.weight_lost += silence.given

    def _bound(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > MAX_PEERS:
            peer, entry = table.popitem(last=False)
            if isinstance(entry, _Silence):
                self.weight_lost += entry.given
