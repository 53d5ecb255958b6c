"""The ensemble's registries: gate kinds and task types, each a class registered by name.

They live in this small module (which imports nothing of the ensemble) so that configs can validate names
against them without importing the classes; the built-in classes register themselves when a registry is first
read (:class:`~enecg.utils.registry.Registry`'s ``builtins``).
"""

from __future__ import annotations

from typing import Any

from enecg.utils.registry import Registry

GATES: Registry[Any] = Registry("gate input", builtins="enecg.ensemble.gates")
"""``gate.input`` name -> :class:`~enecg.ensemble.gates.base.Gate` subclass."""

register_gate = GATES.register

TASK_TYPES: Registry[Any] = Registry("task type", builtins="enecg.ensemble.tasks", key="type_name")
"""``tasks[].type`` name -> :class:`~enecg.ensemble.tasks.base.Task` subclass."""

register_task_type = TASK_TYPES.register
