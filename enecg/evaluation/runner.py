"""Evaluate an ensemble on a prepared dataset: metrics, baselines, gate statistics, figures and the report.

:func:`evaluate_ensemble` runs the model over the evaluated split and the validation split (thresholds and the
calibration temperature are fitted there, see :mod:`enecg.evaluation.task_eval`) and evaluates, per task:

* the ensemble;
* each expert alone (its own heads' predictions, ``EnsembleOutput.expert_predictions``);
* a uniform average of the experts, combined with the ensemble's own rule (``gate.mix``) but equal weights, so
  the gain of the learned gate over plain averaging is visible;
* the best single expert chosen on validation, a linear probe per expert on its embedding and a classic stacker
  on the probes' out-of-fold outputs, fitted on the training part (:mod:`enecg.evaluation.baselines`);
* the ensemble minus each of the best single expert, the uniform average and the stacker, with patient-level
  *paired* bootstrap CIs (:mod:`enecg.evaluation.paired`);
* optionally the same model on other datasets through a label map (:mod:`enecg.evaluation.cross_dataset`).

It then renders ROC/PR and calibration curves per task, the gate's weight distribution per expert and task, and a
paper-style 12-lead rendering of a few test records with every expert's prediction and the gate's weights, and
writes ``report.json`` + ``report.html`` (:func:`enecg.evaluation.report.write_report`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor

from enecg.data.build import load_dataset_dir
from enecg.data.pool import pool_training_part
from enecg.data.rows import label_arrays, row_to_record
from enecg.data.schema import DatasetMeta, TaskInfo, refuse_synthetic
from enecg.ensemble.feature_cache import FeatureCache, build_feature_table
from enecg.ensemble.inference import run_records
from enecg.ensemble.inputs import EnsembleBatch, EnsembleInputBuilder
from enecg.ensemble.model import Ensemble, EnsembleOutput
from enecg.ensemble.tasks import evaluated_as
from enecg.evaluation.baselines import BEST_SINGLE, STACKER, SplitFeatures, best_single_expert, fit_baselines
from enecg.evaluation.cross_dataset import evaluate_cross_dataset, plan_cross_dataset, task_label_names
from enecg.evaluation.metrics import BootstrapConfig, OperatingPoint
from enecg.evaluation.paired import paired_difference
from enecg.evaluation.plots import plot_calibration, plot_ecg_12lead, plot_gate_weights, plot_roc_pr
from enecg.evaluation.report import write_report
from enecg.evaluation.task_eval import evaluate_task
from enecg.record import ECGRecord
from enecg.utils.version import __version__ as ENECG_VERSION

logger = logging.getLogger(__name__)

UNIFORM_BASELINE = "uniform average"
FIGURES_DIR = "figures"
EXAMPLES_DIR = "examples"
_RECORD_COLUMNS = ("record_id", "patient_id", "source", "signal", "fs", "leads", "age", "sex", "split")


@dataclass
class SplitPredictions:
    """Everything the model said about the records of one split, in record order.

    ``...`` is ``K`` outputs for multilabel/multiclass tasks and nothing for binary/regression; E experts in the
    ensemble's order.
    """

    record_ids: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    labels: dict[str, np.ndarray] = field(
        default_factory=dict, metadata={"help": "task -> (N, ...), NaN missing"}
    )
    predictions: dict[str, np.ndarray] = field(default_factory=dict, metadata={"help": "ensemble, (N, ...)"})
    expert_predictions: dict[str, np.ndarray] = field(default_factory=dict, metadata={"help": "(N, E, ...)"})
    uniform_predictions: dict[str, np.ndarray] = field(default_factory=dict, metadata={"help": "(N, ...)"})
    gate_weights: dict[str, np.ndarray] = field(default_factory=dict, metadata={"help": "(N, E)"})
    record_leads: list[list[str]] = field(
        default_factory=list, metadata={"help": "per record, the leads it really has"}
    )
    readable: np.ndarray | None = field(
        default=None, metadata={"help": "(N, E) bool: False where an expert's contract refused the record"}
    )

    def __len__(self) -> int:
        return len(self.record_ids)


# ------------------------------------------------------------------------------------------ running the model


def _expert_and_uniform_logits(
    ensemble: Ensemble, batch: EnsembleBatch, output: EnsembleOutput
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every expert's own logits ``(B, E, ...)`` on every record (also where sparse routing skipped it), and the
    logits of the equal-weight combination of all experts (the ensemble's own rule with a uniform gate)."""
    names = ensemble.expert_names
    if ensemble.combine_embeddings:
        # An expert alone = the shared head on that expert's projection; the uniform baseline = the shared head on
        # the mean projection.
        embeddings = ensemble.embed(batch.expert_inputs, batch.demographics, **batch.masks())
        projections = [ensemble.branch(n).project(embeddings[n]) for n in names]
        mean_projection = torch.stack(projections, dim=1).mean(dim=1)
        expert_logits = {
            t: torch.stack([_shared_head(ensemble, t, p) for p in projections], dim=1) for t in ensemble.tasks
        }
        return expert_logits, {t: _shared_head(ensemble, t, mean_projection) for t in ensemble.tasks}
    if bool(output.routed.all()):
        expert_logits = (
            output.expert_logits
        )  # dense routing: forward already ran every expert on every record
    else:
        embeddings = ensemble.embed(batch.expert_inputs, batch.demographics, **batch.masks())
        per_expert = [ensemble.branch(n).head_logits(embeddings[n]) for n in names]
        expert_logits = {t: torch.stack([p[t] for p in per_expert], dim=1) for t in ensemble.tasks}
    n_records, n_experts = output.routed.shape
    readable = torch.ones(n_records, n_experts, dtype=torch.bool, device=output.routed.device)
    if batch.available is not None:
        readable = batch.available.to(readable.device, torch.bool)
    # The plain average of the experts that can read each record (an expert that cannot has a NaN prediction).
    weights = readable.float() / readable.sum(dim=1, keepdim=True).clamp(min=1)
    mix = ensemble.config.gate.mix
    uniform = {
        t: task.combine(torch.nan_to_num(expert_logits[t]), weights, weights.log(), mix)
        for t, task in ensemble.tasks.items()
    }
    return expert_logits, uniform


