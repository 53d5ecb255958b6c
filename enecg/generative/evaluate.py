"""How good are generated records? ``enecg generate evaluate`` (:func:`evaluate_samples`).

Synthetic records are drawn with the conditions (labels, age, sex) of the real labelled training records, then
compared with the real *test* part (which is refused if it holds any synthetic row):

* **Fréchet distance** between Gaussian fits of a frozen expert's embeddings (any enecg expert), synthetic vs
  real test, next to the real-vs-real floor (real train vs real test, the same sizes): ``ratio`` = synthetic / floor
  (1 = as close as another real sample);
* **heart rate** distributions (``wfdb.processing.xqrs_detect`` on lead II, or the first lead), real test vs
  synthetic, and their Wasserstein distance;
* **per-lead spectra** (Welch) and the mean absolute log-spectral difference per lead;
* **TSTR vs TRTR**: a logistic-regression probe on the expert embeddings (the evaluation's own
  :class:`~enecg.evaluation.baselines.LinearProbe`) trained on synthetic / on real training records, both tested on
  the real test part; macro AUROC and ``tstr_over_trtr``;
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
from enecg.evaluation.metrics import auroc
from enecg.evaluation.plots import plot_ecg_12lead, save_figure
from enecg.generative.model import CARD_FILE, METRICS_FILE, ECGDiffusion, load_diffusion, model_card
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


# ---------------------------------------------------------------------- measures


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


def heart_rates(signals: np.ndarray, fs: float, lead: int) -> np.ndarray:
    """Beats per minute per record from ``xqrs_detect`` on one lead (NaN with fewer than two beats)."""
    from wfdb.processing import xqrs_detect

    rates = []
    for signal in signals:
        try:
            peaks = xqrs_detect(np.asarray(signal[lead], np.float64), fs=fs, verbose=False)
        except Exception:  # a flat or broken synthetic trace: no heart rate, not a crash
            peaks = np.zeros(0)
        rr = np.diff(np.sort(peaks)) / fs
        rates.append(60.0 / float(np.median(rr)) if rr.size else math.nan)
    return np.asarray(rates)


def lead_spectra(signals: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and the mean log10 power spectral density per lead ``(leads, freqs)`` (Welch)."""
    from scipy.signal import welch

    freqs, psd = welch(signals, fs=fs, nperseg=min(256, signals.shape[-1]), axis=-1)
    return freqs, np.log10(psd.mean(axis=0) + 1e-12)


