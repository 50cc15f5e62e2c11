"""The node's transport: opaque byte payloads, one frame per libp2p stream.

``Transport`` owns the libp2p host for the duration of ``async with Transport.open(...)``.
Outbound, ``send`` writes one frame and half-closes; ``request`` writes one frame and
reads one reply frame; ``offer`` is the two-step exchange (an offer, then its body
only if the peer says to go on). Every outbound step is under the caller's timeout
and every failure becomes a one-line ``TransportError``.

It is a facade over three parts: p2pfl.dialling (connect, ``dial_any``, dial
budgets and backoff, relayed dials), p2pfl.inbound (handlers per protocol and the
stream gates) and p2pfl.gating (who may hold a connection: handshakes per IP are
rate-limited, and with ``allowed_peers`` a non-member's connection is closed right
after Noise).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from gossip.keys import NodeKey
from p2pfl.deadlines import DIAL_S, HOST_CLOSE_S
from p2pfl.dialling import DIALS_PER_ADDRESS_PER_MIN, Dialler
from p2pfl.framing import FrameError, read_frame, write_frame
from p2pfl.gating import DEFAULT_MAX_CONNECTIONS_PER_IP, ConnectionGate, InboundGuard, Members
from p2pfl.host import new_node_host, parse_multiaddr
from p2pfl.inbound import (
    DEFAULT_MAX_INBOUND_STREAMS,
    DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
    Handler,
    InboundRouter,
    Screen,
)
from p2pfl.linkrates import LinkRates
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.relay import NatTraversal
from p2pfl.streams import (
    Traffic,
    TransportError,
    Unanswered,
    close_quietly,
    describe,
    frame_size,
    full_addr,
    parse_peer_id,
    reset_quietly,
)

__all__ = [
    "DEFAULT_LISTEN_ADDRS",
    "DEFAULT_MAX_INBOUND_STREAMS",
    "DEFAULT_MAX_INBOUND_STREAMS_PER_PEER",
    "DIALS_PER_ADDRESS_PER_MIN",
    "Handler",
    "Screen",
    "Transport",
    "TransportError",
    "Unanswered",
]

logger = logging.getLogger(__name__)

DEFAULT_LISTEN_ADDRS = ("/ip4/127.0.0.1/tcp/0",)

_T = TypeVar("_T")


async def _close_host(host: IHost) -> None:
    # Shielded so a cancelled caller still releases sockets and libp2p's tasks;
    # bounded so a stuck close cannot hang the node's shutdown.
    with trio.CancelScope(shield=True), trio.move_on_after(HOST_CLOSE_S):
        try:
            await host.close()
        except Exception as error:
            logger.warning("closing the libp2p host failed: %s", describe(error))


class Transport:
    """A running libp2p host moving byte payloads; create it with ``Transport.open``."""

    def __init__(
        self,
        host: IHost,
        nursery: trio.Nursery,
        *,
        max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
        allowed_peers: Members | None = None,
        rate_limiter: PeerRateLimiter | None = None,
        gate: ConnectionGate | None = None,
    ) -> None:
        self._host = host
        self.nursery = nursery
        """Background tasks of the node's network layer belong here; cancelled on exit."""
        self.peer_id: str = str(host.get_id())
        self._gate = gate
        self.connections_refused: Counter[str] = gate.refused if gate else Counter()
        """Connections refused before any stream, by reason (see p2pfl.gating)."""
        self.traffic = Traffic()
        self.dialler = Dialler(host, self.persistent)
        self.inbound = InboundRouter(
            host,
            nursery,
            self.traffic,
            self.dialler.disconnect,
            max_inbound_streams_per_peer=max_inbound_streams_per_peer,
            max_inbound_streams=max_inbound_streams,
            allowed_peers=allowed_peers,
            rate_limiter=rate_limiter,
            gate=gate,
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        key: NodeKey,
        listen_addrs: Sequence[str] = DEFAULT_LISTEN_ADDRS,
        *,
        max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
        allowed_peers: Members | None = None,
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
        if allowed_peers is not None and not all(isinstance(p, str) for p in allowed_peers):
            # One type in every network layer (p2pfl.gating.Members): a set of public
            # keys here would silently refuse every member.
            raise TypeError("allowed_peers takes peer-id strings (12D3KooW...), not keys")
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
        return [full_addr(addr, self.peer_id) for addr in self._host.get_transport_addrs()]

    def protect(self, peer_id: str, tag: str) -> None:
        """Keep ``peer_id``'s connections from pruning and per-IP limits (libp2p tags)."""
        parse_peer_id(peer_id)
        if self._gate is not None:
            self._gate.manager.protect(peer_id, tag)

    def unprotect(self, peer_id: str, tag: str) -> None:
        if self._gate is not None:
            self._gate.manager.unprotect(peer_id, tag)

    def is_protected(self, peer_id: str) -> bool:
        return self._gate is not None and self._gate.manager.is_protected(peer_id)

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

    # -- counters (kept by the parts) ---------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        return self.traffic.sent

    @property
    def bytes_received(self) -> int:
        return self.traffic.received

    @property
    def frame_errors(self) -> Counter[str]:
        """Inbound frames that failed, by FrameError reason."""
        return self.inbound.frame_errors

    @property
    def stream_errors(self) -> Counter[str]:
        """Inbound streams dropped: busy, rate-limited, handler, reply, internal."""
        return self.inbound.stream_errors

    @property
    def streams_refused(self) -> Counter[str]:
        """Inbound streams from peers not in ``allowed_peers``, by protocol."""
        return self.inbound.streams_refused

    @property
    def dials_deferred(self) -> int:
        """Dials not made: over the address's per-minute budget, or still backing off."""
        return self.dialler.dials_deferred

    @property
    def allowed_peers(self) -> Members | None:
        return self.inbound.allowed_peers

    @property
    def rate_limiter(self) -> PeerRateLimiter | None:
        return self.inbound.rate_limiter

    @property
    def nat(self) -> NatTraversal | None:
        """Circuit relay and DCUtR (p2pfl.relay), once the node starts them."""
        return self.dialler.nat

    @nat.setter
    def nat(self, nat: NatTraversal | None) -> None:
        self.dialler.nat = nat

    def inbound_streams(self, peer_id: str) -> int:
        """Inbound streams of ``peer_id`` being served now."""
        return self.inbound.open_streams(peer_id)

    # -- connections (p2pfl.dialling) ---------------------------------------------------

    def connected_peers(self) -> list[str]:
        return self.dialler.connected_peers()

    def relayed_via(self, peer_id: str) -> str | None:
        """The relay our connection to ``peer_id`` runs through; None if it is direct."""
        return self.dialler.relayed_via(peer_id)

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP our connection to ``peer_id`` runs over (None when not connected)."""
        return self.dialler.remote_ip(peer_id)

    def peer_addrs(self, peer_id: str) -> list[str]:
        """The addresses the peerstore holds for ``peer_id``, and the relay address we
        last reached it at."""
        return self.dialler.peer_addrs(peer_id)

    async def connect(self, multiaddr: str, timeout: float, *, persistent: bool = False) -> str:
        """Dial ``/ip4/.../tcp/N/p2p/<id>``; return the peer id. ValueError for a bad address.

        ``persistent`` (or a peer :meth:`persistent` names, such as a member): the dial is
        held to an exponential backoff per peer instead of the per-address budget."""
        return await self.dialler.connect(multiaddr, timeout, persistent=persistent)

    async def dial_any(self, peer_id: str, addrs: Sequence[str], timeout: float) -> None:
        """Reach ``peer_id`` at the first of its ``addrs`` that connects (each dial within
        ``timeout``); nothing is dialled if it is connected. Unparsable addresses are
        skipped; TransportError names the last failure, or that none was dialable."""
        await self.dialler.dial_any(peer_id, addrs, timeout)

    async def disconnect(self, peer_id: str) -> None:
        await self.dialler.disconnect(peer_id)

    # -- outbound -----------------------------------------------------------------------

    async def send(self, peer_id: str, protocol: str, payload: bytes, timeout: float) -> None:
        """Open a stream, write ``payload`` as one frame and half-close, within ``timeout``."""

        async def exchange(stream: INetStream) -> None:
            await write_frame(stream, payload, timeout)
            self.traffic.sent += frame_size(len(payload))
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
            self.traffic.sent += frame_size(len(payload))
            # close_write, not close: NetStream.close also drops the stream from the
            # connection's bookkeeping, and the reply has yet to be read.
            await stream.close_write()
            reply = await read_frame(stream, max_size, timeout)
            self.traffic.received += frame_size(len(reply))
            await close_quietly(stream)
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
            self.traffic.sent += frame_size(len(offer))
            first = await read_frame(stream, max_size, timeout)
            self.traffic.received += frame_size(len(first))
            if not go_on(first):
                await close_quietly(stream)
                return first, None
            await write_frame(stream, body, timeout)
            written = True
            self.traffic.sent += frame_size(len(body))
            await stream.close_write()  # not close: the reply has yet to be read
            reply = await read_frame(stream, max_size, timeout)
            self.traffic.received += frame_size(len(reply))
            await close_quietly(stream)
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
        remote = parse_peer_id(peer_id)
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
                raise TransportError(f"{what} failed: {describe(error)}") from None
            finally:
                if stream is not None and not finished:
                    await reset_quietly(stream)
        raise TransportError(f"{what} timed out after {timeout:g} s", timed_out=True)
    # -- inbound (p2pfl.inbound) --------------------------------------------------------

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
        self.inbound.set_handler(
            protocol, handler, max_size, read_timeout, rates, screen, max_offer_size
        )

    def remove_handler(self, protocol: str) -> None:
        self.inbound.remove_handler(protocol)
