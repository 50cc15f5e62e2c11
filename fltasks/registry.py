"""Resolve a task from the command line: a built-in name, a data file, or `module:function`."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from fltasks.datasets import breast_cancer, digits
from fltasks.device import resolve_device
from fltasks.images import imagefolder_task
from fltasks.models import build_model, check_fits, parse_model
from fltasks.spec import TaskSpec, load_spec
from fltasks.tabular import csv_task
from fltasks.task import Task, TaskError

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "breast-cancer": breast_cancer,
}


DATA_FILE_TASKS = ("csv:PATH", "imagefolder:DIR")


def load_task(
    spec: str,
    seed: int = 0,
    *,
    label: str | None = None,
    model: str | None = None,
    device: str = "cpu",
    task_spec: str | None = None,
    vocabulary: tuple[Sequence[str], Mapping[str, Sequence[str]]] | None = None,
) -> Task:
    """Return the task named by `spec`, built with `seed`.

    `spec` is a built-in name, `csv:PATH` (with `label`, the column to predict),
    `imagefolder:DIR` (one folder of images per class), or `module:function`,
    where `function(seed=seed)` returns a `Task`; that is how a developer brings
    their own model and data to both the daemon and the simulator. `model`
    (`mlp:W,W`, `cnn`, `resnet18`) replaces the model of a built-in or data-file
    task; `device` (auto, cpu, cuda, cuda:N) is where it trains. `task_spec` is
    the path of the spec file every member shares (fltasks/spec.py). `vocabulary`
    (csv only): the classes and the categorical columns' values the members agreed
    on (p2pfl/vocabulary.py); a cell outside them is encoded all-zero. Every bad
    spec raises `TaskError` with one line naming the cause.
    """
    device = resolve_device(device)
    kind, _, rest = spec.partition(":")
    if task_spec is not None:
        return _load_with_spec(spec, load_spec(task_spec), task_spec, seed, label, model, device)
    if label is not None and kind != "csv":
        raise TaskError(f"--label {label!r}: only --task csv:PATH has a label column; drop it")
    if kind == "csv":
        if not rest:
            raise TaskError(f"--task {spec!r}: expected csv:PATH, e.g. csv:records.csv")
        if not label:
            raise TaskError(f"--task {spec}: give the column to predict with --label COLUMN")
        if vocabulary is not None:
            classes, categories = vocabulary
            return csv_task(rest, label, seed, model, device=device, classes=classes,
                            categories=categories, unseen_as_zero=True)
        return csv_task(rest, label, seed, model, device=device)
    if kind == "imagefolder":
        if not rest:
            raise TaskError(f"--task {spec!r}: expected imagefolder:DIR, e.g. imagefolder:scans")
        return imagefolder_task(rest, seed, model, device=device)
    if spec in BUILTIN_TASKS:
        task = BUILTIN_TASKS[spec](seed=seed)
        if model is not None:
            chosen = parse_model(model)
            check_fits(chosen, task.input_shape)
            make_model = partial(build_model, chosen, task.input_shape, task.num_classes, seed)
            task = dataclasses.replace(task, make_model=make_model)
        return dataclasses.replace(task, device=device)
    if model is not None:
        raise TaskError(f"--model {model!r}: a module:function task builds its own model; "
                        f"drop --model")
    task = _load_user_task(spec, seed)
    return dataclasses.replace(task, device=device)


def _load_with_spec(text: str, shared: TaskSpec, source: str, seed: int, label: str | None,
                    model: str | None, device: str) -> Task:
    """A data-file task whose classes, inputs and model the shared spec fixes."""
    kind, _, path = text.partition(":")
    if kind != shared.kind or not path:
        raise TaskError(f"--task-spec {source} is for {shared.kind} tasks, "
                        f"but --task is {text!r}")
    if model is not None and parse_model(model) != shared.model:
        raise TaskError(f"--model {model}: the task spec {source} says {shared.model}; "
                        f"every member uses the spec's model, so drop --model")
    if label is not None and label != shared.label:
        raise TaskError(f"--label {label!r}: the task spec {source} says {shared.label!r}")
    if shared.kind == "csv":
        assert shared.label is not None
        task = csv_task(path, shared.label, seed, shared.model, classes=shared.classes,
                        categories=shared.categories, columns=shared.columns, device=device,
                        spec_hash=shared.sha256)
    else:
        task = imagefolder_task(path, seed, shared.model, size=shared.input_shape[1],
                                classes=shared.classes, device=device, spec_hash=shared.sha256)
    if task.input_shape != shared.input_shape:
        raise TaskError(f"{path}: {task.input_shape[0]} features after encoding, but the "
                        f"task spec {source} says input_shape = [{shared.input_shape[0]}]; "
                        f"list every categorical column's values under [categories]")
    return task


def _load_user_task(spec: str, seed: int) -> Task:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise TaskError(f"unknown task {spec!r}: use one of {', '.join(BUILTIN_TASKS)}, "
                        f"{', '.join(DATA_FILE_TASKS)} or 'module:function' for your own task")
    if not module_name or not attr:
        raise TaskError(f"bad task spec {spec!r}: expected 'module:function', "
                        f"e.g. 'mytasks:make_task'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import module {module_name!r} for task {spec!r} ({exc}): "
                        f"check it is installed or on PYTHONPATH") from exc
    if not hasattr(module, attr):
        raise TaskError(f"module {module_name!r} has no attribute {attr!r} for task {spec!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise TaskError(f"{spec!r} is a {type(factory).__name__}, not a function returning a Task")
    try:
        inspect.signature(factory).bind(seed=seed)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"{spec!r} must accept a 'seed' keyword argument ({exc})") from exc
    task = factory(seed=seed)
    if not isinstance(task, Task):
        raise TaskError(f"{spec!r} returned a {type(task).__name__}, expected a fltasks.Task")
    return task
