"""``create_ensemble``: an ensemble from experts (Hub IDs, bundled spec names, folders or loaded modules) and tasks,
in one call (the shape of ``timm.create_model`` / ``peft.get_peft_model``).

:func:`expert_ref` is the one place a loaded expert becomes the :class:`~enecg.ensemble.config.ExpertRef` that a
saved ensemble records (its Hub ID, resolved revision, spec and LoRA targets); the trainer uses it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from enecg.data.schema import TaskInfo
from enecg.ensemble.config import (
    EnsembleConfig,
    ExpertRef,
    GateSettings,
    HeadSettings,
    LoraSettings,
    TaskConfig,
)
from enecg.ensemble.model import Ensemble
from enecg.experts.expert import load_expert
from enecg.experts.resolve import LOCAL_PREFIX

ExpertSource = str | Path | nn.Module
TaskSource = TaskConfig | TaskInfo | Mapping[str, Any]


def expert_ref(name: str, expert: nn.Module, *, hub_id: str | None = None) -> ExpertRef:
    """The :class:`ExpertRef` of a loaded expert: what a saved ensemble needs to load it again.

    The source recorded is the expert's ``hub_id`` attribute, else ``hub_id`` (e.g. the folder an in-house expert
    was created in), else the local folder the expert was loaded from."""
    spec = getattr(expert, "spec", None)
    loaded_from = str(getattr(expert, "source", "") or "")
    local = loaded_from[len(LOCAL_PREFIX) :] if loaded_from.startswith(LOCAL_PREFIX) else None
    source = getattr(expert, "hub_id", None) or hub_id or local
    if not source:
        raise ValueError(f"expert {name!r}: no hub_id attribute; pass the Hub ID or folder it loads from")
    return ExpertRef(
        name=name,
        hub_id=str(source),
        embedding_dim=int(expert.embedding_dim),
        revision=getattr(expert, "revision", None),
        spec=spec.to_dict() if spec is not None and hasattr(spec, "to_dict") else None,
        lora_target_modules=list(getattr(expert, "lora_target_modules", []) or []),
    )


def create_ensemble(
    experts: Sequence[ExpertSource] | Mapping[str, ExpertSource],
    tasks: Sequence[TaskSource],
    *,
    gate: GateSettings | Mapping[str, Any] | None = None,
    heads: HeadSettings | Mapping[str, Any] | None = None,
    lora: LoraSettings | Mapping[str, Any] | None = None,
    task_weighting: str = "static",
    seed: int = 0,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Ensemble:
    """Build an untrained :class:`Ensemble` (frozen experts, fresh heads, LoRA and gate).

    Args:
        experts: a list (names derived from each source: ``hubert-ecg-small``, ``org/model`` -> ``model``) or a
            ``{name: source}`` mapping. A source is a bundled spec name, a Hub ID, a local folder (loaded with
            :func:`~enecg.experts.load_expert`) or an already loaded expert module (``embedding_dim``,
            ``hub_id``).
        tasks: :class:`TaskConfig`\\ s, dicts of their fields (``{"name": "superclass", "type": "multilabel",
            "label_names": [...]}``) or a prepared dataset's :class:`~enecg.data.schema.TaskInfo`\\ s.
        gate, heads, lora: settings as dataclasses or dicts of their fields (defaults otherwise).
        task_weighting, seed: as :class:`EnsembleConfig`.
        revision, cache_dir, local_files_only: Hub options for experts given by name (``revision`` pins every
            one of them; pin experts one by one by loading them first).

    Example::

        model = enecg.create_ensemble(
            ["hubert-ecg-small", "ecgfounder-12lead"],
            tasks=[{"name": "superclass", "type": "multilabel", "label_names": ["NORM", "MI", "STTC", "CD", "HYP"]}],
            gate={"input": "signal", "top_k": 1},
        )
    """
    named = _named_sources(experts)
    loaded = {
        name: source
        if isinstance(source, nn.Module)
        else load_expert(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        for name, source in named.items()
    }
    refs = [
        expert_ref(name, module, hub_id=None if isinstance(named[name], nn.Module) else str(named[name]))
        for name, module in loaded.items()
    ]
    config = EnsembleConfig(
        experts=refs,
        tasks=[_task_config(task) for task in tasks],
        heads=_settings(HeadSettings, heads),
        lora=_settings(LoraSettings, lora),
        gate=_settings(GateSettings, gate),
        task_weighting=task_weighting,
        seed=seed,
    )
    return Ensemble(config, loaded)


def _named_sources(experts: Sequence[ExpertSource] | Mapping[str, ExpertSource]) -> dict[str, ExpertSource]:
    if isinstance(experts, Mapping):
        return dict(experts)
    if isinstance(experts, (str, Path, nn.Module)):
        raise TypeError("experts must be a list or a {name: source} mapping, not a single expert")
    named: dict[str, ExpertSource] = {}
    for source in experts:
        name = expert_name(source)
        if name in named:
            raise ValueError(f"two experts would both be named {name!r}: pass a {{name: source}} mapping instead")
        named[name] = source
    if not named:
        raise ValueError("create_ensemble needs at least one expert")
    return named


def expert_name(source: ExpertSource) -> str:
    """A name for an expert from its source: ``hubert-ecg-small``, ``org/model`` -> ``model``, a folder -> its
    last part (letters, digits, ``_`` and ``-`` only)."""
    if isinstance(source, nn.Module):
        raw = getattr(source, "name", None) or getattr(source, "hub_id", None) or type(source).__name__
    else:
        raw = str(source)
    raw = str(raw).rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", raw).strip("_") or "expert"
    return f"e_{name}" if name.startswith("lora_") else name


def _task_config(task: TaskSource) -> TaskConfig:
    if isinstance(task, TaskConfig):
        return task
    if isinstance(task, TaskInfo):
        return TaskConfig.from_task_info(task)
    if isinstance(task, Mapping):
        return TaskConfig.from_dict(dict(task))
    raise TypeError(f"a task must be a TaskConfig, a TaskInfo or a dict, got {type(task).__name__}")


def _settings(cls: type, value: Any) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(dict(value))
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")
