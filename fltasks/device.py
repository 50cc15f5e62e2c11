"""``--device auto|cpu|cuda[:N]``: where a node trains.

``auto`` takes the first CUDA device when torch sees one, else the CPU; the
code never assumes a GPU. The model lives on the CPU between rounds (the
daemon reads and writes its weights as numpy arrays); ``Task.train`` and
``Task.evaluate`` move it to the device and back.
"""

from __future__ import annotations

import torch

from fltasks.task import TaskError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(choice: str) -> str:
    """The torch device string for ``choice``; a one-line TaskError when it cannot be used."""
    text = choice.strip().lower()
    if text == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if text == "auto":
        return "cuda" if available else "cpu"
    kind, sep, index = text.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise TaskError(f"--device {choice!r}: choose {DEVICE_CHOICES}")
    if not available:
        raise TaskError(f"--device {choice}: torch {torch.__version__} sees no CUDA device; "
                        f"use --device cpu (or auto, which falls back to the CPU)")
    if sep and int(index) >= torch.cuda.device_count():
        raise TaskError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) "
                        f"here, numbered from 0")
    return text