def _shared_head(ensemble: Ensemble, task: str, x: Tensor) -> Tensor:
    logits = ensemble.shared_heads[task](x)
    return logits.squeeze(-1) if ensemble.tasks[task].is_scalar else logits


def collect_predictions(
    ensemble: Ensemble,
    part: datasets.Dataset,
    label_tasks: Sequence[TaskInfo] = (),
    *,
    batch_size: int = 32,
) -> SplitPredictions:
    """Run ``ensemble`` (eval mode) over every record of ``part`` and collect its outputs and ``label_tasks``' labels.

    The model's mode is restored afterwards. Records are prepared with each expert's (and the gate's) contract by
    :class:`~enecg.ensemble.inputs.EnsembleInputBuilder`, in batches of ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(part) == 0:
        raise ValueError("cannot collect predictions on an empty dataset part")
    builder = EnsembleInputBuilder.for_ensemble(ensemble)
    # dict.fromkeys: a task may be a base column itself (PTB-XL's ``age``/``sex``).
    columns = [
        c for c in dict.fromkeys((*_RECORD_COLUMNS, *(t.name for t in label_tasks))) if c in part.column_names
    ]
    missing = [t.name for t in label_tasks if t.name not in part.column_names]
    if missing:
        raise ValueError(f"dataset part has no label columns {missing}")
    table = part.select_columns(columns).with_format("numpy")
    chunks: dict[str, dict[str, list[np.ndarray]]] = {
        k: {} for k in ("labels", "predictions", "expert_predictions", "uniform_predictions", "gate_weights")
    }
    out = SplitPredictions()
    readable: list[np.ndarray] = []
    row_chunks: list[list[dict[str, Any]]] = []

    def record_chunks() -> Iterator[list[ECGRecord]]:
        for start in range(0, len(table), batch_size):
            columns = table[start : start + batch_size]
            rows = [{name: values[i] for name, values in columns.items()} for i in range(len(columns["record_id"]))]
            row_chunks.append(rows)
            yield [row_to_record(row) for row in rows]

    for records, batch, output in run_records(ensemble, record_chunks(), builder=builder):
        rows = row_chunks[-1]
        expert_logits, uniform = _expert_and_uniform_logits(ensemble, batch, output)
        for name, task in ensemble.tasks.items():
            _append(chunks["predictions"], name, output.predictions[name])
            _append(chunks["expert_predictions"], name, task.predict(expert_logits[name]))
            _append(chunks["uniform_predictions"], name, task.predict(uniform[name]))
            _append(chunks["gate_weights"], name, output.gate_weights[name])
        for name, values in label_arrays(rows, list(label_tasks)).items():
            chunks["labels"].setdefault(name, []).append(values)
        out.record_ids.extend(str(r.record_id) for r in records)
        out.patient_ids.extend(str(r.patient_id) for r in records)
        out.record_leads.extend(list(leads) for leads in batch.record_leads)
        readable.append(batch.available.cpu().numpy())
    for key, per_task in chunks.items():
        setattr(out, key, {name: np.concatenate(parts, axis=0) for name, parts in per_task.items()})
    out.readable = np.concatenate(readable, axis=0) if readable else None
    return out


def lead_coverage(predictions: SplitPredictions, expert_names: Sequence[str]) -> dict[str, Any]:
    """How many records had each set of real leads, and how many each expert could not read (and so had no say
    in): the report's statement of what the model really saw."""
    sets: dict[str, int] = {}
    for leads in predictions.record_leads:
        key = ", ".join(leads)
        sets[key] = sets.get(key, 0) + 1
    readable = predictions.readable
    unreadable = {
        name: (0 if readable is None else int((~readable[:, e]).sum())) for e, name in enumerate(expert_names)
    }
    return {
        "lead_sets": dict(sorted(sets.items(), key=lambda kv: -kv[1])),
        "unreadable_records": unreadable,
    }


