"""How long gossip work stalls the daemon's event loop, with a large model.

Two real node runtimes (real libp2p hosts on loopback, one trio loop) gossip
a model of about 10M parameters for a few rounds while a watchdog task asks
the loop for a 5 ms sleep over and over and records how late it wakes: the
worst lateness is the longest time no stream could be served. The same run
is made twice, with gossip work (verify and decode, merge, encode and sign)
on the loop and in worker threads, and the ratio is printed.

    python scripts/bench_loop_stall.py [--hidden 2400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import trio
from torch import nn

from fltasks import Task, load_task
from gossip import NodeKey
from p2pfl.config import NodeConfig
from p2pfl.runtime import NodeRuntime

TICK_S = 0.005


def big_task(hidden: int) -> Task:
    """Digits with a wide MLP: 64 -> 4096 -> hidden -> 10 (about 10M parameters at 2400)."""
    digits = load_task("digits")

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    return Task(
        name=f"digits-wide-{hidden}",
        make_model=make_model,
        x_train=digits.x_train[:256],
        y_train=digits.y_train[:256],
        x_test=digits.x_test[:256],
        y_test=digits.y_test[:256],
        num_classes=10,
        lr=0.01,
        batch_size=64,
    )


def runtime(task: Task, directory: Path, shard: str, rounds: int, **settings) -> NodeRuntime:
    config = NodeConfig(
        key=str(directory / "unused.key"),
        state_dir=str(directory),
        shard=shard,
        rounds=rounds,
        round_interval=0.0,
        linger=0.0,
        min_neighbours=1,
        send_timeout=60.0,
        read_timeout=60.0,
        peer_mb_per_min=4096.0,
        **settings,
    ).validate()
    return NodeRuntime(config, NodeKey.generate(), task, announce=lambda line: None)


async def measure(task: Task, rounds: int, offload: bool) -> tuple[float, float, int]:
    """Worst loop lateness (s), wall seconds, and rounds done, for one setting.

    Both runtimes are built before the watchdog starts: a daemon builds its
    model and state before its loop runs, so that cost is not a stall.
    """
    worst = 0.0
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        first = runtime(task, root / "a", "0/2", rounds)
        # Bootstraps from the first node's address once it is known (set below).
        second = runtime(task, root / "b", "1/2", rounds)
        for node in (first, second):
            node.core.offload = offload
        async with trio.open_nursery() as nursery:

            async def watchdog() -> None:
                nonlocal worst
                while True:
                    before = trio.current_time()
                    await trio.sleep(TICK_S)
                    worst = max(worst, trio.current_time() - before - TICK_S)

            await nursery.start(first.run)
            assert first.transport is not None
            bootstrap = (first.transport.addrs[0],)
            second.membership.config = replace(second.membership.config, bootstrap=bootstrap)
            nursery.start_soon(watchdog)
            started = time.monotonic()
            async with trio.open_nursery() as pair:
                pair.start_soon(second.run)
            wall = time.monotonic() - started
            nursery.cancel_scope.cancel()
        return worst, wall, second.round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2400, help="width of the second layer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = big_task(args.hidden)
    parameters = sum(p.numel() for p in task.make_model().parameters())
    print(f"model: {parameters:,} parameters ({parameters * 4 / 2**20:.1f} MiB as float32)")
    results = {}
    for offload in (False, True):
        worst, wall, done = trio.run(measure, task, args.rounds, offload)
        where = "worker threads" if offload else "on the loop"
        print(f"gossip work {where:>14}: worst loop stall {worst * 1000:8.1f} ms "
              f"({done} rounds in {wall:.1f} s)")
        results[offload] = worst
    print(f"worst stall, off the loop / on the loop: {results[True] / results[False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
