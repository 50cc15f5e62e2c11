"""The node's transport: opaque byte payloads, one frame per libp2p stream.

``Transport`` owns the libp2p host for the duration of ``async with Transport.open(...)``.
Outbound, ``send`` writes one frame and half-closes; ``request`` writes one frame and
reads one reply frame. Inbound, a handler set per protocol gets ``(peer_id, payload)``
and may return a reply. Every outbound step is under the caller's timeout and every
failure becomes a one-line ``TransportError``; inbound failures are counted by reason
and never reach libp2p, which would otherwise log them with the payload.

Connections are gated before streams (p2pfl.gating): handshakes per IP are rate-limited,
and with ``allowed_peers`` a non-member's connection is closed right after Noise.
Inbound streams pass three gates before any byte is read: the peer must be allowed
(``allowed_peers``, when set), must have byte budget left (``rate_limiter``), and must
hold fewer than the per-peer and global stream caps. A stream that fails a gate is
reset; body bytes are charged to the peer's budget as they are read.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from gossip.keys import NodeKey
from p2pfl.deadlines import DIAL_S, HOST_CLOSE_S, STREAM_CLEANUP_S
from p2pfl.framing import FrameError, encode_uvarint, read_frame, write_frame
from p2pfl.gating import DEFAULT_MAX_CONNECTIONS_PER_IP, ConnectionGate, InboundGuard
from p2pfl.host import new_node_host, parse_multiaddr, split_peer_multiaddr
from p2pfl.libp2p_compat import relay_under
from p2pfl.linkrates import LinkRates
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.relay import NatTraversal, is_circuit

logger = logging.getLogger(__name__)

DEFAULT_LISTEN_ADDRS = ("/ip4/127.0.0.1/tcp/0",)
DEFAULT_MAX_INBOUND_STREAMS_PER_PEER = 8
# Across all peers, so many cheap identities cannot add up to unbounded buffers either.
DEFAULT_MAX_INBOUND_STREAMS = 64
# Closing or resetting a stream writes one small muxer frame; on a wedged connection
# that write must not hold up the handler task (or host shutdown) for long.
# Dials per network address (without /p2p) and minute, whoever names it: peer exchange
# may name many fake ids at one address, and must not make us hammer it.
DIALS_PER_ADDRESS_PER_MIN = 3
# Peers the node must keep reaching (bootstrap peers, members, protected and first-hand
# known peers) are not held to that budget, which would stop a member for 20 s after 3
# dials refused by a contested node (issue 20): they are redialled with exponential
# backoff instead, from DIAL_BACKOFF_MIN_S doubling to DIAL_BACKOFF_MAX_S, never
# giving up. At most DIAL_BACKOFF_MAX_S apart, a member whose node is contested still
# tries several times within its callers' waits (30 s); at least 0.5 s apart, a
# persistent peer costs the other side at most 2 handshakes a second.
DIAL_BACKOFF_MIN_S = 0.5
DIAL_BACKOFF_MAX_S = 8.0
# Relay addresses we reached peers at, remembered for this many peers (oldest out).
MAX_REMEMBERED_CIRCUITS = 1024

Handler = Callable[[str, bytes], Awaitable[bytes | None]]
"""An inbound handler: ``(peer_id, payload) -> reply`` (None = no reply)."""

_T = TypeVar("_T")


class TransportError(Exception):
    """An outbound operation failed; the message is one line naming the peer and the cause.

    ``timed_out``: it missed its deadline (a slow link or a dead one), rather than
    being refused or reset."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Unanswered(TransportError):
    """The request's whole frame was written but no reply came back: whether the peer
    received it is not known. A failure before the frame's last byte was handed to the
    connection raises a plain :class:`TransportError`: the peer cannot hold a whole
    frame then (trio never cancels a socket send that went through)."""


class _RateLimited(Exception):
    """A peer's byte budget ran out while we were reading its frame."""


class _MeteredStream:
    """Reads from ``stream``, charging every byte to the remote peer's budget.

    Each read reserves what it asks for before waiting and refunds what did not
    arrive, so concurrent streams of one peer cannot together overdraw its budget.
    """

    def __init__(self, stream: INetStream, limiter: PeerRateLimiter, peer_id: str) -> None:
        self._stream = stream
        self._limiter = limiter
        self._peer_id = peer_id

    async def read(self, n: int | None = None) -> bytes:
        if n is None:
            raise ValueError("a metered read needs a size")
        if not self._limiter.allows(self._peer_id, n, trio.current_time()):
            raise _RateLimited(f"{self._peer_id} is over its byte budget")
        self._limiter.charge(self._peer_id, n, trio.current_time())
        got = 0
        try:
            data = await self._stream.read(n)
            got = len(data)
            return data
        finally:
            self._limiter.charge(self._peer_id, got - n, trio.current_time())


