"""Who is a member, now: the one answer every layer of the daemon reads, and that changes.

Before issue 22 the allow file was read once and copied, as frozensets, into the
connection gate, the inbound router, the peer book, the relay, the neighbour ranking
and gossip/'s admission. A member admitted or revoked at runtime would have to reach
all of them. Instead each of them now holds the same :class:`MemberSource`: a live
``Collection[str]`` of peer ids (``in``, iteration and ``len`` read the current set),
with :attr:`keys` and :attr:`revoked_keys` as the public-key views admission needs.

Its contents come from the allow file (reloaded on SIGHUP) or from the network's
:class:`gossip.membership.MemberSet` (p2pfl/member_service.py, on every change and
every second, so expiry takes effect on time). Listeners hear who was added and
removed: the gate protects the added, the runtime disconnects the removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Container, Iterator
from typing import Any

from gossip.keys import public_key_from_peer_id
from p2pfl.allowlist import allow_file_peers
from p2pfl.config import ConfigError

logger = logging.getLogger(__name__)

Listener = Callable[[frozenset[str], frozenset[str]], None]


def _keys(peers: frozenset[str]) -> frozenset[bytes]:
    keys = set()
    for peer in peers:
        try:
            keys.add(public_key_from_peer_id(peer))
        except ValueError:
            continue  # not an ed25519 id: it could not sign an update anyway
    return frozenset(keys)


class _KeyView(Container[bytes]):
    """A live ``Container`` of public keys, for gossip/'s admission (keyed by signer)."""

    def __init__(self, read: Callable[[], frozenset[bytes]]) -> None:
        self._read = read

    def __contains__(self, key: object) -> bool:
        return key in self._read()


class MemberSource(Collection[str]):
    """The current members (peer ids), the revoked keys, and who listens for changes.

    ``open_to_strangers``: a network (``--network``) admits a non-member's connection
    after Noise, so that it can show its certificate over ``/p2pfl/members/1.0.0`` (its
    only protocol until then); an allow file does not. A revoked key is refused
    after Noise in both.
    """

    def __init__(
        self, peers: Collection[str], *, open_to_strangers: bool = False
    ) -> None:
        self._peers = frozenset(peers)
        self._keys = _keys(self._peers)
        self._revoked: frozenset[str] = frozenset()
        self._revoked_keys: frozenset[bytes] = frozenset()
        self.open_to_strangers = open_to_strangers
        self._listeners: list[Listener] = []
        self.keys: Container[bytes] = _KeyView(lambda: self._keys)
        self.revoked_keys: Container[bytes] = _KeyView(lambda: self._revoked_keys)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def __iter__(self) -> Iterator[str]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

    @property
    def peers(self) -> frozenset[str]:
        return self._peers

    def is_revoked(self, peer: str) -> bool:
        return peer in self._revoked

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(added, removed)`` after every change (revoked keys count as
        removed, even when they were not members)."""
        self._listeners.append(listener)

    def update(
        self, peers: Collection[str], revoked: Collection[str] = frozenset()
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Replace the members and revoked keys; returns (added, removed), told to listeners."""
        new, revoked_now = frozenset(peers) - frozenset(revoked), frozenset(revoked)
        added = new - self._peers
        removed = (self._peers - new) | (revoked_now - self._revoked)
        self._peers, self._keys = new, _keys(new)
        self._revoked, self._revoked_keys = revoked_now, _keys(revoked_now)
        if added or removed:
            for listener in self._listeners:
                listener(added, removed)
        return added, removed


def reload_members(allow: str | None, members: MemberSource | None, service: Any) -> None:
    """SIGHUP: re-read the --allow file into ``members`` (a bad file keeps the old list
    and says why), and have the network's member service (if any) take its inbox now."""
    if allow and members is not None:
        try:
            peers = allow_file_peers(allow)
        except ConfigError as error:
            logger.warning("SIGHUP: kept the members: %s", error)
            return
        added, removed = members.update(peers)
        logger.info("SIGHUP: %s reloaded, %d added, %d removed", allow, len(added), len(removed))
    if service is not None:
        service.take_inbox()
        service.refresh()
