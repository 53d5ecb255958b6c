"""Anomaly scores from reconstruction: how badly the diffusion model denoises a record.

:func:`score_anomaly` noises each record at a few fixed levels (seeded: the same record always gets the same
score) and measures the error of the model's one-step estimate of the clean signal. A model that learned
what typical ECGs look like reconstructs them better than unusual ones. By default the prediction is conditioned
on the model's normal label (``NORM`` when its task has one): "how well does this record pass for a normal ECG".
With ``contrast=True`` the score is that error *minus* the unconditioned one at the same noise: how much worse
the record is explained as normal than as any ECG, which discounts records that are simply hard to denoise
(noisy, high amplitude) whatever their label.

:func:`evaluate_anomaly` evaluates the score as a binary task on a real part of a dataset: abnormal = labelled
and not normal (rows without labels are left out), AUROC with a patient-level bootstrap interval.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from enecg.data.build import load_dataset_dir
from enecg.data.rows import row_to_record
from enecg.data.schema import refuse_synthetic
from enecg.evaluation.metrics import BootstrapConfig, auroc, bootstrap_ci
from enecg.generative.model import ECGDiffusion
from enecg.generative.train import label_matrix
from enecg.record import ECGRecord

NORMAL_LABEL = "NORM"


def score_anomaly(
    model: ECGDiffusion,
    records: Sequence[ECGRecord],
    *,
    normal_label: str | None = NORMAL_LABEL,
    noise_levels: tuple[float, ...] = (0.1, 0.2, 0.3),
    contrast: bool = False,
    batch_size: int = 32,
    seed: int = 0,
) -> np.ndarray:
    """One score per record (higher = more anomalous): mean denoising error over ``noise_levels``.

    ``normal_label``: condition the prediction on this label when the model knows it (else unconditioned).
    ``contrast``: subtract the unconditioned error (same noise draws) from the conditioned one."""
    labels = None
    if normal_label is not None and normal_label in model.spec.label_names:
        labels = model.label_vector([normal_label])
    scores = []
    for start in range(0, len(records), batch_size):
        clean = model.prepare(list(records[start : start + batch_size]))
        condition = None if labels is None else labels[None].expand(clean.shape[0], -1)
        score = model.denoising_error(clean, noise_levels=noise_levels, labels=condition, seed=seed)
        if contrast:
            score = score - model.denoising_error(clean, noise_levels=noise_levels, labels=None, seed=seed)
        scores.append(score.numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def evaluate_anomaly(
    model: ECGDiffusion,
    dataset_dir: str | os.PathLike,
    *,
    part: str = "test",
    task: str | None = None,
    normal_label: str = NORMAL_LABEL,
    bootstrap: BootstrapConfig | None = None,
    max_records: int | None = None,
    noise_levels: tuple[float, ...] = (0.1, 0.2, 0.3),
    contrast: bool = False,
) -> dict[str, Any]:
    """AUROC of :func:`score_anomaly` for abnormal (labelled, not ``normal_label``) vs normal on ``part``."""
    parts, meta = load_dataset_dir(dataset_dir)
    if part not in parts:
        raise ValueError(f"{dataset_dir}: no part {part!r}; parts: {sorted(parts)}")
    refuse_synthetic(parts[part]["source"], f"{dataset_dir}/{part}")
    info = meta.task(task or model.spec.task)
    if normal_label not in info.names:
        raise ValueError(f"task {info.name!r} has no label {normal_label!r}; labels: {info.names}")
    rows = list(parts[part].with_format("numpy"))[:max_records]
    labels = label_matrix([r[info.name] for r in rows], info)
    keep = ~np.isnan(labels).all(axis=1)
    rows = [r for r, k in zip(rows, keep) if k]
    abnormal = (labels[keep, info.names.index(normal_label)] < 0.5).astype(float)
    with torch.no_grad():  # the model's own score (any kind; the options are the diffusion kind's)
        scores = model.anomaly_scores(
            [row_to_record(r) for r in rows],
            normal_label=normal_label,
            noise_levels=noise_levels,
            contrast=contrast,
        )
    patients = [str(r["patient_id"]) for r in rows]
    interval = bootstrap_ci(
        lambda idx: auroc(abnormal[idx], scores[idx]), len(rows), patients, bootstrap or BootstrapConfig()
    )
    return {
        "part": part,
        "records": len(rows),
        "abnormal": int(abnormal.sum()),
        "normal_label": normal_label,
        "noise_levels": list(noise_levels),
        "contrast": contrast,
        "auroc": auroc(abnormal, scores),
        "auroc_ci": list(interval),
        "mean_score_normal": float(scores[abnormal == 0].mean()) if (abnormal == 0).any() else None,
        "mean_score_abnormal": float(scores[abnormal == 1].mean()) if (abnormal == 1).any() else None,
    }
