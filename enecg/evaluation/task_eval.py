"""Evaluate one task's predictions: thresholds and temperature fitted on validation, metrics with CIs on test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from enecg.ensemble.tasks import evaluated_as
from enecg.evaluation.metrics import (
    BootstrapConfig,
    OperatingPoint,
    bootstrap_ci,
    choose_thresholds,
    expected_calibration_error,
    fit_temperature,
    multiclass_metrics,
    multilabel_metrics,
    regression_metrics,
)

CLASSIFICATION = ("multilabel", "binary", "multiclass")


def evaluate_task(
    task_type: str,
    label_names: Sequence[str],
    test_true: np.ndarray,
    test_pred: np.ndarray,
    *,
    val_true: np.ndarray | None = None,
    val_pred: np.ndarray | None = None,
    test_groups: Sequence[Any] | None = None,
    operating_point: OperatingPoint | None = None,
    bootstrap: BootstrapConfig | None = None,
) -> dict[str, Any]:
    """Metrics of one task on the test split, with bootstrap CIs resampling patients.

    ``*_pred`` are probabilities for classification tasks (``(N, K)`` multi-label, ``(N,)`` binary, ``(N, C)``
    multi-class) and values for regression. Operating-point thresholds and the calibration temperature are fitted
    on the validation predictions when given (else thresholds default to 0.5 and no temperature is fitted).
    """
    operating_point = operating_point or OperatingPoint()
    bootstrap = bootstrap or BootstrapConfig()
    test_true = np.asarray(test_true, dtype=float)
    test_pred = np.asarray(test_pred, dtype=float)
    n = len(test_true)
    result: dict[str, Any] = {"type": task_type, "labels": list(label_names), "n_records": n}
    form = evaluated_as(task_type)  # metrics follow the form of the predictions (a registered type declares it)
    if form != task_type:
        result["evaluated_as"] = form

    if form == "regression":
        result["metrics"] = regression_metrics(test_true, test_pred)
        result["ci"] = bootstrap_ci(
            lambda idx: regression_metrics(test_true[idx], test_pred[idx]), n, test_groups, bootstrap
        )
        return _jsonable(result)

    if form == "multiclass":
        result["metrics"] = multiclass_metrics(test_true, test_pred, label_names)
        result["ci"] = bootstrap_ci(
            lambda idx: _scalars(multiclass_metrics(test_true[idx], test_pred[idx], label_names)),
            n, test_groups, bootstrap,
        )
        result["calibration"] = _multiclass_calibration(test_true, test_pred, val_true, val_pred)
        return _jsonable(result)

    if form not in ("multilabel", "binary"):
        raise ValueError(f"task type {task_type!r} is evaluated as {form!r}, which has no metrics")
    y_test, p_test = _as_2d(test_true), _as_2d(test_pred)
    if val_true is not None and val_pred is not None:
        thresholds = choose_thresholds(_as_2d(np.asarray(val_true, float)), _as_2d(np.asarray(val_pred, float)),
                                       operating_point)
    else:
        thresholds = np.full(y_test.shape[1], 0.5)
    result["operating_point"] = {"method": operating_point.method,
                                 "target_sensitivity": operating_point.target_sensitivity,
                                 "fitted_on": "validation" if val_true is not None else "default 0.5"}
    result["thresholds"] = dict(zip(label_names, thresholds.tolist()))
    result["metrics"] = multilabel_metrics(y_test, p_test, thresholds, label_names)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        res = multilabel_metrics(y_test[idx], p_test[idx], thresholds, label_names)
        flat = {f"macro_{k}": v for k, v in res["macro"].items()}
        for name, per in res["per_label"].items():
            for key in ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1"):
                flat[f"{name}/{key}"] = per[key]
        return flat

    result["ci"] = bootstrap_ci(statistic, n, test_groups, bootstrap)
    result["calibration"] = _binary_calibration(y_test, p_test, val_true, val_pred)
    return _jsonable(result)


def _binary_calibration(
    y_test: np.ndarray, p_test: np.ndarray, val_true: np.ndarray | None, val_pred: np.ndarray | None
) -> dict[str, float]:
    out = {"ece": expected_calibration_error(y_test, p_test)}
    if val_true is None or val_pred is None:
        return out
    temperature = fit_temperature(_logit(_as_2d(np.asarray(val_pred, float))), _as_2d(np.asarray(val_true, float)),
                                  "binary")
    scaled = 1.0 / (1.0 + np.exp(-_logit(p_test) / temperature))
    out["temperature"] = temperature
    out["ece_after_temperature"] = expected_calibration_error(y_test, scaled)
    return out


def _multiclass_calibration(
    y_test: np.ndarray, p_test: np.ndarray, val_true: np.ndarray | None, val_pred: np.ndarray | None
) -> dict[str, float]:
    keep = ~np.isnan(y_test)
    # Confidence calibration: is the top class right as often as its probability says?
    correct = (p_test[keep].argmax(1) == y_test[keep]).astype(float)
    out = {"ece": expected_calibration_error(correct, p_test[keep].max(1))}
    if val_true is None or val_pred is None:
        return out
    temperature = fit_temperature(np.log(np.clip(np.asarray(val_pred, float), 1e-7, 1)), val_true, "multiclass")
    logits = np.log(np.clip(p_test[keep], 1e-7, 1)) / temperature
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out["temperature"] = temperature
    out["ece_after_temperature"] = expected_calibration_error((probs.argmax(1) == y_test[keep]).astype(float),
                                                              probs.max(1))
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _as_2d(a: np.ndarray) -> np.ndarray:
    return a[:, None] if a.ndim == 1 else a


def _scalars(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, float)}


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: tuples -> lists, numpy scalars -> floats, NaN -> None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
