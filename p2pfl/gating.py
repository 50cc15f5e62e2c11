"""Who may hold a connection to this node, decided in py-libp2p's own hooks.

Three gates, each at the earliest point where what it needs is known:

1. Before any byte of Noise, only the remote IP is known. :class:`InboundGuard` wraps
   the swarm's inbound-connection handler: a token bucket per IP limits handshakes
   per second, and a cap per IP bounds handshakes in progress. At the cap a silent
   socket, else the *oldest* handshake of that IP if pending for a second, is cut
   rather than the newcomer: a Noise handshake takes milliseconds, so an old pending
   one is a peer holding the door shut (raw TCP that never speaks), and a member
   sharing the IP (every daemon on loopback) still gets in. Across all IPs, a socket
   waits for its first byte *before* libp2p's handler (so without one of its 250
   inbound slots), at most 1 s and at most 128 at once (oldest cut); only sockets
   that speak take a slot, at most 32 at once.
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

# --- Budgets across all IPs (issue 20): py-libp2p's inbound limiter holds
# max_connections - min_connections = 250 slots, shared by every IP and taken before
# Noise, so 200 IPs of silent sockets could hold all of them. The budgets below keep
# strangers to SILENT (no slot) + HANDSHAKING + STRANGERS = 32 + 128 = 160 of the 250
# slots, so at least 90 stay free for members and protected peers at all times.
LIBP2P_INBOUND_SLOTS = 250
# Accepted sockets that have not sent a byte yet, across all IPs. They wait here,
# before the swarm's handler, so they hold no libp2p inbound slot, only a file
# descriptor. At the cap the OLDEST silent socket is cut and the newcomer waits: a
# dialer speaks multistream-select the moment TCP is up, so an honest newcomer leaves
# this stage within milliseconds, long before 128 later arrivals could push it out.
DEFAULT_MAX_SILENT_TOTAL = 128
# A socket that has sent nothing this long is cut ("silent"): honest dialers write
# their first bytes immediately; libp2p's own upgrade timeout (5 s) is far too long.
DEFAULT_FIRST_BYTE_S = 1.0
# Handshakes in progress that have spoken (they hold a libp2p inbound slot), across
# all IPs. At the cap the oldest one is cut if older than the eviction age, otherwise
# the newcomer is refused ("handshake-full").
DEFAULT_MAX_HANDSHAKING_TOTAL = 32
# Established inbound connections of strangers: peers neither protected (members,
# relays, first-hand neighbours) nor known first-hand. Strangers are a budget of their
# own so that they can never fill the inbound slots members need.
DEFAULT_MAX_STRANGERS = 128
# A stranger that did send useful frames (peer exchange, an update) but none for this
# long ranks with the idle ones for cutting: a joiner keeps talking while it joins.
DEFAULT_STRANGER_QUIET_S = 30.0
CLOSE_TIMEOUT_S = 1.0
MEMBER_TAG = "p2pfl-member"

Refusals = Counter[str]
"""Refused or cut connections by reason: handshake-rate, handshake-busy (per-IP cap),
handshake-full (global cap), handshake-evicted, handshake-failed, silent (no byte
within the first-byte deadline), silent-evicted (pushed out by a newcomer),
unsupported-key, not-member, ip-connections, strangers-full (no idle stranger to cut),
stranger-cut (an idle stranger cut for a newcomer), resource-limit."""


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
    """One inbound connection, from its accept until it closes."""

    ip: str
    started: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    spoke: bool = False
    cut: str | None = None
    """Why the guard cut it while pending (counted when its handler ends)."""
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
    """Handshake budgets per IP and across all IPs, around the swarm's inbound handler.

    An accepted socket first waits, outside libp2p, for its first byte (at most
    ``first_byte_s``; at most ``max_silent_total`` such sockets, oldest cut first).
    Only a socket that speaks enters the swarm's handler and takes one of its inbound
    slots, within ``max_handshaking_total`` handshakes in progress. Per IP, a token
    bucket limits handshakes per second and at most ``max_pending_per_ip`` sockets
    are pending (silent or speaking); at that cap a silent one is cut first.

    It also ends the handler when its connection closes. py-libp2p 0.8.1 keeps each
    inbound handler (and the swarm's inbound slot it holds, 250 by default) alive
    until the swarm stops, so without this a node refuses every inbound connection
    after 250 peers have come and gone (measured: 20 connect-disconnect cycles left
    20 slots taken and 0 connections).

    libp2p's own ConnectionGate (allow/deny lists by address) does not fit here: an
    attacker's addresses are not known in advance and members share addresses with
    strangers (every daemon on one machine is 127.0.0.1); its ResourceManager only
    refuses newcomers at a total, so silent sockets would keep the door shut.
    """

    def __init__(
        self,
        refused: Refusals,
        *,
        handshakes_per_ip_per_s: float = DEFAULT_HANDSHAKES_PER_IP_PER_S,
        handshake_burst: float = DEFAULT_HANDSHAKE_BURST,
        max_pending_per_ip: int = DEFAULT_MAX_PENDING_PER_IP,
        evictable_after: float = DEFAULT_EVICTABLE_AFTER_S,
        max_silent_total: int = DEFAULT_MAX_SILENT_TOTAL,
        first_byte_s: float = DEFAULT_FIRST_BYTE_S,
        max_handshaking_total: int = DEFAULT_MAX_HANDSHAKING_TOTAL,
    ) -> None:
        if min(max_pending_per_ip, max_silent_total, max_handshaking_total) < 1:
            raise ValueError("the pending handshake caps must be at least 1")
        self.refused = refused
        self.max_pending_per_ip = max_pending_per_ip
        self.evictable_after = evictable_after
        self.max_silent_total = max_silent_total
        self.first_byte_s = first_byte_s
        self.max_handshaking_total = max_handshaking_total
        self._rate = PeerRateLimiter(handshakes_per_ip_per_s, handshake_burst)
        self._pending: dict[str, list[_Handshake]] = {}
        # Insertion-ordered, oldest first, across all IPs.
        self._silent: dict[_Handshake, None] = {}
        self._speaking: dict[_Handshake, None] = {}

    def handshakes_available(self, ip: str) -> float:
        """Handshakes ``ip`` may start right now (its token bucket)."""
        return self._rate.available(ip, trio.current_time())

    def pending(self, ip: str | None = None) -> int:
        """Pending handshakes of ``ip`` (of all IPs when None)."""
        if ip is None:
            return len(self._silent) + len(self._speaking)
        return len(self._pending.get(ip, ()))

    @property
    def silent(self) -> int:
        """Accepted sockets waiting for their first byte (they hold no libp2p slot)."""
        return len(self._silent)

    @property
    def handshaking(self) -> int:
        """Handshakes that spoke and hold a libp2p inbound slot."""
        return len(self._speaking)

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

    def _cut(self, handshake: _Handshake, reason: str) -> None:
        handshake.cut = reason
        self._forget(handshake)
        handshake.scope.cancel()

    def _admit_per_ip(self, ip: str, now: float) -> bool:
        """Room in ``ip``'s pending queue, cutting a silent or a stale one if need be."""
        queue = self._pending.setdefault(ip, [])
        if len(queue) < self.max_pending_per_ip:
            return True
        silent = next((h for h in queue if not h.spoke), None)
        if silent is not None:
            self._cut(silent, "silent-evicted")
            return True
        if now - queue[0].started >= self.evictable_after:
            self._cut(queue[0], "handshake-evicted")
            return True
        return False

    def _admit_speaking(self, handshake: _Handshake, now: float) -> bool:
        """Move a socket that spoke into the handshakes holding a libp2p slot."""
        self._silent.pop(handshake, None)
        if len(self._speaking) >= self.max_handshaking_total:
            oldest = next(iter(self._speaking))
            if now - oldest.started < self.evictable_after:
                return False
            self._cut(oldest, "handshake-evicted")
        handshake.spoke = True
        self._speaking[handshake] = None
        return True

    async def _handle(self, original: InboundHandler, connection: Any, maddr: Any) -> None:
        ip = _remote_ip(connection)
        now = trio.current_time()
        if not self._rate.allows(ip, 1, now):
            self.refused["handshake-rate"] += 1
            await _close_quietly(connection)
            return
        if not self._admit_per_ip(ip, now):
            self.refused["handshake-busy"] += 1
            await _close_quietly(connection)
            return
        if len(self._silent) >= self.max_silent_total:
            self._cut(next(iter(self._silent)), "silent-evicted")
        self._rate.charge(ip, 1, now)
        handshake = _Handshake(ip, now)
        self._pending.setdefault(ip, []).append(handshake)
        self._silent[handshake] = None
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
                if not await self._first_byte(connection):
                    handshake.cut = "silent"
                    return
                if not self._admit_speaking(handshake, trio.current_time()):
                    handshake.cut = "handshake-full"
                    return
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
            elif handshake.cut is not None and not handshake.established:
                self.refused[handshake.cut] += 1
            elif not handshake.established:
                # The peer hung up, stalled past the upgrade timeout or spoke garbage.
                self.refused["handshake-failed"] += 1
            if not closed.is_set():
                await _close_quietly(connection)

    async def _first_byte(self, connection: Any) -> bool:
        """Wait until the socket is readable (a byte, or its end), without reading it."""
        sock = getattr(getattr(connection, "stream", None), "socket", None)
        if sock is None:
            return True  # not a plain TCP socket: libp2p's upgrade timeout bounds it
        with trio.move_on_after(self.first_byte_s):
            await trio.lowlevel.wait_readable(sock)
            return True
        return False

    def _forget(self, handshake: _Handshake) -> None:
        self._silent.pop(handshake, None)
        self._speaking.pop(handshake, None)
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
        members: frozenset[str] | None = None,
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
        self._swarm: Any = None
        self.max_strangers = max_strangers
        self.stranger_quiet_s = stranger_quiet_s
        self.known: Callable[[str], bool] = known or (lambda peer: False)
        """Peers that are no strangers without protection (first-hand known peers)."""
        self._strangers: dict[_Handshake, _Stranger] = {}
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
        connection = _CURRENT_HANDSHAKE.get()
        # Only an inbound connection still in its handshake is a stranger's: tasks
        # started from an established connection inherit its context variable.
        stranger = (
            direction == "inbound"
            and connection is not None
            and not connection.established
            and self._is_stranger(peer)
        )
        if stranger and not self._make_room_for_a_stranger():
            refuse(self.refused, "strangers-full")
            return None
        scope = super().open_connection(peer_id, endpoint_ip=endpoint_ip, direction=direction)
        if scope is None:
            refuse(self.refused, "resource-limit")
            return None
        self.guard.established()
        self._mark_in_swarm(peer)
        if stranger:
            assert connection is not None
            self._strangers[connection] = _Stranger(peer, connection, trio.current_time())
            release_stranger = scope.close

            def close_and_forget() -> None:
                self._strangers.pop(connection, None)
                release_stranger()

            scope.close = close_and_forget
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