def _append(store: dict[str, list[np.ndarray]], name: str, tensor: Tensor) -> None:
    store.setdefault(name, []).append(tensor.detach().float().cpu().numpy())


# ---------------------------------------------------------------------------------------------- evaluation


def _model_tasks(ensemble: Ensemble, meta: DatasetMeta, where: str) -> tuple[list[TaskInfo], list[str]]:
    """The model's tasks that the dataset carries, as TaskInfos named like the model's outputs, and the skipped.

    Label sets must agree; a binary task may be named by both classes in the dataset (``[neg, pos]``) and by its
    positive class in the model.
    """
    infos, skipped = [], []
    by_name = {t.name: t for t in meta.tasks}
    for config in ensemble.config.tasks:
        info = by_name.get(config.name)
        if info is None:
            skipped.append(config.name)
            continue
        outputs = list(config.label_names) or [config.name]
        dataset_outputs = task_label_names(info)
        compatible = evaluated_as(info.type) == config.type and (
            evaluated_as(config.type) == "regression"
            or outputs == dataset_outputs
            or (evaluated_as(config.type) == "binary" and (not config.label_names or not info.names))
        )
        if not compatible:
            raise ValueError(
                f"{where}: task {config.name!r} is {info.type} {list(info.names)} in the dataset but "
                f"{config.type} {list(config.label_names)} in the model"
            )
        infos.append(TaskInfo(name=config.name, type=config.type, names=outputs, unit=info.unit))
    if not infos:
        raise ValueError(
            f"{where}: none of the model's tasks {ensemble.config.task_names} is in the dataset "
            f"(tasks: {[t.name for t in meta.tasks]})"
        )
    return infos, skipped


def _part(dataset: datasets.DatasetDict, name: str, where: str) -> datasets.Dataset:
    """An evaluated part; generated records never feed a reported metric."""
    if name not in dataset:
        raise ValueError(f"{where}: no split part {name!r}; parts: {sorted(dataset)}")
    refuse_synthetic(dataset[name]["source"], f"{where}/{name}")
    return dataset[name]


def _all_parts(dataset: datasets.DatasetDict, where: str) -> datasets.Dataset:
    return datasets.concatenate_datasets([_part(dataset, name, where) for name in sorted(dataset)])


def _evaluate_arrays(
    task: TaskInfo,
    test_true: np.ndarray,
    test_pred: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    groups: Sequence[str],
    operating_point: OperatingPoint,
    bootstrap: BootstrapConfig,
) -> dict[str, Any]:
    return with_ci_mapping(
        evaluate_task(
            task.type,
            task_label_names(task),
            test_true,
            test_pred,
            val_true=None if val is None else val[0],
            val_pred=None if val is None else val[1],
            test_groups=groups,
            operating_point=operating_point,
            bootstrap=bootstrap,
        )
    )


