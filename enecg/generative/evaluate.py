"""How good are generated records? ``enecg generate evaluate`` (:func:`evaluate_samples`).

Synthetic records are drawn with the conditions (labels, age, sex) of the real labelled training records, then
compared with the real *test* part (which is refused if it holds any synthetic row):

* **Fréchet distance** between Gaussian fits of a frozen expert's embeddings (any enecg expert), synthetic vs
  real test, next to the real-vs-real floor (real train vs real test, the same sizes): ``ratio`` = synthetic / floor
  (1 = as close as another real sample);
* **heart rate** distributions (R peaks from ``wfdb.processing.xqrs_detect`` on lead II, or the first lead),
  real test vs synthetic, and their Wasserstein distance;
* **QRS width** distributions at the same R peaks: wfdb detects R peaks but does not delineate the QRS complex,
  so the width is read from a multi-lead slope envelope (:data:`QRS_THRESHOLD` documents the measure; neurokit2's
  wavelet delineators were tried and at 100 Hz returned about the same width whatever the true one). At 100 Hz
  it is quantised to 10 ms and is a relative measure: compare real with synthetic, not with clinical norms; a
  noise-like trace reads wide (its envelope never drops). Summaries and the Wasserstein distance as for heart
  rate;
* **per-lead spectra** (Welch) and the mean absolute log-spectral difference per lead;
* **TSTR vs TRTR**: a logistic-regression probe on the expert embeddings (the evaluation's own
  :class:`~enecg.evaluation.baselines.LinearProbe`) trained on synthetic / on real training records, both tested on
  the real test part; macro AUROC and ``tstr_over_trtr``;
* **augmentation** of rare labels: the real-data probe refitted with synthetic records of the label added; the
  label's AUROC gain with a paired patient-level bootstrap CI (:func:`augmentation_gain`, which also pools the
  gain over several evaluations, e.g. fold groups);
* a 12-lead rendering of one sample per label and a summary figure (heart rate, spectra).

Writes ``evaluation.json`` and PNGs to ``out``; a model given as a local folder gets the summary in its
``metrics.json`` and model card.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from enecg.data.build import load_dataset_dir
from enecg.data.rows import label_arrays, row_to_record
from enecg.data.schema import TaskInfo, is_synthetic, refuse_synthetic
from enecg.evaluation.baselines import LinearProbe
from enecg.evaluation.metrics import BootstrapConfig, auroc, bootstrap_ci
from enecg.evaluation.plots import plot_ecg_12lead, save_figure
from enecg.generative.base import GenerativeModel, load_generative
from enecg.generative.model import CARD_FILE, METRICS_FILE
from enecg.generative.train import label_matrix
from enecg.record import ECGRecord

logger = logging.getLogger(__name__)


@dataclass
class SampleEvaluationConfig:
    """One evaluation run of a generative model against a prepared dataset."""

    model: str = field(metadata={"help": "Model folder or Hub ID."})
    data: str = field(metadata={"help": "Prepared dataset carrying the model's task."})
    expert: str = field(metadata={"help": "Frozen expert (folder, Hub ID or spec name) for embeddings."})
    out: str = field(metadata={"help": "Folder for evaluation.json and the figures."})
    train_parts: tuple[str, ...] = field(
        default=("train",), metadata={"help": "Real training parts (TRTR; conditions of the samples)."}
    )
    test_part: str = field(default="test", metadata={"help": "Real test part; never synthetic."})
    n_synthetic: int | None = field(
        default=None, metadata={"help": "Synthetic records (null: as many as labelled training records)."}
    )
    n_per_label: int = field(default=1, metadata={"help": "12-lead renderings per label."})
    augment_labels: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Labels whose probe is refitted with synthetic records added (e.g. HYP)."},
    )
    augment_n: int = field(default=50, metadata={"help": "Synthetic records added per augmented label."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    steps: int | None = field(default=None, metadata={"help": "DDIM steps (null: the model's)."})
    guidance_scale: float = field(default=1.0, metadata={"help": "Classifier-free guidance when sampling."})
    batch_size: int = field(default=32, metadata={"help": "Records per embedding / sampling batch."})
    bootstrap: BootstrapConfig = field(
        default_factory=BootstrapConfig,
        metadata={"help": "Patient-level bootstrap of the augmentation gain's paired CI."},
    )


# ---------------------------------------------------------------------- measures

# QRS width (wfdb finds R peaks but does not delineate the QRS): every lead is high-passed at 1 Hz (baseline
# wander out), the absolute first differences are summed over leads (a slope envelope, high through the QRS,
# low on the isoelectric segments; T and P waves are slow), and a beat's QRS is the contiguous run of samples
# around the envelope's maximum within QRS_SEARCH_S of the R peak where the envelope stays at or above
# QRS_THRESHOLD x that maximum, at most QRS_REACH_S each way. A record's width is the median over its beats.
QRS_THRESHOLD = 0.1
QRS_SEARCH_S = 0.06
QRS_REACH_S = 0.15


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings ``(n, d)`` (the FID formula)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2): a symmetric PSD matrix, so eigh is exact and stable even when the
    # covariances are singular (fewer records than dimensions), where sqrtm(A @ B) is not.
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def r_peaks(signals: np.ndarray, fs: float, lead: int) -> list[np.ndarray]:
    """Sorted R-peak sample indices per record from wfdb's ``xqrs_detect`` on one lead (empty if none)."""
    from wfdb.processing import xqrs_detect

    peaks = []
    for signal in signals:
        try:
            found = xqrs_detect(np.asarray(signal[lead], np.float64), fs=fs, verbose=False)
        except Exception:  # a flat or broken synthetic trace: no beats, not a crash
            found = np.zeros(0, dtype=int)
        peaks.append(np.sort(np.asarray(found, dtype=int)))
    return peaks


