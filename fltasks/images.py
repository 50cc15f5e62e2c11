"""``--task imagefolder:DIR``: a member's own images, one folder per class.

The layout is torchvision's ``ImageFolder`` convention: ``DIR/<class>/**/<image>``,
classes sorted by folder name, files with the same extensions, every image
converted to RGB. Pillow reads them (torchvision does not import next to the
pinned CPU torch). Each image is resized to a fixed square (bilinear) and
normalised with fixed per-channel constants (ImageNet's, as torchvision's model
recipes use), so every member's inputs mean the same thing whatever its data.
Each node holds out a stratified quarter of its images for validation.

Every problem is one ``TaskError`` line naming the folder or file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fltasks.datasets import stratified_split
from fltasks.inputs import InputSpec
from fltasks.models import ModelSpec, build_model, check_fits, parse_model
from fltasks.task import Task, TaskError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SIZE = 32
DEFAULT_IMAGE_MODEL = "cnn"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_LR = 0.05
IMAGE_BATCH_SIZE = 32


def find_classes(root: Path) -> list[str]:
    """The class folders of ``root``, sorted by name (``ImageFolder.find_classes``)."""
    if not root.is_dir():
        what = "no such folder" if not root.exists() else "not a folder"
        raise TaskError(f"{root}: {what}; expected one folder per class of images")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise TaskError(f"{root}: no class folders; put each class's images in DIR/<class>/")
    return classes


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in sorted order as torchvision walks them."""
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return found


def load_image(path: Path, size: int) -> np.ndarray:
    """One image as a normalised float32 [3, size, size] array."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TaskError(f"{path}: cannot read the image ({detail})") from None
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def read_image_folder(
    root: str | Path, size: int = DEFAULT_IMAGE_SIZE, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images [n, 3, size, size], class indices [n] and the class names of ``root``.

    ``classes`` (from a shared task spec) fixes the class list: a member may lack
    some classes, but a folder outside the list is an error.
    """
    root = Path(root)
    folders = find_classes(root)
    if classes is None:
        if len(folders) < 2:
            raise TaskError(f"{root}: one class folder only ({folders[0]!r}); "
                            f"a classifier needs at least two")
        names = tuple(folders)
    else:
        names = tuple(classes)
        extra = [folder for folder in folders if folder not in names]
        if extra:
            raise TaskError(f"{root / extra[0]}: class {extra[0]!r} is not in the task spec's "
                            f"classes ({', '.join(names)})")
    images, labels = [], []
    for folder in folders:
        files = image_files(root / folder)
        if not files:
            raise TaskError(f"{root / folder}: no images (expected files ending in "
                            f"{', '.join(IMG_EXTENSIONS)})")
        images.extend(load_image(path, size) for path in files)
        labels.extend([names.index(folder)] * len(files))
    return np.stack(images), np.array(labels, dtype=np.int64), names


def imagefolder_task(
    root: str | Path,
    seed: int = 0,
    model: str | ModelSpec | None = None,
    *,
    size: int = DEFAULT_IMAGE_SIZE,
    classes: Sequence[str] | None = None,
    device: str = "cpu",
    spec_hash: bytes = b"",
) -> Task:
    """A task on the images under ``root``; model default cnn."""
    if size < 1:
        raise TaskError(f"image size must be at least 1 pixel, got {size}")
    spec = model if isinstance(model, ModelSpec) else parse_model(model or DEFAULT_IMAGE_MODEL)
    check_fits(spec, (3, size, size))
    x, y, names = read_image_folder(root, size, classes)
    train, test = stratified_split(y, seed)
    if len(test) == 0:
        raise TaskError(f"{root}: {len(y)} images leave none for validation; "
                        f"give at least 2 images per class")
    return Task(
        name=f"imagefolder:{Path(root).name}",
        make_model=partial(build_model, spec, (3, size, size), len(names), seed),
        x_train=torch.from_numpy(x[train]), y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(x[test]), y_test=torch.from_numpy(y[test]),
        num_classes=len(names), lr=IMAGE_LR, batch_size=IMAGE_BATCH_SIZE,
        device=device, spec_hash=spec_hash,
        inputs=InputSpec("image", names, IMAGENET_MEAN, IMAGENET_STD, size=size),
    )
