"""Who may hold a connection to this node, decided in py-libp2p's own hooks.

Three gates, each at the earliest point where what it needs is known:

1. Before any byte of Noise, only the remote IP is known. :class:`InboundGuard`
   (p2pfl.handshakes) sees every socket the swarm accepts first: a token bucket per
   IP limits handshakes per second, and a cap per IP bounds handshakes in progress.
   At the cap a silent socket, else the *oldest* handshake of that IP if pending for
   a second, is cut rather than the newcomer: a Noise handshake takes milliseconds,
   so an old pending one is a peer holding the door shut (raw TCP that never speaks),
   and a member sharing the IP (every daemon on loopback) still gets in. Across all
   IPs, a socket waits for its first byte *before* libp2p's handler (so without one
   of its 250 inbound slots), at most 1 s and at most 128 at once (oldest cut); only
   sockets that speak take a slot, at most 32 at once.
2. Right after the Noise handshake the peer id is authenticated. :class:`GatedNoise`
   closes the connection of a peer outside the allowlist, or whose key is not
   ed25519, there, per connection, before a muxer or any stream (so identify and
   ping never answer it).
3. When the connection is registered, :class:`GatedResourceManager` (libp2p's
   ``ResourceManager``, whose admission hook the swarm calls with the peer id and IP)
   caps connections per IP for unprotected peers, and strangers' connections in all
   (the idlest stranger is cut for a newcomer). Members are in libp2p's allowlist
   and tag store: they bypass the limits and are never pruned.

Every refusal is counted in one ``Counter`` by reason, shown by the node's status.

Every allowlist here (and in p2pfl.transport and p2pfl.relay) is a :data:`Members`:
peer-id strings. gossip/'s admission keeps its own, keyed by public key (bytes); the
runtime derives ours from it once, where it loads ``--allow`` (p2pfl.config).

Only public libp2p API is used here; what needs its internals (routing the swarm's
inbound sockets, learning when one closes) is in p2pfl.libp2p_compat.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INetworkService, IRawConnection, ISecureConn
from libp2p.peer.id import ID
from libp2p.rcmgr.allowlist import AllowlistConfig
from libp2p.rcmgr.manager import ConnectionScope, ResourceManager
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import Transport as NoiseTransport

from gossip.keys import public_key_from_peer_id
from p2pfl.handshakes import (
    CLOSE_TIMEOUT_S,
    DEFAULT_EVICTABLE_AFTER_S,
    DEFAULT_FIRST_BYTE_S,
    DEFAULT_HANDSHAKE_BURST,
    DEFAULT_HANDSHAKES_PER_IP_PER_S,
    DEFAULT_MAX_HANDSHAKING_TOTAL,
    DEFAULT_MAX_PENDING_PER_IP,
    DEFAULT_MAX_SILENT_TOTAL,
    LIBP2P_INBOUND_SLOTS,
    InboundGuard,
    Refusals,
    _Handshake,
    current_handshake,
    refuse,
)
from p2pfl.member_source import MemberSource

__all__ = [
    "DEFAULT_EVICTABLE_AFTER_S",
    "DEFAULT_FIRST_BYTE_S",
    "DEFAULT_HANDSHAKES_PER_IP_PER_S",
    "DEFAULT_HANDSHAKE_BURST",
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "DEFAULT_MAX_HANDSHAKING_TOTAL",
    "DEFAULT_MAX_PENDING_PER_IP",
    "DEFAULT_MAX_SILENT_TOTAL",
    "DEFAULT_MAX_STRANGERS",
    "LIBP2P_INBOUND_SLOTS",
    "ConnectionGate",
    "GatedNoise",
    "GatedResourceManager",
    "InboundGuard",
    "Members",
    "Refusals",
    "refuse",
]

logger = logging.getLogger(__name__)

Members = Collection[str]
"""An allowlist as the network layers take it: peer ids (``12D3KooW...``); the daemon
passes a live :class:`p2pfl.member_source.MemberSource`."""

# Established connections per IP of peers that are not protected (with --allow there
# are none: outsiders are cut after Noise). Protected peers do not count.
DEFAULT_MAX_CONNECTIONS_PER_IP = 64

# Established inbound connections of strangers: peers neither protected (members,
# relays, first-hand neighbours) nor known first-hand. Strangers are a budget of their
# own so that they can never fill the inbound slots members need.
DEFAULT_MAX_STRANGERS = 128
# A stranger that did send useful frames (peer exchange, an update) but none for this
# long ranks with the idle ones for cutting: a joiner keeps talking while it joins.
DEFAULT_STRANGER_QUIET_S = 30.0
MEMBER_TAG = "p2pfl-member"


class GatedNoise(NoiseTransport):
    """Noise that closes the connection right after the handshake when the authenticated
    peer cannot take part: its key is not ed25519 (it could not sign updates), or it is
    not a member (when there is an allowlist)."""

    def __init__(
        self, *args: Any, members: Members | None, refused: Refusals, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._members = members
        self._refused = refused

    def _refusal(self, peer: str) -> str | None:
        try:
            public_key_from_peer_id(peer)
        except ValueError:
            return "unsupported-key"
        members = self._members
        if isinstance(members, MemberSource) and members.is_revoked(peer):
            return "revoked"  # whatever its IP, and whatever certificate it would show
        if members is not None and peer not in members:
            # A network lets a stranger in to show its certificate, and nothing else
            # (p2pfl.inbound serves it the members protocol only).
            if not (isinstance(members, MemberSource) and members.open_to_strangers):
                return "not-member"
        return None

    async def _admit(self, conn: ISecureConn) -> ISecureConn:
        peer = str(conn.get_remote_peer())
        reason = self._refusal(peer)
        if reason is None:
            return conn
        refuse(self._refused, reason)
        logger.debug("closed the connection of %s after Noise: %s", peer, reason)
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await conn.close()
            except Exception:  # closing a connection we are discarding anyway
                pass
        raise HandshakeFailure(f"{peer} refused: {reason}")

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._admit(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._admit(await super().secure_outbound(conn, peer_id))


class _NoScope:
    """The scope of a connection the manager does not count (before the handshake)."""

    def close(self) -> None:
        pass


class _GatedScope:
    """libp2p's scope of an admitted connection, and what the gate counts for it.

    The swarm keeps the scope the admission hook returns and calls its ``close()``
    when the connection ends (``SwarmConn.close``); the gate's own counts are
    released there too, once, before libp2p's."""

    def __init__(self, inner: ConnectionScope) -> None:
        self.inner = inner
        self.releases: list[Callable[[], None]] = []

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def close(self) -> None:
        if not self.inner.closed:
            for release in self.releases:
                release()
        self.inner.close()


