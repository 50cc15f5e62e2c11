"""The daemon's privacy ledger: what the checkpoint must remember so epsilon is never understated.

Every local round a node trains releases something computed from its data:
a privatized update when DP is on, the raw update when it is off. Raw rounds
spend unbounded privacy, so the ledger counts them (``non_private_rounds``
in the checkpoint's ``privacy`` dict, next to the DP mechanism's own
``dp_*`` state), and a node refuses to turn DP on over a state that released
any: no finite epsilon would be true (:func:`refuse_dp_after_raw_rounds`).
The fix is a fresh ``--state-dir`` (a new model; the old one has leaked).

Checkpoints written before this ledger existed have no ``non_private_rounds``
key; their history is inferred conservatively (:func:`non_private_rounds`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
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
    and then no amplification by subsampling can be claimed. DP-SGD further
    replaces the generator's whole state from OS entropy before every step
    (:func:`reseed_from_os_entropy`); the node-level mechanism draws from
    numpy's PCG64 seeded by OS entropy. SECURITY.md says what this does and
    does not give.
    """
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)
    reseed_from_os_entropy(generator)
    return generator


# torch's CPU generator is a Mersenne Twister (MT19937) whose get_state() is the C struct
# CPUGeneratorImplState: initial seed (8 bytes), left (4), seeded (4), next (8), then the
# 624 state words, each stored in 8 bytes (torch 2.13, aten/src/ATen/CPUGeneratorImpl.cpp).
_MT_WORDS = 624
_MT_OFFSET = 24
_FRESH_STATE = torch.Generator().get_state()  # no cached normal sample in it


def reseed_from_os_entropy(generator: torch.Generator) -> None:
    """Replace all 19,968 bits of the generator's MT19937 state with OS entropy.

    opacus's ``secure_mode`` wants torchcsprng (a CSPRNG behind a torch
    generator), which is not installable here. Short of it, every DP-SGD step
    draws its Poisson batch and its noise from an MT state that is fresh OS
    entropy (the kernel's CSPRNG): no state carries from one step to the next,
    so nothing links steps, and there is no 64-bit seed to search. Within one
    step the stream is MT's, which is not cryptographically unpredictable; its
    raw outputs are never released, only noisy gradient sums. The layout is
    checked on every call, so a torch that stores its state otherwise fails
    here instead of running on a partly random state.
    """
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32).astype(np.uint64)
    stored = words.view(np.uint8)
    state = _FRESH_STATE.clone()
    end = _MT_OFFSET + len(stored)
    if state.numel() < end:
        raise RuntimeError(f"torch's generator state has {state.numel()} bytes, expected "
                           f"at least {end}: the DP-SGD reseed needs updating for this torch")
    state[_MT_OFFSET:end] = torch.from_numpy(stored.copy())
    generator.set_state(state)
    if not torch.equal(generator.get_state()[_MT_OFFSET:end], state[_MT_OFFSET:end]):
        raise RuntimeError("torch's generator did not take the OS-entropy state; "
                           "the DP-SGD reseed needs updating for this torch")
