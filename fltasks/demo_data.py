"""Demo data sets written from scikit-learn's bundled data, for `--task csv:` and `imagefolder:`.

Nothing is downloaded: scikit-learn ships both tables inside its package.

    python -m fltasks.demo_data csv records.csv        # breast cancer, 569 rows, 30 columns
    python -m fltasks.demo_data images digits-png      # 1,797 digits as 8x8 PNG files
    python -m fltasks.demo_data images32 digits32 --count 1333   # shifted 32x32 copies
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fltasks.datasets import load_breast_cancer_arrays, load_digits_arrays

# scikit-learn's feature names for the Wisconsin data, as column names.
_MEASURES = ("radius", "texture", "perimeter", "area", "smoothness", "compactness",
             "concavity", "concave_points", "symmetry", "fractal_dimension")
CANCER_COLUMNS = tuple(f"{kind}_{measure}" for kind in ("mean", "se", "worst")
                       for measure in _MEASURES)
CANCER_CLASSES = ("malignant", "benign")  # scikit-learn's targets 0 and 1
IMAGE_SIZE = 32
MAX_SHIFT_PX = 3


def write_cancer_csv(path: Path) -> Path:
    """Breast cancer as a CSV file: 30 numeric columns and a text ``diagnosis`` column."""
    x, y = load_breast_cancer_arrays()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CANCER_COLUMNS, "diagnosis"])
        for features, label in zip(x, y, strict=True):
            writer.writerow([*(repr(float(v)) for v in features), CANCER_CLASSES[label]])
    return path


def write_digit_pngs(root: Path) -> Path:
    """The 1,797 digits as 8-bit grayscale 8x8 PNGs in ``root/<digit>/``."""
    x, y = load_digits_arrays()
    for index, (row, label) in enumerate(zip(x, y, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (row.reshape(8, 8) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return root


def write_digit_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` distinct 32x32 digit PNGs in ``root/<digit>/``, balanced over classes.

    Each is a digit drawn at random (seeded), upscaled, shifted by up to
    ``MAX_SHIFT_PX`` pixels and with its contrast jittered, so that more
    images than the 1,797 originals are still distinct.
    """
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    inner = IMAGE_SIZE - 2 * MAX_SHIFT_PX
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = index % 10
        pool = np.flatnonzero(y == label)
        digit = x[pool[rng.integers(len(pool))]].reshape(8, 8) * (255.0 / 16.0)
        small = Image.fromarray(digit.astype(np.uint8), mode="L")
        big = np.asarray(small.resize((inner, inner), Image.Resampling.BILINEAR), np.float64)
        canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
        top, left = rng.integers(0, 2 * MAX_SHIFT_PX + 1, size=2)
        canvas[top : top + inner, left : left + inner] = big
        canvas = np.clip(canvas * rng.uniform(0.7, 1.0) + rng.uniform(0, 30), 0, 255)
        Image.fromarray(canvas.astype(np.uint8), mode="L").save(
            root / str(label) / f"{index:05d}.png"
        )
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("csv", "images", "images32"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--count", type=int, default=1333, help="images32: how many")
    parser.add_argument("--seed", type=int, default=0, help="images32: the draw's seed")
    args = parser.parse_args(argv)
    if args.path.exists() and (args.kind == "csv" or any(args.path.iterdir())):
        print(f"{args.path}: exists; give a new path", file=sys.stderr)
        return 2
    if args.kind == "csv":
        write_cancer_csv(args.path)
    elif args.kind == "images":
        write_digit_pngs(args.path)
    else:
        write_digit_images(args.path, args.count, args.seed)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
