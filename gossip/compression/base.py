"""The interface every tensor codec implements, and the registry of codec ids.

An id is either a plain name (``raw``, ``fp16``, ``int8``) registered with
:func:`register`, or ``family:parameter`` (``topk:0.01``) for a codec family
registered with :func:`register_family`, whose factory builds the codec from
the parameter text or returns None when the text is not a valid parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np


class TensorCodec(ABC):
    """Turns one tensor into payload bytes and back; stateless on the wire."""

    id: str

    def payload_size(self, array: np.ndarray) -> int:
        """Bytes :meth:`encode_into` will write for ``array``."""
        return self.size_for(array.size, array.dtype)

    @abstractmethod
    def size_for(self, count: int, dtype: np.dtype) -> int:
        """Bytes of the payload of a tensor of ``count`` values of ``dtype``: what a
        receiver checks a header's declared size against before any payload is sent
        (a size is a claim; a 64 MiB one for a 400-byte tensor would be read)."""

    @abstractmethod
    def encode_into(self, array: np.ndarray, out: memoryview) -> None:
        """Write ``array``'s payload into ``out`` (exactly ``payload_size`` bytes)."""

    @abstractmethod
    def decode(self, payload: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor a payload stands for; ValueError if the payload does not fit."""


# Lossy codecs carry float32 values: larger float64 values are clipped to this first.
FLOAT32_MAX = float(np.finfo(np.float32).max)

CodecFactory = Callable[[str], "TensorCodec | None"]

_CODECS: dict[str, TensorCodec] = {}
_FAMILIES: dict[str, CodecFactory] = {}


def register(codec: TensorCodec) -> TensorCodec:
    _CODECS[codec.id] = codec
    return codec


def register_family(name: str, factory: CodecFactory) -> None:
    """Make ids ``name:PARAMETER`` resolve to ``factory(PARAMETER)``."""
    if ":" in name:
        raise ValueError(f"a codec family name cannot contain ':' (got {name!r})")
    _FAMILIES[name] = factory


def resolve_codec(codec_id: str) -> TensorCodec | None:
    """The codec an id names, or None when no registered codec or family accepts it.

    Ids come from the network, so a malformed parameter is None, never an error.
    """
    codec = _CODECS.get(codec_id)
    if codec is not None:
        return codec
    family, sep, parameter = codec_id.partition(":")
    factory = _FAMILIES.get(family) if sep else None
    return factory(parameter) if factory is not None else None




def element_count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def require_float(codec_id: str, array: np.ndarray) -> None:
    """Lossy codecs take floating-point tensors only; say so in one line."""
    if array.dtype.kind != "f":
        raise ValueError(
            f"codec {codec_id!r} encodes floating-point tensors only, got {array.dtype.name}; "
            "use the 'raw' codec for models with integer tensors"
        )
