"""Top-k sparsification: only the k largest-magnitude values, with their positions.

The id carries the kept fraction: ``topk:0.01`` keeps
``k = max(1, ceil(0.01 * n))`` of a tensor's n values (none of an empty
tensor), so 8 bytes per kept value plus 4: about 1/50 of float32 at 1%.
Payload, little-endian::

    [k, uint32][k indices into the flattened tensor, uint32, strictly increasing][k values, float32]

The receiver gets zeros everywhere else. Error: kept values are exact (up to
float32 rounding for float64 tensors, and clipping to float32's range);
every dropped value is no larger in magnitude than the smallest kept one.
Ties at the threshold go to the first values by position. On its own this is a biased
compressor meant for use under :class:`~gossip.compression.feedback.ErrorFeedback`.

Only floating-point tensors of fewer than 2**32 values; NaN and infinite
values are refused at encode. Decoding refuses any count other than this
codec's k for the declared shape, indices that are unsorted, repeated or out
of range, and any length other than exact.
"""

from __future__ import annotations

import math
import re

import numpy as np

from gossip.compression.base import (
    FLOAT32_MAX,
    TensorCodec,
    element_count,
    register_family,
    require_float,
)

FAMILY = "topk"
_INDEX = np.dtype("<u4")
_VALUE = np.dtype("<f4")
_MAX_COUNT = 2**32 - 1
_FRACTION_TEXT = re.compile(r"(?:0|1)?(?:\.[0-9]{1,17})?")
# Above this many values, find a threshold on a sample before selecting exactly.
_SAMPLED_SELECTION_FROM = 1 << 16
_SAMPLE_SIZE = 1 << 15


