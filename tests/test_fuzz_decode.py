"""Fuzzing the decoder and admission: any bytes give an Update or InvalidUpdate, nothing else.

Four kinds of input, from shallow to deep:

* arbitrary bytes;
* a well-formed envelope (magic, version, header length) around arbitrary msgpack;
* valid messages mutated (bytes flipped, truncated, extended, header spliced),
  optionally re-signed so that the mutation gets past the signature check;
* near-valid headers, properly signed, with a few fields corrupted: these reach
  tensor decoding, the layout check and the value check.

For every input, ``decode`` must return an Update or raise InvalidUpdate, and a
GossipNode fed the same bytes must return a verdict without raising and must
leave its model untouched unless the verdict is Accepted.
"""

from __future__ import annotations

import struct

import blake3
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import Accepted, GossipNode, InvalidUpdate, NodeKey, Rejected, Update, decode, encode
from gossip.codec import FORMAT_VERSION, HEADER_FIELDS, MAGIC, MAX_SEQ, SIGNING_DOMAIN
from gossip.layout import ALLOWED_DTYPES, ModelLayout

pytestmark = pytest.mark.property

NOW = 1_700_000_000.0
SENDER = NodeKey(bytes([7]) * 32)
RECEIVER = NodeKey(bytes([8]) * 32)
MODEL = {"v": np.zeros(4)}
FINGERPRINT = ModelLayout.of(MODEL).fingerprint
GOOD_ENTRY = {"name": "v", "dtype": "float64", "shape": [4], "size": 32}

DEFAULT = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sign(body: bytes, key: NodeKey = SENDER) -> bytes:
    """Wrap ``body`` (header length + header + payloads) as the spec says, signed by ``key``."""
    signature = key.sign(SIGNING_DOMAIN + blake3.blake3(body).digest())
    return MAGIC + bytes([FORMAT_VERSION]) + signature + body


def envelope(header: bytes, payloads: bytes, key: NodeKey = SENDER) -> bytes:
    return sign(struct.pack("<I", len(header)) + header + payloads, key)


def base_messages() -> list[bytes]:
    updates = [
        Update(SENDER.public_key, 1, 10, 0.5, FINGERPRINT, NOW, {"v": np.arange(4.0)}),
        Update(
            SENDER.public_key,
            2**40,
            3,
            1.0,
            bytes(32),
            NOW - 30.0,
            {"a": np.ones((2, 3), np.float32), "b": np.arange(5, dtype=np.int8)},
        ),
        Update(SENDER.public_key, 3, 0, 0.0, FINGERPRINT, NOW, {}),
    ]
    return [bytes(encode(update, SENDER)) for update in updates]


BASES = base_messages()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32), st.integers(0, 999_999_999))
)
msgpack_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=12) | st.binary(max_size=4) | st.integers(-99, 99),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)
packed_values = msgpack_values.map(lambda value: msgpack.packb(value, use_bin_type=True))

raw_bytes = st.binary(max_size=600)

enveloped = st.builds(
    lambda header, payloads, signed: (
        envelope(header, payloads)
        if signed
        else MAGIC
        + bytes([FORMAT_VERSION])
        + bytes(64)
        + struct.pack("<I", len(header))
        + header
        + payloads
    ),
    packed_values,
    st.binary(max_size=64),
    st.booleans(),
)


