"""A silent neighbour costs a node at most one share of its weight (real libp2p).

The neighbour answers ``ready`` to each offer, reads the whole update and never
sends a final receipt: the payloads left whole, so each share pushed to it is given
(gossip/delivery.py). After the first such push it gets only weight-0 probes, and
after ``PROBES_BEFORE_DROP`` unanswered probes it is dropped as a neighbour, its one
share counted as lost (p2pfl/silence.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from runtimes import GUARD_S, LOOPBACK, make_runtime, wait_until

from fltasks import Task
from gossip import NodeKey
from gossip.delivery import READY, Receipt
from p2pfl.framing import read_frame, write_frame
from p2pfl.peer_exchange import PeerBook, serve_peer_exchange
from p2pfl.runtime import UPDATE_PROTOCOL
from p2pfl.silence import PROBES_BEFORE_DROP
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration


async def test_a_neighbour_that_never_answers_costs_one_share(
    digits: Task, tmp_path: Path
) -> None:
    silent_key = NodeKey.generate()
    updates_read = 0

    async def run_silent(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with Transport.open(silent_key, [LOOPBACK]) as silent:
            serve_peer_exchange(silent, PeerBook(silent.peer_id), read_timeout=5)

            async def take_and_say_nothing(stream: INetStream) -> None:
                nonlocal updates_read
                await read_frame(stream, 1 << 20, GUARD_S)  # the offer
                await write_frame(stream, Receipt(READY, 0).encode(), GUARD_S)
                await read_frame(stream, 1 << 24, GUARD_S)  # the payloads, whole
                updates_read += 1
                await trio.sleep_forever()  # no final receipt, ever

            silent.host.set_stream_handler(TProtocol(UPDATE_PROTOCOL), take_and_say_nothing)
            task_status.started(silent.addrs[0])
            await trio.sleep_forever()

    with trio.fail_after(4 * GUARD_S):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(run_silent)
            sender = make_runtime(
                digits, tmp_path / "sender", "0/2", bootstrap=(address,), degree=1,
                send_timeout=1.0, read_timeout=1.0,
            )
            initial = sender.gossip.pushsum.weight
            await nursery.start(sender.run)
            silence = sender.policy.silence
            await wait_until(lambda: silence.dropped_count >= 1, GUARD_S, "the silent peer's drop")
            # Its first push carried half our weight (one neighbour); every later one
            # was a probe of weight 0, so the other half is all we lost.
            assert updates_read >= 1 + PROBES_BEFORE_DROP
            assert sender.policy.deliveries.counts["unanswered"] == 1 + PROBES_BEFORE_DROP
            assert silence.weight_lost == pytest.approx(initial / 2)
            status = sender.status()
            assert status["weight"] + status["weight_in_flight"] == pytest.approx(initial / 2)
            assert status["silence"]["dropped"] == 1
            rounds_then = sender.round
            await wait_until(lambda: sender.round >= rounds_then + 3, GUARD_S, "3 more rounds")
            # No longer a neighbour (no spare to stand in here), so nothing more is sent.
            assert silent_key.peer_id not in sender.membership.neighbours
            assert sender.gossip.pushsum.weight == pytest.approx(initial / 2)
            nursery.cancel_scope.cancel()
