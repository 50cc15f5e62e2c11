"""Resolve a task spec from the command line: a built-in name or a user's `module:function`."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from fltasks.datasets import breast_cancer, digits
from fltasks.task import Task, TaskError

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "breast-cancer": breast_cancer,
}


def load_task(spec: str, seed: int = 0) -> Task:
    """Return the task named by `spec`, built with `seed`.

    `spec` is a built-in name or `module:function`, where `function(seed=seed)`
    returns a `Task`; that is how a developer brings their own model and data to
    both the daemon and the simulator. Every bad spec raises `TaskError` with one
    line naming the cause.
    """
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec](seed=seed)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise TaskError(f"unknown task {spec!r}: use one of {', '.join(BUILTIN_TASKS)} "
                        f"or 'module:function' for your own task")
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
