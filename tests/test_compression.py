"""Tensor codecs: each codec's stated error bound, payload sizes, strict decoding,
error feedback, and the whole signed-update path with a compressed payload."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossip import codec
from gossip.compression import (
    ErrorFeedback,
    Fp16Codec,
    Int8Codec,
    RawCodec,
    TensorCodec,
    TopKCodec,
    resolve_codec,
)
from gossip.compression import base as registry
from gossip.compression.feedback import round_trip
from gossip.compression.fp16 import HALF_MAX
from gossip.compression.int8 import BLOCK
from gossip.errors import InvalidUpdate, Reason
from gossip.keys import NodeKey
from gossip.layout import ModelLayout
from gossip.update import Update

pytestmark = pytest.mark.property

F32 = np.dtype("<f4")
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)

# Zeros, subnormals, values near float32's limits, and everything between.
float32_arrays = hnp.arrays(
    F32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)
float64_arrays = hnp.arrays(
    np.dtype("<f8"),
    st.integers(0, 700).map(lambda n: (n,)),
    elements=st.floats(min_value=-1e300, max_value=1e300, allow_nan=False),
)


def payload_of(tensor_codec: TensorCodec, array: np.ndarray) -> bytearray:
    payload = bytearray(tensor_codec.payload_size(array))
    tensor_codec.encode_into(array, memoryview(payload))
    return payload


def decode(tensor_codec: TensorCodec, payload: bytes | bytearray, array: np.ndarray) -> np.ndarray:
    return tensor_codec.decode(memoryview(payload), array.dtype, array.shape)


def int8_scales(payload: bytearray, count: int) -> np.ndarray:
    return np.frombuffer(payload, dtype=F32, count=-(-count // BLOCK))


# --- round trips within each codec's stated bound -------------------------------------


@given(st.one_of(float32_arrays, float64_arrays, hnp.arrays(np.int64, 30)))
def test_raw_round_trip_is_exact(array: np.ndarray) -> None:
    decoded = round_trip(RawCodec(), array)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert np.array_equal(decoded, array)


@given(float32_arrays)
def test_fp16_within_half_precision_after_clipping(array: np.ndarray) -> None:
    decoded = round_trip(Fp16Codec(), array)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    clipped = np.clip(array.astype(np.float64), -HALF_MAX, HALF_MAX)
    bound = np.maximum(np.abs(clipped) * 2.0**-11, 2.0**-25)
    assert (np.abs(decoded - clipped) <= bound).all()


def test_fp16_clips_beyond_half_range_instead_of_overflowing() -> None:
    array = np.array([1e5, -3e38, 65519.0, 70000.0], dtype=np.float32)
    assert round_trip(Fp16Codec(), array).tolist() == [HALF_MAX, -HALF_MAX, HALF_MAX, HALF_MAX]


@given(float32_arrays)
def test_int8_error_at_most_half_a_step_per_block(array: np.ndarray) -> None:
    int8 = Int8Codec()
    payload = payload_of(int8, array)
    decoded = decode(int8, payload, array)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    scales = np.repeat(int8_scales(payload, array.size).astype(np.float64), BLOCK)[: array.size]
    error = np.abs(decoded.reshape(-1).astype(np.float64) - array.reshape(-1))
    assert (error <= scales * (0.5 + 2.0**-16) + F32_TINY).all()


@given(float64_arrays)
def test_int8_float64_bound_holds_against_the_float32_clipped_values(array: np.ndarray) -> None:
    int8 = Int8Codec()
    payload = payload_of(int8, array)
    decoded = decode(int8, payload, array)
    assert decoded.dtype == np.float64
    reference = np.clip(array, -F32_MAX, F32_MAX)
    scales = np.repeat(int8_scales(payload, array.size).astype(np.float64), BLOCK)[: array.size]
    slack = np.abs(reference) * 2.0**-23 + F32_TINY  # the float32 rounding of x itself
    assert (np.abs(decoded - reference) <= scales * (0.5 + 2.0**-16) + slack).all()


def test_int8_zero_block_is_exact_and_scale_is_max_over_127() -> None:
    array = np.concatenate([np.zeros(BLOCK), np.linspace(-2.54, 1.0, BLOCK)]).astype(np.float32)
    payload = payload_of(Int8Codec(), array)
    assert int8_scales(payload, array.size).tolist() == pytest.approx([0.0, 0.02])
    assert (decode(Int8Codec(), payload, array)[:BLOCK] == 0).all()


def test_int8_keeps_blocks_of_tiny_values_within_bound() -> None:
    array = np.array([1e-44, -3e-45, 0.0], dtype=np.float32)  # max/127 underflows to 0
    decoded = round_trip(Int8Codec(), array)
    assert np.abs(decoded - array).max() <= F32_TINY / 2


def _check_topk(tensor_codec: TopKCodec, array: np.ndarray) -> None:
    payload = payload_of(tensor_codec, array)
    decoded = decode(tensor_codec, payload, array).reshape(-1)
    flat = array.reshape(-1)
    k = tensor_codec.kept(flat.size)
    assert struct.unpack_from("<I", payload)[0] == k == max(1, math.ceil(0.1 * flat.size))
    kept = np.frombuffer(payload, dtype="<u4", count=k, offset=4).astype(np.int64)
    assert (np.diff(kept) > 0).all()
    dropped = np.ones(flat.size, dtype=bool)
    dropped[kept] = False
    assert (decoded[kept] == flat[kept]).all()
    assert (decoded[dropped] == 0).all()
    if dropped.any():
        assert np.abs(flat[dropped]).max() <= np.abs(flat[kept]).min()


@given(float32_arrays.filter(lambda a: a.size > 0))
def test_topk_keeps_exactly_the_largest_values(array: np.ndarray) -> None:
    _check_topk(TopKCodec(0.1), array)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["normal", "sparse", "ties", "spikes"]),
    st.integers(0, 2**32 - 1),
)
def test_topk_sampled_selection_on_large_tensors_is_exact(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 200_003
    if kind == "normal":
        array = rng.standard_normal(size)
    elif kind == "sparse":  # fewer nonzeros than k: the sampled threshold is 0
        array = np.zeros(size)
        array[rng.choice(size, 5000, replace=False)] = rng.standard_normal(5000)
    elif kind == "ties":
        array = rng.integers(-3, 4, size).astype(np.float64)
    else:  # large values on the sample's stride: the sample overestimates them
        array = rng.standard_normal(size)
        array[:: size // 2**15] *= 1000
    _check_topk(TopKCodec(0.1), array.astype(np.float32))


# --- payload sizes ----------------------------------------------------------------------


def test_int8_payload_is_about_a_quarter_of_float32() -> None:
    array = np.ones(1_000_000, dtype=np.float32)
    size = Int8Codec().payload_size(array)
    assert size == array.size + 4 * math.ceil(array.size / BLOCK)
    assert 3.9 < array.nbytes / size < 4


def test_fp16_payload_is_half_of_float32() -> None:
    array = np.ones((300, 7), dtype=np.float32)
    assert Fp16Codec().payload_size(array) * 2 == array.nbytes


def test_topk_one_percent_payload_is_a_fiftieth_of_float32() -> None:
    array = np.ones(1_000_000, dtype=np.float32)
    topk = resolve_codec("topk:0.01")
    assert topk is not None
    size = len(payload_of(topk, array))
    assert size == 4 + 8 * 10_000
    assert size <= array.nbytes / 50 + 4  # 8 bytes per kept value, plus the count


# --- the registry -----------------------------------------------------------------------


def test_resolve_codec_builds_topk_from_its_id() -> None:
    topk = resolve_codec("topk:0.01")
    assert isinstance(topk, TopKCodec)
    assert topk.id == "topk:0.01" and topk.fraction == 0.01
    assert resolve_codec("topk:1").kept(10) == 10  # type: ignore[union-attr]
    for name, kind in [("raw", RawCodec), ("fp16", Fp16Codec), ("int8", Int8Codec)]:
        assert isinstance(resolve_codec(name), kind)


@pytest.mark.parametrize(
    "codec_id",
    ["topk", "topk:", "topk:0", "topk:0.0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:inf",
     "topk: 0.1", "topk:1e-2", "topk:0.1:2", "int8:0.1", "nosuch", ""],
)  # fmt: skip
def test_resolve_codec_refuses_unknown_or_malformed_ids(codec_id: str) -> None:
    assert resolve_codec(codec_id) is None


# --- refusing what cannot be encoded ----------------------------------------------------

LOSSY = [Fp16Codec(), Int8Codec(), TopKCodec(0.5)]


@pytest.mark.parametrize("tensor_codec", LOSSY, ids=lambda c: c.id)
def test_lossy_codecs_refuse_integer_tensors(tensor_codec: TensorCodec) -> None:
    array = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError, match="floating-point tensors only"):
        payload_of(tensor_codec, array)


@pytest.mark.parametrize("tensor_codec", LOSSY, ids=lambda c: c.id)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lossy_codecs_refuse_non_finite_values(tensor_codec: TensorCodec, bad: float) -> None:
    array = np.ones(600, dtype=np.float32)
    array[300] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        payload_of(tensor_codec, array)


# --- strict decoding --------------------------------------------------------------------

ARRAY = np.random.default_rng(7).standard_normal(300).astype(np.float32)
ALL = [RawCodec(), *LOSSY]


@pytest.mark.parametrize("tensor_codec", ALL, ids=lambda c: c.id)
@pytest.mark.parametrize("change", ["short", "long", "empty"])
def test_decode_refuses_a_payload_of_the_wrong_length(
    tensor_codec: TensorCodec, change: str
) -> None:
    payload = payload_of(tensor_codec, ARRAY)
    corrupt = {"short": payload[:-1], "long": payload + b"\0", "empty": b""}[change]
    with pytest.raises(ValueError):
        decode(tensor_codec, corrupt, ARRAY)


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0])
def test_int8_decode_refuses_bad_scales(scale: float) -> None:
    payload = payload_of(Int8Codec(), ARRAY)
    struct.pack_into("<f", payload, 4, scale)  # the second block's scale
    with pytest.raises(ValueError, match="scale"):
        decode(Int8Codec(), payload, ARRAY)


def _corrupt_topk_indices(payload: bytearray, change: str) -> None:
    k = struct.unpack_from("<I", payload)[0]
    indices = np.frombuffer(payload, dtype="<u4", count=k, offset=4)
    if change == "unsorted":
        indices[[0, 1]] = indices[[1, 0]]
    elif change == "repeated":
        indices[1] = indices[0]
    elif change == "out-of-range":
        indices[-1] = ARRAY.size
    else:
        indices[-1] = 2**32 - 1


@pytest.mark.parametrize("change", ["unsorted", "repeated", "out-of-range", "huge"])
def test_topk_decode_refuses_bad_indices(change: str) -> None:
    topk = TopKCodec(0.5)
    payload = payload_of(topk, ARRAY)
    _corrupt_topk_indices(payload, change)
    with pytest.raises(ValueError, match="indices"):
        decode(topk, payload, ARRAY)


@pytest.mark.parametrize("count", [0, 149, 151, ARRAY.size + 1, 2**32 - 1])
def test_topk_decode_refuses_a_count_other_than_k(count: int) -> None:
    topk = TopKCodec(0.5)
    payload = payload_of(topk, ARRAY)
    struct.pack_into("<I", payload, 0, count)
    with pytest.raises(ValueError, match="keeps"):
        decode(topk, payload, ARRAY)


@pytest.mark.parametrize("tensor_codec", LOSSY, ids=lambda c: c.id)
def test_lossy_decode_refuses_a_non_float_declared_dtype(tensor_codec: TensorCodec) -> None:
    payload = payload_of(tensor_codec, ARRAY)
    with pytest.raises(ValueError, match="non-float"):
        tensor_codec.decode(memoryview(payload), np.dtype("<i4"), ARRAY.shape)


def test_empty_tensors_round_trip() -> None:
    for tensor_codec in ALL:
        empty = np.zeros((0, 3), dtype=np.float32)
        assert round_trip(tensor_codec, empty).shape == (0, 3)


# --- error feedback ---------------------------------------------------------------------


def _mean_error_after(feedback: ErrorFeedback | None, vector: np.ndarray, rounds: int) -> float:
    topk = TopKCodec(0.05)
    total = np.zeros_like(vector, dtype=np.float64)
    for _ in range(rounds):
        sent = feedback.compress(vector) if feedback else round_trip(topk, vector)
        assert np.count_nonzero(sent) <= topk.kept(vector.size)
        total += sent
    return float(np.abs(total / rounds - vector).max())


def test_error_feedback_running_mean_converges_to_the_vector() -> None:
    vector = np.random.default_rng(3).standard_normal(400).astype(np.float32)
    errors = [
        _mean_error_after(ErrorFeedback(TopKCodec(0.05)), vector, rounds)
        for rounds in (100, 1000, 4000)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * np.abs(vector).max()


def test_without_error_feedback_top_k_loses_the_dropped_part_for_good() -> None:
    vector = np.random.default_rng(3).standard_normal(400).astype(np.float32)
    assert _mean_error_after(None, vector, 1000) > 0.5 * np.abs(vector).max()


@given(st.integers(0, 2**32 - 1), st.sampled_from(["fp16", "int8", "topk:0.1"]))
@settings(max_examples=25, deadline=None)
def test_error_feedback_sent_plus_memory_is_everything_asked(seed: int, codec_id: str) -> None:
    rng = np.random.default_rng(seed)
    tensor_codec = resolve_codec(codec_id)
    assert tensor_codec is not None
    feedback = ErrorFeedback(tensor_codec)
    asked = np.zeros(50)
    sent = np.zeros(50)
    for _ in range(20):
        vector = rng.standard_normal(50).astype(np.float32)
        transmitted = feedback.compress(vector)
        assert transmitted.dtype == np.float32
        # What is sent is exactly what a receiver decodes, even when encoded again.
        assert np.array_equal(round_trip(tensor_codec, transmitted), transmitted)
        asked += vector
        sent += transmitted
    assert feedback.memory is not None
    np.testing.assert_allclose(sent + feedback.memory, asked, atol=1e-9)


def test_error_feedback_refuses_a_tensor_of_another_shape() -> None:
    feedback = ErrorFeedback(Int8Codec())
    feedback.compress(np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError, match="one ErrorFeedback per tensor"):
        feedback.compress(np.ones(11, dtype=np.float32))
    feedback.reset()
    assert feedback.compress(np.ones(11, dtype=np.float32)).shape == (11,)


# --- the signed update, end to end ------------------------------------------------------

KEY = NodeKey.generate()
TENSORS = {
    "weight": np.random.default_rng(1).standard_normal((64, 33)).astype(np.float32),
    "bias": np.linspace(-1, 1, 33, dtype=np.float32),
}


def _update(codec_id: str) -> Update:
    return Update(
        sender=KEY.public_key,
        seq=1,
        samples=10,
        weight=0.5,
        fingerprint=ModelLayout.of(TENSORS).fingerprint,
        created_at=0.0,
        tensors=TENSORS,
        codec=codec_id,
    )


@pytest.mark.parametrize("codec_id", ["raw", "fp16", "int8", "topk:0.1"])
def test_signed_update_round_trip_with_each_codec(codec_id: str) -> None:
    message = codec.encode(_update(codec_id), KEY)
    received = codec.decode(message)
    assert received.codec == codec_id
    tensor_codec = resolve_codec(codec_id)
    assert tensor_codec is not None
    for name, array in TENSORS.items():
        assert received.tensors[name].dtype == array.dtype
        assert np.array_equal(received.tensors[name], round_trip(tensor_codec, array))


def test_compressed_updates_are_smaller_on_the_wire() -> None:
    sizes = {c: len(codec.encode(_update(c), KEY)) for c in ["raw", "fp16", "int8", "topk:0.01"]}
    assert sizes["raw"] > 1.9 * sizes["fp16"] > 1.9 * sizes["int8"] > 1.9 * sizes["topk:0.01"]


class _SecretCodec(RawCodec):
    id = "secret-codec"


def test_unknown_codec_is_rejected_as_unknown_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setitem(registry._CODECS, _SecretCodec.id, _SecretCodec())
        message = codec.encode(_update(_SecretCodec.id), KEY)
        assert codec.decode(message).codec == _SecretCodec.id
    with pytest.raises(InvalidUpdate) as raised:
        codec.decode(message)
    assert raised.value.reason is Reason.UNKNOWN_CODEC


def test_topk_id_with_a_bad_fraction_is_an_unknown_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setitem(registry._CODECS, "topk:2", TopKCodec(1.0, "topk:2"))
        message = codec.encode(_update("topk:2"), KEY)
    with pytest.raises(InvalidUpdate) as raised:
        codec.decode(message)
    assert raised.value.reason is Reason.UNKNOWN_CODEC


def test_corrupt_compressed_payload_is_malformed_not_a_crash() -> None:
    signed = codec.parse(codec.encode(_update("int8"), KEY))
    header = dict(signed.header)
    scales = bytearray(signed.payloads)
    struct.pack_into("<f", scales, 0, float("nan"))
    corrupt = codec.SignedHeader(header, signed.signature, signed.body, memoryview(scales))
    with pytest.raises(InvalidUpdate) as raised:
        codec.decode_tensors(corrupt)
    assert raised.value.reason is Reason.MALFORMED


def test_gossip_node_with_a_lossy_codec_keeps_its_error_in_feedback() -> None:
    from gossip import GossipNode, NodeKey
    from gossip import codec as wire

    vector = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    node = GossipNode.create(NodeKey(bytes(32)), {"w": vector}, samples=1, codec_id="int8")
    sent = []
    for _ in range(200):
        outgoing = node.prepare(0, 0.0)
        sent.append(wire.decode(outgoing.message).tensors["w"].astype(np.float64))
    # Each message is quantized, but their running mean converges to the model.
    single_error = np.abs(sent[0] - vector).max()
    mean_error = np.abs(np.mean(sent, axis=0) - vector).max()
    assert single_error > 0
    assert mean_error < single_error / 20


def test_int8_subnormal_block_keeps_its_sign_and_error_bound() -> None:
    # Found by hypothesis: peak / 127 rounded to a subnormal scale far below the
    # quotient, so round(x / scale) passed 127 and wrapped to a negative int8.
    array = np.array([3.78e-43, -1.0e-44], dtype=np.float32)
    decoded = round_trip(Int8Codec(), array)
    assert np.sign(decoded[0]) == 1
    scale = np.frombuffer(bytes(_int8_payload(array)[:4]), dtype="<f4")[0]
    assert np.all(np.abs(decoded - array) <= scale / 2 + np.finfo(np.float32).smallest_subnormal)


def _int8_payload(array: np.ndarray) -> bytearray:
    codec = Int8Codec()
    payload = bytearray(codec.payload_size(array))
    codec.encode_into(array, memoryview(payload))
    return payload


def _wire_pinned_arrays() -> list[np.ndarray]:
    """Seeded tensors over every float dtype and block boundary, edges included."""
    rng = np.random.default_rng(21)
    f32 = np.finfo(np.float32)
    edges = np.array(
        [0.0, -0.0, f32.smallest_subnormal, -f32.smallest_subnormal, 1e-40, f32.tiny]
        + [1.0, -1.0, 3e38, f32.max, -f32.max, 1e-44, -3e-45]
    )
    arrays = []
    for dtype in (np.float16, np.float32, np.float64):
        for size in (1, 3, 255, 256, 257, 600, 1000):
            normal = rng.standard_normal(size) * 10.0 ** rng.integers(-40, 38, size)
            mixed = np.where(rng.random(size) < 0.3, rng.choice(edges, size), normal)
            with np.errstate(over="ignore"):
                array = mixed.astype(dtype)
            array[~np.isfinite(array)] = 0
            arrays.append(array)
    arrays.append(np.full(300, np.finfo(np.float64).max))  # beyond float32: clipped first
    arrays.append(np.zeros((4, 70), dtype=np.float32))
    arrays.append(np.full(256, -0.0, dtype=np.float32))  # scale +0.0, as |x| gives
    return arrays


def test_int8_wire_bytes_are_pinned() -> None:
    """The daemon's int8 bytes, hashed as the codec wrote them before issue 21 made its
    rule the simulator's too: any change to the encoding fails here."""
    digest = hashlib.sha256()
    with np.errstate(over="ignore"):  # float16 tensors: the float32 clip bounds overflow
        for array in _wire_pinned_arrays():
            digest.update(_int8_payload(array))
    assert digest.hexdigest() == "45691b275162c1d576f57ea7d3d877ae86dba1afe83025cdb41b3fef3f87026f"
