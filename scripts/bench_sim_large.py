#!/usr/bin/env python3
"""The simulator's memory-bounded path (--node-chunk) with 1M- and 11M-parameter models.

For ``cnn`` (1,070,986 parameters) and ``resnet18`` (11,181,642) on locally
made 32x32 digit PNGs (fltasks.demo_data.write_digit_images; nothing is
downloaded), a small-world graph (k=4) of ``--nodes`` nodes with IID shards of
``--images-per-node`` training images, 1 local epoch a round, ``--node-chunk``
nodes trained at a time; evaluation is off (``--evaluate`` turns it on), so
the time is training and mixing. Each case runs in a fresh subprocess,
twice (``--nodes`` and twice as many, on the same images: the smaller run's
shards are twice as large), so that its peak RSS (VmHWM) is its own and the
memory per node-model is the difference of the two:

* ``s_per_node_round``: wall seconds of the rounds / (nodes x rounds), the
  larger run;
* ``mb_per_node``: (peak RSS at 2n - peak RSS at n) / n, what each further
  node's model costs (4 bytes a parameter for the estimate, if nothing else
  grows with n);
* ``max_nodes_16gb``: nodes that fit in 16 GiB on that line, and the
  ``n x P`` it makes.

    nice -n 10 python scripts/bench_sim_large.py [--nodes 6] [--rounds 1] [--node-chunk 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIXTEEN_GIB_MB = 16 * 1024.0


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_case(
    model: str, nodes: int, rounds: int, chunk: int, folder: Path, evaluate: bool
) -> dict:
    """Runs inside the child process."""
    import torch

    from fltasks import load_task, partition
    from topologies.graphs import small_world
    from topologies.simulator import Simulation, SimulationConfig

    torch.set_num_threads(1)
    task = load_task(f"imagefolder:{folder}", model=model)
    shards = partition(task.y_train.numpy(), nodes, "iid", seed=0)
    config = SimulationConfig(rounds=rounds, seed=0, node_chunk=chunk, evaluate=evaluate)
    simulation = Simulation.for_task(task, small_world(nodes, 4, 0.1, seed=0), shards, config)
    start = time.perf_counter()
    history = simulation.run()
    seconds = time.perf_counter() - start
    return {
        "model": model, "parameters": int(simulation.estimates.shape[1]), "nodes": nodes,
        "rounds": rounds, "node_chunk": chunk, "seconds": round(seconds, 2),
        "s_per_node_round": round(seconds / (nodes * rounds), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1), "accuracy_mean": history[-1].accuracy_mean,
    }


def child(model: str, nodes: int, args: argparse.Namespace, folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", model, "--nodes", str(nodes),
               "--rounds", str(args.rounds), "--node-chunk", str(args.node_chunk),
               "--folder", str(folder), *(["--evaluate"] if args.evaluate else [])]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--node-chunk", type=int, default=2)
    parser.add_argument("--images-per-node", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18"])
    parser.add_argument("--evaluate", action="store_true", help="measure accuracy every round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_case(args.child, args.nodes, args.rounds, args.node_chunk, args.folder,
                          args.evaluate)
        print(json.dumps(result))
        return 0
    from fltasks.demo_data import write_digit_images
    from p2pfl.bench.resnet import images_for

    with tempfile.TemporaryDirectory() as scratch:
        images = images_for(2 * args.nodes * args.images_per_node)
        folder = write_digit_images(Path(scratch), images)
        for model in args.models:
            small = child(model, args.nodes, args, folder)
            large = child(model, 2 * args.nodes, args, folder)
            per_node = (large["peak_rss_mb"] - small["peak_rss_mb"]) / args.nodes
            base = small["peak_rss_mb"] - per_node * args.nodes
            fits = int((SIXTEEN_GIB_MB - base) / per_node) if per_node > 0 else None
            row = {"kind": "sim-large", **large, "peak_rss_mb_at_n": small["peak_rss_mb"],
                   "mb_per_node": round(per_node, 1), "base_mb": round(base, 1),
                   "max_nodes_16gb": fits,
                   "max_n_x_p_16gb": None if fits is None else fits * large["parameters"]}
            print(f"{model}: {large['parameters']:,} parameters, {large['s_per_node_round']} s "
                  f"per node-round ({large['nodes']} nodes, chunk {args.node_chunk}); "
                  f"{per_node:.1f} MB per node, base {base:.0f} MB: about {fits:,} nodes "
                  f"(n x P = {row['max_n_x_p_16gb']:.3g}) fit in 16 GiB")
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
