"""A hostile peer against one real node daemon, over real libp2p on 127.0.0.1.

The daemon is an in-process ``NodeRuntime`` with an allowlist that names the attacker
but not a second "outsider" key. It waits for more peers than exist, so it never
trains: its model can only change through what it admits, which makes "nothing bad touched the
model" an exact comparison. Its read timeout is 1 s so slow peers are cut off fast.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from runtimes import push_update, wait_until

from fltasks import Task
from gossip import NodeKey, Update, encode
from gossip.layout import ModelLayout
from p2pfl.config import NodeConfig
from p2pfl.framing import encode_uvarint
from p2pfl.peer_exchange import (
    PEERS_PROTOCOL,
    PeerBook,
    encode_request,
    exchange_peers,
    serve_peer_exchange,
)
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.runtime import MODEL_PROTOCOL, UPDATE_PROTOCOL, NodeRuntime, model_arrays
from p2pfl.transport import Transport, TransportError

pytestmark = pytest.mark.integration

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
READ_TIMEOUT_S = 1.0
MAX_MESSAGE_MB = 1.0
FLOOD_MESSAGES = 1000
FLOOD_BATCH = 25
# What a flood of garbage frames may be counted as: read and refused, or reset unread.
FLOOD_REASONS = {"malformed", "busy", "rate-limited"}

torch.set_num_threads(1)


@asynccontextmanager
async def running_daemon(
    task: Task, state_dir: Path, members: list[str], **settings: Any
) -> AsyncIterator[tuple[NodeRuntime, str]]:
    """A daemon allowing ``members``; yields it and its /status URL.

    It waits for more peers than will ever exist, so it never trains: only what it
    admits could change its model.
    """
    settings.setdefault("min_neighbours", 100)
    allow = state_dir / "allow.txt"
    state_dir.mkdir(parents=True, exist_ok=True)
    allow.write_text("# members\n" + "".join(f"{peer}\n" for peer in members))
    config = NodeConfig(
        key=str(state_dir / "unused.key"),
        state_dir=str(state_dir),
        listen=(LOOPBACK,),
        status_addr="127.0.0.1:0",
        allow=str(allow),
        read_timeout=READ_TIMEOUT_S,
        max_message_mb=MAX_MESSAGE_MB,
        **settings,
    ).validate()
    lines: list[str] = []
    runtime = NodeRuntime(config, NodeKey.generate(), task, announce=lines.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        (url,) = [line.split(" ", 1)[1] for line in lines if line.startswith("status ")]
        yield runtime, url
        nursery.cancel_scope.cancel()


async def join_as_member(member: Transport, node: NodeRuntime) -> None:
    """Introduce ``member`` as a real member joins: by a peer exchange, which puts it in
    the node's book and so among the neighbours whose updates the node merges."""
    book = PeerBook(member.peer_id)
    serve_peer_exchange(member, book)
    await exchange_peers(member, node.key.peer_id, book, timeout=5)
    await wait_until(lambda: member.peer_id in node.policy.book)


def signed(
    key: NodeKey,
    tensors: dict[str, np.ndarray],
    seq: int,
    *,
    fingerprint: bytes | None = None,
    weight: float = 1.0,
) -> bytes:
    update = Update(
        sender=key.public_key,
        seq=seq,
        samples=100,
        weight=weight,
        fingerprint=fingerprint or ModelLayout.of(tensors).fingerprint,
        created_at=time.time(),
        tensors=tensors,
    )
    return bytes(encode(update, key))


def gossip_state(node: NodeRuntime) -> tuple[Any, ...]:
    """Everything an update could change: model, weight, votes and replay state."""
    gossip = node.gossip
    inbox = {
        sender: (vote.estimate.copy(), vote.pending_weight)
        for sender in gossip.votes.senders()
        if (vote := gossip.votes.get(sender)) is not None
    }
    return gossip.estimate.copy(), gossip.pushsum.weight, inbox, dict(gossip.admission.last_seq)


