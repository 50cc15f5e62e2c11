"""What watching a network of daemons shows: the live table, the accuracy history, its plot.

One table for ``make demo`` (scripts/local_network.py) and the network lab
(scripts/netlab.py, scripts/bench_bandwidth.py), drawn from the daemons' /status.
:class:`History` keeps every poll's accuracy per host and writes it as JSON and as
a PNG of accuracy against time (matplotlib's Agg backend: no display needed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

Status = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """One host of the table: its label (index), where it is, and its /status or None."""

    label: str
    where: str
    status: Status | None
    final_accuracy: float | None = None
    """For a node that has exited: the accuracy it printed when it stopped."""


def status_table(title: str, rows: Sequence[Row], rounds: int | None = None) -> Table:
    """The live table: round, accuracy, neighbours, peers known, updates, failures, MB, weight."""
    table = Table(title=title)
    columns = ("node", "where", "round", "accuracy", "neighbours", "known", "accepted",
               "rejected", "failed", "sent MB", "weight")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "where" else "right")
    for row in rows:
        status = row.status
        if status is None:
            done = row.final_accuracy is not None
            accuracy = f"{row.final_accuracy:.4f}" if done else "-"
            table.add_row(row.label, row.where, "done" if done else "-", accuracy,
                          *[""] * (len(columns) - 4))  # fmt: skip
            continue
        accuracy = status["accuracy"]
        if status.get("state") == "serving":  # finished its rounds, gossiping for late starters
            progress = "serving"
        else:
            progress = str(status["round"]) + (f"/{rounds}" if rounds else "")
        table.add_row(
            row.label,
            row.where,
            progress,
            "-" if accuracy is None else f"{accuracy:.4f}",
            str(len(status["neighbours"])),
            str(status["known_peers"]),
            str(status["updates_accepted"]),
            str(sum(status["updates_rejected"].values())),
            str(sum(status["send_failures"].values())),
            f"{status['bytes_sent'] / 1e6:.2f}",
            f"{status['weight']:.1f}",
        )
    return table


@dataclass(frozen=True)
class Sample:
    seconds: float
    host: int
    round: int
    accuracy: float | None
    weight: float


@dataclass
class History:
    """Every poll's round, accuracy and push-sum weight per host, against seconds since start."""

    title: str
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Other measures over time (e.g. the consensus distance), plotted on a second axis."""

    def now(self) -> float:
        return time.monotonic() - self.started

    def record(self, statuses: Sequence[Status | None]) -> None:
        seconds = round(self.now(), 3)
        for host, status in enumerate(statuses):
            if status is not None:
                self.samples.append(
                    Sample(seconds, host, status["round"], status["accuracy"], status["weight"])
                )

    def mark(self, label: str) -> None:
        """An event (a cut, a heal) drawn as a vertical line."""
        self.events.append((round(self.now(), 3), label))

    log_scale: set[str] = field(default_factory=set)
    """Series drawn on a log axis."""

    def add(self, name: str, value: float, log: bool = False) -> None:
        self.series.setdefault(name, []).append((round(self.now(), 3), value))
        if log:
            self.log_scale.add(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "events": [{"seconds": s, "label": label} for s, label in self.events],
            "samples": [asdict(sample) for sample in self.samples],
            "series": {name: [list(point) for point in points]
                       for name, points in self.series.items()},
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")

    def plot(self, path: Path) -> None:
        """Accuracy against time, one line per host; events as vertical lines."""
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for host in sorted({sample.host for sample in self.samples}):
            points = [(s.seconds, s.accuracy) for s in self.samples
                      if s.host == host and s.accuracy is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=f"host {host}", linewidth=1.2)
        for seconds, label in self.events:
            ax.axvline(seconds, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(label, (seconds, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8)
        ax.set(xlabel="seconds since the lab started", ylabel="test accuracy", title=self.title)
        ax.set_ylim(0.0, 1.0)
        if self.series:
            other = ax.twinx()
            for name, points in self.series.items():
                other.plot(*zip(*points, strict=True), color="grey", linestyle=":", label=name)
            if set(self.series) <= self.log_scale:
                other.set_yscale("log")
            other.set_ylabel(", ".join(self.series))
            other.legend(loc="lower center", fontsize=8)
        ax.legend(loc="lower right", fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
