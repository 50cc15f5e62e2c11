#!/usr/bin/env python3
"""Benchmark the vectorized simulator at 1,000 to 100,000 nodes; print a table and JSON lines.

Cases, each in a fresh subprocess so that its peak RSS (VmHWM) is its own:
  a) 1,000-node small-world graph (k=4, p=0.1), digits, 100 rounds of 1 local
     epoch, with every per-round metric (accuracy of all nodes, consensus
     distance, bytes);
  b) 10,000 nodes, small-world (k=4, p=0.1), consensus only (no training, the
     digits MLP's 4,810 parameters per node), 100 rounds, with the consensus
     distance every round;
  c) 100,000 nodes, the same consensus (small-world k=4, p=0.1, 4,810 parameters,
     100 rounds): 1.9 GB per copy of the models;
  d) 10,000 nodes training digits, 20 rounds of 1 local epoch, each node holding
     8 records drawn from digits' 1,437 (records are shared between nodes: the
     point is the simulator's cost, not the learning), evaluated every round.
Targets (a and b): each <= 20 s and <= 4 GB peak RSS on the 2-core reference machine.

Under torchrun the nodes are split over the ranks (topologies.ranks) and one
case runs per launch, in the ranks' own processes; the row gives ``ranks`` and
each rank's peak RSS:
  torchrun --standalone --nproc-per-node 2 scripts/bench_simulate.py --cases c
The time covers graph, partition, simulator construction and the rounds, not
the interpreter and torch import.

The ratio against p2pfl 0.4.4 uses a reference constant measured on the same
machine and reported in the issue (1.1 s per node-round), not re-measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

P2PFL_044_SECONDS_PER_NODE_ROUND = 1.1  # measured reference from the issue, same machine
TARGET_SECONDS = 20.0
TARGET_RSS_MB = 4096.0
CASES = {
    "a": {"nodes": 1000, "rounds": 100, "training": True, "degree": 4},
    "b": {"nodes": 10000, "rounds": 100, "training": False, "degree": 4},
    "c": {"nodes": 100000, "rounds": 100, "training": False, "degree": 4},
    "d": {"nodes": 10000, "rounds": 20, "training": True, "degree": 4, "records": 8},
}
# Rows of the consensus start drawn per block of node ids, each from its own seed, so
# that a rank draws only its nodes' rows and they are the same on any number of ranks.
START_BLOCK = 1024


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def threads() -> int:
    """Cores per rank: the ranks on this machine share its cores."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def start_rows(lo: int, hi: int, size: int, seed: int) -> torch.Tensor:
    """Nodes lo..hi-1's random starting models, the same rows whatever the block."""
    import torch

    parts = []
    for block in range(lo // START_BLOCK, (hi - 1) // START_BLOCK + 1):
        first = block * START_BLOCK
        rows = torch.randn(START_BLOCK, size, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + block))
        parts.append(rows[max(lo, first) - first : min(hi, first + START_BLOCK) - first])
    return torch.cat(parts)


