"""`--task csv:PATH --label COLUMN`: typing, encoding, per-node scaling, and one-line errors.

The CSV files are written here from scikit-learn's bundled data sets.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fltasks import TaskError, load_task
from fltasks.datasets import load_breast_cancer_arrays, load_digits_arrays, stratified_split
from fltasks.tabular import csv_task, read_table

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cancer_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Breast cancer with a categorical 'site' column and text labels."""
    x, y = load_breast_cancer_arrays()
    sites = ["north", "south", "east"]
    header = [f"f{i}" for i in range(x.shape[1])] + ["site", "diagnosis"]
    rows = [[*(str(float(v)) for v in features), sites[i % 3], "benign" if label else "malignant"]
            for i, (features, label) in enumerate(zip(x, y, strict=True))]
    return write_csv(tmp_path_factory.mktemp("csv") / "cancer.csv", header, rows)


def test_csv_task_types_columns_and_learns(cancer_csv: Path) -> None:
    task = load_task(f"csv:{cancer_csv}", seed=0, label="diagnosis")
    assert task.num_classes == 2
    assert task.x_train.shape[1] == 30 + 3  # 30 numbers, one 0/1 feature per site
    model = task.make_model()
    task.train(model, task.x_train, task.y_train, 10, torch.Generator().manual_seed(0))
    assert task.evaluate(model) >= 0.9


def test_categorical_column_is_one_hot_in_sorted_order(cancer_csv: Path) -> None:
    table = read_table(cancer_csv, "diagnosis")
    assert table.categories == {"site": ("east", "north", "south")}
    assert table.features[-3:] == ("site=east", "site=north", "site=south")
    one_hot = table.x[:, -3:]
    assert np.array_equal(one_hot.sum(axis=1), np.ones(len(one_hot)))
    assert np.array_equal(one_hot[:3], [[0, 1, 0], [0, 0, 1], [1, 0, 0]])  # north, south, east
    assert table.classes == ("benign", "malignant")


def test_features_are_standardised_with_this_nodes_training_split_only(cancer_csv: Path) -> None:
    table = read_table(cancer_csv, "diagnosis")
    task = csv_task(cancer_csv, "diagnosis", seed=3)
    train, test = stratified_split(table.y, seed=3)
    mean, std = table.x[train].mean(axis=0), table.x[train].std(axis=0)
    expected_test = (table.x[test] - mean) / std
    assert np.allclose(task.x_test.numpy(), expected_test, atol=1e-5)
    assert torch.allclose(task.x_train.mean(dim=0), torch.zeros(33), atol=1e-5)
    # The validation rows' own statistics were not used: their mean is not zero.
    assert task.x_test.mean(dim=0).abs().max() > 0.05


def test_class_count_and_order_come_from_the_data(tmp_path: Path) -> None:
    x, y = load_digits_arrays()
    labels = np.where(y == 0, 10, y)  # classes 1..10: "10" must sort after "9"
    path = write_csv(tmp_path / "digits.csv", [*(f"p{i}" for i in range(64)), "digit"],
                     [[*map(int, row), label] for row, label in zip(x, labels, strict=True)])
    table = read_table(path, "digit")
    assert table.classes == tuple(str(d) for d in range(1, 11))
    assert np.array_equal(table.y, labels - 1)
    task = csv_task(path, "digit", seed=0)
    assert task.num_classes == 10 and task.x_train.shape[1] == 64


def test_same_seed_gives_same_initial_weights_and_model_flag_applies(cancer_csv: Path) -> None:
    first = csv_task(cancer_csv, "diagnosis", seed=1, model="mlp:16,8").make_model()
    second = csv_task(cancer_csv, "diagnosis", seed=1, model="mlp:16,8").make_model()
    assert [p.shape for p in first.parameters()] == [(16, 33), (16,), (8, 16), (8,), (2, 8), (2,)]
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(),
                                                 strict=True))


