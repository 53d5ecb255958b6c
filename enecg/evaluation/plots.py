"""Report figures (PNG): ROC/PR curves, calibration, gate weights, and a paper-style 12-lead ECG.

All figures use matplotlib's non-interactive Agg backend and are written atomically, so a report folder never
holds a half-written image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are generated on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from enecg.leads import canonical_lead_name

# The standard clinical print layout: 3 rows x 4 columns of 2.5 s, then a 10 s lead II rhythm strip.
PAPER_LAYOUT: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
PAPER_SPEED_MM_PER_S = 25.0
PAPER_GAIN_MM_PER_MV = 10.0


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def plot_roc_pr(
    y_true: np.ndarray, y_prob: np.ndarray, label_names: Sequence[str], title: str, path: str | os.PathLike
) -> Path:
    """ROC and precision-recall curves, one line per label (NaN labels masked; single-class labels skipped)."""
    y_true, y_prob = np.atleast_2d(y_true.T).T, np.atleast_2d(y_prob.T).T
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.4))
    for k, name in enumerate(label_names):
        keep = ~np.isnan(y_true[:, k])
        yt, yp = y_true[keep, k], y_prob[keep, k]
        if yt.size == 0 or yt.min() == yt.max():
            continue
        fpr, tpr, _ = roc_curve(yt, yp)
        precision, recall, _ = precision_recall_curve(yt, yp)
        ax_roc.plot(fpr, tpr, label=name)
        ax_pr.plot(recall, precision, label=name)
    ax_roc.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8)
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC — {title}", xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"PR — {title}", xlim=(0, 1),
              ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    return save_figure(fig, path)


def plot_calibration(
    y_true: np.ndarray, y_prob: np.ndarray, title: str, path: str | os.PathLike, n_bins: int = 10
) -> Path:
    """Reliability diagram: observed frequency vs mean predicted probability per bin (labels pooled)."""
    yt, yp = np.asarray(y_true, float).ravel(), np.asarray(y_prob, float).ravel()
    keep = ~np.isnan(yt)
    yt, yp = yt[keep], yp[keep]
    bins = np.minimum((yp * n_bins).astype(int), n_bins - 1)
    conf, freq, counts = [], [], []
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            conf.append(yp[sel].mean())
            freq.append(yt[sel].mean())
            counts.append(int(sel.sum()))
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=0.8, label="perfect")
    ax.plot(conf, freq, marker="o", label="model")
    for x, y, n in zip(conf, freq, counts):
        ax.annotate(str(n), (x, y), fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=f"Calibration — {title}",
           xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_gate_weights(weights: Mapping[str, np.ndarray], expert_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Distribution of the gate's per-record weight for each expert, one panel per task (box plots)."""
    tasks = list(weights)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1) + 1, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        w = np.asarray(weights[task], dtype=float)
        ax.boxplot([w[:, e] for e in range(w.shape[1])], tick_labels=list(expert_names), showmeans=True)
        ax.set(title=task, ylabel="gate weight", ylim=(-0.02, 1.02))
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_ecg_12lead(
    signal: np.ndarray, fs: float, leads: Sequence[str], title: str, path: str | os.PathLike
) -> Path:
    """Render a 12-lead ECG the way it is printed: 25 mm/s, 10 mm/mV, 1 mm / 5 mm grid, 3x4 layout of 2.5 s
    columns plus a 10 s lead II rhythm strip. Leads missing from the record are left blank (labelled)."""
    signal = np.asarray(signal, dtype=float)
    index = {canonical_lead_name(name): i for i, name in enumerate(leads)}
    column_s = 2.5
    n_col = round(column_s * fs)
    strip_s = min(10.0, signal.shape[1] / fs)
    row_height_mv = 3.0  # vertical space per row, in mV
    n_rows = len(PAPER_LAYOUT) + 1
    width_s = 4 * column_s
    height_mv = n_rows * row_height_mv
    mm_per_s, mm_per_mv = PAPER_SPEED_MM_PER_S, PAPER_GAIN_MM_PER_MV
    fig_w_in = width_s * mm_per_s / 25.4
    fig_h_in = height_mv * mm_per_mv / 25.4
    fig, ax = plt.subplots(figsize=(fig_w_in, fig_h_in + 0.4))
    # Grid: minor 1 mm (0.04 s, 0.1 mV), major 5 mm (0.2 s, 0.5 mV).
    for t in np.arange(0, width_s + 1e-9, 0.04):
        major = abs(t / 0.2 - round(t / 0.2)) < 1e-6
        ax.axvline(t, color="#f4a6a6" if major else "#fbdcdc", linewidth=0.6 if major else 0.3, zorder=0)
    for v in np.arange(0, height_mv + 1e-9, 0.1):
        major = abs(v / 0.5 - round(v / 0.5)) < 1e-6
        ax.axhline(v, color="#f4a6a6" if major else "#fbdcdc", linewidth=0.6 if major else 0.3, zorder=0)

    def draw(lead: str, t0: float, seconds: float, baseline: float, sample_start: int) -> None:
        n = round(seconds * fs)
        ax.text(t0 + 0.05, baseline + 0.9, lead, fontsize=7, fontweight="bold", zorder=3)
        if lead not in index:
            return
        trace = signal[index[lead], sample_start:sample_start + n]
        if trace.size == 0:
            return
        ax.plot(t0 + np.arange(trace.size) / fs, baseline + trace, color="black", linewidth=0.6, zorder=2)

    for r, row in enumerate(PAPER_LAYOUT):
        baseline = height_mv - (r + 0.5) * row_height_mv
        for c, lead in enumerate(row):
            draw(lead, c * column_s, column_s, baseline, c * n_col)
    draw("II", 0.0, strip_s, 0.5 * row_height_mv, 0)
    ax.set_xlim(0, width_s)
    ax.set_ylim(0, height_mv)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}   (25 mm/s, 10 mm/mV)", fontsize=8, loc="left")
    return save_figure(fig, path, dpi=100)