def run_case(name: str, nodes: int, rounds: int, training: bool, degree: int,
             records: int | None = None, ranks: object = None) -> dict:
    """Runs inside the child process (or, under torchrun, in every rank)."""
    import numpy as np
    import torch

    from fltasks import load_task, partition
    from topologies.graphs import small_world
    from topologies.ranks import Ranks
    from topologies.simulator import Simulation, SimulationConfig

    ranks = ranks if isinstance(ranks, Ranks) else Ranks()
    torch.set_num_threads(threads())
    task = load_task("digits", seed=0)
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    graph = small_world(nodes, degree, 0.1, seed=0)
    config = SimulationConfig(
        rounds=rounds, local_epochs=1, train=training, evaluate=training, seed=0
    )
    if training and records:
        rng = np.random.default_rng(0)
        pool = len(task.y_train)
        shards = [rng.choice(pool, size=records, replace=False) for _ in range(nodes)]
        simulation = Simulation.for_task(task, graph, shards, config, ranks=ranks)
    elif training:
        shards = partition(task.y_train, nodes, "dirichlet:0.5", seed=0)
        simulation = Simulation.for_task(task, graph, shards, config, ranks=ranks)
    else:
        # Every node starts from its own random model so that there is something to average.
        lo, hi = ranks.block(nodes)
        estimates = start_rows(lo, hi, task.num_parameters(), seed=0)
        weights = torch.randint(1, 100, (nodes,), generator=torch.Generator().manual_seed(1))
        simulation = Simulation(graph, estimates, weights.double().numpy(), config, ranks=ranks)
        del estimates
    setup = time.perf_counter() - start
    history = simulation.run()
    seconds = ranks.max(time.perf_counter() - start)
    cpu_seconds = time.process_time() - cpu_start
    last = history[-1]
    per_rank = [round(float(x), 1) for x in ranks.gather_objects(peak_rss_mb())]
    return {
        "case": name, "nodes": nodes, "rounds": rounds, "training": training,
        "ranks": ranks.world,
        "seconds": round(seconds, 3), "setup_seconds": round(setup, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        # Other processes on the machine slow a run down: say how busy it was.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "node_rounds_per_s": round(nodes * rounds / seconds, 1),
        "peak_rss_mb": max(per_rank),
        "peak_rss_mb_per_rank": per_rank,
        "halo_rows_per_rank": simulation.halo.rows_received,
        "final_accuracy_mean": last.accuracy_mean,
        "final_consensus_distance": last.consensus_distance,
        "parameters": simulation.estimates.shape[1],
        "threads_per_rank": threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def child_env() -> dict[str, str]:
    """The child's environment: OpenMP threads sleep instead of spinning when they wait.

    Measured on the 2-core machine with other processes running (load ~7): case a
    took 71 s with the default spin-waiting and 21 s with PASSIVE, case b 53 s and
    14 s; at load ~3.5 both policies ran a in ~9 s and b in ~10 s. Override by
    setting OMP_WAIT_POLICY yourself.
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="ab", help="which cases to run (default ab)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, **CASES[args.child])))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return ranked(parser, args.cases)

    from rich.console import Console
    from rich.table import Table

    results = []
    for name in args.cases:
        if name not in CASES:
            parser.error(f"unknown case {name!r}: use some of {''.join(CASES)}")
        child = subprocess.run([sys.executable, __file__, "--child", name],
                               capture_output=True, text=True, check=False, env=child_env())
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["p2pfl_0.4.4_reference_s_per_node_round"] = P2PFL_044_SECONDS_PER_NODE_ROUND
        result["speedup_vs_p2pfl_0.4.4"] = round(
            P2PFL_044_SECONDS_PER_NODE_ROUND * result["node_rounds_per_s"], 1)
        results.append(result)

    table = Table(title="vectorized simulator (p2pfl 0.4.4 reference: "
                        f"{P2PFL_044_SECONDS_PER_NODE_ROUND} s per node-round, measured, "
                        "from the issue)")
    for column in ("case", "nodes", "rounds", "training", "seconds", "node-rounds/s",
                   "peak RSS MB", "x p2pfl 0.4.4", "targets met"):
        table.add_column(column, justify="right")
    for r in results:
        met = r["seconds"] <= TARGET_SECONDS and r["peak_rss_mb"] <= TARGET_RSS_MB
        table.add_row(r["case"], str(r["nodes"]), str(r["rounds"]), str(r["training"]),
                      f"{r['seconds']:.1f}", f"{r['node_rounds_per_s']:.0f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['speedup_vs_p2pfl_0.4.4']:.0f}",
                      "yes" if met else f"no (<= {TARGET_SECONDS:.0f} s, "
                                        f"<= {TARGET_RSS_MB:.0f} MB)")
    Console(width=140).print(table)
    for r in results:
        print(json.dumps(r))
    return 0


def ranked(parser: argparse.ArgumentParser, cases: str) -> int:
    """Under torchrun: one case, run by every rank on its block; rank 0 prints the row."""
    from topologies.ranks import close_ranks, init_ranks

    if len(cases) != 1 or cases not in CASES:
        parser.error("under torchrun, give one case per launch (--cases c), so that each "
                     "rank's peak RSS is that case's")
    ranks = init_ranks()
    try:
        result = run_case(cases, **CASES[cases], ranks=ranks)
    finally:
        close_ranks(ranks)
    if ranks.rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
