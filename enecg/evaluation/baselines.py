"""Baselines every ensemble is judged against (scikit-learn), fitted on the training part only.

* **best single expert**: per task, the expert whose own heads score best on *validation* (chosen there, reported
  on test: an honest single-model baseline, not the test-set oracle);
* **linear probe** per expert: standardised embedding -> logistic regression (``C = PROBE_C``; one per label
  for multi-label, multinomial for multi-class) or ridge regression (``alpha`` by leave-one-out CV) — the usual
  way foundation-model embeddings are benchmarked;
* **stacker**: the classic stacked generalisation (Wolpert 1992): every expert's probe is refitted on K-1
  patient-disjoint folds of the training part and predicts the K-th, and a logistic (linear for regression)
  regression on those *out-of-fold* outputs learns how to weigh the experts; at test time it combines the probes
  fitted on the whole training part.

* **constant predictor**: the floor any model must clear (:func:`constant_predictor_headlines`): label
  prevalences (class frequencies) of the training part for classification, whose AUROC is 0.5 by construction,
  and the training mean for regression.

The uniform average of the ensemble's own heads is computed by the runner (:mod:`enecg.evaluation.runner`).
Predictions come back in the evaluation's format: probabilities for classification, values for regression.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, RidgeCV
from sklearn.preprocessing import StandardScaler

from enecg.data.build import load_dataset_dir
from enecg.data.rows import label_arrays
from enecg.data.schema import TaskInfo
from enecg.data.splits import row_folds
from enecg.ensemble.tasks import evaluated_as
from enecg.evaluation.metrics import BootstrapConfig
from enecg.evaluation.paired import HEADLINES, headline_value
from enecg.evaluation.report import headline
from enecg.evaluation.task_eval import evaluate_task

PROBE_C = 0.1
STACKER_C = 1.0
STACKER_FOLDS = 5
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-2, 4.5, 0.5))
BEST_SINGLE = "best single expert (validation)"
STACKER = "stacker (out-of-fold probes)"


def probe_name(expert: str) -> str:
    return f"linear probe: {expert}"


@dataclass
class SplitFeatures:
    """One split as the baselines see it: each expert's embedding, the labels and the patients (row order)."""

    embeddings: dict[str, np.ndarray] = field(metadata={"help": "expert -> (N, D)"})
    labels: dict[str, np.ndarray] = field(metadata={"help": "task -> (N,) or (N, K), NaN missing"})
    patient_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patient_ids)


# --------------------------------------------------------------------------------------------- probes


class LinearProbe:
    """A standardised linear model on one expert's embedding for one task.

    ``scores`` are in a linear space suited to stacking (decision function per label, class log-probabilities,
    or the regression value); ``predict`` in the evaluation's space."""

    def __init__(self, task: TaskInfo, C: float = PROBE_C) -> None:
        self.task = task
        self.C = C
        self.scaler = StandardScaler()
        self.models: list[Any] = []
        self.constants: list[float | None] = []

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        x = self.scaler.fit_transform(np.asarray(x, dtype=np.float64))
        y = np.asarray(y, dtype=np.float64)
        kind = self.task.type
        if kind == "regression":
            keep = ~np.isnan(y)
            self.models = [RidgeCV(alphas=RIDGE_ALPHAS).fit(x[keep], y[keep])]
        elif kind == "multiclass":
            keep = ~np.isnan(y)
            self.models = [_fit_logistic(x[keep], y[keep].astype(int), self.C)]
        else:
            self.models, self.constants = _fit_per_label(lambda k: x, y, self.C)
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        x = self.scaler.transform(np.asarray(x, dtype=np.float64))
        kind = self.task.type
        if kind == "regression":
            return self.models[0].predict(x)
        if kind == "multiclass":
            n_classes = len(self.task.names)
            out = np.full((len(x), n_classes), -30.0)  # classes never seen in training: ~zero probability
            model = self.models[0]
            out[:, model.classes_] = np.log(np.clip(model.predict_proba(x), 1e-12, 1.0))
            return out
        columns = []
        for model, constant in zip(self.models, self.constants):
            if model is None:
                p = min(max(constant, 1e-6), 1 - 1e-6)
                columns.append(np.full(len(x), math.log(p / (1 - p))))
            else:
                columns.append(model.decision_function(x))
        stacked = np.stack(columns, axis=1)
        return stacked[:, 0] if evaluated_as(self.task.type) == "binary" else stacked

    def predict(self, x: np.ndarray) -> np.ndarray:
        return scores_to_predictions(self.task, self.scores(x))


def scores_to_predictions(task: TaskInfo, scores: np.ndarray) -> np.ndarray:
    """Stacking-space scores -> the evaluation's space (probabilities or values)."""
    if evaluated_as(task.type) == "regression":
        return scores
    if evaluated_as(task.type) == "multiclass":
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-scores))


