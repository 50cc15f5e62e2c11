"""The wire format of an update: a signed msgpack header followed by raw tensor payloads.

Layout (all integers little-endian; docs/PROTOCOL.md is the normative text)::

    offset  size  field
    0       4     magic b"P2FU"
    4       1     format version, 1
    5       64    ed25519 signature
    69      4     header length H (uint32)
    73      H     header: a msgpack map with exactly the keys of HEADER_FIELDS
    73+H    ...   tensor payloads, concatenated in header order, no padding

The signature covers ``SIGNING_DOMAIN + BLAKE3-256(bytes[69:])``: the body is
hashed once and the 32-byte digest is signed, so a multi-megabyte update is
not hashed twice by ed25519. BLAKE3 rather than SHA-256 because it runs at
4.5 GB/s on one core here (8 GB/s on two) against SHA-256's 1.8 GB/s, and the
hash is most of the cost of signing and verifying a large update.

The receiver checks the size cap before parsing, parses only the small
header, verifies the signature, and only then decodes tensors (zero-copy
views into the received buffer for the raw codec). Nothing here unpickles:
msgpack with ext types refused, and raw little-endian numbers.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack
import numpy as np

from gossip.compression import resolve_codec
from gossip.errors import InvalidUpdate, Reason
from gossip.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, NodeKey, verify
from gossip.layout import ALLOWED_DTYPES, FINGERPRINT_BYTES
from gossip.update import Update

MAGIC = b"P2FU"
FORMAT_VERSION = 1
SIGNING_DOMAIN = b"p2pfl/update/v1\x00"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSORS = 4096
MAX_NAME_CHARS = 256
# Longest string a header may hold, in UTF-8 bytes: a tensor name of MAX_NAME_CHARS
# characters of up to 4 bytes each (dtype and codec names are far shorter).
MAX_HEADER_STR_BYTES = 4 * MAX_NAME_CHARS
MAX_RANK = 8
MAX_SEQ = 2**63 - 1

_SIGNATURE_AT = len(MAGIC) + 1
_HEADER_LENGTH_AT = _SIGNATURE_AT + SIGNATURE_BYTES
_HEADER_AT = _HEADER_LENGTH_AT + 4
PREFIX_BYTES = _HEADER_AT
# The largest offer (prefix and header: see offer_length).
MAX_OFFER_BYTES = PREFIX_BYTES + MAX_HEADER_BYTES

HEADER_FIELDS = frozenset(
    {"sender", "seq", "samples", "weight", "fingerprint", "created_at", "codec", "tensors"}
)
TENSOR_FIELDS = frozenset({"name", "dtype", "shape", "size"})
# Tab and newline delimit the model fingerprint's lines (gossip.layout): a name
# holding them could make another layout hash to ours. No control characters.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SignedHeader:
    """The parsed, not yet verified, prefix of a message: cheap to get, enough to triage."""

    header: dict[str, Any]
    signature: bytes
    body: memoryview  # header length + header + payloads: what the signature covers
    payloads: memoryview

    @property
    def sender(self) -> bytes:
        return self.header["sender"]

    @property
    def seq(self) -> int:
        return self.header["seq"]

    @property
    def payload_bytes(self) -> int:
        """The payloads' total size, as the header declares it."""
        return sum(entry["size"] for entry in self.header["tensors"])


# Below this many bytes, hashing on one thread beats starting more.
_THREADED_HASH_BYTES = 4 * 1024 * 1024


def _signing_message(body: memoryview | bytes) -> bytes:
    threads = blake3.blake3.AUTO if len(body) >= _THREADED_HASH_BYTES else 1
    return SIGNING_DOMAIN + blake3.blake3(body, max_threads=threads).digest()


