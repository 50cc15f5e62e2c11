"""Learning tasks shared by the simulator and the node daemon: model, data, train step.

The names below are loaded on first use (PEP 562): ``fltasks.settings_schema`` and the
other torch-free modules are imported by ``p2pfl keygen``, ``status`` and ``member``,
which must not pay for torch (a second or more) just to parse their flags.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "breast_cancer": "fltasks.datasets",
    "digits": "fltasks.datasets",
    "imagefolder_task": "fltasks.images",
    "BUILTIN_TASKS": "fltasks.registry",
    "load_task": "fltasks.registry",
    "TaskSpec": "fltasks.spec",
    "load_spec": "fltasks.spec",
    "csv_task": "fltasks.tabular",
    "Task": "fltasks.task",
    "TaskError": "fltasks.task",
}

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "TaskError",
    "TaskSpec",
    "breast_cancer",
    "csv_task",
    "digits",
    "imagefolder_task",
    "load_spec",
    "load_task",
    "parse_partition",
    "partition",
]

# Eager (numpy only): its function shares the submodule's name, and a lazy lookup
# would find the module once anything imported ``fltasks.partition``.
from fltasks.partition import parse_partition, partition  # noqa: E402

if TYPE_CHECKING:
    from fltasks.datasets import breast_cancer, digits
    from fltasks.images import imagefolder_task
    from fltasks.registry import BUILTIN_TASKS, load_task
    from fltasks.spec import TaskSpec, load_spec
    from fltasks.tabular import csv_task
    from fltasks.task import Task, TaskError


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fltasks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
