"""`--device auto|cpu|cuda[:N]`: the CPU path runs here; nothing assumes a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fltasks import TaskError, load_task
from fltasks.device import resolve_device

pytestmark = pytest.mark.e2e

NO_CUDA = not torch.cuda.is_available()
REPO = Path(__file__).resolve().parent.parent


def test_cpu_and_auto_resolve_without_a_gpu() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cpu" if NO_CUDA else "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize("choice", ["cuda", "cuda:0"])
def test_cuda_without_a_device_is_one_line_naming_the_fix(choice: str) -> None:
    with pytest.raises(TaskError, match="sees no CUDA device; use --device cpu") as info:
        resolve_device(choice)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("choice", ["gpu", "cuda:x", "tpu:0", ""])
def test_unknown_device_is_one_line(choice: str) -> None:
    with pytest.raises(TaskError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device(choice)


def test_task_trains_on_the_resolved_device_and_hands_the_model_back_on_the_cpu() -> None:
    task = load_task("digits", device="auto")
    assert task.device == resolve_device("auto")
    model = task.make_model()
    task.train(model, task.x_train[:64], task.y_train[:64], 1, torch.Generator().manual_seed(0))
    assert task.evaluate(model) > 0.0
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_node_asked_for_cuda_without_one_exits_2_with_one_line(tmp_path: Path) -> None:
    from gossip import NodeKey

    NodeKey.generate().save(tmp_path / "node.key")
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl.cli", "node", "--key", "node.key", "--state-dir", "s",
         "--device", "cuda"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=600,  # a guard against a hang: torch imports slowly under load
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--device cuda" in result.stderr


def test_node_config_defaults_to_auto() -> None:
    from p2pfl.config import NodeConfig, build_config

    assert NodeConfig().device == "auto"
    assert build_config({"device": "cpu"}, {}).device == "cpu"
