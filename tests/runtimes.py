"""Helpers for tests that run node runtimes in-process on real libp2p hosts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from fltasks import Task
from gossip import NodeKey
from p2pfl.config import NodeConfig
from p2pfl.runtime import NodeRuntime

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


async def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Poll ``condition`` until true; AssertionError naming ``what`` after ``timeout`` s."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