def _fit_per_label(
    features: Callable[[int], np.ndarray], y: np.ndarray, C: float
) -> tuple[list[LogisticRegression | None], list[float | None]]:
    """One logistic regression per label column of ``y`` (``(N,)`` binary or ``(N, K)``) on ``features(k)``,
    NaN labels left out; a label with one class in training gets a constant (its prevalence) instead."""
    columns = y[:, None] if y.ndim == 1 else y
    models: list[LogisticRegression | None] = []
    constants: list[float | None] = []
    for k in range(columns.shape[1]):
        keep = ~np.isnan(columns[:, k])
        values = columns[keep, k]
        if len(np.unique(values)) < 2:  # one class only: its AUROC is undefined anyway
            models.append(None)
            constants.append(float(values.mean()) if len(values) else 0.5)
        else:
            models.append(_fit_logistic(features(k)[keep], values.astype(int), C))
            constants.append(None)
    return models, constants


def _fit_logistic(x: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=5000).fit(x, y)


# -------------------------------------------------------------------------------------------- stacker


class Stacker:
    """Logistic (per label / multinomial) or linear regression on the experts' stacking-space scores."""

    def __init__(self, task: TaskInfo, C: float = STACKER_C) -> None:
        self.task = task
        self.C = C
        self.models: list[Any] = []
        self.constants: list[float | None] = []

    @staticmethod
    def _features(scores: Sequence[np.ndarray], column: int | None = None) -> np.ndarray:
        parts = [s if column is None else s[:, column] for s in scores]
        return np.column_stack([p.reshape(len(p), -1) for p in parts])

    def fit(self, scores: Sequence[np.ndarray], y: np.ndarray) -> Stacker:
        y = np.asarray(y, dtype=np.float64)
        kind = self.task.type
        if kind in ("regression", "multiclass"):
            x = self._features(scores)
            keep = ~np.isnan(y)
            model = (
                LinearRegression().fit(x[keep], y[keep])
                if kind == "regression"
                else _fit_logistic(x[keep], y[keep].astype(int), self.C)
            )
            self.models = [model]
            return self
        self.models, self.constants = _fit_per_label(
            lambda k: self._features(scores, None if kind == "binary" else k), y, self.C
        )
        return self

    def predict(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        kind = self.task.type
        if kind == "regression":
            return self.models[0].predict(self._features(scores))
        if kind == "multiclass":
            model = self.models[0]
            out = np.zeros((len(scores[0]), len(self.task.names)))
            out[:, model.classes_] = model.predict_proba(self._features(scores))
            return out
        columns = []
        for k, (model, constant) in enumerate(zip(self.models, self.constants)):
            if model is None:
                columns.append(np.full(len(scores[0]), constant))
            else:
                x = self._features(scores, None if kind == "binary" else k)
                columns.append(model.predict_proba(x)[:, 1])
        stacked = np.stack(columns, axis=1)
        return stacked[:, 0] if kind == "binary" else stacked

    def coefficients(self) -> list[list[float]]:
        """Per output model, the weight of each feature (experts' scores), for the report."""
        return [[] if m is None else np.ravel(m.coef_).round(4).tolist() for m in self.models]


def out_of_fold_scores(
    task: TaskInfo,
    embeddings: Mapping[str, np.ndarray],
    y: np.ndarray,
    patient_ids: Sequence[str],
    *,
    folds: int = STACKER_FOLDS,
    seed: int = 0,
    C: float = PROBE_C,
) -> dict[str, np.ndarray]:
    """Every expert's probe scores on every training row from a probe fitted without that row's patients."""
    fold = row_folds(patient_ids, folds, seed)
    out: dict[str, np.ndarray] = {}
    for expert, x in embeddings.items():
        scores = None
        for k in range(folds):
            held, rest = fold == k, fold != k
            part = LinearProbe(task, C).fit(x[rest], y[rest]).scores(x[held])
            if scores is None:
                scores = np.zeros((len(x), *part.shape[1:]))
            scores[held] = part
        out[expert] = scores
    return out


# ------------------------------------------------------------------------------------------- assembly


def best_single_expert(task: TaskInfo, val_labels: np.ndarray, val_expert_predictions: np.ndarray) -> int:
    """Index of the expert (axis 1 of ``(N, E, ...)`` predictions) with the best validation headline."""
    _, higher = HEADLINES[task.type]
    values = []
    for e in range(val_expert_predictions.shape[1]):
        value = headline_value(task.type, val_labels, val_expert_predictions[:, e])
        values.append(value if math.isfinite(value) else (-math.inf if higher else math.inf))
    return int(np.argmax(values) if higher else np.argmin(values))


def fit_baselines(
    tasks: Sequence[TaskInfo],
    train: SplitFeatures,
    evaluated: Mapping[str, SplitFeatures],
    *,
    seed: int = 0,
    folds: int = STACKER_FOLDS,
) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, Any]]:
    """Linear probes and the stacker, fitted on ``train``, predicting each split of ``evaluated``.

    Returns ``(predictions, details)``: predictions ``name -> split -> task -> array``; details per task: the
    stacker's coefficients and the folds used."""
    experts = list(train.embeddings)
    predictions: dict[str, dict[str, dict[str, np.ndarray]]] = {
        name: {split: {} for split in evaluated} for name in [*map(probe_name, experts), STACKER]
    }
    details: dict[str, Any] = {"probe_C": PROBE_C, "stacker_C": STACKER_C, "stacker_folds": folds, "tasks": {}}
    # A NaN embedding row is a record that expert could not read (its contract refused it): the baselines are
    # fitted on the records every expert read, and predict NaN (no prediction) where their inputs are missing.
    train_x, train_readable = _readable_embeddings(train.embeddings)
    for task in tasks:
        y = _unset_rows(train.labels[task.name], ~train_readable.all(axis=1))
        probes = {e: LinearProbe(task).fit(train_x[e], y) for e in experts}
        oof = out_of_fold_scores(task, train_x, y, train.patient_ids, folds=folds, seed=seed)
        stacker = Stacker(task).fit([oof[e] for e in experts], y)
        for split, features in evaluated.items():
            x, readable = _readable_embeddings(features.embeddings)
            scores = [probes[e].scores(x[e]) for e in experts]
            for i, (e, s) in enumerate(zip(experts, scores)):
                predictions[probe_name(e)][split][task.name] = _unset_rows(
                    scores_to_predictions(task, s), ~readable[:, i]
                )
            predictions[STACKER][split][task.name] = _unset_rows(
                stacker.predict(scores), ~readable.all(axis=1)
            )
        details["tasks"][task.name] = {"stacker_coefficients": stacker.coefficients(), "features": experts}
    return predictions, details



