"""A labelled SYNTHETIC 12-lead ECG dataset simulated with ECGSYN (McSharry et al. 2003, via neurokit2).

For running enecg end to end where no real ECGs are available (offline quickstart, CI). Every record, label and
patient attribute here is simulated: nothing is measured on people, and the relations below are modelling
choices (loosely physiological), not clinical findings. Do not report results on it as ECG results.

Per simulated patient (drawn once, shared by all the patient's records):

* ``age`` ~ Normal(58, 17) years clipped to [18, 95]; ``sex`` ~ Bernoulli(0.48) (1 = female).
* ``morphology`` traits, independent of each other and of age/sex, with the prevalences of
  :class:`SyntheticOptions`: ``TINV`` (T waves inverted, x -U(0.4, 1.0), in one territory: anterior V1-V4,
  lateral I/V5/V6 or inferior II; the derived leads follow), ``WIDEQRS`` (Q/R/S Gaussian widths x U(1.8, 2.4),
  Q/S angles x U(1.3, 1.6): a wide, taller QRS as in conduction delays) and ``LOWVOLT`` (every lead's voltage
  x U(0.2, 0.35): QRS peak-to-peak mostly under the clinical 0.5 mV limb / 1 mV chest limits).
* Resting heart rate 74 bpm x LogNormal(0, 0.28), +3 bpm for women, -0.1 bpm per year above 50.
* Modest age/sex effects, which make ``age``/``sex`` learnable but not trivial: with age, heart-rate variability
  (ECGSYN ``heart_rate_std``: 5 bpm at 20 y down to 1.5 bpm at 90 y, x LogNormal(0, 0.3)) falls, the LF/HF
  ratio rises (x exp(0.015 (age - 40))), the QRS widens (+0.3 %/y), the PR interval lengthens (P angle +0.2 %/y) and
  voltage falls (-0.4 %/y); women have 15 % lower voltage, 5 % narrower QRS and 10 % lower T waves. Patients
  also differ at random (voltage x LogNormal(0, 0.18), T waves x LogNormal(0, 0.25), QRS x LogNormal(0, 0.05)),
  so no single statistic gives a label away.

Per record (2-4 records for ``repeat_patient_fraction`` of the patients, so patient-level splits matter): heart
rate = the patient's resting rate x LogNormal(0, 0.08) clipped to [38, 170] bpm, which gives ``rhythm``
(``SBRAD`` < 60 bpm, ``STACH`` > 100 bpm, else ``SR``; from the set point: HRV moves a 10 s window's measured
rate by a few bpm), electrode-placement voltage jitter x LogNormal(0, 0.05), and noise from
``neurokit2.signal_distort`` on each measured lead: all records get sensor noise (Laplace, scale 5-10 uV); a
``noisy_fraction`` of them (the ``noisy`` flag) also get baseline wander (random 0.3 Hz knots, Laplace scale
0.05-0.25 mV), EMG-like noise (``min(50, fs/10)`` Hz knots, scale 5-30 uV) and, in half of them, powerline
interference (50 or 60 Hz, 10-50 uV).

Simulation: ECGSYN is a dynamical model whose P, Q, R, S, T events are Gaussians (angles ``ti``, amplitudes
``ai``, widths ``bi``) on a limit cycle driven by an RR process with the set heart rate, HRV and LF/HF ratio.
The 8 measured leads (I, II, V1-V6) are simulated with the same RR process (same seed, so beats coincide) and
per-lead wave factors (:data:`LEAD_WAVE_FACTORS`: rS in V1, qR in V5, ...). ECGSYN rescales each output to
-0.4..1.2 (as McSharry's reference code does), so each lead is put back in mV: isoelectric level (histogram
mode) removed and scaled to a typical peak-to-peak voltage for the lead (:data:`LEAD_PEAK_TO_PEAK_MV`) times the
patient's voltage factors. III, aVR, aVL, aVF are computed from I and II after the noise is added, as a 12-lead
recorder does (the records obey Einthoven's law). 2 s are simulated before each record and dropped (random
phase; ECGSYN's start transient has decayed).

Cost: ECGSYN integrates an ODE in Python, about 0.5 s of CPU per 12-lead 10 s record here (0.4 s at 60 bpm,
0.75 s at 135 bpm), independent of the sampling rate; the default 120 records take ~30 s with 2 workers. The
default rate is 500 Hz, the rate of ECGFounder/ECG-FM, so 100/250 Hz experts (HuBERT-ECG, ST-MEM) resample.

Tasks (schema of :mod:`enecg.data.schema`, as the real builders): ``rhythm`` (multiclass SBRAD/SR/STACH, PTB-XL
codes), ``morphology`` (multilabel TINV/WIDEQRS/LOWVOLT; PTB-XL's nearest statements are INVT, IVCD, LVOLT),
``heart_rate`` (regression, bpm, the set point), ``age`` (regression, years), ``sex`` (binary), ``noisy``
(binary signal-quality flag). Parts: patient-level hold-out or k-fold (:mod:`enecg.data.splits`).

Reproducibility: the patients' record counts come from ``SeedSequence([seed, 0, 0])``, patient ``p``'s traits
from ``[seed, 1, p]``, record ``i``'s draws and simulation from ``[seed, 2, i]``: a record does not depend on the
worker count or order, and the first records of a smaller build are those of a larger one (not its parts). The
options, the generator version and the neurokit2 version are recorded in the meta and the cache key.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enecg.data.build import BuildPlan, RecordJob, build_dataset
from enecg.data.schema import TaskInfo
from enecg.data.targets import multi_hot
from enecg.data.wfdb_folder import SplitOptions
from enecg.leads import STANDARD_12_LEADS
from enecg.record import ECGRecord, RecordError

SOURCE = "synthetic"
# Bump when the same options give different records (the cache key includes it).
GENERATOR_VERSION = 2  # 2: rates other than 500 Hz are resampled from a 500 Hz simulation
SYNTHETIC_TASKS: tuple[str, ...] = ("rhythm", "morphology", "heart_rate", "age", "sex", "noisy")
RHYTHM_CLASSES: tuple[str, ...] = ("SBRAD", "SR", "STACH")
MORPHOLOGY_LABELS: tuple[str, ...] = ("TINV", "WIDEQRS", "LOWVOLT")
BRADYCARDIA_BPM = 60.0
TACHYCARDIA_BPM = 100.0

# The leads a 12-lead recorder measures; III, aVR, aVL, aVF are computed from I and II.
INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
# ECGSYN's defaults (McSharry et al. 2003, Table 1) for the P, Q, R, S, T events: angle (degrees), amplitude, width.
ECGSYN_TI = (-70.0, -15.0, 0.0, 15.0, 100.0)
ECGSYN_AI = (1.2, -5.0, 30.0, -7.5, 0.75)
ECGSYN_BI = (0.25, 0.1, 0.1, 0.1, 0.4)
_Q, _R, _S, _T = 1, 2, 3, 4
# Per-lead factors on ECGSYN_AI (P, Q, R, S, T): the normal wave pattern of each lead (e.g. rS in V1, qR in V5;
# the R/S progression across the chest leads).
LEAD_WAVE_FACTORS: dict[str, tuple[float, float, float, float, float]] = {
    "I": (0.5, 0.4, 0.55, 0.4, 0.6),
    "II": (1.0, 0.5, 1.0, 0.5, 1.0),
    "V1": (0.5, 0.0, 0.15, 1.6, 0.3),
    "V2": (0.5, 0.0, 0.3, 2.0, 1.3),
    "V3": (0.5, 0.1, 0.6, 1.4, 1.2),
    "V4": (0.5, 0.3, 1.0, 0.9, 1.1),
    "V5": (0.5, 0.4, 1.0, 0.5, 0.9),
    "V6": (0.5, 0.4, 0.85, 0.3, 0.7),
}
# Typical peak-to-peak voltage (mV) of each lead of a normal adult ECG (before the patient's voltage factors).
LEAD_PEAK_TO_PEAK_MV: dict[str, float] = {
    "I": 1.0,
    "II": 1.5,
    "V1": 1.4,
    "V2": 2.2,
    "V3": 2.0,
    "V4": 2.2,
    "V5": 1.9,
    "V6": 1.5,
}
# Leads whose T waves a TINV patient has inverted, by territory.
TINV_TERRITORIES: dict[str, tuple[str, ...]] = {
    "anterior": ("V1", "V2", "V3", "V4"),
    "lateral": ("I", "V5", "V6"),
    "inferior": ("II",),
}
# Seconds simulated before the record and dropped: ECGSYN starts every lead at the R peak with z = 0.04, a
# transient decaying as exp(-t / 1 s); after 2 s it is 0.005, the size of ECGSYN's own respiratory baseline sway.
_LEAD_IN_S = 2.0


@dataclass
class SyntheticOptions(SplitOptions):
    """How to simulate the synthetic dataset (every field is recorded in the dataset meta and its cache key)."""

    seed: int = field(
        default=0, metadata={"help": "Seed of everything: patients, records, simulation, noise and split."}
    )
    n_records: int = field(
        default=120, metadata={"help": "Number of records (~0.5 s of CPU each: ~30 s on 2 workers)."}
    )
    rate: int = field(
        default=500,
        metadata={"help": "Sampling rate in Hz, >= 100 (500: ECGFounder/ECG-FM rate; others resample)."},
    )
    seconds: float = field(default=10.0, metadata={"help": "Record duration in seconds."})
    tasks: tuple[str, ...] = field(
        default=SYNTHETIC_TASKS, metadata={"help": f"Label sets to store, of {SYNTHETIC_TASKS}."}
    )
    tinv_prevalence: float = field(default=0.2, metadata={"help": "Fraction of patients with TINV."})
    wide_qrs_prevalence: float = field(default=0.15, metadata={"help": "Fraction of patients with WIDEQRS."})
    low_voltage_prevalence: float = field(
        default=0.15, metadata={"help": "Fraction of patients with LOWVOLT."}
    )
    noisy_fraction: float = field(default=0.5, metadata={"help": "Fraction of records with added noise."})
    repeat_patient_fraction: float = field(
        default=0.3, metadata={"help": "Fraction of patients with 2-4 records (the others have one)."}
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(SYNTHETIC_TASKS))
        if unknown:
            raise ValueError(f"unknown synthetic tasks {unknown}; known: {list(SYNTHETIC_TASKS)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.n_records < 1:
            raise ValueError(f"n_records must be >= 1, got {self.n_records}")
        if int(self.rate) != self.rate or self.rate < 100:
            raise ValueError(f"rate must be an integer >= 100 Hz (EMG noise needs it), got {self.rate}")
        if not 2.0 <= self.seconds <= 120.0:
            raise ValueError(f"seconds must be in [2, 120], got {self.seconds}")
        for name in (
            "tinv_prevalence",
            "wide_qrs_prevalence",
            "low_voltage_prevalence",
            "noisy_fraction",
            "repeat_patient_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.tasks = tuple(self.tasks)


@dataclass
class SyntheticRecordSpec:
    """The latent parameters of one simulated record (what its labels and signal are made from)."""

    index: int
    record_id: str
    patient_id: str
    age: float
    sex: float  # 0 male, 1 female
    heart_rate: float  # bpm, ECGSYN set point
    heart_rate_std: float  # bpm, ECGSYN HRV
    lfhf_ratio: float
    ti: tuple[float, ...]  # P, Q, R, S, T angles (degrees)
    ai: tuple[float, ...]  # amplitudes before the per-lead factors
    bi: tuple[float, ...]  # Gaussian widths (radians)
    peak_to_peak_mv: dict[str, float]  # per independent lead
    t_inverted_leads: tuple[str, ...]
    tinv: bool
    wide_qrs: bool
    low_voltage: bool
    noisy: bool
    noise: dict[str, float]  # noise amplitudes in mV (0: absent) and the powerline frequency
    simulation_seed: int

    @property
    def rhythm(self) -> str:
        if self.heart_rate < BRADYCARDIA_BPM:
            return "SBRAD"
        return "STACH" if self.heart_rate > TACHYCARDIA_BPM else "SR"

    def labels(self) -> dict[str, Any]:
        """Every task's label column (encoding of :mod:`enecg.data.schema`)."""
        flags = [
            name for name, on in zip(MORPHOLOGY_LABELS, (self.tinv, self.wide_qrs, self.low_voltage)) if on
        ]
        return {
            "rhythm": float(RHYTHM_CLASSES.index(self.rhythm)),
            "morphology": multi_hot(flags, MORPHOLOGY_LABELS, missing_when_empty=False),
            "heart_rate": self.heart_rate,
            "age": self.age,
            "sex": self.sex,
            "noisy": float(self.noisy),
        }


