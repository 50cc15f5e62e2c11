"""Blockwise symmetric 8-bit quantization: about a quarter of float32's size.

The flattened tensor is cut into blocks of ``BLOCK = 256`` values (the last
block may be shorter). Each block has one float32 scale, ``max|x| / 127``,
and each value is sent as ``q = round(x / scale)``, an int8 in [-127, 127];
the receiver reads ``x̂ = q * scale``. Payload, little-endian::

    [ceil(n / 256) scales, float32][n values, int8]

so ``n + 4 * ceil(n / 256)`` bytes, 3.94x smaller than float32 for large n.

Error bound: ``|x - x̂| <= scale / 2`` for every element of its block, up to
float32 rounding (at most ``scale * 2**-16`` more, and for float64 tensors
the float32 rounding of x itself). An all-zero block has scale 0 and comes
back exact. A block whose ``max|x| / 127`` underflows float32 gets the
smallest subnormal as its scale, so the bound still holds. Values beyond
float32's range (float64 tensors only) are clipped to it first.

Only floating-point tensors; NaN and infinite values are refused at encode.
Decoding refuses a payload whose length is not exact for the declared shape,
and scales that are negative, NaN or infinite.
"""

from __future__ import annotations

import numpy as np

from gossip.compression.base import (
    FLOAT32_MAX,
    TensorCodec,
    element_count,
    register,
    require_float,
)

BLOCK = 256
LEVELS = 127
_SCALE = np.dtype("<f4")
_SMALLEST_SUBNORMAL = np.float32(np.finfo(np.float32).smallest_subnormal)


def _block_count(count: int) -> int:
    return -(-count // BLOCK)


def block_scales(peak: np.ndarray) -> np.ndarray:
    """The float32 scale of each block from its peak ``max|x|`` (float32, finite, >= 0).

    ``peak / 127``, with two corrections; this is the one place the rule lives
    (the simulator's batched round trip calls it too).
    """
    peak = np.asarray(peak, dtype=np.float32)
    scales = peak / np.float32(LEVELS)
    scales[(scales == 0) & (peak > 0)] = _SMALLEST_SUBNORMAL
    # For subnormal peaks, peak / 127 rounds to a scale far below the quotient, so
    # |x| / scale could pass 127.5 and lose the error bound: step those scales up.
    # (Only those: normal scales stay as they are, which keeps re-encoding exact.)
    low = peak.astype(np.float64) > (LEVELS + 0.5) * scales.astype(np.float64)
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    # Near float32's limit, 127 * scale could round past it and decode as inf.
    overflowing = scales.astype(np.float64) * LEVELS > FLOAT32_MAX
    scales[overflowing] = np.nextafter(scales[overflowing], np.float32(0))
    return scales


def quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``values`` ([n, size], float) as the codec sends it: (scales, quantized).

    ``scales`` is float32 [n, ceil(size / 256)] (:func:`block_scales`), ``quantized``
    int8 [n, size], ``round(x / scale)`` (ties to even) within +-127. The one
    definition of the encoding: :class:`Int8Codec` writes its one row as bytes, and
    the simulator (:mod:`topologies.compression`) calls it on every node's row.
    ValueError for NaN or infinite values.
    """
    values = np.asarray(values)
    rows, count = values.shape
    blocks = _block_count(count)
    if count == 0:
        return np.zeros((rows, 0), dtype=_SCALE), np.zeros((rows, 0), dtype=np.int8)
    if values.dtype != np.float32:
        values = np.clip(values, -FLOAT32_MAX, FLOAT32_MAX)
    # Padded to whole blocks with zeros, which change no block's peak: then every
    # block is a row of one reshaped view and no value needs a Python loop.
    work = np.zeros((rows, blocks * BLOCK), dtype=np.float32)
    work[:, :count] = values
    grouped = work.reshape(rows, blocks, BLOCK)
    # max|x| from max and min, sparing a temporary of |x|; NaN propagates. abs():
    # an all -0.0 block must get the scale +0.0, as |x| gives.
    peak = np.abs(np.maximum(grouped.max(axis=2), -grouped.min(axis=2)))
    if not np.isfinite(peak).all():
        raise ValueError("codec 'int8' cannot encode NaN or infinite values")
    scales = block_scales(peak)
    divisors = np.where(scales > 0, scales, np.float32(1))  # a zero block stays zero
    np.divide(grouped, divisors[:, :, None], out=grouped)
    np.rint(grouped, out=grouped)
    np.clip(grouped, -LEVELS, LEVELS, out=grouped)  # never wrap around in the int8 cast
    return scales, work[:, :count].astype(np.int8)


def dequantize_rows(scales: np.ndarray, quantized: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """What a receiver reads for each row: ``q * scale`` as ``dtype`` ([n, size]).

    The product is taken in float32 for float16/float32 tensors, float64 for
    float64, then cast; the codec's decode and the simulator both call this.
    """
    rows, count = quantized.shape
    blocks = _block_count(count)
    work_dtype = np.float64 if np.dtype(dtype).itemsize > 4 else np.float32
    values = np.zeros((rows, blocks * BLOCK), dtype=work_dtype)
    values[:, :count] = quantized
    grouped = values.reshape(rows, blocks, BLOCK)
    grouped *= np.asarray(scales).astype(work_dtype, copy=False)[:, :, None]
    return values[:, :count].astype(dtype, copy=False)


class Int8Codec(TensorCodec):
    id = "int8"

    def size_for(self, count: int, dtype: np.dtype) -> int:
        return count + _SCALE.itemsize * _block_count(count)

    def encode_into(self, array: np.ndarray, out: memoryview) -> None:
        require_float(self.id, array)
        blocks = _block_count(array.size)
        scales, quantized = quantize_rows(array.reshape(1, -1))
        np.frombuffer(out, dtype=_SCALE, count=blocks)[:] = scales[0]
        np.frombuffer(out, dtype=np.int8, offset=blocks * _SCALE.itemsize)[:] = quantized[0]

    def decode(self, payload: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if dtype.kind != "f":
            raise ValueError(f"int8 payload declared as {dtype.name}, a non-float dtype")
        count = element_count(shape)
        blocks = _block_count(count)
        expected = count + _SCALE.itemsize * blocks
        if len(payload) != expected:
            raise ValueError(
                f"int8 payload has {len(payload)} bytes, shape {shape} needs {expected}"
            )
        scales = np.frombuffer(payload, dtype=_SCALE, count=blocks)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise ValueError("int8 payload has a negative, NaN or infinite scale")
        quantized = np.frombuffer(payload, dtype=np.int8, offset=blocks * _SCALE.itemsize)
        return dequantize_rows(scales[None], quantized[None], dtype)[0].reshape(shape)


register(Int8Codec())
