"""Dialling peers: per-address budgets, backoff for persistent peers, relayed dials.

A dial of a stranger's address is held to ``DIALS_PER_ADDRESS_PER_MIN`` (peer exchange
may name many fake ids at one address, and must not make us hammer it); a peer the
node must keep reaching is redialled with exponential backoff instead. A circuit
address (``.../p2p-circuit/p2p/<id>``) is dialled through its relay (p2pfl.relay).
:meth:`Dialler.dial_any` tries a peer's addresses in turn.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.network.swarm import Swarm
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from p2pfl.deadlines import STREAM_CLEANUP_S
from p2pfl.host import split_peer_multiaddr
from p2pfl.libp2p_compat import relay_under
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.relay import NatTraversal, is_circuit
from p2pfl.streams import TransportError, describe, full_addr, parse_peer_id

logger = logging.getLogger(__name__)

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


@dataclass
class _Backoff:
    """When a persistent peer may be dialled next, and the wait after the next failure."""

    next_dial: float
    delay: float


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


class Dialler:
    """Outbound connections of one host, and what it knows of its connections.

    ``persistent(peer_id)``: whether a peer is redialled with backoff rather than under
    the per-address budget (the transport asks its connection gate)."""

    def __init__(self, host: IHost, persistent: Callable[[str], bool]) -> None:
        self._host = host
        self.peer_id = str(host.get_id())
        self.persistent = persistent
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

    # -- what we know of our connections ------------------------------------------------

    def connected_peers(self) -> list[str]:
        return [str(peer) for peer in self._host.get_connected_peers()]

    def relayed_via(self, peer_id: str) -> str | None:
        """The relay our connection to ``peer_id`` runs through; None if it is direct
        (or there is none). With a direct and a relayed one, libp2p uses the direct one."""
        try:
            connections = self._host.get_network().get_connections(parse_peer_id(peer_id))
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

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP our connection to ``peer_id`` runs over (None when not connected)."""
        try:
            connections = self._host.get_network().get_connections(parse_peer_id(peer_id))
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
            addrs = self._host.get_peerstore().addrs(parse_peer_id(peer_id))
        except Exception:  # unknown peer: libp2p raises PeerStoreError
            addrs = []
        known = {full_addr(addr, peer_id) for addr in addrs}
        if peer_id in self._reached_through_relay:
            known.add(self._reached_through_relay[peer_id])
        return sorted(known)

    # -- dialling -----------------------------------------------------------------------

    async def dial_any(self, peer_id: str, addrs: Sequence[str], timeout: float) -> None:
        """Reach ``peer_id`` at the first of ``addrs`` (its addresses) that connects, each
        dial within ``timeout``; nothing is dialled when it is already connected.
        Addresses that do not parse are skipped. Raises :class:`TransportError` naming
        the last failure, or that no address was dialable."""
        if peer_id in self.connected_peers():
            return
        last: TransportError | None = None
        for addr in addrs:
            try:
                await self.connect(addr, timeout)
                return
            except ValueError:
                continue
            except TransportError as error:
                last = error
        raise last or TransportError(f"no dialable address known for {peer_id}")

    async def connect(self, multiaddr: str, timeout: float, *, persistent: bool = False) -> str:
        """Dial ``/ip4/.../tcp/N/p2p/<id>``; return the peer id. ValueError for a bad address.

        ``persistent`` (or a peer :attr:`persistent` names, such as a member): the dial is
        held to an exponential backoff per peer instead of the per-address budget, so
        the node keeps trying its bootstrap peers and members and never gives up."""
        peer_id, addr = split_peer_multiaddr(multiaddr)
        if peer_id == self.peer_id:
            raise ValueError(f"{multiaddr} is this node's own address")
        remote = parse_peer_id(peer_id)
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
        network = self._host.get_network()
        if isinstance(network, Swarm):
            network.unblock_peer(remote)
        # libp2p dials only ONE address per transport kind (the first TCP one in the
        # peerstore), so a stale address of a restarted peer would shadow the one
        # given here for minutes: forget the old ones, dial exactly this one.
        self._host.get_peerstore().clear_addrs(remote)
        with trio.move_on_after(timeout):
            try:
                await self._host.connect(info)
            except Exception as error:
                raise TransportError(f"cannot connect to {multiaddr}: {describe(error)}") from None
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
                raise TransportError(f"cannot connect to {multiaddr}: {describe(error)}") from None
            return peer_id
        raise TransportError(f"connecting to {multiaddr} timed out after {timeout:g} s")

    async def disconnect(self, peer_id: str) -> None:
        with trio.move_on_after(STREAM_CLEANUP_S):
            try:
                await self._host.disconnect(parse_peer_id(peer_id))
            except Exception as error:
                logger.debug("disconnect from %s: %s", peer_id, describe(error))
