"""Node runtimes in one trio process, over real libp2p on 127.0.0.1, training real digits.

The third property of the brief, that a plaintext-only dialer cannot reach a node, is a
property of the host every runtime uses (``Transport.open`` -> ``new_node_host``, Noise
only) and is tested at that level in
``tests/test_transport.py::test_plaintext_dialer_cannot_reach_a_noise_only_node``;
it is not repeated here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from runtimes import GUARD_S, LOOPBACK, make_runtime, push_update, run_two, wait_until

from fltasks import Task
from gossip import GossipNode, NodeKey
from gossip.delivery import READY, Receipt
from p2pfl.peer_exchange import PeerBook, serve_peer_exchange
from p2pfl.rounds import SETTLED_DISTANCE
from p2pfl.runtime import UPDATE_PROTOCOL, model_arrays
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration

# Nodes share the machine with the event loop and each other (as cli.run_node does).
torch.set_num_threads(1)


@pytest.mark.parametrize("compression", ["raw", "int8", "topk:0.1"])
async def test_two_runtimes_exchange_signed_updates(
    digits: Task, tmp_path: Path, compression: str
) -> None:
    first, second = await run_two(
        (digits, digits), (tmp_path / "a", tmp_path / "b"), ("0/2", "1/2"),
        rounds=3, round_interval=0.2, compression=compression,
    )
    # Both run() calls have returned: each node did its 3 rounds and stopped.
    for me, other in ((first, second), (second, first)):
        status = me.status()
        assert status["round"] == 3
        assert me.gossip.admission.accepted >= 1
        assert other.key.peer_id in status["last_seq"]
        assert status["updates_rejected"] == {}
        assert status["compression"] == compression
        # Each is the other's neighbour: a member for its relay, not a stranger.
        assert other.key.peer_id in me.membership.gossips_with()


async def test_top_k_peers_stay_in_step_and_whole_copies_stay_rare(
    digits: Task, tmp_path: Path
) -> None:
    """Receipts tell the sender which copy each neighbour holds, so only a link whose
    peer missed a difference gets its copy afresh: on unpaced rounds, a handful."""
    first, second = await run_two(
        (digits, digits), (tmp_path / "a", tmp_path / "b"), ("0/2", "1/2"),
        rounds=40, round_interval=0.0, compression="topk:0.01", degree=1,
    )
    for node in (first, second):
        status = node.status()
        # Of 40 rounds, those whose push found the link busy skipped it.
        assert status["updates_sent"] >= 10, status["updates_sent"]
        # The first push is whole (nothing to differ from); a few more for pushes refused
        # while the two views of the membership settle, or in flight at the end.
        assert status["whole_copies_sent"] <= 6, status["whole_copies_sent"]
        assert status["deliveries"].get("refused", 0) <= 3
        assert status["updates_rejected"].get("out-of-step", 0) == 0


@pytest.mark.parametrize("compression", ["raw", "topk:0.01"])
def test_a_busy_neighbour_skips_the_round_whatever_the_codec(
    digits: Task, tmp_path: Path, compression: str
) -> None:
    """The round pushes to the free neighbours; a top-k link that skips one keeps what it
    missed in its copy's residual (gossip/public_copy.py), so nobody waits for it."""
    node = make_runtime(digits, tmp_path, "0/2", compression=compression)
    keys = {name: NodeKey.generate().peer_id for name in ("a", "b")}
    for peer_id in keys.values():
        node.policy.book.add(peer_id, ["/ip4/127.0.0.1/tcp/1"])
    neighbours = list(keys.values())
    share = node.gossip.prepare(1, time.time())
    node.policy.start_pushes(share, [keys["a"]])  # a push to a is still in flight
    assert node.policy.free(neighbours) == [keys["b"]]
    node.policy.push_ended(keys["a"])
    assert sorted(node.policy.free(neighbours)) == sorted(keys.values())


