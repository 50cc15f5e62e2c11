"""Top-k between nodes: differences to one public copy per link, kept in step by receipts."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from gossip import GossipNode, NodeKey
from gossip import codec as wire
from gossip.delivery import Receipt
from gossip.node import Outgoing
from gossip.public_copy import RESYNC_CODEC

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0


def node(seed: int, vector: np.ndarray, codec_id: str = "topk:0.1") -> GossipNode:
    return GossipNode.create(
        NodeKey(bytes([seed]) * 32), {"w": vector.astype(np.float32)}, samples=10, codec_id=codec_id
    )


def drift(sender: GossipNode, rng: np.random.Generator) -> None:
    """Local training stand-in: the model moves a little every round."""
    sender.pushsum.estimate += rng.standard_normal(sender.estimate.shape) * 0.1


def push(sender: GossipNode, receiver: GossipNode, outgoing: Outgoing) -> tuple[Outgoing, Receipt]:
    """One push as the daemon makes it: addressed to the receiver, its receipt settled."""
    key = receiver.key.public_key
    addressed = sender.addressed(outgoing, key, NOW)
    _, receipt = receiver.deliver(addressed.message, NOW, sender.key.public_key)
    sender.settled(key, addressed, receipt)
    return addressed, receipt


def held_by(receiver: GossipNode, sender: GossipNode) -> np.ndarray:
    return receiver.public_copies.copies[sender.key.public_key]


def test_an_in_step_receiver_holds_the_links_copy_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    sender = node(1, rng.standard_normal(5000), "topk:0.01")
    receiver = node(2, np.zeros(5000), "topk:0.01")
    codecs, sizes = [], []
    for _ in range(15):
        drift(sender, rng)
        addressed, receipt = push(sender, receiver, sender.prepare(1, NOW))
        assert receipt.accepted
        codecs.append(wire.decode(addressed.message).codec)
        sizes.append(len(addressed.message))
        assert sender.links is not None
        assert np.array_equal(held_by(receiver, sender), sender.links.held(receiver.key.public_key))
    # The first carries the copy whole (in int8); then differences only, never a
    # periodic whole model.
    assert codecs == [RESYNC_CODEC] + ["topk:0.01"] * 14
    assert max(sizes[1:]) < sizes[0] / 5
    assert receiver.public_copies.out_of_step == 0 and sender.counters()["rejected"] == {}


def test_a_lost_message_resyncs_only_that_link_and_the_others_keep_their_differences() -> None:
    rng = np.random.default_rng(1)
    sender = node(1, rng.standard_normal(300))
    steady, lossy = node(2, np.zeros(300)), node(3, np.zeros(300))
    first = sender.prepare(2, NOW)
    for peer in (steady, lossy):
        push(sender, peer, first)
    drift(sender, rng)
    in_step = sender.prepare(2, NOW)
    both = [push(sender, peer, in_step)[0] for peer in (steady, lossy)]
    # Links in step hold one copy: one top-k, one signed message for both.
    assert both[0].message is both[1].message and not both[0].resync
    drift(sender, rng)
    outgoing = sender.prepare(2, NOW)
    push(sender, steady, outgoing)
    lost = sender.addressed(outgoing, lossy.key.public_key, NOW)  # the frame never arrives
    sender.settled(lossy.key.public_key, lost, None)
    drift(sender, rng)
    outgoing = sender.prepare(2, NOW)
    to_steady, receipt = push(sender, steady, outgoing)
    assert receipt.accepted and not to_steady.resync
    assert wire.decode(to_steady.message).codec == "topk:0.1"
    to_lossy, receipt = push(sender, lossy, outgoing)
    assert receipt.accepted and to_lossy.resync
    assert wire.decode(to_lossy.message).codec == RESYNC_CODEC
    # Each link's copy is its own: same sequence, different public copies.
    assert to_steady.seq == to_lossy.seq
    assert not np.array_equal(held_by(steady, sender), held_by(lossy, sender))
    drift(sender, rng)
    back, receipt = push(sender, lossy, sender.prepare(2, NOW))
    assert receipt.accepted and not back.resync  # in step again after one resync


def test_a_difference_to_a_copy_the_receiver_lost_is_refused_and_the_next_push_resyncs() -> None:
    rng = np.random.default_rng(4)
    sender, receiver = node(1, rng.standard_normal(300)), node(2, np.zeros(300))
    push(sender, receiver, sender.prepare(1, NOW))
    receiver.merge()
    receiver.public_copies.copies.clear()  # e.g. the receiver restarted
    before = receiver.estimate.copy()
    drift(sender, rng)
    refused, receipt = push(sender, receiver, sender.prepare(1, NOW))
    assert not refused.resync and receipt.verdict == "out-of-step"
    assert receiver.counters()["rejected"] == {"out-of-step": 1}
    assert receiver.merge() == 0 and np.array_equal(receiver.estimate, before)
    sender.refund(refused)
    drift(sender, rng)
    resync, receipt = push(sender, receiver, sender.prepare(1, NOW))
    assert resync.resync and receipt.accepted
    assert receiver.merge() == 1


def test_a_refusal_that_left_the_copy_alone_keeps_the_link_in_step() -> None:
    """A refusal before the copy is touched (here: not a neighbour for a while) says, in
    its receipt, that the last accepted message is still the one the copy came from."""
    rng = np.random.default_rng(5)
    sender, receiver = node(1, rng.standard_normal(200)), node(2, np.zeros(200))
    first, _ = push(sender, receiver, sender.prepare(1, NOW))
    receiver.set_peers(frozenset())
    drift(sender, rng)
    refused, receipt = push(sender, receiver, sender.prepare(1, NOW))
    assert receipt.verdict == "not-neighbour" and receipt.last_seq == first.seq
    sender.refund(refused)
    receiver.set_peers(None)
    drift(sender, rng)
    following, receipt = push(sender, receiver, sender.prepare(1, NOW))
    assert not following.resync and receipt.accepted


def test_adopting_a_model_resyncs_every_link() -> None:
    rng = np.random.default_rng(2)
    sender, other = node(1, rng.standard_normal(100)), node(2, rng.standard_normal(100))
    receiver = node(3, np.zeros(100))
    push(sender, receiver, sender.prepare(1, NOW))
    assert not push(sender, receiver, sender.prepare(1, NOW))[0].resync
    sender.adopt([sender.read_snapshot(other.snapshot(NOW), other.key.public_key)])
    assert push(sender, receiver, sender.prepare(1, NOW))[0].resync


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
        rounds = [(i, n.prepare(graph.degree[i], NOW)) for i, n in enumerate(nodes)]
        for i, outgoing in rounds:
            for j in graph.neighbors(i):
                assert push(nodes[i], nodes[j], outgoing)[1].accepted
        for n in nodes:
            n.merge()
    assert spread() < start / 100


def test_a_refused_share_comes_back_as_the_senders_model_not_the_links_lagging_copy() -> None:
    """Refunding the link's copy instead would pull the sender back towards it at every
    refusal (a neighbour that refuses forever had undone 98% of its training)."""
    rng = np.random.default_rng(6)
    sender, receiver = node(1, rng.standard_normal(400), "topk:0.01"), node(2, np.zeros(400))
    push(sender, receiver, sender.prepare(1, NOW))
    receiver.set_peers(frozenset())  # from now on it refuses: not a neighbour
    for _ in range(5):
        drift(sender, rng)
        model = sender.estimate.copy()
        refused, receipt = push(sender, receiver, sender.prepare(1, NOW))
        assert receipt.verdict == "not-neighbour" and not refused.resync
        sender.refund(refused)
        assert np.allclose(sender.estimate, model, rtol=0, atol=1e-6)


def test_an_out_of_step_refusal_leaves_the_receivers_sequence_where_it_was() -> None:
    """Else a lost receipt for it would make the next receipt count it as delivered
    (its share given up, never refunded)."""
    rng = np.random.default_rng(7)
    sender, receiver = node(1, rng.standard_normal(100)), node(2, np.zeros(100))
    first, _ = push(sender, receiver, sender.prepare(1, NOW))
    receiver.public_copies.copies.clear()
    _, receipt = push(sender, receiver, sender.prepare(1, NOW))
    assert receipt.verdict == "out-of-step"
    assert receiver.admission.last_seq[sender.key.public_key] == first.seq
    assert receiver.admission.accepted == 1


def test_a_difference_that_overflows_the_copy_is_refused_and_the_copy_kept() -> None:
    """A member's difference whose every value is finite, but whose sum with the copy is
    not in float32: nothing to fold in (an honest sender's estimate never gets there)."""
    big = np.full(100, 3e38)
    sender, receiver = node(1, big), node(2, np.zeros(100))
    push(sender, receiver, sender.prepare(1, NOW))
    before = held_by(receiver, sender).copy()
    difference = np.zeros(100, dtype=np.float32)
    difference[:10] = 3e38
    hostile = sender._sign(sender.seq + 1, 1.0, "topk:0.1", {"w": difference}, NOW)
    verdict, receipt = receiver.deliver(hostile, NOW, sender.key.public_key)
    assert receipt.verdict == "non-finite"
    assert np.array_equal(held_by(receiver, sender), before)
    assert receiver.merge() == 1 and np.isfinite(receiver.estimate).all()


def test_links_to_former_neighbours_are_dropped_and_resynced_if_they_return() -> None:
    rng = np.random.default_rng(8)
    sender = node(1, rng.standard_normal(100))
    kept, dropped = node(2, np.zeros(100)), node(3, np.zeros(100))
    for peer in (kept, dropped):
        push(sender, peer, sender.prepare(2, NOW))
    sender.keep_links([kept.key.public_key])
    assert sender.links is not None and set(sender.links.links) == {kept.key.public_key}
    outgoing = sender.prepare(2, NOW)
    assert not push(sender, kept, outgoing)[0].resync
    assert push(sender, dropped, outgoing)[0].resync


def test_a_push_that_never_left_keeps_the_link_in_step() -> None:
    """The dial or the write failed: the receiver cannot hold a partial frame, so its
    copy is the confirmed one and the next push is a difference, not a resync."""
    rng = np.random.default_rng(9)
    sender, receiver = node(1, rng.standard_normal(200)), node(2, np.zeros(200))
    push(sender, receiver, sender.prepare(1, NOW))
    drift(sender, rng)
    unsent = sender.addressed(sender.prepare(1, NOW), receiver.key.public_key, NOW)
    sender.not_sent(receiver.key.public_key, unsent)
    sender.refund(unsent)
    drift(sender, rng)
    following, receipt = push(sender, receiver, sender.prepare(1, NOW))
    assert receipt.accepted and not following.resync
    assert sender.links is not None
    assert np.array_equal(held_by(receiver, sender), sender.links.held(receiver.key.public_key))


@pytest.mark.parametrize(("codec_id", "low", "high"),
                         [("raw", 0.0, 0.0), ("fp16", 0.0, 1e-3), ("int8", 1e-3, 0.05),
                          ("topk:0.01", 1e-3, 0.05)])
def test_the_codec_error_is_what_a_receiver_copy_cannot_get_under(
    codec_id: str, low: float, high: float
) -> None:
    """A finished node waits for its neighbours to be within twice this (p2pfl/rounds.py):
    under int8 no vote gets closer than the quantisation, so 0.2% would never be met."""
    vector = np.random.default_rng(0).normal(size=4096)
    error = node(1, vector, codec_id).codec_error()
    assert low <= error <= high


def test_closeness_ignores_the_in_neighbours_that_left() -> None:
    """A neighbour that finished before us and left keeps its last distance; the serving
    node must not wait on it (p2pfl/rounds.py), yet it waits while nobody was heard."""
    own = node(1, np.ones(8), "raw")
    assert not own.close_to_neighbours(0.002)  # nobody heard from yet
    near, gone = bytes([2]) * 32, bytes([3]) * 32
    own.vote_distances.update({near: 0.001, gone: 0.004})
    assert not own.close_to_neighbours(0.002)
    assert own.close_to_neighbours(0.002, ignoring=frozenset({gone}))
    assert own.close_to_neighbours(0.002, ignoring=frozenset({near, gone}))  # all left
