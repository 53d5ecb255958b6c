"""Record-level prediction with its explanation: what the ensemble says, what each expert said, how they were mixed.

:func:`predict_records` runs an :class:`~enecg.ensemble.model.Ensemble` on ECG records (or record paths): every
expert's contract and the gate's are applied by :class:`~enecg.ensemble.inputs.EnsembleInputBuilder`, and per
record and task the result holds

* the combined prediction by label name (probabilities for multilabel/binary/multiclass, values in the target's
  unit for regression),
* each expert's own prediction (None for an expert the sparse gate did not route the record to),
* the gate's weights over the experts (summing to 1),
* the decision thresholds when known (:attr:`Ensemble.decision_thresholds`, saved as ``thresholds.json``) and the
  labels they make positive, or the arg-max class of a multiclass task.

:meth:`RecordPrediction.to_dict` is JSON-ready (plain floats, no NaN).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from enecg.ensemble.config import EnsembleConfig, TaskConfig
from enecg.ensemble.inference import in_batches, run_records
from enecg.ensemble.inputs import EnsembleBatch, EnsembleInputBuilder
from enecg.ensemble.model import Ensemble
from enecg.ensemble.tasks import evaluated_as
from enecg.io import read_record
from enecg.record import ECGRecord

DEFAULT_BATCH_SIZE = 32

# A task's prediction for one record: {label: value} for outputs with names, or one value (regression).
Value = dict[str, float] | float


@dataclass
class TaskPrediction:
    """One task's prediction for one record, with its explanation."""

    task: str = field(metadata={"help": "Task name."})
    type: str = field(metadata={"help": "multilabel | multiclass | binary | regression"})
    prediction: Value = field(
        metadata={"help": "Combined prediction: {label: probability}, or the regression value."}
    )
    experts: dict[str, Value | None] = field(
        metadata={"help": "Each expert's own prediction (same form); None where the gate skipped the expert."}
    )
    gate_weights: dict[str, float] = field(metadata={"help": "Mixture weight of each expert (sum 1)."})
    thresholds: dict[str, float] | None = field(
        default=None, metadata={"help": "Decision threshold per label, when the model ships them."}
    )
    positive_labels: list[str] | None = field(
        default=None, metadata={"help": "Labels at or above their threshold (None without thresholds)."}
    )
    predicted_label: str | None = field(
        default=None, metadata={"help": "Multiclass: the most probable class."}
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "prediction": self.prediction,
            "experts": dict(self.experts),
            "gate_weights": dict(self.gate_weights),
            "thresholds": None if self.thresholds is None else dict(self.thresholds),
            "positive_labels": None if self.positive_labels is None else list(self.positive_labels),
            "predicted_label": self.predicted_label,
        }


@dataclass
class ExpertInput:
    """What one expert really saw of one record."""

    zero_filled_leads: list[str] = field(
        default_factory=list, metadata={"help": "Leads of the expert's contract the record lacks (zero-filled)."}
    )
    refused: str | None = field(
        default=None,
        metadata={"help": "Why the expert could not read the record (it then had no say); None if it could."},
    )

    def to_dict(self) -> dict[str, Any]:
        return {"zero_filled_leads": list(self.zero_filled_leads), "refused": self.refused}


@dataclass
class RecordPrediction:
    """The ensemble's output for one record: ``tasks`` maps task name -> :class:`TaskPrediction`; ``leads`` are
    the leads the record really has and ``inputs`` what each expert saw of them."""

    record_id: str
    tasks: dict[str, TaskPrediction]
    leads: list[str] = field(default_factory=list)
    inputs: dict[str, ExpertInput] = field(default_factory=dict)

    def predictions(self) -> dict[str, Value]:
        """Only the combined predictions: task -> {label: probability} (or value)."""
        return {name: task.prediction for name, task in self.tasks.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"record_id", "leads", "inputs": {expert: {...}}, "tasks": {task: {...}}}``."""
        return {
            "record_id": self.record_id,
            "leads": list(self.leads),
            "inputs": {name: info.to_dict() for name, info in self.inputs.items()},
            "tasks": {n: t.to_dict() for n, t in self.tasks.items()},
        }


def check_thresholds(
    config: EnsembleConfig, thresholds: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Validate decision thresholds ``task -> label -> threshold in [0, 1]`` against the tasks (binary and
    multilabel only; a binary task's label is its label name, or the task name when it has none)."""
    out: dict[str, dict[str, float]] = {}
    for task_name, per_label in thresholds.items():
        try:
            task = config.task(task_name)
        except KeyError as exc:
            raise ValueError(f"decision thresholds: {exc.args[0]}") from None
        if evaluated_as(task.type) not in ("binary", "multilabel"):
            raise ValueError(
                f"decision thresholds: task {task_name!r} is {task.type}; thresholds apply to "
                f"binary and multilabel tasks"
            )
        labels = output_labels(task)
        unknown = sorted(set(per_label) - set(labels))
        if unknown:
            raise ValueError(
                f"decision thresholds: task {task_name!r} has no labels {unknown}; labels: {labels}"
            )
        values = {}
        for label, value in per_label.items():
            value = float(value)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"decision thresholds: {task_name}/{label} = {value!r} is not in [0, 1]")
            values[str(label)] = value
        out[task_name] = values
    return out


def output_labels(task: TaskConfig) -> list[str]:
    """Names of a task's outputs: its label names, or the task name for a single unnamed output."""
    return list(task.label_names) if task.label_names else [task.name]


