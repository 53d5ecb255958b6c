"""A beat-template generative model of multi-lead ECG (generative model kind ``beat``): fits in seconds on a CPU.

**Fit** (:func:`train_beat`, training parts only). Each real record is reduced to a feature vector
(:func:`beat_features`): R peaks (wfdb's ``xqrs_detect`` on lead II, refined to the multi-lead QRS energy peak),
the median beat of every lead in a window around R (``pre_s`` .. ``post_s``, after a 0.5 Hz high-pass), and six
scalars: log mean RR, log RR coefficient of variation, log RMSSD / mean RR (successive differences: irregular
rhythms have RMSSD ~ sqrt(2) x SD, regular ones far less), log noise level (robust SD of the sample-to-sample
differences of the beats around the median beat, outside the QRS), log baseline-wander level (SD of the < 0.5 Hz
part) and log SD of the beats' gains on the median beat. A record where fewer than three R peaks (two
whole beats) are found is skipped and counted (``metrics.json``: ``skipped_no_beats``).

The beats go through a PCA (scikit-learn) to ``components`` dimensions, whitened; with the standardised scalars they
make the latent vector ``z``. The conditional model is a Gaussian linear model (conditional probabilistic PCA): a
ridge regression from the condition vector (multi-hot labels, and centred age / sex with missing-flags) to the mean
of ``z``, and the residual around it as one Gaussian (Ledoit-Wolf shrinkage) or, with ``mixture_components`` > 1,
a Gaussian mixture (scikit-learn; beat shapes are multimodal, e.g. the QRS polarity of a lead). Unconditioned
sampling uses the same kind of fit of ``z`` over all training records.

**Sample** (:meth:`BeatModel.sample_conditions`). Condition -> ``z`` -> median beat + rhythm scalars -> a record:
an RR sequence (log-normal intervals with the drawn mean and CV; an AR(1) correlation set from the ratio of RMSSD to
SD, so AFIB-like scalars give independent, irregular intervals), beats placed on it and joined by overlap-add (each
beat owns the span from shortly before its R to shortly before the next beat's, with 40 ms linear cross-fades),
each beat scaled by a random gain (the drawn gain SD), baseline wander (a few slow sinusoids per lead) and white
noise at the drawn levels. Record ``i`` of a call uses
the random stream ``(seed, i)``: the same seed gives the same records whatever the batch.
``guidance_scale`` s moves the latent mean to ``mu_uncond + s * (mu_cond - mu_uncond)`` (1: the fitted model).

**Anomaly score** (:meth:`BeatModel.anomaly_scores`): minus the log-likelihood of a record's standardised feature
vector under a probabilistic PCA (scikit-learn ``PCA.score_samples``) fitted on the training records labelled
``normal_label`` (NORM) only: far from normal beats / rhythm = high score.

A saved model is a Hub-ready folder: ``model.safetensors`` (the arrays), ``config.json`` (:class:`BeatSpec`, with
``kind: beat``), ``metrics.json`` and ``README.md``; :func:`enecg.generative.base.load_generative` reads it from a
folder or a Hub ID.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file

from enecg.contract import InputContract, apply_contract_array
from enecg.data.schema import EVALUATION_PARTS
from enecg.generative.base import card_text, multi_hot, register_generative
from enecg.generative.evaluate import r_peaks
from enecg.generative.model import CARD_FILE, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from enecg.generative.train import read_training_rows, rows_to_arrays
from enecg.record import ECGRecord
from enecg.utils.config import ConfigMixin
from enecg.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

BEAT_MODEL_TYPE = "enecg-ecg-beat"
RHYTHM_FEATURES = ("log_rr_s", "log_rr_cv", "log_rmssd_ratio", "log_noise_mv", "log_wander_mv", "log_gain_sd")
# Floors inside the logs: a perfectly regular or noiseless record stays finite (and near the real minimum).
_RR_FLOOR, _LEVEL_FLOOR = 0.005, 1e-3
HIGHPASS_HZ = 0.5
REFINE_S = 0.05  # R peaks move to the multi-lead QRS energy maximum within this reach
CROSSFADE_S = 0.04
REFRACTORY_S = 0.25  # two QRS complexes are never closer than this
T_WAVE_S, T_WAVE_RATIO = 0.45, 4.0  # a detection this close to a peak this many times stronger is its T wave
QRS_HALF_S = 0.08  # samples within this of R are left out of the noise estimate
# How much of an RR interval at most belongs to the next beat's P wave side when beats are joined.
NEXT_BEAT_SHARE = 0.4
# A score for a record without beats to measure: more anomalous than any measured one.
NO_BEATS_SCORE = 1e6


# ---------------------------------------------------------------------- configs


@dataclass
class BeatSpec(ConfigMixin):
    """Everything that rebuilds a saved beat model (``config.json``); set by training from the data."""

    config_name: ClassVar[str] = "beat model config.json"

    task: str = field(metadata={"help": "Label set (task column) the model is conditioned on."})
    task_type: str = field(metadata={"help": "multilabel | multiclass"})
    label_names: list[str] = field(metadata={"help": "Labels of the task, in condition-vector order."})
    leads: list[str] = field(metadata={"help": "Leads generated, in channel order."})
    fs: float = field(metadata={"help": "Sampling rate of generated records, Hz."})
    length: int = field(metadata={"help": "Samples per generated record."})
    use_age_sex: bool = field(default=True, metadata={"help": "Age and sex are part of the condition."})
    pre_s: float = field(default=0.25, metadata={"help": "Beat window start, seconds before R."})
    post_s: float = field(default=0.45, metadata={"help": "Beat window end, seconds after R."})
    components: int = field(default=24, metadata={"help": "PCA dimensions of the median beats."})
    anomaly_components: int = field(default=32, metadata={"help": "PCA dimensions of the anomaly model."})
    normal_label: str | None = field(
        default="NORM", metadata={"help": "Label whose records fit the anomaly model (null: no anomaly model)."}
    )
    age_mean: float = field(default=60.0, metadata={"help": "Mean training age (centres the condition)."})
    signal_scale: float = field(default=1.0, metadata={"help": "mV per unit of prepare() (always 1)."})
    source: str = field(default="", metadata={"help": "Dataset the model was fitted on (for the card)."})
    kind: str = field(default="beat", metadata={"help": "Generative model kind (enecg.generative.base)."})
    model_type: str = field(default=BEAT_MODEL_TYPE, metadata={"help": "Marks an enecg beat model."})

    def __post_init__(self) -> None:
        if self.model_type != BEAT_MODEL_TYPE or self.kind != "beat":
            raise ValueError(f"not an enecg beat model (kind {self.kind!r}, model_type {self.model_type!r})")
        if self.task_type not in ("multilabel", "multiclass"):
            raise ValueError(
                f"task {self.task!r} is {self.task_type}; a generative model needs labels (multilabel or multiclass)"
            )
        if self.pre_s <= 0 or self.post_s <= 0 or self.components < 1:
            raise ValueError("pre_s and post_s must be > 0 and components >= 1")

    @property
    def window(self) -> tuple[int, int]:
        """Samples before and after R in a beat."""
        return round(self.pre_s * self.fs), round(self.post_s * self.fs)

    @property
    def condition_dim(self) -> int:
        return len(self.label_names) + (4 if self.use_age_sex else 0)

    def contract(self) -> InputContract:
        """How a real record is brought to the model's rate, leads and length (first window, zero-padded)."""
        return InputContract(fs=self.fs, leads=tuple(self.leads), length=self.length)


