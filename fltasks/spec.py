"""The task spec file every member of one network shares: classes, input shape, model.

Members train on their own files, so nothing but an agreement keeps their
models the same: one hospital's CSV may lack a class, or order its categories
differently; one lab may resize its images to another size. The spec file
(``--task-spec FILE``, TOML) fixes all of it::

    task = "csv"                      # or "imagefolder"
    label = "diagnosis"               # csv only: the column to predict
    columns = ["radius", "site"]      # csv only: the feature columns, in this order
    classes = ["benign", "malignant"] # in output order
    input_shape = [33]                # csv: features after encoding; images: [3, S, S]
    model = "mlp:64"
    [categories]                      # csv only: each categorical column's values
    site = ["east", "north", "south"]

Its SHA-256 (over a canonical form, so comments and key order do not count)
joins the model fingerprint (``gossip.layout.model_fingerprint``): a member
with another spec is refused as ``wrong-model`` even when its tensors line up.
``python -m fltasks.write_spec --task csv:records.csv --label diagnosis`` prints
the spec of one member's data for the others to copy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fltasks.models import ModelSpec, check_fits, parse_model
from fltasks.settings_file import SettingsFileError, read_toml_table
from fltasks.task import TaskError

SPEC_KINDS = ("csv", "imagefolder")
_KEYS = {"task", "label", "columns", "classes", "input_shape", "model", "categories"}


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    model: ModelSpec
    label: str | None = None
    # csv: the feature columns in input order (None: the file's order).
    columns: tuple[str, ...] | None = None
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        """The fields that must agree, in a form whose JSON is the same on every member."""
        return {
            "version": 1,
            "task": self.kind,
            "label": self.label,
            "columns": None if self.columns is None else list(self.columns),
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "model": str(self.model),
            "categories": {name: list(values) for name, values in self.categories.items()},
        }

    @property
    def sha256(self) -> bytes:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"p2pfl/task-spec/v1\n" + text.encode()).digest()

    def to_toml(self) -> str:
        def quoted(values: Sequence[str]) -> str:
            return "[" + ", ".join(json.dumps(v) for v in values) + "]"

        lines = [f"task = {json.dumps(self.kind)}"]
        if self.label is not None:
            lines.append(f"label = {json.dumps(self.label)}")
        if self.columns is not None:
            lines.append(f"columns = {quoted(self.columns)}")
        lines.append(f"classes = {quoted(self.classes)}")
        lines.append(f"input_shape = [{', '.join(map(str, self.input_shape))}]")
        lines.append(f"model = {json.dumps(str(self.model))}")
        if self.categories:
            lines.append("")
            lines.append("[categories]")
            lines.extend(f"{json.dumps(name)} = {quoted(values)}"
                         for name, values in self.categories.items())
        return "\n".join(lines) + "\n"


def _strings(source: Path, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TaskError(f"--task-spec {source}: {key} must be a list of strings")
    if len(set(value)) != len(value):
        raise TaskError(f"--task-spec {source}: {key} lists a value twice")
    return tuple(value)


def load_spec(path: str | Path) -> TaskSpec:
    """Read and check a spec file; every problem is one TaskError line naming the file."""
    source = Path(path)
    try:
        raw = read_toml_table(source, _KEYS)
    except SettingsFileError as error:
        raise TaskError(f"--task-spec {source}: {error}") from None
    missing = sorted({"task", "classes", "input_shape", "model"} - set(raw))
    if missing:
        raise TaskError(f"--task-spec {source}: missing key {missing[0]!r}")
    kind = raw["task"]
    if kind not in SPEC_KINDS:
        raise TaskError(f"--task-spec {source}: task must be one of {', '.join(SPEC_KINDS)}, "
                        f"got {kind!r}")
    classes = _strings(source, "classes", raw["classes"])
    if len(classes) < 2:
        raise TaskError(f"--task-spec {source}: classes must list at least two classes")
    shape = raw["input_shape"]
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise TaskError(f"--task-spec {source}: input_shape must be a list of positive integers")
    if kind == "imagefolder" and (len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]):
        raise TaskError(f"--task-spec {source}: images are RGB squares, so input_shape must be "
                        f"[3, S, S], got {shape}")
    if kind == "csv" and len(shape) != 1:
        raise TaskError(f"--task-spec {source}: a csv task's input_shape is [features], "
                        f"got {shape}")
    if not isinstance(raw["model"], str):
        raise TaskError(f"--task-spec {source}: model must be a string such as 'mlp:64'")
    model = parse_model(raw["model"])
    check_fits(model, shape)
    label = raw.get("label")
    if kind == "csv" and not isinstance(label, str):
        raise TaskError(f"--task-spec {source}: a csv task needs label = \"COLUMN\"")
    if kind != "csv" and ({"label", "columns", "categories"} & set(raw)):
        raise TaskError(f"--task-spec {source}: label, columns and categories are for csv "
                        f"tasks only")
    columns = _strings(source, "columns", raw["columns"]) if "columns" in raw else None
    categories_raw = raw.get("categories", {})
    if not isinstance(categories_raw, dict):
        raise TaskError(f"--task-spec {source}: [categories] must be a table of lists")
    categories = {name: _strings(source, f"categories.{name}", values)
                  for name, values in categories_raw.items()}
    return TaskSpec(kind, classes, tuple(shape), model, label, columns, categories)


def spec_of(task_text: str, label: str | None = None, model: str | None = None,
            image_size: int | None = None) -> TaskSpec:
    """The spec of one member's data: its classes, encoded shape and the model."""
    from fltasks.images import DEFAULT_IMAGE_MODEL, DEFAULT_IMAGE_SIZE, read_image_folder
    from fltasks.tabular import DEFAULT_TABULAR_MODEL, read_table

    kind, _, path = task_text.partition(":")
    if kind == "csv" and path and label:
        table = read_table(path, label)
        chosen = parse_model(model or DEFAULT_TABULAR_MODEL)
        return TaskSpec("csv", table.classes, (table.x.shape[1],), chosen, label,
                        table.columns, dict(table.categories))
    if kind == "imagefolder" and path:
        size = image_size or DEFAULT_IMAGE_SIZE
        _, _, classes = read_image_folder(path, size)
        chosen = parse_model(model or DEFAULT_IMAGE_MODEL)
        check_fits(chosen, (3, size, size))
        return TaskSpec("imagefolder", classes, (3, size, size), chosen)
    raise TaskError(f"--task {task_text!r}: a spec is written for csv:PATH (with --label) "
                    f"or imagefolder:DIR")
