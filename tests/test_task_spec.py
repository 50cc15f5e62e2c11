"""The shared task spec file: what it fixes, its hash, and refusal of a member with another spec."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from runtimes import run_two
from test_images import write_digit_pngs

from fltasks import TaskError, load_task
from fltasks.datasets import load_breast_cancer_arrays
from fltasks.spec import load_spec, spec_of
from fltasks.tabular import read_table
from fltasks.write_spec import main
from gossip import GossipNode, NodeKey
from gossip.errors import Reason
from gossip.layout import TensorSpec, model_fingerprint

pytestmark = pytest.mark.integration

torch.set_num_threads(1)


def write_cancer_csv(path: Path, rows: slice = slice(None), reverse_columns: bool = False,
                     sites: tuple[str, ...] = ("north", "south", "east")) -> Path:
    x, y = load_breast_cancer_arrays()
    header = [f"f{i}" for i in range(5)] + ["site", "diagnosis"]
    body = [[*(str(float(v)) for v in features[:5]), sites[i % len(sites)],
             "benign" if label else "malignant"]
            for i, (features, label) in enumerate(zip(x[rows], y[rows], strict=True))]
    if reverse_columns:
        header = header[::-1]
        body = [row[::-1] for row in body]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)
    return path


@pytest.fixture
def member_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two members' CSVs (the second: other rows, columns reversed, one site missing) + spec."""
    first = write_cancer_csv(tmp_path / "a.csv", slice(0, 300))
    second = write_cancer_csv(tmp_path / "b.csv", slice(300, None), reverse_columns=True,
                              sites=("south", "east"))
    spec = tmp_path / "task.toml"
    spec.write_text(spec_of(f"csv:{first}", "diagnosis").to_toml())
    return first, second, spec


def test_spec_written_from_data_reads_back_with_the_same_hash(member_files: tuple) -> None:
    first, _, spec_path = member_files
    written = spec_of(f"csv:{first}", "diagnosis")
    read = load_spec(spec_path)
    assert read == written and read.sha256 == written.sha256
    assert read.classes == ("benign", "malignant") and read.input_shape == (8,)
    assert read.categories == {"site": ("east", "north", "south")}


