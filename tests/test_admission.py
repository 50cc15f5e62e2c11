"""One test per rejection reason: exactly that bad update, reported, counted, and harmless.

Every case goes through a real GossipNode (receive, then merge) and checks that
the verdict names the reason, that ``admission.rejected`` counted it once, and
that the node's estimate and weight did not move.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3
import msgpack
import numpy as np
import pytest

from gossip import (
    Accepted,
    AdmissionPolicy,
    GossipNode,
    NodeKey,
    Reason,
    Rejected,
    Update,
    encode,
)
from gossip.codec import FORMAT_VERSION, MAGIC, SIGNING_DOMAIN
from gossip.layout import ModelLayout

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0
SENDER = NodeKey(bytes([1]) * 32)
OTHER = NodeKey(bytes([2]) * 32)
RECEIVER = NodeKey(bytes([3]) * 32)
MODEL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
LAYOUT = ModelLayout.of(MODEL)
FINGERPRINT = LAYOUT.fingerprint
MAX_AGE = 600.0
MAX_SKEW = 60.0


def receiver(**policy: object) -> GossipNode:
    initial = {"w": np.full((2, 3), 5.0, np.float32), "b": np.full(3, -5.0, np.float32)}
    settings = dict(fingerprint=FINGERPRINT, max_age_s=MAX_AGE, max_clock_skew_s=MAX_SKEW)
    settings.update(policy)
    return GossipNode.create(RECEIVER, initial, 50, AdmissionPolicy(**settings))  # type: ignore[arg-type]


def update(key: NodeKey = SENDER, **changes: object) -> Update:
    fields: dict[str, object] = dict(
        sender=key.public_key,
        seq=1,
        samples=10,
        weight=2.0,
        fingerprint=FINGERPRINT,
        created_at=NOW,
        tensors={"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)},
    )
    fields.update(changes)
    return Update(**fields)  # type: ignore[arg-type]


def message(key: NodeKey = SENDER, **changes: object) -> bytes:
    return bytes(encode(update(key, **changes), key))


def valid_header(**changes: object) -> dict[str, object]:
    header: dict[str, object] = {
        "sender": SENDER.public_key,
        "seq": 1,
        "samples": 10,
        "weight": 2.0,
        "fingerprint": FINGERPRINT,
        "created_at": NOW,
        "codec": "raw",
        "tensors": [
            {"name": "w", "dtype": "float32", "shape": [2, 3], "size": 24},
            {"name": "b", "dtype": "float32", "shape": [3], "size": 12},
        ],
    }
    header.update(changes)
    return header


VALID_PAYLOADS = np.ones(6, "<f4").tobytes() + np.ones(3, "<f4").tobytes()


def signed(header: bytes, payloads: bytes = VALID_PAYLOADS, key: NodeKey = SENDER) -> bytes:
    """A message around arbitrary header bytes, correctly signed: only the header is wrong."""
    body = struct.pack("<I", len(header)) + header + payloads
    signature = key.sign(SIGNING_DOMAIN + blake3.blake3(body).digest())
    return MAGIC + bytes([FORMAT_VERSION]) + signature + body


def signed_header(header: dict[str, object], payloads: bytes = VALID_PAYLOADS) -> bytes:
    return signed(msgpack.packb(header, use_bin_type=True), payloads)


def assert_rejected(
    node: GossipNode, data: bytes, reason: Reason, remote_key: bytes | None = None
) -> Rejected:
    before, weight = node.estimate.copy(), node.pushsum.weight
    counted = node.admission.rejected[reason]
    accepted = node.admission.accepted
    verdict = node.receive(data, NOW, remote_key)
    node.merge()
    assert isinstance(verdict, Rejected), verdict
    assert verdict.reason is reason, verdict
    assert verdict.detail
    assert node.admission.rejected[reason] == counted + 1
    assert node.admission.accepted == accepted
    assert len(node.votes) == 0
    np.testing.assert_array_equal(node.estimate, before)
    assert node.pushsum.weight == weight
    return verdict


def test_a_valid_update_is_accepted_and_moves_the_model() -> None:
    """The control: the comparison in assert_rejected can fail."""
    node = receiver()
    before = node.estimate.copy()
    verdict = node.receive(message(), NOW, SENDER.public_key)
    node.merge()
    assert isinstance(verdict, Accepted)
    assert node.admission.accepted == 1
    assert not node.admission.rejected
    assert not np.array_equal(node.estimate, before)
    assert node.pushsum.weight == 52.0


# bad-signature


def test_flipped_payload_byte_is_a_bad_signature() -> None:
    data = bytearray(message())
    data[-1] ^= 0x40
    assert_rejected(receiver(), bytes(data), Reason.BAD_SIGNATURE)


def test_flipped_signature_byte_is_a_bad_signature() -> None:
    data = bytearray(message())
    data[10] ^= 0x01
    assert_rejected(receiver(), bytes(data), Reason.BAD_SIGNATURE)


def test_signed_by_another_key_is_a_bad_signature() -> None:
    data = signed(msgpack.packb(valid_header(), use_bin_type=True), key=OTHER)
    assert_rejected(receiver(), data, Reason.BAD_SIGNATURE)


# unknown-sender


def test_sender_outside_the_allowlist_is_unknown() -> None:
    node = receiver(allowlist=frozenset({OTHER.public_key}))
    assert_rejected(node, message(), Reason.UNKNOWN_SENDER)


# not-neighbour


def test_a_sender_outside_the_current_neighbours_is_refused_before_its_signature() -> None:
    node = receiver()
    node.set_peers(frozenset({OTHER.public_key}))
    data = bytearray(message())
    data[-1] ^= 1  # badly signed too: the neighbour check comes first, and is cheaper
    assert_rejected(node, bytes(data), Reason.NOT_NEIGHBOUR)
    node.set_peers(None)
    assert node.receive(message(), NOW, SENDER.public_key).accepted


def test_a_revoked_sender_is_refused_as_revoked_even_when_listed() -> None:
    # The daemon's views are live (p2pfl/member_source.py); a revocation wins over the list.
    node = receiver(allowlist=frozenset({SENDER.public_key}),
                    revoked=frozenset({SENDER.public_key}))
    assert_rejected(node, message(), Reason.REVOKED)


def test_sender_in_the_allowlist_is_accepted() -> None:
    node = receiver(allowlist=frozenset({SENDER.public_key}))
    assert node.receive(message(), NOW).accepted


# sender-mismatch


def test_update_signed_by_someone_other_than_the_connected_peer() -> None:
    assert_rejected(receiver(), message(), Reason.SENDER_MISMATCH, remote_key=OTHER.public_key)


# replay


def test_same_sequence_number_twice_is_a_replay() -> None:
    node = receiver()
    assert node.receive(message(seq=5), NOW).accepted
    node.merge()
    assert_rejected(node, message(seq=5, weight=1.0), Reason.REPLAY)


def test_the_exact_same_bytes_twice_is_a_replay() -> None:
    node = receiver()
    data = message(seq=5)
    assert node.receive(data, NOW).accepted
    node.merge()
    assert_rejected(node, data, Reason.REPLAY)


def test_lower_sequence_number_is_a_replay() -> None:
    node = receiver()
    assert node.receive(message(seq=9), NOW).accepted
    node.merge()
    assert_rejected(node, message(seq=3), Reason.REPLAY)


def test_sequence_numbers_are_per_sender() -> None:
    node = receiver()
    assert node.receive(message(SENDER, seq=9), NOW).accepted
    assert node.receive(message(OTHER, seq=3), NOW).accepted


def test_a_rejected_update_does_not_advance_the_sequence() -> None:
    node = receiver()
    assert_rejected(node, message(seq=9, fingerprint=bytes(32)), Reason.WRONG_MODEL)
    assert node.receive(message(seq=4), NOW).accepted


# stale


def test_too_old_is_stale() -> None:
    assert_rejected(receiver(), message(created_at=NOW - MAX_AGE - 1.0), Reason.STALE)


def test_too_far_in_the_future_is_stale() -> None:
    assert_rejected(receiver(), message(created_at=NOW + MAX_SKEW + 1.0), Reason.STALE)


@pytest.mark.parametrize("created_at", [NOW - MAX_AGE, NOW + MAX_SKEW])
def test_at_the_freshness_limits_is_accepted(created_at: float) -> None:
    assert receiver().receive(message(created_at=created_at), NOW).accepted


# wrong-model


def test_other_model_fingerprint_is_the_wrong_model() -> None:
    other_layout = ModelLayout.of({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)})
    data = message(
        fingerprint=other_layout.fingerprint,
        tensors={"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)},
    )
    assert_rejected(receiver(), data, Reason.WRONG_MODEL)


# wrong-shape: the header claims our fingerprint, the tensors say otherwise


@pytest.mark.parametrize(
    "tensors",
    [
        {"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)},  # same size, transposed
        {"w": np.ones(5, np.float32), "b": np.ones(3, np.float32)},  # fewer values
        {"x": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)},  # other name
        {"b": np.ones(3, np.float32), "w": np.ones((2, 3), np.float32)},  # other order
        {"w": np.ones((2, 3), np.float64), "b": np.ones(3, np.float32)},  # other dtype
        {"w": np.ones((2, 3), np.float32)},  # a tensor missing
    ],
    ids=["transposed", "fewer-values", "other-name", "other-order", "other-dtype", "missing"],
)
def test_tensors_not_matching_the_claimed_fingerprint_are_the_wrong_shape(
    tensors: dict[str, np.ndarray],
) -> None:
    assert_rejected(receiver(), message(tensors=tensors), Reason.WRONG_SHAPE)


def test_a_name_forged_to_collide_with_our_fingerprint_is_rejected() -> None:
    """One tensor named "w\\tfloat32\\t2,3\\nb" hashes like our two tensors w and b."""
    forged = {"w\tfloat32\t2,3\nb": np.ones(3, np.float32)}
    assert ModelLayout.of(forged).fingerprint == FINGERPRINT
    assert_rejected(receiver(), message(tensors=forged), Reason.MALFORMED)


# non-finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    w = np.ones((2, 3), np.float32)
    w[1, 2] = bad
    data = message(tensors={"w": w, "b": np.ones(3, np.float32)})
    assert_rejected(receiver(), data, Reason.NON_FINITE)


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    big = np.finfo(np.float32).max
    node = GossipNode.create(RECEIVER, {"v": np.zeros(4)}, 5)
    data = message(
        fingerprint=node.layout.fingerprint,
        tensors={"v": np.array([1.7e308, 1.7e308, -1.0, big], np.float64)},
    )
    assert node.receive(data, NOW).accepted


# oversize


def test_message_above_the_cap_is_oversize() -> None:
    data = message()
    assert_rejected(receiver(max_message_bytes=len(data) - 1), data, Reason.OVERSIZE)


def test_message_at_the_cap_is_accepted() -> None:
    data = message()
    assert receiver(max_message_bytes=len(data)).receive(data, NOW).accepted


def test_oversize_is_judged_before_anything_else() -> None:
    assert_rejected(receiver(max_message_bytes=100), b"\0" * 101, Reason.OVERSIZE)


# malformed


def _without(field: str) -> dict[str, object]:
    header = valid_header()
    del header[field]
    return header


def _entry(**changes: object) -> list[dict[str, object]]:
    entries = valid_header()["tensors"]
    assert isinstance(entries, list)
    entries[0] = {**entries[0], **changes}
    return entries


def _map(pairs: list[tuple[object, object]]) -> bytes:
    """A msgpack map written pair by pair, so that a key can repeat."""
    assert len(pairs) < 16
    out = bytes([0x80 | len(pairs)])
    for key, value in pairs:
        out += msgpack.packb(key, use_bin_type=True) + msgpack.packb(value, use_bin_type=True)
    return out


def _duplicate_top_level_key() -> bytes:
    pairs = list(valid_header().items()) + [("seq", 2)]
    return signed(_map(pairs))


def _duplicate_tensor_key() -> bytes:
    header = valid_header()
    entry = _map([("name", "w"), ("dtype", "float32"), ("shape", [2, 3]), ("size", 24)])
    entry_dup = _map(
        [("name", "b"), ("dtype", "float32"), ("shape", [3]), ("size", 12), ("name", "b")]
    )
    tensors = b"\x92" + entry + entry_dup
    pairs = [(k, v) for k, v in header.items() if k != "tensors"]
    head = bytes([0x80 | (len(pairs) + 1)])
    for key, value in pairs:
        head += msgpack.packb(key, use_bin_type=True) + msgpack.packb(value, use_bin_type=True)
    return signed(head + msgpack.packb("tensors") + tensors)


def _ext_value(ext: bytes) -> bytes:
    """The valid header with created_at replaced by raw msgpack ext bytes."""
    pairs = [(k, v) for k, v in valid_header().items() if k != "created_at"]
    head = bytes([0x80 | (len(pairs) + 1)])
    for key, value in pairs:
        head += msgpack.packb(key, use_bin_type=True) + msgpack.packb(value, use_bin_type=True)
    return signed(head + msgpack.packb("created_at") + ext)


def _ext_in_shape() -> bytes:
    return signed_header(valid_header(tensors=_entry(shape=[msgpack.ExtType(1, b"\x02")])))


def _truncate(data: bytes, by: int) -> bytes:
    return data[:-by]


MALFORMED: dict[str, Callable[[], bytes]] = {
    "unknown-field": lambda: signed_header(valid_header(extra=1)),
    "missing-field": lambda: signed_header(_without("samples")),
    "missing-tensors": lambda: signed_header(_without("tensors")),
    "seq-is-a-string": lambda: signed_header(valid_header(seq="1")),
    "seq-negative": lambda: signed_header(valid_header(seq=-1)),
    "seq-too-large": lambda: signed_header(valid_header(seq=2**63)),
    "sender-31-bytes": lambda: signed_header(valid_header(sender=SENDER.public_key[:31])),
    "sender-as-text": lambda: signed_header(valid_header(sender="a" * 32)),
    "fingerprint-short": lambda: signed_header(valid_header(fingerprint=FINGERPRINT[:16])),
    "weight-is-an-int": lambda: signed_header(valid_header(weight=2)),
    "weight-negative": lambda: signed_header(valid_header(weight=-1.0)),
    "weight-nan": lambda: signed_header(valid_header(weight=float("nan"))),
    "weight-inf": lambda: signed_header(valid_header(weight=float("inf"))),
    "created-at-inf": lambda: signed_header(valid_header(created_at=float("inf"))),
    "codec-empty": lambda: signed_header(valid_header(codec="")),
    "seq-is-a-bool": lambda: signed_header(valid_header(seq=True)),
    "samples-is-a-bool": lambda: signed_header(valid_header(samples=False)),
    "shape-holds-a-bool": lambda: signed_header(valid_header(tensors=_entry(shape=[True, 3]))),
    "size-is-a-bool": lambda: signed_header(valid_header(tensors=_entry(size=True))),
    "dtype-float128": lambda: signed_header(valid_header(tensors=_entry(dtype="float128"))),
    "dtype-bool": lambda: signed_header(valid_header(tensors=_entry(dtype="bool"))),
    "dtype-big-endian": lambda: signed_header(valid_header(tensors=_entry(dtype=">f4"))),
    "dtype-object": lambda: signed_header(valid_header(tensors=_entry(dtype="object"))),
    "size-not-matching-payloads": lambda: signed_header(valid_header(tensors=_entry(size=20))),
    "rank-9": lambda: signed_header(valid_header(tensors=_entry(shape=[1] * 9))),
    "duplicate-tensor-name": lambda: signed_header(
        valid_header(tensors=_entry(name="b", shape=[2, 3]))
    ),
    "empty-tensor-name": lambda: signed_header(valid_header(tensors=_entry(name=""))),
    "tensor-entry-extra-key": lambda: signed_header(valid_header(tensors=_entry(extra=0))),
    "duplicate-map-key": _duplicate_top_level_key,
    "duplicate-key-in-tensor-entry": _duplicate_tensor_key,
    "ext-type": lambda: _ext_value(b"\xd4\x05\x00"),  # fixext 1, type 5
    "ext-timestamp": lambda: _ext_value(b"\xd6\xff\x00\x00\x00\x01"),  # fixext 4, type -1
    "ext-in-shape": _ext_in_shape,
    "int-map-key": lambda: signed(_map([(1, 2)])),
    "header-not-a-map": lambda: signed(msgpack.packb([1, 2, 3])),
    "header-not-msgpack": lambda: signed(b"\xc1"),
    "header-trailing-bytes": lambda: signed(msgpack.packb(valid_header()) + b"\x00", b""),
    "header-invalid-utf8": lambda: signed(b"\x81\xa2\xff\xfe\x01"),
    "payload-truncated": lambda: _truncate(message(), 1),
    "payload-extended": lambda: message() + b"\x00",
    "shorter-than-prefix": lambda: message()[:72],
    "bad-magic": lambda: b"P2FV" + message()[4:],
    "bad-version": lambda: message()[:4] + b"\x02" + message()[5:],
    "header-length-past-end": lambda: message()[:69] + struct.pack("<I", 10**6) + message()[73:],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed(case: str) -> None:
    assert_rejected(receiver(), MALFORMED[case](), Reason.MALFORMED)


def test_signed_valid_header_helper_builds_an_accepted_message() -> None:
    """The control for the malformed cases: the hand-built message is fine unmodified."""
    assert receiver().receive(signed_header(valid_header()), NOW).accepted


# unknown-codec


def test_unknown_codec_is_rejected() -> None:
    assert_rejected(receiver(), signed_header(valid_header(codec="zstd-9")), Reason.UNKNOWN_CODEC)


# every reason is covered above


def test_every_reason_has_a_test_in_this_file() -> None:
    source = open(__file__, encoding="utf-8").read()
    for reason in Reason:
        assert f"Reason.{reason.name}" in source, reason


# out-of-step


def test_a_top_k_difference_to_a_copy_we_do_not_hold_is_out_of_step() -> None:
    """Authentic, but a difference with nothing to add it to: refused, so that the
    sender takes its share back and sends its whole copy next (gossip/public_copy.py)."""
    data = message(seq=7, codec="topk:0.5")
    verdict = assert_rejected(receiver(), data, Reason.OUT_OF_STEP, remote_key=SENDER.public_key)
    assert "copy" in verdict.detail


# order of checks


def test_cheaper_checks_come_first() -> None:
    # Not in the allowlist and badly signed: the allowlist is consulted first.
    data = bytearray(message())
    data[-1] ^= 1
    node = receiver(allowlist=frozenset({OTHER.public_key}))
    assert_rejected(node, bytes(data), Reason.UNKNOWN_SENDER)


def test_the_signature_is_checked_before_replay_state() -> None:
    node = receiver()
    assert node.receive(message(seq=5), NOW).accepted
    node.merge()
    forged = bytearray(message(seq=6))
    forged[-1] ^= 1
    assert_rejected(node, bytes(forged), Reason.BAD_SIGNATURE)
    assert node.admission.last_seq[SENDER.public_key] == 5


def test_rejections_are_counted_by_reason() -> None:
    node = receiver()
    for _ in range(3):
        node.receive(b"junk", NOW)
    node.receive(message(created_at=0.0), NOW)
    assert node.admission.rejected == {Reason.MALFORMED: 3, Reason.STALE: 1}
    assert node.admission.accepted == 0


def test_a_declared_shape_other_than_the_models_is_refused_before_decoding() -> None:
    # Checked on the header, before any payload is read: a signed header could
    # otherwise declare a tensor of any size and make the receiver allocate it.
    data = signed_header(valid_header(tensors=_entry(shape=[2, 2])))
    assert_rejected(receiver(), data, Reason.WRONG_SHAPE)


def test_an_offer_declaring_more_payload_than_its_shape_takes_is_refused_before_any_byte() -> None:
    """A declared size is what the offer's reader would buffer: an in-neighbour that
    declares 64 MiB for a 24-byte tensor is refused at the offer, and nothing is read."""
    message = encode(update(), SENDER)
    (header_length,) = struct.unpack_from("<I", message, 69)
    header = msgpack.unpackb(bytes(message[73 : 73 + header_length]))
    header["tensors"][0]["size"] = 64 * 2**20
    packed = msgpack.packb(header, use_bin_type=True)
    offer = bytes(message[:69]) + struct.pack("<I", len(packed)) + packed
    node = receiver()
    answer, payload_bytes = node.screen(offer, NOW, SENDER.public_key)
    assert (answer.verdict, payload_bytes) == ("malformed", 0)
    assert node.admission.rejected == {Reason.MALFORMED: 1}
    # The honest offer of the same update is taken, with exactly its payloads to read.
    honest = bytes(message[: 73 + header_length])
    answer, payload_bytes = node.screen(honest, NOW, SENDER.public_key)
    assert (answer.verdict, payload_bytes) == ("ready", len(message) - len(honest))
