"""The one module that reaches into py-libp2p's private internals; pinned to 0.8.1.

Everything else in p2pfl uses libp2p's public API only (tests/test_libp2p_compat.py
greps p2pfl/ to keep it so). What this module does beyond the public API:

* the relay's HOP handlers are replaced (:class:`GuardedRelayProtocol`, below);
* the client transport forgets a relay's reservation (:func:`forget_client_reservation`);
* the swarm's inbound connections run through the connection gate first
  (:func:`route_inbound_connections`), and the gate learns when libp2p closes an
  accepted socket (:class:`InboundSocket`);
* a relayed connection names the relay it runs over (:func:`relay_under`).

py-libp2p's circuit relay v2 (``libp2p.relay.circuit_v2``) has two holes a relay of
ours must not have (issue 20; /work/shared/notes/libp2p-0.8.1.md):

* ``CircuitV2Protocol._handle_reserve`` reserves for the request's optional ``peer``
  field before it finds that peer not connected: the entry stays for its whole TTL,
  so forged requests on one connection fill the reservation table.
* ``_handle_connect`` relays between any two peers as long as the destination holds
  a reservation, caps circuits per reservation only, and charges relayed bytes to
  no budget of ours.

:class:`GuardedRelayProtocol` subclasses ``CircuitV2Protocol`` and replaces both HOP
handlers; every decision (who may reserve, what a circuit may carry, what each
byte costs) is asked of a :class:`RelayGuard` (p2pfl.relay.RelayPolicy), so this
module holds mechanism only. The wire format stays libp2p's.

Every private name used here is pinned by tests/test_libp2p_compat.py, which fails
when py-libp2p changes one; the import fails at once on any other libp2p version.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetworkService
from libp2p.io.abc import ReadWriteCloser
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import (
    STOP_PROTOCOL_ID,
    STREAM_READ_TIMEOUT,
    CircuitV2Protocol,
)
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.constants import MAX_READ_LEN
from multiaddr import Multiaddr

if TYPE_CHECKING:
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport

LIBP2P_VERSION = "0.8.1"
_installed = importlib.metadata.version("libp2p")
if _installed != LIBP2P_VERSION:
    raise ImportError(
        f"p2pfl needs libp2p=={LIBP2P_VERSION} (it patches its relay internals), "
        f"found libp2p=={_installed}"
    )

logger = logging.getLogger(__name__)

# A refused or failed HOP request gets its status, then the stream is closed; writing
# that status must not hold the handler (an unread stream never drains).
STATUS_WRITE_S = 5.0
# Grace before resetting a refused CONNECT stream, so the peer can read the STATUS
# (libp2p's own handler waits the same).
REFUSAL_GRACE_S = 0.5


class CircuitGrant(Protocol):
    """What the guard allows one circuit: libp2p's Limit fields, sent on the wire."""

    max_bytes: int
    max_seconds: float


class RelayGuard(Protocol):
    """Relay decisions (p2pfl.relay.RelayPolicy): a reason string refuses."""

    def reservation_refusal(
        self, peer_id: str, ip: str | None, held: Mapping[str, str | None]
    ) -> str | None:
        """Why ``peer_id`` (from ``ip``) may not reserve; ``held`` is peer -> IP of the
        live reservations of other peers. None: it may."""
        ...

    def reservation_limit(self, peer_id: str) -> tuple[int, float]:
        """(bytes, seconds) a circuit to ``peer_id`` would get, as told at reservation."""
        ...

    def open_circuit(self, source: str, destination: str, now: float) -> CircuitGrant | str:
        """Admit a circuit (counted until :meth:`close_circuit`) or name the refusal."""
        ...

    def carry(self, grant: CircuitGrant, nbytes: int, now: float) -> tuple[int, str | None]:
        """Of ``nbytes`` read on ``grant``, how many to forward (they are charged), and
        a reason to cut the circuit after them (None: it goes on)."""
        ...

    def close_circuit(self, grant: CircuitGrant, reason: str | None) -> None:
        """The circuit ended: ``reason`` it was cut for, None if an end closed it."""
        ...

    def refuse(self, reason: str) -> None:
        """Count a refusal that happened before the guard was asked (e.g. malformed)."""
        ...