def heart_rates(
    signals: np.ndarray, fs: float, lead: int, peaks: list[np.ndarray] | None = None
) -> np.ndarray:
    """Beats per minute per record from the median RR interval (NaN with fewer than two beats); ``peaks``:
    :func:`r_peaks` of the same signals when already detected."""
    peaks = r_peaks(signals, fs, lead) if peaks is None else peaks
    rates = []
    for found in peaks:
        rr = np.diff(found) / fs
        rates.append(60.0 / float(np.median(rr)) if rr.size else math.nan)
    return np.asarray(rates)


def qrs_widths(
    signals: np.ndarray,
    fs: float,
    lead: int,
    peaks: list[np.ndarray] | None = None,
    *,
    threshold: float = QRS_THRESHOLD,
) -> np.ndarray:
    """QRS width per record in ms around the wfdb R peaks of ``lead`` (:func:`r_peaks`; ``peaks`` when already
    detected), measured on all leads' slope envelope; see :data:`QRS_THRESHOLD`. NaN when no beat is found."""
    from scipy.signal import butter, sosfiltfilt

    peaks = r_peaks(signals, fs, lead) if peaks is None else peaks
    sos = butter(2, 1.0, btype="highpass", fs=fs, output="sos")
    search, reach = round(QRS_SEARCH_S * fs), round(QRS_REACH_S * fs)
    widths = []
    for signal, found in zip(signals, peaks):
        signal = np.asarray(signal, np.float64)
        if not found.size or signal.shape[-1] <= 3 * (
            2 * len(sos) + 1
        ):  # too short for the zero-phase filter
            widths.append(math.nan)
            continue
        filtered = sosfiltfilt(sos, signal, axis=-1)
        envelope = np.abs(np.diff(filtered, axis=-1, prepend=filtered[:, :1])).sum(axis=0)
        beats = []
        for r in found:
            lo, hi = max(r - search, 0), min(r + search + 1, envelope.size)
            top = lo + int(np.argmax(envelope[lo:hi]))
            if envelope[top] <= 0:
                continue
            low = envelope < threshold * envelope[top]
            # The contiguous run above the threshold around the steepest point, at most QRS_REACH_S each way.
            before = np.flatnonzero(low[max(top - reach, 0) : top][::-1])
            after = np.flatnonzero(low[top + 1 : top + reach + 1])
            onset = top - (before[0] if before.size else min(reach, top))
            offset = top + (after[0] if after.size else min(reach, envelope.size - 1 - top))
            beats.append((offset - onset + 1) * 1000.0 / fs)
        widths.append(float(np.median(beats)) if beats else math.nan)
    return np.asarray(widths)


