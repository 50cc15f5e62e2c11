"""Tensor codecs: how one tensor's values become the bytes of its payload.

Each codec is one small class behind :class:`TensorCodec`; the update header
names the codec by id, inside the signed part, so a receiver knows how to read
every payload and a relay cannot swap it. Ids: ``raw`` (exact), ``fp16``
(half precision, 2x smaller), ``int8`` (blockwise 8-bit, ~3.9x smaller) and
``topk:FRACTION`` (the largest ``FRACTION`` of values by magnitude, e.g.
``topk:0.01``, ~50x smaller). :func:`resolve_codec` turns an id into its codec.
Lossy codecs take float tensors only; :class:`ErrorFeedback` keeps what they
drop so that it is sent later instead of lost.
"""

from __future__ import annotations

from gossip.compression.base import (
    TensorCodec,
    register,
    register_family,
    resolve_codec,
)
from gossip.compression.feedback import ErrorFeedback
from gossip.compression.fp16 import Fp16Codec
from gossip.compression.int8 import Int8Codec
from gossip.compression.raw import RawCodec
from gossip.compression.topk import TopKCodec

__all__ = [
    "ErrorFeedback",
    "Fp16Codec",
    "Int8Codec",
    "RawCodec",
    "TensorCodec",
    "TopKCodec",
    "register",
    "register_family",
    "resolve_codec",
]