def _top_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of ``magnitude`` (all finite, 0 < k), ascending."""
    count = magnitude.size
    kth = None
    if count >= _SAMPLED_SELECTION_FROM and k * 4 <= count:
        kth = _kth_largest_from_sample(magnitude, k)
    if kth is None:
        kth = np.partition(magnitude, count - k)[count - k]
    chosen = choose_by_threshold(magnitude[None, :], np.asarray([kth], magnitude.dtype), k)
    return np.flatnonzero(chosen[0])


def top_mask_rows(magnitude: np.ndarray, k: int) -> np.ndarray:
    """For each row of ``magnitude`` ([n, size], finite, 0 < k <= size): which k entries to keep.

    The simulator's batched form of the codec's selection: the same threshold
    and the same tie rule (:func:`choose_by_threshold`), one row per node.
    """
    size = magnitude.shape[1]
    kth = np.partition(magnitude, size - k, axis=1)[:, size - k]
    return choose_by_threshold(magnitude, kth, k)


def choose_by_threshold(magnitude: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
    """Keep every entry above its row's k-th largest ``kth`` and, of those equal to it, the
    first ones by position until k are kept, so ties are deterministic (bool [n, size])."""
    threshold = kth[:, None]
    chosen = magnitude > threshold
    missing = k - np.count_nonzero(chosen, axis=1)
    tied = magnitude == threshold
    chosen |= tied & (np.cumsum(tied, axis=1) <= missing[:, None])
    return chosen


def _kth_largest_from_sample(magnitude: np.ndarray, k: int) -> float | None:
    """The k-th largest entry, partitioning only the band of values a sample brackets it in.

    A full partition of 10M values costs several memory copies. A strided
    sample gives two values that, for a random layout, lie 4 standard
    deviations (plus slack) above and below the k-th largest; only entries
    between them are partitioned. None when the sample misled (adversarial
    layouts, many ties): the caller then partitions everything, slower but
    just as exact.
    """
    count = magnitude.size
    sample = np.sort(magnitude[:: count // _SAMPLE_SIZE])
    expected = k * sample.size / count  # the k-th largest's rank from the top of the sample
    spread = 4 * math.sqrt(expected) + 16
    low_rank = min(sample.size, math.ceil(expected + spread))
    high_rank = math.floor(expected - spread)
    low = sample[sample.size - low_rank]
    high = sample[sample.size - high_rank] if high_rank > 0 else np.inf
    above = int(np.count_nonzero(magnitude > high))
    # With low = 0 (mostly-zero tensors), keep zeros out of the band: it would be everything.
    in_band = (magnitude > 0 if low == 0 else magnitude >= low) & (magnitude <= high)
    band = magnitude[np.flatnonzero(in_band)]
    needed = k - above
    if needed < 1:
        return None
    if band.size < needed:
        # Fewer than k nonzero entries at all: the k-th largest is 0.
        return 0.0 if low == 0 else None
    return float(np.partition(band, band.size - needed)[band.size - needed])


class TopKCodec(TensorCodec):
    def __init__(self, fraction: float, codec_id: str | None = None) -> None:
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.id = codec_id or f"{FAMILY}:{fraction}"

    def kept(self, count: int) -> int:
        """How many of ``count`` values this codec keeps."""
        return min(count, max(1, math.ceil(self.fraction * count)))

    def size_for(self, count: int, dtype: np.dtype) -> int:
        return _INDEX.itemsize + self.kept(count) * (_INDEX.itemsize + _VALUE.itemsize)

    def encode_into(self, array: np.ndarray, out: memoryview) -> None:
        require_float(self.id, array)
        count = array.size
        if count > _MAX_COUNT:
            raise ValueError(f"codec {self.id!r} indexes at most 2**32 - 1 values, got {count}")
        k = self.kept(count)
        np.frombuffer(out, dtype=_INDEX, count=1)[0] = k
        if k == 0:
            return
        values = array.reshape(-1)
        magnitude = np.abs(values)
        if not np.isfinite(magnitude.max()):  # NaN propagates through max
            raise ValueError(f"codec {self.id!r} cannot encode NaN or infinite values")
        indices = _top_indices(magnitude, k)
        np.frombuffer(out, dtype=_INDEX, count=k, offset=_INDEX.itemsize)[:] = indices
        kept = values[indices]
        if kept.dtype != np.float32:
            kept = np.clip(kept, -FLOAT32_MAX, FLOAT32_MAX)
        offset = _INDEX.itemsize * (1 + k)
        np.frombuffer(out, dtype=_VALUE, count=k, offset=offset)[:] = kept

    def decode(self, payload: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if dtype.kind != "f":
            raise ValueError(f"top-k payload declared as {dtype.name}, a non-float dtype")
        count = element_count(shape)
        if len(payload) < _INDEX.itemsize:
            raise ValueError(f"top-k payload of {len(payload)} bytes has no count")
        (k,) = np.frombuffer(payload, dtype=_INDEX, count=1).tolist()
        if k != self.kept(count):
            raise ValueError(
                f"top-k payload keeps {k} values, {self.id} keeps {self.kept(count)} of {count}"
            )
        expected = _INDEX.itemsize + k * (_INDEX.itemsize + _VALUE.itemsize)
        if len(payload) != expected:
            raise ValueError(f"top-k payload has {len(payload)} bytes, {k} entries need {expected}")
        decoded = np.zeros(count, dtype=dtype)
        if k == 0:
            return decoded.reshape(shape)
        indices = np.frombuffer(payload, dtype=_INDEX, count=k, offset=_INDEX.itemsize)
        if indices[-1] >= count or (k > 1 and not (indices[1:] > indices[:-1]).all()):
            raise ValueError("top-k indices must be strictly increasing and inside the tensor")
        values = np.frombuffer(payload, dtype=_VALUE, count=k, offset=_INDEX.itemsize * (1 + k))
        decoded[indices] = values
        return decoded.reshape(shape)


def topk_from_parameter(parameter: str) -> TopKCodec | None:
    """The codec for ``topk:PARAMETER``: a plain decimal in (0, 1], else None."""
    if not parameter or not _FRACTION_TEXT.fullmatch(parameter):
        return None
    fraction = float(parameter)
    if not 0 < fraction <= 1:
        return None
    return TopKCodec(fraction, f"{FAMILY}:{parameter}")


register_family(FAMILY, topk_from_parameter)
