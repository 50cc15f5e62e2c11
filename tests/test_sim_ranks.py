"""The simulator over torch.distributed ranks: the same summary as one process, and a wrong
launch that fails in one line instead of hanging (gloo, on this machine)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from topologies.graphs import small_world
from topologies.network import NetworkConditions, NetworkModel
from topologies.ranks import Halo, Ranks

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "simulate.py"
SMALL = ("--topology", "small-world", "--nodes", "12", "--degree", "4", "--rounds", "3")
SMALL += ("--local-epochs", "1")
EXPERIMENTS = {
    "mean, loss, delay, churn": ("--loss", "0.1", "--delay", "1", "--churn", "0.1"),
    "robust rule, Byzantine, DP, top-k": (
        "--byzantine", "2", "--attack", "noise", "--aggregator", "trimmed-mean",
        "--dp-clip", "1", "--dp-noise", "0.5", "--compression", "topk:0.1",
    ),
}


def environment(**extra: str) -> dict[str, str]:
    # This checkout's packages, whatever the venv's editable install points at.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def run(command: list[str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=environment(**extra), capture_output=True, text=True, timeout=600
    )


def same_numbers(one: Any, other: Any, path: str = "") -> list[str]:
    """Where two summaries differ, seconds and the rank count aside (relative 1e-6)."""
    if isinstance(one, dict):
        return [
            diff
            for key in one
            if key not in ("seconds", "ranks", "out")
            for diff in same_numbers(one[key], other[key], f"{path}/{key}")
        ]
    if isinstance(one, list):
        assert len(one) == len(other), path
        pairs = enumerate(zip(one, other, strict=True))
        return [d for i, (a, b) in pairs for d in same_numbers(a, b, f"{path}[{i}]")]
    if isinstance(one, float) and isinstance(other, float):
        if math.isnan(one) and math.isnan(other):
            return []
        return [] if abs(one - other) <= 1e-6 * max(abs(one), 1e-12) else [f"{path}: {one} {other}"]
    return [] if one == other else [f"{path}: {one} {other}"]


@pytest.mark.parametrize("flags", EXPERIMENTS.values(), ids=EXPERIMENTS.keys())
def test_two_ranks_give_the_summary_of_one_process(tmp_path, flags):
    one, two = tmp_path / "one", tmp_path / "two"
    alone = run([sys.executable, str(SCRIPT), *SMALL, *flags, "--out", str(one)])
    assert alone.returncode == 0, alone.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    ranked = run([*torchrun, "--nproc-per-node", "2", str(SCRIPT), *SMALL, *flags,
                  "--out", str(two)])
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    first = json.loads((one / "summary.json").read_text())
    second = json.loads((two / "summary.json").read_text())
    assert (first["ranks"], second["ranks"]) == (1, 2)
    assert same_numbers(first, second) == []
    # Accuracies are per node and bitwise equal; only the reductions' order differs.
    for name, entry in first["topologies"].items():
        assert entry["final_accuracy_mean"] == second["topologies"][name]["final_accuracy_mean"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_hand(rank: int, world: int, port: int, *flags: str) -> subprocess.Popen:
    """One rank started as torchrun starts it: the rendezvous in the environment."""
    env = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_ranks_launched_with_different_settings_fail_in_one_line_naming_the_flag(tmp_path):
    port = free_port()
    common = ("--rounds", "1", "--rank-timeout", "60", "--out", str(tmp_path))
    ranks = [by_hand(0, 2, port, "--nodes", "8", *common),
             by_hand(1, 2, port, "--nodes", "10", *common)]
    for process in ranks:
        line = one_error_line(process)
        assert "different settings" in line and "--nodes (rank 0: 8, rank 1: 10)" in line


def test_a_rank_that_never_comes_fails_the_others_in_one_line(tmp_path):
    alone = by_hand(0, 2, free_port(), "--rounds", "1", "--rank-timeout", "3",
                    "--out", str(tmp_path))
    assert "--rank-timeout 3 s" in one_error_line(alone)
    assert not (tmp_path / "summary.json").exists()


def test_what_is_not_sharded_is_refused_in_one_line_naming_the_flag(tmp_path):
    refused = run([sys.executable, str(SCRIPT), "--byzantine", "1", "--attack", "alie",
                   "--out", str(tmp_path)], WORLD_SIZE="2", RANK="0")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "simulate.py: error: --attack: alie is not sharded: run it on 1 rank, not 2"
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_receives_exactly_what_the_others_send_and_its_arcs_read(world):
    graph = small_world(30, 4, 0.3, seed=2)
    net = NetworkModel(graph, NetworkConditions(), seed=0)
    halos = [Halo(Ranks(rank, world), 30, net.src, net.dst) for rank in range(world)]
    for rank, halo in enumerate(halos):
        into = (net.dst >= halo.lo) & (net.dst < halo.hi)
        assert set(net.src[into]) <= set(halo.ids.tolist())
        assert (np.diff(halo.ids) > 0).all()  # node order: mixing sums in one rank's order
        for peer, rows in halo.receive.items():
            sent = halos[peer].send[rank].numpy() + halos[peer].lo
            np.testing.assert_array_equal(halo.ids[rows], sent)
    assert sum(h.hi - h.lo for h in halos) == 30
