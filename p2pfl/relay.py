"""Members behind NAT: py-libp2p's circuit relay v2 and DCUtR, wired to the node's host.

A member that others can dial serves as a relay (``--relay on``, the default): it
runs the relay's HOP protocol. A member that others cannot dial (see
p2pfl.reachability) reserves a slot on up to ``MAX_RELAYS`` relays and advertises
``<relay addr>/p2p-circuit/p2p/<own id>``; a peer dials such an address through the
relay (``Transport.connect`` hands it to :meth:`NatTraversal.dial`). DCUtR runs on
every member: once two members hold a relayed connection it tries to punch a direct
one (the lab measures how often that works; see docs/NETLAB.md).

Who may use our relay, and for how much, is :class:`RelayPolicy` (sans-I/O):

* A **member** is a peer in the allowlist (``--allow``); on an open node (no
  allowlist), a peer this node gossips with: one of its current neighbours, either
  way (the node's runtime tells the policy). Everyone else is a **stranger**.
* With an allowlist only members reserve, and a circuit needs both ends to be
  members. On an open node strangers may reserve and connect, but a circuit with a
  stranger at either end gets go-libp2p's "limited relay" bounds (128 KiB in both
  directions together, 2 minutes): enough for DCUtR to punch a direct connection,
  not for carrying anyone's traffic. A circuit between two members gets the
  model-sized bounds.
* Caps per relay, not per reservation: reservations in all, per IP and by strangers;
  circuits in all, per peer and with strangers. Every relayed byte is charged to both
  ends' byte budgets (the transport's PeerRateLimiter); a circuit is cut when either
  runs out. Every refusal and cut is counted by reason (``/status`` → ``relay``).

The protocol is py-libp2p 0.8.1's own; its handlers are replaced (for the holes in
issue 20) in p2pfl.libp2p_compat, the one module that touches libp2p's internals.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from p2pfl.gating import Members
from p2pfl.host import split_peer_multiaddr
from p2pfl.libp2p_compat import CircuitGrant, GuardedRelayProtocol, forget_client_reservation
from p2pfl.ratelimit import PeerRateLimiter

logger = logging.getLogger(__name__)
# py-libp2p's relay logs every circuit that ends, and every stored-address miss, at
# ERROR with no detail; its real failures reach us as exceptions from dial/reserve.
logging.getLogger("libp2p.relay.circuit_v2.protocol").setLevel(logging.CRITICAL)
logging.getLogger("libp2p.relay.circuit_v2.transport").setLevel(logging.CRITICAL)

CIRCUIT = "/p2p-circuit"
# A circuit between two members carries a model update every round, and py-libp2p's
# defaults (1 GiB, 3600 s) would cut it, failing every later stream: a member circuit
# is bounded by the ends' byte budgets (charged per byte) rather than by its own cap.
MEMBER_CIRCUIT_MAX_BYTES = 1 << 40
MEMBER_CIRCUIT_MAX_SECONDS = 7 * 24 * 3600
# A circuit with a stranger at either end: go-libp2p's limited relay (128 KiB, 2 min;
# go counts 128 KiB per direction, we count both directions together). Enough for
# identify and DCUtR to replace it with a direct connection; useless as free transit.
STRANGER_CIRCUIT_MAX_BYTES = 128 * 1024
STRANGER_CIRCUIT_MAX_SECONDS = 120
RESERVATION_TTL_S = 3600  # libp2p refreshes it 30 s before it expires
# Per relay, whoever asks: a federation has tens of members, and each NATed one
# reserves on MAX_RELAYS relays and is reached by its few neighbours.
RELAY_MAX_RESERVATIONS = 64
RELAY_MAX_CIRCUITS = 64
# A peer is one end of at most this many circuits (a NATed member is reached by its
# in-neighbours: far fewer); it is also libp2p's per-reservation cap.
RELAY_MAX_CIRCUITS_PER_PEER = 16
# Strangers share a quarter of each table, so they can never lock members out.
RELAY_MAX_STRANGER_RESERVATIONS = 16
RELAY_MAX_STRANGER_CIRCUITS = 16
# Reservations by strangers from one IP: a few NATed nodes may share one public IP,
# while one host minting keys may not take the stranger quarter alone.
RELAY_MAX_RESERVATIONS_PER_IP = 4
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
    """The limits libp2p's resource manager applies (TTL and table size; the circuit
    bounds themselves are RelayPolicy's, per circuit)."""
    return RelayLimits(
        duration=MEMBER_CIRCUIT_MAX_SECONDS,
        data=MEMBER_CIRCUIT_MAX_BYTES,
        max_circuit_conns=RELAY_MAX_CIRCUITS_PER_PEER,
        max_reservations=RELAY_MAX_RESERVATIONS,
        reservation_ttl=RESERVATION_TTL_S,
    )


