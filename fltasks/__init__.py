"""Learning tasks shared by the simulator and the node daemon: model, data, train step."""

from fltasks.datasets import breast_cancer, digits
from fltasks.images import imagefolder_task
from fltasks.partition import parse_partition, partition
from fltasks.registry import BUILTIN_TASKS, load_task
from fltasks.spec import TaskSpec, load_spec
from fltasks.tabular import csv_task
from fltasks.task import Task, TaskError

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
