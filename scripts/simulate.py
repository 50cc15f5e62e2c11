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
import math
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# torch, scikit-learn and matplotlib are imported in main(), after the flags are
# checked, so that a bad flag is reported in a fraction of a second.
from gossip.aggregation import AGGREGATORS
from topologies.attacks import ATTACKS
from topologies.graphs import TOPOLOGIES

BASELINE = "complete"
TARGET_FRACTION = 0.98
console = Console(stderr=True)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _fraction(text: str, upper_inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(
            f"must be in [0, 1{']' if upper_inclusive else ')'}, got {text}"
        )
    return value


def _rate(text: str) -> float:
    return _fraction(text, upper_inclusive=False)


def _probability(text: str) -> float:
    return _fraction(text, upper_inclusive=True)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _trim_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {text}")
    return value


def _compression(text: str) -> str:
    from topologies.compression import resolve_codec

    try:
        resolve_codec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _accuracy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1], got {text}")
    return value


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
    graph = parser.add_argument_group("graph")
    graph.add_argument(
        "--topology",
        choices=(*TOPOLOGIES, "all"),
        default="all",
        help="graph to simulate; 'all' runs every one (default all). "
        "'complete' (FedAvg) is always added as the baseline",
    )
    graph.add_argument(
        "--nodes",
        type=_int_at_least(2),
        default=32,
        metavar="N",
        help="number of nodes (default 32)",
    )
    graph.add_argument(
        "--degree",
        type=_int_at_least(2),
        default=4,
        metavar="K",
        help="neighbours per node for random (regular degree) and small-world "
        "(k, even) graphs (default 4)",
    )
    graph.add_argument(
        "--rewire",
        type=_probability,
        default=0.1,
        metavar="P",
        help="small-world rewiring probability in [0, 1] (default 0.1)",
    )
    learning = parser.add_argument_group("learning")
    learning.add_argument(
        "--task",
        default="digits",
        help="digits, breast-cancer, csv:PATH (with --label), imagefolder:DIR, or module:function "
        "returning a fltasks.Task (default digits)",
    )
    learning.add_argument("--label", metavar="COLUMN", help="csv tasks: the column to predict")
    learning.add_argument(
        "--model", help="mlp:W,W, cnn or resnet18 in place of the task's default model"
    )
    learning.add_argument(
        "--task-spec", metavar="FILE", help="csv/imagefolder: the members' shared task spec"
    )
    learning.add_argument(
        "--partition",
        default="dirichlet:0.5",
        help="how the train split is shared: iid, dirichlet:ALPHA (label "
        "skew) or quantity:ALPHA (size skew) (default dirichlet:0.5)",
    )
    learning.add_argument(
        "--rounds",
        type=_int_at_least(1),
        default=50,
        metavar="R",
        help="gossip rounds (default 50)",
    )
    learning.add_argument(
        "--local-epochs",
        type=_int_at_least(1),
        default=1,
        metavar="E",
        help="epochs over its own shard each node runs per round (default 1)",
    )
    learning.add_argument(
        "--target",
        type=_accuracy,
        default=None,
        metavar="ACC",
        help="accuracy for rounds_to_target (default "
        f"{TARGET_FRACTION} x the centralized final accuracy)",
    )
    network = parser.add_argument_group("simulated network")
    network.add_argument(
        "--loss",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="probability that a message is lost in transit (default 0)",
    )
    network.add_argument(
        "--delay",
        type=_int_at_least(0),
        default=0,
        metavar="ROUNDS",
        help="maximum per-link delay in rounds; each link's delay is drawn "
        "once from 0..ROUNDS (default 0)",
    )
    network.add_argument(
        "--churn",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="fraction of nodes offline in each round, drawn afresh (default 0)",
    )
    hostile = parser.add_argument_group("hostile peers")
    hostile.add_argument(
        "--aggregator",
        choices=tuple(AGGREGATORS),
        default="mean",
        help="how a node folds in what it received: mean (exact push-sum, "
        "default) or gossip's robust rules",
    )
    hostile.add_argument(
        "--trim-fraction",
        type=_trim_fraction,
        default=None,
        metavar="BETA",
        help="trimmed-mean: fraction trimmed from each end; clipped: fraction "
        "of received estimates clipped (default gossip's 0.2)",
    )
    hostile.add_argument(
        "--clip-radius",
        type=_non_negative,
        default=None,
        metavar="TAU",
        help="clipped: fixed clipping radius (default adaptive)",
    )
    hostile.add_argument(
        "--byzantine",
        type=_int_at_least(0),
        default=0,
        metavar="F",
        help="number of Byzantine nodes, drawn with the seed (default 0)",
    )
    hostile.add_argument(
        "--attack",
        choices=ATTACKS,
        default="sign-flip",
        help="what Byzantine nodes send (default sign-flip)",
    )
    hostile.add_argument(
        "--attack-scale",
        type=_finite,
        default=None,
        metavar="S",
        help="sign-flip: -S z (default 1); scale: S z (default 10); noise: "
        "std S (default 1); alie: S std below the mean (default the "
        "paper's z_max for n and F)",
    )
    privacy = parser.add_argument_group("differential privacy (off by default)")
    privacy.add_argument(
        "--dp-clip",
        type=_positive,
        default=None,
        metavar="C",
        help="clip every honest node's round delta to L2 norm C",
    )
    privacy.add_argument(
        "--dp-noise",
        type=_positive,
        default=None,
        metavar="SIGMA",
        help="add N(0, (SIGMA C)^2) per coordinate to the clipped delta",
    )
    compression = parser.add_argument_group("compression")
    compression.add_argument(
        "--compression",
        type=_compression,
        default="none",
        metavar="CODEC",
        help="none, fp16, int8 or topk:FRACTION (default none)",
    )
    compression.add_argument(
        "--choco-step",
        type=_positive,
        default=None,
        metavar="GAMMA",
        help="topk only: step of the public-copy mixing, in (0, 1] (default 1)",
    )
    compression.add_argument(
        "--choco-compensation",
        type=_probability,
        default=None,
        metavar="C",
        help="topk only: fraction in [0, 1] of the mass its sparse messages did not carry "
        "that a sender keeps; 1 conserves mass (CHOCO), 0 drops it (default 0)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    run.add_argument(
        "--out",
        type=Path,
        default=Path("runs/simulate"),
        metavar="DIR",
        help="output directory (default runs/simulate)",
    )
    run.add_argument(
        "--float64",
        action="store_true",
        help="keep and mix the stacked models in float64 (default float32)",
    )
    return parser


