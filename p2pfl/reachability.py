"""Which of the node's addresses others can dial: public, NATed, firewalled or relayed.

Protocol ``/p2pfl/reach/1.0.0``, one request and one reply frame, msgpack maps:

- request: ``{"ports": [our TCP listen ports]}`` (at most ``MAX_PORTS``)
- reply:   ``{"seen": "IP" or "", "open": [bool per port], "public": bool, "relay": bool}``

The responder reports the IP it sees our connection come from, and opens a plain TCP
connection (no libp2p) to that IP at each port, so the answer is about a fresh
connection from outside. It dials only the IP the request came from, at most
``DIALBACKS_PER_IP_PER_MIN`` times a minute, so it cannot be used to make us dial a
third party. Over a relayed connection it sees the relay, not us: it answers
``seen = ""`` and dials nothing.

Why not libp2p's AutoNAT: its dial-back calls ``host.connect()``, which returns at
once over the connection the request came on, so a NATed node is told it is public
(measured; see the project's libp2p notes).

A listen address is:
- ``public`` when a peer dialled it back and no peer saw us from another IP;
- ``nated`` when a peer saw us from another IP (our packets are translated) and
  could not dial that IP back;
- ``firewalled`` when peers saw our own IP but could not dial it;
- ``unknown`` until a peer answered.
Circuit addresses (p2p.relay) are ``relayed``. A node none of whose addresses is
public reserves relay slots (see :func:`maintain`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from p2pfl.peer_exchange import PeerBook, address_ip
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.relay import MAX_RELAYS, is_circuit
from p2pfl.transport import Transport, TransportError

logger = logging.getLogger(__name__)

REACH_PROTOCOL = "/p2pfl/reach/1.0.0"
MAX_PORTS = 4
MAX_REQUEST_BYTES = 64
MAX_REPLY_BYTES = 256
DIALBACK_TIMEOUT_S = 2.0
DIALBACKS_PER_IP_PER_MIN = 6
# Peers asked per check: one NAT-side peer cannot make a public node think it is
# NATed, nor a same-LAN peer make a NATed one think it is public.
ASK_PEERS = 3
# Until the node knows it is public or holds its relay slots it checks this often;
# afterwards less often (a relay may go away, an address may change).
UNSETTLED_INTERVAL_S = 2.0
SETTLED_INTERVAL_S = 30.0
RELAY_TAG = "relay"
_WILDCARDS = ("0.0.0.0", "::")

PUBLIC, NATED, FIREWALLED, RELAYED, UNKNOWN = "public", "nated", "firewalled", "relayed", "unknown"


@dataclass(frozen=True)
class Answer:
    """One peer's view of us."""

    peer_id: str
    seen: str
    """The IP our connection came from, as the peer saw it ("" over a relay)."""
    open_ports: frozenset[int]
    public: bool
    """The peer's own verdict about itself."""
    relay: bool
    """The peer serves as a relay."""


@dataclass
class Reachability:
    """What the node knows about its own addresses; shared by the loop and /status."""

    kinds: dict[str, str] = field(default_factory=dict)
    """Our address -> public, nated, firewalled, relayed or unknown."""
    seen_as: list[str] = field(default_factory=list)
    """IPs peers saw us come from."""
    serve_relay: bool = False

    @property
    def public(self) -> bool:
        return PUBLIC in self.kinds.values()

    @property
    def settled(self) -> bool:
        return bool(self.kinds) and UNKNOWN not in self.kinds.values()

    def describe(self) -> str:
        """One line for the log: each address and its kind."""
        parts = [f"{addr} {kind}" for addr, kind in self.kinds.items()]
        seen = f" (peers see us as {', '.join(self.seen_as)})" if self.seen_as else ""
        return "; ".join(parts) + seen if parts else "no addresses"


def _tcp_endpoint(addr: str) -> tuple[str, int] | None:
    parts = addr.split("/")
    if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
        try:
            return parts[2], int(parts[4])
        except ValueError:
            return None
    return None


def is_loopback(addr: str) -> bool:
    """True for ``/ip4/127.x.x.x/...`` and ``/ip6/::1/...`` addresses."""
    return addr.startswith("/ip4/127.") or addr.startswith("/ip6/::1/")


def classify(addrs: Sequence[str], answers: Sequence[Answer]) -> dict[str, str]:
    """Each of ``addrs`` with its kind, from the peers' ``answers`` (rules in the module doc)."""
    kinds: dict[str, str] = {}
    seen = [a for a in answers if a.seen]
    for addr in addrs:
        if is_circuit(addr):
            kinds[addr] = RELAYED
            continue
        endpoint = _tcp_endpoint(addr)
        if endpoint is None or not seen:
            kinds[addr] = UNKNOWN
            continue
        ip, port = endpoint
        wildcard = ip in _WILDCARDS
        translated = [a for a in seen if not wildcard and a.seen != ip]
        dialled = [a for a in seen if port in a.open_ports]
        if dialled and not translated:
            kinds[addr] = PUBLIC
        elif translated:
            kinds[addr] = NATED
        else:
            kinds[addr] = FIREWALLED
    return kinds


