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


BAD_FLAGS = [
    (("--loss", "1.5"), "--loss"),
    (("--task", "nosuchmodule:make_task"), "nosuchmodule"),
    (("--nodes", "4", "--byzantine", "4"), "--byzantine"),
    (("--compression", "zip"), "--compression"),
    (("--dp-noise", "1"), "--dp-clip"),
    (("--compression", "topk:0.01", "--loss", "0.1"), "--loss"),
]
BAD_SETTINGS = [
    (("--rounds", "5x"), 'rounds = "5"', "--rounds"),
    (("--loss", "1.5"), "loss = 1.5", "--loss"),
    (("--topology", "tree"), 'topology = "tree"', "--topology"),
    (
        ("--trim-fraction", "0.7", "--aggregator", "clipped"),
        'trim_fraction = 0.7\naggregator = "clipped"',
        "--trim-fraction",
    ),
]
# Runs the script's main() once per argv in one process, each with its own stderr, and
# prints [exit status, stderr] for each: what `simulate.py ARGS` would have exited with
# and written, without importing torch once per case. The import's own stderr is the
# process's, checked empty by each test, so each case's one line is all a user would see.
ONE_PROCESS = """
import contextlib, io, json, runpy, sys, traceback
sys.argv = sys.argv[1:]  # [the script]: as `python scripts/simulate.py` sees it
main = runpy.run_path(sys.argv[0], run_name="simulate")["main"]
results = []
for argv in json.loads(sys.stdin.read()):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
        except Exception:  # what the script would have died of, as its traceback
            traceback.print_exc()
            status = 1
    results.append([status, stderr.getvalue()])
print(json.dumps(results))
"""


Run = tuple[int, str, Path]  # exit status, stderr, --out


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Run]:
    """Every bad flag of BAD_FLAGS and BAD_SETTINGS, and every TOML file of BAD_SETTINGS
    as `--config FILE`, run as `simulate.py ARGS --out DIR`; keyed by ARGS or ("toml", TOML)."""
    where = tmp_path_factory.mktemp("bad")
    cases: dict[tuple[str, ...], tuple[str, ...]] = {args: args for args, _ in BAD_FLAGS}
    for index, (flag, toml, _) in enumerate(BAD_SETTINGS):
        config = where / f"run-{index}.toml"
        config.write_text(toml + "\n")
        cases[flag] = flag
        cases[("toml", toml)] = ("--config", str(config))
    outs = {key: where / f"out-{index}" for index, key in enumerate(cases)}
    argvs = [[*args, "--out", str(outs[key])] for key, args in cases.items()]
    done = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, str(SCRIPT)], input=json.dumps(argvs),
        cwd=where, capture_output=True, text=True, timeout=600,  # a guard against a hang
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    results = json.loads(done.stdout)
    return {
        key: (status, stderr, outs[key])
        for key, (status, stderr) in zip(cases, results, strict=True)
    }


@pytest.mark.parametrize("args, cause", BAD_FLAGS)
def test_bad_flag_exits_2_with_one_line(bad_runs, args, cause):
    status, stderr, out = bad_runs[args]
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert cause in lines[0] and "Traceback" not in stderr
    assert not (out / "summary.json").exists()


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


@pytest.mark.parametrize(("flag", "toml", "named"), BAD_SETTINGS)
def test_a_bad_setting_gets_one_line_naming_it_from_a_flag_or_from_toml(
    bad_runs, flag, toml, named
):
    for key in (flag, ("toml", toml)):
        status, stderr, _ = bad_runs[key]
        assert status == 2, stderr
        lines = stderr.strip().splitlines()
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