def encode(update: Update, key: NodeKey) -> bytearray:
    """Serialize and sign ``update``; the key must be the update's sender."""
    if key.public_key != update.sender:
        raise ValueError("the signing key is not the update's sender")
    tensor_codec = resolve_codec(update.codec)
    if tensor_codec is None:
        raise ValueError(f"unknown codec {update.codec!r}")
    entries = []
    sizes = []
    for name, array in update.tensors.items():
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype.name}, not in the allowlist")
        size = tensor_codec.payload_size(array)
        sizes.append(size)
        entries.append(
            {"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "size": size}
        )
    header = msgpack.packb(
        {
            "sender": update.sender,
            "seq": update.seq,
            "samples": update.samples,
            "weight": float(update.weight),
            "fingerprint": update.fingerprint,
            "created_at": float(update.created_at),
            "codec": update.codec,
            "tensors": entries,
        },
        use_bin_type=True,
    )
    message = bytearray(_HEADER_AT + len(header) + sum(sizes))
    message[: len(MAGIC)] = MAGIC
    message[len(MAGIC)] = FORMAT_VERSION
    struct.pack_into("<I", message, _HEADER_LENGTH_AT, len(header))
    message[_HEADER_AT : _HEADER_AT + len(header)] = header
    view = memoryview(message)
    offset = _HEADER_AT + len(header)
    for array, size in zip(update.tensors.values(), sizes, strict=True):
        tensor_codec.encode_into(array, view[offset : offset + size])
        offset += size
    signature = key.sign(_signing_message(view[_HEADER_LENGTH_AT:]))
    message[_SIGNATURE_AT:_HEADER_LENGTH_AT] = signature
    return message


def _malformed(detail: str) -> InvalidUpdate:
    return InvalidUpdate(Reason.MALFORMED, detail)


def _no_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _malformed("a msgpack map repeats a key")
    return result


def _is_uint(value: Any, limit: int = MAX_SEQ) -> bool:
    return type(value) is int and 0 <= value <= limit


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise _malformed("the header is not a msgpack map")
    keys = set(header)
    if keys != HEADER_FIELDS:
        missing, unknown = HEADER_FIELDS - keys, keys - HEADER_FIELDS
        raise _malformed(
            f"header fields: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}"
        )
    if type(header["sender"]) is not bytes or len(header["sender"]) != PUBLIC_KEY_BYTES:
        raise _malformed("sender must be 32 bytes")
    if type(header["fingerprint"]) is not bytes or len(header["fingerprint"]) != FINGERPRINT_BYTES:
        raise _malformed("fingerprint must be 32 bytes")
    for name in ("seq", "samples"):
        if not _is_uint(header[name]):
            raise _malformed(f"{name} must be an unsigned integer below 2**63")
    weight = header["weight"]
    if type(weight) is not float or not math.isfinite(weight) or weight < 0:
        raise _malformed("weight must be a finite non-negative float")
    created = header["created_at"]
    if type(created) is not float or not math.isfinite(created):
        raise _malformed("created_at must be a finite float")
    if type(header["codec"]) is not str or not header["codec"]:
        raise _malformed("codec must be a non-empty string")
    tensors = header["tensors"]
    if type(tensors) is not list or len(tensors) > MAX_TENSORS:
        raise _malformed(f"tensors must be a list of at most {MAX_TENSORS} entries")
    names = set()
    for entry in tensors:
        if type(entry) is not dict or set(entry) != TENSOR_FIELDS:
            raise _malformed(f"each tensor entry is a map with exactly {sorted(TENSOR_FIELDS)}")
        name, dtype, shape, size = entry["name"], entry["dtype"], entry["shape"], entry["size"]
        if (
            type(name) is not str
            or not 0 < len(name) <= MAX_NAME_CHARS
            or name in names
            or _CONTROL_CHARACTER.search(name)
        ):
            raise _malformed(
                "tensor names are unique non-empty strings of at most 256 characters "
                "without control characters"
            )
        names.add(name)
        if type(dtype) is not str or dtype not in ALLOWED_DTYPES:
            raise _malformed(f"tensor {name!r}: dtype {dtype!r} is not in the allowlist")
        if (
            type(shape) is not list
            or len(shape) > MAX_RANK
            or not all(_is_uint(dim) for dim in shape)
        ):
            raise _malformed(f"tensor {name!r}: shape must be at most {MAX_RANK} unsigned ints")
        if not _is_uint(size):
            raise _malformed(f"tensor {name!r}: size must be an unsigned integer")


def offer_length(message: bytes | bytearray | memoryview) -> int:
    """How many leading bytes of an encoded ``message`` are its offer: the prefix and
    the signed header, everything a receiver needs to judge it before the payloads
    (``/p2pfl/update/1.2.0`` sends them first; docs/PROTOCOL.md)."""
    (header_length,) = struct.unpack_from("<I", message, _HEADER_LENGTH_AT)
    return _HEADER_AT + header_length


def parse_offer(
    offer: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_BYTES
) -> SignedHeader:
    """:func:`parse` for a message's offer alone (prefix and header, no payload byte):
    the same checks, with the payloads' size taken from the header."""
    return _parse(offer, max_size, with_payloads=False)


def parse(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_BYTES
) -> SignedHeader:
    """Check the size cap and the header's schema; verify nothing yet, decode no tensor."""
    return _parse(data, max_size, with_payloads=True)


def _parse(
    data: bytes | bytearray | memoryview, max_size: int, with_payloads: bool
) -> SignedHeader:
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if len(view) > max_size:
        raise InvalidUpdate(Reason.OVERSIZE, f"{len(view)} bytes exceeds the {max_size}-byte cap")
    if len(view) < _HEADER_AT:
        raise _malformed(f"{len(view)} bytes is shorter than the {_HEADER_AT}-byte prefix")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise _malformed("bad magic: not a p2pfl update")
    if view[len(MAGIC)] != FORMAT_VERSION:
        raise _malformed(f"format version {view[len(MAGIC)]} is not supported (expected 1)")
    (header_length,) = struct.unpack_from("<I", view, _HEADER_LENGTH_AT)
    if header_length > MAX_HEADER_BYTES or _HEADER_AT + header_length > len(view):
        raise _malformed(f"header length {header_length} does not fit the message")
    try:
        header = msgpack.unpackb(
            view[_HEADER_AT : _HEADER_AT + header_length],
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_no_duplicate_keys,
            ext_hook=_refuse_ext,
            # Limits msgpack checks at each container's or string's length prefix,
            # before building any element: a header of a million unknown keys is
            # refused at its first byte, not after a second of parsing.
            max_map_len=len(HEADER_FIELDS),
            max_array_len=MAX_TENSORS,
            max_str_len=MAX_HEADER_STR_BYTES,
            max_bin_len=max(PUBLIC_KEY_BYTES, FINGERPRINT_BYTES),
            max_ext_len=0,
        )
    except InvalidUpdate:
        raise
    except Exception as error:  # msgpack raises many types for bad bytes; all mean malformed
        reason = str(error).splitlines()[0][:80] if str(error) else ""
        detail = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        raise _malformed(f"header is not valid msgpack ({detail})") from None
    _check_header(header)
    payloads = view[_HEADER_AT + header_length :]
    declared = sum(entry["size"] for entry in header["tensors"])
    if not with_payloads:
        if len(payloads):
            raise _malformed(f"an offer ends with its header; {len(payloads)} bytes follow it")
        total = _HEADER_AT + header_length + declared
        if total > max_size:
            raise InvalidUpdate(Reason.OVERSIZE, f"{total} bytes exceeds the {max_size}-byte cap")
    elif declared != len(payloads):
        raise _malformed(f"payloads hold {len(payloads)} bytes, the header declares {declared}")
    return SignedHeader(
        header=header,
        signature=bytes(view[_SIGNATURE_AT:_HEADER_LENGTH_AT]),
        body=view[_HEADER_LENGTH_AT:],
        payloads=payloads,
    )


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _malformed(f"msgpack extension type {code} is not allowed")


def check_signature(signed: SignedHeader) -> None:
    """Raise InvalidUpdate(bad-signature) unless the sender signed exactly these bytes."""
    if not verify(signed.sender, _signing_message(signed.body), signed.signature):
        raise InvalidUpdate(Reason.BAD_SIGNATURE, "the signature does not match the sender's key")


def decode_tensors(signed: SignedHeader) -> Update:
    """Decode the payloads of a parsed (and, by now, verified) message into an Update."""
    header = signed.header
    tensor_codec = resolve_codec(header["codec"])
    if tensor_codec is None:
        raise InvalidUpdate(Reason.UNKNOWN_CODEC, f"codec {header['codec']!r} is not known here")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in header["tensors"]:
        payload = signed.payloads[offset : offset + entry["size"]]
        offset += entry["size"]
        try:
            tensors[entry["name"]] = tensor_codec.decode(
                payload, ALLOWED_DTYPES[entry["dtype"]], tuple(entry["shape"])
            )
        except ValueError as error:
            raise _malformed(f"tensor {entry['name']!r}: {error}") from None
    return Update(
        sender=header["sender"],
        seq=header["seq"],
        samples=header["samples"],
        weight=header["weight"],
        fingerprint=header["fingerprint"],
        created_at=header["created_at"],
        tensors=tensors,
        codec=header["codec"],
    )


def decode(
    data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Update:
    """Parse, verify the signature, then decode: the whole path for one message."""
    signed = parse(data, max_size)
    check_signature(signed)
    return decode_tensors(signed)
