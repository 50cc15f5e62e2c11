"""The identity codec: the tensor's little-endian bytes, as they are."""

from __future__ import annotations

import numpy as np

from gossip.compression.base import TensorCodec, register


class RawCodec(TensorCodec):
    id = "raw"

    def size_for(self, count: int, dtype: np.dtype) -> int:
        return count * dtype.itemsize

    def encode_into(self, array: np.ndarray, out: memoryview) -> None:
        source = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        np.frombuffer(out, dtype=np.uint8)[:] = source.reshape(-1).view(np.uint8)

    def decode(self, payload: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        if len(payload) != count * dtype.itemsize:
            raise ValueError(
                f"raw payload has {len(payload)} bytes, shape {shape} of {dtype.name} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(payload, dtype=dtype, count=count).reshape(shape)


register(RawCodec())
