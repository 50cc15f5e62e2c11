"""The built-in tasks, on data shipped with scikit-learn so that nothing is downloaded.

The data files are read straight from scikit-learn's package directory with
numpy: importing scikit-learn itself costs a node 1.5-2 s of start-up, and
eight daemons starting together on two cores pay that eight times.
`tests/test_tasks.py` checks the arrays equal scikit-learn's own loaders.

`mlp` and `split_and_standardize` are public so that a user's own task can be
built the same way (see `tests/user_task_example.py`). The built-in tasks are
one table shared out between nodes, so they also carry their unscaled features
and published ranges: each node scales its own shard (fltasks/scaling.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fltasks.scaling import RawFeatures, published_ranges, standardize
from fltasks.task import Task, TaskError

TEST_FRACTION = 0.25


def _sklearn_data_file(name: str, folder: str = "data") -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise TaskError("scikit-learn is not installed; it ships the built-in data sets "
                        "(run `make demo` or `pip install scikit-learn`)")
    path = Path(spec.origin).parent / "datasets" / folder / name
    if not path.is_file():
        raise TaskError(f"data file {path} is missing; reinstall scikit-learn "
                        "(`pip install --force-reinstall scikit-learn`)")
    return path


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1,797 rows of 64 pixel values (0-16) and a label."""
    table = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's Wisconsin breast cancer: 569 rows of 30 features and a label."""
    table = np.loadtxt(_sklearn_data_file("breast_cancer.csv"), delimiter=",", skiprows=1)
    return table[:, :-1], table[:, -1].astype(np.int64)


# digits.rst: "8x8 image of integer pixels in the range 0..16", a property of the format.
DIGITS_PIXEL_RANGE = (0.0, 16.0)
BREAST_CANCER_FEATURES = 30


def breast_cancer_published_ranges() -> tuple[np.ndarray, np.ndarray]:
    """Each feature's (min, max) as the data set's own description publishes them."""
    text = _sklearn_data_file("breast_cancer.rst", "descr").read_text(encoding="utf-8")
    low, high = published_ranges(text)
    if len(low) != BREAST_CANCER_FEATURES:
        raise TaskError(f"breast_cancer.rst lists {len(low)} feature ranges, expected "
                        f"{BREAST_CANCER_FEATURES}; reinstall scikit-learn")
    return low, high


def stratified_split(
    y: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with each label in both splits in proportion, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cut = int(round(test_fraction * len(members)))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def mlp(sizes: Sequence[int], seed: int) -> nn.Sequential:
    """Build a ReLU MLP whose initial weights depend only on `seed`.

    The global RNG is forked, not reseeded, so building a model never changes the
    random stream of the caller (e.g. the simulator's own draws).
    """
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
        return nn.Sequential(*layers)


def split_and_standardize(
    x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split stratified by label, then standardize both splits with train statistics only.

    For data one owner holds (a member's own file, or the centralized baseline):
    using test statistics would leak the test set into training. Constant features
    (digits has blank border pixels) keep a scale of 1 instead of dividing by zero.
    """
    train, test = stratified_split(np.asarray(y), seed, test_fraction)
    x_tr, x_te, y_tr, y_te = x[train], x[test], y[train], y[test]

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return standardize(x_tr, x_tr), labels(y_tr), standardize(x_te, x_tr), labels(y_te)


def _raw_features(x: np.ndarray, y: np.ndarray, seed: int, low: np.ndarray,
                  high: np.ndarray) -> RawFeatures:
    """The unscaled rows of the same split :func:`split_and_standardize` makes."""
    train, test = stratified_split(np.asarray(y), seed)
    return RawFeatures(x_train=x[train], x_test=x[test], low=low, high=high)


def digits(seed: int = 0) -> Task:
    """Handwritten digits (1,797 8x8 images, 10 classes) with an MLP 64-64-10.

    4,810 parameters: small enough to simulate thousands of nodes on a laptop, and
    centralized SGD reaches >= 95% test accuracy in about 20 epochs.
    """
    x, y = load_digits_arrays()
    x_train, y_train, x_test, y_test = split_and_standardize(x, y, seed)
    low, high = (np.full(x.shape[1], bound) for bound in DIGITS_PIXEL_RANGE)
    return Task(
        name="digits",
        make_model=partial(mlp, (64, 64, 10), seed),
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=10, lr=0.1, batch_size=32,
        raw_features=_raw_features(x, y, seed, low, high),
    )


def breast_cancer(seed: int = 0) -> Task:
    """Wisconsin breast cancer (569 samples, 30 features, 2 classes) with an MLP 30-16-2.

    The tabular, two-class case of the kind a group of hospitals would share.
    """
    x, y = load_breast_cancer_arrays()
    x_train, y_train, x_test, y_test = split_and_standardize(x, y, seed)
    low, high = breast_cancer_published_ranges()
    return Task(
        name="breast-cancer",
        make_model=partial(mlp, (30, 16, 2), seed),
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=2, lr=0.1, batch_size=32,
        raw_features=_raw_features(x, y, seed, low, high),
    )