def synthetic_tasks(tasks: tuple[str, ...] = SYNTHETIC_TASKS) -> list[TaskInfo]:
    """The TaskInfo of each requested synthetic label set (descriptions say they are simulated)."""
    available = {
        "rhythm": TaskInfo(
            "rhythm",
            "multiclass",
            list(RHYTHM_CLASSES),
            f"SYNTHETIC: from the ECGSYN heart-rate set point: SBRAD < {BRADYCARDIA_BPM:g} bpm, "
            f"STACH > {TACHYCARDIA_BPM:g} bpm, else SR.",
        ),
        "morphology": TaskInfo(
            "morphology",
            "multilabel",
            list(MORPHOLOGY_LABELS),
            "SYNTHETIC patient traits simulated with ECGSYN: TINV inverted T waves in one territory, WIDEQRS "
            "widened Q/R/S Gaussians, LOWVOLT all amplitudes x 0.2-0.35; independent; all-zero = none.",
        ),
        "heart_rate": TaskInfo(
            "heart_rate",
            "regression",
            description="SYNTHETIC: ECGSYN mean heart-rate set point; the 10 s window's rate varies with HRV.",
            unit="bpm",
        ),
        "age": TaskInfo(
            "age",
            "regression",
            description="SYNTHETIC patient age ~ N(58, 17) in [18, 95]; lowers HRV, widens QRS, lowers voltage.",
            unit="years",
        ),
        "sex": TaskInfo(
            "sex",
            "binary",
            ["male", "female"],
            "SYNTHETIC: 0 = male, 1 = female; women: voltage x 0.85, QRS x 0.95, T x 0.9, +3 bpm.",
        ),
        "noisy": TaskInfo(
            "noisy",
            "binary",
            ["clean", "noisy"],
            "SYNTHETIC signal-quality flag: 1 = baseline wander + EMG (+ powerline in half) added.",
        ),
    }
    return [available[name] for name in SYNTHETIC_TASKS if name in tasks]


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _records_per_patient(options: SyntheticOptions) -> list[int]:
    """How many records each patient has, until ``n_records`` (the last patient may get fewer)."""
    rng = _rng(options.seed, 0, 0)
    counts: list[int] = []
    remaining = options.n_records
    while remaining > 0:
        n = int(rng.integers(2, 5)) if rng.random() < options.repeat_patient_fraction else 1
        counts.append(min(n, remaining))
        remaining -= counts[-1]
    return counts


