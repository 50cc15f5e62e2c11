"""The first gate: handshakes per IP and across all IPs, before libp2p's inbound handler.

Before any byte of Noise only the remote IP is known. :class:`InboundGuard` runs
every socket the swarm accepts (p2pfl.libp2p_compat.route_inbound_connections): a
token bucket per IP limits handshakes per second, and a cap per IP bounds handshakes
in progress. At the cap a silent socket, else the *oldest* handshake of that IP if
pending for a second, is cut rather than the newcomer. Across all IPs, a socket waits
for its first byte *before* libp2p's handler (so without one of its inbound slots).
The later gates (after Noise, at admission) are in p2pfl.gating, which re-exports
this module's names.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetworkService
from libp2p.io.abc import ReadWriteCloser
from multiaddr import Multiaddr

from p2pfl.libp2p_compat import InboundHandler, InboundSocket, route_inbound_connections
from p2pfl.ratelimit import PeerRateLimiter

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
CLOSE_TIMEOUT_S = 1.0

Refusals = Counter[str]
"""Refused or cut connections by reason: handshake-rate, handshake-busy (per-IP cap),
handshake-full (global cap), handshake-evicted, handshake-failed, silent (no byte
within the first-byte deadline), silent-evicted (pushed out by a newcomer),
unsupported-key, not-member, ip-connections, strangers-full (no idle stranger to cut),
stranger-cut (an idle stranger cut for a newcomer), resource-limit."""


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
# when it admits the connection, which ends the handshake phase. A context variable,
# because libp2p's admission hook (ResourceManager.open_connection) is given only the
# peer id, the IP and the direction: several handshakes of one peer and IP can be in
# flight, and the task is the one thing that tells them apart. Read it through
# current_handshake() only.
_CURRENT_HANDSHAKE: contextvars.ContextVar[_Handshake | None] = contextvars.ContextVar(
    "p2pfl_current_handshake", default=None
)


def current_handshake() -> _Handshake | None:
    """The inbound handshake whose libp2p handler runs this task; None outside one, or
    once it is established (tasks libp2p starts for an established connection inherit
    the variable, and are no handshake)."""
    handshake = _CURRENT_HANDSHAKE.get()
    return None if handshake is None or handshake.established else handshake


def refuse(refused: Refusals, reason: str) -> None:
    """Count a refused connection once: an inbound one when its handler ends (it may
    also have been evicted meanwhile), an outbound one now."""
    handshake = current_handshake()
    if handshake is None:
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

    def install(self, swarm: INetworkService) -> None:
        """Route the swarm's inbound connections through this guard (once)."""
        route_inbound_connections(swarm, self._handle)

    def established(self) -> None:
        """The current task's handshake is over: it no longer counts as pending."""
        handshake = current_handshake()
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

    async def _handle(
        self, original: InboundHandler, accepted: ReadWriteCloser, maddr: Multiaddr
    ) -> None:
        # libp2p gets the socket wrapped, so that the guard learns when it is closed.
        connection = InboundSocket(accepted)
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
        closed = connection.closed
        token = _CURRENT_HANDSHAKE.set(handshake)
        try:
            with handshake.scope:
                # Readable: a byte, or its end; nothing is read here.
                if not await connection.wait_readable(self.first_byte_s):
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


def _remote_ip(connection: ReadWriteCloser) -> str:
    try:
        address = connection.get_remote_address()
    except Exception:
        address = None
    return str(address[0]) if address else ""


async def _close_quietly(connection: ReadWriteCloser) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await connection.close()
        except Exception:
            pass
