"""The update codec: round trips, the exact byte layout, and what encode refuses."""

from __future__ import annotations

import hashlib
import struct

import blake3
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossip import InvalidUpdate, NodeKey, Reason, Update, decode, encode
from gossip.codec import (
    FORMAT_VERSION,
    MAGIC,
    MAX_SEQ,
    PREFIX_BYTES,
    SIGNING_DOMAIN,
    parse,
)
from gossip.keys import verify
from gossip.layout import ALLOWED_DTYPES, TensorSpec, model_fingerprint

pytestmark = pytest.mark.property

KEYS = [NodeKey(bytes([i]) * 32) for i in range(1, 4)]


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, np.ndarray]:
    # Any text but control characters, which the fingerprint's tab/newline framing forbids.
    name_text = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=256)
    names = draw(st.lists(name_text, max_size=5, unique=True))
    result = {}
    for name in names:
        dtype = ALLOWED_DTYPES[draw(st.sampled_from(sorted(ALLOWED_DTYPES)))]
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
        result[name] = draw(hnp.arrays(dtype, shape))
    return result


@st.composite
def updates(draw: st.DrawFn) -> tuple[Update, NodeKey]:
    key = draw(st.sampled_from(KEYS))
    update = Update(
        sender=key.public_key,
        seq=draw(st.integers(0, MAX_SEQ)),
        samples=draw(st.integers(0, MAX_SEQ)),
        weight=draw(st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)),
        fingerprint=draw(st.binary(min_size=32, max_size=32)),
        created_at=draw(st.floats(allow_nan=False, allow_infinity=False)),
        tensors=draw(tensors()),
    )
    return update, key


@settings(max_examples=300, deadline=None)
@given(updates())
def test_encode_then_decode_gives_back_the_same_update(pair: tuple[Update, NodeKey]) -> None:
    update, key = pair
    decoded = decode(bytes(encode(update, key)))
    assert decoded.same_as(update)
    # same_as treats -0.0 == 0.0 and any NaN alike; the raw codec is bit-exact.
    for name, array in update.tensors.items():
        assert decoded.tensors[name].tobytes() == np.ascontiguousarray(array).tobytes()


def small_update(key: NodeKey = KEYS[0], **changes: object) -> Update:
    fields = dict(
        sender=key.public_key,
        seq=7,
        samples=120,
        weight=0.25,
        fingerprint=bytes(range(32)),
        created_at=1_700_000_000.5,
        tensors={
            "layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
            "layer.bias": np.array([-1, 1], dtype=np.int16),
        },
    )
    fields.update(changes)
    return Update(**fields)  # type: ignore[arg-type]


def spec_encode(header: dict, payloads: list[bytes], key: NodeKey) -> bytes:
    """An encoder written from docs/PROTOCOL.md alone, to check the code against the spec."""
    header_bytes = msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(payloads)
    signature = key.sign(SIGNING_DOMAIN + blake3.blake3(body).digest())
    return MAGIC + bytes([FORMAT_VERSION]) + signature + body


def test_message_matches_an_encoder_written_from_the_spec() -> None:
    update = small_update()
    header = {
        "sender": update.sender,
        "seq": 7,
        "samples": 120,
        "weight": 0.25,
        "fingerprint": bytes(range(32)),
        "created_at": 1_700_000_000.5,
        "codec": "raw",
        "tensors": [
            {"name": "layer.weight", "dtype": "float32", "shape": [2, 3], "size": 24},
            {"name": "layer.bias", "dtype": "int16", "shape": [2], "size": 4},
        ],
    }
    payloads = [
        np.arange(6, dtype="<f4").tobytes(),
        np.array([-1, 1], dtype="<i2").tobytes(),
    ]
    assert bytes(encode(update, KEYS[0])) == spec_encode(header, payloads, KEYS[0])


def test_prefix_layout() -> None:
    message = bytes(encode(small_update(), KEYS[0]))
    assert PREFIX_BYTES == 73
    assert message[:4] == b"P2FU"
    assert message[4] == 1
    (header_length,) = struct.unpack_from("<I", message, 69)
    header = msgpack.unpackb(message[73 : 73 + header_length])
    assert sorted(header) == sorted(
        ["sender", "seq", "samples", "weight", "fingerprint", "created_at", "codec", "tensors"]
    )
    assert len(message) == 73 + header_length + 24 + 4
    assert message[-4:] == np.array([-1, 1], dtype="<i2").tobytes()


def test_signature_covers_domain_and_blake3_of_everything_after_it() -> None:
    message = bytes(encode(small_update(), KEYS[0]))
    signed = SIGNING_DOMAIN + blake3.blake3(message[69:]).digest()
    assert SIGNING_DOMAIN == b"p2pfl/update/v1\x00"
    assert verify(KEYS[0].public_key, signed, message[5:69])


