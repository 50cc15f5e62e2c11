"""The simulated network: who is online, which messages are lost, how late each link is.

A :class:`NetworkModel` turns a graph and :class:`NetworkConditions` into one
:class:`RoundPlan` per round: the fate of every directed arc (message from
``src`` to ``dst``). It draws from its own seeded generator in a fixed order,
so a plan can be replayed node by node against :class:`gossip.pushsum.PushSum`
(``tests/test_simulator.py`` does exactly that).

Rules, the same as a real node running the gossip core:

* An offline node neither trains, sends nor receives; its state is frozen.
  Churn is drawn afresh each round: ``round(churn * n)`` nodes, uniformly.
* An online node splits its weight over *all* its graph neighbours
  (``fanout = degree``). With ``push_sample = K > 0`` it pushes instead to
  ``min(K, degree)`` of its graph out-links, chosen afresh each round
  (time-varying neighbours, as in Epidemic Learning and SGP's time-varying
  graphs), and splits over those only (``fanout = min(K, degree)``); the
  others are ``NOT_SENT``. Only graph links are ever used, so a node still
  receives only from its graph in-neighbours. The choice draws from its own
  generator seeded by (seed, round), never from the loss and churn stream,
  so a plan with ``K >= degree`` is today's plan exactly.
  A send to an offline neighbour fails at connection
  time, the sender knows it, and takes the share back (``REFUNDED``): no mass
  is lost.
* A message that was sent can be lost in transit with probability ``loss``
  (``LOST``). The sender cannot know, so its share of mass is gone: weights
  shift a little, consensus still holds (every estimate stays a convex
  combination of models).
* Every link has a fixed delay in whole rounds, drawn once per undirected link
  uniformly from ``0..delay``. A delayed share is in flight, not lost; one
  that arrives while its receiver is offline waits for it to come back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from topologies.settings_error import SettingError

NOT_SENT = 0
DELIVERED = 1
LOST = 2
REFUNDED = 3


@dataclass(frozen=True)
class NetworkConditions:
    """Loss rate, maximum per-link delay in rounds, the fraction offline per round,
    and how many out-links each node pushes to per round (0: all of them)."""

    loss: float = 0.0
    delay: int = 0
    churn: float = 0.0
    push_sample: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.loss, float | int) and 0.0 <= self.loss < 1.0):
            raise SettingError("loss", f"must be a rate in [0, 1), got {self.loss!r}")
        if isinstance(self.delay, bool) or not isinstance(self.delay, int) or self.delay < 0:
            raise SettingError(
                "delay", f"must be a whole number of rounds >= 0, got {self.delay!r}"
            )
        if not (isinstance(self.churn, float | int) and 0.0 <= self.churn < 1.0):
            raise SettingError("churn", f"must be a fraction in [0, 1), got {self.churn!r}")
        sample = self.push_sample
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise SettingError(
                "push_sample",
                f"must be a whole number of out-links >= 0 (0: all), got {sample!r}",
            )

    @property
    def ideal(self) -> bool:
        return self.loss == 0 and self.delay == 0 and self.churn == 0 and self.push_sample == 0


@dataclass(frozen=True)
class RoundPlan:
    """What the network does in one round: online nodes, each arc's fate, and each
    node's fanout (how many shares besides its own its weight is split into)."""

    round: int
    online: np.ndarray  # bool [n]
    fate: np.ndarray  # int8 [arcs]: NOT_SENT, DELIVERED, LOST or REFUNDED
    fanout: np.ndarray  # int64 [n]: degree, or min(push_sample, degree)


