"""Byzantine nodes: which ones, and what they send instead of their honest estimate.

A Byzantine node runs the protocol honestly inside (it trains, aggregates and
keeps an honest estimate ``z``, with the same rule as everyone) but every
message it sends carries an attack vector in place of ``z``, with the normal
push-sum weight share (a weight is only a claim). The ``F`` Byzantine nodes
are drawn uniformly with the run's seed. Attacks, with ``s`` the
``--attack-scale``:

* ``sign-flip``: ``-s * z`` (default ``s = 1``: the negated honest estimate);
* ``scale``: ``s * z`` (default ``s = 10``);
* ``noise``: ``z + N(0, s^2)`` per coordinate (default ``s = 1``, large next
  to the digits MLP's weights of ~0.1);
* ``alie``, "A Little Is Enough" (Baruch, Baruch and Goldberg, NeurIPS 2019):
  ``mean - s * std``, coordinate-wise over the current estimates of the
  attacker's honest neighbours, which it is assumed to see (omniscient,
  colluding attackers, as in the paper). This is the worst case, and free
  in-process, so it is what the simulator measures; a daemon's attacker
  (:mod:`gossip.attacks`, same formula) can only read the votes it received.
  The default ``s`` is the paper's ``z_max = Phi^-1((n - q) / n)`` with
  ``q = floor(n/2 + 1) - f`` for ``n`` nodes of which ``f`` are Byzantine
  (:func:`alie_z_max`). An attacker with no honest neighbour sends its own
  estimate.

A non-finite attack vector (a scale attack that overflowed) would be rejected
by every receiver's admission (``gossip.admission.all_finite``): the simulator
drops it like a lost message (see :class:`topologies.simulator.Simulation`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# One source for the attacks' names, default scales, ALIE's z_max and the vectors
# themselves: the daemon's --attack members (gossip/attacks.py) use the same.
from gossip.attacks import ATTACKS, DEFAULT_SCALE, alie_z_max, attack_vectors

__all__ = ["ATTACKS", "DEFAULT_SCALE", "Adversary", "alie_z_max", "choose_byzantine"]


def choose_byzantine(nodes: int, count: int, seed: int) -> np.ndarray:
    """A bool mask [n] of ``count`` Byzantine nodes, drawn with the run's seed."""
    if not 0 <= count < nodes:
        raise ValueError(f"byzantine must be in [0, {nodes - 1}] for {nodes} nodes, got {count}")
    mask = np.zeros(nodes, dtype=bool)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x42797A]))
    mask[rng.choice(nodes, size=count, replace=False)] = True
    return mask


class Adversary:
    """The Byzantine nodes of one run and the attack vectors they send."""

    def __init__(
        self,
        byzantine: np.ndarray,
        attack: str,
        scale: float | None,
        neighbours: list[np.ndarray],
        seed: int,
    ) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"attack scale must be a finite number, got {scale}")
        self.byzantine = np.asarray(byzantine, dtype=bool)
        self.attack = attack
        n, count = len(self.byzantine), int(self.byzantine.sum())
        self.scale = (
            float(scale)
            if scale is not None
            else alie_z_max(n, count)
            if attack == "alie"
            else DEFAULT_SCALE[attack]
        )
        self.rows = torch.from_numpy(np.flatnonzero(self.byzantine))
        honest = ~self.byzantine
        # For ALIE: each attacker's honest neighbours, padded into one [F, m] index
        # with a mask, so that gossip's batched rule reads them in one gather.
        seen = [neighbours[b][honest[neighbours[b]]] for b in np.flatnonzero(self.byzantine)]
        width = max((len(ids) for ids in seen), default=0)
        self._seen = np.zeros((len(seen), width), dtype=np.int64)
        self._seen_present = np.zeros((len(seen), width), dtype=bool)
        for row, ids in enumerate(seen):
            self._seen[row, : len(ids)] = ids
            self._seen_present[row, : len(ids)] = True
        # The noise attack's draws; public so that a test can replay them.
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E6F]))

    def vectors(self, estimates: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The attack vectors the Byzantine rows of ``estimates`` send this round.

        ``estimates`` holds nodes ``first ..``: a rank's block, or every node.
        gossip's definition (:func:`gossip.attacks.attack_vectors`) runs on all
        F attackers, those of other blocks as zeros, so that the noise attack
        draws its [F, P] normals row after row as on one rank and keeps this
        block's; an ALIE attacker sees its honest neighbours' current
        estimates (the module text says why; it needs every node here).
        """
        ids = self.rows.numpy()
        here = (ids >= first) & (ids < first + len(estimates))
        rows = estimates.detach().cpu().numpy()
        own = np.zeros((len(ids), rows.shape[1]), dtype=rows.dtype)
        own[here] = rows[ids[here] - first]
        seen = rows[self._seen] if self.attack == "alie" else None
        sent = attack_vectors(self.attack, own, self.scale, self.rng, seen, self._seen_present)
        return torch.from_numpy(sent[here]).to(estimates.device)

    def apply(self, estimates: torch.Tensor, first: int = 0) -> torch.Tensor:
        """What every node of ``estimates`` (nodes ``first ..``) sends: a copy with the
        Byzantine rows replaced."""
        ids = self.rows.numpy()
        local = ids[(ids >= first) & (ids < first + len(estimates))] - first
        sent = estimates.clone()
        sent[torch.from_numpy(local)] = self.vectors(estimates, first)
        return sent
