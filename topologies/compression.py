"""Compressed gossip in the simulator: gossip's codecs, batched over nodes, and what is sent.

The codecs are :mod:`gossip.compression`'s, resolved by id
(:func:`gossip.compression.resolve_codec`). A message is encoded tensor by
tensor, so the batched forms below work per tensor of the model's layout (a
column block of the stacked [n, P] tensor) and give exactly what the codec's
``decode`` gives for each node's row (``tests/test_sim_compression.py``):

* ``fp16``: clip to +-65504, round to half precision and back;
* ``int8``: blocks of 256 values, scale ``max|x| / 127`` in float32,
  ``round(x / scale) * scale``: the codec's own batched functions, called on
  the rows;
* ``topk:F``: the ``codec.kept(size)`` largest magnitudes of each tensor kept
  (as float32), the rest zero, ties to the first by position, as the codec.

The rules themselves (int8's quantisation, top-k's selection, the constants
they use) are the codec's functions and names, called on the whole [n, size]
block, so the two cannot drift.

The bytes a node sends per message are those of one real encoded update with
that codec (:func:`topologies.network.message_bytes`), exact because every
codec's payload size depends only on the tensor shapes.

What is sent, by codec:

* ``fp16`` and ``int8`` compress the whole estimate, as the daemon does
  (:meth:`gossip.node.GossipNode.prepare` encodes the share's estimate), with
  the residual memory of :class:`gossip.compression.ErrorFeedback` (EF-SGD,
  Karimireddy et al., ICML 2019): a node sends ``Q(z + e)`` and keeps
  ``e <- z + e - Q(z + e)``, in float64 as the daemon does; the rule is
  gossip's own :func:`gossip.compression.feedback.feedback_step`, called on
  every row at once. Receivers fold in the decoded estimate with the
  sender's weight share; the sender keeps its own share of its exact ``z``.
* ``topk`` sends differences to a public copy, CHOCO-gossip style (Koloskova,
  Stich and Jaggi, "Decentralized Stochastic Optimization and Gossip
  Algorithms with Compressed Communication", ICML 2019). Each node ``i`` has a
  public copy ``x̂_i`` that all its neighbours hold; each round it sends
  ``q_i = topk(z_i - x̂_i)`` and everyone sets ``x̂_i += q_i``. The residual
  ``z_i - x̂_i`` is the error-feedback memory: nothing is dropped, only sent
  later. Receivers fold in ``x̂_j`` with the push-sum share
  ``gamma w_j/(d_j+1)`` (:meth:`topologies.stacked_pushsum.StackedPushSum.gossip_sent`).
  The sender gives away that weight and keeps its own share of its exact
  ``z_i`` plus the fraction ``c`` (``compensation``) of the mass its messages
  did not carry, ``gamma w_i/(d_i+1) (z_i - x̂_i)`` per message:

  - ``c = 1`` conserves mass exactly; in estimate terms it is CHOCO's
    ``z_i += gamma sum_j W_ij (x̂_j - x̂_i)``. With top-1% and 10 local epochs
    between rounds it diverges at ``gamma = 1`` (digits, 32 nodes, small-world
    k=6, 50 rounds: 0.25 accuracy) and peaks at 0.84 for ``gamma = 0.1``
    (0.62, 0.75, 0.84, 0.77, 0.68 for gamma 0.02, 0.05, 0.1, 0.2, 0.3).
  - ``c = 0``, the default, is push-sum whose messages are the public
    copies: every new estimate is a convex combination, so it cannot
    diverge, but the residual mass of each message is dropped (0.941 in the
    same run, against 0.963 uncompressed).
  - ``0 < c < 1`` keeps part of it: 0.940 at ``c = 0.25``, 0.946 at
    ``c = 0.5``, 0.84 at ``c = 0.75`` in that run, but ``c = 0.5`` diverges on
    plain consensus of random vectors (16 nodes, 200 values, top-1%), so it
    is not the default. ``gamma = 1`` is best for ``c < 1``.

  With ``x̂ = z`` every variant is exactly push-sum. Public copies start at
  the nodes' starting models, which are public (every node builds the same
  initial model from the task). CHOCO needs every ``q_i`` to reach every
  neighbour, so the simulator refuses ``topk`` with loss, delay or churn
  rather than model re-synchronisation.
"""

from __future__ import annotations

import math

import torch

from gossip.compression import Fp16Codec, Int8Codec, RawCodec, TensorCodec, TopKCodec
from gossip.compression import resolve_codec as gossip_resolve_codec
from gossip.compression.base import FLOAT32_MAX
from gossip.compression.feedback import feedback_step
from gossip.compression.fp16 import HALF_MAX
from gossip.compression.int8 import dequantize_rows, quantize_rows
from gossip.compression.topk import top_mask_rows

DEFAULT_CHOCO_STEP = 1.0
DEFAULT_COMPENSATION = 0.0