def test_header_floats_are_msgpack_float64() -> None:
    message = bytes(encode(small_update(weight=0.5, created_at=2.0), KEYS[0]))
    assert msgpack.packb("weight") + b"\xcb" + struct.pack(">d", 0.5) in message
    assert msgpack.packb("created_at") + b"\xcb" + struct.pack(">d", 2.0) in message


def test_integral_weight_is_still_sent_as_a_float() -> None:
    decoded = decode(encode(small_update(weight=3, created_at=5), KEYS[0]))
    assert type(decoded.weight) is float
    assert type(decoded.created_at) is float


@pytest.mark.parametrize("container", [bytes, bytearray, memoryview])
def test_decode_accepts_any_bytes_like(container: type) -> None:
    update = small_update()
    assert decode(container(encode(update, KEYS[0]))).same_as(update)


def test_decoded_tensors_are_views_into_the_message() -> None:
    message = bytes(encode(small_update(), KEYS[0]))
    decoded = decode(message)
    assert not decoded.tensors["layer.weight"].flags.owndata
    assert not decoded.tensors["layer.weight"].flags.writeable


def test_big_endian_and_strided_tensors_are_sent_little_endian() -> None:
    values = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    update = small_update(tensors={"t": values})
    decoded = decode(encode(update, KEYS[0]))
    assert decoded.tensors["t"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(decoded.tensors["t"], values)


def test_large_update_round_trips_through_the_threaded_hash() -> None:
    update = small_update(tensors={"big": np.random.default_rng(0).random(1_500_000)})
    assert decode(encode(update, KEYS[0])).same_as(update)


def test_empty_model_round_trips() -> None:
    update = small_update(tensors={})
    message = encode(update, KEYS[0])
    assert decode(message).same_as(update)


def test_encode_refuses_a_key_that_is_not_the_sender() -> None:
    with pytest.raises(ValueError, match="sender"):
        encode(small_update(KEYS[0]), KEYS[1])


def test_encode_refuses_an_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        encode(small_update(codec="zstd"), KEYS[0])


@pytest.mark.parametrize("dtype", ["bool", "complex64", "float128", "uint64", "object"])
def test_encode_refuses_dtypes_outside_the_allowlist(dtype: str) -> None:
    try:
        array = np.zeros(2, dtype=dtype)
    except TypeError:
        pytest.skip(f"numpy has no {dtype} here")
    with pytest.raises(ValueError, match="allowlist"):
        encode(small_update(tensors={"t": array}), KEYS[0])


def test_oversize_is_decided_before_parsing() -> None:
    message = bytes(encode(small_update(), KEYS[0]))
    with pytest.raises(InvalidUpdate) as raised:
        decode(b"garbage" + message, max_size=len(message))
    assert raised.value.reason is Reason.OVERSIZE


def test_message_at_exactly_the_cap_is_accepted() -> None:
    message = bytes(encode(small_update(), KEYS[0]))
    assert decode(message, max_size=len(message)).seq == 7


def test_parse_does_not_verify_and_decode_does() -> None:
    message = bytearray(encode(small_update(), KEYS[0]))
    message[-1] ^= 0x01
    assert parse(message).seq == 7
    with pytest.raises(InvalidUpdate) as raised:
        decode(message)
    assert raised.value.reason is Reason.BAD_SIGNATURE


def test_invalid_update_message_names_the_reason() -> None:
    with pytest.raises(InvalidUpdate, match=r"^malformed: .*prefix"):
        decode(b"P2FU")


def test_fingerprint_definition() -> None:
    specs = [
        TensorSpec("w", "float32", (2, 3)),
        TensorSpec("b", "float32", ()),
        TensorSpec("e", "int8", (0,)),
    ]
    expected = hashlib.sha256(
        b"p2pfl/model-fingerprint/v1\nw\tfloat32\t2,3\nb\tfloat32\t\ne\tint8\t0\n"
    ).digest()
    assert model_fingerprint(specs) == expected


def test_fingerprint_depends_on_order_names_dtypes_and_shapes() -> None:
    base = [TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (3,))]
    variants = [
        base[::-1],
        [TensorSpec("a", "float32", (2,)), TensorSpec("c", "float32", (3,))],
        [TensorSpec("a", "float64", (2,)), TensorSpec("b", "float32", (3,))],
        [TensorSpec("a", "float32", (1, 2)), TensorSpec("b", "float32", (3,))],
    ]
    fingerprints = {model_fingerprint(specs) for specs in [base, *variants]}
    assert len(fingerprints) == 5


@pytest.mark.parametrize("name", ["a\tb", "a\nb", "\x00", "x\x7f"])
def test_tensor_names_with_control_characters_are_malformed(name: str) -> None:
    message = encode(small_update(tensors={name: np.zeros(1, np.float32)}), KEYS[0])
    with pytest.raises(InvalidUpdate) as raised:
        decode(message)
    assert raised.value.reason is Reason.MALFORMED