@dataclass(frozen=True)
class RelayBounds:
    """The caps a relay enforces (defaults: the constants above, declared once)."""

    max_reservations: int = RELAY_MAX_RESERVATIONS
    max_stranger_reservations: int = RELAY_MAX_STRANGER_RESERVATIONS
    max_reservations_per_ip: int = RELAY_MAX_RESERVATIONS_PER_IP
    max_circuits: int = RELAY_MAX_CIRCUITS
    max_stranger_circuits: int = RELAY_MAX_STRANGER_CIRCUITS
    max_circuits_per_peer: int = RELAY_MAX_CIRCUITS_PER_PEER
    member_circuit_bytes: int = MEMBER_CIRCUIT_MAX_BYTES
    member_circuit_seconds: float = MEMBER_CIRCUIT_MAX_SECONDS
    stranger_circuit_bytes: int = STRANGER_CIRCUIT_MAX_BYTES
    stranger_circuit_seconds: float = STRANGER_CIRCUIT_MAX_SECONDS


@dataclass(eq=False)
class Circuit:
    """One open circuit: ``source`` dialled ``destination`` (which reserved here)."""

    source: str
    destination: str
    stranger: bool
    max_bytes: int
    max_seconds: float
    carried: int = 0


class RelayPolicy:
    """Who may reserve and connect through this relay, and what each byte costs.

    Sans-I/O: p2pfl.libp2p_compat's relay protocol asks it, with the time passed in.
    ``allowed``: the allowlist (None: an open node). ``members``: on an open node, the
    peers this node gossips with now (set by the runtime; None: nobody yet), asked
    once per decision.
    ``rate_limiter``: the per-peer byte budgets relayed bytes are charged to.
    """

    def __init__(
        self,
        *,
        allowed: Members | None = None,
        rate_limiter: PeerRateLimiter | None = None,
        members: Callable[[], Collection[str]] | None = None,
        bounds: RelayBounds | None = None,
    ) -> None:
        self.allowed = allowed
        self.rate_limiter = rate_limiter
        self.members = members
        self.bounds = bounds or RelayBounds()
        self.circuits: list[Circuit] = []
        self.refused: Counter[str] = Counter()
        """Reservations and circuits refused, by reason."""
        self.cut: Counter[str] = Counter()
        """Circuits ended by the relay (bytes, seconds, budget, failed), by reason."""
        self.reservations_granted = 0
        self.circuits_opened = 0
        self.bytes_relayed = 0
        """Bytes carried on all circuits, both directions."""

    def member_set(self) -> Collection[str]:
        """The members now: the allowlist, else the peers this node gossips with."""
        if self.allowed is not None:
            return self.allowed
        return self.members() if self.members is not None else ()

    def is_member(self, peer_id: str) -> bool:
        return peer_id in self.member_set()

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def _refusal(self, reason: str) -> str:
        self.refused[reason] += 1
        return reason

    def reservation_refusal(
        self, peer_id: str, ip: str | None, held: Mapping[str, str | None]
    ) -> str | None:
        bounds = self.bounds
        if self.allowed is not None and peer_id not in self.allowed:
            return self._refusal("not-member")
        if len(held) >= bounds.max_reservations:
            return self._refusal("reservations-full")
        members = self.member_set()
        if peer_id not in members:
            strangers = [other_ip for other, other_ip in held.items() if other not in members]
            if len(strangers) >= bounds.max_stranger_reservations:
                return self._refusal("stranger-reservations-full")
            if ip is not None and strangers.count(ip) >= bounds.max_reservations_per_ip:
                return self._refusal("reservations-per-ip")
        self.reservations_granted += 1
        return None

    def reservation_limit(self, peer_id: str) -> tuple[int, float]:
        bounds = self.bounds
        if self.is_member(peer_id):
            return bounds.member_circuit_bytes, bounds.member_circuit_seconds
        return bounds.stranger_circuit_bytes, bounds.stranger_circuit_seconds

    def open_circuit(self, source: str, destination: str, now: float) -> Circuit | str:
        bounds = self.bounds
        if self.allowed is not None and not (
            source in self.allowed and destination in self.allowed
        ):
            return self._refusal("not-member")
        members = self.member_set()
        stranger = not (source in members and destination in members)
        if len(self.circuits) >= bounds.max_circuits:
            return self._refusal("circuits-full")
        if stranger and sum(c.stranger for c in self.circuits) >= bounds.max_stranger_circuits:
            return self._refusal("stranger-circuits-full")
        for peer in (source, destination):
            ends = sum(peer in (c.source, c.destination) for c in self.circuits)
            if ends >= bounds.max_circuits_per_peer:
                return self._refusal("circuits-per-peer")
        limiter = self.rate_limiter
        if limiter is not None and min(
            limiter.available(source, now), limiter.available(destination, now)
        ) < 1:
            return self._refusal("rate-limited")
        if stranger:
            circuit = Circuit(
                source, destination, True,
                bounds.stranger_circuit_bytes, bounds.stranger_circuit_seconds,
            )  # fmt: skip
        else:
            circuit = Circuit(
                source, destination, False,
                bounds.member_circuit_bytes, bounds.member_circuit_seconds,
            )  # fmt: skip
        self.circuits.append(circuit)
        self.circuits_opened += 1
        return circuit

    def carry(self, grant: CircuitGrant, nbytes: int, now: float) -> tuple[int, str | None]:
        """Of a chunk of ``nbytes``, how many the circuit may forward (charged to it and
        to both ends' budgets), and why it is cut after them (None: it goes on)."""
        assert isinstance(grant, Circuit)
        allowed, reason = nbytes, None
        if grant.carried + allowed > grant.max_bytes:
            allowed, reason = grant.max_bytes - grant.carried, "circuit-bytes"
        limiter = self.rate_limiter
        if limiter is not None:
            budget = min(
                limiter.available(grant.source, now), limiter.available(grant.destination, now)
            )
            if budget < allowed:
                allowed, reason = max(0, math.floor(budget)), "rate-limited"
            limiter.charge(grant.source, allowed, now)
            limiter.charge(grant.destination, allowed, now)
        grant.carried += allowed
        self.bytes_relayed += allowed
        return allowed, reason

    def close_circuit(self, grant: CircuitGrant, reason: str | None) -> None:
        assert isinstance(grant, Circuit)
        if grant in self.circuits:
            self.circuits.remove(grant)
        if reason is not None:
            self.cut[reason] += 1

    def view(self) -> dict[str, Any]:
        """The ``relay`` section of /status."""
        return {
            "members_only": self.allowed is not None,
            "reservations_granted": self.reservations_granted,
            "circuits_opened": self.circuits_opened,
            "circuits_open": len(self.circuits),
            "stranger_circuits_open": sum(c.stranger for c in self.circuits),
            "bytes_relayed": self.bytes_relayed,
            "refused": dict(self.refused),
            "cut": dict(self.cut),
        }


