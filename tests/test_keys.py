"""Node keys: the key file, its failure modes, and agreement with libp2p's identity."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from gossip.keys import (
    KEY_FILE_HEADER,
    KeyFileError,
    NodeKey,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
)

pytestmark = pytest.mark.unit

SEEDS = [bytes(32), bytes(range(32)), bytes([0xFF] * 32), bytes.fromhex("9d" * 32)]


def test_generate_save_load_round_trip(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "node.key"
    key.save(path)
    assert NodeKey.load(path) == key


def test_generated_keys_differ() -> None:
    assert NodeKey.generate().seed != NodeKey.generate().seed


def test_saved_file_has_header_and_lowercase_hex_seed(tmp_path: Path) -> None:
    key = NodeKey(bytes(range(32)))
    path = tmp_path / "node.key"
    key.save(path)
    assert path.read_text(encoding="utf-8") == f"{KEY_FILE_HEADER}\n{bytes(range(32)).hex()}\n"


def test_saved_file_mode_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.generate().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "node.key"
    NodeKey.generate().save(path)
    assert path.is_file()


def test_save_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = NodeKey.generate()
    first.save(path)
    with pytest.raises(KeyFileError, match="already exists"):
        NodeKey.generate().save(path)
    assert NodeKey.load(path) == first


def test_save_overwrites_with_flag(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.generate().save(path)
    second = NodeKey.generate()
    second.save(path, overwrite=True)
    assert NodeKey.load(path) == second


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    NodeKey.generate().save(tmp_path / "node.key")
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_repr_does_not_show_the_seed() -> None:
    key = NodeKey(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key)
    assert repr(bytes(range(32))) not in repr(key)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_seed_of_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NodeKey(bytes(length))


BAD_KEY_FILES: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "wrong-header": b"p2pfl-rsa-v1\n" + b"00" * 32 + b"\n",
    "header-only": KEY_FILE_HEADER.encode() + b"\n",
    "extra-line": KEY_FILE_HEADER.encode() + b"\n" + b"00" * 32 + b"\nmore\n",
    "non-hex": KEY_FILE_HEADER.encode() + b"\n" + b"zz" * 32 + b"\n",
    "odd-hex-digits": KEY_FILE_HEADER.encode() + b"\n" + b"0" * 63 + b"\n",
    "too-short": KEY_FILE_HEADER.encode() + b"\n" + b"00" * 31 + b"\n",
    "too-long": KEY_FILE_HEADER.encode() + b"\n" + b"00" * 33 + b"\n",
    "binary-garbage": bytes(range(256)) * 4,
    "invalid-utf8": b"\xff\xfe\x80" * 20,
}


@pytest.mark.parametrize("case", sorted(BAD_KEY_FILES))
def test_bad_key_file_gives_one_line_key_file_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "node.key"
    content = BAD_KEY_FILES[case]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyFileError) as raised:
        NodeKey.load(path)
    message = str(raised.value)
    assert message
    assert "\n" not in message
    assert str(path) in message


def test_directory_instead_of_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        NodeKey.load(tmp_path)


def test_missing_key_file_message_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="p2pfl keygen"):
        NodeKey.load(tmp_path / "absent.key")


def _libp2p_key(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.new(seed)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s[:2].hex())
def test_peer_id_equals_libp2p_peer_id(seed: bytes) -> None:
    libp2p_public = _libp2p_key(seed).get_public_key()
    assert NodeKey(seed).peer_id == ID.from_pubkey(libp2p_public).to_base58()


def test_peer_id_equals_libp2p_peer_id_for_random_keys() -> None:
    for _ in range(50):
        key = NodeKey.generate()
        libp2p_public = _libp2p_key(key.seed).get_public_key()
        assert key.public_key == libp2p_public.to_bytes()
        assert key.peer_id == ID.from_pubkey(libp2p_public).to_base58()


def test_peer_id_has_the_ed25519_prefix() -> None:
    assert NodeKey.generate().peer_id.startswith("12D3KooW")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s[:2].hex())
def test_public_key_from_peer_id_inverts_peer_id(seed: bytes) -> None:
    key = NodeKey(seed)
    assert public_key_from_peer_id(key.peer_id) == key.public_key


def test_public_key_from_libp2p_peer_id() -> None:
    key = NodeKey.generate()
    libp2p_id = ID.from_pubkey(_libp2p_key(key.seed).get_public_key())
    assert public_key_from_peer_id(libp2p_id.to_base58()) == key.public_key


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "0OIl",  # not base58
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha2-256 multihash (RSA-style)
        "12D3KooW",  # truncated
        NodeKey(bytes(32)).peer_id + " ",  # base58 itself would strip this
        NodeKey(bytes(32)).peer_id[:-1] + "é",  # not ASCII
    ],
)
def test_public_key_from_other_peer_ids_is_a_value_error(peer_id: str) -> None:
    with pytest.raises(ValueError):
        public_key_from_peer_id(peer_id)


def test_peer_id_from_public_key_refuses_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_from_public_key(bytes(31))


def test_signature_verifies_with_libp2p_public_key() -> None:
    key = NodeKey.generate()
    message = b"p2pfl signs this"
    libp2p_public = _libp2p_key(key.seed).get_public_key()
    assert libp2p_public.verify(message, key.sign(message))


def test_libp2p_signature_verifies_with_gossip_verify() -> None:
    key = NodeKey.generate()
    message = b"libp2p signs this"
    assert verify(key.public_key, message, _libp2p_key(key.seed).sign(message))


def test_signature_of_other_message_does_not_verify() -> None:
    key = NodeKey.generate()
    signature = key.sign(b"one message")
    assert not verify(key.public_key, b"another message", signature)
    assert not _libp2p_key(key.seed).get_public_key().verify(b"another message", signature)


def test_signature_by_other_key_does_not_verify() -> None:
    message = b"hello"
    assert not verify(NodeKey.generate().public_key, message, NodeKey.generate().sign(message))


@pytest.mark.parametrize("public_key", [b"", bytes(31), bytes(33)])
def test_verify_with_malformed_public_key_is_false(public_key: bytes) -> None:
    assert not verify(public_key, b"m", NodeKey.generate().sign(b"m"))


def test_verify_with_malformed_signature_is_false() -> None:
    key = NodeKey.generate()
    assert not verify(key.public_key, b"m", key.sign(b"m")[:63])
