"""A tiny test-only harness: real GossipNodes on a graph, exchanging real signed bytes.

Two drivers, both deterministic given a numpy Generator:

* :func:`synchronous_round`: every node prepares one message for all its
  neighbours, every message is delivered, every node merges.
* :class:`EventSimulation`: no rounds. Each node wakes on its own random
  period, merges what it received, and pushes to its neighbours; each message
  arrives after a random per-link delay, so messages from different senders
  arrive in random order. A message to a dead node fails at its delivery time
  and the sender refunds its share, as the daemon does after a failed dial.

Time is simulated and passed in as ``now``: the gossip core never reads a clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from gossip import Accepted, AdmissionPolicy, GossipNode, NodeKey, Outgoing
from gossip.layout import ModelLayout

START = 1_700_000_000.0


def node_key(index: int) -> NodeKey:
    """A fixed key per node index, so runs are reproducible."""
    return NodeKey(index.to_bytes(4, "big") + bytes(28))


@dataclass
class Network:
    graph: nx.Graph
    nodes: dict[int, GossipNode]
    initial: dict[int, np.ndarray]
    samples: dict[int, int]

    def weighted_mean(self, members: Iterable[int] | None = None) -> np.ndarray:
        members = list(self.graph.nodes if members is None else members)
        weights = np.array([self.samples[i] for i in members], dtype=np.float64)
        values = np.stack([self.initial[i] for i in members])
        return (weights[:, None] * values).sum(axis=0) / weights.sum()

    def max_relative_error(self, target: np.ndarray, members: Iterable[int] | None = None) -> float:
        members = self.graph.nodes if members is None else members
        scale = np.linalg.norm(target)
        return max(float(np.linalg.norm(self.nodes[i].estimate - target) / scale) for i in members)

    def total_weight(self) -> float:
        return sum(node.pushsum.weight for node in self.nodes.values())

    def total_mass(self) -> np.ndarray:
        return sum(node.pushsum.mass for node in self.nodes.values())


def build_network(
    graph: nx.Graph, dim: int, rng: np.random.Generator, max_samples: int = 1000
) -> Network:
    """One GossipNode per graph node, each with a random vector and a random sample count."""
    nodes, initial, samples = {}, {}, {}
    template = {"v": np.zeros(dim)}
    policy = AdmissionPolicy(fingerprint=ModelLayout.of(template).fingerprint)
    for i in graph.nodes:
        # Offset from zero so that the mean is not tiny and relative error is meaningful.
        initial[i] = rng.normal(loc=1.0, scale=1.0, size=dim)
        samples[i] = int(rng.integers(1, max_samples + 1))
        nodes[i] = GossipNode.create(node_key(i), {"v": initial[i]}, samples[i], policy)
    return Network(graph, nodes, initial, samples)


def synchronous_round(network: Network, now: float, rng: np.random.Generator) -> None:
    """Everyone pushes to all neighbours (in a random order), then everyone merges."""
    order = rng.permutation(list(network.graph.nodes))
    deliveries = []
    for i in order:
        neighbours = list(network.graph.neighbors(i))
        outgoing = network.nodes[i].prepare(len(neighbours), now)
        deliveries.extend((i, j, outgoing) for j in neighbours)
    for index in rng.permutation(len(deliveries)):
        i, j, outgoing = deliveries[index]
        verdict = network.nodes[j].receive(outgoing.message, now, network.nodes[i].key.public_key)
        assert isinstance(verdict, Accepted), verdict
    for node in network.nodes.values():
        node.merge()


@dataclass(order=True)
class _Event:
    time: float
    order: int
    kind: str = field(compare=False)
    source: int = field(compare=False)
    target: int = field(default=-1, compare=False)
    outgoing: Outgoing | None = field(default=None, compare=False)


class EventSimulation:
    """Asynchronous gossip with random wake-ups, random per-link delays and dead nodes."""

    def __init__(
        self,
        network: Network,
        rng: np.random.Generator,
        period: tuple[float, float] = (0.5, 1.5),
        delay: tuple[float, float] = (0.0, 3.0),
        dead: Iterable[int] = (),
        slow: dict[int, float] | None = None,
    ) -> None:
        self.network = network
        self.rng = rng
        self.period = period
        self.delay = delay
        self.dead = set(dead)
        self.slow = slow or {}
        self.now = START
        self.refunds = 0
        self.delivered = 0
        self._events: list[_Event] = []
        self._counter = itertools.count()
        self._link_clear: dict[tuple[int, int], float] = {}
        self._waking = True
        for i in network.graph.nodes:
            self._push(START + rng.uniform(0, period[1]), "wake", i)

    def _push(self, time: float, kind: str, source: int, target: int = -1, outgoing=None) -> None:
        heapq.heappush(
            self._events, _Event(time, next(self._counter), kind, source, target, outgoing)
        )

    def kill(self, index: int) -> None:
        """From now on ``index`` neither sends nor receives; what it held is gone."""
        self.dead.add(index)

    def run_until(self, until: float) -> None:
        while self._events and self._events[0].time <= until:
            event = heapq.heappop(self._events)
            self.now = event.time
            if event.kind == "wake":
                self._wake(event.source)
            else:
                self._deliver(event)
        self.now = max(self.now, until)

    def drain(self) -> None:
        """Stop all wake-ups, deliver every message in flight, and merge every inbox."""
        self._waking = False
        self.run_until(float("inf"))
        for i, node in self.network.nodes.items():
            if i not in self.dead:
                node.merge()

    def _wake(self, i: int) -> None:
        if not self._waking or i in self.dead:
            return
        node = self.network.nodes[i]
        node.merge()
        neighbours = list(self.network.graph.neighbors(i))
        outgoing = node.prepare(len(neighbours), self.now)
        for j in neighbours:
            # Per-link FIFO, as on one libp2p stream: a message never overtakes an
            # earlier one on the same link. This is required, not a convenience:
            # sequence numbers only increase, so an older message arriving after a
            # newer one from the same sender is rejected as a replay, and its
            # share of the mass would be lost. Different links do reorder freely.
            arrival = max(
                self.now + self.rng.uniform(*self.delay), self._link_clear.get((i, j), -np.inf)
            )
            self._link_clear[(i, j)] = arrival
            self._push(arrival, "deliver", i, j, outgoing)
        low, high = self.period
        self._push(self.now + self.rng.uniform(low, high) * self.slow.get(i, 1.0), "wake", i)

    def _deliver(self, event: _Event) -> None:
        assert event.outgoing is not None
        sender = self.network.nodes[event.source]
        if event.target in self.dead:
            sender.refund(event.outgoing)  # the dial failed: take the share back
            self.refunds += 1
            return
        verdict = self.network.nodes[event.target].receive(
            event.outgoing.message, self.now, sender.key.public_key
        )
        assert isinstance(verdict, Accepted), verdict
        self.delivered += 1
