"""Who may hold a connection to this node, decided in py-libp2p's own hooks.

Three gates, each at the earliest point where what it needs is known:

1. Before any byte of Noise, only the remote IP is known. :class:`InboundGuard` wraps
   the swarm's inbound-connection handler: a token bucket per IP limits handshakes
   per second, and a cap per IP bounds handshakes in progress. At the cap the *oldest*
   handshake of that IP is cut, if it has been pending for a second, rather than the
   newcomer: a Noise handshake takes milliseconds, so an old pending one is a peer
   holding the door shut (raw TCP that never speaks), and a member sharing the IP
   (every daemon on loopback) still gets in.
2. Right after the Noise handshake the peer id is authenticated. :class:`GatedNoise`
   closes the connection of a peer outside the allowlist, or whose key is not
   ed25519, there, per connection, before a muxer or any stream (so identify and
   ping never answer it).
3. When the connection is registered, :class:`GatedResourceManager` (libp2p's
   ``ResourceManager``, whose admission hook the swarm calls with the peer id and IP)
   caps connections per IP for unprotected peers. Members are in libp2p's allowlist
   and tag store: they bypass the limits and are never pruned.

Every refusal is counted in one ``Counter`` by reason, shown by the node's status.
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.peer.id import ID
from libp2p.rcmgr.allowlist import AllowlistConfig
from libp2p.rcmgr.manager import ResourceManager
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import Transport as NoiseTransport

from gossip.keys import public_key_from_peer_id
from p2pfl.ratelimit import PeerRateLimiter

logger = logging.getLogger(__name__)

# Loopback handshakes take ~10 ms: 20 a second per IP is plenty for honest peers and
# keeps a flood from one address to a small, steady share of one core.
DEFAULT_HANDSHAKES_PER_IP_PER_S = 20.0
DEFAULT_HANDSHAKE_BURST = 40.0
# Handshakes in progress per IP: enough for every daemon of a 32-node test network on
# one machine to join one bootstrap node at once.
DEFAULT_MAX_PENDING_PER_IP = 32
# A pending handshake older than this may be cut for a newcomer. Honest ones finish in
# milliseconds; keeping DEFAULT_MAX_PENDING_PER_IP silent ones younger than this would
# take 32 connections a second, more than the handshake rate allows.
DEFAULT_EVICTABLE_AFTER_S = 1.0
# Established connections per IP of peers that are not protected (with --allow there
# are none: outsiders are cut after Noise). Protected peers do not count.
DEFAULT_MAX_CONNECTIONS_PER_IP = 64
CLOSE_TIMEOUT_S = 1.0
MEMBER_TAG = "p2pfl-member"

Refusals = Counter[str]
"""Refused connections by reason: handshake-rate, handshake-busy, handshake-evicted,
handshake-failed, unsupported-key, not-member, ip-connections, resource-limit."""


class GatedNoise(NoiseTransport):
    """Noise that closes the connection right after the handshake when the authenticated
    peer cannot take part: its key is not ed25519 (it could not sign updates), or it is
    not a member (when there is an allowlist)."""

    def __init__(
        self, *args: Any, members: frozenset[str] | None, refused: Refusals, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._members = members
        self._refused = refused

    def _refusal(self, peer: str) -> str | None:
        try:
            public_key_from_peer_id(peer)
        except ValueError:
            return "unsupported-key"
        if self._members is not None and peer not in self._members:
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


@dataclass(eq=False)
class _Handshake:
    ip: str
    started: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    evicted: bool = False
    established: bool = False
    refusal: str | None = None


# The guard and the resource manager meet in the swarm's handler task of one inbound
# connection: the guard sets this before running the handler, the manager reads it
# when it admits the connection, which ends the handshake phase.
_CURRENT_HANDSHAKE: contextvars.ContextVar[_Handshake | None] = contextvars.ContextVar(
    "p2pfl_current_handshake", default=None
)

InboundHandler = Callable[[Any, Any], Awaitable[None]]


def refuse(refused: Refusals, reason: str) -> None:
    """Count a refused connection once: an inbound one when its handler ends (it may
    also have been evicted meanwhile), an outbound one now."""
    handshake = _CURRENT_HANDSHAKE.get()
    # Tasks libp2p starts for an established connection inherit the variable: a
    # handshake that is over no longer collects refusals.
    if handshake is None or handshake.established:
        refused[reason] += 1
    elif handshake.refusal is None:
        handshake.refusal = reason


class InboundGuard:
    """Per-IP handshake rate and concurrency, around the swarm's inbound handler.

    It also ends the handler when its connection closes. py-libp2p 0.8.1 keeps each
    inbound handler (and the swarm's inbound slot it holds, 250 by default) alive
    until the swarm stops, so without this a node refuses every inbound connection
    after 250 peers have come and gone (measured: 20 connect-disconnect cycles left
    20 slots taken and 0 connections).
    """

    def __init__(
        self,
        refused: Refusals,
        *,
        handshakes_per_ip_per_s: float = DEFAULT_HANDSHAKES_PER_IP_PER_S,
        handshake_burst: float = DEFAULT_HANDSHAKE_BURST,
        max_pending_per_ip: int = DEFAULT_MAX_PENDING_PER_IP,
        evictable_after: float = DEFAULT_EVICTABLE_AFTER_S,
    ) -> None:
        if max_pending_per_ip < 1:
            raise ValueError("max_pending_per_ip must be at least 1")
        self.refused = refused
        self.max_pending_per_ip = max_pending_per_ip
        self.evictable_after = evictable_after
        self._rate = PeerRateLimiter(handshakes_per_ip_per_s, handshake_burst)
        self._pending: dict[str, list[_Handshake]] = {}

    def handshakes_available(self, ip: str) -> float:
        """Handshakes ``ip`` may start right now (its token bucket)."""
        return self._rate.available(ip, trio.current_time())

    def pending(self, ip: str) -> int:
        return len(self._pending.get(ip, ()))

    def install(self, swarm: Any) -> None:
        """Route the swarm's inbound connections through this guard (once)."""
        original: InboundHandler = swarm._handle_inbound_connection

        async def guarded(read_write_closer: Any, maddr: Any) -> None:
            await self._handle(original, read_write_closer, maddr)

        # The listener's closure looks the handler up on the swarm at every
        # connection, so an instance attribute takes effect for all listeners.
        swarm._handle_inbound_connection = guarded

    def established(self) -> None:
        """The current task's handshake is over: it no longer counts as pending."""
        handshake = _CURRENT_HANDSHAKE.get()
        if handshake is not None:
            handshake.established = True
            self._forget(handshake)

    async def _handle(self, original: InboundHandler, connection: Any, maddr: Any) -> None:
        ip = _remote_ip(connection)
        now = trio.current_time()
        if not self._rate.allows(ip, 1, now):
            self.refused["handshake-rate"] += 1
            await _close_quietly(connection)
            return
        queue = self._pending.setdefault(ip, [])
        if len(queue) >= self.max_pending_per_ip:
            if now - queue[0].started < self.evictable_after:
                self.refused["handshake-busy"] += 1
                await _close_quietly(connection)
                return
            oldest = queue.pop(0)
            oldest.evicted = True
            oldest.scope.cancel()
        self._rate.charge(ip, 1, now)
        handshake = _Handshake(ip, now)
        queue.append(handshake)
        closed = trio.Event()
        close = connection.close

        async def close_and_signal() -> None:
            try:
                await close()
            finally:
                closed.set()

        connection.close = close_and_signal
        token = _CURRENT_HANDSHAKE.set(handshake)
        try:
            with handshake.scope:
                async with trio.open_nursery() as nursery:

                    async def serve() -> None:
                        await original(connection, maddr)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(serve)
                    await closed.wait()
                    nursery.cancel_scope.cancel()
        finally:
            _CURRENT_HANDSHAKE.reset(token)
            self._forget(handshake)
            if handshake.refusal is not None:
                self.refused[handshake.refusal] += 1
            elif handshake.evicted:
                self.refused["handshake-evicted"] += 1
            elif not handshake.established:
                # The peer hung up, stalled past the upgrade timeout or spoke garbage.
                self.refused["handshake-failed"] += 1
            if not closed.is_set():
                await _close_quietly(connection)

    def _forget(self, handshake: _Handshake) -> None:
        queue = self._pending.get(handshake.ip)
        if queue is None:
            return
        if handshake in queue:
            queue.remove(handshake)
        if not queue:
            del self._pending[handshake.ip]


class _NoScope:
    """The scope of a connection the manager does not count (before the handshake)."""

    def close(self) -> None:
        pass


class GatedResourceManager(ResourceManager):
    """libp2p's resource manager with a per-IP cap for unprotected peers.

    Protected peers (members, and whom the node protects with :meth:`protect`) are in
    libp2p's allowlist, so they bypass its limits, and are re-protected in libp2p's
    tag store at every admission (the tag store forgets a protection when the peer's
    last connection closes), so its pruner never closes them. Admitting a connection
    ends its handshake phase in the :class:`InboundGuard`.
    """

    def __init__(
        self,
        refused: Refusals,
        guard: InboundGuard,
        *,
        members: frozenset[str] | None = None,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
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
        self._swarm: Any = None
        for member in members or ():
            self.protect(member, MEMBER_TAG)

    def attach(self, swarm: Any) -> None:
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
        scope = super().open_connection(peer_id, endpoint_ip=endpoint_ip, direction=direction)
        if scope is None:
            refuse(self.refused, "resource-limit")
            return None
        self.guard.established()
        self._mark_in_swarm(peer)
        if counted:
            assert endpoint_ip is not None
            ip = endpoint_ip
            self.per_ip[ip] += 1
            release = scope.close

            def close_and_uncount() -> None:
                if not scope.closed:
                    self.per_ip[ip] -= 1
                    if self.per_ip[ip] <= 0:
                        del self.per_ip[ip]
                release()

            scope.close = close_and_uncount
        return scope


class ConnectionGate:
    """The gates of one host and the counter they share; see the module docstring."""

    def __init__(
        self,
        members: frozenset[str] | None = None,
        *,
        guard: InboundGuard | None = None,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
    ) -> None:
        self.members = members
        self.guard = guard if guard is not None else InboundGuard(Counter())
        self.refused: Refusals = self.guard.refused
        self.manager = GatedResourceManager(
            self.refused,
            self.guard,
            members=members,
            max_connections_per_ip=max_connections_per_ip,
        )

    def noise(self, key_pair: Any, noise_privkey: Any) -> NoiseTransport:
        return GatedNoise(
            key_pair, noise_privkey=noise_privkey, members=self.members, refused=self.refused
        )

    def install(self, swarm: Any) -> None:
        self.guard.install(swarm)
        self.manager.attach(swarm)


def _remote_ip(connection: Any) -> str:
    try:
        address = connection.get_remote_address()
    except Exception:
        address = None
    return str(address[0]) if address else ""


async def _close_quietly(connection: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await connection.close()
        except Exception:
            pass
