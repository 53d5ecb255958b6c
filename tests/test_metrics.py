"""Clinical metrics: hand-computed cases, agreement with scikit-learn, deterministic patient-level bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from enecg.evaluation.metrics import (
    BootstrapConfig,
    OperatingPoint,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    choose_thresholds,
    expected_calibration_error,
    fit_temperature,
    multiclass_metrics,
    multilabel_metrics,
    regression_metrics,
)


def test_binary_metrics_hand_computed() -> None:
    # threshold 0.5 -> predictions [1, 1, 0, 0, 1, 0]; truth [1, 0, 1, 0, 1, 0]
    y = np.array([1, 0, 1, 0, 1, 0], dtype=float)
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.8, 0.1])
    m = binary_metrics(y, p, 0.5)
    # TP=2 (0.9, 0.8), FP=1 (0.6), FN=1 (0.4), TN=2 (0.2, 0.1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # AUROC: positive scores {0.9, 0.8, 0.4} vs negative {0.6, 0.2, 0.1}: 8 of 9 pairs ordered correctly.
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["prevalence"] == pytest.approx(0.5)


def test_nan_labels_are_ignored_not_counted() -> None:
    y = np.array([1, 0, np.nan, 1, 0])
    p = np.array([0.8, 0.3, 0.99, 0.7, 0.1])
    m = binary_metrics(y, p, 0.5)
    assert m["n"] == 4
    assert m["auroc"] == 1.0 and m["specificity"] == 1.0


def test_undefined_metrics_are_nan() -> None:
    m = binary_metrics(np.zeros(4), np.array([0.1, 0.2, 0.6, 0.3]), 0.5)
    assert math.isnan(m["auroc"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(0.75)


def test_max_f1_threshold_maximises_f1() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(float)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1)
    t = choose_threshold(y, p, OperatingPoint("max_f1"))
    best = binary_metrics(y, p, t)["f1"]
    for other in np.unique(p):
        assert binary_metrics(y, p, float(other))["f1"] <= best + 1e-12


def test_target_sensitivity_threshold() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400).astype(float)
    p = np.clip(0.4 * y + rng.normal(0.3, 0.2, 400), 0, 1)
    t = choose_threshold(y, p, OperatingPoint("sensitivity", target_sensitivity=0.9))
    assert binary_metrics(y, p, t)["sensitivity"] >= 0.9
    # The chosen threshold is the highest reaching the target: a slightly higher one falls below it.
    higher = np.min(p[p > t]) if (p > t).any() else 1.01
    assert binary_metrics(y, p, float(higher))["sensitivity"] < 0.9


def test_multilabel_macro_equals_mean_and_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, (200, 3)), 0, 1)
    y[:10, 1] = np.nan
    thresholds = choose_thresholds(y, p, OperatingPoint())
    res = multilabel_metrics(y, p, thresholds, ["A", "B", "C"])
    expected_b = roc_auc_score(y[10:, 1], p[10:, 1])
    assert res["per_label"]["B"]["auroc"] == pytest.approx(expected_b)
    per = [res["per_label"][k]["auroc"] for k in "ABC"]
    assert res["macro"]["auroc"] == pytest.approx(np.mean(per))
    keep = ~np.isnan(y)
    assert res["micro"]["auroc"] == pytest.approx(roc_auc_score(y[keep], p[keep]))


def test_multiclass_and_regression() -> None:
    y = np.array([0, 1, 2, 2, np.nan])
    prob = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4], [1, 0, 0]])
    m = multiclass_metrics(y, prob, ["a", "b", "c"])
    assert m["n"] == 4 and m["accuracy"] == pytest.approx(0.75)
    r = regression_metrics(np.array([1.0, 2.0, 3.0, np.nan]), np.array([1.5, 2.0, 2.0, 100.0]))
    assert r["mae"] == pytest.approx(0.5)
    assert r["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))
    assert r["r2"] == pytest.approx(1 - 1.25 / 2.0)


def test_ece_perfect_and_miscalibrated() -> None:
    y = np.array([0, 1] * 50, dtype=float)
    assert expected_calibration_error(y, y) == 0.0
    # Always predicting 0.9 on a 50% prevalence: |0.5 - 0.9| = 0.4.
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4)


def test_temperature_scaling_recovers_overconfidence() -> None:
    rng = np.random.default_rng(3)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.uniform(size=4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    t = fit_temperature(true_logit * 3.0, y, "binary")  # logits 3x too confident -> T ~ 3
    assert t == pytest.approx(3.0, rel=0.15)
    logits = rng.normal(0, 1, (3000, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in probs], dtype=float)
    assert fit_temperature(logits * 0.5, labels, "multiclass") == pytest.approx(0.5, rel=0.2)


def test_bootstrap_is_deterministic_and_patient_level() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120).astype(float)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 120), 0, 1)
    patients = np.repeat(np.arange(40), 3)

    def auroc(idx: np.ndarray) -> float:
        return binary_metrics(y[idx], p[idx], 0.5)["auroc"]

    config = BootstrapConfig(n_resamples=200, seed=7)
    a = bootstrap_ci(auroc, len(y), patients, config)
    b = bootstrap_ci(auroc, len(y), patients, config)
    assert a == b
    low, high = a
    assert low < auroc(np.arange(120)) < high
    c = bootstrap_ci(auroc, len(y), patients, BootstrapConfig(n_resamples=200, seed=8))
    assert c != a

    # Patient-level: every drawn index set contains whole patients only.
    seen: list[np.ndarray] = []
    bootstrap_ci(lambda idx: seen.append(idx) or 0.0, len(y), patients, BootstrapConfig(n_resamples=5))
    for idx in seen:
        counts = np.bincount(patients[idx], minlength=40)
        assert np.all(counts % 3 == 0)


def test_bootstrap_rejects_mismatched_groups() -> None:
    with pytest.raises(ValueError, match="group ids"):
        bootstrap_ci(lambda idx: 0.0, 5, [1, 2], BootstrapConfig(n_resamples=2))


def test_evaluate_task_uses_validation_thresholds_and_is_json() -> None:
    import json

    from enecg.evaluation.task_eval import evaluate_task

    rng = np.random.default_rng(5)
    y_val = rng.integers(0, 2, (150, 2)).astype(float)
    p_val = np.clip(0.4 * y_val + rng.uniform(0, 0.6, (150, 2)), 0, 1)
    y_test = rng.integers(0, 2, (90, 2)).astype(float)
    p_test = np.clip(0.4 * y_test + rng.uniform(0, 0.6, (90, 2)), 0, 1)
    res = evaluate_task("multilabel", ["A", "B"], y_test, p_test, val_true=y_val, val_pred=p_val,
                        test_groups=np.repeat(np.arange(45), 2), bootstrap=BootstrapConfig(n_resamples=50))
    expected_thresholds = choose_thresholds(y_val, p_val, OperatingPoint())
    assert res["thresholds"] == {"A": expected_thresholds[0], "B": expected_thresholds[1]}
    assert res["metrics"]["per_label"]["A"]["threshold"] == expected_thresholds[0]
    low, high = res["ci"]["macro_auroc"]
    assert low <= res["metrics"]["macro"]["auroc"] <= high
    assert res["calibration"]["temperature"] > 0
    json.dumps(res, allow_nan=False)  # NaN must have become null

    reg = evaluate_task("regression", [], np.array([50.0, 60, np.nan, 70]), np.array([52.0, 58, 1, 71]),
                        bootstrap=BootstrapConfig(n_resamples=20))
    assert reg["metrics"]["mae"] == pytest.approx(5 / 3)
    json.dumps(reg, allow_nan=False)


def test_disabled_bootstrap_keeps_the_shape() -> None:
    from enecg.evaluation.report import render_html
    from enecg.evaluation.task_eval import evaluate_task

    off = BootstrapConfig(n_resamples=0)
    assert bootstrap_ci(lambda idx: 1.0, 4, None, off) == (math.nan, math.nan)
    assert bootstrap_ci(lambda idx: {"a": 1.0, "b": 2.0}, 4, None, off) == {"a": (math.nan, math.nan),
                                                                            "b": (math.nan, math.nan)}
    y = np.array([0, 1, 0, 1, 1], dtype=float)
    res = evaluate_task("binary", ["pos"], y, np.array([0.2, 0.8, 0.3, 0.6, 0.9]), bootstrap=off)
    assert res["ci"]["macro_auroc"] == [None, None]
    assert "Task: t" in render_html({"tasks": {"t": res}})  # renders without CIs
