#!/usr/bin/env python3
"""Compare gossip topologies in simulation: n nodes, real local training, push-sum averaging.

Every node trains on its own shard of the task's train split, then does one
push-sum step with its graph neighbours, for --rounds rounds, over a simulated
network with message loss, per-link delay and churn. The complete graph (the
FedAvg baseline) is always run, and a centralized model trained on all the
data for rounds x local-epochs epochs gives the reference accuracy.

Writes to --out: summary.json, <topology>.csv (one row per round),
accuracy.png, consensus.png and graph-<topology>.png (for up to 64 nodes).

Examples:
  scripts/simulate.py --topology all --nodes 32 --rounds 50
  scripts/simulate.py --topology ring --nodes 16 --partition iid --loss 0.1 --churn 0.2
  scripts/simulate.py --task mypackage.tasks:make_task --topology small-world --degree 6
  scripts/simulate.py --topology small-world --degree 6 --byzantine 4 --attack scale \
      --aggregator clipped
  scripts/simulate.py --topology small-world --compression topk:0.01 --dp-clip 1 --dp-noise 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from topologies.settings import (
    SettingError,
    add_flags,
    config_from_flags,
    flag_name,
    load_toml,
)

BASELINE = "complete"
TARGET_FRACTION = 0.98
console = Console(stderr=True)


class OneLineErrors(argparse.ArgumentParser):
    """Bad flags: one line naming the cause (and pointing at --help), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    doc_title, _, doc_rest = __doc__.partition("\n\n")
    parser = OneLineErrors(
        prog="simulate.py",
        description=doc_title,
        epilog=doc_rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a TOML file of settings (keys as the flags, with _ for -); flags override it",
    )
    add_flags(parser)
    return parser


def fail(message: str) -> int:
    print(f"simulate.py: error: {message}", file=sys.stderr)
    return 2


def setting_error(error: SettingError) -> str:
    """The one error line for a bad setting, naming it as the user typed it: a flag."""
    return f"{' / '.join(flag_name(name) for name in error.names)}: {error.reason}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Waiting OpenMP threads sleep rather than spin: on a busy 2-core machine spinning
    # made runs 3-5x slower (see scripts/bench_simulate.py). Must precede importing torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fltasks import TaskError, load_task, parse_partition, partition
    from topologies.graphs import TOPOLOGIES, make_graph
    from topologies.simulator import centralized_baseline

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so that --task module:function finds the user's module

    try:
        settings = load_toml(args.config) if args.config is not None else {}
        options = config_from_flags(args, settings)
        config = options.simulation_config()
    except SettingError as error:
        return fail(setting_error(error))
    names = list(TOPOLOGIES) if options.topology == "all" else [options.topology]
    if BASELINE not in names:
        names.append(BASELINE)
    try:
        parse_partition(options.partition)
        task = load_task(options.task, seed=options.seed)
        shards = partition(task.y_train, options.nodes, options.partition, seed=options.seed)
        graphs = {
            name: make_graph(name, options.nodes, options.degree, options.rewire, seed=options.seed)
            for name in names
        }
    except (TaskError, ValueError) as exc:
        return fail(str(exc).splitlines()[0])
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the output directory {options.out}: {exc.strerror}")

    epochs = options.rounds * options.local_epochs
    with console.status(f"centralized baseline: {epochs} epochs on all the data"):
        centralized = centralized_baseline(task, epochs, options.seed)
    target = (
        options.target
        if options.target is not None
        else TARGET_FRACTION * centralized.final_accuracy
    )
    runs = simulate_all(options, task, shards, graphs, config, names)
    write_outputs(options, task, centralized, runs, target)
    return 0


