"""The ``--allow`` file: the peer ids of a permissioned network, one per line."""

from __future__ import annotations

from pathlib import Path

from gossip.keys import peer_id_from_public_key, public_key_from_peer_id
from p2pfl.config import ConfigError


def load_allowlist(path: str | Path) -> frozenset[bytes]:
    """Peer ids, one per line (``#`` comments allowed), as ed25519 public keys.

    Keys, because gossip/'s admission is keyed by the signer's public key. The network
    layers (p2pfl.transport, p2pfl.gating, p2pfl.relay) take peer-id strings
    (p2pfl.gating.Members); the runtime converts this set to those once, with
    ``gossip.keys.peer_id_from_public_key``, right after loading it.
    """
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"--allow {source}: cannot read ({error.strerror})") from None
    keys = set()
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = public_key_from_peer_id(text)
        except ValueError:
            raise ConfigError(
                f"--allow {source}:{number}: {text!r} is not an ed25519 peer id (12D3KooW...)"
            ) from None
        assert peer_id_from_public_key(key) == text
        keys.add(key)
    return frozenset(keys)


def allow_file_peers(path: str) -> frozenset[str]:
    """The --allow file's peer ids, as the network layers take them (ConfigError names a
    bad line)."""
    return frozenset(peer_id_from_public_key(key) for key in load_allowlist(path))