def _patient_traits(options: SyntheticOptions, patient: int) -> dict[str, Any]:
    rng = _rng(options.seed, 1, patient)
    age = float(np.clip(rng.normal(58.0, 17.0), 18.0, 95.0))
    sex = float(rng.random() < 0.48)
    tinv = bool(rng.random() < options.tinv_prevalence)
    territory = str(rng.choice(sorted(TINV_TERRITORIES)))
    wide_qrs = bool(rng.random() < options.wide_qrs_prevalence)
    low_voltage = bool(rng.random() < options.low_voltage_prevalence)
    voltage = float(
        rng.lognormal(0.0, 0.18)
        * (0.85 if sex else 1.0)
        * (1.0 - 0.004 * (age - 50.0))
        * (rng.uniform(0.2, 0.35) if low_voltage else 1.0)
    )
    qrs_width = float((1.0 + 0.003 * (age - 50.0)) * (0.95 if sex else 1.0) * rng.lognormal(0.0, 0.05))
    qs_spread = 1.0
    if wide_qrs:
        qrs_width *= rng.uniform(1.8, 2.4)
        qs_spread = float(rng.uniform(1.3, 1.6))
    t_amplitude = float(rng.lognormal(0.0, 0.25) * (0.9 if sex else 1.0))
    t_inversion_depth = float(rng.uniform(0.4, 1.0))
    hrv = float(np.clip(5.0 - 0.05 * (age - 20.0), 1.5, 5.0) * rng.lognormal(0.0, 0.3))
    lfhf = float(0.5 * math.exp(0.015 * (age - 40.0)) * rng.lognormal(0.0, 0.3))
    resting_hr = float(74.0 * rng.lognormal(0.0, 0.28) + (3.0 if sex else 0.0) - 0.1 * (age - 50.0))
    return {
        "age": round(age, 1),
        "sex": sex,
        "tinv": tinv,
        "t_inverted_leads": TINV_TERRITORIES[territory] if tinv else (),
        "wide_qrs": wide_qrs,
        "low_voltage": low_voltage,
        "voltage": voltage,
        "qrs_width": qrs_width,
        "qs_spread": qs_spread,
        # TINV: this factor's sign is flipped in the territory's leads (simulate_record).
        "t_amplitude": t_inversion_depth if tinv else t_amplitude,
        "hrv": hrv,
        "lfhf": lfhf,
        "resting_hr": resting_hr,
        "pr_factor": 1.0 + 0.002 * (age - 50.0),
    }