def _flag_names(message: str) -> str:
    """Config errors name fields; the user typed flags."""
    for field, flag in (
        ("trim fraction and clip radius", "--trim-fraction and --clip-radius"),
        ("the CHOCO step and compensation", "--choco-step and --choco-compensation"),
        ("the CHOCO step", "--choco-step"),
        ("the CHOCO compensation", "--choco-compensation"),
        ("needs delay 0", "needs --delay 0"),
        ("it needs loss, delay and churn 0", "it needs --loss 0 --delay 0 --churn 0"),
    ):
        message = message.replace(field, flag)
    return message


def fail(message: str) -> int:
    print(f"simulate.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Waiting OpenMP threads sleep rather than spin: on a busy 2-core machine spinning
    # made runs 3-5x slower (see scripts/bench_simulate.py). Must precede importing torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fltasks import TaskError, load_task, parse_partition, partition
    from topologies.graphs import make_graph
    from topologies.network import NetworkConditions
    from topologies.simulator import SimulationConfig, centralized_baseline

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so that --task module:function finds the user's module

    if args.byzantine >= args.nodes:
        return fail(f"--byzantine must be below --nodes ({args.nodes}), got {args.byzantine}")
    if (args.dp_clip is None) != (args.dp_noise is None):
        return fail("--dp-clip and --dp-noise go together: give both or neither")
    names = list(TOPOLOGIES) if args.topology == "all" else [args.topology]
    if BASELINE not in names:
        names.append(BASELINE)
    try:
        parse_partition(args.partition)
        task = load_task(
            args.task, seed=args.seed, label=args.label, model=args.model, task_spec=args.task_spec
        )
        shards = partition(task.y_train, args.nodes, args.partition, seed=args.seed)
        graphs = {
            name: make_graph(name, args.nodes, args.degree, args.rewire, seed=args.seed)
            for name in names
        }
    except (TaskError, ValueError) as exc:
        return fail(str(exc).splitlines()[0])
    conditions = NetworkConditions(loss=args.loss, delay=args.delay, churn=args.churn)
    try:
        config = SimulationConfig(
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            network=conditions,
            seed=args.seed,
            dtype=torch.float64 if args.float64 else torch.float32,
            aggregator=args.aggregator,
            trim_fraction=args.trim_fraction,
            clip_radius=args.clip_radius,
            byzantine=args.byzantine,
            attack=args.attack,
            attack_scale=args.attack_scale,
            dp_clip=args.dp_clip,
            dp_noise=args.dp_noise,
            compression=args.compression,
            **({} if args.choco_step is None else {"choco_step": args.choco_step}),
            **(
                {}
                if args.choco_compensation is None
                else {"choco_compensation": args.choco_compensation}
            ),
        )
    except ValueError as exc:
        return fail(_flag_names(str(exc).splitlines()[0]))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the output directory {args.out}: {exc.strerror}")

    epochs = args.rounds * args.local_epochs
    with console.status(f"centralized baseline: {epochs} epochs on all the data"):
        centralized = centralized_baseline(task, epochs, args.seed)
    target = (
        args.target if args.target is not None else TARGET_FRACTION * centralized.final_accuracy
    )
    runs = simulate_all(args, task, shards, graphs, config, names)
    write_outputs(args, task, centralized, runs, target)
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
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
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
