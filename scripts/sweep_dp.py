"""Sweep --dp sample's settings in the simulator: final accuracy against epsilon.

Each combination of the listed values is one run of the simulator (small-world
of degree 4, IID shards, ``--aggregator mean``), which runs the daemon's DP-SGD
node by node; one JSON line per run. The noise is ``--sigma``, or the least
noise that spends ``--target`` epsilon (delta 1e-5) in the run's steps on the
smallest shard; one local epoch a round, as the daemon's default. ``--batch``
replaces the task's batch size (the expected Poisson batch); ``--linger``
reports the accuracy after that many more rounds that only gossip, as
daemons linger. This is how the defaults in
fltasks/dp_defaults.py were chosen (docs/PRIVACY.md).

    python scripts/sweep_dp.py --task digits --nodes 8 --lr 0.1 1 --target 7.5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import torch

from fltasks import load_task, partition
from fltasks.dp_sgd import noise_for_target, sample_rate_of, steps_per_epoch
from topologies.graphs import small_world
from topologies.simulator import Simulation, SimulationConfig


def run(args: argparse.Namespace, lr: float, clip: float, batch: int | None,
        rounds: int) -> dict[str, object]:
    task = load_task(args.task, seed=args.seed)
    if batch is not None:
        task = dataclasses.replace(task, batch_size=batch)
    shards = partition(task.y_train, args.nodes, "iid", seed=args.seed)
    sigma = args.sigma
    if sigma is None:
        rate = sample_rate_of(task.batch_size, min(len(s) for s in shards))
        sigma = noise_for_target(args.target, 1e-5, rate, rounds * steps_per_epoch(rate))
    config = SimulationConfig(rounds=rounds, local_epochs=1, seed=args.seed, dp_clip=clip,
                              dp_noise=sigma, dp_mode="sample", dp_lr=lr,
                              linger_rounds=args.linger)
    graph = small_world(args.nodes, 4, 0.1, seed=args.seed)
    simulation = Simulation.for_task(task, graph, shards, config)
    history = simulation.run()
    trained = history[rounds - 1]
    return {
        "task": args.task, "nodes": args.nodes, "rounds": rounds, "lr": lr, "clip": clip,
        "batch": task.batch_size, "sigma": round(sigma, 3),
        "epsilon": round(simulation.epsilon(1e-5) or 0.0, 2),
        "accuracy": round(trained.accuracy_mean or 0.0, 3),
        "after_linger": round(history[-1].accuracy_mean or 0.0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, nargs="+", default=[40])
    parser.add_argument("--lr", type=float, nargs="+", default=[1.0])
    parser.add_argument("--clip", type=float, nargs="+", default=[1.0])
    parser.add_argument("--batch", type=int, nargs="+", default=[None])
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument("--sigma", type=float)
    noise.add_argument("--target", type=float, help="epsilon the run spends (delta 1e-5)")
    parser.add_argument("--linger", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for lr, clip, batch, rounds in itertools.product(args.lr, args.clip, args.batch, args.rounds):
        print(json.dumps(run(args, lr, clip, batch, rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
