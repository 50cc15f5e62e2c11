"""Real daemons training ResNet-18 on a locally made image folder: where each round goes.

The data set is made here, nothing is downloaded: scikit-learn's bundled 8x8
digits, upscaled to 32x32 and written as grayscale PNG files in the
``ImageFolder`` layout, each copy shifted by a few pixels and with its contrast
jittered (seeded) so that the files are distinct images
(:func:`fltasks.demo_data.write_digit_images`). Each daemon has its
own folder, as a member has its own data: ``images_per_node / 0.75`` images,
of which it holds out a stratified quarter for validation (evaluated every
round) and trains on the rest (``--shard 0/1``).

``nodes`` real daemons (``p2pfl.lab.localnet.LocalNetwork``: one ``python -m
p2pfl.cli node`` process each, loopback, degree 3) run ``--model resnet18``
(11,181,642 parameters, 44.7 MB raw updates) for ``rounds`` rounds of 1 local
epoch, unpaced, with a per-peer byte budget that one 44.7 MB update a round
fits (``--peer-mb-per-min``). Each daemon logs one ``round N phases {json}``
line per round (p2pfl/phases.py); this module reads them from the logs:

* seconds per phase: train, merge, prepare (encode and sign), evaluate,
  checkpoint and other (the rest of the round: mostly waiting for the gossip
  lock while an admit holds it), one after the other; and send (each push
  until its receipt) and admit (verify and decode), which run in the
  background and are summed over the calls that ended in the round;
* ``overhead_fraction``: everything but training, as a share of the round's
  wall time (sends and admits, in the background, count only as far as they
  delay the round's own phases);
* the event loop's worst stall in the round, and the daemon's peak RSS.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fltasks.datasets import TEST_FRACTION
from fltasks.demo_data import write_digit_images
from p2pfl.lab.localnet import LocalNetwork

GOSSIP_PHASES = ("merge", "prepare", "send", "admit")
ROUND_LINE = re.compile(r"round (\d+) phases (\{.*\})")


@dataclass(frozen=True)
class ResnetRun:
    """What one benchmark run measured: each daemon's round records and peak RSS."""

    rounds: dict[int, list[dict[str, Any]]]  # daemon index -> its round records
    peak_rss_mb: dict[int, float]
    images: int  # per daemon's folder
    seconds: float


def images_for(images_per_node: int) -> int:
    """Files to write so a node's training split holds about ``images_per_node``."""
    return int(round(images_per_node / (1.0 - TEST_FRACTION)))


def round_records(log_path: Path) -> list[dict[str, Any]]:
    """The ``round N phases {json}`` records a daemon logged, in order."""
    records = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = ROUND_LINE.search(line)
        if match:
            records.append(json.loads(match.group(2)))
    return records


def run_resnet(
    directory: Path,
    *,
    nodes: int,
    rounds: int,
    images_per_node: int,
    model: str = "resnet18",
    timeout: float = 3600.0,
) -> ResnetRun:
    """Run the daemons to the end of their rounds and read their records."""
    count = images_for(images_per_node)
    folders = [write_digit_images(directory / f"digits32-{i}", count, seed=i) for i in range(nodes)]
    extra = (
        "--model", model, "--round-interval", "0", "--linger", "0",
        "--min-neighbours", str(nodes - 1), "--peer-mb-per-min", "1024",
    )  # fmt: skip
    # Flags of one daemon come after the shared ones, so its own folder and shard win.
    own = {i: ("--task", f"imagefolder:{folder}", "--shard", "0/1")
           for i, folder in enumerate(folders)}
    started = time.monotonic()
    with LocalNetwork(
        directory / "nodes", nodes, rounds=rounds, task=f"imagefolder:{folders[0]}",
        partition="iid", local_epochs=1, extra_args=extra, node_args=own,
    ) as network:  # fmt: skip
        network.start_all()
        if not network.wait_all_exited(timeout):
            raise RuntimeError(f"the daemons did not finish {rounds} rounds in {timeout:.0f} s")
        records = {node.index: round_records(node.log_path) for node in network.started()}
    seconds = time.monotonic() - started
    peak = {i: max((r["peak_rss_mb"] for r in rs), default=0.0) for i, rs in records.items()}
    return ResnetRun(records, peak, count, seconds)


def round_summary(run: ResnetRun) -> list[dict[str, Any]]:
    """Per round: each phase's mean over the daemons, the fractions, the worst stall."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for records in run.rounds.values():
        for record in records:
            by_round.setdefault(record["round"], []).append(record)
    rows = []
    for number in sorted(by_round):
        records = by_round[number]
        row: dict[str, Any] = {"round": number, "daemons": len(records)}
        for key in records[0]:
            if key.endswith("_s") and key != "worst_stall_s":
                row[key] = round(statistics.fmean(r[key] for r in records), 3)
        row["overhead_fraction"] = round(statistics.fmean(
            1.0 - r["train_s"] / r["round_s"] for r in records), 3)
        row["worst_stall_s"] = max(r["worst_stall_s"] for r in records)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in records)
        rows.append(row)
    return rows