class NatTraversal:
    """Circuit relay v2 (relay and client sides) and DCUtR on one host.

    ``serve_relay`` runs the HOP side, so that NATed members can reserve here.
    Every member runs the STOP side (it accepts relayed connections) and DCUtR.
    """

    def __init__(
        self,
        host: IHost,
        *,
        serve_relay: bool,
        allowed: Members | None = None,
        rate_limiter: PeerRateLimiter | None = None,
    ) -> None:
        self.host = host
        self.serve_relay = serve_relay
        limits = relay_limits()
        self.policy = RelayPolicy(allowed=allowed, rate_limiter=rate_limiter)
        self.protocol = GuardedRelayProtocol(host, limits, serve_relay, self.policy)
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
            ID.from_base58(peer_id)
        except Exception:  # not a peer id
            return False
        return peer_id in self.protocol.held_reservations()

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
        # libp2p's refresher would keep renewing it over a dead connection.
        forget_client_reservation(self.circuits, ID.from_base58(relay_id))

    async def dial(self, addr: str) -> None:
        """Connect to the peer at circuit address ``addr`` through its relay.

        libp2p's swarm skips circuit addresses when it dials a peer, so the circuit
        transport dials this one itself; the connection joins the swarm, and later
        streams to the peer use it.
        """
        await self.circuits.dial(Multiaddr(addr))
