"""Model choices for the data-file tasks: ``mlp:W,W``, ``cnn`` and ``resnet18``, in plain torch.

torchvision is not importable next to the pinned CPU torch (its wheel is built
against CUDA torch: ``operator torchvision::nms does not exist``), so ResNet-18
is written out here as torchvision builds it (He et al., "Deep Residual
Learning for Image Recognition", CVPR 2016; ``torchvision.models.resnet18``):
11,181,642 parameters for 10 classes on 3-channel images.

BatchNorm keeps no running statistics (``track_running_stats=False``): it
normalises with the statistics of the batch in hand, in training and in
evaluation. So a model's state is exactly its parameters: the daemon (which
gossips the whole ``state_dict``) and the simulator (which stacks the
parameters) hold the same thing, every tensor is float and can be compressed,
and a member never sends running means of its private data, which are a
summary of that data. The price is that a prediction depends on the other
samples of its batch; evaluation runs the whole held-out split as one batch.

Every factory forks the global RNG and seeds it, so the same model spec and
seed give the same initial weights on every member, and building a model never
changes the caller's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fltasks.datasets import mlp
from fltasks.task import TaskError

MODEL_CHOICES = "mlp:W,W (hidden widths), cnn or resnet18"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model``: the architecture and, for an MLP, its hidden widths."""

    kind: str
    hidden: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"mlp:{','.join(map(str, self.hidden))}" if self.kind == "mlp" else self.kind


def parse_model(text: str) -> ModelSpec:
    """Parse ``mlp:W,W``, ``cnn`` or ``resnet18``; a bad spec is a one-line TaskError."""
    kind, sep, rest = text.strip().partition(":")
    if kind in ("cnn", "resnet18") and not sep:
        return ModelSpec(kind)
    if kind == "mlp" and sep:
        try:
            hidden = tuple(int(width) for width in rest.split(","))
        except ValueError:
            hidden = ()
        if hidden and all(width >= 1 for width in hidden):
            return ModelSpec("mlp", hidden)
    raise TaskError(f"--model {text!r}: choose {MODEL_CHOICES}, e.g. mlp:128,64")


def check_fits(spec: ModelSpec, input_shape: Sequence[int]) -> None:
    """Raise a one-line TaskError when ``spec`` cannot take inputs of ``input_shape``.

    Called when a task is loaded, so that a wrong ``--model`` fails at start-up
    rather than at the first ``make_model``.
    """
    shape = tuple(int(d) for d in input_shape)
    if spec.kind == "mlp":
        return
    if len(shape) != 3:
        raise TaskError(f"--model {spec}: needs images (channels, height, width), "
                        f"but the task's inputs have shape {shape}; use mlp:W,W")
    if spec.kind == "cnn" and min(shape[1:]) < 4:
        raise TaskError(f"--model cnn: images must be at least 4x4, got {shape[1]}x{shape[2]}")


def build_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int,
                seed: int) -> nn.Module:
    """The model ``spec`` names for inputs of ``input_shape`` (no batch dim), seeded."""
    check_fits(spec, input_shape)
    shape = tuple(int(d) for d in input_shape)
    if spec.kind == "mlp":
        if len(shape) == 1:
            # Plain Linear/ReLU: the simulator's fast batched-matmul path applies.
            return mlp((shape[0], *spec.hidden, num_classes), seed)
        return _seeded(seed, lambda: nn.Sequential(
            nn.Flatten(), *_linear_relu((math.prod(shape), *spec.hidden, num_classes))))
    channels, height, width = shape
    if spec.kind == "cnn":
        return _seeded(seed, lambda: small_cnn(channels, height, width, num_classes))
    return _seeded(seed, lambda: resnet18(num_classes, channels))


def _seeded(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _linear_relu(sizes: Sequence[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return layers


def small_cnn(channels: int, height: int, width: int, num_classes: int) -> nn.Sequential:
    """Two 3x3 conv layers (32, 64 channels) with BatchNorm and 2x2 max pooling, then 256 units.

    About 1.07M parameters on 32x32 images: the "1M-parameter model" of the tests
    and benchmarks, small enough to train on a CPU. Without the BatchNorm, plain
    SGD on digits PNGs swung between 0.9 and 0.35 validation accuracy from one
    epoch to the next at any learning rate from 0.005 to 0.05 (measured).
    """
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), _norm(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), _norm(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, num_classes),
    )


def _norm(channels: int) -> nn.BatchNorm2d:
    # No running statistics: see the module docstring for why.
    return nn.BatchNorm2d(channels, track_running_stats=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs with BatchNorm and an identity shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _norm(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), _norm(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """``torchvision.models.resnet18(num_classes=...)``, module for module, with its init."""

    def __init__(self, num_classes: int, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int, channels: int = 3) -> ResNet18:
    return ResNet18(num_classes, channels)