# Judges the first frame of a two-step exchange: the reply to write, and how many bytes
# the second frame must hold (None: refused, the exchange ends with that reply).
Screen = Callable[[str, bytes], Awaitable[tuple[bytes, int | None]]]


@dataclass
class _Backoff:
    """When a persistent peer may be dialled next, and the wait after the next failure."""

    next_dial: float
    delay: float


@dataclass(frozen=True)
class _Route:
    handler: Handler
    max_size: int
    read_timeout: float
    # A frame's deadline grows by its size at the peer's link rate (None: fixed).
    rates: LinkRates | None = None
    # Two steps (an offer, then its body), or None for one frame and its reply.
    screen: Screen | None = None
    max_offer_size: int = 0


def _describe(error: BaseException) -> str:
    """One line for an exception from libp2p (whose messages may span many lines)."""
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        return _describe(error.exceptions[0])
    text = str(error).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _frame_size(payload_length: int) -> int:
    return len(encode_uvarint(payload_length)) + payload_length


def _full_addr(addr: Multiaddr, peer_id: str) -> str:
    text = str(addr)
    return text if "/p2p/" in text else f"{text}/p2p/{peer_id}"


async def _reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(STREAM_CLEANUP_S):
        try:
            await stream.reset()
        except Exception:  # the stream is being discarded; nothing left to report
            pass


async def _close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(STREAM_CLEANUP_S):
        try:
            await stream.close()
        except Exception:
            await _reset_quietly(stream)


async def _close_host(host: IHost) -> None:
    # Shielded so a cancelled caller still releases sockets and libp2p's tasks;
    # bounded so a stuck close cannot hang the node's shutdown.
    with trio.CancelScope(shield=True), trio.move_on_after(HOST_CLOSE_S):
        try:
            await host.close()
        except Exception as error:
            logger.warning("closing the libp2p host failed: %s", _describe(error))


def _kernel_refusal(addr: Multiaddr) -> str | None:
    """The kernel's answer if it has no route to ``addr``'s IP (one line), else None.

    libp2p retries every failed dial with backoff and cannot tell "no route" from a
    slow peer, so a dial to another NAT's private address used to cost seconds.
    Connecting a UDP socket only looks the route up (nothing is sent), so the
    kernel's ENETUNREACH / EHOSTUNREACH comes back at once.
    """
    for protocol, family in (("ip4", socket.AF_INET), ("ip6", socket.AF_INET6)):
        try:
            ip = addr.value_for_protocol(protocol)
        except Exception:  # multiaddr raises when the protocol is absent
            continue
        if not ip:
            continue
        try:
            port = int(addr.value_for_protocol("tcp") or 0)
        except Exception:
            port = 0
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((ip, port))
            except OSError as error:
                if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    return os.strerror(error.errno)
        return None
    return None


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise ValueError(f"not a peer id: {peer_id!r}") from None


