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

from gossip.keys import NodeKey
from p2pfl.neighbors import choose_neighbors, long_link_count, ring_position
from p2pfl.peer_exchange import PeerBook, discovery_round, exchange_peers, serve_peer_exchange
from p2pfl.transport import Transport

NODES = 20
K = 4
DISCOVERY_ROUNDS = 3
FANOUT = 3
TIMEOUT_S = 5.0
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
    with trio.fail_after(60):
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
                first = await node.connect(nodes[0].addrs[0], TIMEOUT_S)
                await exchange_peers(node, first, book, TIMEOUT_S)

            async with trio.open_nursery() as nursery:
                for node, book in zip(nodes[1:], books[1:], strict=True):
                    nursery.start_soon(join, node, book)
            for _ in range(DISCOVERY_ROUNDS):
                async with trio.open_nursery() as nursery:
                    for node, book in zip(nodes, books, strict=True):
                        nursery.start_soon(discovery_round, node, book, FANOUT, TIMEOUT_S)
            known = {node.peer_id: book.known() for node, book in zip(nodes, books, strict=True)}
            done.set()
    chosen = {
        peer_id: choose_neighbors(peer_id, known[peer_id], K, random.Random(i))
        for i, peer_id in enumerate(known)
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
    degrees = dict(overlay.graph().to_undirected().degree())
    assert max(degrees.values()) <= 2 * K, sorted(degrees.values())


def test_each_node_chooses_k_distinct_known_peers(overlay: Overlay) -> None:
    for peer_id, chosen in overlay.chosen.items():
        assert len(chosen) == len(set(chosen)) == K
        assert peer_id not in chosen
        assert set(chosen) <= set(overlay.known[peer_id])


# Measured over 2000 random key sets (N=20, K=4, every node knowing every other): the
# largest undirected degree was 9-12 in 15% of them; at N=200 in 97%. The near part
# alone stays at 4, but each node's long link is uniform, so a node's incoming long
# links are ~Poisson(1) with no cap, and nothing bounds the total by 2K.
@pytest.mark.xfail(
    strict=True,
    reason="design: random long links have unbounded in-degree; undirected degree > 2K "
    "for ~15% of 20-node key sets (see comment)",
)
def test_degree_bound_holds_for_arbitrary_keys() -> None:
    worst = []
    for trial in range(200):
        rng = random.Random(trial)
        ids = [NodeKey(rng.randbytes(32)).peer_id for _ in range(NODES)]
        graph = nx.Graph()
        for i, peer_id in enumerate(ids):
            for peer in choose_neighbors(peer_id, ids, K, random.Random(trial * NODES + i)):
                graph.add_edge(peer_id, peer)
        worst.append(max(d for _, d in graph.degree()))
    assert max(worst) <= 2 * K, f"{sum(w > 2 * K for w in worst)}/200 key sets exceed 2K"


# -- choose_neighbors, without the network --------------------------------------------------


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
    chosen = choose_neighbors(own, known + known[:3], degree, random.Random(seed))
    assert len(chosen) == len(set(chosen)) == min(degree, count)
    assert own not in chosen
    assert set(chosen) <= set(known)


def test_near_part_is_the_ring_neighbours_whatever_the_rng() -> None:
    ids = peer_ids(30)
    own, known = ids[0], ids[1:]
    ring = sorted(known, key=ring_position)
    after = [p for p in ring if ring_position(p) > ring_position(own)]
    before = [p for p in ring if ring_position(p) <= ring_position(own)]
    successors = after + before
    predecessors = successors[::-1]
    near = K - long_link_count(K)
    expected = [successors[0], predecessors[0], successors[1]][:near]
    for seed in range(10):
        assert choose_neighbors(own, known, K, random.Random(seed))[:near] == expected


def test_long_links_vary_with_the_rng() -> None:
    ids = peer_ids(30)
    near = K - long_link_count(K)
    links = {
        tuple(choose_neighbors(ids[0], ids[1:], K, random.Random(s))[near:]) for s in range(20)
    }
    assert len(links) > 1


def test_long_links_are_kept_while_known() -> None:
    ids = peer_ids(30)
    own, known = ids[0], ids[1:]
    first = choose_neighbors(own, known, K, random.Random(1))
    for seed in range(2, 12):
        again = choose_neighbors(own, known, K, random.Random(seed), keep=first)
        assert again == first


def test_a_forgotten_long_link_is_replaced() -> None:
    ids = peer_ids(30)
    own, known = ids[0], ids[1:]
    near = K - long_link_count(K)
    first = choose_neighbors(own, known, K, random.Random(1))
    gone = first[near]
    still_known = [p for p in known if p != gone]
    again = choose_neighbors(own, still_known, K, random.Random(2), keep=first)
    assert gone not in again
    assert len(again) == K
    assert again[:near] == first[:near]


def test_a_kept_near_peer_is_not_counted_twice() -> None:
    ids = peer_ids(30)
    own, known = ids[0], ids[1:]
    first = choose_neighbors(own, known, K, random.Random(1))
    again = choose_neighbors(own, known, K, random.Random(1), keep=first[:2])
    assert len(again) == len(set(again)) == K