def simulate_all(args, task, shards, graphs, config, names):
    """Run every topology in turn under one rich progress bar per topology."""
    from topologies.mixing import metropolis_hastings, spectral_gap
    from topologies.privacy import DELTA
    from topologies.report import TopologyRun
    from topologies.simulator import Simulation

    runs = []
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bars = {name: progress.add_task(name, total=args.rounds, status="") for name in names}
        for name in names:
            graph = graphs[name]
            start = time.perf_counter()
            simulation = Simulation.for_task(task, graph, shards, config)

            def advance(m, bar=bars[name]):
                status = f"acc {m.accuracy_mean:.3f}  dist {m.consensus_distance:.2e}"
                if args.byzantine:
                    status = f"honest {status}"
                    status = status.replace(
                        f"{m.accuracy_mean:.3f}", f"{m.honest_accuracy_mean:.3f}", 1
                    )
                progress.update(bar, advance=1, status=status)

            history = simulation.run(advance)
            seconds = time.perf_counter() - start
            gap = spectral_gap(metropolis_hastings(graph))
            epsilon = simulation.epsilon()
            runs.append(
                TopologyRun(
                    name,
                    graph,
                    history,
                    gap,
                    seconds,
                    simulation.message_bytes,
                    epsilon,
                    None if epsilon is None else DELTA,
                )
            )
    return runs


def write_outputs(args, task, centralized, runs, target) -> None:
    from topologies.report import (
        draw_graph,
        plot_accuracy,
        plot_consensus,
        topology_summary,
        write_csv,
        write_summary,
    )

    summary = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
            "message_bytes": runs[0].message_bytes,
            "task_name": task.name,
        },
        "centralized": {
            "final_accuracy": centralized.final_accuracy,
            "seconds": centralized.seconds,
            "epochs": args.rounds * args.local_epochs,
        },
        "topologies": {run.name: topology_summary(run, target) for run in runs},
    }
    if args.dp_clip is not None:
        summary["privacy"] = {
            "clip_norm": args.dp_clip,
            "noise_multiplier": args.dp_noise,
            "delta": runs[0].delta,
            "epsilon": max(run.epsilon for run in runs),
            "accountant": "gossip.privacy.RdpAccountant at sigma/2",
        }
    write_summary(args.out / "summary.json", summary)
    for run in runs:
        write_csv(args.out / f"{run.name}.csv", run.history)
        draw_graph(args.out / f"graph-{run.name}.png", run.name, run.graph, args.seed)
    plot_accuracy(args.out / "accuracy.png", runs, centralized.final_accuracy)
    plot_consensus(args.out / "consensus.png", runs)
    print_table(summary, target)
    console.print(f"wrote {args.out}/summary.json, CSVs and plots")


def print_table(summary: dict, target: float) -> None:
    central = summary["centralized"]
    config = summary["config"]
    hostile = config["byzantine"] > 0
    private = config["dp_clip"] is not None
    title = (
        f"{config['task_name']}: {config['nodes']} nodes, {config['rounds']} rounds, "
        f"target accuracy {target:.3f}, aggregator {config['aggregator']}, "
        f"compression {config['compression']}"
    )
    if hostile:
        title += f", {config['byzantine']} Byzantine ({config['attack']})"
    if private:
        title += f", DP epsilon at delta {summary['privacy']['delta']:g}"
    table = Table(title=title)
    columns = ["topology", "acc mean", "acc min"]
    if hostile:
        columns += ["honest mean", "honest min"]
    columns += ["rounds to target", "spectral gap", "final consensus dist", "KB/node/round"]
    if private:
        columns.append("epsilon")
    columns.append("seconds")
    for column in columns:
        table.add_column(column, justify="left" if column == "topology" else "right")
    blanks = [""] * (len(columns) - 3)
    table.add_row(
        "centralized",
        f"{central['final_accuracy']:.3f}",
        "",
        *blanks[:-1],
        f"{central['seconds']:.1f}",
    )
    for name, t in summary["topologies"].items():
        rounds = t["rounds_to_target"]
        row = [name, f"{t['final_accuracy_mean']:.3f}", f"{t['final_accuracy_min']:.3f}"]
        if hostile:
            row += [f"{t['honest_accuracy_mean']:.3f}", f"{t['honest_accuracy_min']:.3f}"]
        row += [
            "-" if rounds is None else str(rounds),
            f"{t['spectral_gap']:.4f}",
            f"{t['consensus_distance'][-1]:.2e}",
            f"{t['bytes_per_node_per_round'] / 1024:.2f}",
        ]
        if private:
            row.append(f"{t['epsilon']:.3g}")
        row.append(f"{t['seconds']:.1f}")
        table.add_row(*row)
    out = Console()
    if not out.is_terminal:
        out = Console(width=170)  # a log file or pipe: do not squeeze the table to 80 columns
    out.print(table)


if __name__ == "__main__":
    sys.exit(main())
