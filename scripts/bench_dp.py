"""Accuracy against epsilon of both DP modes on real daemons over loopback.

Starts ``--nodes`` real daemons (``p2pfl.lab.localnet.LocalNetwork``) once
without DP and once per DP setting, lets them train ``--rounds`` rounds and
linger, and prints one table row each: the mode, C and sigma, the largest
epsilon any node reported in /status (delta 1e-5), and the mean and minimum
final accuracy over the nodes. DP settings:

* ``--target E``: ``--dp sample`` with its defaults and ``--dp-target-epsilon
  E``; each node picks the least noise that spends E in ``--rounds``;
* ``--noise SIGMA``: ``--dp sample`` at that noise;
* ``--node C:SIGMA``: ``--dp node`` (each round's update clipped to C).

    python scripts/bench_dp.py --task digits --nodes 8 --rounds 40 --target 8 --node 0.1:8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from p2pfl.lab.localnet import LocalNetwork, LocalNetworkError

# (row label, mode, C, sigma, the daemon flags)
Row = tuple[str, str, str, str, list[str]]


def rows(args: argparse.Namespace) -> list[Row]:
    sample = ["--dp", "sample"] + ([] if args.lr is None else ["--dp-lr", str(args.lr)])
    out: list[Row] = [("plain", "off", "", "", [])]
    for target in args.target:
        out.append((f"target-{target:g}", "sample", "default", f"for ε {target:g}",
                    [*sample, "--dp-target-epsilon", str(target)]))
    for noise in args.noise:
        out.append((f"noise-{noise:g}", "sample", "default", f"{noise:g}",
                    [*sample, "--dp-noise", str(noise)]))
    for spec in args.node:
        clip, _, noise = spec.partition(":")
        out.append((f"node-{clip}-{noise}", "node", clip, noise,
                    ["--dp", "node", "--dp-clip", clip, "--dp-noise", noise]))
    return out


def run(args: argparse.Namespace, label: str, flags: list[str]) -> tuple[float | None, list[float]]:
    """One network: (largest epsilon seen, final accuracies)."""
    directory = args.out / args.task / label
    shutil.rmtree(directory, ignore_errors=True)
    extra = ["--linger", str(args.linger), "--dp-delta", "1e-5", "--aggregator", args.aggregator]
    epsilon: float | None = None
    with LocalNetwork(
        directory,
        args.nodes,
        rounds=args.rounds,
        task=args.task,
        partition=args.partition,
        seed=args.seed,
        local_epochs=args.local_epochs,
        extra_args=tuple(extra + flags),
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
    parser.add_argument("--task", default="digits")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--aggregator", default="clipped", help="the daemon's default: clipped")
    parser.add_argument("--target", type=float, nargs="*", default=[8.0])
    parser.add_argument("--noise", type=float, nargs="*", default=[])
    parser.add_argument("--node", nargs="*", default=[], metavar="C:SIGMA")
    parser.add_argument("--lr", type=float, default=None, help="--dp-lr (default the daemon's)")
    parser.add_argument("--linger", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dp"))
    args = parser.parse_args(argv)
    print(f"{args.task}, {args.nodes} daemons, {args.rounds} rounds")
    print("| DP | C | σ | ε (δ 1e-5) | acc mean | acc min | nodes |")
    print("|---|---|---|---|---|---|---|")
    for label, mode, clip, sigma, flags in rows(args):
        try:
            epsilon, accuracies = run(args, label, flags)
        except LocalNetworkError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        mean = statistics.mean(accuracies) if accuracies else float("nan")
        low = min(accuracies) if accuracies else float("nan")
        shown = "∞ (no DP)" if epsilon is None else f"{epsilon:.2f}"
        print(f"| {mode} | {clip} | {sigma} | {shown} | {mean:.3f} | {low:.3f} "
              f"| {len(accuracies)}/{args.nodes} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