@dataclass(eq=False)
class _Stranger:
    """An established inbound connection of a peer that is neither protected nor known."""

    peer: str
    connection: _Handshake
    last_active: float
    useful: bool = False


class GatedResourceManager(ResourceManager):
    """libp2p's resource manager with a per-IP cap for unprotected peers and a budget of
    established connections for strangers.

    Protected peers (members, and whom the node protects with :meth:`protect`) are in
    libp2p's allowlist, so they bypass its limits, and are re-protected in libp2p's
    tag store at every admission (the tag store forgets a protection when the peer's
    last connection closes), so its pruner never closes them. Admitting a connection
    ends its handshake phase in the :class:`InboundGuard`.

    Strangers (inbound, not protected, not ``known``) hold at most ``max_strangers``
    connections. At the cap a newcomer takes the place of the stranger that has sent
    nothing useful for longest (never useful first, oldest first); when every stranger
    is in use the newcomer is refused. libp2p's ``ConnectionPruner`` does not fit: it
    acts only above ``max_connections`` (300), after the 250 inbound slots are gone,
    and ranks by tags and stream counts, which an idle attacker's connections share
    with a member's between rounds.
    """

    def __init__(
        self,
        refused: Refusals,
        guard: InboundGuard,
        *,
        members: Members | None = None,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
        max_strangers: int = DEFAULT_MAX_STRANGERS,
        stranger_quiet_s: float = DEFAULT_STRANGER_QUIET_S,
        known: Callable[[str], bool] | None = None,
    ) -> None:
        # No circuit breaker or "graceful degradation": both can shut out everyone,
        # members included, for a minute after a burst of refusals.
        super().__init__(
            allowlist_config=AllowlistConfig(),
            enable_circuit_breaker=False,
            enable_graceful_degradation=False,
        )
        self.refused = refused
        self.guard = guard
        self.max_connections_per_ip = max_connections_per_ip
        self.per_ip: Counter[str] = Counter()
        """Established connections of unprotected peers, by IP."""
        self._protected: dict[str, set[str]] = {}
        self._swarm: INetworkService | None = None
        self.max_strangers = max_strangers
        self.stranger_quiet_s = stranger_quiet_s
        self.known: Callable[[str], bool] = known or (lambda peer: False)
        """Peers that are no strangers without protection (first-hand known peers)."""
        self._strangers: dict[_Handshake, _Stranger] = {}
        for member in members or ():
            self.protect(member, MEMBER_TAG)
        if isinstance(members, MemberSource):
            members.subscribe(self._members_changed)

    def _members_changed(self, added: frozenset[str], removed: frozenset[str]) -> None:
        for peer in added:
            self.protect(peer, MEMBER_TAG)
        for peer in removed:
            self.unprotect(peer, MEMBER_TAG)

    def attach(self, swarm: INetworkService) -> None:
        self._swarm = swarm

    def protect(self, peer_id: str, tag: str) -> None:
        self._protected.setdefault(peer_id, set()).add(tag)
        self.allowlist.add_peer(ID.from_base58(peer_id))
        self._mark_in_swarm(peer_id)

    def unprotect(self, peer_id: str, tag: str) -> None:
        tags = self._protected.get(peer_id)
        if tags is None:
            return
        tags.discard(tag)
        if self._swarm is not None:
            self._swarm.unprotect(ID.from_base58(peer_id), tag)
        if not tags:
            del self._protected[peer_id]
            self.allowlist.remove_peer(ID.from_base58(peer_id))

    def is_protected(self, peer_id: str) -> bool:
        return peer_id in self._protected

    @property
    def strangers(self) -> int:
        """Established inbound connections of strangers now."""
        return len(self._strangers)

    def note_activity(self, peer_id: str) -> None:
        """``peer_id`` sent something useful (a frame its handler took): not idle."""
        now = trio.current_time()
        for stranger in self._strangers.values():
            if stranger.peer == peer_id:
                stranger.useful = True
                stranger.last_active = now

    def _is_stranger(self, peer_id: str) -> bool:
        return not self.is_protected(peer_id) and not self.known(peer_id)

    def _make_room_for_a_stranger(self) -> bool:
        """Cut the idlest stranger if the budget is full; False if none may be cut."""
        for connection, stranger in list(self._strangers.items()):
            if not self._is_stranger(stranger.peer):
                del self._strangers[connection]  # became protected or known meanwhile
        if len(self._strangers) < self.max_strangers:
            return True
        now = trio.current_time()
        idle = [
            s for s in self._strangers.values()
            if not s.useful or now - s.last_active >= self.stranger_quiet_s
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda s: (s.useful, s.last_active))
        del self._strangers[victim.connection]
        self.refused["stranger-cut"] += 1
        logger.debug("cut the idle stranger %s for a newcomer", victim.peer)
        victim.connection.scope.cancel()
        return True

    def _mark_in_swarm(self, peer_id: str) -> None:
        if self._swarm is not None:
            for tag in self._protected.get(peer_id, ()):
                self._swarm.protect(ID.from_base58(peer_id), tag)

    def open_connection(
        self, peer_id: Any | None = None, endpoint_ip: str | None = None, direction: str = "inbound"
    ) -> Any:
        if peer_id is None:
            # Before the handshake: the InboundGuard decides (it can also cut it later).
            return _NoScope()
        peer = str(peer_id)
        counted = not self.is_protected(peer) and bool(endpoint_ip)
        if counted and self.per_ip[endpoint_ip] >= self.max_connections_per_ip:
            refuse(self.refused, "ip-connections")
            return None
        # Only an inbound connection still in its handshake is a stranger's.
        connection = current_handshake()
        stranger = direction == "inbound" and connection is not None and self._is_stranger(peer)
        if stranger and not self._make_room_for_a_stranger():
            refuse(self.refused, "strangers-full")
            return None
        inner = super().open_connection(peer_id, endpoint_ip=endpoint_ip, direction=direction)
        if inner is None:
            refuse(self.refused, "resource-limit")
            return None
        self.guard.established()
        self._mark_in_swarm(peer)
        scope = _GatedScope(inner)
        if counted:
            assert endpoint_ip is not None
            ip = endpoint_ip
            self.per_ip[ip] += 1

            def uncount() -> None:
                self.per_ip[ip] -= 1
                if self.per_ip[ip] <= 0:
                    del self.per_ip[ip]

            scope.releases.append(uncount)
        if stranger:
            assert connection is not None
            self._strangers[connection] = _Stranger(peer, connection, trio.current_time())
            scope.releases.append(lambda: self._strangers.pop(connection, None))
        return scope


class ConnectionGate:
    """The gates of one host and the counter they share; see the module docstring."""

    def __init__(
        self,
        members: Members | None = None,
        *,
        guard: InboundGuard | None = None,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
        max_strangers: int = DEFAULT_MAX_STRANGERS,
        known: Callable[[str], bool] | None = None,
    ) -> None:
        self.members = members
        self.guard = guard if guard is not None else InboundGuard(Counter())
        self.refused: Refusals = self.guard.refused
        self.manager = GatedResourceManager(
            self.refused,
            self.guard,
            members=members,
            max_connections_per_ip=max_connections_per_ip,
            max_strangers=max_strangers,
            known=known,
        )

    def noise(self, key_pair: Any, noise_privkey: Any) -> NoiseTransport:
        return GatedNoise(
            key_pair, noise_privkey=noise_privkey, members=self.members, refused=self.refused
        )

    def install(self, swarm: INetworkService) -> None:
        self.guard.install(swarm)
        self.manager.attach(swarm)


