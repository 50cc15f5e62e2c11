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
  (population std) over the estimates the attacker sees, with the paper's
  ``z_max`` as the default ``s``.

One definition, :func:`attack_vectors`, serves both; what differs, on
purpose, is what an ALIE attacker sees:

* here, in a daemon: the fresh votes it has received (its vote table), which
  are a round or so old and may include other attackers' vectors. A real
  process sees only what is sent to it; an omniscient attacker would need a
  side channel to every honest neighbour, which our daemons do not model.
* in the simulator (:mod:`topologies.attacks`): the current estimates of its
  honest neighbours, as in the paper (omniscient, colluding attackers). It
  costs nothing in-process and is the worst case, which is what a simulated
  robustness claim should be measured against.

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


def attack_vectors(
    attack: str,
    own: np.ndarray,
    scale: float,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """What each of n Byzantine nodes sends in place of its row of ``own`` ([n, P]).

    The one definition of the attacks, batched: :func:`attack_vector` is this on
    one node (the daemon's :class:`Attacker`), and the simulator
    (:class:`topologies.attacks.Adversary`) calls it on all its attackers at
    once. ``noise`` draws ``N(0, 1)`` in ``own``'s dtype from ``rng``, row after
    row. ``alie`` reads ``seen`` ([n, m, P]: the estimates each attacker sees,
    padded) and ``present`` ([n, m], which are real; all when None): what an
    attacker sees is the caller's to say (see the module text); one that sees
    nothing sends its own row.
    """
    own = np.asarray(own)
    if attack == "sign-flip":
        return -scale * own
    if attack == "scale":
        return scale * own
    if attack == "noise":
        return own + scale * rng.standard_normal(own.shape, dtype=own.dtype)
    if attack == "alie":
        if seen is None or seen.shape[1] == 0:
            return own.copy()
        mask = (
            np.ones(seen.shape[:2], dtype=bool) if present is None else np.asarray(present, bool)
        )
        counts = mask.sum(axis=1)[:, None]
        divisor = np.maximum(counts, 1).astype(seen.dtype)
        real = mask[:, :, None]
        with np.errstate(over="ignore", invalid="ignore"):  # huge rows: inf, dropped later
            mean = np.where(real, seen, 0).sum(axis=1) / divisor
            spread = np.where(real, seen - mean[:, None, :], 0)
            std = np.sqrt((spread * spread).sum(axis=1) / divisor)
            return np.where(counts > 0, mean - scale * std, own)
    raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")


def attack_vector(
    attack: str,
    own: np.ndarray,
    seen: np.ndarray | None,
    scale: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """What one Byzantine node sends in place of ``own`` ([P]); ``seen``: the [m, P] rows it
    sees (:func:`attack_vectors` on one node)."""
    own = np.asarray(own)
    batch = None if seen is None else np.asarray(seen)[None]
    return attack_vectors(attack, own[None], scale, rng, batch)[0]


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
