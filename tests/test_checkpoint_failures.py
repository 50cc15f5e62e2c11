"""A node whose checkpoint writes fail keeps training; the last good checkpoint stays.

The failure is a real one from the filesystem: the previous-checkpoint name is taken by
a non-empty directory, so every write after the first fails with EISDIR when the
current file is set aside.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from runtimes import make_runtime

from fltasks import load_task
from p2pfl.checkpoint import FILE_NAME, decode_state

pytestmark = pytest.mark.integration

ROUNDS = 3


async def test_failed_checkpoint_writes_are_counted_and_the_node_keeps_going(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    node = make_runtime(load_task("digits"), state_dir, "0/1", rounds=ROUNDS, min_neighbours=0)
    blocker = state_dir / (FILE_NAME + ".prev")
    blocker.mkdir()
    (blocker / "in-the-way").write_text("x")
    with trio.fail_after(120):
        await node.run()
    assert node.round == ROUNDS
    failures = node.status()["checkpoint_failures"]
    # Rounds 2 and 3 and the final checkpoint on exit failed; round 1's was written.
    assert failures == {"EISDIR": ROUNDS}
    assert decode_state((state_dir / FILE_NAME).read_bytes()).round == 1
    assert [p.name for p in state_dir.iterdir() if ".tmp-" in p.name] == []