def distribution_summary(values: np.ndarray) -> dict[str, Any]:
    """Fraction of records with a value, mean, std and 10/50/90th percentiles of the finite values."""
    ok = values[np.isfinite(values)]
    return {
        "detected": float(ok.size / max(values.size, 1)),
        "mean": float(ok.mean()) if ok.size else math.nan,
        "std": float(ok.std()) if ok.size else math.nan,
        "q10_q50_q90": [float(q) for q in np.percentile(ok, [10, 50, 90])] if ok.size else [],
    }


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between the finite values of two samples (NaN if either has none)."""
    from scipy.stats import wasserstein_distance

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    return float(wasserstein_distance(a, b)) if a.size and b.size else math.nan


def lead_spectra(signals: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and the mean log10 power spectral density per lead ``(leads, freqs)`` (Welch)."""
    from scipy.signal import welch

    freqs, psd = welch(signals, fs=fs, nperseg=min(256, signals.shape[-1]), axis=-1)
    return freqs, np.log10(psd.mean(axis=0) + 1e-12)


def probe_predictions(
    task: TaskInfo, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray
) -> np.ndarray:
    """Scores ``(n_test, K)`` of a logistic probe fitted on ``(x_train, y_train)``. ``y_train`` is multi-hot
    ``(n, K)`` (NaN = missing); a multiclass task is fitted on class indices."""
    if task.type == "multiclass":
        fit_y = np.where(np.isnan(y_train).all(1), np.nan, np.nanargmax(np.nan_to_num(y_train, nan=-1), 1))
    else:
        fit_y = y_train
    return np.asarray(LinearProbe(task).fit(x_train, fit_y).predict(x_test)).reshape(len(x_test), -1)