def probe_auroc(
    task: TaskInfo, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """Per-label and macro AUROC of a logistic probe fitted on ``(x_train, y_train)`` and scored on the test set.
    ``y`` are multi-hot ``(n, K)`` (NaN = missing); a multiclass task is fitted on class indices."""
    if task.type == "multiclass":
        fit_y = np.where(np.isnan(y_train).all(1), np.nan, np.nanargmax(np.nan_to_num(y_train, nan=-1), 1))
    else:
        fit_y = y_train
    predicted = np.asarray(LinearProbe(task).fit(x_train, fit_y).predict(x_test)).reshape(len(x_test), -1)
    per_label = {}
    for k, name in enumerate(task.names):
        known = ~np.isnan(y_test[:, k])
        per_label[name] = auroc(y_test[known, k], predicted[known, k]) if known.any() else math.nan
    defined = [v for v in per_label.values() if not math.isnan(v)]
    return {"per_label": per_label, "macro": float(np.mean(defined)) if defined else math.nan}


# ---------------------------------------------------------------------- the run


def _embed(expert: Any, records: list[ECGRecord], batch_size: int) -> np.ndarray:
    with torch.no_grad():
        chunks = [expert.embed(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    return torch.cat(chunks).float().cpu().numpy()


def _windows(model: ECGDiffusion, records: list[ECGRecord], batch_size: int) -> np.ndarray:
    """Real records as the model sees them, in mV: ``(n, leads, length)``."""
    chunks = [model.prepare(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]
    return (torch.cat(chunks) * model.spec.signal_scale).numpy()


def _as_records(signals: np.ndarray, model: ECGDiffusion, prefix: str) -> list[ECGRecord]:
    spec = model.spec
    return [
        ECGRecord(signal=s.astype(np.float32), fs=spec.fs, leads=tuple(spec.leads), record_id=f"{prefix}:{i}")
        for i, s in enumerate(signals)
    ]


def _summary_figure(freqs, real_psd, syn_psd, real_hr, syn_hr, leads, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.linspace(30, 180, 31)
    axes[0].hist(real_hr[~np.isnan(real_hr)], bins=bins, alpha=0.6, density=True, label="real test")
    axes[0].hist(syn_hr[~np.isnan(syn_hr)], bins=bins, alpha=0.6, density=True, label="synthetic")
    axes[0].set(xlabel="heart rate (bpm, xqrs)", ylabel="density", title="Heart rate")
    axes[0].legend()
    for i, lead in enumerate(leads[:3]):
        axes[1].plot(freqs, real_psd[i], color=f"C{i}", label=f"{lead} real")
        axes[1].plot(freqs, syn_psd[i], color=f"C{i}", linestyle="--", label=f"{lead} synthetic")
    axes[1].set(xlabel="Hz", ylabel="log10 PSD (mV²/Hz)", title="Spectra (first leads)")
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def evaluate_samples(config: SampleEvaluationConfig) -> dict[str, Any]:
    """Run the evaluation described in the module docstring; returns the JSON written to ``evaluation.json``."""
    from enecg.experts.expert import load_expert

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_diffusion(config.model)
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
    hr_real, hr_syn = heart_rates(real_test_signals, spec.fs, lead), heart_rates(synthetic, spec.fs, lead)
    freqs, psd_real = lead_spectra(real_test_signals, spec.fs)
    _, psd_syn = lead_spectra(synthetic, spec.fs)
    from scipy.stats import wasserstein_distance

    def hr_stats(rates: np.ndarray) -> dict[str, float]:
        ok = rates[~np.isnan(rates)]
        return {
            "detected": float(ok.size / max(rates.size, 1)),
            "mean": float(ok.mean()) if ok.size else math.nan,
            "std": float(ok.std()) if ok.size else math.nan,
            "q10_q50_q90": [float(q) for q in np.percentile(ok, [10, 50, 90])] if ok.size else [],
        }

    both = (~np.isnan(hr_real).all()) and (~np.isnan(hr_syn).all())
    tstr = probe_auroc(task, e_syn, y_train[pick], e_test, y_test)
    trtr = probe_auroc(task, e_train[labelled], y_train[labelled], e_test, y_test)
    augmentation = {}
    for k, label in enumerate(config.augment_labels):
        extra = model.sample([label], config.augment_n, seed=config.seed + 2000 + k, steps=config.steps)
        e_extra = _embed(expert, _as_records(extra, model, f"synthetic-{label}"), config.batch_size)
        y_extra = np.tile(model.label_vector([label]).numpy(), (len(extra), 1))
        augmented = probe_auroc(
            task,
            np.concatenate([e_train[labelled], e_extra]),
            np.concatenate([y_train[labelled], y_extra]),
            e_test,
            y_test,
        )
        augmentation[label] = {
            "n_synthetic": len(extra),
            "auroc_real": trtr["per_label"][label],
            "auroc_real_plus_synthetic": augmented["per_label"][label],
            "delta": augmented["per_label"][label] - trtr["per_label"][label],
        }

    renderings = []
    for k, label in enumerate(spec.label_names):
        signals = model.sample([label], config.n_per_label, seed=config.seed + 1000 + k, steps=config.steps)
        for j, signal in enumerate(signals):
            path = plot_ecg_12lead(
                signal, spec.fs, spec.leads, f"synthetic {label} #{j}", out / f"sample_{label}_{j}.png"
            )
            renderings.append(path.name)
    _summary_figure(freqs, psd_real, psd_syn, hr_real, hr_syn, spec.leads, out / "summary.png")

    summary = {
        "frechet_distance": fd_syn,
        "frechet_floor_real_vs_real": fd_floor,
        "frechet_ratio": fd_syn / fd_floor if fd_floor > 0 else math.inf,
        "tstr_macro_auroc": tstr["macro"],
        "trtr_macro_auroc": trtr["macro"],
        "tstr_over_trtr": tstr["macro"] / trtr["macro"] if trtr["macro"] else math.nan,
        "heart_rate_wasserstein_bpm": float(
            wasserstein_distance(hr_real[~np.isnan(hr_real)], hr_syn[~np.isnan(hr_syn)])
        )
        if both
        else math.nan,
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
        "heart_rate": {"real_test": hr_stats(hr_real), "synthetic": hr_stats(hr_syn)},
        "spectra_mean_abs_log10_difference": {
            lead_name: float(np.abs(psd_real[i] - psd_syn[i]).mean())
            for i, lead_name in enumerate(spec.leads)
        },
        "tstr": tstr,
        "trtr": trtr,
        "figures": ["summary.png", *renderings],
        "augmentation": augmentation,
        "not_measured": ["QRS-width distributions", "paired CI of the augmentation delta"],
        "config": asdict(config),
    }
    (out / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    folder = Path(config.model)
    if (folder / METRICS_FILE).is_file():  # a local model folder: its card reports the evaluation
        metrics = json.loads((folder / METRICS_FILE).read_text())
        metrics["evaluation"] = summary | {"dataset": config.data, "expert": config.expert}
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
        (folder / CARD_FILE).write_text(model_card(spec, metrics))
    return result
