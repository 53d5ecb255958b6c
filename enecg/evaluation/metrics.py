"""Clinical evaluation metrics with patient-level bootstrap confidence intervals.

The metric definitions are scikit-learn's (AUROC, average precision, F1, regression errors). Bootstrap intervals
evaluate them thousands of times on small arrays, where scikit-learn's input validation costs 50x the arithmetic,
so AUROC (Mann-Whitney with mid-ranks), average precision (step-wise precision-recall sum over distinct
thresholds) and the confusion counts are computed here with numpy; ``tests/test_metrics.py`` checks them equal to
``sklearn.metrics`` on random data with ties. This module adds what clinical ECG evaluation needs around them:

* operating points chosen on the *validation* split (max-F1, or a target sensitivity) and then applied unchanged
  to the test split, so the reported sensitivity/specificity/PPV/NPV are honest;
* missing labels (NaN) masked per label;
* bootstrap 95% confidence intervals resampling *patients* (all records of a drawn patient come along), because
  PTB-XL and similar datasets hold several recordings per patient and record-level resampling is over-confident;
* calibration: expected calibration error and temperature scaling fitted on validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import f1_score, precision_recall_curve, roc_curve


@dataclass
class OperatingPoint:
    """How a decision threshold is chosen on the validation split."""

    method: Literal["max_f1", "sensitivity"] = field(
        default="max_f1", metadata={"help": "'max_f1': threshold maximising F1; 'sensitivity': the highest "
                                    "threshold whose sensitivity reaches `target_sensitivity`."}
    )
    target_sensitivity: float = field(default=0.9, metadata={"help": "Target for method='sensitivity'."})


@dataclass
class BootstrapConfig:
    """Patient-level bootstrap settings."""

    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples (0 disables CIs)."})
    confidence: float = field(default=0.95, metadata={"help": "Two-sided confidence level."})
    seed: int = field(default=0, metadata={"help": "Seed: the same seed gives identical intervals."})


# ----------------------------------------------------------------------------------------------- thresholds


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, point: OperatingPoint) -> float:
    """Decision threshold for one binary label from validation data (NaN labels ignored).

    Returns 0.5 when the label has no positive or no negative example (nothing to choose from).
    """
    y_true, y_prob = _mask_pair(y_true, y_prob)
    if y_true.size == 0 or y_true.min() == y_true.max():
        return 0.5
    if point.method == "max_f1":
        precision, recall, thresholds = precision_recall_curve(y_true, y_prob)
        # precision/recall have one more entry than thresholds (the (1, 0) end point): drop it.
        precision, recall = precision[:-1], recall[:-1]
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        return float(thresholds[int(np.argmax(f1))])
    if point.method == "sensitivity":
        _fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
        reaching = np.flatnonzero(tpr >= point.target_sensitivity)
        # roc_curve's thresholds decrease; the first index reaching the target has the highest such threshold.
        threshold = float(thresholds[reaching[0]])
        return min(threshold, 1.0) if np.isfinite(threshold) else 1.0
    raise ValueError(f"unknown operating-point method {point.method!r}")


def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray, point: OperatingPoint) -> np.ndarray:
    """Per-label thresholds for ``(N, K)`` multi-label validation labels/probabilities."""
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    return np.array([choose_threshold(y_true[:, k], y_prob[:, k], point) for k in range(y_true.shape[1])])


# ------------------------------------------------------------------------------------------ point metrics


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of binary labels (0/1, both present): ``sklearn.metrics.roc_auc_score``, computed
    as the Mann-Whitney statistic with mid-ranks for ties (the same number, without the validation overhead)."""
    y_true = np.asarray(y_true, dtype=float)
    positives = y_true == 1
    n_pos = int(positives.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(y_score, dtype=float))
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """``sklearn.metrics.average_precision_score``: sum over the distinct score thresholds (descending) of the
    recall gained times the precision there."""
    y_true = np.asarray(y_true, dtype=float)
    order = np.argsort(-np.asarray(y_score, dtype=float), kind="mergesort")
    scores, truth = np.asarray(y_score, dtype=float)[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(truth)[last_of_tie]
    if tps.size == 0 or tps[-1] == 0:
        return math.nan
    precision = tps / (last_of_tie + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, AUPRC and the confusion-matrix metrics at ``threshold`` for one label (NaN labels ignored).

    Metrics that are undefined for the data (AUROC with one class, PPV with no predicted positive) are NaN.
    """
    y_true, y_prob = _mask_pair(y_true, y_prob)
    out: dict[str, float] = {"n": float(y_true.size), "prevalence": _safe_mean(y_true), "threshold": threshold}
    if y_true.size == 0:
        return out | dict.fromkeys(("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1",
                                    "accuracy"), math.nan)
    two_classes = y_true.min() != y_true.max()
    out["auroc"] = auroc(y_true, y_prob) if two_classes else math.nan
    out["auprc"] = average_precision(y_true, y_prob) if two_classes else math.nan
    predicted, actual = y_prob >= threshold, y_true == 1
    tp = int(np.sum(predicted & actual))
    fp = int(np.sum(predicted & ~actual))
    fn = int(np.sum(~predicted & actual))
    tn = int(np.sum(~predicted & ~actual))
    out["sensitivity"] = _ratio(tp, tp + fn)
    out["specificity"] = _ratio(tn, tn + fp)
    out["ppv"] = _ratio(tp, tp + fp)
    out["npv"] = _ratio(tn, tn + fn)
    out["f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
    out["accuracy"] = _ratio(tp + tn, tp + tn + fp + fn)
    return out


def multilabel_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Per-label metrics plus macro (mean over labels with a defined value) and micro aggregates."""
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    per_label = {
        name: binary_metrics(y_true[:, k], y_prob[:, k], float(thresholds[k])) for k, name in enumerate(label_names)
    }
    keys = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1")
    macro = {key: _nanmean([m[key] for m in per_label.values()]) for key in keys}
    observed = ~np.isnan(y_true)
    flat_true, flat_prob = y_true[observed], y_prob[observed]
    flat_pred = (y_prob >= thresholds[None, :])[observed]
    micro: dict[str, float] = {}
    if flat_true.size and flat_true.min() != flat_true.max():
        micro["auroc"] = auroc(flat_true, flat_prob)
        micro["auprc"] = average_precision(flat_true, flat_prob)
    if flat_true.size:
        tp = int(np.sum(flat_pred & (flat_true == 1)))
        wrong = int(np.sum(flat_pred != (flat_true == 1)))
        micro["f1"] = _ratio(2 * tp, 2 * tp + wrong) if (2 * tp + wrong) else 0.0
    else:
        micro["f1"] = math.nan
    return {"per_label": per_label, "macro": macro, "micro": micro}


def multiclass_metrics(y_true: np.ndarray, y_prob: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and one-vs-rest macro AUROC for class indices ``y_true`` (NaN = missing)."""
    y_true = np.asarray(y_true, dtype=float)
    y_prob = _as_2d(y_prob)
    keep = ~np.isnan(y_true)
    y_true, y_prob = y_true[keep].astype(int), y_prob[keep]
    if y_true.size == 0:
        return {"n": 0.0, "accuracy": math.nan, "macro_f1": math.nan, "macro_auroc": math.nan}
    y_pred = y_prob.argmax(axis=1)
    labels = list(range(len(label_names)))
    out: dict[str, Any] = {
        "n": float(y_true.size),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    present = np.unique(y_true)
    if present.size > 1:
        # One-vs-rest AUROC per class present in the data (absent classes have no defined AUROC).
        aurocs = [auroc(y_true == c, y_prob[:, c]) for c in present]
        out["macro_auroc"] = float(np.mean(aurocs))
    else:
        out["macro_auroc"] = math.nan
    out["per_class_f1"] = dict(
        zip(label_names, f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0).tolist())
    )
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² (NaN targets ignored)."""
    y_true, y_pred = _mask_pair(y_true, y_pred)
    if y_true.size == 0:
        return {"n": 0.0, "mae": math.nan, "rmse": math.nan, "r2": math.nan}
    error = y_pred - y_true
    spread = float(np.sum((y_true - y_true.mean()) ** 2))
    return {
        "n": float(y_true.size),
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(math.sqrt(np.mean(error**2))),
        "r2": 1.0 - float(np.sum(error**2)) / spread if y_true.size > 1 and spread > 0 else math.nan,
    }


# --------------------------------------------------------------------------------------------- calibration


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE of binary probabilities: bin-size-weighted mean |accuracy - confidence| over equal-width bins.

    Multi-label inputs ``(N, K)`` are pooled over labels (each observed label is one binary prediction).
    """
    y_true, y_prob = _mask_pair(y_true, y_prob)
    if y_true.size == 0:
        return math.nan
    bins = np.minimum((y_prob * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(y_true[in_bin].mean() - y_prob[in_bin].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, kind: Literal["binary", "multiclass"]) -> float:
    """Temperature T minimising the validation negative log-likelihood of ``logits / T`` (Guo et al. 2017).

    ``kind='binary'``: independent sigmoid outputs (binary or multi-label, NaN labels ignored);
    ``kind='multiclass'``: softmax over the last axis with class-index labels.
    """
    import torch

    logits_t = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    labels = np.asarray(y_true, dtype=np.float64)
    if kind == "binary":
        mask = torch.as_tensor(~np.isnan(labels))
        target = torch.as_tensor(np.nan_to_num(labels))[mask]
        logits_t = logits_t[mask]
        if target.numel() == 0:
            return 1.0

        def nll(scaled: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.binary_cross_entropy_with_logits(scaled, target)
    else:
        keep = ~np.isnan(labels)
        target_c = torch.as_tensor(labels[keep].astype(np.int64))
        logits_t = logits_t[torch.as_tensor(keep)]
        if target_c.numel() == 0:
            return 1.0

        def nll(scaled: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(scaled, target_c)

    # Optimise log T so T stays positive.
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(logits_t / log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


# ------------------------------------------------------------------------------------------------ bootstrap


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | dict[str, float]],
    n_records: int,
    groups: Sequence[Any] | None,
    config: BootstrapConfig,
) -> dict[str, tuple[float, float]] | tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` resampling groups (patients) with replacement.

    Args:
        statistic: maps an index array into the evaluated records to a number or a dict of numbers.
        groups: the patient id of each record (None: every record is its own patient).

    Returns ``(low, high)`` (or a dict of them for dict statistics). Resamples where a statistic is undefined
    (NaN, e.g. AUROC of a resample with one class) are left out of that statistic's interval.
    """
    group_index = _group_indices(n_records, groups)
    if config.n_resamples <= 0:
        # CIs disabled: keep the result's shape (a dict statistic still gets one entry per key).
        point = statistic(np.arange(n_records))
        if isinstance(point, dict):
            return dict.fromkeys(point, (math.nan, math.nan))
        return (math.nan, math.nan)
    rng = np.random.default_rng(config.seed)
    samples: list[float | dict[str, float]] = []
    for _ in range(config.n_resamples):
        drawn = rng.integers(0, len(group_index), size=len(group_index))
        samples.append(statistic(np.concatenate([group_index[g] for g in drawn])))
    alpha = (1.0 - config.confidence) / 2.0
    if isinstance(samples[0], dict):
        return {key: _percentile_interval([s[key] for s in samples], alpha) for key in samples[0]}  # type: ignore[index]
    return _percentile_interval(samples, alpha)  # type: ignore[arg-type]


def _group_indices(n_records: int, groups: Sequence[Any] | None) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n_records)]
    if len(groups) != n_records:
        raise ValueError(f"{len(groups)} group ids for {n_records} records")
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return [np.asarray(v) for v in by_group.values()]


def _percentile_interval(values: Sequence[float], alpha: float) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return (math.nan, math.nan)
    return (float(np.quantile(arr, alpha)), float(np.quantile(arr, 1.0 - alpha)))


# ------------------------------------------------------------------------------------------------- helpers


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return a[:, None] if a.ndim == 1 else a


def _mask_pair(y_true: np.ndarray, y_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=float).ravel()
    y_other = np.asarray(y_other, dtype=float).ravel()
    if y_true.shape != y_other.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_other.shape} differ in shape")
    keep = ~np.isnan(y_true)
    return y_true[keep], y_other[keep]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _safe_mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else math.nan


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan
