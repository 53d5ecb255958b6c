"""Paired comparison of two models on the same records: headline-metric difference with a patient-level paired
bootstrap CI (each resample draws patients once and scores *both* models on them).

Unpaired CIs of two models overlap long before their difference is uncertain: both models err on the same hard
records, so the difference varies far less than either score. The paired interval is the one that says whether
the ensemble beats a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from enecg.ensemble.tasks import evaluated_as
from enecg.evaluation.metrics import BootstrapConfig, auroc, bootstrap_ci, multiclass_metrics

# Headline metric of each task type, and whether higher is better.
HEADLINES: dict[str, tuple[str, bool]] = {
    "multilabel": ("macro AUROC", True),
    "binary": ("AUROC", True),
    "multiclass": ("macro AUROC", True),
    "regression": ("MAE", False),
}


def headline_value(task_type: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The task's headline metric (:data:`HEADLINES`) of predictions (probabilities, or values for regression)."""
    task_type = evaluated_as(task_type)
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if task_type in ("multilabel", "binary"):
        # Macro AUROC: the mean over labels whose AUROC is defined (both classes present), as in the report.
        y2, p2 = y_true.reshape(len(y_true), -1), y_pred.reshape(len(y_pred), -1)
        values = []
        for k in range(y2.shape[1]):
            keep = ~np.isnan(y2[:, k])
            values.append(auroc(y2[keep, k], p2[keep, k]))
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan
    if task_type == "multiclass":
        names = [str(k) for k in range(y_pred.shape[1])]
        return float(multiclass_metrics(y_true, y_pred, names)["macro_auroc"])
    if task_type == "regression":
        keep = ~np.isnan(y_true)
        return float(np.mean(np.abs(y_pred[keep] - y_true[keep]))) if keep.any() else math.nan
    raise ValueError(f"unknown task type {task_type!r}")


def paired_difference(
    task_type: str,
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    groups: Sequence[Any] | None,
    bootstrap: BootstrapConfig,
) -> dict[str, Any]:
    """Headline of ``a`` minus headline of ``b`` on the same records, with a paired patient-level bootstrap CI.

    Returns ``{metric, higher_is_better, a, b, difference, ci: [low, high], better}``: ``better`` is ``"a"`` or
    ``"b"`` when the CI excludes 0 in that model's favour, else ``None``. For a lower-is-better metric (MAE) a
    negative difference favours ``a``.
    """
    metric, higher = HEADLINES[evaluated_as(task_type)]
    y_true = np.asarray(y_true, dtype=float)
    pred_a = np.asarray(pred_a, dtype=float)
    pred_b = np.asarray(pred_b, dtype=float)
    if not len(y_true) == len(pred_a) == len(pred_b):
        raise ValueError(f"{len(y_true)} labels, {len(pred_a)} and {len(pred_b)} predictions: not paired")
    # Compared on the records both models predicted (an expert or baseline has no prediction where it could not
    # read a record): the others count as unlabelled, so the patients still resample together.
    missing = ~(_finite_rows(pred_a) & _finite_rows(pred_b))
    if missing.any():
        y_true = y_true.copy()
        y_true[missing] = np.nan
        pred_a, pred_b = np.nan_to_num(pred_a), np.nan_to_num(pred_b)

    def difference(idx: np.ndarray) -> float:
        return headline_value(task_type, y_true[idx], pred_a[idx]) - headline_value(
            task_type, y_true[idx], pred_b[idx]
        )

    everything = np.arange(len(y_true))
    a = headline_value(task_type, y_true, pred_a)
    b = headline_value(task_type, y_true, pred_b)
    low, high = bootstrap_ci(difference, len(y_true), groups, bootstrap)
    better = None
    if math.isfinite(low) and math.isfinite(high):
        if low > 0:
            better = "a" if higher else "b"
        elif high < 0:
            better = "b" if higher else "a"
    return {
        "metric": metric,
        "higher_is_better": higher,
        "a": a,
        "b": b,
        "difference": float(difference(everything)),
        "ci": [low, high],
        "better": better,
        "n_resamples": bootstrap.n_resamples,
        "n_compared": int((~missing).sum()),
    }


def _finite_rows(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)
