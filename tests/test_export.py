"""Issue 23: a node trained on a CSV, exported, and used: safetensors, ONNX, torch, predict.

One real daemon (a lone node, subprocess) trains on scikit-learn's breast-cancer
table written as a CSV with an added categorical column, so the ONNX graph's
one-hot encoding is exercised as well as its standardisation.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import p2pfl
from fltasks.demo_data import write_cancer_csv

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
SITES = ("east", "north", "south")


def run_p2pfl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "p2pfl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def with_site_column(source: Path, target: Path, drop_label: bool = False) -> Path:
    """The CSV with a categorical ``site`` column in the middle (and without the label)."""
    with source.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    out = [[*header[:3], "site", *header[3:]]]
    out += [[*row[:3], SITES[i % 3], *row[3:]] for i, row in enumerate(body)]
    if drop_label:
        out = [row[:-1] for row in out]
    with target.open("w", newline="") as handle:
        csv.writer(handle).writerows(out)
    return target


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lone node's state dir after 3 rounds on the CSV."""
    root = tmp_path_factory.mktemp("export")
    data = with_site_column(write_cancer_csv(root / "plain.csv"), root / "records.csv")
    assert run_p2pfl("keygen", "node.key", cwd=root).returncode == 0
    done = run_p2pfl("node", "--key", "node.key", "--state-dir", "state", "--task",
                     f"csv:{data}", "--label", "diagnosis", "--min-neighbours", "0",
                     "--rounds", "3", "--round-interval", "0", "--listen",
                     "/ip4/127.0.0.1/tcp/0", "--status-addr", "127.0.0.1:0", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    # A lone node stops at its last round instead of serving nobody for --linger.
    assert "no peers to serve, stopping" in done.stderr
    return root


def test_exports_to_safetensors_onnx_and_torch_with_a_card(trained: Path) -> None:
    for fmt, name in (("safetensors", "m.safetensors"), ("onnx", "m.onnx"), ("torch", "m.pt")):
        done = run_p2pfl("export", "--state-dir", "state", "--out", name, "--format", fmt,
                         cwd=trained)
        assert done.returncode == 0, done.stderr
        card = (trained / f"{name}.md").read_text()
        assert "without differential privacy" in card and "this node alone" in card
        assert "not tested on" in card
    from safetensors import safe_open

    with safe_open(str(trained / "m.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert meta["members_merged"] == "0" and meta["round"] == "3"
    assert float(meta["accuracy"]) > 0.85
    assert json.loads(meta["inputs"])["categories"] == {"site": list(SITES)}
    state_dict = torch.load(trained / "m.pt", weights_only=True)
    assert state_dict.keys() == tensors.keys()
    for key, value in state_dict.items():
        assert torch.equal(value, tensors[key])


def test_predict_labels_a_new_csv_and_onnxruntime_agrees_on_every_row(trained: Path) -> None:
    import onnxruntime

    new = with_site_column(write_cancer_csv(trained / "plain2.csv"), trained / "new.csv",
                           drop_label=True)
    assert run_p2pfl("export", "--state-dir", "state", "--out", "g.onnx", "--format", "onnx",
                     cwd=trained).returncode == 0
    done = run_p2pfl("predict", "--state-dir", "state", "--task", f"csv:{new}", "--out",
                     "preds.csv", cwd=trained)
    assert done.returncode == 0, done.stderr
    with (trained / "preds.csv").open() as handle:
        preds = list(csv.DictReader(handle))
    with new.open() as handle:
        raw = list(csv.DictReader(handle))
    assert len(preds) == len(raw) == 569
    probs = np.array([[float(row["p_benign"]), float(row["p_malignant"])] for row in preds])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    session = onnxruntime.InferenceSession(str(trained / "g.onnx"),
                                           providers=["CPUExecutionProvider"])
    feed = {}
    for column in session.get_inputs():  # one input per CSV column, in file order
        values = [row[column.name] for row in raw]
        feed[column.name] = (np.array(values, dtype=object).reshape(-1, 1)
                             if column.type == "tensor(string)"
                             else np.array(values, dtype=np.float32).reshape(-1, 1))
    assert list(feed) == list(raw[0])
    onnx_probs = session.run(["probabilities"], feed)[0]
    np.testing.assert_allclose(onnx_probs, probs, atol=1e-5, rtol=0)
    predicted = ["benign", "malignant"]
    assert [predicted[i] for i in onnx_probs.argmax(axis=1)] == [r["predicted"] for r in preds]


def test_load_model_gives_an_eval_module_with_preprocessing_and_its_card(trained: Path) -> None:
    model, card = p2pfl.load_model(trained / "state")
    assert not model.training and card.startswith("# Model card")
    x = model.inputs_of(f"csv:{trained / 'records.csv'}")
    probabilities = model(x)
    with (trained / "records.csv").open() as handle:
        truth = [row["diagnosis"] for row in csv.DictReader(handle)]
    predicted = [model.classes[i] for i in probabilities.argmax(dim=1).tolist()]
    assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) > 0.9


def test_evaluate_prints_accuracy_precision_recall_and_confusion(trained: Path) -> None:
    done = run_p2pfl("evaluate", "--state-dir", "state", "--task",
                     f"csv:{trained / 'records.csv'}", cwd=trained)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("accuracy ") and "569 rows" in lines[0]
    assert any(line.startswith("malignant") for line in lines)
    matrix = [line.split()[1:] for line in lines[-2:]]
    assert sum(int(v) for row in matrix for v in row) == 569


@pytest.mark.parametrize("change, named", [("unknown", "'extra'"), ("missing", "'site'")])
def test_a_column_unknown_or_missing_is_one_line_naming_it(trained: Path, change: str,
                                                           named: str) -> None:
    with (trained / "records.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    if change == "unknown":
        rows = [[*row, "extra" if i == 0 else "1"] for i, row in enumerate(rows)]
    else:
        index = rows[0].index("site")
        rows = [row[:index] + row[index + 1:] for row in rows]
    bad = trained / f"{change}.csv"
    with bad.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    done = run_p2pfl("predict", "--state-dir", "state", "--task", f"csv:{bad}", cwd=trained)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr


def test_a_state_dir_without_a_model_is_one_line(tmp_path: Path) -> None:
    done = run_p2pfl("export", "--state-dir", str(tmp_path), "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "model.json" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
