"""Baselines and paired comparisons against hand-computed cases: the paired bootstrap, the stacker, out-of-fold
scores, the validation-chosen single expert, and the numpy AUROC / average precision against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from enecg.data.schema import TaskInfo
from enecg.data.splits import row_folds
from enecg.evaluation.baselines import (
    STACKER,
    LinearProbe,
    SplitFeatures,
    Stacker,
    best_single_expert,
    fit_baselines,
    out_of_fold_scores,
    probe_name,
)
from enecg.evaluation.metrics import BootstrapConfig, auroc, average_precision
from enecg.evaluation.paired import headline_value, paired_difference

BINARY = TaskInfo(name="sex", type="binary", names=["female"])
MULTILABEL = TaskInfo(name="dx", type="multilabel", names=["A", "B"])
REGRESSION = TaskInfo(name="age", type="regression", names=[])
MULTICLASS = TaskInfo(name="rhythm", type="multiclass", names=["x", "y", "z"])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_average_precision_equal_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=60).astype(float)
    scores = np.round(rng.normal(size=60) + y, 1)  # rounded: many ties
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    assert math.isnan(auroc(np.ones(5), np.arange(5.0)))


def test_paired_difference_hand_computed() -> None:
    groups = [f"p{i // 2}" for i in range(8)]  # two records per patient
    boot = BootstrapConfig(n_resamples=300, seed=1)
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=float)
    perfect, inverted = y.copy(), 1 - y
    # AUROC 1 vs 0 in every resample that holds both classes: difference 1, CI [1, 1], in a's favour.
    result = paired_difference("binary", y, perfect, inverted, groups, boot)
    assert result["difference"] == 1.0 and result["ci"] == [1.0, 1.0] and result["better"] == "a"
    # Identical predictions: exactly 0 everywhere, no winner.
    same = paired_difference("binary", y, perfect, perfect, groups, boot)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0] and same["better"] is None
    # MAE (lower is better): a is off by 1, b by 3 on every record: -2 in every resample, a better.
    target = np.arange(8, dtype=float)
    mae = paired_difference("regression", target, target + 1, target - 3, groups, boot)
    assert mae["difference"] == -2.0 and mae["ci"] == [-2.0, -2.0] and mae["better"] == "a"
    assert (mae["a"], mae["b"]) == (1.0, 3.0) and mae["higher_is_better"] is False
    # Without resamples: the point difference, no interval, no verdict.
    none = paired_difference("binary", y, perfect, inverted, groups, BootstrapConfig(n_resamples=0))
    assert none["difference"] == 1.0 and all(math.isnan(v) for v in none["ci"]) and none["better"] is None


def test_paired_resamples_are_shared_by_both_models() -> None:
    """Same seed, same resamples: a and b scored on identical patient draws (the CI of a - b is not the
    difference of two unpaired CIs)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=40).astype(float)
    a = y + rng.normal(scale=0.8, size=40)
    b = a + rng.normal(scale=0.05, size=40)  # nearly a: the paired CI is narrow
    groups = [str(i) for i in range(40)]
    boot = BootstrapConfig(n_resamples=200, seed=3)
    result = paired_difference("binary", y, a, b, groups, boot)
    draws = np.random.default_rng(3)
    diffs = []
    for _ in range(200):
        idx = draws.integers(0, 40, size=40)
        diffs.append(headline_value("binary", y[idx], a[idx]) - headline_value("binary", y[idx], b[idx]))
    assert result["ci"] == pytest.approx([np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)])
    assert result["ci"][1] - result["ci"][0] < 0.05


def test_headline_value_skips_undefined_labels() -> None:
    y = np.array([[0, 1], [1, 1], [0, 1], [1, np.nan]])
    p = np.array([[0.1, 0.5], [0.9, 0.4], [0.2, 0.3], [0.8, 0.1]])
    assert headline_value("multilabel", y, p) == 1.0  # label B has one class only: left out of the macro mean