def _record_spec(
    options: SyntheticOptions, index: int, patient: int, traits: dict[str, Any]
) -> SyntheticRecordSpec:
    rng = _rng(options.seed, 2, index)
    heart_rate = float(np.clip(traits["resting_hr"] * rng.lognormal(0.0, 0.08), 38.0, 170.0))
    ti = list(ECGSYN_TI)
    ti[0] *= traits["pr_factor"]
    ti[_Q] *= traits["qs_spread"]
    ti[_S] *= traits["qs_spread"]
    bi = list(ECGSYN_BI)
    ai = list(ECGSYN_AI)
    for wave in (_Q, _R, _S):
        bi[wave] *= traits["qrs_width"]
        # An ECGSYN event's deflection grows with amplitude x width^2: a wide QRS is also taller (as in bundle
        # branch blocks), but only x width, not x width^2.
        ai[wave] /= traits["qrs_width"]
    ai[_T] *= traits["t_amplitude"]
    voltage = traits["voltage"] * float(rng.lognormal(0.0, 0.05))
    noisy = bool(rng.random() < options.noisy_fraction)
    noise = {"sensor_mv": float(rng.uniform(0.005, 0.01))}
    if noisy:
        noise["wander_mv"] = float(rng.uniform(0.05, 0.25))
        noise["emg_mv"] = float(rng.uniform(0.005, 0.03))
        noise["powerline_mv"] = float(rng.uniform(0.01, 0.05)) if rng.random() < 0.5 else 0.0
        noise["powerline_hz"] = float(rng.choice([50.0, 60.0]))
    return SyntheticRecordSpec(
        index=index,
        record_id=f"{SOURCE}:{index:05d}",
        patient_id=f"{SOURCE}:p{patient:05d}",
        age=traits["age"],
        sex=traits["sex"],
        heart_rate=round(heart_rate, 2),
        heart_rate_std=traits["hrv"],
        lfhf_ratio=traits["lfhf"],
        ti=tuple(ti),
        ai=tuple(ai),
        bi=tuple(bi),
        peak_to_peak_mv={lead: LEAD_PEAK_TO_PEAK_MV[lead] * voltage for lead in INDEPENDENT_LEADS},
        t_inverted_leads=tuple(traits["t_inverted_leads"]),
        tinv=traits["tinv"],
        wide_qrs=traits["wide_qrs"],
        low_voltage=traits["low_voltage"],
        noisy=noisy,
        noise=noise,
        simulation_seed=int(rng.integers(2**31 - 1)),
    )


