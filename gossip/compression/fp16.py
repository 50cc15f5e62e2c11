"""IEEE half precision: each float value as 2 little-endian bytes, half the size of float32.

Error: a value in half's normal range (6.1e-5 <= |x| <= 65504) comes back
within a relative 2**-11 (round to nearest, 11 significant bits); a smaller
one within 2**-25 absolute (half of half's smallest subnormal). Finite values
beyond the range are clipped to -65504 or +65504 rather than turned into
infinities, which the receiver would reject: a parameter that large is a
sign of divergence, but the message should still carry the rest of the
model. NaN and infinite inputs are refused (ValueError), since clipping an
infinity would hide a diverged model. Only floating-point tensors; integers
raise ValueError. Decoding casts to the tensor's declared dtype.
"""

from __future__ import annotations

import math

import numpy as np

from gossip.compression.base import TensorCodec, element_count, register, require_float

HALF_MAX = 65504.0
_HALF = np.dtype("<f2")


class Fp16Codec(TensorCodec):
    id = "fp16"

    def size_for(self, count: int, dtype: np.dtype) -> int:
        return count * _HALF.itemsize

    def encode_into(self, array: np.ndarray, out: memoryview) -> None:
        require_float(self.id, array)
        flat = array.reshape(-1)
        if flat.size and not (math.isfinite(flat.min()) and math.isfinite(flat.max())):
            raise ValueError("codec 'fp16' cannot encode NaN or infinite values")
        clipped = np.clip(flat, -HALF_MAX, HALF_MAX)
        target = np.frombuffer(out, dtype=_HALF)
        np.copyto(target, clipped, casting="same_kind")

    def decode(self, payload: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = element_count(shape)
        if dtype.kind != "f":
            raise ValueError(f"fp16 payload declared as {dtype.name}, a non-float dtype")
        if len(payload) != count * _HALF.itemsize:
            raise ValueError(
                f"fp16 payload has {len(payload)} bytes, shape {shape} needs {count * 2}"
            )
        half = np.frombuffer(payload, dtype=_HALF, count=count)
        return half.astype(dtype).reshape(shape)


register(Fp16Codec())
