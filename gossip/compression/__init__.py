"""Tensor codecs: how one tensor's values become the bytes of its payload.

Each codec is one small class behind :class:`TensorCodec`; the update header
names the codec by id, inside the signed part, so a receiver knows how to read
every payload and a relay cannot swap it.
"""

from __future__ import annotations

from gossip.compression.base import TensorCodec, codec_by_id, register
from gossip.compression.raw import RawCodec

__all__ = ["TensorCodec", "RawCodec", "codec_by_id", "register"]