async def test_a_tampered_update_is_rejected_and_counted(digits: Task, tmp_path: Path) -> None:
    with trio.fail_after(30):
        # It waits for more peers than will exist: the node serves but never trains
        # (nor merges), so its estimate could only change through what it receives.
        node = make_runtime(digits, tmp_path / "node", "0/2", rounds=None, min_neighbours=100)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert node.transport is not None
            attacker_key = NodeKey.generate()
            attacker = GossipNode.create(attacker_key, model_arrays(digits.make_model()), 100)
            message = bytes(attacker.prepare(1, time.time()).message)
            tampered = bytearray(message)
            tampered[-1] ^= 0x01  # one bit of the last tensor payload
            estimate_before = node.gossip.estimate.copy()
            async with Transport.open(attacker_key, [LOOPBACK]) as sender:
                # A member the node knows, so one of its neighbours: only the bit flip
                # can be the reason for a refusal.
                node.policy.book.add(attacker_key.peer_id, sender.addrs)
                await sender.connect(node.transport.addrs[0], timeout=5)
                await push_update(sender, node.key.peer_id, tampered, 5)
                await wait_until(lambda: node.status()["updates_rejected"] != {})
                status = node.status()
                assert status["updates_rejected"] == {"bad-signature": 1}
                assert status["updates_accepted"] == 0
                # Its relay serves the peers it gossips with as members (p2pfl/relay.py).
                assert status["relay"]["refused"] == {} and status["relay"]["bytes_relayed"] == 0
                assert node.transport.nat is not None
                assert attacker_key.peer_id in node.transport.nat.policy.member_set()
                assert len(node.gossip.votes) == 0
                np.testing.assert_array_equal(node.gossip.estimate, estimate_before)

                # The same bytes untampered, from the same key: accepted. So it was the
                # flipped bit that was refused, not the sender.
                await push_update(sender, node.key.peer_id, message, 5)
                await wait_until(lambda: node.status()["updates_accepted"] == 1)
                status = node.status()
                assert status["updates_rejected"] == {"bad-signature": 1}
                assert status["last_seq"] == {attacker_key.peer_id: 1}
                assert len(node.gossip.votes) == 1
            nursery.cancel_scope.cancel()


