"""Cross-dataset validation: a model trained on one source, evaluated on another through a label map.

A model trained on PTB-XL predicts SCP statements (``rhythm``: SR, AFIB, ...); a CinC Challenge dataset carries
SNOMED CT classes (``dx``: NSR, AF, ...). :func:`plan_cross_dataset` resolves every label on both sides to a
*finding* of :mod:`enecg.data.label_maps` and pairs the model's labels with the target dataset's labels of the
same finding (one target label per finding; a finding split over several target labels is ambiguous and left
out, with a note). Tasks that every enecg source defines the same way (:data:`SHARED_TASKS`: the PTB-XL diagnostic
``superclass``, which the CinC builder derives from SNOMED CT codes with the same names; ``sex``; ``age``) pair by
name, label for label, whatever the map. :func:`evaluate_cross_dataset` then evaluates the paired labels on the target records and,
side by side, on the in-source test split restricted to the same labels, so the two rows compare like with like.

Honest external validation: operating-point thresholds and the calibration temperature are fitted on the
*source* validation split, never on the target data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from enecg.data.cinc import parse_classes
from enecg.data.label_maps import ptbxl_label_finding, snomed_class_finding
from enecg.data.schema import DatasetMeta, TaskInfo
from enecg.ensemble.tasks import evaluated_as
from enecg.evaluation.metrics import BootstrapConfig, OperatingPoint
from enecg.evaluation.task_eval import evaluate_task

# Label maps by name: "ptbxl-cinc" resolves PTB-XL SCP statements and CinC SNOMED CT classes to shared findings;
# "identity" pairs labels of the same name (two datasets of one label system, e.g. two PTB-XL builds).
LABEL_MAPS: tuple[str, ...] = ("ptbxl-cinc", "identity")
MAPPABLE_TYPES = ("multilabel", "binary")
# Tasks with one definition in every source enecg builds, so a task of the same name, type and label names means
# the same on both sides: ``superclass`` (PTB-XL's diagnostic superclasses; the CinC builder derives them from
# the SNOMED CT Dx codes, enecg.data.label_maps.superclass_labels: present when any member code is), ``sex``
# (enecg.data.targets.SEX_TASK: 0 male, 1 female) and ``age`` (AGE_TASK, years).
SHARED_TASKS: frozenset[str] = frozenset({"superclass", "sex", "age"})
_BY_NAME_TYPES = (*MAPPABLE_TYPES, "regression")


@dataclass
class LabelPair:
    """One model label evaluated against one target label of the same finding."""

    finding: str
    model_label: str
    target_label: str


@dataclass
class TaskMatch:
    """The labels of one model task that a target task also carries."""

    key: str = field(
        metadata={
            "help": "Name of this comparison in the results (the model task, or "
            "'model_task/target_task' when several target tasks match)."
        }
    )
    model_task: str = field(metadata={"help": "Task of the model (and of the source dataset)."})
    target_task: str = field(metadata={"help": "Task of the target dataset."})
    pairs: list[LabelPair] = field(default_factory=list, metadata={"help": "Paired labels."})
    model_index: list[int] = field(default_factory=list, metadata={"help": "Columns of the model's outputs."})
    target_index: list[int] = field(default_factory=list, metadata={"help": "Columns of the target labels."})
    task_type: str = field(
        default="multilabel",
        metadata={"help": "How the pairs are evaluated: 'multilabel' (classification) or 'regression'."},
    )

    @property
    def label_names(self) -> list[str]:
        return [p.model_label for p in self.pairs]


@dataclass
class CrossDatasetPlan:
    """Which model outputs are compared with which target labels."""

    label_map: str
    source: str
    target: str
    matches: list[TaskMatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for match in data["matches"]:
            match.pop("model_index"), match.pop("target_index")
        return data


def task_label_names(task: TaskInfo) -> list[str]:
    """Names of a task's outputs as the model predicts them.

    A binary task has one output, the positive class: datasets name both classes (``["male", "female"]``: 0, 1),
    so its name is the last one, or the task name when there is none. Other tasks: their label names.
    """
    if evaluated_as(task.type) in ("binary", "regression"):
        return [task.names[-1]] if task.names else [task.name]
    return list(task.names)


def label_findings(meta: DatasetMeta, task: TaskInfo, label_map: str) -> dict[str, str]:
    """Label -> finding key for the labels of ``task`` (of a dataset described by ``meta``) that the map knows."""
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label map {label_map!r}; known: {list(LABEL_MAPS)}")
    names = task_label_names(task)
    if evaluated_as(task.type) not in MAPPABLE_TYPES:
        return {}
    if label_map == "identity":
        return {name: name for name in names}
    if meta.source == "ptbxl":
        found = {name: ptbxl_label_finding(task.name, name) for name in names}
    elif meta.source == "cinc":
        found = {name: snomed_class_finding(codes) for name, codes in _cinc_class_codes(meta, task).items()}
    else:
        raise ValueError(
            f"label map {label_map!r} has no rule for datasets of source {meta.source!r} (known: ptbxl, cinc)"
        )
    return {name: key for name, key in found.items() if key is not None}


def _cinc_class_codes(meta: DatasetMeta, task: TaskInfo) -> dict[str, tuple[str, ...]]:
    """SNOMED CT codes of each class of a CinC ``dx`` task, from the class spec recorded in the dataset meta."""
    if task.name != "dx":
        return {}
    spec = meta.options.get("classes", "cinc2021")
    classes = {c.name: c.codes for c in parse_classes(spec)}
    unknown = [name for name in task.names if name not in classes]
    if unknown:
        raise ValueError(f"CinC dataset: dx labels {unknown} are not classes of its recorded spec {spec!r}")
    return {name: classes[name] for name in task.names}


def plan_cross_dataset(
    source_meta: DatasetMeta,
    target_meta: DatasetMeta,
    label_map: str,
    model_tasks: Sequence[str] | None = None,
    target_name: str | None = None,
) -> CrossDatasetPlan:
    """Pair the model's labels (tasks of ``source_meta``, restricted to ``model_tasks``) with ``target_meta``'s.

    A finding is used when exactly one label of the target task and one label of the model task stand for it.
    With the ``identity`` map, labels pair by name within tasks of the same name; with any map, so do the labels
    of :data:`SHARED_TASKS` (``superclass``, ``sex``, ``age``) present in both datasets.
    """
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label map {label_map!r}; known: {list(LABEL_MAPS)}")
    plan = CrossDatasetPlan(
        label_map=label_map, source=source_meta.source, target=target_name or target_meta.source
    )
    wanted = set(model_tasks) if model_tasks is not None else None
    target_tasks = [t for t in target_meta.tasks if evaluated_as(t.type) in MAPPABLE_TYPES]
    for task in source_meta.tasks:
        if (wanted is not None and task.name not in wanted) or evaluated_as(task.type) not in _BY_NAME_TYPES:
            continue
        task_matches = []
        by_name = label_map == "identity" or task.name in SHARED_TASKS
        same_named = next((t for t in target_meta.tasks if t.name == task.name), None) if by_name else None
        if same_named is not None:
            match = _match_by_name(task, same_named, plan)
            if match is not None:
                task_matches.append(match)
        if evaluated_as(task.type) in MAPPABLE_TYPES and label_map != "identity":
            model_found = label_findings(source_meta, task, label_map)
            for target in target_tasks if model_found else ():
                if same_named is not None and target.name == same_named.name:
                    continue  # paired by name above
                match = _match_task(
                    task, model_found, target, label_findings(target_meta, target, label_map), plan
                )
                if match is not None:
                    task_matches.append(match)
        for match in task_matches:
            if len(task_matches) > 1:
                match.key = f"{match.model_task}/{match.target_task}"
            plan.matches.append(match)
    if not plan.matches:
        plan.notes.append(f"no label of the model's tasks maps onto a label of {plan.target} ({label_map})")
    return plan


def _match_by_name(task: TaskInfo, target: TaskInfo, plan: CrossDatasetPlan) -> TaskMatch | None:
    """Pair the labels of two tasks of the same name (one definition on both sides) by label name."""
    if target.type != task.type:
        plan.notes.append(
            f"{task.name}: a {task.type} task in the model but {target.type} in {plan.target}; left out"
        )
        return None
    model_names, target_names = task_label_names(task), task_label_names(target)
    match = TaskMatch(
        key=task.name,
        model_task=task.name,
        target_task=target.name,
        task_type="regression" if evaluated_as(task.type) == "regression" else "multilabel",
    )
    for name in model_names:
        if name in target_names:
            match.pairs.append(LabelPair(name, name, name))
            match.model_index.append(model_names.index(name))
            match.target_index.append(target_names.index(name))
    missing = [name for name in model_names if name not in target_names]
    if missing and match.pairs:
        plan.notes.append(f"{task.name}: labels {missing} are not in {plan.target}'s {target.name}; left out")
    return match if match.pairs else None


def _match_task(
    task: TaskInfo,
    model_found: dict[str, str],
    target: TaskInfo,
    target_found: dict[str, str],
    plan: CrossDatasetPlan,
) -> TaskMatch | None:
    by_finding: dict[str, list[str]] = {}
    for label, key in target_found.items():
        by_finding.setdefault(key, []).append(label)
    model_by_finding: dict[str, list[str]] = {}
    for label, key in model_found.items():
        model_by_finding.setdefault(key, []).append(label)
    model_names, target_names = task_label_names(task), task_label_names(target)
    match = TaskMatch(key=task.name, model_task=task.name, target_task=target.name)
    for finding, model_labels in model_by_finding.items():
        target_labels = by_finding.get(finding)
        if not target_labels:
            continue
        if len(model_labels) > 1 or len(target_labels) > 1:
            plan.notes.append(
                f"{task.name}/{target.name}: finding {finding} is ambiguous (model labels {model_labels}, "
                f"target labels {target_labels}); left out"
            )
            continue
        match.pairs.append(LabelPair(finding, model_labels[0], target_labels[0]))
        match.model_index.append(model_names.index(model_labels[0]))
        match.target_index.append(target_names.index(target_labels[0]))
    return match if match.pairs else None


def _columns(values: np.ndarray, index: Sequence[int]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    values = values[:, None] if values.ndim == 1 else values
    return values[:, list(index)]


def evaluate_cross_dataset(
    plan: CrossDatasetPlan,
    *,
    target_true: Mapping[str, np.ndarray],
    target_pred: Mapping[str, np.ndarray],
    target_groups: Sequence[Any] | None,
    source_true: Mapping[str, np.ndarray] | None = None,
    source_pred: Mapping[str, np.ndarray] | None = None,
    source_groups: Sequence[Any] | None = None,
    source_val_true: Mapping[str, np.ndarray] | None = None,
    source_val_pred: Mapping[str, np.ndarray] | None = None,
    operating_point: OperatingPoint | None = None,
    bootstrap: BootstrapConfig | None = None,
    source_name: str = "in-source",
    target_name: str = "external",
) -> dict[str, dict[str, Any]]:
    """Evaluate the plan's paired labels on the target records and, side by side, on the in-source test split.

    Args:
        target_true: target dataset labels by *target* task. ``target_pred``: the model's predictions on the
            target records by *model* task. ``source_*``: labels and predictions of the in-source test split
            (optional: without them only the target row is returned) and of the source validation split (fits
            thresholds and temperature; without it thresholds are 0.5).

    Returns ``{source_name: {match key: evaluate_task result}, target_name: {...}}`` (each result also carries
    ``label_pairs``: the model label -> target label pairs it evaluates).
    """
    results: dict[str, dict[str, Any]] = {}
    for match in plan.matches:
        val_true = val_pred = None
        if source_val_true is not None and source_val_pred is not None:
            val_true = _columns(source_val_true[match.model_task], match.model_index)
            val_pred = _columns(source_val_pred[match.model_task], match.model_index)
        pairs = [asdict(p) for p in match.pairs]
        if match.task_type == "regression":  # age: values, no thresholds
            for name, true, pred, groups in (
                (source_name, source_true, source_pred, source_groups),
                (target_name, target_true, target_pred, target_groups),
            ):
                if true is None or pred is None:
                    continue
                task = match.model_task if name == source_name else match.target_task
                result = evaluate_task(
                    "regression",
                    match.label_names,
                    _columns(true[task], match.model_index if name == source_name else match.target_index)[:, 0],
                    _columns(pred[match.model_task], match.model_index)[:, 0],
                    test_groups=groups,
                    bootstrap=bootstrap,
                )
                results.setdefault(name, {})[match.key] = result | {"label_pairs": pairs}
            continue
        common = dict(
            val_true=val_true, val_pred=val_pred, operating_point=operating_point, bootstrap=bootstrap
        )
        if source_true is not None and source_pred is not None:
            in_source = evaluate_task(
                "multilabel",
                match.label_names,
                _columns(source_true[match.model_task], match.model_index),
                _columns(source_pred[match.model_task], match.model_index),
                test_groups=source_groups,
                **common,
            )
            results.setdefault(source_name, {})[match.key] = in_source | {"label_pairs": pairs}
        external = evaluate_task(
            "multilabel",
            match.label_names,
            _columns(target_true[match.target_task], match.target_index),
            _columns(target_pred[match.model_task], match.model_index),
            test_groups=target_groups,
            **common,
        )
        results.setdefault(target_name, {})[match.key] = external | {"label_pairs": pairs}
    return results
