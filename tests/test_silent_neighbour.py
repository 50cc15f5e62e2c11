"""A silent neighbour over real libp2p: it answers "ready", takes the payloads and never
sends a final receipt. It costs the node one share of its weight, then weight-0 probes,
and is dropped as a neighbour once the probes go unanswered (p2pfl/silence.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from runtimes import GUARD_S, LOOPBACK, make_runtime, wait_until

from fltasks import Task, load_task
from gossip import NodeKey
from gossip.delivery import READY, Receipt
from p2pfl import silence
from p2pfl.peer_exchange import PeerBook, serve_peer_exchange
from p2pfl.runtime import UPDATE_PROTOCOL
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


async def test_a_silent_neighbour_costs_one_share_and_is_dropped(
    digits: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(silence, "PROBE_AFTER_S", 0.2)  # probes soon, in this test's time
    node = make_runtime(
        digits, tmp_path, "0/1", rounds=None, round_interval=0.1, min_neighbours=0,
        send_timeout=0.5,
    )
    total = node.gossip.pushsum.weight
    payloads: list[bytes] = []

    async def ready(peer_id: str, offer: bytes) -> tuple[bytes, int | None]:
        return Receipt(READY, 0).encode(), 1 << 26

    async def silent(peer_id: str, message: bytes) -> bytes:
        payloads.append(message)
        await trio.sleep_forever()  # took it all; never answers
        raise AssertionError

    with trio.fail_after(GUARD_S):
        async with Transport.open(NodeKey.generate(), [LOOPBACK]) as quiet:
            quiet.set_handler(
                UPDATE_PROTOCOL, silent, 1 << 26, 600, screen=ready, max_offer_size=1 << 20
            )
            serve_peer_exchange(quiet, PeerBook(quiet.peer_id), read_timeout=5)
            node.policy.book.add(quiet.peer_id, quiet.addrs)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run)
                await wait_until(lambda: node.policy.silence.dropped_count == 1, GUARD_S)
                rounds_at_drop = node.rounds.round
                await wait_until(lambda: node.rounds.round >= rounds_at_drop + 3, GUARD_S)
                await wait_until(lambda: node.status()["weight_in_flight"] == 0, GUARD_S)
                status = node.status()
                nursery.cancel_scope.cancel()
    # One share (half: it was the only neighbour) went; every later push was a probe.
    assert node.policy.deliveries.counts["unanswered"] >= 1 + silence.PROBES_BEFORE_DROP
    assert status["weight"] + status["weight_pending"] == pytest.approx(total / 2)
    assert status["silence"]["weight_lost"] == pytest.approx(total / 2)
    assert status["silence"]["dropped"] == [quiet.peer_id]
    assert quiet.peer_id not in node.membership.neighbours
    assert len(payloads) >= 1 + silence.PROBES_BEFORE_DROP
