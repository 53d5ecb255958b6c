"""Patient-level splits. Several recordings of one patient must never sit in two parts (train/test leakage).

Two schemes:

* hold-out parts ``train`` / ``validation`` / ``test``;
* k-fold: parts ``fold_0`` ... ``fold_{k-1}``, each a disjoint group of patients (cross-validation picks one part
  as the test fold and trains on the others). The part name is also the row's ``split`` column.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

HOLDOUT_PARTS = ("train", "validation", "test")


def fold_part(index: int) -> str:
    return f"fold_{index}"


def kfold_parts(k: int) -> list[str]:
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    return [fold_part(i) for i in range(k)]


def strat_fold_part(
    fold: int, validation_folds: Sequence[int] = (9,), test_folds: Sequence[int] = (10,)
) -> str:
    """Hold-out part of a PTB-XL ``strat_fold`` (1-10): by default 1-8 train, 9 validation, 10 test."""
    if fold in test_folds:
        return "test"
    if fold in validation_folds:
        return "validation"
    return "train"


def strat_fold_group(fold: int, k: int, n_folds: int = 10) -> str:
    """k-fold part of a ``strat_fold`` (1-``n_folds``): consecutive folds grouped, e.g. k=5: {1,2} -> fold_0."""
    if not 1 <= fold <= n_folds:
        raise ValueError(f"strat_fold {fold} outside 1..{n_folds}")
    if not 2 <= k <= n_folds:
        raise ValueError(f"k-fold over {n_folds} stratified folds needs 2 <= k <= {n_folds}, got {k}")
    return fold_part((fold - 1) * k // n_folds)


def group_holdout(
    groups: Iterable[str], seed: int, validation_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, str]:
    """Assign each distinct group (patient) to train/validation/test at random (reproducible with ``seed``).

    Fractions are of patients, rounded; a fraction > 0 gets at least one patient when there are >= 3 patients.
    """
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: validation {validation_fraction}, test {test_fraction}")
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    n = len(unique)

    def count(fraction: float) -> int:
        wanted = round(fraction * n)
        return max(wanted, 1) if fraction > 0 and n >= 3 else wanted

    n_test, n_val = count(test_fraction), count(validation_fraction)
    parts = {}
    for rank, idx in enumerate(order):
        parts[unique[idx]] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
    return parts


def group_kfold(groups: Iterable[str], k: int, seed: int) -> dict[str, str]:
    """Assign each distinct group (patient) to one of ``k`` folds at random, sizes differing by at most one."""
    kfold_parts(k)
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[idx]: fold_part(rank % k) for rank, idx in enumerate(order)}


def assert_patients_disjoint(patient_parts: Iterable[tuple[str, str]]) -> None:
    """Raise ValueError when a patient appears in more than one part. Input: (patient_id, part) pairs."""
    parts_of: dict[str, set[str]] = defaultdict(set)
    for patient, part in patient_parts:
        parts_of[patient].add(part)
    leaking = {p: sorted(s) for p, s in parts_of.items() if len(s) > 1}
    if leaking:
        shown = dict(sorted(leaking.items())[:5])
        raise ValueError(f"{len(leaking)} patients are in more than one split part (leakage), e.g. {shown}")


def row_folds(patient_ids: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) of every row, patient-disjoint: :func:`group_kfold` over the rows' patients.

    Raises ValueError when there are fewer patients than folds (a fold would be empty)."""
    patients = [str(p) for p in patient_ids]
    if len(set(patients)) < k:
        raise ValueError(f"{len(set(patients))} patients cannot fill {k} patient-disjoint folds")
    folds = group_kfold(patients, k, seed)
    return np.array([int(folds[p].rsplit("_", 1)[1]) for p in patients], dtype=np.int64)
