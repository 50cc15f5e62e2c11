"""`--task imagefolder:DIR`: ImageFolder layout read with Pillow, fixed resize, per-node split.

The image folders are written here: scikit-learn's 8x8 digits as PNG files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fltasks import TaskError, load_task
from fltasks.datasets import load_digits_arrays
from fltasks.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    find_classes,
    imagefolder_task,
    read_image_folder,
)

pytestmark = pytest.mark.unit

PER_CLASS = 40


def write_digit_pngs(root: Path, per_class: int = PER_CLASS, names: dict[int, str] | None = None,
                     ) -> Path:
    """Digits as 8-bit grayscale PNGs in root/<class>/<i>.png; returns root."""
    x, y = load_digits_arrays()
    for label in range(10):
        folder = root / (names or {}).get(label, str(label))
        folder.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(x[y == label][:per_class]):
            pixels = (row.reshape(8, 8) * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_pngs(tmp_path_factory.mktemp("images") / "digits")


def test_classes_are_sorted_folder_names_as_imagefolder_does(tmp_path: Path) -> None:
    names = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
             7: "seven", 8: "eight", 9: "nine"}
    root = write_digit_pngs(tmp_path / "named", per_class=2, names=names)
    (root / "notes.txt").write_text("a file at the top is not a class")
    _, y, classes = read_image_folder(root, size=8)
    assert classes == tuple(sorted(names.values()))
    assert find_classes(root) == list(classes)
    # Every image of folder "two" has the index of "two" in the sorted list.
    assert np.array_equal(np.bincount(y), np.full(10, 2))
    assert y[2 * classes.index("two")] == classes.index("two")


def test_images_are_rgb_resized_and_normalised_with_fixed_constants(digits_folder: Path) -> None:
    x, _, _ = read_image_folder(digits_folder, size=12)
    assert x.shape == (10 * PER_CLASS, 3, 12, 12) and x.dtype == np.float32
    # A grayscale image becomes three equal channels before normalisation.
    raw = x * np.array(IMAGENET_STD, np.float32)[:, None, None]
    raw += np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    assert np.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and np.allclose(raw[:, 1], raw[:, 2],
                                                                         atol=1e-5)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # The digits' blank corner pixel is black: (0 - mean) / std in every channel.
    expected = -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)
    assert np.allclose(x[:, :, 0, 0], expected, atol=1e-5)


def test_validation_split_is_held_out_per_node_and_stratified(digits_folder: Path) -> None:
    task = imagefolder_task(digits_folder, seed=0, size=8)
    assert len(task.x_train) + len(task.x_test) == 10 * PER_CLASS
    assert np.array_equal(np.bincount(task.y_test.numpy()), np.full(10, PER_CLASS // 4))
    other = imagefolder_task(digits_folder, seed=1, size=8)
    assert not torch.equal(task.y_test, other.y_test) or not torch.equal(task.x_test,
                                                                         other.x_test)


def test_imagefolder_task_defaults_to_32x32_rgb_and_a_cnn(digits_folder: Path) -> None:
    task = load_task(f"imagefolder:{digits_folder}", seed=0)
    assert task.input_shape == (3, 32, 32) and task.num_classes == 10
    assert isinstance(task.make_model()[0], torch.nn.Conv2d)


def test_cnn_learns_digits_from_png_files(digits_folder: Path) -> None:
    task = imagefolder_task(digits_folder, seed=0, size=16)
    model = task.make_model()
    assert task.evaluate(model) < 0.5
    task.train(model, task.x_train, task.y_train, 6, torch.Generator().manual_seed(0))
    assert task.evaluate(model) >= 0.9


def test_same_seed_gives_same_initial_weights(digits_folder: Path) -> None:
    first = imagefolder_task(digits_folder, seed=4, size=8).make_model()
    second = imagefolder_task(digits_folder, seed=4, size=8).make_model()
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(),
                                                 strict=True))


def _one_line(call: object, *words: str) -> None:
    with pytest.raises(TaskError) as info:
        call()  # type: ignore[operator]
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_bad_folders_are_one_line_naming_the_folder_or_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    _one_line(lambda: read_image_folder(missing), str(missing), "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line(lambda: read_image_folder(empty), str(empty), "no class folders")
    one = write_digit_pngs(tmp_path / "one", per_class=2, names={})
    for label in range(1, 10):
        for path in (one / str(label)).iterdir():
            path.unlink()
        (one / str(label)).rmdir()
    _one_line(lambda: read_image_folder(one), "one class folder only", "'0'")
    hollow = write_digit_pngs(tmp_path / "hollow", per_class=2)
    (hollow / "zz-empty").mkdir()
    _one_line(lambda: read_image_folder(hollow), str(hollow / "zz-empty"), "no images")
    broken = write_digit_pngs(tmp_path / "broken", per_class=2)
    (broken / "3" / "bad.png").write_bytes(b"not a png at all")
    _one_line(lambda: read_image_folder(broken), str(broken / "3" / "bad.png"),
              "cannot read the image")
    _one_line(lambda: load_task("imagefolder:"), "expected imagefolder:DIR")
    _one_line(lambda: imagefolder_task(one, model="resnet18", size=0), "at least 1 pixel")