# ----------------------------------------------------------------------------------------- constant predictor


def constant_predictions(task: TaskInfo, train_labels: np.ndarray, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` rows of the constant prediction fitted on ``train_labels`` (NaN = unlabelled), in the evaluation's
    format, and the label names to evaluate it with: class frequencies (multiclass), the positive rate (binary),
    per-label prevalences (multilabel) or the mean (regression)."""
    train = np.asarray(train_labels, dtype=np.float64)
    if task.type == "regression":
        return np.full(n, np.nanmean(train)), [task.name]
    if task.type == "multiclass":
        counts = np.bincount(train[~np.isnan(train)].astype(int), minlength=len(task.names))
        return np.tile(counts / counts.sum(), (n, 1)), list(task.names)
    if task.type == "binary":
        return np.full(n, np.nanmean(train)), [task.names[-1] if task.names else task.name]
    return np.tile(np.nanmean(train, axis=0), (n, 1)), list(task.names)


def constant_predictor_headlines(
    data_dir: str | os.PathLike, task_names: Sequence[str], *, seed: int = 0, train: str = "train", test: str = "test"
) -> dict[str, Any]:
    """Per task, the ``test`` headline metric of a constant predictor fitted on the ``train`` part of a prepared
    dataset folder (:func:`constant_predictions`), computed with the same metric code as the ensemble's:
    ``{task: {"metric", "value", "fit_on", "prediction"}}`` (``prediction``: the constant, rounded)."""
    dataset, meta = load_dataset_dir(data_dir)
    out = {}
    for name in task_names:
        info = meta.task(name)
        train_labels = label_arrays(_label_rows(dataset[train], name), [info])[name].astype(np.float64)
        test_labels = label_arrays(_label_rows(dataset[test], name), [info])[name].astype(np.float64)
        constant, names = constant_predictions(info, train_labels, len(test_labels))
        result = evaluate_task(
            info.type, names, test_labels, constant, bootstrap=BootstrapConfig(n_resamples=0, seed=seed)
        )
        metric, value, _ = headline(result)
        out[name] = {"metric": metric, "value": value, "fit_on": train, "prediction": _describe_constant(constant)}
    return out


def _label_rows(part: Any, column: str) -> list[dict[str, Any]]:
    values = part.select_columns([column]).with_format("numpy")[column]
    return [{column: value} for value in values]


def _describe_constant(constant: np.ndarray) -> Any:
    first = constant[0] if len(constant) else constant
    return [round(float(v), 4) for v in first] if getattr(first, "ndim", 0) else round(float(first), 4)


def _readable_embeddings(embeddings: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Embeddings with NaN rows zeroed, and ``(N, E)`` bool: True where the expert read the record."""
    readable = np.stack([np.isfinite(v).all(axis=1) for v in embeddings.values()], axis=1)
    return {e: np.nan_to_num(v) for e, v in embeddings.items()}, readable


def _unset_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values`` (as float) with NaN in ``rows`` (labels: unlabelled; predictions: missing)."""
    if not rows.any():
        return values
    values = np.asarray(values, dtype=np.float64).copy()
    values[rows] = np.nan
    return values
