"""4 real daemons gossiping ResNet-18 on a locally made image folder: seconds per phase a round.

What is run and measured is in :mod:`p2pfl.bench.resnet`. Goals on the 2-core
machine: everything but training at most 20% of a round, at most 1.5 GB peak
RSS per daemon. Prints a table per round, one line per daemon, then the result
as ONE JSON line, the last line of stdout.

    nice -n 10 python scripts/bench_resnet.py [--nodes 4] [--rounds 3] [--images-per-node 1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pfl.bench.resnet import GOSSIP_PHASES, round_summary, run_resnet

OVERHEAD_GOAL = 0.20
RSS_GOAL_MB = 1536.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images-per-node", type=int, default=1000,
                        help="training images in each daemon's shard (about)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the images, keys, state and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.out or Path(scratch)
        run = run_resnet(directory, nodes=args.nodes, rounds=args.rounds,
                         images_per_node=args.images_per_node, model=args.model)
    rows = round_summary(run)
    console = Console(width=180)
    title = (f"{args.nodes} daemons, --model {args.model}, {run.images:,} own images each "
             f"({args.images_per_node} to train on), 1 local epoch: mean seconds over daemons")
    table = Table(title=title)
    phases = ["train", *GOSSIP_PHASES, "evaluate", "checkpoint", "other"]
    columns = ["round", "round_s", *(f"{p}_s" for p in phases), "overhead_fraction",
               "worst_stall_s", "peak_rss_mb"]
    for column in columns:
        table.add_column(column.removesuffix("_s"), justify="right")
    for row in rows:
        table.add_row(*(str(row.get(column)) for column in columns))
    console.print(table)
    for index, peak in sorted(run.peak_rss_mb.items()):
        console.print(f"daemon {index}: peak RSS {peak:,.0f} MB, {len(run.rounds[index])} rounds")
    # The first round includes each daemon's wait for its first updates; later ones are steady.
    steady = rows[1:] or rows
    overhead = max(row["overhead_fraction"] for row in steady)
    peak = max(run.peak_rss_mb.values(), default=0.0)
    console.print(
        f"worst overhead after round 1: {overhead:.1%} (goal <= {OVERHEAD_GOAL:.0%}); "
        f"worst peak RSS {peak:,.0f} MB (goal <= {RSS_GOAL_MB:,.0f} MB); "
        f"whole run {run.seconds:.0f} s"
    )
    print(json.dumps({
        "kind": "resnet", "nodes": args.nodes, "model": args.model, "images": run.images,
        "images_per_node": args.images_per_node, "seconds": round(run.seconds, 1),
        "rounds": rows, "peak_rss_mb": run.peak_rss_mb, "steady_overhead_fraction": overhead,
        "overhead_goal_met": overhead <= OVERHEAD_GOAL, "rss_goal_met": peak <= RSS_GOAL_MB,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