def probe_auroc(
    task: TaskInfo,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    predicted: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-label and macro AUROC of a logistic probe fitted on ``(x_train, y_train)`` and scored on the test set
    (``predicted``: its :func:`probe_predictions`, when already computed)."""
    if predicted is None:
        predicted = probe_predictions(task, x_train, y_train, x_test)
    per_label = {}
    for k, name in enumerate(task.names):
        known = ~np.isnan(y_test[:, k])
        per_label[name] = auroc(y_test[known, k], predicted[known, k]) if known.any() else math.nan
    defined = [v for v in per_label.values() if not math.isnan(v)]
    return {"per_label": per_label, "macro": float(np.mean(defined)) if defined else math.nan}


def augmentation_gain(
    evaluations: list[dict[str, Any]], bootstrap: BootstrapConfig | None = None
) -> dict[str, Any]:
    """AUROC gain of a label from synthetic augmentation, pooled over evaluations, with a paired bootstrap CI.

    Each evaluation (e.g. one fold group) is ``{"y": labels (n,), "real": scores (n,), "augmented": scores (n,),
    "patients": ids (n,)}`` on the same real test records (NaN labels ignored). The gain is the mean over
    evaluations of ``AUROC(augmented) - AUROC(real)``; each bootstrap resample draws patients with replacement
    from every evaluation's test records at once and scores *both* probes on the same draw, so the interval is
    that of the paired difference. A patient id counts per evaluation (fold groups hold disjoint patients).
    """
    if not evaluations:
        raise ValueError("augmentation_gain: no evaluations to pool")
    source = np.concatenate([np.full(len(e["y"]), i) for i, e in enumerate(evaluations)])
    y = np.concatenate([np.asarray(e["y"], float) for e in evaluations])
    real = np.concatenate([np.asarray(e["real"], float) for e in evaluations])
    augmented = np.concatenate([np.asarray(e["augmented"], float) for e in evaluations])
    patients = [f"{i}:{p}" for i, e in enumerate(evaluations) for p in e["patients"]]
    if not len(y) == len(real) == len(augmented) == len(patients):
        raise ValueError("augmentation_gain: labels, scores and patients differ in length")

    def gains(idx: np.ndarray) -> np.ndarray:
        out = []
        for i in range(len(evaluations)):
            rows = idx[source[idx] == i]
            rows = rows[~np.isnan(y[rows])]
            out.append(auroc(y[rows], augmented[rows]) - auroc(y[rows], real[rows]))
        return np.asarray(out, float)

    def mean_gain(idx: np.ndarray) -> float:
        values = gains(idx)
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else math.nan

    per_evaluation = gains(np.arange(len(y)))
    low, high = bootstrap_ci(mean_gain, len(y), patients, bootstrap or BootstrapConfig())
    return {
        "gain": mean_gain(np.arange(len(y))),
        "ci": [low, high],
        "per_evaluation": [float(g) for g in per_evaluation],
        "evaluations": len(evaluations),
        "records": int((~np.isnan(y)).sum()),
        "positives": int(np.nansum(y)),
        "excludes_zero": bool(low > 0 or high < 0),
    }


# ---------------------------------------------------------------------- the run


def _embed(expert: Any, records: list[ECGRecord], batch_size: int) -> np.ndarray:
    with torch.no_grad():
        chunks = [expert.embed(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    return torch.cat(chunks).float().cpu().numpy()


def _windows(model: GenerativeModel, records: list[ECGRecord], batch_size: int) -> np.ndarray:
    """Real records as the model sees them, in mV: ``(n, leads, length)``."""
    chunks = [model.prepare(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    return np.concatenate([np.asarray(c) for c in chunks]) * model.spec.signal_scale


def _as_records(signals: np.ndarray, model: GenerativeModel, prefix: str) -> list[ECGRecord]:
    spec = model.spec
    return [
        ECGRecord(signal=s.astype(np.float32), fs=spec.fs, leads=tuple(spec.leads), record_id=f"{prefix}:{i}")
        for i, s in enumerate(signals)
    ]


def _summary_figure(freqs, real_psd, syn_psd, rates, widths, leads, path: Path) -> None:
    """Heart-rate and QRS-width histograms (``rates``/``widths``: (real, synthetic)) and the first leads' spectra."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    panels = (
        (rates, np.linspace(30, 180, 31), "heart rate (bpm, xqrs)", "Heart rate"),
        (widths, np.linspace(40, 200, 17), "QRS width (ms, slope envelope)", "QRS width"),
    )
    for ax, ((real, synthetic), bins, xlabel, title) in zip(axes, panels):
        for values, name in ((real, "real test"), (synthetic, "synthetic")):
            if np.isfinite(values).any():  # an empty histogram has no density
                # Clipped into the axis range: out-of-range values show in the end bins, not as an empty plot.
                shown = np.clip(values[np.isfinite(values)], bins[0], bins[-1])
                ax.hist(shown, bins=bins, alpha=0.6, density=True, label=name)
        ax.set(xlabel=xlabel, ylabel="density", title=title)
        ax.legend()
    for i, lead in enumerate(leads[:3]):
        axes[2].plot(freqs, real_psd[i], color=f"C{i}", label=f"{lead} real")
        axes[2].plot(freqs, syn_psd[i], color=f"C{i}", linestyle="--", label=f"{lead} synthetic")
    axes[2].set(xlabel="Hz", ylabel="log10 PSD (mV²/Hz)", title="Spectra (first leads)")
    axes[2].legend(fontsize=7)
    save_figure(fig, path)


