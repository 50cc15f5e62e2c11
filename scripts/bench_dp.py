"""Accuracy against epsilon for --dp sample (DP-SGD) on real daemons over loopback.

For each noise multiplier (and once without DP), starts ``--nodes`` real
daemons (``p2pfl.localnet.LocalNetwork``) on the digits task, lets them train
``--rounds`` rounds and linger, and prints one table row: the noise, the
largest epsilon any node reported in /status (delta 1e-5), and the mean and
minimum final accuracy over the nodes.

    python scripts/bench_dp.py --nodes 8 --rounds 40 --noise 2 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from p2pfl.localnet import LocalNetwork, LocalNetworkError


def run(args: argparse.Namespace, noise: float | None) -> tuple[float | None, list[float]]:
    """One network: (largest epsilon seen, final accuracies)."""
    directory = args.out / ("plain" if noise is None else f"noise-{noise:g}")
    shutil.rmtree(directory, ignore_errors=True)
    extra = ["--linger", str(args.linger), "--dp-delta", "1e-5", "--aggregator", args.aggregator]
    if noise is not None:
        extra += ["--dp", "sample", "--dp-clip", str(args.clip), "--dp-noise", str(noise)]
    epsilon: float | None = None
    with LocalNetwork(
        directory,
        args.nodes,
        rounds=args.rounds,
        partition=args.partition,
        seed=args.seed,
        local_epochs=args.local_epochs,
        extra_args=tuple(extra),
    ) as network:
        network.start_all()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and any(n.running for n in network.started()):
            for status in network.statuses():
                if status and status.get("epsilon") is not None:
                    epsilon = max(epsilon or 0.0, float(status["epsilon"]))
            time.sleep(1.0)
        network.wait_all_exited(max(0.0, deadline - time.monotonic()))
        accuracies = [n.final_accuracy for n in network.started()]
    return epsilon, [a for a in accuracies if a is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--aggregator", default="clipped", help="the daemon's default: clipped")
    parser.add_argument("--noise", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--linger", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dp"))
    args = parser.parse_args(argv)
    print("| DP | C | sigma | epsilon (delta 1e-5) | acc mean | acc min | nodes |")
    print("|---|---|---|---|---|---|---|")
    for noise in [None, *args.noise]:
        try:
            epsilon, accuracies = run(args, noise)
        except LocalNetworkError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        mean = statistics.mean(accuracies) if accuracies else float("nan")
        low = min(accuracies) if accuracies else float("nan")
        mode, clip, sigma = ("off", "", "") if noise is None else ("sample", args.clip, noise)
        shown = "∞ (no DP)" if epsilon is None else f"{epsilon:.2f}"
        print(f"| {mode} | {clip} | {sigma} | {shown} | {mean:.3f} | {low:.3f} "
              f"| {len(accuracies)}/{args.nodes} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