def predict_records(
    ensemble: Ensemble,
    records: Sequence[ECGRecord | str | os.PathLike],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> list[RecordPrediction]:
    """Predict every task for each record, with per-expert predictions and gate weights (eval mode, no grad).

    Args:
        records: :class:`~enecg.record.ECGRecord` objects or WFDB record paths (read with
            :func:`enecg.io.read_record`).
        batch_size: records per forward pass.
        thresholds: task -> label -> decision threshold; default: the ensemble's ``decision_thresholds``.
    """
    loaded = [r if isinstance(r, ECGRecord) else read_record(r) for r in records]
    if thresholds is None:
        thresholds = getattr(ensemble, "decision_thresholds", None) or {}
    thresholds = check_thresholds(ensemble.config, thresholds)
    builder = EnsembleInputBuilder.for_ensemble(ensemble)
    results: list[RecordPrediction] = []
    for _, batch, output in run_records(ensemble, in_batches(loaded, batch_size), builder=builder):
        explained = _explain(ensemble, output, batch.record_ids, thresholds)
        for i, prediction in enumerate(explained):
            prediction.leads = list(batch.record_leads[i])
            prediction.inputs = _inputs_seen(builder, batch, i)
        results.extend(explained)
    return results


def compare_predictions(expected: Sequence[RecordPrediction], got: Sequence[RecordPrediction]) -> dict[str, Any]:
    """Whether two models predicted the same records identically (e.g. a trained model and its copy pulled back
    from the Hub): ``{"records": ids, "identical": bool, "max_abs_difference": float | None}``. The difference is
    taken over every number of the predictions (None when their shapes differ; NaN on both sides counts as equal).
    """
    a = [r.to_dict() for r in expected]
    b = [r.to_dict() for r in got]
    xs, ys = _numbers(a), _numbers(b)
    diff = max((abs(x - y) for x, y in zip(xs, ys) if not (math.isnan(x) and math.isnan(y))), default=0.0)
    return {
        "records": [r["record_id"] for r in a],
        "identical": a == b,
        "max_abs_difference": diff if len(xs) == len(ys) else None,
    }


def _numbers(value: Any) -> list[float]:
    """Every number of a JSON-like value, in a fixed order (mapping keys sorted)."""
    if isinstance(value, Mapping):
        return [x for key in sorted(value) for x in _numbers(value[key])]
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _numbers(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def _explain(
    ensemble: Ensemble, output: Any, record_ids: list[str], thresholds: dict[str, dict[str, float]]
) -> list[RecordPrediction]:
    experts = ensemble.expert_names
    per_record: list[dict[str, TaskPrediction]] = [{} for _ in record_ids]
    for task_config in ensemble.config.tasks:
        name = task_config.name
        labels = output_labels(task_config)
        combined = output.predictions[name].float().cpu()
        by_expert = output.expert_predictions[name].float().cpu()
        weights = output.gate_weights[name].float().cpu()
        task_thresholds = thresholds.get(name)
        for i in range(len(record_ids)):
            prediction = _value(combined[i], labels, task_config.type)
            positives = predicted = None
            if task_thresholds is not None and isinstance(prediction, dict):
                positives = [
                    label
                    for label in labels
                    if label in task_thresholds and prediction[label] >= task_thresholds[label]
                ]
            if evaluated_as(task_config.type) == "multiclass":
                predicted = labels[int(torch.argmax(combined[i]))]
            per_record[i][name] = TaskPrediction(
                task=name,
                type=task_config.type,
                prediction=prediction,
                experts={
                    expert: _value(by_expert[i, e], labels, task_config.type, allow_missing=True)
                    for e, expert in enumerate(experts)
                },
                gate_weights={expert: float(weights[i, e]) for e, expert in enumerate(experts)},
                thresholds=None if task_thresholds is None else dict(task_thresholds),
                positive_labels=positives,
                predicted_label=predicted,
            )
    return [RecordPrediction(record_id=rid, tasks=tasks) for rid, tasks in zip(record_ids, per_record)]


def _inputs_seen(builder: EnsembleInputBuilder, batch: EnsembleBatch, i: int) -> dict[str, ExpertInput]:
    """Per expert: the contract leads record ``i`` lacks (zero-filled), or why the expert refused it."""
    out = {}
    for name, contract in builder.contracts.items():
        refused = batch.refusals.get(name, [None] * (i + 1))[i]
        lead_mask = batch.lead_masks.get(name)
        missing: list[str] = []
        if refused is None and lead_mask is not None and contract.leads is not None:
            missing = [lead for lead, real in zip(contract.leads, lead_mask[i].tolist()) if not real]
        out[name] = ExpertInput(zero_filled_leads=missing, refused=refused)
    return out


def _value(
    values: torch.Tensor, labels: list[str], task_type: str, allow_missing: bool = False
) -> Value | None:
    """One record's output of one task as {label: value} (or a float for regression); None if not computed."""
    flat = [float(v) for v in values.reshape(-1)]
    if any(math.isnan(v) for v in flat):
        if allow_missing:
            return None  # the expert did not run on this record (sparse routing)
        raise RuntimeError(f"the ensemble produced NaN predictions for labels {labels}")
    if task_type == "regression":
        return flat[0]
    return dict(zip(labels, flat, strict=True))


__all__ = [
    "ExpertInput",
    "RecordPrediction",
    "TaskPrediction",
    "check_thresholds",
    "compare_predictions",
    "output_labels",
    "predict_records",
]