def evaluate_samples(config: SampleEvaluationConfig) -> dict[str, Any]:
    """Run the evaluation described in the module docstring; returns the JSON written to ``evaluation.json``."""
    from enecg.experts.expert import load_expert

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_generative(config.model)  # any registered kind (diffusion, beat)
    spec = model.spec
    parts, meta = load_dataset_dir(config.data)
    for name in (*config.train_parts, config.test_part):
        if name not in parts:
            raise ValueError(f"{config.data}: no part {name!r}; parts: {sorted(parts)}")
    refuse_synthetic(parts[config.test_part]["source"], f"{config.data}/{config.test_part}")
    task = meta.task(spec.task)
    train_rows = [
        r
        for part in config.train_parts
        for r in parts[part].with_format("numpy")
        if not is_synthetic(r["source"])
    ]
    test_rows = list(parts[config.test_part].with_format("numpy"))
    y_train = label_matrix([r[task.name] for r in train_rows], task)
    y_test = label_matrix(label_arrays(test_rows, [task])[task.name].tolist(), task)
    labelled = np.flatnonzero(~np.isnan(y_train).all(1))
    n_syn = config.n_synthetic or len(labelled)
    pick = labelled[np.arange(n_syn) % len(labelled)]
    ages = np.asarray([train_rows[i]["age"] for i in pick], np.float32)
    sexes = np.asarray([train_rows[i]["sex"] for i in pick], np.float32)
    logger.info("sampling %d synthetic records (conditions of the real training records)", n_syn)
    synthetic = model.sample_conditions(
        y_train[pick],
        n_syn,
        ages=ages if spec.use_age_sex else None,
        sexes=sexes if spec.use_age_sex else None,
        seed=config.seed,
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        batch_size=config.batch_size,
    )
    expert = load_expert(config.expert)
    # Real records go through the model's own window (rate, leads, length) first, so the expert sees real and
    # synthetic records cut and padded alike: the distances measure content, not record length.
    real_train_signals = _windows(model, [row_to_record(r) for r in train_rows], config.batch_size)
    real_test_signals = _windows(model, [row_to_record(r) for r in test_rows], config.batch_size)
    real_train = _as_records(real_train_signals, model, "real-train")
    real_test = _as_records(real_test_signals, model, "real-test")
    e_syn = _embed(expert, _as_records(synthetic, model, "synthetic"), config.batch_size)
    e_train = _embed(expert, real_train, config.batch_size)
    e_test = _embed(expert, real_test, config.batch_size)
    fd_syn = frechet_distance(e_syn, e_test)
    # The floor uses as many real training records as there are synthetic ones (FD shrinks with sample size).
    floor_idx = np.arange(min(n_syn, len(e_train)))
    fd_floor = frechet_distance(e_train[floor_idx], e_test)

    lead = spec.leads.index("II") if "II" in spec.leads else 0
    peaks_real, peaks_syn = r_peaks(real_test_signals, spec.fs, lead), r_peaks(synthetic, spec.fs, lead)
    hr_real = heart_rates(real_test_signals, spec.fs, lead, peaks_real)
    hr_syn = heart_rates(synthetic, spec.fs, lead, peaks_syn)
    qrs_real = qrs_widths(real_test_signals, spec.fs, lead, peaks_real)
    qrs_syn = qrs_widths(synthetic, spec.fs, lead, peaks_syn)
    freqs, psd_real = lead_spectra(real_test_signals, spec.fs)
    _, psd_syn = lead_spectra(synthetic, spec.fs)

    tstr = probe_auroc(task, e_syn, y_train[pick], e_test, y_test)
    trtr_predicted = probe_predictions(task, e_train[labelled], y_train[labelled], e_test)
    trtr = probe_auroc(task, e_train[labelled], y_train[labelled], e_test, y_test, trtr_predicted)
    patients = [str(r["patient_id"]) for r in test_rows]
    augmentation = {}
    for k, label in enumerate(config.augment_labels):
        extra = model.sample(
            [label],
            config.augment_n,
            seed=config.seed + 2000 + k,
            steps=config.steps,
            guidance_scale=config.guidance_scale,
        )
        e_extra = _embed(expert, _as_records(extra, model, f"synthetic-{label}"), config.batch_size)
        y_extra = np.tile(np.asarray(model.label_vector([label])), (len(extra), 1))
        x_augmented = np.concatenate([e_train[labelled], e_extra])
        y_augmented = np.concatenate([y_train[labelled], y_extra])
        augmented_predicted = probe_predictions(task, x_augmented, y_augmented, e_test)
        augmented = probe_auroc(task, x_augmented, y_augmented, e_test, y_test, augmented_predicted)
        j = spec.label_names.index(label)
        # The per-record scores of both probes travel with the result: pooled over fold groups they give the
        # paired CI of the gain (augmentation_gain); here, the CI of this evaluation alone.
        paired = {
            "y": y_test[:, j].tolist(),
            "real": trtr_predicted[:, j].tolist(),
            "augmented": augmented_predicted[:, j].tolist(),
            "patients": patients,
        }
        gain = augmentation_gain([paired], config.bootstrap)
        augmentation[label] = {
            "n_synthetic": len(extra),
            "auroc_real": trtr["per_label"][label],
            "auroc_real_plus_synthetic": augmented["per_label"][label],
            "delta": augmented["per_label"][label] - trtr["per_label"][label],
            "delta_ci": gain["ci"],
            "test_records": gain["records"],
            "test_positives": gain["positives"],
            "paired_scores": paired,
        }

    renderings = []
    for k, label in enumerate(spec.label_names):
        signals = model.sample([label], config.n_per_label, seed=config.seed + 1000 + k, steps=config.steps)
        for j, signal in enumerate(signals):
            path = plot_ecg_12lead(
                signal, spec.fs, spec.leads, f"synthetic {label} #{j}", out / f"sample_{label}_{j}.png"
            )
            renderings.append(path.name)
    _summary_figure(
        freqs, psd_real, psd_syn, (hr_real, hr_syn), (qrs_real, qrs_syn), spec.leads, out / "summary.png"
    )

    summary = {
        "frechet_distance": fd_syn,
        "frechet_floor_real_vs_real": fd_floor,
        "frechet_ratio": fd_syn / fd_floor if fd_floor > 0 else math.inf,
        "tstr_macro_auroc": tstr["macro"],
        "trtr_macro_auroc": trtr["macro"],
        "tstr_over_trtr": tstr["macro"] / trtr["macro"] if trtr["macro"] else math.nan,
        "heart_rate_wasserstein_bpm": wasserstein(hr_real, hr_syn),
        "qrs_width_wasserstein_ms": wasserstein(qrs_real, qrs_syn),
    }
    result = {
        "summary": summary,
        "sizes": {
            "synthetic": int(n_syn),
            "real_train_labelled": len(labelled),
            "real_test": len(test_rows),
        },
        "expert": config.expert,
        "embedding_dim": int(e_test.shape[1]),
        "heart_rate": {"real_test": distribution_summary(hr_real), "synthetic": distribution_summary(hr_syn)},
        "qrs_width_ms": {
            "real_test": distribution_summary(qrs_real),
            "synthetic": distribution_summary(qrs_syn),
            "method": f"wfdb xqrs R peaks; all-lead slope envelope >= {QRS_THRESHOLD:g} x its peak; median/beat",
        },
        "spectra_mean_abs_log10_difference": {
            lead_name: float(np.abs(psd_real[i] - psd_syn[i]).mean())
            for i, lead_name in enumerate(spec.leads)
        },
        "tstr": tstr,
        "trtr": trtr,
        "figures": ["summary.png", *renderings],
        "augmentation": augmentation,
        "config": asdict(config),
    }
    (out / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    folder = Path(config.model)
    if (folder / METRICS_FILE).is_file():  # a local model folder: its card reports the evaluation
        metrics = json.loads((folder / METRICS_FILE).read_text())
        metrics["evaluation"] = summary | {"dataset": config.data, "expert": config.expert}
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
        (folder / CARD_FILE).write_text(model.card(metrics))
    return result