BAD_FILES: dict[str, tuple[str, list[str]]] = {
    # case -> (file contents, words the one error line must name)
    "missing-label": ("a,b\n1,2\n3,4\n", ["no label column 'y'", "a, b"]),
    "non-numeric": ("a,b,y\n1,2,x\n3,4,y\n5,oops,x\n", ["row 4", "column 'b'", "'oops'",
                                                          "2 of its 3 cells are numbers"]),
    "empty-cell": ("a,b,y\n1,2,x\n3,,y\n4,5,x\n", ["row 3", "column 'b'", "empty cell"]),
    "not-finite": ("a,y\n1,x\nnan,y\n2,x\n", ["row 3", "column 'a'", "'nan'"]),
    "free-text": ("".join(["t,y\n", *(f"id{i},{i % 2}\n" for i in range(300))]),
                  ["column 't'", "300 distinct non-numeric values"]),
    "one-class": ("a,y\n1,x\n2,x\n3,x\n", ["label column 'y'", "one class only", "'x'"]),
    "empty-file": ("", ["empty file"]),
    "header-only": ("a,y\n", ["no data rows"]),
    "ragged-row": ("a,b,y\n1,2,x\n3,y\n", ["row 3", "2 cells", "header has 3"]),
    "empty-label": ("a,y\n1,x\n2,\n3,z\n", ["row 3", "label column 'y'", "empty label"]),
    "duplicate-column": ("a,a,y\n1,2,x\n", ["column 'a' appears more than once"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_naming_file_column_and_row(tmp_path: Path, case: str) -> None:
    contents, words = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    path.write_text(contents)
    with pytest.raises(TaskError) as info:
        load_task(f"csv:{path}", label="y")
    message = str(info.value)
    assert "\n" not in message
    for word in [str(path), *words]:
        assert word in message


def test_missing_and_non_utf8_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no such file"):
        read_table(tmp_path / "absent.csv", "y")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"a,y\n\xff\xfe,1\n")
    with pytest.raises(TaskError, match="not UTF-8"):
        read_table(binary, "y")


@pytest.mark.parametrize(
    "spec, options, words",
    [
        ("csv:x.csv", {}, ["--label COLUMN"]),
        ("csv:", {"label": "y"}, ["expected csv:PATH"]),
        ("digits", {"label": "y"}, ["--label 'y'", "only --task csv:PATH"]),
        ("digits", {"model": "mlp:0"}, ["--model 'mlp:0'", "mlp:W,W"]),
        ("digits", {"model": "vgg"}, ["--model 'vgg'"]),
        ("digits", {"model": "cnn"}, ["--model cnn", "needs images"]),
        ("tests.user_task_example:make_task", {"model": "cnn"}, ["builds its own model"]),
    ],
)
def test_task_flag_mistakes_are_one_line(spec: str, options: dict, words: list[str]) -> None:
    with pytest.raises(TaskError) as info:
        load_task(spec, **options)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_model_flag_replaces_a_builtin_tasks_model() -> None:
    task = load_task("digits", model="mlp:32")
    assert [p.shape for p in task.make_model().parameters()] == [(32, 64), (32,), (10, 32), (10,)]


def test_node_with_a_bad_csv_exits_2_with_one_line(tmp_path: Path, cancer_csv: Path) -> None:
    from gossip import NodeKey

    NodeKey.generate().save(tmp_path / "node.key")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,y\n1,x\nbad,y\n2,y\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl.cli", "node", "--key", "node.key", "--state-dir", "s",
         "--task", f"csv:{bad}", "--label", "y"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,  # a hang guard
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{bad}: row 3, column 'a'" in result.stderr


def test_label_and_model_in_a_config_file_must_be_text() -> None:
    from p2pfl.config import ConfigError, build_config

    assert build_config({"label": "diagnosis", "model": "mlp:8"}, {}).label == "diagnosis"
    with pytest.raises(ConfigError, match="label: expected text, got 3"):
        build_config({"label": 3}, {})


def test_simulator_runs_a_csv_task(tmp_path: Path, cancer_csv: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "simulate.py"), "--task", f"csv:{cancer_csv}",
         "--label", "diagnosis", "--model", "mlp:16", "--nodes", "4", "--degree", "2",
         "--topology", "ring", "--rounds", "3", "--local-epochs", "1", "--partition", "iid",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,  # a hang guard
    )
    assert result.returncode == 0, result.stderr
    assert "ring" in result.stdout


def test_parquet_without_pyarrow_is_one_line_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import pyarrow` fail, installed or not.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "records.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(TaskError) as info:
        load_task(f"csv:{path}", label="diagnosis")
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "pip install pyarrow" in message


def test_parquet_reads_like_its_csv_export_when_pyarrow_is_there(
    tmp_path: Path, cancer_csv: Path
) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import csv as arrow_csv
    from pyarrow import parquet

    path = tmp_path / "cancer.parquet"
    parquet.write_table(arrow_csv.read_csv(cancer_csv), path)
    assert pyarrow is not None
    from_parquet, from_csv = read_table(path, "diagnosis"), read_table(cancer_csv, "diagnosis")
    assert from_parquet.features == from_csv.features
    assert np.allclose(from_parquet.x, from_csv.x) and np.array_equal(from_parquet.y, from_csv.y)
