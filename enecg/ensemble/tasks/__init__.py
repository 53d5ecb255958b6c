"""Task types: one registered :class:`~enecg.ensemble.tasks.base.Task` subclass each (see :mod:`.base`).

Built in: ``multilabel`` (:mod:`.multilabel`), ``binary`` (:mod:`.binary`), ``multiclass`` (:mod:`.multiclass`),
``regression`` (:mod:`.regression`). A new type is one subclass decorated with
:func:`~enecg.ensemble.registries.register_task_type` (see ``tests/test_task_registry.py``).
"""

from __future__ import annotations

from enecg.ensemble.config import TaskConfig
from enecg.ensemble.registries import TASK_TYPES, register_task_type
from enecg.ensemble.tasks.base import EvaluatedAs, Task
from enecg.ensemble.tasks.binary import BinaryTask
from enecg.ensemble.tasks.multiclass import MulticlassTask
from enecg.ensemble.tasks.multilabel import MultilabelTask, SigmoidTask
from enecg.ensemble.tasks.regression import RegressionTask


def build_task(config: TaskConfig) -> Task:
    """The task of type ``config.type`` (any registered type)."""
    return TASK_TYPES.get(config.type)(config)


def task_type(name: str) -> type[Task]:
    """The registered class of the task type ``name``."""
    return TASK_TYPES.get(name)


def evaluated_as(name: str) -> EvaluatedAs:
    """The prediction form the evaluation uses for task type ``name`` (``multilabel``, ``binary``,
    ``multiclass`` or ``regression``)."""
    return TASK_TYPES.get(name).evaluated_as


__all__ = [
    "TASK_TYPES",
    "BinaryTask",
    "EvaluatedAs",
    "MulticlassTask",
    "MultilabelTask",
    "RegressionTask",
    "SigmoidTask",
    "Task",
    "build_task",
    "evaluated_as",
    "register_task_type",
    "task_type",
]
