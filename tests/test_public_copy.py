"""Top-k between nodes: differences to a public copy, in step or resynchronised by raw messages."""

from __future__ import annotations

import networkx as nx
import numpy as np

from gossip import GossipNode, NodeKey
from gossip import codec as wire

NOW = 1_700_000_000.0
SYNC = 5


def node(seed: int, vector: np.ndarray, codec_id: str = "topk:0.1") -> GossipNode:
    return GossipNode.create(
        NodeKey(bytes([seed]) * 32),
        {"w": vector.astype(np.float32)},
        samples=10,
        codec_id=codec_id,
        sync_every=SYNC,
    )


def drift(sender: GossipNode, rng: np.random.Generator) -> None:
    """Local training stand-in: the model moves a little every round."""
    sender.pushsum.estimate += rng.standard_normal(sender.estimate.shape) * 0.1


def test_an_in_step_receiver_holds_the_senders_copy_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    sender, receiver = node(1, rng.standard_normal(500)), node(2, np.zeros(500))
    codecs, sizes = [], []
    for _ in range(3 * SYNC):
        drift(sender, rng)
        outgoing = sender.prepare(1, NOW)
        codecs.append(wire.decode(outgoing.message).codec)
        sizes.append(len(outgoing.message))
        assert receiver.receive(outgoing.message, NOW).accepted
        held = receiver.public_copies.copies[sender.key.public_key].vector
        assert np.array_equal(held, sender.encoder.sender.copy)
        assert np.allclose(held, sender.layout.flatten(outgoing.tensors), rtol=1e-6)
    assert codecs == (["raw"] + ["topk:0.1"] * (SYNC - 1)) * 3
    assert max(sizes[1:SYNC]) < sizes[0] / 3
    assert receiver.public_copies.out_of_step == 0


def test_a_missed_difference_is_not_folded_in_until_the_next_raw_message() -> None:
    rng = np.random.default_rng(1)
    sender, receiver = node(1, rng.standard_normal(300)), node(2, np.zeros(300))
    receiver.receive(sender.prepare(1, NOW).message, NOW)  # raw: in step
    receiver.merge()
    sender.prepare(1, NOW)  # lost on the way
    before = receiver.estimate.copy()
    verdict = receiver.receive(sender.prepare(1, NOW).message, NOW)
    assert not verdict.accepted and verdict.reason.value == "out-of-step"
    assert receiver.public_copies.out_of_step == 1
    assert receiver.counters()["rejected"] == {"out-of-step": 1}
    assert receiver.merge() == 0 and np.array_equal(receiver.estimate, before)
    for _ in range(SYNC):  # the sender's next raw message puts the receiver back in step
        receiver.receive(sender.prepare(1, NOW).message, NOW)
    assert sender.key.public_key in receiver.public_copies.copies
    assert receiver.merge() == 1


def test_a_peer_out_of_step_gets_the_whole_copy_and_is_in_step_at_once() -> None:
    """What the daemon does with receipts: no periodic resync, the whole copy on demand."""
    rng = np.random.default_rng(4)
    sender = GossipNode.create(
        NodeKey(bytes([1]) * 32),
        {"w": rng.standard_normal(300).astype(np.float32)},
        samples=10,
        codec_id="topk:0.1",
        sync_every=None,
    )
    receiver = node(2, np.zeros(300))
    first = sender.prepare(1, NOW)
    assert wire.decode(first.message).codec == "raw"  # nothing to differ from yet
    assert receiver.receive(first.message, NOW).accepted
    drift(sender, rng)
    sender.prepare(1, NOW)  # lost on the way
    for _ in range(3 * SYNC):  # never a periodic whole model
        drift(sender, rng)
        outgoing = sender.prepare(1, NOW)
        assert wire.decode(outgoing.message).codec == "topk:0.1"
    whole = sender.whole(outgoing, NOW)
    assert wire.decode(whole).codec == "raw" and wire.decode(whole).seq == outgoing.seq
    assert receiver.receive(whole, NOW).accepted
    drift(sender, rng)
    following = sender.prepare(1, NOW)
    assert receiver.receive(following.message, NOW).accepted  # the difference applies
    held = receiver.public_copies.copies[sender.key.public_key].vector
    assert np.array_equal(held, sender.encoder.sender.copy)


def test_adopting_a_model_makes_the_next_message_raw() -> None:
    rng = np.random.default_rng(2)
    sender, other = node(1, rng.standard_normal(100)), node(2, rng.standard_normal(100))
    sender.prepare(1, NOW)
    assert wire.decode(sender.prepare(1, NOW).message).codec == "topk:0.1"
    sender.adopt([sender.read_snapshot(other.snapshot(NOW), other.key.public_key)])
    assert wire.decode(sender.prepare(1, NOW).message).codec == "raw"


def test_top_k_gossip_reaches_consensus_on_a_ring() -> None:
    rng = np.random.default_rng(3)
    graph = nx.cycle_graph(8)
    nodes = [node(i + 1, rng.standard_normal(200)) for i in graph]

    def spread() -> float:
        """Consensus distance: mean squared distance from the nodes' current average."""
        stack = np.stack([n.estimate for n in nodes])
        return float(np.mean(np.sum((stack - stack.mean(axis=0)) ** 2, axis=1)))

    start = spread()
    for _ in range(300):
        messages = [(i, n.prepare(graph.degree[i], NOW).message) for i, n in enumerate(nodes)]
        for i, message in messages:
            for j in graph.neighbors(i):
                assert nodes[j].receive(message, NOW).accepted
        for n in nodes:
            n.merge()
    assert spread() < start / 100