def with_ci_mapping(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with ``ci`` always a mapping: without bootstrap resamples ``evaluate_task`` leaves a bare
    ``(nan, nan)`` pair there, which readers of the report (``ci.get(name)``) cannot look up."""
    if not isinstance(result.get("ci"), dict):
        result = {**result, "ci": {}}
    return result


def _readable_rows(labels: np.ndarray, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels unset (NaN) where the predictions are missing: an expert is scored on the records it could read
    (its contract refused the others), never on a filled-in value."""
    missing = np.isnan(predictions.reshape(len(predictions), -1)).any(axis=1)
    if not missing.any():
        return labels, predictions
    labels = labels.astype(np.float64, copy=True)
    labels[missing] = np.nan
    return labels, np.nan_to_num(predictions)


def _evaluate_rows(
    *,
    tasks: Sequence[TaskInfo],
    test: SplitPredictions,
    val: SplitPredictions | None,
    pick: Callable[[SplitPredictions, str], np.ndarray],
    operating_point: OperatingPoint,
    bootstrap: BootstrapConfig,
) -> dict[str, Any]:
    """Task -> evaluation of one row of the report (the ensemble, an expert, a baseline): the predictions
    ``pick(split, task)`` on the test split, thresholds and temperature fitted on ``pick(val, task)``."""
    out = {}
    for task in tasks:
        predictions = pick(test, task.name)
        result = _evaluate_arrays(
            task,
            *_readable_rows(test.labels[task.name], predictions),
            None if val is None else _readable_rows(val.labels[task.name], pick(val, task.name)),
            test.patient_ids,
            operating_point,
            bootstrap,
        )
        # Records with a prediction (fewer than n_records where an expert could not read some records).
        result["n_predicted"] = int(np.isfinite(predictions.reshape(len(predictions), -1)).all(axis=1).sum())
        out[task.name] = result
    return out


def evaluate_ensemble(
    ensemble: Ensemble,
    dataset_dir: str | os.PathLike,
    *,
    split: str = "test",
    val_split: str | None = "validation",
    operating_point: OperatingPoint | None = None,
    bootstrap: BootstrapConfig | None = None,
    n_examples: int = 4,
    out_dir: str | os.PathLike,
    batch_size: int = 32,
    cross_data: Sequence[str | os.PathLike] = (),
    label_map: str = "ptbxl-cinc",
    cross_split: str | None = None,
    title: str | None = None,
    train_splits: Sequence[str] | None = ("train",),
    baselines: bool = True,
    feature_cache: str | os.PathLike | None = None,
    extra_train: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Evaluate ``ensemble`` on ``split`` of a prepared dataset and write the report into ``out_dir``.

    Args:
        val_split: the part where thresholds (``operating_point``) and the temperature are fitted; None (or a
            dataset without it) falls back to 0.5 thresholds and no temperature, which the report states.
        bootstrap: patient-level bootstrap (CIs for the ensemble, each expert, the baseline and cross-dataset
            rows; its cost grows with their number).
        n_examples: test records rendered as 12-lead ECGs with their predictions and gate weights.
        cross_data: other prepared datasets to evaluate the same model on through ``label_map``
            (:data:`~enecg.evaluation.cross_dataset.LABEL_MAPS`); ``cross_split``: their part to use (None or
            ``"all"``: all records, the usual external-validation protocol).
        train_splits: the parts the model was trained on: the linear probes and the stacker are fitted there
            (None, or parts the dataset lacks: those baselines are left out, with a log line).
        baselines: False: only the uniform average and the best single expert (no probes, no stacker).
        feature_cache: a feature-cache folder (:mod:`enecg.ensemble.feature_cache`) for the experts' embeddings
            the probes read, e.g. the training run's; None embeds the records here.
        extra_train: other prepared datasets the model's training part pooled (``data.extra_train``): the
            probes and the stacker are fitted on the same records.

    Returns the evaluation dictionary written to ``report.json`` (shape: :mod:`enecg.evaluation.report`).
    """
    operating_point = operating_point or OperatingPoint()
    bootstrap = bootstrap or BootstrapConfig()
    out_dir = Path(out_dir)
    dataset, meta = load_dataset_dir(dataset_dir)
    where = str(dataset_dir)
    tasks, skipped = _model_tasks(ensemble, meta, where)
    test_part = _part(dataset, split, where)
    if len(test_part) == 0:
        raise ValueError(f"{where}: split part {split!r} is empty")
    logger.info("Evaluating on %s/%s (%d records)", where, split, len(test_part))
    test = collect_predictions(ensemble, test_part, tasks, batch_size=batch_size)
    val: SplitPredictions | None = None
    if val_split is not None and val_split in dataset and len(dataset[val_split]) > 0:
        val = collect_predictions(ensemble, _part(dataset, val_split, where), tasks, batch_size=batch_size)
    elif val_split is not None:
        logger.warning(
            "%s has no part %r (or it is empty): thresholds default to 0.5, no temperature is fitted",
            where,
            val_split,
        )

    experts = list(ensemble.expert_names)
    common = dict(tasks=tasks, test=test, val=val, operating_point=operating_point, bootstrap=bootstrap)
    results = _evaluate_rows(pick=lambda sp, t: sp.predictions[t], **common)
    expert_results = {
        expert: _evaluate_rows(pick=lambda sp, t, e=e: sp.expert_predictions[t][:, e], **common)
        for e, expert in enumerate(experts)
    }
    uniform_results = _evaluate_rows(pick=lambda sp, t: sp.uniform_predictions[t], **common)
    baseline_results: dict[str, Any] = {UNIFORM_BASELINE: uniform_results}
    comparison_predictions: dict[str, dict[str, np.ndarray]] = {
        UNIFORM_BASELINE: {t.name: test.uniform_predictions[t.name] for t in tasks}
    }
    details: dict[str, Any] = {}
    if val is not None:
        chosen = {
            t.name: best_single_expert(t, val.labels[t.name], val.expert_predictions[t.name]) for t in tasks
        }
        baseline_results[BEST_SINGLE] = _evaluate_rows(
            pick=lambda sp, t: sp.expert_predictions[t][:, chosen[t]], **common
        )
        comparison_predictions[BEST_SINGLE] = {
            t.name: test.expert_predictions[t.name][:, chosen[t.name]] for t in tasks
        }
        details["best_single_expert"] = {t: experts[e] for t, e in chosen.items()}
    train_part = _train_part(dataset, train_splits, where) if baselines else None
    if train_part is not None:
        train_part = pool_training_part(train_part, extra_train, [meta.task(t.name) for t in tasks])
        cache = FeatureCache(feature_cache) if feature_cache is not None else None
        features = {
            name: _split_features(ensemble, part, tasks, cache, batch_size)
            for name, part in (("train", train_part), (split, test_part))
        }
        evaluated = {"test": features[split]}
        if val is not None:
            evaluated["validation"] = _split_features(ensemble, dataset[val_split], tasks, cache, batch_size)
        fitted, details["fitted"] = fit_baselines(tasks, features["train"], evaluated, seed=bootstrap.seed)
        for name, per_split in fitted.items():
            baseline_results[name] = _evaluate_rows(
                pick=lambda sp, t, d=per_split: d["test" if sp is test else "validation"][t], **common
            )
        comparison_predictions[STACKER] = fitted[STACKER]["test"]
    paired = {
        task.name: {
            name: paired_difference(
                task.type,
                test.labels[task.name],
                test.predictions[task.name],
                predictions[task.name],
                test.patient_ids,
                bootstrap,
            )
            for name, predictions in comparison_predictions.items()
        }
        for task in tasks
    }

    figures = _task_figures(tasks, test, out_dir)
    gate = gate_statistics(test, experts, [t.name for t in tasks])
    plot_gate_weights(
        {t.name: test.gate_weights[t.name] for t in tasks}, experts, out_dir / FIGURES_DIR / "gate.png"
    )
    figures.append(
        {
            "path": f"{FIGURES_DIR}/gate.png",
            "section": "gate",
            "caption": "Gate weight per record, by expert and task (box: quartiles; triangle: mean)",
        }
    )

    cross_results: dict[str, dict[str, Any]] = {}
    cross_plans: list[dict[str, Any]] = []
    for target_dir in cross_data:
        plan_dict, rows, cross_figures = _cross_dataset(
            ensemble,
            meta,
            target_dir,
            label_map,
            cross_split,
            split,
            test,
            val,
            tasks,
            operating_point,
            bootstrap,
            batch_size,
            out_dir,
        )
        cross_plans.append(plan_dict)
        cross_results.update(rows)
        figures.extend(cross_figures)

    examples = _examples(ensemble, test_part, tasks, test, n_examples, out_dir)
    evaluation: dict[str, Any] = {
        "title": title or f"enecg evaluation: {meta.source} {split}",
        "dataset": _dataset_name(meta, dataset_dir),
        "split": split,
        "validation_split": val_split if val is not None else None,
        "n_records": len(test),
        "n_patients": len(set(test.patient_ids)),
        "enecg_version": ENECG_VERSION,
        "model": {
            "enecg_version": ensemble.config.enecg_version,
            "experts": [
                {"name": r.name, "hub_id": r.hub_id, "revision": r.revision} for r in ensemble.config.experts
            ],
            "gate": {
                "input": ensemble.config.gate.input,
                "combine": ensemble.config.gate.combine,
                "mix": ensemble.config.gate.mix,
                "top_k": ensemble.config.gate.top_k,
            },
        },
        "operating_point": asdict(operating_point),
        "bootstrap": asdict(bootstrap),
        "skipped_tasks": skipped,
        "tasks": results,
        "experts": expert_results,
        "baselines": baseline_results,
        "baseline_details": details,
        "paired": paired,
        "gate": gate,
        "cross_dataset": cross_results,
        "cross_dataset_plans": cross_plans,
        "examples": examples,
        "figures": figures,
        "lead_coverage": lead_coverage(test, ensemble.expert_names),
    }
    evaluation = _jsonable(evaluation)
    write_report(evaluation, out_dir)
    return evaluation


def _train_part(
    dataset: datasets.DatasetDict, names: Sequence[str] | None, where: str
) -> datasets.Dataset | None:
    """The training part(s) the probes are fitted on, or None (logged) when the dataset lacks them."""
    missing = [n for n in names or () if n not in dataset]
    if not names or missing or any(len(dataset[n]) == 0 for n in names):
        logger.warning(
            "%s: no training part %s: the linear-probe and stacker baselines are left out",
            where,
            missing or list(names or []),
        )
        return None
    return datasets.concatenate_datasets([dataset[n] for n in names]) if len(names) > 1 else dataset[names[0]]


def _split_features(
    ensemble: Ensemble,
    part: datasets.Dataset,
    tasks: Sequence[TaskInfo],
    cache: FeatureCache | None,
    batch_size: int,
) -> SplitFeatures:
    """Every expert's embedding of every record of ``part`` (through the feature cache when given)."""
    table = build_feature_table(ensemble, part, list(tasks), cache, batch_size=batch_size)
    return SplitFeatures(
        embeddings={k: v.numpy() for k, v in table.embeddings.items()},
        labels={k: v.numpy() for k, v in table.labels.items()},
        patient_ids=list(table.patient_ids),
    )


def gate_statistics(
    predictions: SplitPredictions, experts: Sequence[str], tasks: Sequence[str]
) -> dict[str, Any]:
    """Mean and standard deviation of each expert's gate weight per task, and how often it has the top weight."""
    mean, std, top = {}, {}, {}
    for task in tasks:
        weights = predictions.gate_weights[task]
        argmax = weights.argmax(axis=1)
        mean[task] = {e: float(weights[:, i].mean()) for i, e in enumerate(experts)}
        std[task] = {e: float(weights[:, i].std()) for i, e in enumerate(experts)}
        top[task] = {e: float((argmax == i).mean()) for i, e in enumerate(experts)}
    return {"mean_weights": mean, "std_weights": std, "top_weight_share": top}


# ------------------------------------------------------------------------------------------------- figures


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices (NaN missing) -> one-hot rows (all-NaN where missing), for per-class curves."""
    out = np.full((len(labels), n_classes), np.nan)
    known = ~np.isnan(labels)
    out[known] = np.eye(n_classes)[labels[known].astype(int)]
    return out


def _task_figures(tasks: Sequence[TaskInfo], test: SplitPredictions, out_dir: Path) -> list[dict[str, str]]:
    figures = []
    for task in tasks:
        if evaluated_as(task.type) == "regression":
            continue  # MAE/RMSE/R² with CIs are in the table; no curve applies
        y, p = test.labels[task.name], test.predictions[task.name]
        if evaluated_as(task.type) == "multiclass":
            y = _one_hot(y, len(task.names))
        names = task_label_names(task)
        roc = f"{FIGURES_DIR}/roc_pr_{task.name}.png"
        cal = f"{FIGURES_DIR}/calibration_{task.name}.png"
        plot_roc_pr(y, p, names, task.name, out_dir / roc)
        plot_calibration(y, p, task.name, out_dir / cal)
        figures.append(
            {
                "path": roc,
                "section": task.name,
                "caption": f"{task.name}: ROC and precision-recall curves per label (ensemble)",
            }
        )
        figures.append(
            {
                "path": cal,
                "section": task.name,
                "caption": f"{task.name}: reliability diagram, labels pooled (ensemble, before temperature)",
            }
        )
    return figures


# ------------------------------------------------------------------------------------------------ examples


def _label_values(task: TaskInfo, values: np.ndarray, *, truth: bool = False) -> dict[str, float]:
    """One record's values of a task as ``{label: value}``."""
    names = task_label_names(task)
    values = np.asarray(values, dtype=float)
    if evaluated_as(task.type) == "multiclass" and truth:
        if np.isnan(values).all():
            return dict.fromkeys(names, math.nan)
        return {name: float(int(values) == k) for k, name in enumerate(names)}
    flat = values.reshape(-1)
    return {name: float(flat[k]) for k, name in enumerate(names)}


def choose_examples(tasks: Sequence[TaskInfo], labels: dict[str, np.ndarray], n: int) -> list[int]:
    """Up to ``n`` test record indices: first one positive record per label of the classification tasks (so the
    examples show different findings), then evenly spaced records."""
    n_records = len(next(iter(labels.values()))) if labels else 0
    chosen: list[int] = []
    for task in tasks:
        if evaluated_as(task.type) not in ("multilabel", "binary"):
            continue
        y = labels[task.name].reshape(n_records, -1)
        for k in range(y.shape[1]):
            positives = [i for i in np.flatnonzero(y[:, k] == 1) if i not in chosen]
            if positives and len(chosen) < n:
                chosen.append(int(positives[0]))
    for i in np.linspace(0, n_records - 1, num=min(n, n_records)).round().astype(int):
        if len(chosen) >= n:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return chosen[:n]


def _examples(
    ensemble: Ensemble,
    part: datasets.Dataset,
    tasks: Sequence[TaskInfo],
    test: SplitPredictions,
    n_examples: int,
    out_dir: Path,
) -> list[dict[str, Any]]:
    if n_examples <= 0:
        return []
    experts = list(ensemble.expert_names)
    table = part.select_columns([c for c in _RECORD_COLUMNS if c in part.column_names]).with_format("numpy")
    examples = []
    for i in choose_examples(tasks, test.labels, n_examples):
        record = row_to_record(table[i])
        example: dict[str, Any] = {
            "record_id": record.record_id,
            "patient_id": record.patient_id,
            "leads": list(test.record_leads[i]) if test.record_leads else list(record.leads),
            "labels": {},
            "predictions": {},
            "expert_predictions": {},
            "gate": {},
        }
        for task in tasks:
            t = task.name
            example["labels"][t] = _label_values(task, test.labels[t][i], truth=True)
            example["predictions"][t] = _label_values(task, test.predictions[t][i])
            example["expert_predictions"][t] = {
                e: _label_values(task, test.expert_predictions[t][i, k]) for k, e in enumerate(experts)
            }
            example["gate"][t] = {e: float(test.gate_weights[t][i, k]) for k, e in enumerate(experts)}
        image = f"{EXAMPLES_DIR}/{_safe(record.record_id)}.png"
        plot_ecg_12lead(
            record.signal, record.fs, record.leads, _example_title(example, tasks), out_dir / image
        )
        example["image"] = image
        examples.append(example)
    return examples


def _example_title(example: dict[str, Any], tasks: Sequence[TaskInfo]) -> str:
    """One line: the record, its most probable findings per task, and the gate's weights."""
    parts = []
    for task in tasks:
        preds = example["predictions"][task.name]
        if evaluated_as(task.type) == "regression":
            parts.append(f"{task.name} {next(iter(preds.values())):.1f}")
            continue
        top = sorted(preds.items(), key=lambda kv: -kv[1])[:2]
        parts.append(f"{task.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    first = tasks[0].name
    gate = ", ".join(f"{e} {w:.2f}" for e, w in example["gate"][first].items())
    return f"{example['record_id']}  |  " + "; ".join(parts) + f"  |  gate ({first}): {gate}"


def _dataset_name(meta: DatasetMeta, directory: str | os.PathLike) -> str:
    """``source (folder)``, or just the source when the folder has its name."""
    folder = Path(directory).name
    return meta.source if folder == meta.source else f"{meta.source} ({folder})"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


# ------------------------------------------------------------------------------------------- cross-dataset


def _cross_dataset(
    ensemble: Ensemble,
    source_meta: DatasetMeta,
    target_dir: str | os.PathLike,
    label_map: str,
    cross_split: str | None,
    split: str,
    test: SplitPredictions,
    val: SplitPredictions | None,
    tasks: Sequence[TaskInfo],
    operating_point: OperatingPoint,
    bootstrap: BootstrapConfig,
    batch_size: int,
    out_dir: Path,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, str]]]:
    target_dataset, target_meta = load_dataset_dir(target_dir)
    target_name = _dataset_name(target_meta, target_dir)
    plan = plan_cross_dataset(source_meta, target_meta, label_map, [t.name for t in tasks], target_name)
    plan_dict = plan.to_dict() | {"dataset": str(target_dir), "split": cross_split or "all"}
    if not plan.matches:
        logger.warning("cross-dataset %s: %s", target_dir, "; ".join(plan.notes))
        return plan_dict, {}, []
    if cross_split == "all":
        cross_split = None  # every record of the target dataset (the default)
    where = str(target_dir)
    part = _part(target_dataset, cross_split, where) if cross_split else _all_parts(target_dataset, where)
    target_tasks = [target_meta.task(name) for name in dict.fromkeys(m.target_task for m in plan.matches)]
    logger.info("Cross-dataset evaluation on %s (%d records)", target_dir, len(part))
    target = collect_predictions(ensemble, part, target_tasks, batch_size=batch_size)
    plan_dict["n_records"] = len(target)
    source_name = f"{source_meta.source} {split} (in-source, labels shared with {target_name})"
    external_name = f"{target_name} {cross_split or 'all records'} (external)"
    rows = evaluate_cross_dataset(
        plan,
        target_true=target.labels,
        target_pred=target.predictions,
        target_groups=target.patient_ids,
        source_true=test.labels,
        source_pred=test.predictions,
        source_groups=test.patient_ids,
        source_val_true=None if val is None else val.labels,
        source_val_pred=None if val is None else val.predictions,
        operating_point=operating_point,
        bootstrap=bootstrap,
        source_name=source_name,
        target_name=external_name,
    )
    rows = {name: {key: with_ci_mapping(r) for key, r in per_key.items()} for name, per_key in rows.items()}
    figures = []
    for match in plan.matches:
        if match.task_type == "regression":
            continue  # no ROC/PR for values (age)
        y = np.asarray(target.labels[match.target_task], float).reshape(len(target), -1)[
            :, match.target_index
        ]
        p = np.asarray(target.predictions[match.model_task], float).reshape(len(target), -1)[
            :, match.model_index
        ]
        path = f"{FIGURES_DIR}/cross_{_safe(target_meta.source)}_{_safe(Path(target_dir).name)}_{_safe(match.key)}.png"
        plot_roc_pr(y, p, match.label_names, f"{match.key} on {target_name}", out_dir / path)
        figures.append(
            {
                "path": path,
                "section": "cross_dataset",
                "caption": f"{match.key} on {target_name}: ROC/PR of the shared labels (external)",
            }
        )
    return plan_dict, rows, figures


# --------------------------------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars -> Python, NaN/inf -> None (JSON has no NaN), tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj
