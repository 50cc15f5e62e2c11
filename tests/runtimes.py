"""Helpers for tests that run node runtimes in-process on real libp2p hosts, and the
one wait for tests that watch daemons from outside (subprocesses, lab hosts)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from fltasks import Task
from gossip import NodeKey
from gossip.codec import PREFIX_BYTES, offer_length
from gossip.delivery import MAX_RECEIPT_BYTES, Receipt
from p2pfl.config import NodeConfig
from p2pfl.runtime import UPDATE_PROTOCOL, NodeRuntime
from p2pfl.transport import Transport, TransportError

if TYPE_CHECKING:
    from p2pfl.lab.localnet import LocalNetwork

_T = TypeVar("_T")

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def make_runtime(
    task: Task, state_dir: Path, shard: str, key: NodeKey | None = None, **settings: Any
) -> NodeRuntime:
    """A runtime on 127.0.0.1 with a free status port; ``settings`` are NodeConfig fields."""
    # Unpaced and without lingering unless a test asks: these tests count rounds,
    # and a node that keeps serving after its last round would outlive them.
    settings.setdefault("round_interval", 0.0)
    settings.setdefault("linger", 0.0)
    config = NodeConfig(
        key=str(state_dir / "unused.key"),
        state_dir=str(state_dir),
        listen=settings.pop("listen", (LOOPBACK,)),
        status_addr="127.0.0.1:0",
        shard=shard,
        partition=settings.pop("partition", "iid"),
        **settings,
    ).validate()
    return NodeRuntime(config, key or NodeKey.generate(), task, announce=lambda line: None)


# Bounds on waits and runs that are there only so that a hang fails instead of blocking
# the suite, never claims about speed: generous, since a machine kept busy by other work
# (2 cores, a load of 20 while this was written) runs these tests many times slower.
GUARD_S = 300.0


async def run_two(
    tasks: tuple[Task, Task], state_dirs: tuple[Path, Path], shards: tuple[str, str],
    **settings: Any,
) -> tuple[NodeRuntime, NodeRuntime]:
    """Two runtimes, the second bootstrapped from the first, each run to its last round."""
    with trio.fail_after(GUARD_S):
        first = make_runtime(tasks[0], state_dirs[0], shards[0], **settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            assert first.transport is not None
            bootstrap = (first.transport.addrs[0],)
            second = make_runtime(
                tasks[1], state_dirs[1], shards[1], bootstrap=bootstrap, **settings
            )
            nursery.start_soon(second.run)
    return first, second


async def with_retries(
    action: Callable[[], Awaitable[Any]], attempts: int = 10, what: str = "the action"
) -> Any:
    """``action()``, tried again after a TransportError, at most ``attempts`` times.

    For a test's own dials and requests: on a busy machine a dial can be refused by the
    peer's handshake limits or a stream can fail to open, and a node retries those in its
    next round; a test that tries once then fails on load, not on what it checks.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await action()
        except TransportError as error:
            if attempt == attempts:
                raise AssertionError(f"{what} failed {attempts} times: {error}") from error
            await trio.sleep(0.2 * attempt)  # back off a little, as a node's next round would


async def wait_until(
    condition: Callable[[], bool], timeout: float = 60.0, what: str = "the condition"
) -> None:
    """Poll ``condition`` until true; AssertionError naming ``what`` after ``timeout`` s."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def wait_for_daemons(
    network: LocalNetwork, condition: Callable[[], _T], timeout: float, what: str
) -> _T:
    """``wait_until`` for daemons watched from outside, blocking: what ``condition``
    returned once truthy (:meth:`LocalNetwork.wait_for`); AssertionError naming ``what``
    after ``timeout`` s, or as soon as no daemon runs (nothing more can change)."""
    value = network.wait_for(condition, timeout)
    if not value:
        raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
    return value


async def push_update(
    transport: Transport, peer_id: str, message: bytes | bytearray, timeout: float
) -> Receipt | None:
    """Push one update as the node does (``/p2pfl/update/1.2.0``: the offer, then, if the
    receiver is ready, the payloads); the receiver's last answer. Bytes too short to
    hold an offer go as one frame, as a hostile peer would send them (no answer)."""
    if len(message) < PREFIX_BYTES or offer_length(message) > len(message):
        await transport.send(peer_id, UPDATE_PROTOCOL, bytes(message), timeout)
        return None
    split = offer_length(message)
    view = memoryview(message)
    first, reply = await transport.offer(
        peer_id,
        UPDATE_PROTOCOL,
        view[:split],
        view[split:],
        timeout,
        MAX_RECEIPT_BYTES,
        lambda answer: Receipt.decode(answer).ready,
    )
    return Receipt.decode(first if reply is None else reply)
