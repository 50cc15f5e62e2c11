"""Byzantine members for experiments: an honest node inside, a hostile message outside.

The daemon's ``--attack`` (``scripts/bench_byzantine.py``) wraps a real
:class:`gossip.node.GossipNode`: it trains, merges and keeps an honest
estimate ``z`` like everyone, but every update it sends carries an attack
vector instead of ``z``. The attacks are those of the simulator
(:mod:`topologies.attacks`, where the same definitions run batched over all
nodes), with ``s`` the scale:

* ``sign-flip``: ``-s * z`` (default ``s = 1``);
* ``scale``: ``s * z`` (default ``s = 10``);
* ``noise``: ``z + N(0, s^2)`` per coordinate (default ``s = 1``);
* ``alie`` (Baruch et al., NeurIPS 2019): ``mean - s * std``, coordinate-wise
  over the neighbours' estimates the attacker has received (its vote
  table), with the paper's ``z_max`` as the default ``s``.

Unlike an honest node it claims its whole sample count as weight on every
message (a weight is only a claim), and it does not split or refund weight:
the worst case for ``mean``, which weighs by claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from gossip import codec
from gossip.node import GossipNode, Outgoing
from gossip.update import Update

ATTACKS = ("sign-flip", "scale", "noise", "alie")
# A member that pushes honestly but keeps every update it is sent and answers each
# with a refusal (``replay``): under a rule that refunds refusals, it would create
# weight at every push (docs/PROTOCOL.md §4). A daemon-only attack: it is about
# receipts, which the simulator does not have.
RECEIPT_LIE = "lie-receipts"
DAEMON_ATTACKS = (*ATTACKS, RECEIPT_LIE)
DEFAULT_SCALE = {"sign-flip": 1.0, "scale": 10.0, "noise": 1.0}


def alie_z_max(nodes: int, byzantine: int) -> float:
    """Baruch et al. 2019, section 4: ``Phi^-1((n - q) / n)``, ``q = floor(n/2 + 1) - f``."""
    supporters = math.floor(nodes / 2 + 1) - byzantine
    return NormalDist().inv_cdf((nodes - supporters) / nodes)


def attack_vector(
    attack: str,
    own: np.ndarray,
    seen: np.ndarray | None,
    scale: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """What a Byzantine node sends in place of ``own``; ``seen``: its neighbours' rows."""
    if attack == "sign-flip":
        return -scale * own
    if attack == "scale":
        return scale * own
    if attack == "noise":
        return own + scale * rng.standard_normal(own.shape)
    if attack == "alie":
        if seen is None or len(seen) == 0:
            return own.copy()
        return seen.mean(axis=0) - scale * seen.std(axis=0)
    raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")


@dataclass
class Attacker:
    """Wraps an honest node; :meth:`prepare` signs an attack vector instead of its estimate."""

    node: GossipNode
    attack: str
    scale: float
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @classmethod
    def create(
        cls, node: GossipNode, attack: str, scale: float | None = None, members: int = 9
    ) -> Attacker:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
        if scale is None:
            scale = alie_z_max(members, 1) if attack == "alie" else DEFAULT_SCALE[attack]
        return cls(node, attack, float(scale))

    def prepare(self, now: float) -> Outgoing:
        node = self.node
        votes = node.votes.fresh(node.round)
        seen = np.stack([vote.estimate for vote in votes.values()]) if votes else None
        vector = attack_vector(self.attack, node.estimate, seen, self.scale, self.rng)
        # Kept finite in float32 so that receivers judge the values, not an overflow.
        vector = np.clip(vector, -3e38, 3e38)
        node.seq += 1
        update = Update(
            sender=node.key.public_key,
            seq=node.seq,
            samples=node.samples,
            weight=float(max(node.samples, 1)),
            fingerprint=node.layout.fingerprint,
            created_at=now,
            tensors=node.layout.unflatten(vector),
            codec="raw",
        )
        # Weight 0 in the Outgoing: a failed push refunds nothing.
        return Outgoing(codec.encode(update, node.key), node.seq, {}, 0.0)
