"""The daemon's privacy ledger: what the checkpoint must remember so epsilon is never understated.

Every local round a node trains releases something computed from its data:
a privatized update when DP is on, the raw update when it is off. Raw rounds
spend unbounded privacy, so the ledger counts them (``non_private_rounds``
in the checkpoint's ``optimizer`` dict, next to the DP mechanism's own
``dp_*`` state), and a node refuses to turn DP on over a state that released
any: no finite epsilon would be true (:func:`refuse_dp_after_raw_rounds`).
The fix is a fresh ``--state-dir`` (a new model; the old one has leaked).

Checkpoints written before this ledger existed have no ``non_private_rounds``
key; their history is inferred conservatively (:func:`non_private_rounds`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from p2pfl.config import ConfigError

NON_PRIVATE_ROUNDS = "non_private_rounds"


def non_private_rounds(saved: dict[str, Any], trained_rounds: int) -> int:
    """Rounds the saved state trained and released without DP, at least.

    A checkpoint from before the ledger (no key) is trusted for no more than
    its DP steps: every other round it trained counts as raw. That may
    overcount (a lowered ``--dp-noise`` converts to fewer steps), never under.
    """
    if NON_PRIVATE_ROUNDS in saved:
        return max(int(saved[NON_PRIVATE_ROUNDS]), 0)
    dp_steps = int(saved.get("dp_steps", 0))
    return max(trained_rounds - dp_steps, 0)


def refuse_dp_after_raw_rounds(saved: dict[str, Any], trained_rounds: int, where: str) -> None:
    """ConfigError if DP is asked for on a state whose model already released raw updates."""
    raw = non_private_rounds(saved, trained_rounds)
    if raw > 0:
        raise ConfigError(
            f"--dp: the state in {where} trained {raw} round(s) without DP, whose updates "
            "were sent unprotected, so no finite epsilon holds for this model; "
            "start DP from a fresh --state-dir"
        )


def os_entropy_generator() -> torch.Generator:
    """A torch generator seeded from OS entropy, never from the experiment seed.

    Batches drawn from a seeded generator are known to whoever knows the seed,
    and then no amplification by subsampling can be claimed. torch's generator
    is a Mersenne Twister, not a CSPRNG (opacus's ``secure_mode`` needs
    torchcsprng, which is not on the package index these machines use): SECURITY.md says so.
    """
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