def test_spec_command_prints_the_spec_of_this_members_data(
    member_files: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _, spec_path = member_files
    assert main(["--task", f"csv:{first}", "--label", "diagnosis"]) == 0
    assert capsys.readouterr().out == spec_path.read_text()
    assert main(["--task", f"csv:{first}"]) == 2
    assert "csv:PATH (with --label)" in capsys.readouterr().err


def test_hash_ignores_comments_and_key_order_but_not_class_order(tmp_path: Path,
                                                                 member_files: tuple) -> None:
    _, _, spec_path = member_files
    lines = spec_path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.toml"
    body = [line for line in lines if line and not line.startswith(("[", '"site"'))]
    shuffled.write_text("# shared by all members\n" + "\n".join(reversed(body))
                        + '\n\n[categories]\n"site" = ["east", "north", "south"]\n')
    assert load_spec(shuffled).sha256 == load_spec(spec_path).sha256
    swapped = tmp_path / "swapped.toml"
    swapped.write_text(spec_path.read_text().replace('["benign", "malignant"]',
                                                     '["malignant", "benign"]'))
    assert load_spec(swapped).sha256 != load_spec(spec_path).sha256


def test_members_with_other_column_order_and_missing_category_agree(member_files: tuple) -> None:
    first, second, spec = member_files
    a = load_task(f"csv:{first}", task_spec=str(spec))
    b = load_task(f"csv:{second}", task_spec=str(spec))
    assert a.input_shape == b.input_shape == (8,)
    assert a.spec_hash == b.spec_hash == load_spec(spec).sha256
    # Same seed, same spec: the same initial weights on both members.
    assert all(torch.equal(p, q) for p, q in zip(a.make_model().parameters(),
                                                 b.make_model().parameters(), strict=True))
    # Column f0 is feature 0 on both, although b's file has it last, and the site
    # b never has ("north") still has its own, all-zero, feature.
    shared = load_spec(spec)
    table = read_table(second, "diagnosis", shared.classes, shared.categories, shared.columns)
    assert np.array_equal(table.x[:, 0], np.loadtxt(second, delimiter=",", skiprows=1,
                                                    usecols=6))
    assert table.features[-3:] == ("site=east", "site=north", "site=south")
    assert not table.x[:, -2].any() and table.x[:, -3].any()


def test_without_a_spec_the_fingerprint_is_unchanged_and_with_one_it_differs() -> None:
    specs = [TensorSpec("w", "float32", (2,))]
    # The worked example of docs/PROTOCOL.md section 6.
    expected = hashlib.sha256(b"p2pfl/model-fingerprint/v1\nw\tfloat32\t2\n").digest()
    assert model_fingerprint(specs) == expected
    assert model_fingerprint(specs, b"\x01" * 32) != expected
    assert model_fingerprint(specs, b"\x01" * 32) != model_fingerprint(specs, b"\x02" * 32)


def _pair(spec_a: bytes, spec_b: bytes) -> tuple[GossipNode, GossipNode]:
    tensors = {"w": np.ones(3, np.float32)}
    a = GossipNode.create(NodeKey.generate(), tensors, 10, task_spec_hash=spec_a)
    b = GossipNode.create(NodeKey.generate(), tensors, 10, task_spec_hash=spec_b)
    return a, b


def test_update_from_a_member_with_another_spec_is_wrong_model_and_says_so() -> None:
    a, b = _pair(b"\x01" * 32, b"\x02" * 32)
    verdict = b.receive(a.prepare(1, 0.0).message, 0.0)
    assert not verdict.accepted
    assert verdict.reason is Reason.WRONG_MODEL and "task spec" in verdict.detail
    same_a, same_b = _pair(b"\x01" * 32, b"\x01" * 32)
    assert same_b.receive(same_a.prepare(1, 0.0).message, 0.0).accepted


def test_a_snapshot_of_another_spec_is_not_read_for_adoption() -> None:
    from gossip import InvalidUpdate

    a, b = _pair(b"\x01" * 32, b"")
    with pytest.raises(InvalidUpdate, match="task spec"):
        b.read_snapshot(a.snapshot(0.0), a.key.public_key)


async def test_two_runtimes_with_different_specs_refuse_each_other(
    member_files: tuple, tmp_path: Path
) -> None:
    first, second, spec = member_files
    other_spec = tmp_path / "other.toml"
    other_spec.write_text(spec.read_text().replace('["benign", "malignant"]',
                                                   '["malignant", "benign"]'))
    a_task = load_task(f"csv:{first}", task_spec=str(spec))
    b_task = load_task(f"csv:{second}", task_spec=str(other_spec))
    assert a_task.input_shape == b_task.input_shape  # the tensors line up; the specs do not
    a, b = await run_two(
        (a_task, b_task), (tmp_path / "a", tmp_path / "b"), ("0/1", "0/1"),
        rounds=3, round_interval=0.1,
    )
    for node in (a, b):
        status = node.status()
        assert status["round"] == 3
        assert status["updates_accepted"] == 0
        assert status["updates_rejected"].get("wrong-model", 0) >= 1


def test_spec_errors_are_one_line_naming_the_file(tmp_path: Path, member_files: tuple) -> None:
    first, _, spec = member_files
    good = spec.read_text()
    cases = {
        "missing.toml": (None, "no such file"),
        "unknown.toml": ('colour = "red"\n' + good, "unknown key(s) 'colour'"),
        "nomodel.toml": (good.replace('model = "mlp:64"\n', ""), "missing key 'model'"),
        "shape.toml": (good.replace("input_shape = [8]", "input_shape = [3, 8, 8]"),
                       "input_shape is [features]"),
        "oneclass.toml": (good.replace('["benign", "malignant"]', '["benign"]'),
                          "at least two classes"),
        "badmodel.toml": (good.replace('"mlp:64"', '"vgg"'), "--model 'vgg'"),
    }
    for name, (text, words) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(TaskError) as info:
            load_task(f"csv:{first}", task_spec=str(path))
        assert "\n" not in str(info.value) and words in str(info.value), str(info.value)
        assert name in str(info.value) or name == "badmodel.toml"


def test_flags_that_contradict_the_spec_are_one_line(member_files: tuple, tmp_path: Path) -> None:
    first, _, spec = member_files
    with pytest.raises(TaskError, match="says mlp:64"):
        load_task(f"csv:{first}", model="mlp:32", task_spec=str(spec))
    with pytest.raises(TaskError, match="says 'diagnosis'"):
        load_task(f"csv:{first}", label="f0", task_spec=str(spec))
    with pytest.raises(TaskError, match="is for csv tasks"):
        load_task("digits", task_spec=str(spec))
    extra = tmp_path / "extra.csv"
    lines = first.read_text().splitlines()
    rows = [lines[0].replace("f0,", "f0,notes,")]
    rows += [line.replace(",", ",x,", 1) for line in lines[1:]]
    extra.write_text("\n".join(rows) + "\n")
    with pytest.raises(TaskError, match="column 'notes' is not in the task spec's columns"):
        load_task(f"csv:{extra}", task_spec=str(spec))


def test_image_spec_fixes_size_and_classes(tmp_path: Path) -> None:
    root = write_digit_pngs(tmp_path / "digits", per_class=4)
    spec = tmp_path / "images.toml"
    spec.write_text(spec_of(f"imagefolder:{root}", model="cnn", image_size=12).to_toml())
    task = load_task(f"imagefolder:{root}", task_spec=str(spec))
    assert task.input_shape == (3, 12, 12) and task.num_classes == 10
    (root / "cat").mkdir()
    with pytest.raises(TaskError, match="class 'cat' is not in the task spec's classes"):
        load_task(f"imagefolder:{root}", task_spec=str(spec))