def synthetic_specs(options: SyntheticOptions | None = None) -> list[SyntheticRecordSpec]:
    """The latent parameters of every record of the dataset ``options`` describe (cheap: nothing simulated)."""
    options = options or SyntheticOptions()
    specs: list[SyntheticRecordSpec] = []
    for patient, count in enumerate(_records_per_patient(options)):
        traits = _patient_traits(options, patient)
        for _ in range(count):
            specs.append(_record_spec(options, len(specs), patient, traits))
    return specs


def _isoelectric_level(lead: np.ndarray) -> float:
    """The most common value of a clean lead: its flat PR/TP segments."""
    counts, edges = np.histogram(lead, bins=160)
    peak = int(np.argmax(counts))
    return float((edges[peak] + edges[peak + 1]) / 2)


def _add_noise(clean: np.ndarray, spec: SyntheticRecordSpec, fs: int, rng: np.random.Generator) -> np.ndarray:
    """``clean`` (mV) plus the record's noise, made by ``neurokit2.signal_distort``."""
    import neurokit2 as nk

    noise = spec.noise
    # signal_distort's amplitudes are relative to the signal's SD: divide the mV amplitudes by it.
    sd = float(np.std(clean, ddof=1))
    amplitudes, frequencies = [noise["sensor_mv"]], [fs * 0.1]
    if spec.noisy:
        amplitudes += [noise["wander_mv"], noise["emg_mv"]]
        frequencies += [0.3, min(50.0, fs * 0.1)]
    return nk.signal_distort(
        clean,
        sampling_rate=fs,
        noise_shape="laplace",
        noise_amplitude=[a / sd for a in amplitudes],
        noise_frequency=frequencies,
        powerline_amplitude=noise.get("powerline_mv", 0.0) / sd,
        powerline_frequency=noise.get("powerline_hz", 50.0),
        random_state=rng,
        silent=True,
    )


