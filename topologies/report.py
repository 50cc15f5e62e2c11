"""What a simulation run leaves on disk: per-round CSVs, summary.json and plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from topologies.simulator import RoundMetrics  # noqa: E402

MAX_DRAWN_NODES = 64
CSV_FIELDS = (
    "round",
    "accuracy_mean",
    "accuracy_min",
    "accuracy_max",
    "consensus_distance",
    "bytes_per_node",
    "online",
    "honest_accuracy_mean",
    "honest_accuracy_min",
)


@dataclass(frozen=True)
class TopologyRun:
    name: str
    graph: nx.Graph
    history: list[RoundMetrics]
    spectral_gap: float
    seconds: float
    message_bytes: int = 0
    epsilon: float | None = None  # differential privacy spent, None without DP
    delta: float | None = None


def rounds_to_target(history: Sequence[RoundMetrics], target: float) -> int | None:
    """The first round whose mean accuracy reaches ``target``, or None."""
    for metrics in history:
        if metrics.accuracy_mean is not None and metrics.accuracy_mean >= target:
            return metrics.round
    return None


def topology_summary(run: TopologyRun, target: float) -> dict:
    history = run.history
    last = history[-1] if history else None
    return {
        "final_accuracy_mean": last.accuracy_mean if last else None,
        "final_accuracy_min": last.accuracy_min if last else None,
        "final_accuracy_max": last.accuracy_max if last else None,
        # Byzantine nodes left out; equal to the figures above without attackers.
        "honest_accuracy_mean": last.honest_accuracy_mean if last else None,
        "honest_accuracy_min": last.honest_accuracy_min if last else None,
        "target_accuracy": target,
        "rounds_to_target": rounds_to_target(history, target),
        "consensus_distance": [m.consensus_distance for m in history],
        "spectral_gap": run.spectral_gap,
        "bytes_per_node_per_round": (
            sum(m.bytes_per_node for m in history) / len(history) if history else 0.0
        ),
        "message_bytes": run.message_bytes,
        "epsilon": run.epsilon,
        "delta": run.delta,
        "seconds": run.seconds,
        "nodes": run.graph.number_of_nodes(),
        "edges": run.graph.number_of_edges(),
    }


def write_csv(path: Path, history: Sequence[RoundMetrics]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for m in history:
            writer.writerow([getattr(m, name) for name in CSV_FIELDS])


def write_summary(path: Path, summary: Mapping) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def plot_accuracy(path: Path, runs: Sequence[TopologyRun], centralized: float) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        rounds = [m.round for m in run.history]
        ax.plot(rounds, [m.accuracy_mean for m in run.history], label=run.name)
        ax.fill_between(
            rounds,
            [m.accuracy_min for m in run.history],
            [m.accuracy_max for m in run.history],
            alpha=0.12,
        )
    ax.axhline(centralized, color="black", linestyle="--", label="centralized")
    _save_per_round(
        fig, ax, path, "test accuracy (mean over nodes; band: min-max)", "Accuracy per round"
    )


def plot_consensus(path: Path, runs: Sequence[TopologyRun]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot(
            [m.round for m in run.history],
            [max(m.consensus_distance, 1e-30) for m in run.history],
            label=run.name,
        )
    ax.set_yscale("log")
    _save_per_round(
        fig, ax, path, "mean squared distance to the mean model", "Consensus distance per round"
    )


def _save_per_round(fig: Figure, ax: Axes, path: Path, ylabel: str, title: str) -> None:
    """Label a plot over whole rounds, save it as ``path`` and free it."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_graph(path: Path, name: str, graph: nx.Graph, seed: int) -> bool:
    """Draw ``graph``; returns False (and draws nothing) above MAX_DRAWN_NODES nodes."""
    if graph.number_of_nodes() > MAX_DRAWN_NODES:
        return False
    fig, ax = plt.subplots(figsize=(5, 5))
    layout = (
        nx.circular_layout(graph)
        if name in ("ring", "small-world", "complete")
        else nx.spring_layout(graph, seed=seed)
    )
    nx.draw_networkx(graph, layout, ax=ax, node_size=120, font_size=6, width=0.6)
    ax.set_title(f"{name}: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
