"""Learning tasks shared by the simulator and the node daemon: model, data, train step."""

from fltasks.datasets import breast_cancer, digits
from fltasks.partition import parse_partition, partition
from fltasks.registry import BUILTIN_TASKS, load_task
from fltasks.task import Task, TaskError

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "TaskError",
    "breast_cancer",
    "digits",
    "load_task",
    "parse_partition",
    "partition",
]