def assert_same_state(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    (estimate_a, weight_a, inbox_a, seq_a), (estimate_b, weight_b, inbox_b, seq_b) = before, after
    np.testing.assert_array_equal(estimate_a, estimate_b)
    assert weight_a == weight_b
    assert seq_a == seq_b
    assert inbox_a.keys() == inbox_b.keys()
    for sender, (estimate, weight) in inbox_a.items():
        np.testing.assert_array_equal(estimate, inbox_b[sender][0])
        assert weight == inbox_b[sender][1]


def streams_being_served(node: NodeRuntime, peer_id: str) -> int:
    """Inbound streams from ``peer_id`` whose handler has not returned yet."""
    assert node.transport is not None
    return node.transport.inbound_streams(peer_id)


def rejected(node: NodeRuntime) -> Counter[str]:
    return Counter(node.status()["updates_rejected"])


async def raw_stream(attacker: Transport, node: NodeRuntime, protocol: str = UPDATE_PROTOCOL):
    """A bare libp2p stream to the daemon, for hand-made bytes."""
    return await attacker.host.new_stream(ID.from_base58(node.key.peer_id), [TProtocol(protocol)])


async def fetch_status(url: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    return await trio.to_thread.run_sync(get)


# -- the test ---------------------------------------------------------------------


async def test_hostile_peer_is_refused_counted_and_harmless(digits: Task, tmp_path: Path) -> None:
    attacker_key, outsider_key = NodeKey.generate(), NodeKey.generate()
    model = model_arrays(digits.make_model())
    with trio.fail_after(120):
        async with (
            running_daemon(digits, tmp_path / "node", [attacker_key.peer_id]) as (node, url),
            Transport.open(attacker_key, [LOOPBACK]) as attacker,
        ):
            await attacker.connect(node.transport.addrs[0], timeout=5)
            await join_as_member(attacker, node)
            peer = node.key.peer_id
            counted: Counter[str] = Counter()

            async def expect(reason: str, attack: Callable[[], Any]) -> None:
                """Run one attack; it must be counted once under ``reason`` and change nothing."""
                state, before = gossip_state(node), rejected(node)
                await attack()
                await wait_until(lambda: rejected(node).total() > before.total())
                # A second count could only come from a stream still being served: wait
                # until the daemon has finished every stream the attacker opened.
                await wait_until(lambda: streams_being_served(node, attacker_key.peer_id) == 0)
                assert rejected(node) - before == Counter({reason: 1}), reason
                assert_same_state(state, gossip_state(node))
                counted[reason] += 1

            async def send(payload: bytes) -> None:
                await push_update(attacker, peer, payload, 5)

            async def truncated() -> None:
                stream = await raw_stream(attacker, node)
                await stream.write(encode_uvarint(1000) + b"x" * 10)
                await stream.close()

            async def oversize() -> None:
                stream = await raw_stream(attacker, node)
                await stream.write(encode_uvarint(int(MAX_MESSAGE_MB * 2**20) + 1))

            async def silent() -> None:
                await raw_stream(attacker, node)  # opened, never written to

            async def trickle() -> None:
                stream = await raw_stream(attacker, node)
                await stream.write(encode_uvarint(1000))
                # A byte every READ_TIMEOUT_S / 4 is steady progress, for longer than the
                # whole test's guard: only a deadline on the whole frame ends this loop.
                for _ in range(999):
                    await trio.sleep(READ_TIMEOUT_S / 4)
                    try:
                        await stream.write(b"x")
                    except Exception:
                        return  # reset by the daemon: that is the point

            good = signed(attacker_key, model, seq=1)
            bad_signature = bytearray(good)
            bad_signature[10] ^= 0x01  # inside the signature

            await expect("malformed", lambda: send(os.urandom(300)))
            await expect("truncated", truncated)
            await expect("oversize", oversize)
            await expect("timeout", silent)
            await expect("timeout", trickle)
            await expect("bad-signature", lambda: send(bytes(bad_signature)))

            # The first copy is accepted (it changes the inbox), the second is a replay.
            await send(good)
            await wait_until(lambda: node.gossip.admission.accepted == 1)
            await expect("replay", lambda: send(good))
            await expect("unknown-sender", lambda: send(signed(outsider_key, model, seq=2)))
            other_model = {"w": np.zeros(3, dtype=np.float32)}
            await expect("wrong-model", lambda: send(signed(attacker_key, other_model, seq=3)))
            poisoned = {name: array.copy() for name, array in model.items()}
            next(iter(poisoned.values())).flat[0] = np.nan
            await expect("non-finite", lambda: send(signed(attacker_key, poisoned, seq=4)))

            # A flood: 1,000 garbage frames in concurrent batches. Each is counted once,
            # as read and refused or as reset unread; none is accepted.
            state, before = gossip_state(node), rejected(node)
            failed_sends = 0

            async def flood_one() -> None:
                nonlocal failed_sends
                try:
                    await attacker.send(peer, UPDATE_PROTOCOL, os.urandom(64), timeout=10)
                except TransportError:
                    failed_sends += 1  # reset as busy before the write finished

            flood_started = trio.current_time()
            for _ in range(FLOOD_MESSAGES // FLOOD_BATCH):
                async with trio.open_nursery() as nursery:
                    for _ in range(FLOOD_BATCH):
                        nursery.start_soon(flood_one)
            await wait_until(
                lambda: (rejected(node) - before).total() >= FLOOD_MESSAGES, timeout=30
            )
            flood = rejected(node) - before
            assert flood.total() == FLOOD_MESSAGES, flood
            assert set(flood) <= FLOOD_REASONS, flood
            assert failed_sends <= flood["busy"] + flood["rate-limited"]
            assert node.gossip.admission.accepted == 1
            assert_same_state(state, gossip_state(node))
            counted.update(flood)
            flood_seconds = trio.current_time() - flood_started

            # Still alive: /status answers over HTTP, and a fresh update is accepted.
            status = await fetch_status(url)
            assert status["peer_id"] == peer
            assert status["updates_rejected"] == dict(counted)
            await send(signed(attacker_key, model, seq=5))
            await wait_until(lambda: node.gossip.admission.accepted == 2)
            status = await fetch_status(url)
            assert status["updates_accepted"] == 2
            assert status["last_seq"] == {attacker_key.peer_id: 5}
            assert status["updates_rejected"] == dict(counted)
            print(f"flood of {FLOOD_MESSAGES} took {flood_seconds:.1f} s: {dict(flood)}")


async def test_outsider_gets_neither_model_nor_peers_nor_a_place_in_the_book(
    digits: Task, tmp_path: Path
) -> None:
    member_key, outsider_key = NodeKey.generate(), NodeKey.generate()
    with trio.fail_after(60):
        async with (
            running_daemon(digits, tmp_path / "node", [member_key.peer_id]) as (node, _),
            Transport.open(member_key, [LOOPBACK]) as member,
            Transport.open(outsider_key, [LOOPBACK]) as outsider,
        ):
            peer = node.key.peer_id
            # A member is served on all three protocols and lands in the book.
            await member.connect(node.transport.addrs[0], timeout=5)
            reply = await member.request(
                peer, PEERS_PROTOCOL, encode_request(member.addrs), timeout=5, max_size=1 << 18
            )
            assert reply
            snapshot = await member.request(peer, MODEL_PROTOCOL, b"", timeout=5, max_size=4 << 20)
            assert len(snapshot) > 8
            assert node.policy.book.known() == [member_key.peer_id]

            # The outsider's connection is closed right after Noise proves its key:
            # no stream of any protocol, identify and ping included, ever opens.
            state = gossip_state(node)
            for _ in range(3):
                with pytest.raises(TransportError):
                    await outsider.connect(node.transport.addrs[0], timeout=5)
                assert outsider_key.peer_id not in node.transport.connected_peers()
            with pytest.raises(TransportError):
                await outsider.request(peer, MODEL_PROTOCOL, b"", timeout=5, max_size=4 << 20)
            assert_same_state(state, gossip_state(node))
            status = node.status()
            assert status["connections_refused"]["not-member"] >= 3
            assert status["streams_refused"] == {}
            assert status["updates_rejected"] == {}
            # Never in the book, so never dialed nor chosen as a neighbour, even when a
            # member vouches for it.
            assert outsider_key.peer_id not in node.policy.book
            assert not node.policy.book.add(outsider_key.peer_id, outsider.addrs, first_hand=False)
            assert node.policy.book.known() == [member_key.peer_id]


async def test_a_flooding_member_does_not_starve_an_honest_one(
    digits: Task, tmp_path: Path
) -> None:
    flooder_key, honest_key = NodeKey.generate(), NodeKey.generate()
    model = model_arrays(digits.make_model())
    # The digits update is about 20 KB. A budget of 0.5 MiB a minute (9 KB/s) on top of
    # a burst of one 1 MiB message: the flooder's 60 KB frames exhaust it within a second.
    with trio.fail_after(60):
        async with (
            running_daemon(
                digits,
                tmp_path / "node",
                [flooder_key.peer_id, honest_key.peer_id],
                peer_mb_per_min=0.5,
            ) as (node, _),
            Transport.open(flooder_key, [LOOPBACK]) as flooder,
            Transport.open(honest_key, [LOOPBACK]) as honest,
        ):
            peer = node.key.peer_id
            await flooder.connect(node.transport.addrs[0], timeout=5)
            await honest.connect(node.transport.addrs[0], timeout=5)
            await join_as_member(flooder, node)
            await join_as_member(honest, node)
            flooding = True
            flood_sent = flood_in_flight = 0

            async def flood() -> None:
                nonlocal flood_sent, flood_in_flight
                junk = os.urandom(60_000)
                while flooding:
                    flood_in_flight += 1
                    try:
                        await flooder.send(peer, UPDATE_PROTOCOL, junk, timeout=5)
                    except TransportError:
                        pass
                    finally:
                        flood_in_flight -= 1
                    flood_sent += 1
                    await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                for _ in range(16):  # twice the per-peer stream cap
                    nursery.start_soon(flood)
                await wait_until(lambda: rejected(node)["rate-limited"] > 0)
                for seq in (1, 2, 3):
                    await push_update(honest, peer, signed(honest_key, model, seq), 30)
                    await wait_until(lambda s=seq: node.gossip.admission.accepted == s, 60)
                    # Served while the flood is still pushing, not after it: by order, not
                    # by a number of seconds.
                    assert flood_in_flight > 0
                flooding = False
            counts = rejected(node)
            assert node.gossip.admission.last_seq == {honest_key.public_key: 3}
            assert counts["rate-limited"] > 0
            # Every byte the flooder made the daemon read was within its budget.
            assert node.transport.bytes_received < 2 * MAX_MESSAGE_MB * 2**20
            assert set(counts) <= {"malformed", "busy", "rate-limited", "truncated"}, counts
            assert flood_sent > counts["malformed"]


# -- the token bucket, sans-I/O -----------------------------------------------------------


def test_a_fresh_peer_may_send_one_burst_then_only_the_rate() -> None:
    limiter = PeerRateLimiter(bytes_per_second=100, burst_bytes=1000)
    assert limiter.allows("a", 1000, now=0.0)
    limiter.charge("a", 1000, now=0.0)
    assert not limiter.allows("a", 1, now=0.0)
    assert limiter.allows("a", 50, now=0.5)
    assert not limiter.allows("a", 51, now=0.5)
    assert limiter.available("a", now=100.0) == 1000  # refills to the burst, no further
    assert limiter.allows("b", 1000, now=0.0)  # budgets are per peer


def test_a_debt_blocks_a_peer_until_time_pays_it_off() -> None:
    limiter = PeerRateLimiter(bytes_per_second=100, burst_bytes=1000)
    limiter.charge("a", 1500, now=0.0)
    assert limiter.available("a", now=0.0) == -500
    assert limiter.available("a", now=5.0) == 0
    assert limiter.available("a", now=6.0) == 100


def test_the_table_of_tracked_peers_stays_bounded() -> None:
    limiter = PeerRateLimiter(bytes_per_second=1, burst_bytes=10, max_tracked_peers=4)
    for index in range(100):
        limiter.charge(f"peer-{index}", 5, now=0.0)
        assert len(limiter) <= 4
    assert not limiter.allows("peer-99", 6, now=0.0)  # the newest keeps its state