# -- wire format --------------------------------------------------------------------------


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data, raw=False, strict_map_key=True, max_str_len=64, max_bin_len=0,
        max_ext_len=0, max_array_len=MAX_PORTS, max_map_len=4,
    )  # fmt: skip


def encode_request(ports: Sequence[int]) -> bytes:
    return msgpack.packb({"ports": list(ports)[:MAX_PORTS]})


def decode_request(data: bytes) -> list[int] | None:
    try:
        message = _unpack(data)
    except Exception:  # msgpack raises many types for hostile input
        return None
    if not isinstance(message, dict) or set(message) != {"ports"}:
        return None
    ports = message["ports"]
    if not isinstance(ports, list) or not 1 <= len(ports) <= MAX_PORTS:
        return None  # the spec's 1-4 ports: an empty request asks nothing worth a dial
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        return None
    return ports


def encode_reply(seen: str, opened: Sequence[bool], public: bool, relay: bool) -> bytes:
    return msgpack.packb({"seen": seen, "open": list(opened), "public": public, "relay": relay})


def decode_reply(data: bytes, peer_id: str, ports: Sequence[int]) -> Answer | None:
    try:
        message = _unpack(data)
    except Exception:
        return None
    if not isinstance(message, dict) or set(message) != {"seen", "open", "public", "relay"}:
        return None
    seen, opened = message["seen"], message["open"]
    if not isinstance(seen, str) or not isinstance(opened, list) or len(opened) != len(ports):
        return None
    if not all(isinstance(flag, bool) for flag in [*opened, message["public"], message["relay"]]):
        return None
    open_ports = frozenset(port for port, flag in zip(ports, opened, strict=True) if flag)
    return Answer(peer_id, seen, open_ports, message["public"], message["relay"])


# -- both ends ----------------------------------------------------------------------------


async def _dial_back(ip: str, port: int) -> bool:
    with trio.move_on_after(DIALBACK_TIMEOUT_S):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


def serve_reachability(transport: Transport, state: Reachability, read_timeout: float) -> None:
    """Answer reach requests: the IP we see, and whether its ports take a fresh connection."""
    budget = PeerRateLimiter(DIALBACKS_PER_IP_PER_MIN / 60.0, DIALBACKS_PER_IP_PER_MIN)
    refused = transport.stream_errors

    async def handle(peer_id: str, payload: bytes) -> bytes | None:
        ports = decode_request(payload)
        if ports is None:
            refused["reach-malformed"] += 1
            return None
        ip = None if transport.relayed_via(peer_id) else transport.remote_ip(peer_id)
        now = trio.current_time()
        if ip is None or not budget.allows(ip, 1, now):
            return encode_reply("", [False] * len(ports), state.public, state.serve_relay)
        budget.charge(ip, 1, now)
        opened = [False] * len(ports)

        async def dial(index: int) -> None:
            opened[index] = await _dial_back(ip, ports[index])

        # Concurrently: the answer is due within the asker's deadline, whatever the ports.
        async with trio.open_nursery() as nursery:
            for index in range(len(ports)):
                nursery.start_soon(dial, index)
        return encode_reply(ip, opened, state.public, state.serve_relay)

    transport.set_handler(REACH_PROTOCOL, handle, MAX_REQUEST_BYTES, read_timeout)


async def ask(transport: Transport, peer_id: str, ports: Sequence[int], timeout: float) -> Answer:
    """One peer's view of us; TransportError if it cannot answer, ValueError if malformed."""
    reply = await transport.request(
        peer_id, REACH_PROTOCOL, encode_request(ports), timeout, MAX_REPLY_BYTES
    )
    answer = decode_reply(reply, peer_id, ports)
    if answer is None:
        raise ValueError(f"malformed reach reply from {peer_id}")
    return answer


