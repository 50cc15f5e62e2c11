"""One simulator experiment: every topology on the same task and shards, then its outputs.

:func:`run_experiment` builds each graph's :class:`~topologies.simulator.Simulation`
and runs it; :func:`experiment_summary` gathers what ``summary.json`` holds;
:func:`write_outputs` writes it with the CSVs and plots; :func:`summary_table`
is the table ``scripts/simulate.py`` prints. The script only parses flags,
shows progress and prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import networkx as nx
from rich.table import Table

from fltasks import Task
from topologies.mixing import metropolis_hastings, spectral_gap
from topologies.privacy import DELTA
from topologies.ranks import Ranks
from topologies.report import (
    TopologyRun,
    draw_graph,
    plot_accuracy,
    plot_consensus,
    topology_summary,
    write_csv,
    write_summary,
)
from topologies.settings import ExperimentConfig
from topologies.simulator import RoundMetrics, Simulation, SimulationConfig

BASELINE = "complete"
TARGET_FRACTION = 0.98  # of the centralized accuracy, when no --target is given

# (topology name, metrics of the round just done)
RoundCallback = Callable[[str, RoundMetrics], None]


def topology_names(choice: str, all_names: Sequence[str]) -> list[str]:
    """The topologies to run for ``choice`` ('all' or one name), the baseline always added."""
    names = list(all_names) if choice == "all" else [choice]
    if BASELINE not in names:
        names.append(BASELINE)
    return names


def run_experiment(
    task: Task,
    shards: Any,
    graphs: Mapping[str, nx.Graph],
    config: SimulationConfig,
    on_round: RoundCallback | None = None,
    ranks: Ranks | None = None,
) -> list[TopologyRun]:
    """Simulate every graph in turn with the same task, shards and config.

    Over ``ranks`` each rank runs its block of every graph; the runs' metrics
    are the whole population's on every rank, and only rank 0 (which writes
    them) computes the spectral gaps.
    """
    ranks = ranks if ranks is not None else Ranks()
    runs = []
    for name, graph in graphs.items():
        start = time.perf_counter()
        simulation = Simulation.for_task(task, graph, shards, config, ranks=ranks)
        history = simulation.run(None if on_round is None else lambda m, n=name: on_round(n, m))
        seconds = time.perf_counter() - start
        epsilon = simulation.epsilon()
        runs.append(
            TopologyRun(
                name,
                graph,
                history,
                spectral_gap(metropolis_hastings(graph)) if ranks.rank == 0 else float("nan"),
                seconds,
                simulation.message_bytes,
                epsilon,
                None if epsilon is None else DELTA,
            )
        )
    return runs


def experiment_summary(
    options: ExperimentConfig,
    task: Task,
    centralized: Any,
    runs: Sequence[TopologyRun],
    target: float,
    ranks: int = 1,
) -> dict[str, Any]:
    """What ``summary.json`` holds: the settings, the centralized reference, each topology,
    and the number of ranks that ran it."""
    summary: dict[str, Any] = {
        "ranks": ranks,
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
            "message_bytes": runs[0].message_bytes,
            "task_name": task.name,
        },
        "centralized": {
            "final_accuracy": centralized.final_accuracy,
            "seconds": centralized.seconds,
            "epochs": options.rounds * options.local_epochs,
        },
        "topologies": {run.name: topology_summary(run, target) for run in runs},
    }
    if options.dp_clip is not None:
        summary["privacy"] = {
            "clip_norm": options.dp_clip,
            "noise_multiplier": options.dp_noise,
            **({"learning_rate": options.dp_lr} if options.dp == "sample" else {}),
            "delta": runs[0].delta,
            "epsilon": max(run.epsilon for run in runs),
            "mode": options.dp,
            "accountant": (
                "opacus RDPAccountant (subsampled Gaussian, add/remove one record)"
                if options.dp == "sample"
                else "gossip.privacy.RdpAccountant at sigma/2 (replace one record)"
            ),
        }
    return summary


def write_outputs(
    out: Path,
    summary: Mapping[str, Any],
    runs: Sequence[TopologyRun],
    centralized: float,
    seed: int,
) -> None:
    """summary.json, one CSV and one graph drawing per topology, and the two plots."""
    write_summary(out / "summary.json", summary)
    for run in runs:
        write_csv(out / f"{run.name}.csv", run.history)
        draw_graph(out / f"graph-{run.name}.png", run.name, run.graph, seed)
    plot_accuracy(out / "accuracy.png", runs, centralized)
    plot_consensus(out / "consensus.png", runs)


def summary_table(summary: Mapping[str, Any], target: float) -> Table:
    """The results as one table: centralized first, then each topology."""
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
    return table
