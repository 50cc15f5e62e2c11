"""Joining a running network on real libp2p hosts: a fresh node adopts the median of
several members' models, never one peer's word, and no snapshot can crash it."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import blake3
import msgpack
import numpy as np
import pytest
import trio
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID
from runtimes import LOOPBACK, make_runtime, wait_until

import gossip.node
from fltasks import Task
from gossip import GossipNode, NodeKey, codec, robust
from gossip.codec import FORMAT_VERSION, MAGIC, SIGNING_DOMAIN
from p2pfl.peer_exchange import PeerBook, serve_peer_exchange
from p2pfl.runtime import MODEL_PROTOCOL, NodeRuntime, model_arrays
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration

POISON = 1000.0


def poisoned_snapshot(task: Task, key: NodeKey) -> bytes:
    """A validly signed snapshot of a model whose every weight is POISON."""
    arrays = model_arrays(task.make_model())
    node = GossipNode.create(key, arrays, 100)
    node.set_model({name: np.full_like(a, POISON) for name, a in arrays.items()})
    return bytes(node.snapshot(time.time()))


def resigned(message: bytes, key: NodeKey, edit) -> bytes:
    """``message`` with its header changed by ``edit`` and the payloads replaced, re-signed."""
    signed = codec.parse(message)
    header = dict(signed.header)
    payloads = edit(header)
    packed = msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<I", len(packed)) + packed + payloads
    signature = key.sign(SIGNING_DOMAIN + blake3.blake3(body).digest())
    return MAGIC + bytes([FORMAT_VERSION]) + signature + body


def absurd_topk(header: dict) -> bytes:
    # A signed top-k "snapshot" of 10^13 values with 10 kept: decoding it would
    # allocate 40 TB. It must be refused from the header alone.
    first = dict(header["tensors"][0], shape=[10**13], size=84)
    header["tensors"] = [first]
    header["codec"] = "topk:0.000000000001"
    return struct.pack("<I", 10) + bytes(80)


def absurd_raw(header: dict) -> bytes:
    first = dict(header["tensors"][0], shape=[10**13], size=16)
    header["tensors"] = [first]
    return bytes(16)


def serve_hostile_bootstrap(
    transport: Transport, reply: bytes, members: list[NodeRuntime]
) -> None:
    """A member that claims round 2^62 and answers every model request with ``reply``,
    and that introduces the joiner to the honest ``members`` by peer exchange."""
    book = PeerBook(transport.peer_id)
    for member in members:
        assert member.transport is not None
        # As if it had met them: first-hand, at the address they connected from.
        book.add(member.key.peer_id, member.transport.addrs, observed_ip="127.0.0.1")

    async def model(peer_id: str, payload: bytes) -> bytes:
        return (2**62).to_bytes(8, "big") + reply

    transport.set_handler(MODEL_PROTOCOL, model, 0, 5.0)
    serve_peer_exchange(transport, book)


async def start_members(task: Task, tmp_path: Path, nursery: trio.Nursery) -> list[NodeRuntime]:
    members = []
    for index in range(3):
        member = make_runtime(
            task, tmp_path / f"m{index}", f"{index}/4", rounds=None, min_neighbours=0,
            round_interval=0.05,
        )
        await nursery.start(member.run)
        members.append(member)
    await wait_until(lambda: all(m.round >= 3 for m in members), 60, "members at round 3")
    return members


async def test_a_joiner_adopts_the_median_of_members_not_a_hostile_bootstraps_model(
    digits: Task, tmp_path: Path
) -> None:
    hostile_key = NodeKey.generate()
    with trio.fail_after(120):
        async with (
            trio.open_nursery() as nursery,
            Transport.open(hostile_key, [LOOPBACK]) as hostile,
        ):
            members = await start_members(digits, tmp_path, nursery)
            serve_hostile_bootstrap(hostile, poisoned_snapshot(digits, hostile_key), members)
            joiner = make_runtime(
                digits, tmp_path / "joiner", "3/4", rounds=None, bootstrap=(hostile.addrs[0],),
                round_interval=1.0,
            )
            await nursery.start(joiner.run)
            await wait_until(lambda: joiner.joining.adopted_from is not None, 60, "the adoption")
            adopted = joiner.status()["adopted_from"]
            peers = {source["peer_id"] for source in adopted["peers"]}
            assert adopted["rule"] == "median"
            assert peers == {hostile_key.peer_id, *(m.key.peer_id for m in members)}
            # The claimed round is reported, not trusted: one poisoned model among four
            # cannot move the median outside the honest values.
            model = joiner.gossip.estimate.copy()
            assert np.abs(model).max() < POISON / 10
            assert joiner.training.evaluate(model) > 0.8
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("edit", "reason"), [(absurd_topk, "malformed"), (absurd_raw, "wrong-shape")]
)
async def test_an_absurd_snapshot_is_refused_counted_and_the_node_keeps_its_own_model(
    digits: Task, tmp_path: Path, edit, reason: str
) -> None:
    hostile_key = NodeKey.generate()
    with trio.fail_after(120):
        async with (
            trio.open_nursery() as nursery,
            Transport.open(hostile_key, [LOOPBACK]) as hostile,
        ):
            reply = resigned(poisoned_snapshot(digits, hostile_key), hostile_key, edit)
            serve_hostile_bootstrap(hostile, reply, [])
            # It waits for more peers than exist, so it never trains: its model can
            # only have changed through what it adopted.
            joiner = make_runtime(
                digits, tmp_path / "joiner", "0/4", rounds=None, min_neighbours=100,
                bootstrap=(hostile.addrs[0],),
            )
            initial = joiner.gossip.estimate.copy()
            await nursery.start(joiner.run)
            await wait_until(lambda: joiner.joining.join_refused, 30, "the refusal")
            assert joiner.status()["join_refused"] == {reason: 1}
            assert joiner.joining.adopted_from is None
            np.testing.assert_array_equal(joiner.gossip.estimate, initial)
            # It runs on: a crash in run() would have ended the nursery with an error.
            assert joiner.transport is not None
            nursery.cancel_scope.cancel()


async def test_a_peer_whose_id_is_not_ed25519_is_counted_not_fatal(
    digits: Task, tmp_path: Path
) -> None:
    secp_peer = str(ID.from_pubkey(create_new_key_pair().public_key))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            members = await start_members(digits, tmp_path, nursery)
            first = members[0]
            assert first.transport is not None
            joiner = make_runtime(
                digits, tmp_path / "joiner", "3/4", rounds=None, round_interval=1.0,
                bootstrap=(first.transport.addrs[0],),
            )
            # Learnt second-hand, as from a peer-exchange reply: such a peer cannot sign
            # an update, and asking it for a model must not crash the join.
            joiner.policy.book.add(secp_peer, [f"/ip4/127.0.0.1/tcp/9/p2p/{secp_peer}"])
            await nursery.start(joiner.run)
            await wait_until(lambda: joiner.joining.adopted_from is not None, 60, "the adoption")
            assert joiner.status()["join_refused"].get("not-ed25519") == 1
            # It went on to the member it could ask (the others trained alone, unknown).
            adopted = joiner.joining.adopted_from
            assert [p["peer_id"] for p in adopted["peers"]] == [first.key.peer_id]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("count", [3, 4])
def test_adopting_block_by_block_is_the_whole_models_median(
    monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    monkeypatch.setattr(gossip.node, "ADOPT_BLOCK_VALUES", 7)  # 50 values: 8 blocks
    rng = np.random.default_rng(count)
    node = GossipNode.create(NodeKey.generate(), {"w": np.zeros(50, np.float32)}, samples=1)
    models = [rng.standard_normal(50) for _ in range(count)]
    node.adopt(models)
    assert np.array_equal(node.estimate, robust.median(np.stack(models)))
    with pytest.raises(ValueError, match="shape"):
        node.adopt([np.zeros(49)])
    assert np.array_equal(node.estimate, robust.median(np.stack(models)))  # unchanged