# ECGSYN is always run at this rate. neurokit2 0.2.13 pads its resampled RR series with zeros at low rates
# (e.g. 100 Hz), and its RR loop then never ends; records for other rates are resampled from 500 Hz instead.
SIMULATION_FS = 500


def simulate_record(spec: SyntheticRecordSpec, fs: int = 500, seconds: float = 10.0) -> np.ndarray:
    """Simulate one record: float32 ``(12, samples)`` in mV, leads in :data:`STANDARD_12_LEADS` order.

    Simulated at :data:`SIMULATION_FS` and resampled (polyphase, anti-aliased) when ``fs`` differs."""
    if fs == SIMULATION_FS:
        return _simulate_at(spec, SIMULATION_FS, seconds)
    from scipy.signal import resample_poly

    from enecg.contract import resampling_ratio

    up, down = resampling_ratio(SIMULATION_FS, fs)
    high = _simulate_at(spec, SIMULATION_FS, seconds)
    return resample_poly(high, up, down, axis=-1, padtype="line")[:, : round(seconds * fs)].astype(np.float32)


def _simulate_at(spec: SyntheticRecordSpec, fs: int, seconds: float) -> np.ndarray:
    import neurokit2 as nk

    n_samples = round(seconds * fs)
    lead_in = round(_LEAD_IN_S * fs)
    independent: dict[str, np.ndarray] = {}
    noise_rng = _rng(spec.simulation_seed, 3, 0)
    for lead in INDEPENDENT_LEADS:
        ai = np.asarray(spec.ai) * np.asarray(LEAD_WAVE_FACTORS[lead])
        if lead in spec.t_inverted_leads:
            ai[_T] = -ai[_T]
        # The same integer seed in every lead: the same RR process, so the leads' beats coincide.
        simulated = nk.ecg_simulate(
            length=n_samples + lead_in,
            sampling_rate=fs,
            noise=0,
            heart_rate=spec.heart_rate,
            heart_rate_std=spec.heart_rate_std,
            lfhfratio=spec.lfhf_ratio,
            ti=spec.ti,
            ai=tuple(ai),
            bi=spec.bi,
            method="ecgsyn",
            random_state=spec.simulation_seed,
        )
        clean = np.asarray(simulated, dtype=np.float64)[lead_in:]
        if clean.shape != (n_samples,) or not np.isfinite(clean).all():
            raise RecordError(
                spec.record_id, f"ECGSYN gave {clean.shape} samples (finite: {np.isfinite(clean).all()})"
            )
        span = float(np.ptp(clean))
        if span <= 0:
            raise RecordError(spec.record_id, f"ECGSYN gave a flat lead {lead}")
        clean = (clean - _isoelectric_level(clean)) * (spec.peak_to_peak_mv[lead] / span)
        independent[lead] = _add_noise(clean, spec, fs, noise_rng)
    lead_i, lead_ii = independent["I"], independent["II"]
    derived = {
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    return np.stack([independent.get(name, derived.get(name)) for name in STANDARD_12_LEADS]).astype(
        np.float32
    )


@dataclass
class SyntheticRecordMaker:
    """The build's record reader: simulates the record of a job from its spec (picklable, for worker processes)."""

    specs: dict[str, SyntheticRecordSpec]
    fs: int
    seconds: float

    def __call__(self, job: RecordJob) -> ECGRecord:
        spec = self.specs[job.record_id]
        signal = simulate_record(spec, self.fs, self.seconds)
        return ECGRecord(
            signal=signal,
            fs=float(self.fs),
            leads=STANDARD_12_LEADS,
            record_id=spec.record_id,
            patient_id=spec.patient_id,
            metadata={"age": spec.age, "sex": spec.sex, "synthetic": asdict(spec)},
        )


def plan_synthetic(options: SyntheticOptions | None = None) -> BuildPlan:
    """Draw every patient and record (no simulation yet) and plan one job per record."""
    options = options or SyntheticOptions()
    specs = synthetic_specs(options)
    jobs = []
    for spec in specs:
        labels = spec.labels()
        values = {name: labels[name] for name in options.tasks if name not in ("age", "sex")}
        values.update(age=spec.age, sex=spec.sex)  # base columns: stored even when not a task
        jobs.append(
            RecordJob(path="", record_id=spec.record_id, split="", patient_id=spec.patient_id, values=values)
        )
    options.assign(jobs)
    recorded = asdict(options)
    recorded.update(
        generator_version=GENERATOR_VERSION, neurokit2_version=importlib.metadata.version("neurokit2")
    )
    return BuildPlan(
        source=SOURCE,
        jobs=jobs,
        tasks=synthetic_tasks(options.tasks),
        parts=options.parts(),
        options=recorded,
        reader=SyntheticRecordMaker(
            {spec.record_id: spec for spec in specs}, int(options.rate), options.seconds
        ),
    )


def prepare_synthetic(
    out: str | Path,
    options: SyntheticOptions | None = None,
    workers: int = 2,
    force: bool = False,
):
    """Build (or reuse) the synthetic dataset folder ``out``; returns ``(DatasetDict, DatasetMeta)``.

    Same layout, columns and meta as the real builders (source ``"synthetic"``), so training, evaluation and
    ``enecg data describe`` use it unchanged. Everything in it is simulated (see the module docstring).
    """
    return build_dataset(plan_synthetic(options), out, workers=workers, force=force)
