"""Peer exchange: how a node learns peers beyond its bootstrap addresses.

Protocol ``/p2pfl/peers/1.0.0``, one request and one reply frame, msgpack maps:

- request: ``{"addrs": [requester's full multiaddrs]}``
- reply:   ``{"peers": [[peer_id, [multiaddr, ...]], ...]}`` (at most 64 peers)

Both sides validate strictly (exact keys, types, lengths, caps) and drop what does not
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
# A peer is forgotten after this many failed exchanges in a row.
MAX_CONSECUTIVE_FAILURES = 3
# Wildcard listen addresses mean "every interface here"; they are useless to others.
_UNDIALABLE_PREFIXES = ("/ip4/0.0.0.0/", "/ip6/::/")


@dataclass
class PeerEntry:
    addrs: tuple[str, ...]
    last_seen: float
    failures: int = 0


class PeerBook:
    """Known peers: peer id -> addresses and when we last heard of or from them."""

    def __init__(
        self,
        own_peer_id: str,
        *,
        max_peers: int = DEFAULT_MAX_BOOK_PEERS,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.own_peer_id = own_peer_id
        self.max_peers = max_peers
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._entries: dict[str, PeerEntry] = {}
        self.rejected: Counter[str] = Counter()
        """Dropped protocol input by reason: malformed_request, malformed_reply, bad_entry."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def add(self, peer_id: str, addrs: Iterable[str], *, first_hand: bool = True) -> bool:
        """Record ``peer_id`` at ``addrs`` (merged, capped); True if the peer was new.

        ``first_hand`` addresses come from the peer itself over an authenticated stream
        and go first; second-hand ones (another peer's reply, which anyone can forge)
        only fill free slots and do not count as having seen the peer. A new peer
        without any address is not recorded: nobody could dial it.
        """
        addrs = list(addrs)
        if peer_id == self.own_peer_id:
            return False
        now = self._clock()
        entry = self._entries.get(peer_id)
        if entry is None:
            if not addrs:
                return False
            if len(self._entries) >= self.max_peers:
                self._evict_stalest()
            entry = self._entries[peer_id] = PeerEntry(addrs=(), last_seen=now)
            is_new = True
        else:
            is_new = False
        if first_hand:
            # Fresh addresses first, so a peer that moved is reached at its new address.
            merged = list(dict.fromkeys([*addrs, *entry.addrs]))
            entry.last_seen = now
        else:
            merged = list(dict.fromkeys([*entry.addrs, *addrs]))
        entry.addrs = tuple(merged[:MAX_ADDRS_PER_PEER])
        return is_new

    def mark_alive(self, peer_id: str) -> None:
        entry = self._entries.get(peer_id)
        if entry is not None:
            entry.failures = 0
            entry.last_seen = self._clock()

    def mark_failed(self, peer_id: str) -> bool:
        """Count a failed exchange; True if the peer was forgotten because of it."""
        entry = self._entries.get(peer_id)
        if entry is None:
            return False
        entry.failures += 1
        if entry.failures >= MAX_CONSECUTIVE_FAILURES:
            del self._entries[peer_id]
            return True
        return False

    def remove(self, peer_id: str) -> None:
        self._entries.pop(peer_id, None)

    def known(self) -> list[str]:
        return sorted(self._entries)

    def addrs(self, peer_id: str) -> list[str]:
        entry = self._entries.get(peer_id)
        return list(entry.addrs) if entry else []

    def last_seen(self, peer_id: str) -> float | None:
        entry = self._entries.get(peer_id)
        return entry.last_seen if entry else None

    def sample(self, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
        """Up to ``k`` random known peers (not in ``exclude``) with their addresses."""
        excluded = set(exclude)
        candidates = [pid for pid in self._entries if pid not in excluded]
        chosen = self._rng.sample(candidates, min(k, len(candidates)))
        return [(pid, list(self._entries[pid].addrs)) for pid in chosen]

    def _evict_stalest(self) -> None:
        stalest = min(self._entries, key=lambda pid: self._entries[pid].last_seen)
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


def serve_peer_exchange(transport: Transport, book: PeerBook, read_timeout: float = 5.0) -> None:
    """Answer peer-exchange requests from the book, and learn each requester's addresses."""

    async def handle(peer_id: str, payload: bytes) -> bytes | None:
        addrs = decode_request(payload, peer_id)
        if addrs is None:
            book.rejected["malformed_request"] += 1
            return None
        # Sample before adding the requester, so it is not told about itself.
        reply = encode_reply(book.sample(MAX_PEERS_PER_REPLY, exclude=[peer_id]))
        # Only advertised addresses: the peerstore may hold the requester's ephemeral
        # source port, which nobody can dial.
        book.add(peer_id, addrs)
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
    book.add(peer_id, transport.peer_addrs(peer_id))
    book.mark_alive(peer_id)
    decoded = decode_reply(reply)
    if decoded is None:
        book.rejected["malformed_reply"] += 1
        return 0
    peers, dropped = decoded
    if dropped:
        book.rejected["bad_entry"] += dropped
    return sum(
        book.add(pid, addrs, first_hand=False) for pid, addrs in peers if pid != transport.peer_id
    )


async def discovery_round(transport: Transport, book: PeerBook, fanout: int, timeout: float) -> int:
    """Exchange peers with up to ``fanout`` random known peers concurrently.

    A peer that cannot be reached is marked failed, and forgotten after a few failures
    in a row. Returns how many new peers the round learnt.
    """
    learnt = 0

    async def with_peer(peer_id: str, addrs: list[str]) -> None:
        nonlocal learnt
        try:
            if peer_id not in transport.connected_peers():
                await _connect_any(transport, addrs, timeout)
            new = await exchange_peers(transport, peer_id, book, timeout)
            # Not `learnt += await ...`: that reads `learnt` before the await, and the
            # concurrent exchanges would overwrite each other's counts.
            learnt += new
        except TransportError as error:
            forgotten = book.mark_failed(peer_id)
            logger.debug(
                "peer exchange with %s failed (forgotten=%s): %s", peer_id, forgotten, error
            )

    async with trio.open_nursery() as nursery:
        for peer_id, addrs in book.sample(fanout):
            nursery.start_soon(with_peer, peer_id, addrs)
    return learnt


async def _connect_any(transport: Transport, addrs: list[str], timeout: float) -> None:
    last_error: TransportError | None = None
    for addr in addrs:
        try:
            await transport.connect(addr, timeout)
            return
        except ValueError:
            continue
        except TransportError as error:
            last_error = error
    raise last_error or TransportError("no dialable address known")