class Transport:
    """A running libp2p host moving byte payloads; create it with ``Transport.open``."""

    def __init__(
        self,
        host: IHost,
        nursery: trio.Nursery,
        *,
        max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
        allowed_peers: frozenset[str] | None = None,
        rate_limiter: PeerRateLimiter | None = None,
        gate: ConnectionGate | None = None,
    ) -> None:
        self._host = host
        self.nursery = nursery
        """Background tasks of the node's network layer belong here; cancelled on exit."""
        self.peer_id: str = str(host.get_id())
        self.max_inbound_streams_per_peer = max_inbound_streams_per_peer
        self.max_inbound_streams = max_inbound_streams
        self.allowed_peers = allowed_peers
        """Peer ids whose inbound streams are served; None serves everyone."""
        self.rate_limiter = rate_limiter
        """Per-peer byte budget of inbound frames and of replies; None: unlimited."""
        self.frame_errors: Counter[str] = Counter()
        """Inbound frames that failed, by FrameError reason."""
        self.stream_errors: Counter[str] = Counter()
        """Inbound streams dropped for other reasons: busy, rate-limited, handler, reply,
        internal."""
        self.streams_refused: Counter[str] = Counter()
        """Inbound streams from peers not in ``allowed_peers``, by protocol."""
        self._gate = gate
        self.connections_refused: Counter[str] = gate.refused if gate else Counter()
        """Connections refused before any stream, by reason (see p2pfl.gating)."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self._inbound_open: Counter[str] = Counter()
        self._dial_budget = PeerRateLimiter(
            DIALS_PER_ADDRESS_PER_MIN / 60.0, DIALS_PER_ADDRESS_PER_MIN
        )
        self.dials_deferred = 0
        """Dials not made because their address was over its per-minute budget, or a
        persistent peer was still in its backoff."""
        self._backoff: dict[str, _Backoff] = {}
        self.nat: NatTraversal | None = None
        """Circuit relay and DCUtR (p2pfl.relay), once the node starts them."""
        self._reached_through_relay: dict[str, str] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        key: NodeKey,
        listen_addrs: Sequence[str] = DEFAULT_LISTEN_ADDRS,
        *,
        max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
        allowed_peers: frozenset[str] | None = None,
        rate_limiter: PeerRateLimiter | None = None,
        guard: InboundGuard | None = None,
        max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP,
        relay: bool | None = None,
        handshake_timeout: float = DIAL_S,
        known_peers: Callable[[str], bool] | None = None,
    ) -> AsyncIterator[Transport]:
        """Run a host for ``key`` listening on ``listen_addrs``; closed on exit, always.

        ``guard`` replaces the default per-IP handshake limits (tests pass small ones).
        ``relay`` starts circuit relay and DCUtR (p2pfl.relay): True also serves as a
        relay for others, False only dials and accepts relayed connections; None
        (the default) runs neither. The relay serves ``allowed_peers`` only (when set)
        and charges what it relays to ``rate_limiter``'s budgets. ``handshake_timeout``
        bounds libp2p's dials, upgrades and stream negotiations (Deadlines.handshake:
        longer on slow links). ``known_peers`` tells peers known first-hand (neighbour
        candidates): they are no strangers to the gate's stranger budget, and are
        redialled with backoff.
        """
        addrs = [parse_multiaddr(text) for text in listen_addrs]
        gate = ConnectionGate(
            allowed_peers,
            guard=guard,
            max_connections_per_ip=max_connections_per_ip,
            known=known_peers,
        )
        host = new_node_host(key, gate=gate, handshake_timeout=handshake_timeout)
        try:
            async with host.run(addrs):
                try:
                    if len(host.get_transport_addrs()) < len(addrs):
                        wanted = ", ".join(str(a) for a in addrs)
                        raise TransportError(
                            f"could not listen on {wanted}; check the address and that the "
                            "port is free"
                        )
                    # libp2p's auto-connector dials every peerstore address (including
                    # those peers report about themselves) to reach 150 connections;
                    # this node chooses whom to dial, under a per-address budget.
                    await host.get_network().auto_connector.stop()
                    async with AsyncExitStack() as stack:
                        nat = None
                        if relay is not None:
                            nat = NatTraversal(
                                host,
                                serve_relay=relay,
                                allowed=allowed_peers,
                                rate_limiter=rate_limiter,
                            )
                            await stack.enter_async_context(nat.running())
                        nursery = await stack.enter_async_context(trio.open_nursery())
                        transport = cls(
                            host,
                            nursery,
                            max_inbound_streams_per_peer=max_inbound_streams_per_peer,
                            max_inbound_streams=max_inbound_streams,
                            allowed_peers=allowed_peers,
                            rate_limiter=rate_limiter,
                            gate=gate,
                        )
                        transport.nat = nat
                        try:
                            yield transport
                        finally:
                            nursery.cancel_scope.cancel()
                finally:
                    # libp2p requires close() before leaving run(), or sockets leak and
                    # its background tasks log errors about hosts already gone.
                    await _close_host(host)
        finally:
            await _close_host(host)  # idempotent; covers a failure inside run() itself

    # -- identity and peers -------------------------------------------------------------

    @property
    def gate(self) -> ConnectionGate | None:
        """Who may hold a connection to this host (p2pfl.gating)."""
        return self._gate

    @property
    def host(self) -> IHost:
        """The underlying libp2p host, for protocols beyond one-frame streams."""
        return self._host

    @property
    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, with the bound port and ``/p2p/<our id>``; then our
        addresses through the relays we hold a reservation on.

        Listen addresses only: libp2p's ``get_addrs()`` adds addresses that 4 peers
        observed us at, which behind a NAT are the router's (dropping unsolicited
        dials, so each costs a whole dial timeout); p2pfl.reachability decides."""
        return self.listen_addrs + (self.nat.circuit_addrs if self.nat is not None else [])

    @property
    def listen_addrs(self) -> list[str]:
        """The addresses we listen on, with the bound port and ``/p2p/<our id>``."""
        return [_full_addr(addr, self.peer_id) for addr in self._host.get_transport_addrs()]

    def relayed_via(self, peer_id: str) -> str | None:
        """The relay our connection to ``peer_id`` runs through; None if it is direct
        (or there is none). With a direct and a relayed one, libp2p uses the direct one."""
        try:
            connections = self._host.get_network().get_connections(_parse_peer_id(peer_id))
        except Exception:
            return None
        relays = []
        for connection in connections:
            try:
                addrs = [str(addr) for addr in connection.get_transport_addresses()]
            except Exception:
                addrs = []
            if not any(is_circuit(addr) for addr in addrs):
                return None
            relay = relay_under(connection)
            if relay is not None:
                relays.append(relay)
        return relays[0] if relays else None

    def protect(self, peer_id: str, tag: str) -> None:
        """Keep ``peer_id``'s connections from pruning and per-IP limits (libp2p tags)."""
        _parse_peer_id(peer_id)
        if self._gate is not None:
            self._gate.manager.protect(peer_id, tag)

    def unprotect(self, peer_id: str, tag: str) -> None:
        if self._gate is not None:
            self._gate.manager.unprotect(peer_id, tag)

    def is_protected(self, peer_id: str) -> bool:
        return self._gate is not None and self._gate.manager.is_protected(peer_id)

    def connected_peers(self) -> list[str]:
        return [str(peer) for peer in self._host.get_connected_peers()]

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP our connection to ``peer_id`` runs over (None when not connected)."""
        try:
            connections = self._host.get_network().get_connections(_parse_peer_id(peer_id))
        except Exception:
            return None
        for connection in connections:
            try:
                address = connection.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
            except Exception:
                continue
            if address:
                return str(address[0])
        return None

    def peer_addrs(self, peer_id: str) -> list[str]:
        """The addresses the peerstore holds for ``peer_id`` (learnt from identify or dials),
        and the relay address we last reached it at."""
        try:
            addrs = self._host.get_peerstore().addrs(_parse_peer_id(peer_id))
        except Exception:  # unknown peer: libp2p raises PeerStoreError
            addrs = []
        known = {_full_addr(addr, peer_id) for addr in addrs}
        if peer_id in self._reached_through_relay:
            known.add(self._reached_through_relay[peer_id])
        return sorted(known)

    def persistent(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is redialled with backoff rather than under the per-address
        budget: a member, a protected peer or one known first-hand."""
        gate = self._gate
        if gate is None:
            return False
        return (
            gate.manager.is_protected(peer_id)
            or (gate.members is not None and peer_id in gate.members)
            or gate.manager.known(peer_id)
        )

    async def connect(self, multiaddr: str, timeout: float, *, persistent: bool = False) -> str:
        """Dial ``/ip4/.../tcp/N/p2p/<id>``; return the peer id. ValueError for a bad address.

        ``persistent`` (or a peer :meth:`persistent` names, such as a member): the dial is
        held to an exponential backoff per peer instead of the per-address budget, so
        the node keeps trying its bootstrap peers and members and never gives up."""
        peer_id, addr = split_peer_multiaddr(multiaddr)
        if peer_id == self.peer_id:
            raise ValueError(f"{multiaddr} is this node's own address")
        remote = _parse_peer_id(peer_id)
        if is_circuit(multiaddr):
            return await self._connect_through_relay(multiaddr, peer_id, addr, timeout)
        if peer_id not in self.connected_peers() and (refusal := _kernel_refusal(addr)):
            raise TransportError(f"cannot connect to {multiaddr}: {refusal}")
        info = PeerInfo(remote, [addr])
        if peer_id in self.connected_peers():
            return peer_id
        now = trio.current_time()
        backoff = None
        if persistent or self.persistent(peer_id):
            # Per address of the peer: its other addresses are still worth a try.
            key = f"{addr}/p2p/{peer_id}"
            backoff = self._backoff.setdefault(key, _Backoff(now, DIAL_BACKOFF_MIN_S))
            if now < backoff.next_dial:
                self.dials_deferred += 1
                raise TransportError(
                    f"not dialing {addr}: backing off for {backoff.next_dial - now:.1f} s"
                )
            # Set before the dial, so concurrent callers do not dial it twice.
            backoff.next_dial = now + backoff.delay
            backoff.delay = min(DIAL_BACKOFF_MAX_S, backoff.delay * 2)
        elif not self._dial_budget.allows(str(addr), 1, now):
            self.dials_deferred += 1
            raise TransportError(
                f"not dialing {addr}: dialled {DIALS_PER_ADDRESS_PER_MIN} times in the last minute"
            )
        else:
            self._dial_budget.charge(str(addr), 1, now)
        # libp2p refuses for 60 s to redial a peer whose dials all failed ("negative
        # cache"); a connect within our per-address budget must get through, e.g. to
        # a restarted peer.
        self._host.get_network().unblock_peer(remote)
        # libp2p dials only ONE address per transport kind (the first TCP one in the
        # peerstore), so a stale address of a restarted peer would shadow the one
        # given here for minutes: forget the old ones, dial exactly this one.
        self._host.get_peerstore().clear_addrs(remote)
        with trio.move_on_after(timeout):
            try:
                await self._host.connect(info)
            except Exception as error:
                raise TransportError(f"cannot connect to {multiaddr}: {_describe(error)}") from None
            if backoff is not None:
                self._backoff.pop(key, None)  # reached: the next failure starts over
            return peer_id
        raise TransportError(f"connecting to {multiaddr} timed out after {timeout:g} s")

    async def _connect_through_relay(
        self, multiaddr: str, peer_id: str, relay_part: Multiaddr, timeout: float
    ) -> str:
        """Dial ``peer_id`` through the relay its circuit address names."""
        if peer_id in self.connected_peers():
            return peer_id
        if self.nat is None:
            raise TransportError(f"cannot connect to {multiaddr}: relays are not running")
        relay_addr = str(relay_part)[: -len("/p2p-circuit")]
        with trio.move_on_after(timeout):
            try:
                # Through our own dial path: budget, kernel refusal and gating apply.
                await self.connect(relay_addr, timeout)
                await self.nat.dial(multiaddr)
                # Kept so that peer_addrs() names this working relay address: libp2p's
                # identify replaces the peerstore's addresses with the peer's listen ones.
                self._reached_through_relay.pop(peer_id, None)
                self._reached_through_relay[peer_id] = multiaddr
                while len(self._reached_through_relay) > MAX_REMEMBERED_CIRCUITS:
                    del self._reached_through_relay[next(iter(self._reached_through_relay))]
            except (TransportError, ValueError) as error:
                raise TransportError(f"cannot connect to {multiaddr}: {error}") from None
            except Exception as error:
                raise TransportError(f"cannot connect to {multiaddr}: {_describe(error)}") from None
            return peer_id
        raise TransportError(f"connecting to {multiaddr} timed out after {timeout:g} s")

    async def disconnect(self, peer_id: str) -> None:
        with trio.move_on_after(STREAM_CLEANUP_S):
            try:
                await self._host.disconnect(_parse_peer_id(peer_id))
            except Exception as error:
                logger.debug("disconnect from %s: %s", peer_id, _describe(error))

    # -- outbound -----------------------------------------------------------------------

    async def send(self, peer_id: str, protocol: str, payload: bytes, timeout: float) -> None:
        """Open a stream, write ``payload`` as one frame and half-close, within ``timeout``."""

        async def exchange(stream: INetStream) -> None:
            await write_frame(stream, payload, timeout)
            self.bytes_sent += _frame_size(len(payload))
            await stream.close()

        await self._outbound(peer_id, protocol, timeout, "send", exchange)

    async def request(
        self, peer_id: str, protocol: str, payload: bytes, timeout: float, max_size: int
    ) -> bytes:
        """Write one frame, read one reply frame of at most ``max_size`` bytes.

        Raises :class:`Unanswered` if it failed once the whole frame was written (the
        peer may have it), :class:`TransportError` if it failed before.
        """
        written = False

        async def exchange(stream: INetStream) -> bytes:
            nonlocal written
            await write_frame(stream, payload, timeout)
            written = True
            self.bytes_sent += _frame_size(len(payload))
            # close_write, not close: NetStream.close also drops the stream from the
            # connection's bookkeeping, and the reply has yet to be read.
            await stream.close_write()
            reply = await read_frame(stream, max_size, timeout)
            self.bytes_received += _frame_size(len(reply))
            await _close_quietly(stream)
            return reply

        try:
            return await self._outbound(peer_id, protocol, timeout, "request", exchange)
        except TransportError as error:
            if written:
                raise Unanswered(str(error), timed_out=error.timed_out) from None
            raise

    async def offer(
        self,
        peer_id: str,
        protocol: str,
        offer: bytes | memoryview,
        body: bytes | memoryview,
        timeout: float,
        max_size: int,
        go_on: Callable[[bytes], bool],
    ) -> tuple[bytes, bytes | None]:
        """Write ``offer``, read the reply; only if ``go_on(reply)`` write ``body`` and
        read the final reply. Returns (the reply to the offer, the final reply or None).

        The body is never written unless the peer said to go on, so a peer that
        refused the offer certainly holds none of it. Raises :class:`Unanswered` if
        it failed once the whole body was written (the peer may have it),
        :class:`TransportError` if it failed before (``go_on`` raising included).
        """
        written = False

        async def exchange(stream: INetStream) -> tuple[bytes, bytes | None]:
            nonlocal written
            await write_frame(stream, offer, timeout)
            self.bytes_sent += _frame_size(len(offer))
            first = await read_frame(stream, max_size, timeout)
            self.bytes_received += _frame_size(len(first))
            if not go_on(first):
                await _close_quietly(stream)
                return first, None
            await write_frame(stream, body, timeout)
            written = True
            self.bytes_sent += _frame_size(len(body))
            await stream.close_write()  # not close: the reply has yet to be read
            reply = await read_frame(stream, max_size, timeout)
            self.bytes_received += _frame_size(len(reply))
            await _close_quietly(stream)
            return first, reply

        try:
            return await self._outbound(peer_id, protocol, timeout, "offer", exchange)
        except TransportError as error:
            if written:
                raise Unanswered(str(error), timed_out=error.timed_out) from None
            raise

    async def _outbound(
        self,
        peer_id: str,
        protocol: str,
        timeout: float,
        action: str,
        exchange: Callable[[INetStream], Awaitable[_T]],
    ) -> _T:
        remote = _parse_peer_id(peer_id)
        what = f"{action} {protocol} to {peer_id}"
        stream: INetStream | None = None
        finished = False
        with trio.move_on_after(timeout):
            try:
                stream = await self._host.new_stream(remote, [TProtocol(protocol)])
                result = await exchange(stream)
                finished = True
                return result
            except FrameError as error:
                timed_out = error.reason == "timeout"
                raise TransportError(f"{what} failed: {error}", timed_out=timed_out) from None
            except Exception as error:
                raise TransportError(f"{what} failed: {_describe(error)}") from None
            finally:
                if stream is not None and not finished:
                    await _reset_quietly(stream)
        raise TransportError(f"{what} timed out after {timeout:g} s", timed_out=True)

    # -- inbound ------------------------------------------------------------------------

    def set_handler(
        self,
        protocol: str,
        handler: Handler,
        max_size: int,
        read_timeout: float,
        rates: LinkRates | None = None,
        screen: Screen | None = None,
        max_offer_size: int = 0,
    ) -> None:
        """Serve ``protocol``: read one frame (<= max_size, within read_timeout), call handler.

        A non-None reply is written back as one frame within ``read_timeout``. With
        ``rates``, both deadlines grow by the frame's size at the peer's link rate,
        and what each frame shows updates that rate (p2pfl/linkrates.py).

        With ``screen``, an exchange has two steps (the peer's :meth:`offer`): the first
        frame (<= max_offer_size) goes to ``screen``, whose reply is written back; if it
        names a body size, the body is read (exactly that size, <= max_size) and the
        handler is called with the offer and the body joined.
        """
        if max_size < 0 or not math.isfinite(read_timeout) or read_timeout <= 0:
            raise ValueError("set_handler needs max_size >= 0 and a finite read_timeout > 0")
        route = _Route(handler, max_size, read_timeout, rates, screen, max_offer_size)

        async def on_stream(stream: INetStream) -> None:
            await self._serve(stream, protocol, route)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    def remove_handler(self, protocol: str) -> None:
        self._host.remove_stream_handler(TProtocol(protocol))

    async def _serve(self, stream: INetStream, protocol: str, route: _Route) -> None:
        # Runs in libp2p's task for this stream: nothing but cancellation may escape.
        try:
            peer_id = str(stream.muxed_conn.peer_id)
        except Exception:
            self.stream_errors["internal"] += 1
            await _reset_quietly(stream)
            return
        if self.allowed_peers is not None and peer_id not in self.allowed_peers:
            # Not a member: no byte of its stream is read, and its connection is dropped.
            self.streams_refused[protocol] += 1
            logger.debug("refused a %s stream from %s: not in the allowlist", protocol, peer_id)
            await _reset_quietly(stream)
            self.nursery.start_soon(self.disconnect, peer_id)
            return
        limiter = self.rate_limiter
        if limiter is not None and limiter.available(peer_id, trio.current_time()) < 1:
            self.stream_errors["rate-limited"] += 1
            await _reset_quietly(stream)
            return
        if (
            self._inbound_open[peer_id] >= self.max_inbound_streams_per_peer
            or self._inbound_open.total() >= self.max_inbound_streams
        ):
            # Reset before reading anything: a flooding peer costs us no buffers.
            self.stream_errors["busy"] += 1
            await _reset_quietly(stream)
            return
        self._inbound_open[peer_id] += 1
        try:
            await self._serve_admitted(stream, peer_id, protocol, route)
        except Exception as error:
            self.stream_errors["internal"] += 1
            logger.warning("inbound %s stream from %s: %s", protocol, peer_id, _describe(error))
            await _reset_quietly(stream)
        finally:
            self._inbound_open[peer_id] -= 1
            if self._inbound_open[peer_id] <= 0:
                del self._inbound_open[peer_id]

    async def _serve_admitted(
        self, stream: INetStream, peer_id: str, protocol: str, route: _Route
    ) -> None:
        limiter = self.rate_limiter
        source = stream if limiter is None else _MeteredStream(stream, limiter, peer_id)
        rates = route.rates
        rate = None if rates is None else rates.rate(peer_id)
        offer = b""
        max_size = route.max_size
        try:
            if route.screen is not None:
                offer = await read_frame(source, route.max_offer_size, route.read_timeout)
                self.bytes_received += _frame_size(len(offer))
                answer, body_size = await route.screen(peer_id, offer)
                await write_frame(stream, answer, route.read_timeout, rate)
                self.bytes_sent += _frame_size(len(answer))
                if body_size is None:
                    await _close_quietly(stream)
                    return
                max_size = min(body_size, route.max_size)
            started = trio.current_time()
            payload = await read_frame(source, max_size, route.read_timeout, rate)
        except _RateLimited:
            self.stream_errors["rate-limited"] += 1
            await _reset_quietly(stream)
            return
        except FrameError as error:
            if rates is not None and error.reason == "timeout":
                rates.timed_out(peer_id)
            self.frame_errors[error.reason] += 1
            logger.debug("inbound %s frame from %s rejected: %s", protocol, peer_id, error)
            await _reset_quietly(stream)
            return
        self.bytes_received += _frame_size(len(payload))
        if rates is not None:
            rates.completed(peer_id, len(payload), trio.current_time() - started)
        if offer:
            payload = offer + payload
        try:
            reply = await route.handler(peer_id, payload)
        except Exception as error:
            self.stream_errors["handler"] += 1
            # The type and first line only: handler errors may quote the payload.
            logger.warning("handler for %s from %s raised %s", protocol, peer_id, _describe(error))
            await _reset_quietly(stream)
            return
        if self._gate is not None:
            # A frame its handler took: the peer is not an idle stranger.
            self._gate.manager.note_activity(peer_id)
        if reply is not None:
            try:
                await write_frame(stream, reply, route.read_timeout, rate)
            except Exception as error:
                self.stream_errors["reply"] += 1
                logger.debug("reply on %s to %s failed: %s", protocol, peer_id, _describe(error))
                await _reset_quietly(stream)
                return
            self.bytes_sent += _frame_size(len(reply))
            if limiter is not None:
                # What we serve a peer counts against its budget too (model fetches).
                limiter.charge(peer_id, _frame_size(len(reply)), trio.current_time())
        await _close_quietly(stream)