def test_stacker_recovers_known_weights() -> None:
    rng = np.random.default_rng(0)
    s1, s2 = rng.normal(size=200), rng.normal(size=200)
    # Regression: y = 2 s1 - s2 exactly -> linear regression finds (2, -1).
    stacker = Stacker(REGRESSION).fit([s1, s2], 2 * s1 - s2)
    assert stacker.coefficients()[0] == pytest.approx([2.0, -1.0], abs=1e-6)
    assert stacker.predict([s1, s2]) == pytest.approx(2 * s1 - s2, abs=1e-6)
    # Binary: only the first expert's score carries the label -> it gets (nearly) all the weight.
    y = (s1 + 0.3 * rng.normal(size=200) > 0).astype(float)
    binary = Stacker(BINARY).fit([s1, s2], y)
    w1, w2 = binary.coefficients()[0]
    assert w1 > 1.0 and abs(w2) < 0.5 * w1
    # Multilabel: one model per label, each on that label's column of every expert.
    ym = np.stack([y, (s2 > 0).astype(float)], axis=1)
    multi = Stacker(MULTILABEL).fit([np.stack([s1, s2], 1), np.stack([s2, s1], 1)], ym)
    (a1, a2), (b1, b2) = multi.coefficients()
    assert a1 > abs(a2) and b1 > abs(b2)
    # A label with one class in training: a constant (its prevalence).
    constant = Stacker(MULTILABEL).fit([np.stack([s1, s2], 1)], np.stack([y, np.ones(200)], 1))
    assert np.all(constant.predict([np.stack([s1, s2], 1)])[:, 1] == 1.0)


def test_out_of_fold_scores_are_from_probes_without_the_row() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(float)
    patients = [f"p{i // 3}" for i in range(60)]
    oof = out_of_fold_scores(BINARY, {"e": x}, y, patients, folds=3, seed=7)["e"]
    fold = row_folds(patients, 3, 7)
    for k in range(3):
        held = fold == k
        expected = LinearProbe(BINARY).fit(x[~held], y[~held]).scores(x[held])
        assert oof[held] == pytest.approx(expected)
    # patient-disjoint folds
    assert all(len({fold[i] for i in range(60) if patients[i] == p}) == 1 for p in set(patients))


def test_best_single_expert_is_chosen_on_validation() -> None:
    y = np.array([0, 1, 0, 1], dtype=float)
    preds = np.stack([np.array([0.9, 0.1, 0.8, 0.2]), np.array([0.1, 0.9, 0.2, 0.8])], axis=1)  # (N, E)
    assert best_single_expert(BINARY, y, preds) == 1
    ages = np.array([40.0, 50.0, 60.0])
    assert best_single_expert(REGRESSION, ages, np.stack([ages + 5, ages + 1], axis=1)) == 1  # lower MAE


def test_fit_baselines_predicts_every_split_in_the_evaluation_space() -> None:
    rng = np.random.default_rng(2)
    n = 80

    def split(size: int) -> SplitFeatures:
        x1, x2 = rng.normal(size=(size, 5)), rng.normal(size=(size, 3))
        labels = {
            "sex": (x1[:, 0] > 0).astype(float),
            "age": 50 + 10 * x2[:, 0],
            "rhythm": rng.integers(0, 2, size=size).astype(float),  # class z never seen in training
        }
        return SplitFeatures({"a": x1, "b": x2}, labels, [str(i) for i in range(size)])

    train, test = split(n), split(30)
    predictions, details = fit_baselines([BINARY, REGRESSION, MULTICLASS], train, {"test": test}, seed=0)
    assert set(predictions) == {probe_name("a"), probe_name("b"), STACKER}
    sex = predictions[probe_name("a")]["test"]["sex"]
    assert sex.shape == (30,) and np.all((sex > 0) & (sex < 1))
    assert headline_value("binary", test.labels["sex"], sex) > 0.9  # the informative expert
    rhythm = predictions[STACKER]["test"]["rhythm"]
    assert rhythm.shape == (30, 3) and rhythm.sum(1) == pytest.approx(np.ones(30)) and np.all(rhythm[:, 2] == 0)
    assert predictions[probe_name("b")]["test"]["age"].shape == (30,)
    assert details["tasks"]["sex"]["features"] == ["a", "b"]


def test_constant_predictions_per_task_type() -> None:
    from enecg.evaluation.baselines import constant_predictions

    regression = TaskInfo(name="age", type="regression")
    values, names = constant_predictions(regression, np.array([10.0, np.nan, 30.0]), 2)
    assert names == ["age"] and values.tolist() == [20.0, 20.0]
    multiclass = TaskInfo(name="rhythm", type="multiclass", names=["A", "B", "C"])
    values, names = constant_predictions(multiclass, np.array([0.0, 2.0, 2.0, np.nan]), 3)
    assert names == ["A", "B", "C"] and values.shape == (3, 3)
    np.testing.assert_allclose(values[0], [1 / 3, 0.0, 2 / 3])
    binary = TaskInfo(name="sex", type="binary", names=["male", "female"])
    values, names = constant_predictions(binary, np.array([0.0, 1.0, 1.0, 1.0]), 2)
    assert names == ["female"] and values.tolist() == [0.75, 0.75]
    multilabel = TaskInfo(name="superclass", type="multilabel", names=["NORM", "MI"])
    values, names = constant_predictions(multilabel, np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0]]), 1)
    assert names == ["NORM", "MI"] and np.allclose(values, [[2 / 3, 0.5]])
