"""What a data-file task does to its raw inputs before the model sees them, as data.

A trained model is only usable with the exact preprocessing it was trained
behind: a CSV's columns in order, each categorical column one-hot over its
categories, every feature standardised with this node's training statistics;
an image converted to RGB, resized, scaled to [0, 1] and normalised with
ImageNet's constants. ``InputSpec`` records that, so that an exported model
(p2pfl/export.py), ``p2pfl predict`` and ``p2pfl.load_model`` apply the same
steps with nothing of the training data at hand. It is plain JSON-able data:
it travels in the node's ``model.json`` and an export's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fltasks.task import TaskError


@dataclass(frozen=True)
class InputSpec:
    """``kind`` "csv": ``columns`` (file order), ``categories`` per categorical column,
    ``mean``/``std`` per encoded feature. ``kind`` "image": ``size``, per-channel
    ``mean``/``std`` applied to pixels in [0, 1]."""

    kind: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    columns: tuple[str, ...] = ()
    label: str | None = None
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std), "columns": list(self.columns), "label": self.label,
                "categories": {k: list(v) for k, v in self.categories.items()},
                "size": self.size}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> InputSpec:
        try:
            return cls(str(raw["kind"]), tuple(map(str, raw["classes"])),
                       tuple(map(float, raw["mean"])), tuple(map(float, raw["std"])),
                       tuple(map(str, raw["columns"])), raw.get("label"),
                       {str(k): tuple(map(str, v)) for k, v in raw["categories"].items()},
                       int(raw["size"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TaskError(f"malformed input description ({type(error).__name__}: "
                            f"{error})") from None

    @property
    def features(self) -> int:
        """Encoded features (csv) or 3 channels (image)."""
        return len(self.mean)

    def encode_rows(self, header: Sequence[str], rows: Sequence[Sequence[str]],
                    where: str) -> np.ndarray:
        """CSV text rows as the model's encoded float32 features [rows, features], unscaled
        (``Standardize`` scales them, inside the model).

        Every problem is one TaskError line naming ``where``, the column and the
        row; the label column may be present (it is skipped) or absent.
        """
        assert self.kind == "csv"
        unknown = [name for name in header if name not in self.columns and name != self.label]
        if unknown:
            raise TaskError(f"{where}: column {unknown[0]!r} is not one the model was trained "
                            f"on ({', '.join(self.columns)})")
        missing = [name for name in self.columns if name not in header]
        if missing:
            raise TaskError(f"{where}: column {missing[0]!r} is missing; the model needs "
                            f"{', '.join(self.columns)}")
        encoded: list[np.ndarray] = []
        for name in self.columns:
            index = header.index(name)
            cells = [row[index].strip() for row in rows]
            if name in self.categories:
                values = self.categories[name]
                for line, cell in enumerate(cells, start=2):
                    if cell not in values:
                        raise TaskError(f"{where}: row {line}, column {name!r}: category "
                                        f"{cell!r} is not one of {', '.join(values)}")
                encoded.extend(np.array([c == v for c in cells], np.float64) for v in values)
                continue
            column = np.empty(len(cells))
            for line, cell in enumerate(cells, start=2):
                try:
                    column[line - 2] = float(cell)
                except ValueError:
                    raise TaskError(f"{where}: row {line}, column {name!r}: {cell!r} is not a "
                                    f"number") from None
            encoded.append(column)
        return np.stack(encoded, axis=1).astype(np.float32)


class Standardize(nn.Module):
    """``(x - mean) / std`` over the last dim (csv) or the channel dim (images)."""

    def __init__(self, spec: InputSpec, scale: float = 1.0) -> None:
        super().__init__()
        shape = (1, -1) if spec.kind == "csv" else (1, -1, 1, 1)
        # Image inputs come as pixel values 0..255: scale folds the task's /255 in.
        mean = torch.tensor(spec.mean, dtype=torch.float64) / scale
        std = torch.tensor(spec.std, dtype=torch.float64) / scale
        self.register_buffer("mean", mean.to(torch.float32).reshape(shape))
        self.register_buffer("std", std.to(torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def csv_input_spec(columns: Sequence[str], label: str, classes: Sequence[str],
                   categories: Mapping[str, Sequence[str]], train_x: np.ndarray) -> InputSpec:
    """The spec of a csv task whose encoded training rows are ``train_x`` (unscaled)."""
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std[std == 0] = 1.0  # as fltasks.scaling.standardize: a constant feature keeps scale 1
    return InputSpec("csv", tuple(classes), tuple(map(float, mean)), tuple(map(float, std)),
                     tuple(columns), label, {k: tuple(v) for k, v in categories.items()})
