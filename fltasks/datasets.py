"""The built-in tasks, on data shipped with scikit-learn so that nothing is downloaded.

`mlp` and `split_and_standardize` are public so that a user's own task can be
built the same way (see `tests/user_task_example.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fltasks.task import Task

TEST_FRACTION = 0.25


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

    Using test statistics would leak the test set into training. Constant features
    (digits has blank border pixels) keep a scale of 1 instead of dividing by zero.
    """
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0

    def features(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return features(x_tr), labels(y_tr), features(x_te), labels(y_te)


def digits(seed: int = 0) -> Task:
    """Handwritten digits (1,797 8x8 images, 10 classes) with an MLP 64-64-10.

    4,810 parameters: small enough to simulate thousands of nodes on a laptop, and
    centralized SGD reaches >= 95% test accuracy in about 20 epochs.
    """
    data = load_digits()
    x_train, y_train, x_test, y_test = split_and_standardize(data.data, data.target, seed)
    return Task(
        name="digits",
        make_model=partial(mlp, (64, 64, 10), seed),
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=10, lr=0.1, batch_size=32,
    )


def breast_cancer(seed: int = 0) -> Task:
    """Wisconsin breast cancer (569 samples, 30 features, 2 classes) with an MLP 30-16-2.

    The tabular, two-class case of the kind a group of hospitals would share.
    """
    data = load_breast_cancer()
    x_train, y_train, x_test, y_test = split_and_standardize(data.data, data.target, seed)
    return Task(
        name="breast-cancer",
        make_model=partial(mlp, (30, 16, 2), seed),
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=2, lr=0.1, batch_size=32,
    )