async def check(
    transport: Transport, state: Reachability, ask_first: Sequence[str], timeout: float,
    rng: random.Random,
) -> list[Answer]:
    """Ask up to ASK_PEERS directly connected peers (``ask_first`` first) and update ``state``."""
    listen = transport.listen_addrs
    ports = sorted({ep[1] for ep in map(_tcp_endpoint, listen) if ep})[:MAX_PORTS]
    direct = [p for p in transport.connected_peers() if transport.relayed_via(p) is None]
    others = [p for p in direct if p not in ask_first]
    rng.shuffle(others)
    chosen = ([p for p in ask_first if p in direct] + others)[:ASK_PEERS]
    answers: list[Answer] = []

    async def one(peer_id: str) -> None:
        try:
            answers.append(await ask(transport, peer_id, ports, timeout))
        except (TransportError, ValueError) as error:
            logger.debug("reachability check with %s failed: %s", peer_id, error)

    async with trio.open_nursery() as nursery:
        for peer_id in chosen:
            nursery.start_soon(one, peer_id)
    circuits = transport.nat.circuit_addrs if transport.nat is not None else []
    seeing = [a for a in answers if a.seen]
    if seeing:
        state.kinds = classify([*listen, *circuits], seeing)
        state.seen_as = sorted({a.seen for a in seeing})
    else:
        # Nobody could look (over budget, or only relayed peers): keep what we knew.
        known = {addr: state.kinds.get(addr, UNKNOWN) for addr in listen}
        state.kinds = {**known, **{addr: RELAYED for addr in circuits}}
    return answers


def _direct_addr(transport: Transport, book: PeerBook, peer_id: str) -> str | None:
    """An address of ``peer_id`` on the IP our direct connection to it runs over."""
    ip = transport.remote_ip(peer_id)
    for addr in book.addrs(peer_id):
        if not is_circuit(addr) and address_ip(addr) == ip:
            return addr
    return None


async def _keep_relays(transport: Transport, book: PeerBook, answers: Sequence[Answer]) -> None:
    """Hold slots on up to MAX_RELAYS public relays; drop those we lost."""
    nat = transport.nat
    if nat is None:
        return
    connected = set(transport.connected_peers())
    for relay_id in list(nat.reservations):
        if relay_id not in connected:
            logger.info("lost the relay %s; looking for another", relay_id)
            nat.drop(relay_id)
            transport.unprotect(relay_id, RELAY_TAG)
    for answer in answers:
        if len(nat.reservations) >= MAX_RELAYS:
            break
        if not (answer.relay and answer.public) or answer.peer_id in nat.reservations:
            continue
        relay_addr = _direct_addr(transport, book, answer.peer_id)
        if relay_addr is None:
            continue
        try:
            reservation = await nat.reserve(relay_addr)
        except Exception as error:  # libp2p raises several types for a refused slot
            logger.info("no relay slot on %s: %s", answer.peer_id, error)
            continue
        # Our only way in: never pruned by libp2p's connection limits.
        transport.protect(answer.peer_id, RELAY_TAG)
        logger.info("reachable through the relay at %s", reservation.circuit_addr)


async def maintain(
    transport: Transport,
    book: PeerBook,
    state: Reachability,
    ask_first: Callable[[], Sequence[str]],
    announce: Callable[[str], None],
    timeout: float,
) -> None:
    """Keep ``state`` current; while no address is public, hold relay slots. Runs forever.

    ``announce`` gets one line whenever the verdict changes.
    """
    rng = random.Random()
    said = ""
    while True:
        answers = await check(transport, state, ask_first(), timeout, rng)
        if answers and not state.public:
            await _keep_relays(transport, book, answers)
            if transport.nat is not None:
                state.kinds.update({addr: RELAYED for addr in transport.nat.circuit_addrs})
        line = state.describe()
        if line != said:
            announce(f"reachability {line}")
            said = line
        holding = transport.nat is not None and len(transport.nat.reservations) > 0
        settled = state.settled and (state.public or holding)
        # Settled, look again in a while; but at once when a relay's connection drops.
        wake = trio.current_time() + (SETTLED_INTERVAL_S if settled else UNSETTLED_INTERVAL_S)
        while trio.current_time() < wake and not _lost_a_relay(transport):
            await trio.sleep(UNSETTLED_INTERVAL_S)


def _lost_a_relay(transport: Transport) -> bool:
    nat = transport.nat
    if nat is None or not nat.reservations:
        return False
    return not set(nat.reservations) <= set(transport.connected_peers())


def status_view(transport: Transport | None, state: Reachability) -> dict[str, Any]:
    """/status: our addresses by kind, our relays, and how we reach each connected peer
    (``relayed_peers``: peer -> relay; ``direct_peers``: the others)."""
    if transport is None:
        return {"addrs": {}, "relays": [], "relayed_peers": {}, "direct_peers": []}
    relayed, direct = {}, []
    for peer_id in transport.connected_peers():
        relay = transport.relayed_via(peer_id)
        if relay is not None:
            relayed[peer_id] = relay
        else:
            direct.append(peer_id)
    return {
        "addrs": dict(state.kinds),
        "seen_as": list(state.seen_as),
        "relay_service": state.serve_relay,
        "relays": sorted(transport.nat.reservations) if transport.nat else [],
        "relayed_peers": relayed,
        "direct_peers": sorted(direct),
    }
