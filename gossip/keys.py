"""Node keys: one ed25519 key is both the libp2p identity and the update signer.

Key file format (text, UTF-8, mode 0600)::

    p2pfl-ed25519-seed-v1
    <64 lowercase hex digits: the 32-byte ed25519 seed>

Only the 32-byte seed is stored: it is the form py-libp2p's
``create_identity_from_seed`` accepts, and the public key follows from it.

The peer id is computed here without importing libp2p (which costs 0.65 s and
76 MB): it is the base58btc text of an identity multihash over the protobuf
``PublicKey{Type: Ed25519, Data: <32 bytes>}``, exactly as libp2p's
``ID.from_pubkey`` builds it for ed25519 keys.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import base58
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

KEY_FILE_HEADER = "p2pfl-ed25519-seed-v1"
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# protobuf PublicKey: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_PROTOBUF_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, PUBLIC_KEY_BYTES])
_MULTIHASH_IDENTITY = 0x00


class KeyFileError(Exception):
    """A key file that cannot be used; the message is one line naming cause and fix."""


def _base58btc(data: bytes) -> str:
    return base58.b58encode(data).decode("ascii")


def _base58btc_decode(text: str) -> bytes:
    # base58 strips trailing whitespace and encodes str as ASCII; a peer id is exact text,
    # so anything it would tolerate or choke on is refused here, with a ValueError.
    if not text.isascii() or text != text.strip():
        raise ValueError(f"not base58: {text!r}")
    return base58.b58decode(text)


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of an ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
        )
    encoded = _PROTOBUF_ED25519_PREFIX + public_key
    return _base58btc(bytes([_MULTIHASH_IDENTITY, len(encoded)]) + encoded)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The ed25519 public key embedded in a peer id; ValueError for other ids."""
    raw = _base58btc_decode(peer_id)
    prefix = bytes([_MULTIHASH_IDENTITY, len(_PROTOBUF_ED25519_PREFIX) + PUBLIC_KEY_BYTES])
    if not raw.startswith(prefix + _PROTOBUF_ED25519_PREFIX) or len(raw) != 38:
        raise ValueError(f"{peer_id!r} is not the peer id of an ed25519 key")
    return raw[len(prefix) + len(_PROTOBUF_ED25519_PREFIX) :]


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s ed25519 signature of ``message``."""
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class NodeKey:
    """An ed25519 signing key, held as its 32-byte seed."""

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_BYTES:
            raise ValueError(f"an ed25519 seed has {SEED_BYTES} bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(secrets.token_bytes(SEED_BYTES))

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached ed25519 signature of ``message``."""
        return self.signing_key.sign(message).signature

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key file with mode 0600, atomically; refuse to overwrite unless asked."""
        target = Path(path)
        if target.exists() and not overwrite:
            raise KeyFileError(f"{target} already exists; pass --force to overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"{KEY_FILE_HEADER}\n{self.seed.hex()}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeKey:
        """Read a key file written by :meth:`save`; KeyFileError names what is wrong."""
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyFileError(
                f"key file {source} does not exist; create one with `p2pfl keygen {source}`"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise KeyFileError(f"cannot read key file {source}: {error}") from None
        lines = text.strip().splitlines()
        if len(lines) != 2 or lines[0].strip() != KEY_FILE_HEADER:
            raise KeyFileError(
                f"{source} is not a p2pfl key file (expected a first line {KEY_FILE_HEADER!r}); "
                "create one with `p2pfl keygen`"
            )
        try:
            seed = bytes.fromhex(lines[1].strip())
        except ValueError:
            raise KeyFileError(f"{source}: the seed line is not hexadecimal") from None
        if len(seed) != SEED_BYTES:
            raise KeyFileError(f"{source}: the seed has {len(seed)} bytes, expected {SEED_BYTES}")
        return cls(seed)