def _remote_ip(stream: INetStream) -> str | None:
    """The IP the stream's connection runs over (None when libp2p cannot tell)."""
    try:
        address = stream.get_remote_address()
    except Exception:
        return None
    return str(address[0]) if address else None


async def _write_status(
    stream: INetStream, code: StatusCode, limit: tuple[int, float] | None = None, **extra: object
) -> None:
    message = HopMessage(type=HopMessage.STATUS, status=to_proto_status(code), **extra)
    if limit is not None:
        message.limit.CopyFrom(Limit(data=limit[0], duration=int(limit[1])))
    with trio.move_on_after(STATUS_WRITE_S):
        try:
            await write_delimited_msg(stream, message)
        except Exception:  # the requester went away; nothing left to tell it
            pass


async def _reset(stream: INetStream | None) -> None:
    if stream is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(STATUS_WRITE_S):
        try:
            await stream.reset()
        except Exception:
            pass


class GuardedRelayProtocol(CircuitV2Protocol):
    """libp2p's relay v2 with RESERVE and CONNECT handled under a :class:`RelayGuard`.

    RESERVE: the ``peer`` field, when present, must be the requesting connection's
    peer (else PERMISSION_DENIED, nothing stored); reservations of peers no longer
    connected are dropped before the table is counted; the guard caps the table (in
    all, per IP, strangers); an entry created for a request that then fails is removed.
    CONNECT: the guard admits the circuit (members, caps, budgets) and bounds its
    bytes and seconds; every relayed chunk is charged through :meth:`RelayGuard.carry`.
    """

    def __init__(
        self, host: IHost, limits: RelayLimits, allow_hop: bool, guard: RelayGuard
    ) -> None:
        super().__init__(host, limits=limits, allow_hop=allow_hop)
        self.guard = guard
        self._reserved_from: dict[ID, str | None] = {}
        """The IP each live reservation was made from (libp2p does not keep it)."""

    # -- reservations ---------------------------------------------------------------------

    def held_reservations(self) -> dict[str, str | None]:
        """Live reservations, peer id -> IP; expired or disconnected ones are dropped.

        The spec makes a reservation valid only while its peer stays connected, but
        libp2p keeps the entry (and counts it) for its whole TTL."""
        manager = self.resource_manager
        table = manager._reservations
        manager._clean_expired()
        for peer in list(table):
            if not manager._is_peer_connected(peer):
                del table[peer]
        for peer in list(self._reserved_from):
            if peer not in table:
                del self._reserved_from[peer]
        return {str(peer): self._reserved_from.get(peer) for peer in table}

    def _release(self, peer: ID) -> None:
        self.resource_manager._reservations.pop(peer, None)
        self._reserved_from.pop(peer, None)

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        requester: ID = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and bytes(msg.peer.id) != requester.to_bytes():
            # A reservation is for the peer that asks, on its own connection: anything
            # else is a forgery (and libp2p would store it for an hour).
            self.guard.refuse("reserve-forged-peer")
            await _write_status(stream, StatusCode.PERMISSION_DENIED)
            return
        held = self.held_reservations()
        peer = str(requester)
        renewing = peer in held
        held.pop(peer, None)
        ip = _remote_ip(stream)
        reason = self.guard.reservation_refusal(peer, ip, held)
        if reason is not None:
            code = (
                StatusCode.PERMISSION_DENIED
                if reason == "not-member"
                else StatusCode.RESERVATION_REFUSED
            )
            if renewing:
                self._release(requester)  # no longer admitted: e.g. dropped from the members
            await _write_status(stream, code)
            return
        manager = self.resource_manager
        if renewing:
            manager.refresh_reservation(requester)
        else:
            manager.reserve(requester)
        self._reserved_from[requester] = ip
        sent = False
        try:
            reservation = manager._reservations[requester]
            reservation.addrs = self._relay_addrs()
            message = HopMessage(
                type=HopMessage.STATUS,
                status=to_proto_status(StatusCode.OK),
                reservation=reservation.to_proto(),
            )
            data, seconds = self.guard.reservation_limit(peer)
            message.limit.CopyFrom(Limit(data=data, duration=int(seconds)))
            with trio.fail_after(STATUS_WRITE_S):
                await write_delimited_msg(stream, message)
            sent = True
        except Exception:
            self.guard.refuse("reserve-failed")
        finally:
            if not sent and not renewing:
                # The requester never learnt of it: it must not hold a slot.
                self._release(requester)

    def _relay_addrs(self) -> list[bytes]:
        """Our listen addresses with ``/p2p/<relay id>``, as the spec's reservation carries."""
        own = self.host.get_id().to_base58()
        out = []
        for addr in self.host.get_transport_addrs():
            text = str(addr)
            if "/p2p-circuit" in text or "/ip4/0.0.0.0/" in text or "/ip6/::/" in text:
                continue
            try:
                full = addr if "/p2p/" in text else addr.encapsulate(Multiaddr(f"/p2p/{own}"))
                out.append(full.to_bytes())
            except Exception:
                continue
        return out

    # -- circuits -------------------------------------------------------------------------

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        source: ID = stream.muxed_conn.peer_id
        try:
            destination = ID(bytes(msg.peer.id))
            valid = destination != source and bool(msg.peer.id)
        except Exception:
            valid = False
        if not valid:
            self.guard.refuse("connect-malformed")
            await self._refuse(stream, StatusCode.MALFORMED_MESSAGE)
            return
        if str(destination) not in self.held_reservations():
            self.guard.refuse("no-reservation")
            await self._refuse(stream, StatusCode.NO_RESERVATION)
            return
        grant = self.guard.open_circuit(str(source), str(destination), trio.current_time())
        if isinstance(grant, str):
            code = (
                StatusCode.PERMISSION_DENIED
                if grant == "not-member"
                else StatusCode.RESOURCE_LIMIT_EXCEEDED
            )
            await self._refuse(stream, code)
            return
        cut: str | None = None
        dst_stream: INetStream | None = None
        limit = (grant.max_bytes, grant.max_seconds)
        relaying = False
        try:
            with trio.fail_after(STREAM_READ_TIMEOUT):
                dst_stream = await self.host.new_stream(destination, [STOP_PROTOCOL_ID])
                stop = StopMessage(
                    type=StopMessage.CONNECT,
                    peer=CircuitPeerId(id=source.to_bytes()),
                    limit=Limit(data=grant.max_bytes, duration=int(grant.max_seconds)),
                )
                await write_delimited_msg(dst_stream, stop)
                answer = await read_delimited_msg(dst_stream, StopMessage)
            if answer.HasField("status") and answer.status != to_proto_status(StatusCode.OK):
                raise ConnectionError(f"the destination answered {answer.status}")
            await _write_status(stream, StatusCode.OK, limit)
            relaying = True
            cut = await self._pump(stream, dst_stream, grant)
        except Exception:
            cut = "connect-failed"
            if not relaying:  # once relaying, the stream carries the peers' bytes only
                await _write_status(stream, StatusCode.CONNECTION_FAILED)
        finally:
            self.guard.close_circuit(grant, cut)
            await _reset(stream)
            await _reset(dst_stream)

    async def _refuse(self, stream: INetStream, code: StatusCode) -> None:
        await _write_status(stream, code)
        await trio.sleep(REFUSAL_GRACE_S)
        await _reset(stream)

    async def _pump(self, a: INetStream, b: INetStream, grant: CircuitGrant) -> str | None:
        """Relay both ways until one end closes, or the guard or the deadline cuts it.
        The reason it was cut, None when an end closed it."""
        cut: list[str] = []

        async def one_way(src: INetStream, dst: INetStream, done: trio.CancelScope) -> None:
            try:
                while True:
                    data = await src.read(MAX_READ_LEN)
                    if not data:
                        break
                    allowed, reason = self.guard.carry(grant, len(data), trio.current_time())
                    if allowed > 0:
                        with trio.fail_after(self.write_timeout):
                            await dst.write(data[:allowed])
                    if reason is not None:
                        cut.append(reason)
                        break
            except Exception:  # EOF, reset, or a write that timed out: the circuit ends
                pass
            done.cancel()

        with trio.move_on_after(grant.max_seconds) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one_way, a, b, nursery.cancel_scope)
                nursery.start_soon(one_way, b, a, nursery.cancel_scope)
        if deadline.cancelled_caught and not cut:
            cut.append("circuit-seconds")
        return cut[0] if cut else None