async def test_a_node_joining_a_running_network_adopts_its_current_model(
    digits: Task, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        # The first node trains alone (min_neighbours=0) until it is a few rounds in.
        first = make_runtime(
            digits, tmp_path / "a", "0/2", rounds=None, round_interval=0.05, min_neighbours=0
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            assert first.transport is not None
            await wait_until(lambda: first.round >= 3)
            joiner = make_runtime(
                digits, tmp_path / "b", "1/2", rounds=1, bootstrap=(first.transport.addrs[0],)
            )
            await nursery.start(joiner.run)
            # It joins, then adopts before its first round (bounded by fail_after).
            await wait_until(
                lambda: joiner.joining.adopted_from is not None or joiner.round > 0
            )
            adopted = joiner.status()["adopted_from"]
            assert adopted is not None
            assert adopted["rule"] == "median"
            [source] = adopted["peers"]
            assert source["peer_id"] == first.key.peer_id and source["claimed_round"] >= 3
            nursery.cancel_scope.cancel()
        fresh = make_runtime(digits, tmp_path / "c", "1/2", rounds=1)
        assert fresh.status()["adopted_from"] is None


async def test_a_push_that_times_out_gives_that_peer_twice_the_time_next(
    digits: Task, tmp_path: Path
) -> None:
    """A peer that takes the frame but answers too late: slow, not gone. Its push rate
    halves (p2pfl/linkrates.py), so its next deadline is longer; other peers' stay."""
    node = make_runtime(digits, tmp_path, "0/2", send_timeout=0.5)
    with trio.fail_after(GUARD_S):
        async with (
            Transport.open(node.key, [LOOPBACK]) as ours,
            Transport.open(NodeKey.generate(), [LOOPBACK]) as slow,
            trio.open_nursery() as nursery,
        ):

            async def answers_late(peer_id: str, payload: bytes) -> bytes:
                await trio.sleep_forever()
                raise AssertionError

            async def ready(peer_id: str, offer: bytes) -> tuple[bytes, int | None]:
                return Receipt(READY, 0).encode(), 1 << 26

            slow.set_handler(
                UPDATE_PROTOCOL, answers_late, 1 << 26, 60, screen=ready, max_offer_size=1 << 20
            )
            node.membership.transport = ours
            node.pusher.nursery = nursery
            node.policy.book.add(slow.peer_id, slow.addrs)
            promised = node.policy.push_rates.rate(slow.peer_id)
            first = node.config.deadlines.push(100_000, promised)
            outgoing = node.gossip.prepare(1, time.time())
            node.pusher.push(node.policy.start_pushes(outgoing, [slow.peer_id]))
            await wait_until(lambda: node.policy.send_failures[slow.peer_id] == 1, GUARD_S)
            assert node.policy.push_rates.rate(slow.peer_id) == promised / 2
            slower = node.policy.push_rates.rate(slow.peer_id)
            assert node.config.deadlines.push(100_000, slower) > first
            assert node.status()["link_mbit"]["push"] == {slow.peer_id: promised / 2 * 8 / 1e6}
            nursery.cancel_scope.cancel()


async def test_the_mass_count_holds_while_a_round_checkpoints_before_pushing(
    digits: Task, tmp_path: Path
) -> None:
    """The weight split off for a push is in flight from the split on: a poll of /status
    while the checkpoint is written (after the split, before the push starts) sees
    ``weight + weight_pending + weight_in_flight`` whole, and each refund (the peer
    refuses every offer) brings it back to ``weight``."""
    node = make_runtime(
        digits, tmp_path, "0/1", rounds=None, round_interval=0.2, min_neighbours=0
    )
    total = node.gossip.pushsum.weight
    polls: list[dict[str, float]] = []
    write_checkpoint = node.rounds.checkpoint

    async def polled_checkpoint() -> None:
        status = node.status()
        polls.append({k: status[k] for k in ("weight", "weight_pending", "weight_in_flight")})
        await write_checkpoint()

    async def refuse(peer_id: str, offer: bytes) -> tuple[bytes, int | None]:
        return Receipt("not-neighbour", 0).encode(), None

    async def never(peer_id: str, payload: bytes) -> bytes:
        raise AssertionError("a refused offer's payloads are never sent")

    node.rounds.checkpoint = polled_checkpoint
    with trio.fail_after(GUARD_S):
        async with Transport.open(NodeKey.generate(), [LOOPBACK]) as refuser:
            refuser.set_handler(UPDATE_PROTOCOL, never, 1 << 20, 60, screen=refuse)
            serve_peer_exchange(refuser, PeerBook(refuser.peer_id), read_timeout=5)
            node.policy.book.add(refuser.peer_id, refuser.addrs)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run)
                await wait_until(lambda: node.policy.deliveries.counts["refunded"] >= 2)
                # Between pushes (the next is split at the next round): all of it is ours.
                await wait_until(lambda: node.status()["weight_in_flight"] == 0)
                assert node.status()["weight"] == pytest.approx(total)
                nursery.cancel_scope.cancel()
    assert max(poll["weight_in_flight"] for poll in polls) > 0  # the premise: a share split
    for poll in polls:
        assert sum(poll.values()) == pytest.approx(total)


async def test_finished_nodes_serve_until_the_neighbourhood_has_the_final_model(
    digits: Task, tmp_path: Path
) -> None:
    """"Done" means the neighbours have our final model and we are close to theirs:
    both nodes stop by themselves, long before a --linger cap that would outlast the
    test's guard (run_two fails at GUARD_S)."""
    first, second = await run_two(
        (digits, digits), (tmp_path / "a", tmp_path / "b"), ("0/2", "1/2"),
        rounds=4, round_interval=0.1, linger=100 * GUARD_S,
    )
    for node in (first, second):
        assert node.rounds.serving and node.round == 4
        assert node.gossip.vote_distances
        assert max(node.gossip.vote_distances.values()) <= SETTLED_DISTANCE
