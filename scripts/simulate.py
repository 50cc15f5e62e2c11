#!/usr/bin/env python3
"""Compare gossip topologies in simulation: n nodes, real local training, push-sum averaging.

Every node trains on its own shard of the task's train split, then does one
push-sum step with its graph neighbours, for --rounds rounds, over a simulated
network with message loss, per-link delay and churn. The complete graph (the
FedAvg baseline) is always run, and a centralized model trained on all the
data for rounds x local-epochs epochs gives the reference accuracy.

Writes to --out: summary.json, <topology>.csv (one row per round),
accuracy.png, consensus.png and graph-<topology>.png (for up to 64 nodes).

Under torchrun, the nodes are split over the ranks (same results, less memory per
process); rank 0 writes the outputs:
  torchrun --standalone --nproc-per-node 2 scripts/simulate.py --nodes 10000 ...
  torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \
      --rdzv-endpoint HOST:29400 scripts/simulate.py --nodes 100000 ...

Examples:
  scripts/simulate.py --topology all --nodes 32 --rounds 50
  scripts/simulate.py --topology ring --nodes 16 --partition iid --loss 0.1 --churn 0.2
  scripts/simulate.py --task mypackage.tasks:make_task --topology small-world --degree 6
  scripts/simulate.py --topology small-world --degree 6 --byzantine 4 --attack scale \
      --aggregator clipped
  scripts/simulate.py --topology small-world --compression topk:0.01 --dp-clip 1 --dp-noise 1
  scripts/simulate.py --topology small-world --dp sample --dp-clip 1 --dp-noise 1
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep rather than spin: on a busy 2-core machine spinning made
# runs 3-5x slower (see scripts/bench_simulate.py). libgomp reads this when torch loads,
# and the settings schema below imports torch, so it comes before every other import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from fltasks import TaskError, load_task, parse_partition, partition  # noqa: E402
from topologies.experiment import (  # noqa: E402
    TARGET_FRACTION,
    experiment_summary,
    run_experiment,
    summary_table,
    topology_names,
    write_outputs,
)
from topologies.graphs import TOPOLOGIES, make_graph  # noqa: E402
from topologies.ranks import (  # noqa: E402
    Ranks,
    check_shardable,
    close_ranks,
    init_ranks,
    launched_ranks,
)
from topologies.settings import (  # noqa: E402
    SettingError,
    add_flags,
    config_from_flags,
    flag_name,
    load_toml,
)
from topologies.simulator import centralized_baseline  # noqa: E402

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
    # Ranks on one machine share its cores (torchrun says how many run here).
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // local))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so that --task module:function finds the user's module

    try:
        settings = load_toml(args.config) if args.config is not None else {}
        options = config_from_flags(args, settings)
        config = options.simulation_config()
        check_shardable(options.attack, options.byzantine, launched_ranks())
    except SettingError as error:
        return fail(setting_error(error))
    if launched_ranks() == 1:
        return simulate(options, config, Ranks())
    try:
        ranks = init_ranks(options.rank_timeout)
    except (RuntimeError, ValueError) as exc:
        return fail(
            f"rank {os.environ.get('RANK', '?')}: the other ranks did not all join within "
            f"--rank-timeout {options.rank_timeout:g} s ({first_line(exc)})"
        )
    try:
        disagreement = differing_settings(ranks, options)
        if disagreement:
            return fail(f"the ranks were launched with different settings: {disagreement}")
        return simulate(options, config, ranks)
    except RuntimeError as exc:  # gloo: a peer closed its connection, or a timeout
        return fail(f"rank {ranks.rank} of {ranks.world} lost the others: {first_line(exc)}")
    finally:
        close_ranks(ranks)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def differing_settings(ranks: Ranks, options: Any) -> str:
    """The flags whose values differ between ranks ('' when all agree), as one phrase."""
    # Where outputs go and how long to wait may differ; everything else shapes the run.
    mine = {k: str(v) for k, v in vars(options).items() if k not in ("out", "rank_timeout")}
    everyone = ranks.gather_objects(mine)
    first = everyone[0]
    assert isinstance(first, dict)
    differing = []
    for name in mine:
        values = [other[name] for other in everyone if isinstance(other, dict)]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            differing.append(f"{flag_name(name)} ({shown})")
    return "; ".join(differing)


def simulate(options: Any, config: Any, ranks: Ranks) -> int:
    """Run every topology; rank 0 alone writes and prints."""
    lead = ranks.rank == 0
    if options.nodes < ranks.world:
        return fail(f"--nodes: {options.nodes} nodes cannot be shared by {ranks.world} ranks")
    names = topology_names(options.topology, TOPOLOGIES)
    try:
        parse_partition(options.partition)
        task = load_task(
            options.task,
            seed=options.seed,
            label=options.label,
            model=options.model,
            task_spec=options.task_spec,
        )
        shards = partition(task.y_train, options.nodes, options.partition, seed=options.seed)
        graphs = {
            name: make_graph(name, options.nodes, options.degree, options.rewire, seed=options.seed)
            for name in names
        }
    except (TaskError, ValueError) as exc:
        return fail(str(exc).splitlines()[0])
    try:
        if lead:
            options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the output directory {options.out}: {exc.strerror}")

    if not lead:  # the others only simulate their blocks; rank 0 reports
        run_experiment(task, shards, graphs, config, None, ranks)
        return 0
    epochs = options.rounds * options.local_epochs
    with console.status(f"centralized baseline: {epochs} epochs on all the data"):
        centralized = centralized_baseline(task, epochs, options.seed)
    target = options.target or TARGET_FRACTION * centralized.final_accuracy
    total = options.rounds + options.linger_rounds
    progress, advance = progress_bars(total, names, options.byzantine > 0)
    with progress:
        runs = run_experiment(task, shards, graphs, config, advance, ranks)
    summary = experiment_summary(options, task, centralized, runs, target, ranks.world)
    write_outputs(options.out, summary, runs, centralized.final_accuracy, options.seed)
    out = Console()
    if not out.is_terminal:
        out = Console(width=170)  # a log file or pipe: do not squeeze the table to 80 columns
    out.print(summary_table(summary, target))
    console.print(f"wrote {options.out}/summary.json, CSVs and plots")
    return 0


def progress_bars(rounds: int, names: list[str], byzantine: bool) -> tuple[Progress, Any]:
    """One rich progress bar per topology, and the per-round callback that advances them."""
    progress = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    bars = {name: progress.add_task(name, total=rounds, status="") for name in names}

    def advance(name: str, m: Any) -> None:
        accuracy = m.honest_accuracy_mean if byzantine else m.accuracy_mean
        status = f"{'honest ' if byzantine else ''}acc {accuracy:.3f}  "
        progress.update(bars[name], advance=1, status=status + f"dist {m.consensus_distance:.2e}")

    return progress, advance


if __name__ == "__main__":
    sys.exit(main())
