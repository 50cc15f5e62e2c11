"""Members behind NAT: py-libp2p's circuit relay v2 and DCUtR, wired to the node's host.

A member that others can dial serves as a relay (``--relay on``, the default): it
runs the relay's HOP protocol with limits raised for model traffic. A member that
others cannot dial (see p2pfl.reachability) reserves a slot on up to
``MAX_RELAYS`` relays and advertises ``<relay addr>/p2p-circuit/p2p/<own id>``;
a peer dials such an address through the relay (``Transport.connect`` hands it
to :meth:`NatTraversal.dial`). DCUtR runs on every member: once two members
hold a relayed connection it tries to punch a direct one (the lab measures how
often that works; see README).

Everything protocol-level is py-libp2p 0.8.1's own (``libp2p.relay.circuit_v2``):
this module only chooses limits, tracks reservations and builds addresses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from p2pfl.host import split_peer_multiaddr

logger = logging.getLogger(__name__)
# py-libp2p's relay logs every circuit that ends, and every stored-address miss, at
# ERROR with no detail; its real failures reach us as exceptions from dial/reserve.
logging.getLogger("libp2p.relay.circuit_v2.protocol").setLevel(logging.CRITICAL)
logging.getLogger("libp2p.relay.circuit_v2.transport").setLevel(logging.CRITICAL)

CIRCUIT = "/p2p-circuit"
# py-libp2p's defaults end a circuit after 1 GiB (both directions) or 3600 s, and a
# circuit that hits its cap fails every later stream: a relay between two members
# carries a model update every round, so the caps are far above a day's traffic.
CIRCUIT_MAX_BYTES = 1 << 40
CIRCUIT_MAX_SECONDS = 7 * 24 * 3600
RESERVATION_TTL_S = 3600  # libp2p refreshes it 30 s before it expires
# A relay carries at most this many circuits and holds this many reservations; a
# federation has tens of members, and each NATed one reserves on MAX_RELAYS relays.
RELAY_MAX_CIRCUITS = 64
RELAY_MAX_RESERVATIONS = 64
# A NATed member reserves on this many relays: one relay that goes away (or drops
# what it relays) does not cut it off.
MAX_RELAYS = 2


def is_circuit(addr: str) -> bool:
    """True for ``.../p2p/<relay>/p2p-circuit/p2p/<peer>`` addresses."""
    return f"{CIRCUIT}/" in addr or addr.endswith(CIRCUIT)


def circuit_relay(addr: str) -> str | None:
    """The relay's peer id named in a circuit address (None for a direct address)."""
    if not is_circuit(addr):
        return None
    head = addr.split(CIRCUIT, 1)[0]
    try:
        relay_id, _ = split_peer_multiaddr(head)
    except ValueError:
        return None
    return relay_id


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    """``relay_addr`` (a full ``.../p2p/<relay>`` address) extended to reach ``peer_id``."""
    return f"{relay_addr}{CIRCUIT}/p2p/{peer_id}"


@dataclass(frozen=True)
class Reservation:
    relay_id: str
    circuit_addr: str
    """Our address through this relay, as we advertise it."""
    since: float


def relay_limits() -> RelayLimits:
    return RelayLimits(
        duration=CIRCUIT_MAX_SECONDS,
        data=CIRCUIT_MAX_BYTES,
        max_circuit_conns=RELAY_MAX_CIRCUITS,
        max_reservations=RELAY_MAX_RESERVATIONS,
        reservation_ttl=RESERVATION_TTL_S,
    )


class NatTraversal:
    """Circuit relay v2 (relay and client sides) and DCUtR on one host.

    ``serve_relay`` runs the HOP side, so that NATed members can reserve here.
    Every member runs the STOP side (it accepts relayed connections) and DCUtR.
    """

    def __init__(self, host: IHost, *, serve_relay: bool) -> None:
        self.host = host
        self.serve_relay = serve_relay
        limits = relay_limits()
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=serve_relay)
        # STOP only, not CLIENT: with CLIENT, libp2p's dial through a relay first
        # takes a reservation on it, which only a NATed member needs (reserve()).
        config = RelayConfig(roles=RelayRole.STOP, limits=limits)
        self.circuits = CircuitV2Transport(host, self.protocol, config)
        self.dcutr = DCUtRProtocol(host)
        self.reservations: dict[str, Reservation] = {}
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[NatTraversal]:
        """Serve the relay protocols and DCUtR until the block ends."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.protocol))
            await stack.enter_async_context(background_trio_service(self.dcutr))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            try:
                yield self
            finally:
                self._nursery.cancel_scope.cancel()
                self._nursery = None

    @property
    def circuit_addrs(self) -> list[str]:
        """Our addresses through the relays we hold a reservation on."""
        return [reservation.circuit_addr for reservation in self.reservations.values()]

    def holds_reservation_for(self, peer_id: str) -> bool:
        """True if we relay for ``peer_id`` (it reserved a slot here)."""
        try:
            return bool(self.protocol.resource_manager.has_reservation(ID.from_base58(peer_id)))
        except Exception:  # not a peer id
            return False

    async def reserve(self, relay_addr: str) -> Reservation:
        """Reserve a slot on the relay at ``relay_addr`` (already connected).

        The relay's address is the one we reached it at, so the circuit address we
        advertise names a relay address that is known to be dialable. Raises
        ConnectionError (one line) when the peer is no relay or refuses a slot.
        """
        if self._nursery is None:
            raise RuntimeError("NatTraversal.reserve outside running()")
        relay_id, _ = split_peer_multiaddr(relay_addr)
        try:
            stream = await self.host.new_stream(ID.from_base58(relay_id), [HOP_PROTOCOL_ID])
        except Exception as error:  # libp2p's StreamFailure, or the connection is gone
            raise ConnectionError(f"relay {relay_id} does not serve relays ({error})") from None
        try:
            reserved = await self.circuits.reserve(stream, ID.from_base58(relay_id), self._nursery)
        finally:
            try:
                await stream.close()
            except Exception:
                await stream.reset()
        if not reserved:
            raise ConnectionError(f"relay {relay_id} refused a reservation")
        own_id = str(self.host.get_id())
        reservation = Reservation(relay_id, circuit_addr(relay_addr, own_id), time.monotonic())
        self.reservations[relay_id] = reservation
        return reservation

    def drop(self, relay_id: str) -> None:
        """Forget the reservation on ``relay_id`` (its connection is gone)."""
        self.reservations.pop(relay_id, None)
        # libp2p's refresher would keep renewing it over a dead connection, and its
        # transport has no public way to forget one.
        relay = ID.from_base58(relay_id)
        self.circuits._reservations.pop(relay, None)
        self.circuits._reservation_proofs.pop(relay, None)

    async def dial(self, addr: str) -> None:
        """Connect to the peer at circuit address ``addr`` through its relay.

        libp2p's swarm skips circuit addresses when it dials a peer, so the circuit
        transport dials this one itself; the connection joins the swarm, and later
        streams to the peer use it.
        """
        await self.circuits.dial(Multiaddr(addr))
