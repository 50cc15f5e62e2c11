"""The gossip overlay: 20 real libp2p nodes discover each other and choose neighbours.

One module fixture runs the live network once (20 ``Transport``s on 127.0.0.1 in one
trio run, all bootstrapping from node 0, then discovery rounds) and records what each
node knows and chooses; the tests below each check one property of that overlay.
The keys are seeded so the overlay, and so the degree check, are reproducible; how the
degree bound fares over arbitrary keys is measured separately, without the network.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import networkx as nx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from runtimes import with_retries

from gossip.keys import NodeKey
from p2pfl.neighbours import (
    choose_neighbours,
    in_neighbours,
    long_link_count,
    ring_position,
)
from p2pfl.peer_exchange import PeerBook, discovery_round, exchange_peers, serve_peer_exchange
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration

NODES = 20
K = 4
# Discovery runs until every node knows every other first-hand, for at most this
# many rounds: second-hand entries count as known once dialled, and on a loaded
# machine a timed-out exchange costs a round; a count, not a clock, ends the loop.
MAX_DISCOVERY_ROUNDS = 100  # 30 ran out at a load of 20-30 on 2 cores
FANOUT = 3
# Generous: 20 hosts share one event loop, and on a loaded machine an exchange can take
# many seconds; a timed-out exchange costs a node first-hand knowledge of that peer, and
# a timed-out join fails the fixture.
TIMEOUT_S = 60.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def seeded_key(tag: str, index: int) -> NodeKey:
    return NodeKey(hashlib.sha256(f"{tag}-{index}".encode()).digest())


@dataclass(frozen=True)
class Overlay:
    peer_ids: list[str]
    known: dict[str, list[str]]
    chosen: dict[str, list[str]]

    def graph(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        graph.add_nodes_from(self.peer_ids)
        graph.add_edges_from((node, peer) for node, peers in self.chosen.items() for peer in peers)
        return graph


async def _run_transport(
    key: NodeKey, opened: list[Transport | None], index: int, done: trio.Event, task_status: Any
) -> None:
    async with Transport.open(key, [LOOPBACK]) as transport:
        opened[index] = transport
        task_status.started()
        await done.wait()


async def _build_overlay() -> Overlay:
    with trio.fail_after(1800):  # a guard against a hang, not a claim about speed
        async with trio.open_nursery() as hosts:
            # Each host in its own task so that all close at once: libp2p spends 0.2 s per
            # open connection in host.close(), one connection after another.
            done = trio.Event()
            opened: list[Transport | None] = [None] * NODES
            for i in range(NODES):
                key = seeded_key("p2pfl-overlay", i)
                await hosts.start(_run_transport, key, opened, i, done)
            nodes = [node for node in opened if node is not None]
            books = [PeerBook(node.peer_id, rng=random.Random(i)) for i, node in enumerate(nodes)]
            for node, book in zip(nodes, books, strict=True):
                serve_peer_exchange(node, book, read_timeout=TIMEOUT_S)

            async def join(node: Transport, book: PeerBook) -> None:
                async def once() -> None:
                    first = await node.connect(nodes[0].addrs[0], TIMEOUT_S)
                    await exchange_peers(node, first, book, TIMEOUT_S)

                # 19 joins at once from one address: node 0's handshake limits refuse some.
                await with_retries(once, what=f"{node.peer_id} joining")

            async with trio.open_nursery() as nursery:
                for node, book in zip(nodes[1:], books[1:], strict=True):
                    nursery.start_soon(join, node, book)
            for _ in range(MAX_DISCOVERY_ROUNDS):
                if all(len(book.known()) == NODES - 1 for book in books):
                    break
                async with trio.open_nursery() as nursery:
                    for node, book in zip(nodes, books, strict=True):
                        nursery.start_soon(discovery_round, node, book, FANOUT, TIMEOUT_S)
            known = {node.peer_id: book.known() for node, book in zip(nodes, books, strict=True)}
            done.set()
    chosen = {
        peer_id: choose_neighbours(peer_id, known[peer_id], K)
        for peer_id in known
    }
    return Overlay(list(known), known, chosen)


@pytest.fixture(scope="module")
def overlay() -> Overlay:
    return trio.run(_build_overlay)


def test_overlay_is_strongly_connected(overlay: Overlay) -> None:
    assert nx.is_strongly_connected(overlay.graph())


def test_every_node_knows_at_least_half_the_network(overlay: Overlay) -> None:
    counts = {peer_id: len(known) for peer_id, known in overlay.known.items()}
    assert min(counts.values()) >= 10, counts


def test_no_node_has_more_than_2k_gossip_neighbours(overlay: Overlay) -> None:
    # The bound holds for full views; with partial ones it says nothing about the rule.
    assert all(len(known) == NODES - 1 for known in overlay.known.values()), "discovery"
    degrees = dict(overlay.graph().to_undirected().degree())
    assert max(degrees.values()) <= 2 * K, sorted(degrees.values())


def test_each_node_chooses_k_distinct_known_peers(overlay: Overlay) -> None:
    for peer_id, chosen in overlay.chosen.items():
        assert len(chosen) == len(set(chosen)) == K
        assert peer_id not in chosen
        assert set(chosen) <= set(overlay.known[peer_id])


def test_degree_bound_holds_for_arbitrary_keys() -> None:
    # Long links use rank offsets that every node draws alike, so incoming long
    # links equal outgoing ones; uniformly random links broke 2K in 15% of key sets.
    worst = []
    for trial in range(200):
        rng = random.Random(trial)
        ids = [NodeKey(rng.randbytes(32)).peer_id for _ in range(NODES)]
        graph = nx.DiGraph()
        for peer_id in ids:
            for peer in choose_neighbours(peer_id, ids, K):
                graph.add_edge(peer_id, peer)
        assert nx.is_strongly_connected(graph)
        worst.append(max(d for _, d in graph.to_undirected().degree()))
    assert max(worst) <= 2 * K, f"{sum(w > 2 * K for w in worst)}/200 key sets exceed 2K"


def test_degree_bound_holds_at_200_nodes_with_degree_8() -> None:
    ids = peer_ids(200, seed=7)
    graph = nx.DiGraph()
    for peer_id in ids:
        for peer in choose_neighbours(peer_id, ids, 8):
            graph.add_edge(peer_id, peer)
    assert nx.is_strongly_connected(graph)
    assert max(d for _, d in graph.to_undirected().degree()) <= 16


# -- choose_neighbours, without the network --------------------------------------------------


def peer_ids(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [NodeKey(rng.randbytes(32)).peer_id for _ in range(count)]


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=40),
    degree=st.integers(min_value=1, max_value=10),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_returns_at_most_k_distinct_peers_excluding_self(
    count: int, degree: int, seed: int
) -> None:
    ids = peer_ids(count + 1, seed)
    own, known = ids[0], ids  # own id included on purpose, and duplicates too
    chosen = choose_neighbours(own, known + known[:3], degree)
    assert len(chosen) == len(set(chosen)) == min(degree, count)
    assert own not in chosen
    assert set(chosen) <= set(known)


def test_near_part_is_the_ring_neighbours() -> None:
    ids = peer_ids(30)
    own, known = ids[0], ids[1:]
    ring = sorted(known, key=ring_position)
    after = [p for p in ring if ring_position(p) > ring_position(own)]
    before = [p for p in ring if ring_position(p) <= ring_position(own)]
    successors = after + before
    predecessors = successors[::-1]
    near = K - long_link_count(K)
    expected = [successors[0], predecessors[0], successors[1]][:near]
    assert choose_neighbours(own, known, K)[:near] == expected


def test_long_links_change_with_the_membership() -> None:
    ids = peer_ids(60)
    near = K - long_link_count(K)
    links = {tuple(choose_neighbours(ids[0], ids[1 : 30 + extra], K)[near:]) for extra in range(20)}
    assert len(links) > 1


def test_the_same_knowledge_gives_the_same_choice() -> None:
    ids = peer_ids(30)
    assert choose_neighbours(ids[0], ids[1:], K) == choose_neighbours(ids[0], ids[:0:-1], K)


def test_a_forgotten_neighbour_is_replaced() -> None:
    ids = peer_ids(30)
    own, known = ids[0], ids[1:]
    first = choose_neighbours(own, known, K)
    gone = first[-1]
    again = choose_neighbours(own, [p for p in known if p != gone], K)
    assert gone not in again
    assert len(again) == K


@pytest.mark.parametrize(("size", "degree"), [(3, 4), (6, 4), (9, 4), (16, 6), (40, 4), (40, 8)])
def test_in_neighbours_are_exactly_the_peers_that_choose_us(size: int, degree: int) -> None:
    ids = [NodeKey(bytes([size, degree, i]) + bytes(29)).peer_id for i in range(size)]
    for own in ids:
        choosers = {
            peer for peer in ids if peer != own and own in choose_neighbours(peer, ids, degree)
        }
        assert set(in_neighbours(own, ids, degree)) == choosers
        assert len(in_neighbours(own, ids, degree)) <= degree
