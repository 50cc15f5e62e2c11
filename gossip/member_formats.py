"""The membership formats: genesis, member certificate and revocation entry, sans-I/O.

docs/PROTOCOL.md ("Membership") is the normative text; in short:

* Every object is a **canonical msgpack** map: keys sorted, the shortest encodings,
  binary as ``bin``, no floats and no ext types. A decoder re-encodes what it parsed
  and refuses any byte string that differs, so one object has exactly one encoding
  and nothing can be changed in transit without breaking a hash or a signature.
* A **genesis** ``{"founders", "name", "threshold", "v"}`` defines a network; the
  network id is ``BLAKE3-256(GENESIS_DOMAIN + genesis bytes)``.
* A **certificate** is ``{"body", "sigs"}``; the body holds the network id, the
  member's peer id, an organisation, a serial and a validity window (integer unix
  seconds). Each signature is ``[signer peer id, ed25519 signature]`` over
  ``CERT_DOMAIN + canonical(body)``.
* A **revocation entry** is ``{"body", "sigs"}`` the same way, its body naming a
  peer id or a certificate serial, when it takes effect, when it was issued, its
  place in the log (``seq``) and the hash of the entry before it (``prev``). An
  entry's hash covers its body only, so the signatures gathered for it never change
  the chain; what is revoked is a key or a serial, never a hash of bytes (Nebula's
  issue #1600: a malleable signature gave the same certificate a second hash).

Files carry these bytes as base64 between ``-----BEGIN P2PFL <KIND>-----`` lines, so
an invitation can be pasted into a chat or a mail. Every parse error is a
:class:`MemberFormatError` with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack

from gossip.keys import NodeKey, public_key_from_peer_id, verify

FORMAT_VERSION = 1
GENESIS_DOMAIN = b"p2pfl/genesis/v1\x00"
CERT_DOMAIN = b"p2pfl/member-cert/v1\x00"
REVOCATION_DOMAIN = b"p2pfl/revocation/v1\x00"
NETWORK_ID_BYTES = 32
MAX_OBJECT_BYTES = 64 * 1024
MAX_FOUNDERS = 256
MAX_SIGNATURES = 64
MAX_NAME_CHARS = 128
MAX_UINT = 2**63 - 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

GENESIS_FIELDS = frozenset({"founders", "name", "threshold", "v"})
CERT_FIELDS = frozenset({"network", "not_after", "not_before", "org", "peer", "serial", "v"})
ENTRY_FIELDS = frozenset({"effective", "issued", "network", "prev", "seq", "target", "v"})
SIGNED_FIELDS = frozenset({"body", "sigs"})
TARGET_KINDS = ("peer", "serial")


class MemberFormatError(ValueError):
    """Bytes or text that are not a valid membership object; the message is one line."""


def canonical(value: Any) -> bytes:
    """The one encoding of ``value``: maps with sorted keys, recursively."""
    return msgpack.packb(_sorted(value), use_bin_type=True)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(item) for item in value]
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MemberFormatError(f"msgpack extension type {code} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MemberFormatError("a msgpack map repeats a key")
    return result


def decode_canonical(data: bytes, what: str) -> Any:
    """Parse ``data``, bounded, and insist that it is the canonical encoding."""
    if len(data) > MAX_OBJECT_BYTES:
        raise MemberFormatError(f"{what}: {len(data)} bytes exceeds {MAX_OBJECT_BYTES}")
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
            object_pairs_hook=_no_duplicate_keys, max_ext_len=0,
            max_str_len=1024, max_bin_len=1024, max_array_len=1024, max_map_len=16,
        )
    except MemberFormatError as error:
        raise MemberFormatError(f"{what}: {error}") from None
    except Exception as error:  # msgpack raises many types for bad bytes; all mean malformed
        raise MemberFormatError(f"{what}: not msgpack ({type(error).__name__})") from None
    if _has_float(value) or canonical(value) != data:
        raise MemberFormatError(f"{what}: not in canonical msgpack form")
    return value


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


# -- field checks ---------------------------------------------------------------------------


def _map(value: Any, fields: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != fields:
        keys = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise MemberFormatError(f"{what}: expected the fields {sorted(fields)}, got {keys}")
    if value.get("v", FORMAT_VERSION) != FORMAT_VERSION:
        raise MemberFormatError(f"{what}: version {value['v']!r} is not supported (expected 1)")
    return value


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_UINT:
        raise MemberFormatError(f"{what}: must be an integer in 0..2**63-1")
    return value


def _text(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_CHARS or _CONTROL.search(value):
        raise MemberFormatError(
            f"{what}: must be 1 to {MAX_NAME_CHARS} characters without control characters"
        )
    return value


def check_peer_id(value: Any, what: str = "peer id") -> str:
    """``value`` if it is the text peer id of an ed25519 key, else MemberFormatError."""
    if type(value) is not str or len(value) > 64:
        raise MemberFormatError(f"{what}: not a peer id")
    try:
        public_key_from_peer_id(value)
    except ValueError:
        raise MemberFormatError(f"{what}: {value!r} is not an ed25519 peer id") from None
    return value


def _hash32(value: Any, what: str) -> bytes:
    if type(value) is not bytes or len(value) != NETWORK_ID_BYTES:
        raise MemberFormatError(f"{what}: must be {NETWORK_ID_BYTES} bytes")
    return value


def _signatures(value: Any, what: str) -> tuple[tuple[str, bytes], ...]:
    if type(value) is not list or len(value) > MAX_SIGNATURES:
        raise MemberFormatError(f"{what}: sigs must be a list of at most {MAX_SIGNATURES}")
    result = []
    for item in value:
        if type(item) is not list or len(item) != 2 or type(item[1]) is not bytes:
            raise MemberFormatError(f"{what}: each signature is [peer id, 64 bytes]")
        if len(item[1]) != 64:
            raise MemberFormatError(f"{what}: a signature has {len(item[1])} bytes, not 64")
        result.append((check_peer_id(item[0], f"{what}: signer"), item[1]))
    return tuple(result)


# -- the three objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Genesis:
    """A network's definition: its name, founders and threshold k."""

    name: str
    founders: tuple[str, ...]
    threshold: int

    def __post_init__(self) -> None:
        _text(self.name, "genesis name")
        if not 0 < len(self.founders) <= MAX_FOUNDERS:
            raise MemberFormatError(f"genesis: 1 to {MAX_FOUNDERS} founders")
        for founder in self.founders:
            check_peer_id(founder, "genesis founder")
        if list(self.founders) != sorted(set(self.founders)):
            raise MemberFormatError("genesis: founders must be sorted and distinct")
        if type(self.threshold) is not int or not 1 <= self.threshold <= len(self.founders):
            raise MemberFormatError(
                f"genesis: threshold {self.threshold!r} must be 1..{len(self.founders)} "
                "(the number of founders)"
            )

    @classmethod
    def create(cls, name: str, founders: list[str], threshold: int) -> Genesis:
        return cls(name, tuple(sorted(set(founders))), threshold)

    def encode(self) -> bytes:
        return canonical({"founders": list(self.founders), "name": self.name,
                          "threshold": self.threshold, "v": FORMAT_VERSION})

    @property
    def network_id(self) -> bytes:
        return blake3.blake3(GENESIS_DOMAIN + self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> Genesis:
        value = _map(decode_canonical(data, "genesis"), GENESIS_FIELDS, "genesis")
        if type(value["founders"]) is not list:
            raise MemberFormatError("genesis: founders must be a list of peer ids")
        return cls(value["name"], tuple(value["founders"]), value["threshold"])


@dataclass(frozen=True)
class _Signed:
    """What certificates and revocation entries share: a body and signatures over it."""

    sigs: tuple[tuple[str, bytes], ...]

    DOMAIN = b""

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def signing_message(self) -> bytes:
        return self.DOMAIN + canonical(self.body())

    @property
    def body_hash(self) -> bytes:
        """The hash of the body alone: the same whatever signatures it has gathered."""
        return blake3.blake3(self.signing_message()).digest()

    def signers(self) -> list[str]:
        return [signer for signer, _ in self.sigs]

    def duplicate_signer(self) -> str | None:
        seen: set[str] = set()
        for signer in self.signers():
            if signer in seen:
                return signer
            seen.add(signer)
        return None

    def forged_signer(self, only: Collection[str] | None = None) -> str | None:
        """The first signer (of ``only``, if given) whose signature does not verify over
        this body, if any."""
        message = self.signing_message()
        for signer, signature in self.sigs:
            if only is not None and signer not in only:
                continue
            if not verify(public_key_from_peer_id(signer), message, signature):
                return signer
        return None

    def encode(self) -> bytes:
        return canonical({"body": self.body(), "sigs": [list(s) for s in self.sigs]})


@dataclass(frozen=True)
class Certificate(_Signed):
    """A member's certificate: valid once k distinct current members have signed it."""

    network: bytes = b""
    peer: str = ""
    org: str = ""
    serial: int = 0
    not_before: int = 0
    not_after: int = 0

    DOMAIN = CERT_DOMAIN

    def __post_init__(self) -> None:
        _hash32(self.network, "certificate network")
        check_peer_id(self.peer, "certificate peer")
        _text(self.org, "certificate org")
        _uint(self.serial, "certificate serial")
        _uint(self.not_before, "certificate not_before")
        _uint(self.not_after, "certificate not_after")
        if self.not_after <= self.not_before:
            raise MemberFormatError("certificate: not_after must be after not_before")

    def body(self) -> dict[str, Any]:
        return {"network": self.network, "not_after": self.not_after,
                "not_before": self.not_before, "org": self.org, "peer": self.peer,
                "serial": self.serial, "v": FORMAT_VERSION}

    def signed_by(self, key: NodeKey) -> Certificate:
        """This certificate with ``key``'s signature appended (an invitation passed on)."""
        signature = key.sign(self.signing_message())
        return _with_sigs(self, (*self.sigs, (key.peer_id, signature)))

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        outer = _map(decode_canonical(data, "certificate"), SIGNED_FIELDS, "certificate")
        body = _map(outer["body"], CERT_FIELDS, "certificate body")
        return cls(
            sigs=_signatures(outer["sigs"], "certificate"),
            network=body["network"], peer=body["peer"], org=body["org"],
            serial=body["serial"], not_before=body["not_before"], not_after=body["not_after"],
        )


@dataclass(frozen=True)
class RevocationEntry(_Signed):
    """One entry of the revocation log: revoke a peer id or a serial from ``effective`` on."""

    network: bytes = b""
    seq: int = 0
    prev: bytes = b""
    kind: str = "peer"
    target: str | int = ""
    effective: int = 0
    issued: int = 0

    DOMAIN = REVOCATION_DOMAIN

    def __post_init__(self) -> None:
        _hash32(self.network, "revocation network")
        _hash32(self.prev, "revocation prev")
        _uint(self.seq, "revocation seq")
        _uint(self.effective, "revocation effective")
        _uint(self.issued, "revocation issued")
        if self.kind == "peer":
            check_peer_id(self.target, "revocation target")
        elif self.kind == "serial":
            _uint(self.target, "revocation target serial")
        else:
            raise MemberFormatError(f"revocation: target kind {self.kind!r} is not peer or serial")

    def body(self) -> dict[str, Any]:
        return {"effective": self.effective, "issued": self.issued, "network": self.network,
                "prev": self.prev, "seq": self.seq, "target": [self.kind, self.target],
                "v": FORMAT_VERSION}

    def signed_by(self, key: NodeKey) -> RevocationEntry:
        signature = key.sign(self.signing_message())
        return _with_sigs(self, (*self.sigs, (key.peer_id, signature)))

    def describe(self) -> str:
        return f"#{self.seq} revoke {self.kind} {self.target} from {self.effective}"

    @classmethod
    def decode(cls, data: bytes) -> RevocationEntry:
        outer = _map(decode_canonical(data, "revocation"), SIGNED_FIELDS, "revocation")
        body = _map(outer["body"], ENTRY_FIELDS, "revocation body")
        target = body["target"]
        if type(target) is not list or len(target) != 2:
            raise MemberFormatError("revocation: target must be [kind, peer id or serial]")
        return cls(
            sigs=_signatures(outer["sigs"], "revocation"),
            network=body["network"], seq=body["seq"], prev=body["prev"], kind=target[0],
            target=target[1], effective=body["effective"], issued=body["issued"],
        )


def _with_sigs(item: Any, sigs: tuple[tuple[str, bytes], ...]) -> Any:
    if len(sigs) > MAX_SIGNATURES:
        raise MemberFormatError(f"at most {MAX_SIGNATURES} signatures")
    from dataclasses import replace  # local: only signing needs it

    return replace(item, sigs=sigs)


# -- text armour ----------------------------------------------------------------------------

KINDS = {"GENESIS": Genesis, "CERTIFICATE": Certificate, "REVOCATION": RevocationEntry}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}
MembershipObject = Genesis | Certificate | RevocationEntry


def armor(item: MembershipObject) -> str:
    """``item`` as the text a file holds."""
    kind = _KIND_OF[type(item)]
    text = base64.b64encode(item.encode()).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN P2PFL {kind}-----", *lines, f"-----END P2PFL {kind}-----", ""])


def dearmor(text: str, expected: type | None = None) -> MembershipObject:
    """Parse a file's text; ``expected``: the one class it must hold."""
    lines = [line.strip() for line in text.strip().splitlines()]
    match = re.fullmatch(r"-----BEGIN P2PFL ([A-Z]+)-----", lines[0]) if lines else None
    if match is None or match.group(1) not in KINDS:
        raise MemberFormatError("not a p2pfl membership file (no BEGIN P2PFL line)")
    kind = match.group(1)
    if lines[-1] != f"-----END P2PFL {kind}-----":
        raise MemberFormatError(f"the {kind.lower()} has no matching END line")
    cls = KINDS[kind]
    if expected is not None and cls is not expected:
        wanted = _KIND_OF.get(expected, "?").lower()
        raise MemberFormatError(f"expected a {wanted}, found a {kind.lower()}")
    try:
        data = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise MemberFormatError(f"the {kind.lower()} is not valid base64") from None
    return cls.decode(data)