@dataclass
class BeatConfig(ConfigMixin):
    """A beat-model fit (``enecg generate train`` with ``kind: beat``; ``recipes/generate_beat_ptbxl.yaml``)."""

    config_name: ClassVar[str] = "beat recipe"

    data: str = field(metadata={"help": "A prepared enecg dataset folder (enecg data prepare ...)."})
    task: str = field(metadata={"help": "Label set to condition on (a multilabel or multiclass task)."})
    output_dir: str = field(metadata={"help": "Folder the Hub-ready model is written to."})
    parts: tuple[str, ...] = field(
        default=("train",), metadata={"help": "Training parts to read; validation/test are refused."}
    )
    fs: float | None = field(default=None, metadata={"help": "Rate of generated records, Hz (null: the data's)."})
    leads: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Leads to generate (null: the leads of the data's first record)."}
    )
    seconds: float = field(default=10.0, metadata={"help": "Duration of generated records, seconds."})
    use_age_sex: bool = field(default=True, metadata={"help": "Condition on age and sex as well."})
    pre_s: float = field(default=0.25, metadata={"help": "Beat window start, seconds before R."})
    post_s: float = field(default=0.45, metadata={"help": "Beat window end, seconds after R."})
    components: int = field(default=24, metadata={"help": "PCA dimensions of the median beats."})
    ridge_alpha: float = field(default=1.0, metadata={"help": "Ridge penalty of condition -> latent mean."})
    mixture_components: int = field(
        default=8,
        metadata={
            "help": "Gaussian-mixture components of the residual around the conditional mean (1: Gaussian; a "
            "single Gaussian as well when there are fewer than 4 records per component)."
        },
    )
    anomaly_components: int = field(default=32, metadata={"help": "PCA dimensions of the anomaly model."})
    normal_label: str | None = field(
        default="NORM", metadata={"help": "Label of the records fitting the anomaly model (null: none)."}
    )
    max_records: int | None = field(default=None, metadata={"help": "Use only the first N records; null: all."})
    seed: int = field(default=0, metadata={"help": "Seed of the PCA solver."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a model already in output_dir."})

    def __post_init__(self) -> None:
        self.parts = tuple(self.parts)
        if self.leads is not None:
            self.leads = tuple(self.leads)
        refused = [p for p in self.parts if p in EVALUATION_PARTS]
        if refused:
            raise ValueError(f"parts {refused}: a generative model trains on training parts only")
        if self.seconds <= 0 or self.components < 1 or self.anomaly_components < 1:
            raise ValueError("seconds must be > 0, components and anomaly_components >= 1")


# ---------------------------------------------------------------------- features


def _filter(signal: np.ndarray, fs: float, kind: str, hz: float = HIGHPASS_HZ) -> np.ndarray:
    from scipy.signal import butter, sosfiltfilt

    sos = butter(2, hz / (fs / 2), btype=kind, output="sos")
    return sosfiltfilt(sos, signal, axis=-1)


@dataclass
class BeatFeatures:
    """One record's median beat ``(leads, window)`` in mV and its rhythm scalars (:data:`RHYTHM_FEATURES`)."""

    beat: np.ndarray
    rhythm: np.ndarray


def beat_features(
    signal: np.ndarray, fs: float, lead: int, pre: int, post: int, peaks: np.ndarray | None = None
) -> BeatFeatures | None:
    """The features of one record ``(leads, T)`` in mV (module docstring); None when fewer than three R peaks
    or two whole beats are found. ``peaks``: R peaks already detected on ``lead``."""
    signal = np.asarray(signal, np.float64)
    if peaks is None:
        peaks = r_peaks(signal[None], fs, lead)[0]
    if len(peaks) < 3:
        return None
    filtered = _filter(signal, fs, "highpass")
    # Slope energy over all leads: high through the QRS, low on the slower P and T waves.
    # Smoothed over ~50 ms: at 100 Hz a single sample's slope depends on the sampling phase.
    slope = np.pad((np.diff(filtered, axis=1) ** 2).sum(axis=0), (0, 1))
    width = max(1, round(0.05 * fs))
    energy = np.convolve(slope, np.ones(width) / width, mode="same")
    reach = max(1, round(REFINE_S * fs))
    refined = []
    for p in peaks:
        lo, hi = max(0, p - reach), min(len(energy), p + reach + 1)
        refined.append(lo + int(np.argmax(energy[lo:hi])))
    refined = _clean_peaks(np.unique(refined), energy, fs)
    whole = [p for p in refined if p - pre >= 0 and p + post <= signal.shape[1]]
    if len(refined) < 3 or len(whole) < 2:
        return None
    beats = np.stack([filtered[:, p - pre : p + post] for p in whole])  # (B, leads, W)
    beat = np.median(beats, axis=0)
    # Noise: the robust SD of the beats' sample-to-sample differences around the median beat (/ sqrt 2: white
    # noise doubles its variance when differenced), outside the QRS: slow beat-to-beat changes and small
    # misalignments of steep QRS edges are not noise.
    steps = np.diff(beats - beat, axis=2)
    qrs = (np.arange(pre + post - 1) >= pre - round(QRS_HALF_S * fs)) & (
        np.arange(pre + post - 1) < pre + round(QRS_HALF_S * fs)
    )
    steps = steps[:, :, ~qrs]
    noise = float(np.median(1.4826 * np.median(np.abs(steps), axis=(0, 2))) / math.sqrt(2))
    wander = float(np.mean(np.std(signal - filtered, axis=1)))
    # Beat-to-beat amplitude variation (respiration, electrode contact): SD of each beat's least-squares gain on
    # the median beat.
    gains = (beats * beat).sum(axis=(1, 2)) / max(float((beat**2).sum()), 1e-9)
    gain_sd = float(np.std(gains))
    rr = np.diff(refined) / fs
    mean_rr = float(rr.mean())
    cv = float(rr.std() / mean_rr)
    rmssd = float(np.sqrt(np.mean(np.diff(rr) ** 2)) / mean_rr) if len(rr) > 1 else 0.0
    rhythm = np.log(
        [mean_rr, cv + _RR_FLOOR, rmssd + _RR_FLOOR, noise + _LEVEL_FLOOR, wander + _LEVEL_FLOOR, gain_sd + _RR_FLOOR]
    )
    return BeatFeatures(beat=beat.astype(np.float32), rhythm=rhythm.astype(np.float32))


def _clean_peaks(peaks: np.ndarray, energy: np.ndarray, fs: float) -> np.ndarray:
    """Drop detections that are not QRS complexes: xqrs on one lead at 100 Hz also fires on tall T waves, which
    made real records look irregular (median RR CV 0.17 on PTB-XL-500) and their beats variable. Going from the
    strongest peak (multi-lead slope energy) down, a peak is dropped when a kept one lies within
    :data:`REFRACTORY_S`, or within :data:`T_WAVE_S` and :data:`T_WAVE_RATIO` x stronger (a T wave after its QRS).
    The comparison is local: a quiet stretch of a record keeps its beats."""
    kept: list[int] = []
    for p in peaks[np.argsort(-energy[peaks], kind="stable")]:
        near = [q for q in kept if abs(p - q) < T_WAVE_S * fs]
        if any(abs(p - q) < REFRACTORY_S * fs or energy[q] > T_WAVE_RATIO * energy[p] for q in near):
            continue
        kept.append(int(p))
    return np.asarray(sorted(kept), dtype=int)


def _lead_index(leads: list[str]) -> int:
    return leads.index("II") if "II" in leads else 0


# ---------------------------------------------------------------------- the model


def _pca(x: np.ndarray, components: int, seed: int) -> Any:
    from sklearn.decomposition import PCA

    k = max(1, min(components, x.shape[0] - 1, x.shape[1]))
    return PCA(n_components=k, svd_solver="full", random_state=seed).fit(x)


def ppca_log_likelihood(x: np.ndarray, arrays: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """Per-row log-likelihood under a probabilistic PCA saved as arrays (``<prefix>mean``, ``components``,
    ``variance`` and ``noise``): the value of scikit-learn's ``PCA.score_samples``, from the saved arrays."""
    centred = np.asarray(x, np.float64) - arrays[prefix + "mean"]
    w = arrays[prefix + "components"].astype(np.float64)
    variance = arrays[prefix + "variance"].astype(np.float64)
    noise = float(arrays[prefix + "noise"][0])
    d = centred.shape[1]
    projected = centred @ w.T
    # Covariance W^T diag(variance - noise) W + noise I: eigenvalue variance_j along component j, noise elsewhere.
    mahalanobis = (projected**2 / variance).sum(1) + ((centred**2).sum(1) - (projected**2).sum(1)) / noise
    log_det = np.log(variance).sum() + (d - len(variance)) * math.log(noise)
    return -0.5 * (d * math.log(2 * math.pi) + log_det + mahalanobis)


@register_generative
class BeatModel:
    """The fitted beat-template model: a :class:`BeatSpec` and its arrays (see the module docstring)."""

    kind = "beat"

    def __init__(self, spec: BeatSpec, arrays: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.name = "beat-model"

    # ------------------------------------------------------------------ condition
    def label_vector(self, labels: list[str] | tuple[str, ...]) -> np.ndarray:
        """Multi-hot ``(K,)`` for label names; an unknown one is a one-line ValueError."""
        return multi_hot(self.spec.label_names, self.spec.task, labels)

    def condition(self, labels: np.ndarray, ages: np.ndarray | None, sexes: np.ndarray | None) -> np.ndarray:
        """Condition vectors ``(n, condition_dim)``: labels (NaN read as 0), then centred age (decades) and sex
        (+-0.5) with missing-flags (missing: 0 + flag)."""
        labels = np.nan_to_num(np.asarray(labels, np.float64))
        if not self.spec.use_age_sex:
            return labels
        n = len(labels)
        ages = np.full(n, np.nan) if ages is None else np.asarray(ages, np.float64).reshape(n)
        sexes = np.full(n, np.nan) if sexes is None else np.asarray(sexes, np.float64).reshape(n)
        extra = np.stack(
            [
                np.nan_to_num((ages - self.spec.age_mean) / 10.0),
                np.nan_to_num(sexes - 0.5),
                np.isnan(ages).astype(float),
                np.isnan(sexes).astype(float),
            ],
            axis=1,
        )
        return np.concatenate([labels, extra], axis=1)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        labels: list[str] | tuple[str, ...] | None,
        n: int,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        age: float | None = None,
        sex: float | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """``n`` records ``(n, leads, length)`` in mV with these labels (None: unconditioned); deterministic for a
        seed. ``steps`` is accepted for the diffusion kind's signature and unused."""
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {n}")
        vectors = None if labels is None else np.tile(self.label_vector(labels), (n, 1))
        return self.sample_conditions(
            vectors,
            n,
            ages=None if age is None else np.full(n, float(age)),
            sexes=None if sex is None else np.full(n, float(sex)),
            seed=seed,
            guidance_scale=guidance_scale,
        )

    def sample_conditions(
        self,
        labels: np.ndarray | None,
        n: int,
        *,
        ages: np.ndarray | None = None,
        sexes: np.ndarray | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        batch_size: int = 64,
    ) -> np.ndarray:
        """``n`` records, record ``i`` conditioned on row ``i`` of ``labels`` ``(n, K)`` (None: unconditioned)
        and of ``ages``/``sexes`` (NaN or None: unknown). Returns mV ``(n, leads, length)``. ``steps`` and
        ``batch_size`` are the diffusion kind's options, unused here."""
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {n}")
        a = self.arrays
        if labels is None:
            means, mixture = np.zeros((n, a["coef"].shape[0])), "marginal"
        else:
            condition = self.condition(np.asarray(labels)[:n], ages, sexes)
            conditional = condition @ a["coef"].T + a["intercept"]
            # The mean of the residual mixture is ~0: the conditional mean, moved by the guidance scale.
            unconditional = (a["marginal_weights"] @ a["marginal_means"]) - (a["residual_weights"] @ a["residual_means"])
            means, mixture = unconditional + guidance_scale * (conditional - unconditional), "residual"
        weights, centres, chols = a[f"{mixture}_weights"], a[f"{mixture}_means"], a[f"{mixture}_chols"]
        out = np.empty((n, len(self.spec.leads), self.spec.length), np.float32)
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            j = int(rng.choice(len(weights), p=weights / weights.sum()))
            z = means[i] + centres[j] + chols[j] @ rng.standard_normal(means.shape[1])
            out[i] = self._render(z, rng)
        return out

    def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latent vector -> median beat ``(leads, window)`` in mV and rhythm scalars (:data:`RHYTHM_FEATURES`)."""
        a, k = self.arrays, len(self.arrays["pca_scale"])
        beat = a["pca_mean"] + (z[:k] * a["pca_scale"]) @ a["pca_components"]
        rhythm = z[k:] * a["rhythm_scale"] + a["rhythm_mean"]
        return beat.reshape(len(self.spec.leads), -1), rhythm

    def _render(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        spec = self.spec
        beat, rhythm = self.decode(z)
        pre, post = spec.window
        fs, length = spec.fs, spec.length
        mean_rr = float(np.clip(np.exp(rhythm[0]), 0.3, 2.0))
        cv = float(np.clip(np.exp(rhythm[1]) - _RR_FLOOR, 0.0, 0.35))
        rmssd = float(np.clip(np.exp(rhythm[2]) - _RR_FLOOR, 0.0, 0.5))
        noise = float(np.clip(np.exp(rhythm[3]) - _LEVEL_FLOOR, 0.0, 0.5))
        wander = float(np.clip(np.exp(rhythm[4]) - _LEVEL_FLOOR, 0.0, 1.0))
        gain_sd = float(np.clip(np.exp(rhythm[5]) - _RR_FLOOR, 0.0, 0.3))
        # RR intervals: log-normal with the drawn mean and CV, AR(1)-correlated so that the RMSSD / SD ratio is
        # the drawn one (uncorrelated = sqrt(2): irregular, e.g. AFIB; highly correlated = smooth variability).
        phi = float(np.clip(1.0 - 0.5 * (rmssd / max(cv, 1e-3)) ** 2, -0.5, 0.95))
        sigma = math.sqrt(math.log1p(cv**2))
        count = math.ceil((length / fs + spec.pre_s + spec.post_s) / (0.5 * mean_rr)) + 2
        x = np.empty(count)
        x[0] = rng.standard_normal()
        for j in range(1, count):
            x[j] = phi * x[j - 1] + math.sqrt(1 - phi**2) * rng.standard_normal()
        rr = mean_rr * np.exp(sigma * x - 0.5 * sigma**2)
        start = -spec.post_s - rng.uniform(0.0, mean_rr)
        times = start + np.concatenate([[0.0], np.cumsum(rr)])
        times = times[times < length / fs + spec.pre_s]
        centres = np.round(times * fs).astype(int)
        signal = np.zeros((len(spec.leads), length))
        weight = np.zeros(length)
        offsets = np.arange(-pre, post)
        ramp = max(1, round(CROSSFADE_S * fs))
        gains = np.clip(1.0 + gain_sd * rng.standard_normal(len(centres)), 0.5, 1.5)
        for j, centre in enumerate(centres):
            # This beat owns [centre - own_pre, own_end); outside it its weight ramps down over `ramp` samples.
            before = centre - centres[j - 1] if j else pre
            own_pre = min(pre, round(NEXT_BEAT_SHARE * before))
            after = centres[j + 1] - centre if j + 1 < len(centres) else pre + post
            own_post = min(post, after - min(pre, round(NEXT_BEAT_SHARE * after)))
            w = np.clip(1.0 + np.minimum(offsets + own_pre, own_post - 1 - offsets) / ramp, 0.0, 1.0)
            at = centre + offsets
            inside = (at >= 0) & (at < length)
            signal[:, at[inside]] += gains[j] * beat[:, inside] * w[inside]
            weight[at[inside]] += w[inside]
        signal /= np.maximum(weight, 1.0)
        t = np.arange(length) / fs
        for lead in range(len(spec.leads)):
            freqs = rng.uniform(0.05, 0.5, 3)
            phases = rng.uniform(0, 2 * np.pi, 3)
            slow = np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None]).sum(0)
            signal[lead] += wander * slow / max(float(slow.std()), 1e-6)
        signal += noise * rng.standard_normal(signal.shape)
        return signal.astype(np.float32)

    # ------------------------------------------------------------------ real records
    def prepare(self, records: list[ECGRecord]) -> np.ndarray:
        """Records -> ``(B, leads, length)`` mV (resampled, leads picked, first window, zero-padded)."""
        contract = self.spec.contract()
        return np.stack(
            [
                apply_contract_array(r.signal, r.fs, r.leads, contract, source=r.source).windows[0]
                for r in records
            ]
        ).astype(np.float32)

    def features(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature rows of prepared signals ``(n, leads, length)``: ``(n, leads * window + 5)`` (NaN rows where
        no beats were found) and the mask of rows found."""
        pre, post = self.spec.window
        lead = _lead_index(self.spec.leads)
        peaks = r_peaks(signals, self.spec.fs, lead)
        width = len(self.spec.leads) * (pre + post) + len(RHYTHM_FEATURES)
        rows = np.full((len(signals), width), np.nan, np.float32)
        for i, (signal, found) in enumerate(zip(signals, peaks)):
            features = beat_features(signal, self.spec.fs, lead, pre, post, found)
            if features is not None:
                rows[i] = np.concatenate([features.beat.ravel(), features.rhythm])
        return rows, ~np.isnan(rows).any(axis=1)

    def anomaly_scores(self, records: list[ECGRecord], **options: Any) -> np.ndarray:
        """Minus the log-likelihood of each record's features under the normal records' probabilistic PCA
        (higher = less like normal); :data:`NO_BEATS_SCORE` where no beats are found. ``options`` are the
        diffusion kind's (noise levels, ...), unused here."""
        if "anomaly_mean" not in self.arrays:
            raise ValueError(f"{self.name}: fitted without a normal label; it has no anomaly model")
        if not records:
            return np.zeros(0)
        rows, found = self.features(self.prepare(list(records)))
        scores = np.full(len(rows), NO_BEATS_SCORE)
        if found.any():
            scores[found] = -ppca_log_likelihood(self._anomaly_input(rows[found]), self.arrays, "anomaly_")
        return scores

    def _anomaly_input(self, rows: np.ndarray) -> np.ndarray:
        return (rows - self.arrays["anomaly_centre"]) / self.arrays["anomaly_scale"]

    # ------------------------------------------------------------------ saving
    @classmethod
    def load_folder(cls, folder: Path) -> BeatModel:
        """The model saved in a local folder."""
        spec = BeatSpec.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()), f"{folder}/{CONFIG_FILE}")
        return cls(spec, load_file(str(Path(folder) / WEIGHTS_FILE)))

    @classmethod
    def recipe_schema(cls) -> type:
        """The recipe's config class (:class:`BeatConfig`)."""
        return BeatConfig

    @classmethod
    def train_config(cls, config: BeatConfig) -> Path:
        """Fit from a decoded recipe; the saved folder."""
        return train_beat(config)

    def save(self, folder: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
        """Write the Hub-ready folder (arrays, config, metrics, card); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        save_file(arrays, str(folder / WEIGHTS_FILE), metadata={"format": "np"})
        write_text_atomic(folder / CONFIG_FILE, json.dumps(self.spec.to_dict(), indent=2))
        write_text_atomic(folder / METRICS_FILE, json.dumps(metrics or {}, indent=2, default=str))
        write_text_atomic(folder / CARD_FILE, self.card(metrics or {}))
        return folder

    def card(self, metrics: dict[str, Any]) -> str:
        """A Hub model card: what the model generates, how it was fitted, its evaluation (when recorded)."""
        spec = self.spec
        description = (
            f"Conditional beat-template model (median beats + rhythm scalars, PCA and a Gaussian linear model from "
            f"the condition; scikit-learn) of {len(spec.leads)}-lead ECG at {spec.fs:g} Hz, {spec.length} samples, "
            f"conditioned on the labels {spec.label_names} ({spec.task_type})"
            f"{' and age/sex' if spec.use_age_sex else ''}. Fitted on the training part of `{spec.source}` only. "
            f"Anomaly score: minus the log-likelihood under a probabilistic PCA of the `{spec.normal_label}` records."
        )
        return card_text(
            f"ECG beat-template model: {spec.task}",
            description,
            ["ecg", "synthetic-data", "enecg", "beat-template"],
            metrics,
            "`from enecg.generative import load_generative; load_generative('<folder or Hub ID>')`",
            "Fit",
        )


# ---------------------------------------------------------------------- fitting


def _mixture(x: np.ndarray, components: int, seed: int, prefix: str) -> dict[str, np.ndarray]:
    """A Gaussian mixture of the rows of ``x`` as arrays ``<prefix>weights`` ``(m,)``, ``means`` ``(m, d)`` and
    Cholesky factors ``chols`` ``(m, d, d)``. One component: the Ledoit-Wolf shrunk covariance (stable with few
    records); several: scikit-learn's ``GaussianMixture`` (full covariances, regularised)."""
    d = x.shape[1]
    if components <= 1 or len(x) < 4 * components:
        from sklearn.covariance import LedoitWolf

        covariance = LedoitWolf().fit(x).covariance_
        weights, means, covariances = np.ones(1), x.mean(0)[None], covariance[None]
    else:
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-2, random_state=seed).fit(x)
        weights, means, covariances = gmm.weights_, gmm.means_, gmm.covariances_
    chols = np.stack([np.linalg.cholesky(c + 1e-6 * np.eye(d)) for c in covariances])
    return {f"{prefix}weights": weights, f"{prefix}means": means, f"{prefix}chols": chols}


def fit_beat_model(
    spec: BeatSpec,
    signals: np.ndarray,
    labels: np.ndarray,
    ages: np.ndarray,
    sexes: np.ndarray,
    *,
    ridge_alpha: float = 1.0,
    mixture_components: int = 1,
    seed: int = 0,
) -> tuple[BeatModel, dict[str, Any]]:
    """Fit on prepared training signals ``(N, leads, length)`` mV with their multi-hot ``labels`` ``(N, K)``
    (NaN rows: unlabelled), ages and sexes. Returns the model and fit statistics (records used / skipped)."""
    from sklearn.linear_model import Ridge

    model = BeatModel(spec, {})
    rows, found = model.features(signals)
    skipped = int((~found).sum())
    if skipped:
        logger.info("beat model: %d of %d records skipped (fewer than 3 R peaks found)", skipped, len(rows))
    rows, labels, ages, sexes = rows[found], labels[found], ages[found], sexes[found]
    if len(rows) < 3:
        raise ValueError(f"beat model: only {len(rows)} record(s) with beats found; need 3 or more")
    pre, post = spec.window
    beats, rhythm = rows[:, : len(spec.leads) * (pre + post)], rows[:, -len(RHYTHM_FEATURES) :]
    pca = _pca(beats, spec.components, seed)
    scale = np.sqrt(pca.explained_variance_)
    rhythm_mean, rhythm_scale = rhythm.mean(0), rhythm.std(0) + 1e-6
    z = np.concatenate([pca.transform(beats) / scale, (rhythm - rhythm_mean) / rhythm_scale], axis=1)
    spec.age_mean = float(np.nanmean(ages)) if np.isfinite(ages).any() else spec.age_mean
    model.spec = spec
    labelled = ~np.isnan(labels).all(axis=1)
    if labelled.sum() < 2:
        raise ValueError("beat model: fewer than 2 labelled records with beats")
    condition = model.condition(labels[labelled], ages[labelled], sexes[labelled])
    ridge = Ridge(alpha=ridge_alpha).fit(condition, z[labelled])
    residual = z[labelled] - ridge.predict(condition)
    arrays = {
        "pca_mean": pca.mean_,
        "pca_components": pca.components_,
        "pca_scale": scale,
        "rhythm_mean": rhythm_mean,
        "rhythm_scale": rhythm_scale,
        "coef": ridge.coef_,
        "intercept": np.atleast_1d(ridge.intercept_),
        **_mixture(residual, mixture_components, seed, "residual_"),
        **_mixture(z, mixture_components, seed, "marginal_"),
    }
    stats: dict[str, Any] = {"records_used": len(rows), "skipped_no_beats": skipped}
    stats["pca_explained_variance_ratio"] = float(pca.explained_variance_ratio_.sum())
    if spec.normal_label is not None:
        if spec.normal_label not in spec.label_names:
            raise ValueError(f"normal_label {spec.normal_label!r}: not a label of {spec.label_names}")
        normal = labelled.copy()
        normal[labelled] = labels[labelled][:, spec.label_names.index(spec.normal_label)] > 0.5
        if normal.sum() < 3:
            raise ValueError(f"beat model: fewer than 3 {spec.normal_label} records with beats (anomaly model)")
        centre, spread = rows[normal].mean(0), rows[normal].std(0) + 1e-3
        anomaly = _pca((rows[normal] - centre) / spread, spec.anomaly_components, seed)
        arrays |= {
            "anomaly_centre": centre,
            "anomaly_scale": spread,
            "anomaly_mean": anomaly.mean_,
            "anomaly_components": anomaly.components_,
            "anomaly_variance": anomaly.explained_variance_,
            "anomaly_noise": np.asarray([anomaly.noise_variance_]),
        }
        stats["anomaly_records"] = int(normal.sum())
    model.arrays = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    return model, stats


def train_beat(config: BeatConfig) -> Path:
    """Fit and save a beat model; returns its folder (``metrics.json``: records used and skipped, seconds)."""
    out = Path(config.output_dir)
    if (out / CONFIG_FILE).is_file() and not config.overwrite:
        raise ValueError(f"{out}: already holds a model; set overwrite: true or choose another output_dir")
    started = time.time()
    rows, task, meta = read_training_rows(config.data, config.parts, config.task, config.max_records)
    fs = float(config.fs or rows[0]["fs"])
    spec = BeatSpec(
        task=task.name,
        task_type=task.type,
        label_names=list(task.names),
        leads=list(config.leads or rows[0]["leads"]),
        fs=fs,
        length=round(config.seconds * fs),
        use_age_sex=config.use_age_sex,
        pre_s=config.pre_s,
        post_s=config.post_s,
        components=config.components,
        anomaly_components=config.anomaly_components,
        normal_label=config.normal_label,
        source=f"{meta.source} ({Path(config.data).name}, parts {list(config.parts)})",
    )
    arrays = rows_to_arrays(rows, task, spec.contract())
    labels = arrays.labels
    model, stats = fit_beat_model(
        spec,
        arrays.signals,
        labels,
        arrays.age.astype(np.float64),
        arrays.sex.astype(np.float64),
        ridge_alpha=config.ridge_alpha,
        mixture_components=config.mixture_components,
        seed=config.seed,
    )
    metrics = {
        "kind": "beat",
        "records": len(rows),
        **stats,
        "label_counts": {name: int(np.nansum(labels[:, i])) for i, name in enumerate(spec.label_names)},
        "seconds": round(time.time() - started, 1),
        "generative_config": {"kind": "beat", **dataclasses.asdict(config)},
    }
    return model.save(out, metrics)
