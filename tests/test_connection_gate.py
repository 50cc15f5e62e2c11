"""Connection gating on real libp2p hosts over 127.0.0.1: outsiders cannot lock a member out.

Every process here connects from 127.0.0.1, as every daemon on one machine does, so
these also prove that per-IP limits do not shut out a member sharing the
attacker's address.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from attackers import UNREACHED, UPGRADED, open_silent_tcp, open_throwaway_noise
from runtimes import GUARD_S, push_update, wait_until
from test_hostile_peer import running_daemon, signed

from fltasks import load_task
from gossip.keys import NodeKey
from p2pfl.gating import InboundGuard
from p2pfl.peer_exchange import PeerBook, exchange_peers, serve_peer_exchange
from p2pfl.runtime import model_arrays
from p2pfl.transport import Transport, TransportError

pytestmark = pytest.mark.integration

PROTOCOL = "/p2pfl/test/1.0.0"
OUTSIDER_CONNECTIONS = 400
TIMEOUT_S = 5.0


@asynccontextmanager
async def gated_node(
    members: frozenset[str] | None, **options: object
) -> AsyncIterator[tuple[Transport, list[str]]]:
    """A node serving PROTOCOL; yields it and the list of peers it got a frame from."""
    received: list[str] = []

    async def collect(peer_id: str, payload: bytes) -> None:
        received.append(peer_id)

    async with Transport.open(NodeKey.generate(), allowed_peers=members, **options) as node:
        node.set_handler(PROTOCOL, collect, 1024, TIMEOUT_S)
        yield node, received


async def deliver(member: NodeKey, node: Transport, received: list[str]) -> None:
    async with Transport.open(member) as sender:
        await sender.connect(node.addrs[0], TIMEOUT_S)
        await sender.send(node.peer_id, PROTOCOL, b"update", TIMEOUT_S)
        await wait_until(lambda: member.peer_id in received)


async def test_400_outsider_connections_then_a_member_joins_and_its_update_is_accepted(
    tmp_path: Path,
) -> None:
    """Against a real daemon (in-process NodeRuntime) with an allowlist."""
    digits = load_task("digits")
    member = NodeKey.generate()
    async with (
        running_daemon(digits, tmp_path / "node", [member.peer_id]) as (daemon, _),
        AsyncExitStack() as held,
    ):
        assert daemon.transport is not None
        node = daemon.transport
        outcomes: Counter[str] = Counter()

        async def attack() -> None:
            outcomes[await open_throwaway_noise(node.addrs[0], held)] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(OUTSIDER_CONNECTIONS):
                nursery.start_soon(attack)
        refused = node.connections_refused
        # Every connection that reached the node was cut and counted once (when its
        # handler ends): refused before Noise, cut or failed while pending, or closed
        # right after Noise. (A loaded machine may drop a few SYNs.)
        reached = OUTSIDER_CONNECTIONS - outcomes[UNREACHED]
        await wait_until(lambda: refused.total() >= reached, 300, "the counts")  # a guard
        print(f"attacker: {dict(outcomes)}; node refused: {dict(refused)}")
        assert refused.total() == reached
        assert outcomes[UPGRADED] == 0
        assert refused["not-member"] >= 1
        assert node.connected_peers() == []
        assert daemon.status()["connections_refused"] == dict(refused)
        # The attacker's connections are still open on its side. The member shares
        # their IP, so it joins once the IP may start a handshake again.
        assert node.gate is not None
        await wait_until(lambda: node.gate.guard.handshakes_available("127.0.0.1") >= 1)
        async with Transport.open(member) as sender:
            await sender.connect(node.addrs[0], TIMEOUT_S)
            # Introduced by a peer exchange, as a member joins: the daemon merges only
            # updates of peers in its book that choose it as a neighbour.
            book = PeerBook(sender.peer_id)
            serve_peer_exchange(sender, book)
            await exchange_peers(sender, node.peer_id, book, TIMEOUT_S)
            model = model_arrays(digits.make_model())
            await push_update(sender, node.peer_id, signed(member, model, 1), TIMEOUT_S)
            await wait_until(lambda: daemon.gossip.admission.accepted == 1)
        assert node.is_protected(member.peer_id)


async def test_silent_tcp_connections_cannot_hold_the_door_shut() -> None:
    """A newcomer pushes out a silent socket at once: no waiting for any age."""
    member = NodeKey.generate()
    refusals: Counter[str] = Counter()
    # The first-byte deadline is out of reach: only eviction can let the member in.
    guard = InboundGuard(refusals, max_pending_per_ip=4, first_byte_s=GUARD_S)
    async with gated_node(frozenset({member.peer_id}), guard=guard) as (node, received):
        async with AsyncExitStack() as held:
            for _ in range(4):
                await open_silent_tcp(node.addrs[0], held)
            await wait_until(lambda: guard.pending("127.0.0.1") == 4)
            await deliver(member, node, received)
            assert refusals["silent-evicted"] >= 1
            assert refusals["silent"] == 0
            assert guard.pending("127.0.0.1") <= 4
            # The silent sockets never held one of libp2p's inbound slots.
            assert node.host.get_network()._inbound_limiter.borrowed_tokens <= 1


async def test_a_silent_socket_is_cut_at_the_first_byte_deadline() -> None:
    refusals: Counter[str] = Counter()
    guard = InboundGuard(refusals, first_byte_s=0.5)
    async with gated_node(None, guard=guard) as (node, _):
        async with AsyncExitStack() as held:
            await open_silent_tcp(node.addrs[0], held)
            await wait_until(lambda: refusals["silent"] == 1)
            assert guard.pending() == 0


async def test_a_non_member_host_gets_no_connection_so_no_identify_or_ping() -> None:
    async with gated_node(frozenset({NodeKey.generate().peer_id})) as (node, _):
        async with Transport.open(NodeKey.generate()) as outsider:
            with pytest.raises(TransportError):
                await outsider.connect(node.addrs[0], TIMEOUT_S)
            assert node.connected_peers() == []
            assert node.peer_id not in outsider.connected_peers()
        assert node.connections_refused["not-member"] >= 1


async def test_closed_inbound_connections_give_back_their_swarm_slot() -> None:
    member = NodeKey.generate()
    async with gated_node(None) as (node, received):
        for _ in range(5):
            await deliver(member, node, received)
        swarm = node.host.get_network()
        # py-libp2p 0.8.1 would keep one of its 250 inbound slots per connection ever
        # accepted; the guard hands each back when its connection closes.
        await wait_until(lambda: swarm._inbound_limiter.borrowed_tokens == 0)
        assert node.connected_peers() == []


async def test_connections_per_ip_are_capped_for_unprotected_peers_only() -> None:
    async with gated_node(None, max_connections_per_ip=3) as (node, received):
        async with AsyncExitStack() as held:
            for _ in range(5):
                assert await open_throwaway_noise(node.addrs[0], held) != UNREACHED
            await wait_until(lambda: node.connections_refused["ip-connections"] == 2)
            assert len(node.connected_peers()) == 3
            friend = NodeKey.generate()
            node.protect(friend.peer_id, "test-friend")
            await deliver(friend, node, received)
            assert node.connections_refused["ip-connections"] == 2


async def test_a_secp256k1_peer_is_closed_after_noise_and_counted() -> None:
    async with gated_node(None) as (node, _):
        async with AsyncExitStack() as held:
            assert await open_throwaway_noise(node.addrs[0], held, "secp256k1") != UNREACHED
            await wait_until(lambda: node.connections_refused["unsupported-key"] == 1)
            assert node.connected_peers() == []
