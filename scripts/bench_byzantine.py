"""Byzantine members on the live network: real daemons, real attacks, every rule.

Runs ``--nodes`` real ``p2pfl node`` daemons on loopback, ``--byzantine`` of
them started with ``--attack`` (the real daemon with a hostile message: it
trains and merges honestly but pushes its attack vector to every peer it
knows, as fast as the receivers' rate limit lets it, claiming its whole
sample count as weight). For each aggregation rule and attack it reports
the honest nodes' final accuracy, mean and minimum, next to the clean run
under the same rule, and writes the table as JSON.

    python scripts/bench_byzantine.py --nodes 9 --byzantine 1 --degree 4
    python scripts/bench_byzantine.py --nodes 16 --byzantine 2 --degree 6 \\
        --rules clipped --attacks sign-flip,alie
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from gossip.aggregation import AGGREGATORS
from gossip.attacks import DAEMON_ATTACKS as ATTACKS
from p2pfl.lab.localnet import LocalNetwork, LocalNetworkError

console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=9, help="daemons in all (default 9)")
    parser.add_argument("--byzantine", type=int, default=1, help="attackers among them")
    parser.add_argument("--degree", type=int, default=4, help="neighbours per node (default 4)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per node (default 30)")
    parser.add_argument("--linger", type=float, default=15.0, help="seconds (default 15)")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rules", default=",".join(AGGREGATORS), help="comma-separated (default: all)"
    )
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="comma-separated (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-byzantine"))
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    args = parser.parse_args(argv)
    args.rules = [r for r in args.rules.split(",") if r]
    args.attacks = [a for a in args.attacks.split(",") if a]
    for rule in args.rules:
        if rule not in AGGREGATORS:
            parser.error(f"--rules: unknown rule {rule!r}; choose from {', '.join(AGGREGATORS)}")
    for attack in args.attacks:
        if attack not in ATTACKS:
            parser.error(f"--attacks: unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    if not 0 <= args.byzantine < args.nodes - 1:
        parser.error("--byzantine must leave at least 2 honest nodes")
    return args


def attacker_indices(nodes: int, byzantine: int, seed: int) -> list[int]:
    """Which daemons attack: drawn with the seed, never node 0 (everyone's bootstrap)."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(np.arange(1, nodes), size=byzantine, replace=False))


def run_once(args: argparse.Namespace, rule: str, attack: str | None) -> dict[str, object]:
    """One network; returns the honest nodes' final accuracies."""
    directory = args.out / f"{rule}-{attack or 'clean'}"
    if directory.exists():
        shutil.rmtree(directory)
    attackers = attacker_indices(args.nodes, args.byzantine, args.seed) if attack else []
    started = time.monotonic()
    with LocalNetwork(
        directory,
        args.nodes,
        rounds=args.rounds,
        partition=args.partition,
        degree=args.degree,
        seed=args.seed,
        local_epochs=args.local_epochs,
        extra_args=("--aggregator", rule, "--linger", str(args.linger)),
        node_args={index: ("--attack", str(attack)) for index in attackers},
    ) as network:
        network.start_all()
        network.wait_all_exited(args.timeout)
        honest = [n for n in network.started() if n.index not in attackers]
        finals = [n.final_accuracy for n in honest]
    done = [a for a in finals if a is not None]
    return {
        "rule": rule,
        "attack": attack or "clean",
        "attackers": attackers,
        "honest_mean": float(np.mean(done)) if done else None,
        "honest_min": float(np.min(done)) if done else None,
        "unfinished": len(finals) - len(done),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    runs = [(rule, attack) for rule in args.rules for attack in [None, *args.attacks]]
    for number, (rule, attack) in enumerate(runs, start=1):
        console.print(f"[{number}/{len(runs)}] {rule}, {attack or 'clean'} ...")
        try:
            result = run_once(args, rule, attack)
        except LocalNetworkError as error:
            console.print(f"[red]error:[/red] {error}")
            return 1
        console.print(
            f"    honest mean {result['honest_mean']}, min {result['honest_min']} "
            f"({result['seconds']} s)"
        )
        results.append(result)
    table = Table(
        title=f"Honest final accuracy, mean / min: {args.nodes} daemons, {args.byzantine} "
        f"attacker(s), degree {args.degree}, {args.partition}, {args.rounds} rounds"
    )
    table.add_column("rule")
    for attack in ["clean", *args.attacks]:
        table.add_column(attack, justify="right")
    for rule in args.rules:
        cells = []
        for attack in ["clean", *args.attacks]:
            row = next(r for r in results if r["rule"] == rule and r["attack"] == attack)
            mean, low = row["honest_mean"], row["honest_min"]
            cells.append("-" if mean is None else f"{mean:.3f} / {low:.3f}")
        table.add_row(rule, *cells)
    console.print(table)
    summary = args.out / "summary.json"
    summary.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                   "results": results}, indent=2))
    console.print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