def resolve_codec(name: str) -> TensorCodec:
    """A gossip codec id (``raw``, ``fp16``, ``int8``, ``topk:F``); ValueError naming the
    choices otherwise."""
    codec = gossip_resolve_codec(name)
    if codec is None or not isinstance(codec, RawCodec | Fp16Codec | Int8Codec | TopKCodec):
        raise ValueError(
            f"unknown compression {name!r}; choose raw, fp16, int8 or topk:FRACTION "
            "with FRACTION in (0, 1]"
        )
    return codec


def fp16_round_trip(block: torch.Tensor) -> torch.Tensor:
    return block.clamp(-HALF_MAX, HALF_MAX).to(torch.float16).to(block.dtype)


def int8_round_trip(block: torch.Tensor) -> torch.Tensor:
    """:class:`gossip.compression.Int8Codec` encode then decode, for every row of [n, size].

    A thin wrapper: the scales, rounding and product are the codec's own batched
    functions (:func:`gossip.compression.int8.quantize_rows` and
    :func:`~gossip.compression.int8.dequantize_rows`), run on the rows as numpy
    (a view of a CPU tensor, no copy), so the simulator cannot drift from the wire.
    """
    values = block.detach().cpu().numpy()
    scales, quantized = quantize_rows(values)
    decoded = dequantize_rows(scales, quantized, values.dtype)
    return torch.from_numpy(decoded).to(block.device)


def topk_round_trip(block: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` largest magnitudes of each row (as float32 values), zeros elsewhere.

    Which values are kept, ties included, is the codec's own choice
    (:func:`gossip.compression.topk.top_mask_rows`).
    """
    magnitude = block.abs()
    if not torch.isfinite(magnitude).all():
        raise ValueError("codec 'topk' cannot encode NaN or infinite values")
    if kept == 0:
        return torch.zeros_like(block)
    mask = torch.from_numpy(top_mask_rows(magnitude.cpu().numpy(), kept)).to(block.device)
    values = block
    if values.dtype != torch.float32:
        values = values.clamp(-FLOAT32_MAX, FLOAT32_MAX).float().to(block.dtype)
    return torch.where(mask, values, torch.zeros((), dtype=block.dtype))


class BatchedCodec:
    """One gossip codec applied to every row of a stacked [n, P] tensor, tensor by tensor."""

    def __init__(self, codec: TensorCodec, sizes: list[int]) -> None:
        self.codec = codec
        self.sizes = list(sizes)

    @property
    def lossless(self) -> bool:
        return isinstance(self.codec, RawCodec)

    @property
    def sparse(self) -> bool:
        return isinstance(self.codec, TopKCodec)

    def round_trip(self, stacked: torch.Tensor) -> torch.Tensor:
        """What receivers decode for each row (a new tensor)."""
        if self.lossless:
            return stacked.float().to(stacked.dtype)
        parts, start = [], 0
        for size in self.sizes:
            block = stacked[:, start : start + size]
            start += size
            if isinstance(self.codec, Fp16Codec):
                parts.append(fp16_round_trip(block))
            elif isinstance(self.codec, Int8Codec):
                parts.append(int8_round_trip(block))
            else:
                assert isinstance(self.codec, TopKCodec)
                parts.append(topk_round_trip(block, self.codec.kept(size)))
        return torch.cat(parts, dim=1)


class Compressor:
    """What each node's message carries under one codec, with the sender-side memory.

    ``encode(targets, senders)`` takes the vectors the nodes want to convey
    (honest estimates, or attack vectors) and returns what receivers hold
    afterwards: the decoded estimate (fp16, int8) or the public copies (topk).
    Only rows in ``senders`` send, and only their memory moves.
    """

    def __init__(
        self, codec: BatchedCodec, start: torch.Tensor, step: float = DEFAULT_CHOCO_STEP
    ) -> None:
        if not (math.isfinite(step) and 0 < step <= 1):
            raise ValueError(f"the CHOCO step gamma must be in (0, 1], got {step}")
        self.codec = codec
        self.step = float(step)
        self.public = start.clone() if codec.sparse else None
        # Error-feedback residuals, float64 as in the daemon (gossip's feedback_step):
        # None until the first message, then [n, P].
        self.memory: torch.Tensor | None = None

    @property
    def uses_public_copies(self) -> bool:
        return self.public is not None

    def encode(
        self, targets: torch.Tensor, senders: torch.Tensor, feedback: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``feedback`` (bool [n]): rows that keep error-feedback memory (honest ones)."""
        rows = senders.nonzero().flatten()
        if self.public is not None:
            residual = targets.index_select(0, rows) - self.public.index_select(0, rows)
            self.public.index_add_(0, rows, self.codec.round_trip(residual))
            return self.public
        use = senders if feedback is None else senders & feedback
        sent, memory = feedback_step(
            targets.detach().cpu().numpy(),
            None if self.memory is None else self.memory.numpy(),
            lambda rows: self.codec.round_trip(torch.from_numpy(rows)).numpy(),
            use.cpu().numpy(),
        )
        self.memory = torch.from_numpy(memory)
        return torch.from_numpy(sent).to(targets.device)