def forget_client_reservation(transport: CircuitV2Transport, relay: ID) -> None:
    """Stop the client transport renewing (and presenting) a reservation on ``relay``:
    its connection is gone, and libp2p has no public way to forget one."""
    transport._reservations.pop(relay, None)
    transport._reservation_proofs.pop(relay, None)


# -- the swarm's inbound connections (p2pfl.gating.InboundGuard) --------------------------

InboundHandler = Callable[[ReadWriteCloser, Multiaddr], Awaitable[None]]
"""libp2p's handler of one accepted socket: (the socket, the listen address)."""
InboundRoute = Callable[[InboundHandler, ReadWriteCloser, Multiaddr], Awaitable[None]]
"""Ours: gets libp2p's handler, to call (or not) with the socket it was given."""


def route_inbound_connections(swarm: INetworkService, route: InboundRoute) -> None:
    """Run every socket ``swarm`` accepts through ``route(libp2p's handler, socket,
    listen address)``, before libp2p's handler takes one of its inbound slots.

    py-libp2p 0.8.1 has no public hook there: its ConnectionGate filters by address
    only and its ResourceManager is asked after the slot is taken. The listener's
    closure (``Swarm.listen``) looks ``_handle_inbound_connection`` up on the swarm at
    every connection, so an instance attribute takes effect for all listeners. Once
    per swarm.
    """
    original: InboundHandler = swarm._handle_inbound_connection  # type: ignore[attr-defined]

    async def routed(connection: ReadWriteCloser, maddr: Multiaddr) -> None:
        await route(original, connection, maddr)

    swarm._handle_inbound_connection = routed  # type: ignore[attr-defined]


