"""The interface every tensor codec implements, and the registry of codec ids."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class TensorCodec(ABC):
    """Turns one tensor into payload bytes and back; stateless on the wire."""

    id: str

    @abstractmethod
    def payload_size(self, array: np.ndarray) -> int:
        """Bytes :meth:`encode_into` will write for ``array``."""

    @abstractmethod
    def encode_into(self, array: np.ndarray, out: memoryview) -> None:
        """Write ``array``'s payload into ``out`` (exactly ``payload_size`` bytes)."""

    @abstractmethod
    def decode(self, payload: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor a payload stands for; ValueError if the payload does not fit."""


_CODECS: dict[str, TensorCodec] = {}


def register(codec: TensorCodec) -> TensorCodec:
    _CODECS[codec.id] = codec
    return codec


def codec_by_id(codec_id: str) -> TensorCodec | None:
    return _CODECS.get(codec_id)
