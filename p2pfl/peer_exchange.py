"""Peer exchange: how a node learns peers beyond its bootstrap addresses.

Protocol ``/p2pfl/peers/1.0.0``, one request and one reply frame, msgpack maps:

- request: ``{"addrs": [requester's full multiaddrs]}``
- reply:   ``{"peers": [[peer_id, [multiaddr, ...]], ...]}`` (at most 64 peers)

Only first-hand peers' verified addresses are passed on (see ``PeerBook``). Both
sides validate strictly (exact keys, types, lengths, caps) and drop what does not
fit; every drop is counted in ``PeerBook.rejected``. The requester's advertised
addresses are kept only if they name the peer id Noise authenticated on the stream, so
no one can plant addresses for another node. msgpack is decoded with ext types
disabled and size limits set; nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from gossip.keys import public_key_from_peer_id
from p2pfl.host import parse_multiaddr
from p2pfl.relay import circuit_relay, is_circuit
from p2pfl.transport import Transport, TransportError

logger = logging.getLogger(__name__)

PEERS_PROTOCOL = "/p2pfl/peers/1.0.0"
MAX_PEERS_PER_REPLY = 64
MAX_ADDRS_PER_PEER = 8
MAX_ADDR_CHARS = 256
MAX_PEER_ID_CHARS = 64
# Upper bounds of a well-formed request and reply with every cap reached, rounded up.
MAX_REQUEST_BYTES = 4 * 1024
MAX_REPLY_BYTES = 256 * 1024
DEFAULT_MAX_BOOK_PEERS = 1024
# A first-hand peer that cannot be dialled is kept (not chosen as a neighbour, redialled
# by discovery) and forgotten only after this many failures in a row spread over at
# least FORGET_UNREACHABLE_AFTER_S: a partition or a reboot is not a departure, and a
# node that forgot everyone across a cut could never heal (measured in the lab).
MAX_CONSECUTIVE_FAILURES = 3
FORGET_UNREACHABLE_AFTER_S = 600.0
# Second-hand addresses kept per peer: a liar cannot fill every slot of a real peer.
MAX_HEARD_ADDRS = 2
# Second-hand entries one source may have in the book: half a reply.
DEFAULT_PER_SOURCE_QUOTA = MAX_PEERS_PER_REPLY // 2
# Wildcard listen addresses mean "every interface here"; they are useless to others.
_UNDIALABLE_PREFIXES = ("/ip4/0.0.0.0/", "/ip6/::/")


@dataclass
class PeerEntry:
    """What the book knows of one peer; dial order is ``addrs()``."""

    first_hand: bool
    """The peer itself reached us over an authenticated connection (addrman's "tried")."""
    added: float
    last_seen: float | None = None
    """When we last heard from the peer itself; None for second-hand entries."""
    source: str | None = None
    """Who told us about a second-hand entry (its quota is per source)."""
    verified: tuple[str, ...] = ()
    """Addresses on the IP the peer's authenticated connection ran over: the only
    addresses we pass on."""
    claimed: tuple[str, ...] = ()
    """Addresses the peer advertised for itself."""
    heard: tuple[str, ...] = ()
    """Second-hand addresses (at most MAX_HEARD_ADDRS), dropped once it is first-hand."""
    failures: int = 0
    unreachable_since: float | None = None
    """When the first of the current run of failed dials happened (None: reachable)."""

    def addrs(self) -> list[str]:
        merged = dict.fromkeys([*self.verified, *self.claimed, *self.heard])
        return list(merged)[:MAX_ADDRS_PER_PEER]


def address_ip(addr: str) -> str | None:
    """The IP of ``/ip4/A/...`` or ``/ip6/A/...``; None for anything else."""
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return None


class PeerBook:
    """Known peers, modelled on Bitcoin Core's addrman: first-hand and second-hand tables.

    First-hand ("tried") peers reached us themselves. Second-hand ("new") peers were
    named by someone else, which anyone can forge: they are stale until the peer
    itself answers, hold at most MAX_HEARD_ADDRS addresses, count against a quota
    per source and a table of their own, and never evict a first-hand peer. Only
    first-hand peers are ``known()`` (neighbour candidates), and only their
    verified addresses are passed on, so a forged entry goes no further than the
    node it was sent to.
    """

    def __init__(
        self,
        own_peer_id: str,
        *,
        max_peers: int = DEFAULT_MAX_BOOK_PEERS,
        max_second_hand: int | None = None,
        per_source_quota: int = DEFAULT_PER_SOURCE_QUOTA,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.own_peer_id = own_peer_id
        self.max_peers = max_peers
        self.max_second_hand = (
            max_second_hand if max_second_hand is not None else max(1, max_peers // 4)
        )
        self.per_source_quota = per_source_quota
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._entries: dict[str, PeerEntry] = {}
        self.rejected: Counter[str] = Counter()
        """Dropped protocol input by reason: malformed-request, malformed-reply, bad-entry,
        over-quota (second-hand entries over a source's quota or the table's size)."""

    def __len__(self) -> int:
        """How many peers are known first-hand (the neighbour candidates)."""
        return sum(1 for entry in self._entries.values() if entry.first_hand)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def add(
        self,
        peer_id: str,
        addrs: Iterable[str],
        *,
        first_hand: bool = True,
        source: str | None = None,
        observed_ip: str | None = None,
        vouched: Iterable[str] = (),
    ) -> bool:
        """Record ``peer_id`` at ``addrs``; True if the peer was new to the book.

        ``first_hand`` addresses come from the peer itself over an authenticated
        connection whose remote IP was ``observed_ip``: those on that IP are verified,
        and so are the relay addresses the caller ``vouched`` for (see
        :func:`connection_evidence`).
        Second-hand ones (``source``'s reply) only fill an unverified entry's free
        slots. A new peer without any address is not recorded: nobody could dial it.
        """
        addrs = list(dict.fromkeys(addrs))
        if peer_id == self.own_peer_id:
            return False
        entry = self._entries.get(peer_id)
        now = self._clock()
        if not first_hand:
            if entry is not None:
                if not entry.first_hand and len(entry.heard) < MAX_HEARD_ADDRS:
                    entry.heard = tuple(dict.fromkeys([*entry.heard, *addrs]))[:MAX_HEARD_ADDRS]
                return False
            if not addrs or not self._room_for_second_hand(source):
                return False
            self._entries[peer_id] = PeerEntry(
                first_hand=False, added=now, source=source, heard=tuple(addrs[:MAX_HEARD_ADDRS])
            )
            return True
        is_new = entry is None
        if entry is None:
            if not addrs:
                return False
            self._make_room_for_first_hand()
            entry = self._entries[peer_id] = PeerEntry(first_hand=True, added=now)
        entry.first_hand, entry.source, entry.last_seen, entry.heard = True, None, now, ()
        proven = set(vouched)
        verified = [
            addr
            for addr in addrs
            if addr in proven
            or (observed_ip and not is_circuit(addr) and address_ip(addr) == observed_ip)
        ]
        # Fresh addresses first, so a peer that moved is reached at its new address.
        entry.verified = tuple(dict.fromkeys([*verified, *entry.verified]))[:MAX_ADDRS_PER_PEER]
        entry.claimed = tuple(dict.fromkeys([*addrs, *entry.claimed]))[:MAX_ADDRS_PER_PEER]
        return is_new

    def mark_alive(self, peer_id: str, now: float | None = None) -> None:
        """The peer itself just proved it is alive (over an authenticated connection);
        ``now`` defaults to the book's clock (the peer policy passes its own)."""
        entry = self._entries.get(peer_id)
        if entry is not None:
            entry.failures = 0
            entry.unreachable_since = None
            entry.first_hand = True
            entry.source = None
            entry.last_seen = self._clock() if now is None else now

    def mark_failed(self, peer_id: str, now: float | None = None) -> bool:
        """Count a failed dial or exchange; True if the peer was forgotten because of it.

        A second-hand entry is forgotten at its first failure: it was never shown to
        exist. A first-hand one becomes unreachable (no longer ``reachable``) and is
        forgotten only once it has failed MAX_CONSECUTIVE_FAILURES times in a row over
        at least FORGET_UNREACHABLE_AFTER_S. Being slow is not a failure: callers mark
        only what could not be dialled or answered.
        """
        entry = self._entries.get(peer_id)
        if entry is None:
            return False
        now = self._clock() if now is None else now
        entry.failures += 1
        if entry.unreachable_since is None:
            entry.unreachable_since = now
        gone = (
            entry.failures >= MAX_CONSECUTIVE_FAILURES
            and now - entry.unreachable_since >= FORGET_UNREACHABLE_AFTER_S
        )
        if not entry.first_hand or gone:
            del self._entries[peer_id]
            return True
        return False

    def reachable(self, peer_id: str) -> bool:
        """Known first-hand, and its last dial (if any) did not fail."""
        entry = self._entries.get(peer_id)
        return entry is not None and entry.first_hand and entry.unreachable_since is None

    def is_first_hand(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is known first-hand (a neighbour candidate)."""
        entry = self._entries.get(peer_id)
        return entry is not None and entry.first_hand

    def known(self) -> list[str]:
        """Peers known first-hand, sorted: the only ones chosen as neighbours."""
        return sorted(pid for pid, entry in self._entries.items() if entry.first_hand)

    def second_hand(self) -> list[str]:
        return sorted(pid for pid, entry in self._entries.items() if not entry.first_hand)

    def addrs(self, peer_id: str) -> list[str]:
        entry = self._entries.get(peer_id)
        return entry.addrs() if entry else []

    def sample(self, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
        """Up to ``k`` random peers to pass on: first-hand ones, verified addresses only."""
        excluded = set(exclude)
        candidates = [
            pid
            for pid, entry in self._entries.items()
            if entry.first_hand and entry.verified and pid not in excluded
        ]
        chosen = self._rng.sample(candidates, min(k, len(candidates)))
        return [(pid, list(self._entries[pid].verified)) for pid in chosen]

    def dial_candidates(self, k: int) -> list[tuple[str, list[str]]]:
        """Up to ``k`` random peers to exchange peers with: second-hand ones first (a
        dial is what makes them first-hand or forgotten), but at least one first-hand
        peer when there is one, so a flood of fakes cannot take every slot."""
        second = self.second_hand()
        first = self.known()
        take_first = min(len(first), max(1, k - len(second))) if k > 0 else 0
        # Unreachable first-hand peers are candidates too: redialling them is how a
        # healed partition is noticed.
        chosen = self._rng.sample(first, take_first)
        chosen += self._rng.sample(second, min(k - len(chosen), len(second)))
        return [(pid, self._entries[pid].addrs()) for pid in chosen]

    def _room_for_second_hand(self, source: str | None) -> bool:
        second = [(pid, e) for pid, e in self._entries.items() if not e.first_hand]
        if sum(1 for _, e in second if e.source == source) >= self.per_source_quota:
            self.rejected["over-quota"] += 1
            return False
        if len(second) >= self.max_second_hand or len(self._entries) >= self.max_peers:
            if not second:
                self.rejected["over-quota"] += 1
                return False
            # Evict from the source that holds the most, its oldest entry first, so one
            # source flooding the table mostly displaces its own entries.
            per_source = Counter(e.source for _, e in second)
            heaviest = max(per_source, key=lambda src: per_source[src])
            oldest = min(
                (pid for pid, e in second if e.source == heaviest),
                key=lambda pid: self._entries[pid].added,
            )
            del self._entries[oldest]
        return True

    def _make_room_for_first_hand(self) -> None:
        if len(self._entries) < self.max_peers:
            return
        second = [pid for pid, e in self._entries.items() if not e.first_hand]
        if second:
            del self._entries[min(second, key=lambda pid: self._entries[pid].added)]
            return
        stalest = min(self._entries, key=lambda pid: self._entries[pid].last_seen or 0.0)
        del self._entries[stalest]


# -- wire format --------------------------------------------------------------------------


def _unpack(data: bytes, max_items: int) -> Any:
    """msgpack with ext types refused and every container/string bounded."""
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=MAX_ADDR_CHARS,
        max_bin_len=0,
        max_ext_len=0,
        max_array_len=max_items,
        max_map_len=1,
    )


def _valid_peer_id(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_PEER_ID_CHARS:
        return None
    try:
        # Our nodes are ed25519 only: the id must embed the key that signs updates.
        public_key_from_peer_id(value)
    except ValueError:
        return None
    return value


def _valid_addrs(value: object, peer_id: str) -> list[str] | None:
    """Full multiaddrs of ``peer_id``; None if ``value`` is not a list of strings."""
    if not isinstance(value, list) or len(value) > MAX_ADDRS_PER_PEER:
        return None
    suffix = f"/p2p/{peer_id}"
    addrs = []
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_ADDR_CHARS:
            return None
        if not item.endswith(suffix) or item.startswith(_UNDIALABLE_PREFIXES):
            continue  # an address of someone else, or of nowhere: skip, keep the rest
        try:
            parse_multiaddr(item)
        except ValueError:
            continue
        addrs.append(item)
    return addrs


def encode_request(own_addrs: list[str]) -> bytes:
    return msgpack.packb({"addrs": own_addrs[:MAX_ADDRS_PER_PEER]})


def decode_request(data: bytes, requester: str) -> list[str] | None:
    """The requester's valid addresses, or None if the request is malformed."""
    try:
        message = _unpack(data, MAX_ADDRS_PER_PEER)
    except Exception:  # msgpack raises many types for hostile input
        return None
    if not isinstance(message, dict) or set(message) != {"addrs"}:
        return None
    return _valid_addrs(message["addrs"], requester)


def encode_reply(peers: list[tuple[str, list[str]]]) -> bytes:
    entries = [[pid, addrs[:MAX_ADDRS_PER_PEER]] for pid, addrs in peers[:MAX_PEERS_PER_REPLY]]
    return msgpack.packb({"peers": entries})


def decode_reply(data: bytes) -> tuple[list[tuple[str, list[str]]], int] | None:
    """(valid peers, number of invalid entries dropped), or None if malformed as a whole."""
    try:
        message = _unpack(data, MAX_PEERS_PER_REPLY)
    except Exception:
        return None
    if not isinstance(message, dict) or set(message) != {"peers"}:
        return None
    entries = message["peers"]
    if not isinstance(entries, list):
        return None
    peers: list[tuple[str, list[str]]] = []
    dropped = 0
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            dropped += 1
            continue
        peer_id = _valid_peer_id(entry[0])
        addrs = _valid_addrs(entry[1], peer_id) if peer_id else None
        if peer_id is None or not addrs:
            dropped += 1
            continue
        peers.append((peer_id, addrs))
    return peers, dropped


# -- both ends ----------------------------------------------------------------------------


def connection_evidence(transport: Transport, peer_id: str, addrs: list[str]) -> dict[str, Any]:
    """What our connection to ``peer_id`` proves about ``addrs``: ``PeerBook.add`` options.

    Over a direct connection, addresses on its remote IP are verified. Over a relayed
    one that IP is the relay's, so only circuit addresses through that same relay
    are (we reached the peer through it). A relay also vouches for the circuit
    addresses through itself of a peer that holds a reservation on it, which is
    how a NATed member's relay address first gets passed on.
    """
    relay = transport.relayed_via(peer_id)
    if relay is not None:
        return {"observed_ip": None, "vouched": [a for a in addrs if circuit_relay(a) == relay]}
    nat = transport.nat
    ours = nat is not None and nat.holds_reservation_for(peer_id)
    vouched = [a for a in addrs if ours and circuit_relay(a) == transport.peer_id]
    return {"observed_ip": transport.remote_ip(peer_id), "vouched": vouched}


def serve_peer_exchange(transport: Transport, book: PeerBook, read_timeout: float = 5.0) -> None:
    """Answer peer-exchange requests from the book, and learn each requester's addresses."""

    async def handle(peer_id: str, payload: bytes) -> bytes | None:
        addrs = decode_request(payload, peer_id)
        if addrs is None:
            book.rejected["malformed-request"] += 1
            return None
        # Sample before adding the requester, so it is not told about itself.
        reply = encode_reply(book.sample(MAX_PEERS_PER_REPLY, exclude=[peer_id]))
        # Only advertised addresses: the peerstore may hold the requester's ephemeral
        # source port, which nobody can dial.
        book.add(peer_id, addrs, **connection_evidence(transport, peer_id, addrs))
        book.mark_alive(peer_id)
        return reply

    transport.set_handler(PEERS_PROTOCOL, handle, MAX_REQUEST_BYTES, read_timeout)


async def exchange_peers(transport: Transport, peer_id: str, book: PeerBook, timeout: float) -> int:
    """Ask ``peer_id`` for its peers; add them to ``book``. Returns how many were new.

    TransportError propagates (the caller decides what a dead peer means); a malformed
    reply is counted in ``book.rejected`` and learns nothing.
    """
    reply = await transport.request(
        peer_id, PEERS_PROTOCOL, encode_request(transport.addrs), timeout, MAX_REPLY_BYTES
    )
    addrs = transport.peer_addrs(peer_id)
    book.add(peer_id, addrs, **connection_evidence(transport, peer_id, addrs))
    book.mark_alive(peer_id)
    decoded = decode_reply(reply)
    if decoded is None:
        book.rejected["malformed-reply"] += 1
        return 0
    peers, dropped = decoded
    if dropped:
        book.rejected["bad-entry"] += dropped
    return sum(
        book.add(pid, addrs, first_hand=False, source=peer_id)
        for pid, addrs in peers
        if pid != transport.peer_id
    )


async def discovery_round(
    transport: Transport,
    book: PeerBook,
    fanout: int,
    timeout: float,
    failed: Callable[[str], bool] | None = None,
) -> int:
    """Exchange peers with up to ``fanout`` random known peers concurrently.

    A peer that cannot be reached is reported to ``failed`` (default: the book's
    ``mark_failed``; the daemon passes its peer policy, which owns forgetting), and
    forgotten after a few failures in a row. Returns how many new peers the round learnt.
    """
    mark_failed = failed if failed is not None else book.mark_failed
    learnt = 0

    async def with_peer(peer_id: str, addrs: list[str]) -> None:
        nonlocal learnt
        try:
            await transport.dial_any(peer_id, addrs, timeout)
            new = await exchange_peers(transport, peer_id, book, timeout)
            # Not `learnt += await ...`: that reads `learnt` before the await, and the
            # concurrent exchanges would overwrite each other's counts.
            learnt += new
        except TransportError as error:
            forgotten = mark_failed(peer_id)
            logger.debug(
                "peer exchange with %s failed (forgotten=%s): %s", peer_id, forgotten, error
            )

    async with trio.open_nursery() as nursery:
        for peer_id, addrs in book.dial_candidates(fanout):
            nursery.start_soon(with_peer, peer_id, addrs)
    return learnt