class InboundSocket(ReadWriteCloser):
    """An accepted socket as libp2p's inbound handler gets it from the gate: the same
    socket, and :attr:`closed` is set once libp2p (or the gate) closes it.

    py-libp2p 0.8.1 keeps each inbound handler, and the inbound slot it holds, alive
    until the swarm stops (``Swarm._do_handle_inbound_connection`` waits on the
    swarm's end), so the gate ends the handler itself when the socket is closed. The
    upgraded connection closes its socket through this object (``RawConnection.close``
    closes ``RawConnection.stream``), so no libp2p method needs rebinding.
    """

    def __init__(self, inner: ReadWriteCloser) -> None:
        self.inner = inner
        self.closed = trio.Event()

    async def read(self, n: int | None = None) -> bytes:
        return await self.inner.read(n)

    async def write(self, data: bytes) -> None:
        await self.inner.write(data)

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            self.closed.set()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.inner.get_remote_address()

    async def wait_readable(self, timeout: float) -> bool:
        """Whether the socket has a byte (or its end) within ``timeout``; nothing is
        read. True at once for a connection that is not a plain TCP socket (libp2p's
        upgrade timeout bounds those)."""
        # TrioTCPStream.stream is the trio SocketStream; .socket its socket.
        stream = getattr(self.inner, "stream", None)
        sock = getattr(stream, "socket", None)
        if sock is None:
            return True
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(sock)
            return True
        return False


# -- relayed connections ------------------------------------------------------------------


def relay_under(connection: INetConn) -> str | None:
    """The peer at the far end of the relay stream a relayed connection runs over.

    libp2p tags an inbound relayed connection with our own id in the relay's place,
    so the relay is read from the stream itself: Yamux (``secured_conn``) -> secure
    session (``conn``) -> ``TrackedRawConnection`` (``_wrapped``) -> raw connection
    (``stream``) -> the relay's stream (``muxed_conn.peer_id``); a bounded walk.
    """
    layer: object | None = getattr(connection, "muxed_conn", None)
    for _ in range(6):
        if layer is None:
            return None
        stream = getattr(layer, "stream", None)
        peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
        if peer is not None:
            return str(peer)
        layer = next(
            (getattr(layer, name) for name in ("_wrapped", "conn", "secured_conn")
             if getattr(layer, name, None) is not None),
            None,
        )  # fmt: skip
    return None
