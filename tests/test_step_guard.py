"""Issue 23: why the CNN collapsed (a short tail batch under batch-statistics BatchNorm),
and the step guard that drops a local step far worse than the model it started from."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fltasks.datasets import mlp
from fltasks.images import imagefolder_task
from fltasks.models import small_cnn
from fltasks.task import batches, normalises_over_batch
from p2pfl.step_guard import judge_step

pytestmark = pytest.mark.unit


def test_a_short_tail_batch_joins_the_previous_one_only_under_batch_norm() -> None:
    order = torch.arange(1347)
    plain = batches(order, 32, fold_tail=False)
    folded = batches(order, 32, fold_tail=True)
    assert len(plain[-1]) == 3 and len(folded[-1]) == 35
    assert torch.equal(torch.cat(folded), order)  # every sample once per epoch
    assert batches(torch.arange(10), 32, fold_tail=True)[0].numel() == 10
    assert normalises_over_batch(small_cnn(3, 8, 8, 10))
    assert not normalises_over_batch(mlp((4, 8, 2), 0))  # the simulator's numerics stay


@pytest.mark.parametrize("before, after, keep", [
    ((0.96, 0.12), (0.22, 3.1), False),   # the collapse of issue 23
    ((0.96, 0.12), (0.95, 0.13), True),   # an ordinary step
    ((0.40, 1.50), (0.35, 1.60), True),   # a merge lowered before: the step is judged from it
    ((0.96, 0.01), (0.95, 0.03), True),   # loss tripled but stayed tiny
    ((0.96, 0.20), (0.90, 1.90), False),  # loss far worse
    ((0.96, 0.20), (0.96, math.inf), False),
])
def test_judge_step_drops_only_a_step_far_worse_than_its_start(
        before: tuple[float, float], after: tuple[float, float], keep: bool) -> None:
    verdict = judge_step(before, after)
    assert verdict.keep is keep
    assert bool(verdict.reason) is not keep


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_lone_cnn_on_digit_pngs_ends_at_08_or_better_after_5_epochs(
        tmp_path: Path, seed: int) -> None:
    """The issue's run (16x16 PNGs, cnn, 5 one-epoch rounds), here without the daemon."""
    import numpy as np
    from PIL import Image

    from fltasks.datasets import load_digits_arrays

    x, y = load_digits_arrays()
    for i, (row, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / str(label)
        folder.mkdir(exist_ok=True)
        small = Image.fromarray((row.reshape(8, 8) * 255 / 16).astype(np.uint8), mode="L")
        small.resize((16, 16), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.png")
    task = imagefolder_task(tmp_path, seed=seed, model="cnn")
    model = task.make_model()
    generator = torch.Generator().manual_seed(seed * 100_003)
    for _ in range(5):
        task.train(model, task.x_train, task.y_train, 1, generator)
    assert task.evaluate(model) >= 0.8