def resign(message: bytes) -> bytes:
    return sign(bytes(message[69:])) if len(message) >= 73 else message


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    message = bytearray(draw(st.sampled_from(BASES)))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "overwrite"]))
    if kind == "flip":
        for position, mask in draw(
            st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6)
        ):
            message[position % len(message)] ^= mask
    elif kind == "truncate":
        del message[draw(st.integers(0, len(message) - 1)) :]
    elif kind == "extend":
        message += draw(st.binary(min_size=1, max_size=64))
    elif kind == "splice":
        (length,) = struct.unpack_from("<I", message, 69)
        header = draw(packed_values)
        if draw(st.booleans()):
            struct.pack_into("<I", message, 69, len(header))
        message[73 : 73 + length] = header
    else:
        position = draw(st.integers(0, len(message) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        message[position : position + len(chunk)] = chunk
    if draw(st.booleans()):
        return resign(bytes(message))
    return bytes(message)


def _entry_size(entry: dict) -> int:
    dtype = ALLOWED_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape = entry.get("shape")
    if dtype is None or type(shape) is not list or not all(type(d) is int for d in shape):
        return 0
    count = 1
    for dim in shape:
        count *= dim
    return max(0, min(count * dtype.itemsize, 256))


@st.composite
def tensor_entries(draw: st.DrawFn) -> dict:
    if draw(st.integers(0, 2)) == 0:
        entry = dict(GOOD_ENTRY)
    else:
        dims = st.integers(0, 6) | st.sampled_from([2**31, 2**32, 2**62, MAX_SEQ, -1])
        entry = {
            "name": draw(st.sampled_from(["v", "w", ""]) | st.text(max_size=8)),
            "dtype": draw(
                st.sampled_from(sorted(ALLOWED_DTYPES) + ["float128", "bool", ">f4", "<f4"])
            ),
            "shape": draw(st.lists(dims, max_size=9)),
            "size": 0,
        }
        entry["size"] = _entry_size(entry)
    if draw(st.integers(0, 4)) == 0:
        field = draw(st.sampled_from(["name", "dtype", "shape", "size", "extra"]))
        entry[field] = draw(msgpack_values)
    if draw(st.integers(0, 9)) == 0:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    # A quarter of the examples are valid, so the checks after decoding get exercised.
    clean = draw(st.integers(0, 3)) == 0
    entries = [dict(GOOD_ENTRY)] if clean else draw(st.lists(tensor_entries(), max_size=3))
    header = {
        "sender": SENDER.public_key,
        "seq": draw(st.integers(0, MAX_SEQ)),
        "samples": draw(st.integers(0, 1000)),
        "weight": draw(st.floats(0.0, 1e6)),
        "fingerprint": FINGERPRINT,
        "created_at": NOW - draw(st.floats(-30.0, 30.0)),
        "codec": "raw",
        "tensors": entries,
    }
    if not clean:
        for field in draw(st.sets(st.sampled_from(sorted(HEADER_FIELDS)), max_size=2)):
            header[field] = draw(msgpack_values)
        if draw(st.integers(0, 9)) == 0:
            header.pop(draw(st.sampled_from(sorted(header))))
        if draw(st.integers(0, 9)) == 0:
            header[draw(st.text(max_size=8))] = draw(msgpack_values)
    declared = sum(
        entry["size"]
        for entry in entries
        if isinstance(entry, dict) and type(entry.get("size")) is int and 0 <= entry["size"] < 4096
    )
    if not clean and draw(st.integers(0, 4)) == 0:
        payloads = draw(st.binary(max_size=300))
    elif clean or draw(st.booleans()):
        values = np.random.default_rng(draw(st.integers(0, 2**32))).random(declared // 8 + 1)
        payloads = values.tobytes()[:declared]
    else:
        payloads = draw(st.binary(min_size=declared, max_size=declared))
    return envelope(msgpack.packb(header, use_bin_type=True), payloads)


any_input = st.one_of(raw_bytes, enveloped, mutated(), near_valid())


def decode_property(data: bytes) -> bool:
    """Returns whether decode succeeded; any exception but InvalidUpdate escapes."""
    try:
        result = decode(data)
    except InvalidUpdate:
        return False
    assert isinstance(result, Update)
    return True


def node_property(data: bytes, decoded: bool) -> None:
    node = GossipNode.create(RECEIVER, {"v": np.arange(4.0)}, 10)
    before, weight = node.estimate.copy(), node.pushsum.weight
    verdict = node.receive(data, NOW)
    node.merge()
    if isinstance(verdict, Rejected):
        assert node.admission.rejected[verdict.reason] == 1
        np.testing.assert_array_equal(node.estimate, before)
        assert node.pushsum.weight == weight
    else:
        assert isinstance(verdict, Accepted)
        assert decoded, "admission accepted what decode refused"
        assert np.isfinite(node.estimate).all()


def check(data: bytes) -> None:
    node_property(data, decode_property(data))


@DEFAULT
@given(raw_bytes)
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@DEFAULT
@given(enveloped)
def test_arbitrary_msgpack_in_a_valid_envelope(data: bytes) -> None:
    check(data)


@DEFAULT
@given(mutated())
def test_mutated_valid_messages(data: bytes) -> None:
    check(data)


@DEFAULT
@given(near_valid())
def test_signed_near_valid_headers(data: bytes) -> None:
    check(data)


def test_the_near_valid_strategy_reaches_acceptance() -> None:
    """Guard against a fuzzer that only ever exercises the first check."""
    accepted = 0

    @settings(max_examples=300, deadline=None, database=None)
    @given(near_valid())
    def count(data: bytes) -> None:
        nonlocal accepted
        node = GossipNode.create(RECEIVER, {"v": np.arange(4.0)}, 10)
        accepted += node.receive(data, NOW).accepted

    count()
    assert accepted > 0


@pytest.mark.slow
@settings(
    max_examples=100_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(any_input)
def test_soak_any_input(data: bytes) -> None:
    check(data)
