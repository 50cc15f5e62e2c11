"""Peer-exchange attacks from the issue, at small scale, on real libp2p hosts over 127.0.0.1.

A liar answers peer-exchange requests with fresh fake peer ids (valid ed25519 ids
nobody holds). Its fakes may point at a third party: a TCP listener here that counts
the connections it gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from runtimes import make_runtime, wait_until

from fltasks import load_task
from gossip.keys import NodeKey
from p2pfl.neighbours import choose_neighbours
from p2pfl.peer_exchange import (
    MAX_PEERS_PER_REPLY,
    PEERS_PROTOCOL,
    PeerBook,
    discovery_round,
    encode_reply,
    exchange_peers,
    serve_peer_exchange,
)
from p2pfl.transport import DIALS_PER_ADDRESS_PER_MIN, Transport

pytestmark = pytest.mark.integration

TIMEOUT_S = 5.0
FLOOD_REPLIES = 17


@asynccontextmanager
async def nodes(count: int) -> AsyncIterator[list[tuple[Transport, PeerBook]]]:
    async with trio.open_nursery() as nursery:
        opened: list[tuple[Transport, PeerBook]] = []
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            async with Transport.open(NodeKey.generate()) as node:
                book = PeerBook(node.peer_id, max_peers=64)
                serve_peer_exchange(node, book, read_timeout=TIMEOUT_S)
                opened.append((node, book))
                task_status.started()
                await done.wait()

        for _ in range(count):
            await nursery.start(run)
        yield opened
        done.set()


@asynccontextmanager
async def third_party() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP listener that counts and drops connections; yields (port, [count])."""
    accepted = [0]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def drop(stream: trio.SocketStream) -> None:
        accepted[0] += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, drop, listeners)
        yield listeners[0].socket.getsockname()[1], accepted
        nursery.cancel_scope.cancel()


def serve_lies(
    liar: Transport,
    fake_addr: str,
    named: dict[str, list[str]] | None = None,
    fakes: int = MAX_PEERS_PER_REPLY,
) -> None:
    """Answer every peer-exchange request with ``named`` peers at the addresses given,
    filled up to ``fakes`` entries with fresh fake ids at ``fake_addr``."""

    async def lie(peer_id: str, payload: bytes) -> bytes:
        peers = list((named or {}).items())
        while len(peers) < fakes:
            fake = NodeKey.generate().peer_id
            peers.append((fake, [f"{fake_addr}/p2p/{fake}"]))
        return encode_reply(peers)

    liar.set_handler(PEERS_PROTOCOL, lie, 4096, TIMEOUT_S)


async def meet(node: Transport, book: PeerBook, other: Transport) -> None:
    await node.connect(other.addrs[0], TIMEOUT_S)
    await exchange_peers(node, other.peer_id, book, TIMEOUT_S)


async def test_a_flood_of_fake_ids_leaves_the_honest_neighbours_in_place() -> None:
    async with nodes(4) as [(target, book), (h1, h1_book), (h2, h2_book), (liar, _)]:
        await meet(h1, h1_book, target)
        await meet(h2, h2_book, target)
        serve_lies(liar, "/ip4/127.0.0.1/tcp/9")
        await target.connect(liar.addrs[0], TIMEOUT_S)
        for _ in range(FLOOD_REPLIES):
            await exchange_peers(target, liar.peer_id, book, TIMEOUT_S)
        assert {h1.peer_id, h2.peer_id} <= set(book.known())
        # Only the liar's quota of its fakes got in, and none is a neighbour candidate.
        assert len(book.second_hand()) <= book.per_source_quota
        neighbours = choose_neighbours(target.peer_id, book.known(), 4)
        assert {h1.peer_id, h2.peer_id} <= set(neighbours)


async def test_fakes_pointing_at_a_third_party_are_dialled_at_most_the_budget() -> None:
    async with third_party() as (port, accepted), nodes(3) as [
        (target, book),
        (honest, honest_book),
        (liar, _),
    ]:
        serve_lies(liar, f"/ip4/127.0.0.1/tcp/{port}")
        await meet(target, book, liar)
        await meet(honest, honest_book, target)
        for _ in range(20):
            await exchange_peers(target, liar.peer_id, book, TIMEOUT_S)
            await discovery_round(target, book, fanout=3, timeout=TIMEOUT_S)
        print(f"third party got {accepted[0]} connections; {target.dials_deferred} dials held back")
        assert target.dials_deferred > 0
        assert 1 <= accepted[0] <= DIALS_PER_ADDRESS_PER_MIN
        # The target passes none of them on: the honest node learns no fake.
        await exchange_peers(honest, target.peer_id, honest_book, TIMEOUT_S)
        assert set(honest_book.known()) | set(honest_book.second_hand()) <= {
            target.peer_id,
            liar.peer_id,
        }


async def test_bogus_addresses_for_a_real_peer_do_not_displace_its_real_one() -> None:
    async with nodes(3) as [(target, book), (member, member_book), (liar, _)]:
        await meet(member, member_book, target)
        real = book.addrs(member.peer_id)
        assert real and all(addr in member.addrs for addr in real)
        bogus = [f"/ip4/127.0.0.{i}/tcp/9/p2p/{member.peer_id}" for i in range(2, 10)]
        serve_lies(liar, "/ip4/127.0.0.1/tcp/9", named={member.peer_id: bogus}, fakes=0)
        await meet(target, book, liar)
        assert book.addrs(member.peer_id) == real
        # A peer known only second-hand gets at most two of the liar's addresses, and
        # the peer's own word replaces them.
        async with nodes(1) as [(late, late_book)]:
            bogus = [f"/ip4/127.0.0.{i}/tcp/9/p2p/{late.peer_id}" for i in range(2, 10)]
            serve_lies(liar, "/ip4/127.0.0.1/tcp/9", named={late.peer_id: bogus}, fakes=0)
            await exchange_peers(target, liar.peer_id, book, TIMEOUT_S)
            assert len(book.addrs(late.peer_id)) == 2
            await meet(late, late_book, target)
            await wait_until(lambda: book.addrs(late.peer_id) == late.addrs)


async def test_a_daemon_fed_fakes_keeps_its_honest_neighbours_and_reflects_nothing(
    tmp_path: Path,
) -> None:
    """The same flood against a real daemon (in-process, no allowlist): its own discovery
    loop asks the liar, gets fakes at a third party's address, and tries to dial them."""
    daemon = make_runtime(load_task("digits"), tmp_path / "daemon", "0/1", min_neighbours=100)
    async with third_party() as (port, accepted), trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        transport = daemon.transport
        assert transport is not None
        async with nodes(3) as [(h1, h1_book), (h2, h2_book), (liar, liar_book)]:
            serve_lies(liar, f"/ip4/127.0.0.1/tcp/{port}")
            for node, book in ((h1, h1_book), (h2, h2_book), (liar, liar_book)):
                await meet(node, book, transport)
            # Its discovery loop (every 2 s) has asked the liar and gone through the
            # third party's dial budget.
            await wait_until(lambda: transport.dials_deferred >= 3, 60, "dials held back")
            assert 1 <= accepted[0] <= DIALS_PER_ADDRESS_PER_MIN
            honest = {h1.peer_id, h2.peer_id}
            assert honest <= set(daemon.policy.book.known())
            own, known = daemon.key.peer_id, daemon.policy.book.known()
            chosen = choose_neighbours(own, known, daemon.config.degree)
            assert honest <= set(chosen)
            assert daemon.status()["known_peers"] == 3
        nursery.cancel_scope.cancel()