class NetworkModel:
    """The arcs of a graph, their fixed delays, and a seeded source of round plans."""

    def __init__(self, graph: nx.Graph, conditions: NetworkConditions, seed: int) -> None:
        n = graph.number_of_nodes()
        if set(graph.nodes) != set(range(n)):
            raise ValueError("graph nodes must be 0..n-1")
        edges = np.array(sorted((min(u, v), max(u, v)) for u, v in graph.edges), dtype=np.int64)
        edges = edges.reshape(-1, 2)
        self.n = n
        self.conditions = conditions
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E6574]))
        link_delay = (
            self._rng.integers(0, conditions.delay + 1, size=len(edges))
            if conditions.delay
            else np.zeros(len(edges), dtype=np.int64)
        )
        # Both directions of every link, sorted by sender so that per-sender
        # reductions are contiguous.
        src = np.concatenate([edges[:, 0], edges[:, 1]])
        dst = np.concatenate([edges[:, 1], edges[:, 0]])
        delay = np.concatenate([link_delay, link_delay])
        order = np.lexsort((dst, src))
        self.src, self.dst, self.delay = src[order], dst[order], delay[order].astype(np.int64)
        self.degree = np.bincount(self.src, minlength=n).astype(np.int64)
        if (self.degree == 0).any():
            raise ValueError("every node needs at least one neighbour: the graph is disconnected")
        self._offline_count = int(round(conditions.churn * n))
        self._seed = seed
        sample = conditions.push_sample
        self._sampled = bool(sample) and bool((self.degree > sample).any())
        self.fanout = np.minimum(self.degree, sample) if sample else self.degree
        self._first_arc = np.concatenate([[0], np.cumsum(self.degree)[:-1]])

    @property
    def num_arcs(self) -> int:
        return len(self.src)

    def plan(self, round_index: int) -> RoundPlan:
        """Draw the next round. Call once per round, in order: draws are sequential."""
        online = np.ones(self.n, dtype=bool)
        if self._offline_count:
            online[self._rng.choice(self.n, size=self._offline_count, replace=False)] = False
        sender_on = online[self.src]
        if self._sampled:
            sender_on = sender_on & self.chosen(round_index)
        receiver_on = online[self.dst]
        fate = np.full(self.num_arcs, NOT_SENT, dtype=np.int8)
        fate[sender_on & ~receiver_on] = REFUNDED
        sent = sender_on & receiver_on
        fate[sent] = DELIVERED
        if self.conditions.loss:
            lost = sent & (self._rng.random(self.num_arcs) < self.conditions.loss)
            fate[lost] = LOST
        return RoundPlan(round_index, online, fate, self.fanout)

    def chosen(self, round_index: int) -> np.ndarray:
        """The arcs each node pushes on in round ``round_index``: all of them without
        ``push_sample``, else ``min(push_sample, degree)`` of each sender's, uniformly.

        Each arc gets a random key from a generator seeded by (seed, round); a
        sender takes its arcs with the smallest keys. Any round can be drawn
        again, in any order, with the same result.
        """
        if not self._sampled:
            return np.ones(self.num_arcs, dtype=bool)
        rng = np.random.default_rng(np.random.SeedSequence([self._seed, 0x73616D70, round_index]))
        keys = rng.random(self.num_arcs)
        order = np.lexsort((keys, self.src))  # by sender, then key
        rank = np.empty(self.num_arcs, dtype=np.int64)
        rank[order] = np.arange(self.num_arcs) - self._first_arc[self.src[order]]
        return rank < self.conditions.push_sample


def message_bytes(parameter_shapes: dict[str, tuple[int, ...]], codec: str = "raw") -> int:
    """Exact size of one update on the wire, as the gossip codec encodes it.

    Encodes one real signed update (float32 tensors, tensor codec ``codec``)
    for the model's layout: the 73-byte prefix (magic, version, ed25519
    signature, header length), the msgpack header (sender key, seq, weight,
    fingerprint, codec id, tensor names and shapes) and each tensor's payload
    (4 bytes per parameter for ``raw``). Every codec's payload size depends
    only on the shapes, so this is exact for any message of the run. libp2p's
    own framing (yamux 12 bytes and Noise 16 bytes per frame of at most 64 KiB)
    is not counted.
    """
    from gossip import codec as codec_module
    from gossip.keys import NodeKey
    from gossip.layout import ModelLayout
    from gossip.update import Update

    tensors = {name: np.zeros(shape, dtype=np.float32) for name, shape in parameter_shapes.items()}
    layout = ModelLayout.of(tensors)
    key = NodeKey.generate()
    # Large seq and non-round floats so msgpack picks its widest encodings.
    update = Update(
        sender=key.public_key,
        seq=2**40,
        samples=2**20,
        weight=math.pi,
        fingerprint=layout.fingerprint,
        created_at=1.7e9 + math.pi,
        tensors=tensors,
        codec=codec,
    )
    return len(codec_module.encode(update, key))
