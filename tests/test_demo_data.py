"""The demo data sets of docs/DATA.md: written locally, and loaded by the data-file tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fltasks import load_task
from fltasks.demo_data import main, write_digit_images
from fltasks.images import read_image_folder

pytestmark = pytest.mark.unit


def test_the_csv_demo_is_breast_cancer_with_a_text_label(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    assert main(["csv", str(path)]) == 0
    task = load_task(f"csv:{path}", label="diagnosis")
    assert task.num_classes == 2 and task.input_shape == (30,)
    assert len(task.y_train) + len(task.y_test) == 569
    assert path.read_text().splitlines()[0].startswith("mean_radius,mean_texture,")


def test_the_image_demo_is_every_digit_in_its_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "digits-png"
    assert main(["images", str(root)]) == 0
    _, y, classes = read_image_folder(root, size=8)
    assert classes == tuple(str(d) for d in range(10))
    assert len(y) == 1797 and np.bincount(y).min() >= 170


def test_shifted_32px_copies_are_distinct_and_balanced(tmp_path: Path) -> None:
    x, y, _ = read_image_folder(write_digit_images(tmp_path / "d", 60, seed=1), size=32)
    assert x.shape == (60, 3, 32, 32) and np.array_equal(np.bincount(y), np.full(10, 6))
    assert len({image.tobytes() for image in x}) == 60


def test_an_existing_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "records.csv").write_text("mine")
    assert main(["csv", str(tmp_path / "records.csv")]) == 2
    assert (tmp_path / "records.csv").read_text() == "mine"
