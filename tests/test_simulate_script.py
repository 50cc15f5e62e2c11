"""scripts/simulate.py as a user runs it: a subprocess with the venv's python."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "simulate.py"
TOPOLOGIES = ("ring", "random", "small-world", "complete", "star")
TOPOLOGY_FIELDS = {
    "final_accuracy_mean",
    "final_accuracy_min",
    "target_accuracy",
    "rounds_to_target",
    "consensus_distance",
    "spectral_gap",
    "bytes_per_node_per_round",
    "seconds",
}
FLAGS = {
    "topology",
    "nodes",
    "degree",
    "rewire",
    "rounds",
    "local_epochs",
    "task",
    "partition",
    "loss",
    "delay",
    "churn",
    "seed",
    "out",
}


def simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        # A guard against a hang: importing torch alone takes minutes on a busy machine.
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_small_run_writes_every_promised_field_and_plot(tmp_path):
    out = tmp_path / "run"
    result = simulate(
        "--topology",
        "all",
        "--nodes",
        "8",
        "--rounds",
        "3",
        "--local-epochs",
        "1",
        "--loss",
        "0.1",
        "--delay",
        "1",
        "--churn",
        "0.1",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert FLAGS <= set(summary["config"])
    assert set(summary["centralized"]) >= {"final_accuracy", "seconds"}
    assert 0.5 < summary["centralized"]["final_accuracy"] <= 1.0
    assert set(summary["topologies"]) == set(TOPOLOGIES)
    for name, entry in summary["topologies"].items():
        assert TOPOLOGY_FIELDS <= set(entry), name
        assert len(entry["consensus_distance"]) == 3
        assert 0.0 <= entry["final_accuracy_min"] <= entry["final_accuracy_mean"] <= 1.0
        assert 0.0 < entry["spectral_gap"] <= 1.0
        assert entry["bytes_per_node_per_round"] > 0
        assert entry["rounds_to_target"] is None or 1 <= entry["rounds_to_target"] <= 3
        rows = (out / f"{name}.csv").read_text().splitlines()
        assert rows[0].startswith("round,accuracy_mean,accuracy_min,accuracy_max,")
        assert len(rows) == 1 + 3
        assert (out / f"graph-{name}.png").stat().st_size > 0
    for plot in ("accuracy.png", "consensus.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, cause",
    [
        (("--loss", "1.5"), "--loss"),
        (("--task", "nosuchmodule:make_task"), "nosuchmodule"),
        (("--nodes", "4", "--byzantine", "4"), "--byzantine"),
        (("--compression", "zip"), "--compression"),
        (("--dp-noise", "1"), "--dp-clip"),
        (("--compression", "topk:0.01", "--loss", "0.1"), "--loss"),
    ],
)
def test_bad_flag_exits_2_with_one_line(tmp_path, args, cause):
    result = simulate(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert cause in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_hostile_private_compressed_run_reports_honest_accuracy_bytes_and_epsilon(tmp_path):
    out = tmp_path / "run"
    flags = ("--topology", "ring", "--nodes", "8", "--rounds", "2", "--local-epochs", "1")
    flags += ("--out", str(out))
    hostile = ("--byzantine", "1", "--attack", "sign-flip", "--aggregator", "clipped")
    private = ("--dp-clip", "1", "--dp-noise", "0.5", "--compression", "int8")
    result = simulate(*flags, *hostile, *private, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["delta"] == 1e-5 and summary["privacy"]["epsilon"] > 0
    for entry in summary["topologies"].values():
        assert 0.0 <= entry["honest_accuracy_min"] <= entry["honest_accuracy_mean"] <= 1.0
        assert entry["epsilon"] == summary["privacy"]["epsilon"]
        assert entry["delta"] == 1e-5
        assert entry["message_bytes"] < 0.3 * 4 * 4810  # int8
    for column in ("honest mean", "honest min", "epsilon", "KB/node/round"):
        assert column in result.stdout


@pytest.mark.parametrize(
    ("flag", "toml", "named"),
    [
        (("--rounds", "5x"), 'rounds = "5"', "--rounds"),
        (("--loss", "1.5"), "loss = 1.5", "--loss"),
        (("--topology", "tree"), 'topology = "tree"', "--topology"),
        (
            ("--trim-fraction", "0.7", "--aggregator", "clipped"),
            'trim_fraction = 0.7\naggregator = "clipped"',
            "--trim-fraction",
        ),
    ],
)
def test_a_bad_setting_gets_one_line_naming_it_from_a_flag_or_from_toml(
    tmp_path, flag, toml, named
):
    config = tmp_path / "run.toml"
    config.write_text(toml + "\n")
    for args in (flag, ("--config", str(config))):
        result = simulate(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"simulate.py: error: {named}"), lines


def test_every_setting_is_a_flag_and_a_toml_key_with_the_simulators_default(tmp_path):
    from dataclasses import fields

    from topologies.network import NetworkConditions
    from topologies.settings import ExperimentConfig, add_flags, config_from_flags, load_toml
    from topologies.simulator import SimulationConfig

    parser = argparse.ArgumentParser()
    add_flags(parser)
    assert config_from_flags(parser.parse_args([])) == ExperimentConfig()
    simulator = {**vars(SimulationConfig()), **vars(NetworkConditions())}
    for item in fields(ExperimentConfig):
        assert item.metadata["help"], item.name
        if item.name in simulator and item.name != "network":
            assert item.default == simulator[item.name], item.name
    config = tmp_path / "run.toml"
    config.write_text('rounds = 7\nloss = 0.25\nout = "elsewhere"\n')
    from_file = config_from_flags(parser.parse_args(["--loss", "0.5"]), load_toml(config))
    assert (from_file.rounds, from_file.loss, from_file.out) == (7, 0.5, Path("elsewhere"))
    config.write_text("round = 7\n")
    with pytest.raises(ValueError, match="unknown key.*round"):
        load_toml(config)
