"""Input contracts: how a record must be prepared before a given model sees it.

Every expert declares one (in its adapter spec under ``adapters/``). :func:`apply_contract` turns any
:class:`~enecg.record.ECGRecord` into exactly what that model was trained on: sampling rate, lead order,
missing leads, filtering, window length / segmentation and scaling. Feeding a model the wrong rate, lead
order, length or scaling gives silently bad features, so every choice here is explicit and hashed
(:meth:`InputContract.digest`) into feature-cache keys.

Pipeline of :func:`apply_contract_array` (the order is part of the contract's meaning):

1. **Check** the signal: 2-D ``(leads, samples)`` or a batch ``(B, leads, samples)``, at least one sample, all
   values finite. A bad record raises :class:`~enecg.record.RecordError` naming its file.
2. **Leads**: pick the contract's leads by canonical name from the order given by the record's header (never
   by position: MIMIC-IV-ECG stores ``aVF`` before ``aVL``). A contract lead absent from the record is
   zero-filled and marked False in ``lead_mask`` (``missing_leads="zero_fill"``) or refused (``"refuse"``).
   A record with fewer real contract leads than ``min_leads``, or lacking one of ``required_leads``, is refused
   with :class:`ContractRefusal`: this model cannot read it, another model (an ensemble's other experts) may.
3. **Rate and filters**: polyphase resampling (:func:`scipy.signal.resample_poly`, exact rational ratio) to
   ``contract.fs``; filters run at the *higher* of the record's and the contract's rate, i.e. before
   decimation and after interpolation. Before decimation is what HuBERT-ECG's official preprocessing does (FIR
   band-pass at 500 Hz, then decimation to 100 Hz) and keeps every filter away from the target's Nyquist edge;
   after interpolation, the record holds nothing above its own Nyquist anyway, and a filter defined at the
   target rate (e.g. a 50 Hz notch for a 500 Hz model) stays valid for a 100 Hz record. Filters, all
   zero-phase: notch (:func:`scipy.signal.iirnotch` + ``filtfilt``), then band-pass (Butterworth
   ``sosfiltfilt`` or FIR ``firwin`` + ``filtfilt``), then median-filter baseline removal (ECGFounder's steps,
   in the order the FM notes list them).
4. **Windows** of ``length`` samples: the first / central window, or non-overlapping ``segments`` (a trailing
   remainder shorter than ``length`` is dropped; ``max_segments`` keeps the first ones). A record shorter than
   ``length`` gives one window zero-padded at the end (``valid_samples`` says how many samples are real, so a
   model that can mask padding does), or is refused.
5. **Scaling** per window (statistics over the real samples only: padding and zero-filled leads neither enter
   the statistics nor change), then ``zero_constant_leads``, then the layout (``concat_leads`` flattens lead
   after lead).

Two implementations compute these steps (``implementation=`` of :func:`apply_contract_array` and
:func:`apply_contract_records`): ``"fast"`` (the default) and ``"reference"`` (the plain scipy calls, kept for
tests and ``bench/bench_contract.py``). They share every check, design and error message and give the same
windows within :data:`FAST_TOLERANCE`; the contract's meaning is unchanged, so :meth:`InputContract.digest`
(feature-cache keys) does not depend on the implementation and caches filled before stay valid.

Where the choices come from (official code read for this module; deviations are deliberate and listed):

- HuBERT-ECG (``code/utils.py::ecg_preprocessing``, ``hubert_ecg/dataset.py``): resample to 500 Hz, FIR
  band-pass 0.05-47 Hz (``firwin`` with ``int(0.3 * fs)`` = 150 taps), per-lead min-max to [-1, 1] with a 1e-8
  guard, crop 5 s, flatten lead after lead, ``scipy.signal.decimate`` by 5 -> 6000 samples. Deviations: the
  FIR runs with ``filtfilt`` (zero phase) where the official code uses ``lfilter`` (a 75-sample delay);
  min-max is per 100 Hz window rather than per 500 Hz record before decimation (so each block spans exactly
  [-1, 1]); decimation is per lead, never across the boundary between two concatenated leads.
- ECGFounder (``dataset.py`` of its fine-tuning code): leads reordered by name from MIMIC's order, then one
  z-score over the whole ``(12, 5000)`` array (``zscore_record``); notch, 0.67-40 Hz Butterworth and median
  baseline removal follow the paper's description.
- ECG-FM (fairseq-signals): 5 s segments, constant leads to zero, per-lead z-score (``zscore_lead``,
  ``segments``, ``zero_constant_leads``). ST-MEM: band-pass then per-lead standardisation. ECG-JEPA, MOMENT:
  no scaling here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, get_args

import numpy as np
from scipy import ndimage, signal

from enecg.leads import canonical_lead_name
from enecg.record import ECGRecord, RecordError

Scaling = Literal["none", "zscore_lead", "zscore_record", "minmax_lead"]
LongRecords = Literal["crop_start", "crop_center", "segments"]
ShortRecords = Literal["pad", "refuse"]
MissingLeads = Literal["zero_fill", "refuse"]
Aggregation = Literal["mean", "max"]
Layout = Literal["leads_time", "concat_leads"]
BandpassDesign = Literal["butter", "fir"]
Baseline = Literal["none", "median"]
Implementation = Literal["fast", "reference"]

# A window counts as constant when its peak-to-peak is below ATOL + RTOL * max|x| (in the signal's units, mV
# for records). Exactly flat leads (lead off, flat line) come out of the zero-phase filters and resampling
# with ~1e-16 relative ripple, which must still count as flat; an ADC's 1 uV quantisation noise must not.
_CONSTANT_ATOL = 1e-9
_CONSTANT_RTOL = 1e-7
# Largest numerator/denominator accepted for the resampling ratio: resample_poly's filter grows with it.
_MAX_RATIO_TERM = 2000
# Caps on what one record may become (checked before anything is allocated): values (leads x samples) after
# resampling, and windows of a 'segments' contract without max_segments. A 24-h 12-lead Holter at 500 Hz is
# 518M values (4 GB in float64): such records need max_segments (or a shorter crop), not an out-of-memory crash.
MAX_PREPARED_VALUES = 64_000_000
MAX_WINDOWS = 2048
# Fields added after the first cache format enter the digest only when set, so that every contract written
# before them keeps its digest (and its feature-cache entries).
_DIGEST_OPTIONAL_FIELDS = {"min_leads": None, "required_leads": None}


@dataclass(frozen=True)
class InputContract:
    """What a model expects as input. Field defaults describe "leave the record as it is".

    Construction validates every field (``ValueError`` naming the field), canonicalises lead names
    (``"AVL"`` -> ``"aVL"``) and stores rates/frequencies as floats, so equal contracts have equal digests.
    """

    fs: float | None = field(
        default=None, metadata={"help": "Target sampling rate in Hz (None: keep the record's)."}
    )
    leads: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Lead names in the model's order (None: keep the record's leads and order)."},
    )
    length: int | None = field(
        default=None, metadata={"help": "Window length in samples at the target rate (None: whole record)."}
    )
    long_records: LongRecords = field(
        default="crop_start",
        metadata={
            "help": "Records longer than `length`: keep the first / central window, or cut non-overlapping "
            "windows ('segments') whose outputs are aggregated."
        },
    )
    max_segments: int | None = field(
        default=None, metadata={"help": "With 'segments': keep at most this many windows (None: all)."}
    )
    aggregation: Aggregation = field(
        default="mean", metadata={"help": "How per-segment embeddings/predictions are combined."}
    )
    short_records: ShortRecords = field(
        default="pad", metadata={"help": "Records shorter than `length`: zero-pad at the end, or refuse."}
    )
    missing_leads: MissingLeads = field(
        default="zero_fill",
        metadata={"help": "Contract leads absent from the record: fill with zeros (and mask), or refuse."},
    )
    min_leads: int | None = field(
        default=None,
        metadata={
            "help": "Fewest contract leads a record must really have for this model (None: one). A record "
            "with fewer is refused by this model; an ensemble then routes it to experts that can read it."
        },
    )
    required_leads: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Contract leads this model cannot do without (a record lacking one is refused)."},
    )
    bandpass: tuple[float, float] | None = field(
        default=None, metadata={"help": "Band-pass corner frequencies (low, high) in Hz; None: no band-pass."}
    )
    bandpass_design: BandpassDesign = field(
        default="butter", metadata={"help": "Band-pass design: Butterworth (IIR) or FIR (windowed)."}
    )
    bandpass_order: int = field(
        default=4,
        metadata={"help": "Butterworth order, or FIR taps for 'fir' (taps at the rate the filters run at)."},
    )
    notch: float | None = field(
        default=None, metadata={"help": "Notch frequency in Hz (e.g. 50 or 60); None: off."}
    )
    notch_q: float = field(default=30.0, metadata={"help": "Quality factor of the notch filter."})
    baseline: Baseline = field(
        default="none",
        metadata={"help": "Baseline-wander removal: subtract a median-filtered baseline, or none."},
    )
    baseline_window_s: float = field(
        default=0.6, metadata={"help": "Median-filter window in seconds for baseline removal."}
    )
    scaling: Scaling = field(default="none", metadata={"help": "Amplitude scaling applied to each window."})
    zero_constant_leads: bool = field(
        default=False, metadata={"help": "Set leads that are constant within a window to exactly zero."}
    )
    layout: Layout = field(
        default="leads_time",
        metadata={
            "help": "'leads_time': (leads, length); 'concat_leads': the leads concatenated lead after lead "
            "into one 1-D sequence of leads*length samples (HuBERT-ECG)."
        },
    )

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__ so that 500 and 500.0, ["I"] and ("I",),
        # "AVL" and "aVL" give the same contract (and digest).
        if self.fs is not None:
            _require(
                _is_real(self.fs) and math.isfinite(self.fs) and self.fs > 0, "fs", self.fs, "a positive rate"
            )
            object.__setattr__(self, "fs", float(self.fs))
        if self.leads is not None:
            _require(
                not isinstance(self.leads, str) and len(self.leads) > 0,
                "leads",
                self.leads,
                "a non-empty sequence",
            )
            leads = tuple(canonical_lead_name(str(name)) for name in self.leads)
            _require(len(set(leads)) == len(leads), "leads", self.leads, "distinct lead names")
            object.__setattr__(self, "leads", leads)
        if self.length is not None:
            _require(_is_int(self.length) and self.length > 0, "length", self.length, "a positive integer")
        if self.min_leads is not None:
            most = len(self.leads) if self.leads is not None else None
            _require(
                _is_int(self.min_leads) and self.min_leads >= 1 and (most is None or self.min_leads <= most),
                "min_leads",
                self.min_leads,
                "an integer from 1 to the number of contract leads",
            )
        if self.required_leads is not None:
            _require(
                not isinstance(self.required_leads, str) and self.leads is not None,
                "required_leads",
                self.required_leads,
                "a sequence of lead names, with `leads` set",
            )
            required = tuple(canonical_lead_name(str(name)) for name in self.required_leads)
            _require(
                set(required) <= set(self.leads or ()),
                "required_leads",
                self.required_leads,
                f"a subset of the contract leads {list(self.leads or ())}",
            )
            object.__setattr__(self, "required_leads", required)
        if self.max_segments is not None:
            _require(
                _is_int(self.max_segments) and self.max_segments > 0,
                "max_segments",
                self.max_segments,
                "a positive integer",
            )
        for name, kind in (
            ("long_records", LongRecords),
            ("aggregation", Aggregation),
            ("short_records", ShortRecords),
            ("missing_leads", MissingLeads),
            ("bandpass_design", BandpassDesign),
            ("baseline", Baseline),
            ("scaling", Scaling),
            ("layout", Layout),
        ):
            value = getattr(self, name)
            _require(value in get_args(kind), name, value, f"one of {list(get_args(kind))}")
        nyquist = None if self.fs is None else self.fs / 2
        if self.bandpass is not None:
            _require(
                not isinstance(self.bandpass, str) and len(self.bandpass) == 2,
                "bandpass",
                self.bandpass,
                "a (low, high) pair",
            )
            low, high = self.bandpass
            _require(
                _is_real(low) and _is_real(high) and 0 < low < high,
                "bandpass",
                self.bandpass,
                "0 < low < high",
            )
            _require(
                nyquist is None or high < nyquist,
                "bandpass",
                self.bandpass,
                f"a high corner below the Nyquist frequency {nyquist} Hz of fs={self.fs}",
            )
            object.__setattr__(self, "bandpass", (float(low), float(high)))
        minimum_order = 3 if self.bandpass_design == "fir" else 1
        _require(
            _is_int(self.bandpass_order) and self.bandpass_order >= minimum_order,
            "bandpass_order",
            self.bandpass_order,
            f"an integer >= {minimum_order} for the '{self.bandpass_design}' design",
        )
        if self.notch is not None:
            _require(_is_real(self.notch) and self.notch > 0, "notch", self.notch, "a positive frequency")
            _require(
                nyquist is None or self.notch < nyquist,
                "notch",
                self.notch,
                f"a frequency below the Nyquist frequency {nyquist} Hz of fs={self.fs}",
            )
            object.__setattr__(self, "notch", float(self.notch))
        _require(_is_real(self.notch_q) and self.notch_q > 0, "notch_q", self.notch_q, "a positive number")
        object.__setattr__(self, "notch_q", float(self.notch_q))
        _require(
            _is_real(self.baseline_window_s) and self.baseline_window_s > 0,
            "baseline_window_s",
            self.baseline_window_s,
            "a positive duration",
        )
        object.__setattr__(self, "baseline_window_s", float(self.baseline_window_s))
        _require(
            isinstance(self.zero_constant_leads, (bool, np.bool_)),
            "zero_constant_leads",
            self.zero_constant_leads,
            "a boolean",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        """Build from a spec/recipe mapping; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown input-contract keys {unknown}; known: {sorted(names)}")
        data = dict(data)
        for key in ("leads", "bandpass", "required_leads"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("leads", "bandpass", "required_leads"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def digest(self) -> str:
        """Stable short hash of every field: part of feature-cache keys (any change invalidates the cache)."""
        data = self.to_dict()
        for name, default in _DIGEST_OPTIONAL_FIELDS.items():
            if data[name] == default:
                del data[name]
        payload = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


class ContractRefusal(RecordError):
    """A well-formed record that this contract's model cannot read (too few leads, a required lead missing, too
    short, too long): another model may. An ensemble routes such a record to its other experts; only when no
    expert can read it is the record refused."""


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"input contract: {name}={value!r} is invalid, expected {expected}")


@dataclass
class PreparedInput:
    """The result of :func:`apply_contract` (one record) or :func:`apply_contract_array` (record or batch).

    Attributes:
        windows: float32 ``(n_windows, leads, length)`` (or ``(n_windows, leads*length)`` for
            ``concat_leads``); a batch adds a leading axis: ``(B, n_windows, ...)``. Several windows only with
            ``segments``.
        lead_mask: bool ``(leads,)``; False where a contract lead was missing from the record and zero-filled.
        valid_samples: int ``(n_windows,)`` (``(B, n_windows)`` for a batch): real samples per lead in each
            window; fewer than ``length`` where a short record was zero-padded at the end.
    """

    windows: np.ndarray
    lead_mask: np.ndarray
    valid_samples: np.ndarray | None = None


def apply_contract(
    record: ECGRecord, contract: InputContract, *, implementation: Implementation = "fast"
) -> PreparedInput:
    """Prepare ``record`` for a model with ``contract``. Deterministic; raises RecordError naming the record.

    Returns windows ``(n_windows, leads, length)`` (``(n_windows, leads*length)`` for ``concat_leads``). See
    :func:`apply_contract_array` and the module docstring for every step.
    """
    return apply_contract_array(
        record.signal, record.fs, record.leads, contract, source=record.source, implementation=implementation
    )


def apply_contract_array(
    signal_array: np.ndarray,
    fs: float,
    leads: Sequence[str],
    contract: InputContract,
    *,
    source: str,
    implementation: Implementation = "fast",
) -> PreparedInput:
    """Prepare a raw signal ``(leads, samples)`` or a batch ``(B, leads, samples)`` with common fs and leads.

    Every step runs vectorised over leads and batch items, in float64 (the fast median baseline in float32,
    see :func:`_median_baseline_float32`), and returns float32. The result equals :func:`apply_contract` on
    each record of the batch separately.

    Args:
        signal_array: amplitudes (mV for ECG records), rows in the order of ``leads``.
        fs: sampling rate of ``signal_array`` in Hz.
        leads: lead names of the rows as the header gives them (any spelling known to
            :func:`~enecg.leads.canonical_lead_name`).
        contract: the model's input contract.
        source: the file (or batch description) named by every :class:`~enecg.record.RecordError`.
        implementation: ``"fast"`` (the default: FIR zero-phase filtering as one FFT convolution, the median
            baseline in float32, one-pass scaling statistics) or ``"reference"`` (the plain scipy calls the
            fast kernels are checked against; tests and ``bench/bench_contract.py`` use it). Both give the
            same windows within ``FAST_TOLERANCE`` (see :data:`FAST_TOLERANCE`) and the same errors.

    Returns:
        :class:`PreparedInput` with windows ``(n_windows, ...)`` for a 2-D input, ``(B, n_windows, ...)``
        for a batch, and ``lead_mask (leads,)``.

    Raises:
        RecordError: bad shape, no samples, NaN/inf values, duplicated leads or missing leads that the
            contract refuses, a record too short for the contract's filters or length, a filter at/above the
            Nyquist frequency of the rate it runs at, or an unsupported resampling ratio.
    """
    x = np.asarray(signal_array)
    batched = x.ndim == 3
    if x.ndim == 2:
        x = x[np.newaxis]
    elif not batched:
        raise RecordError(
            source, f"signal must be (leads, samples) or (batch, leads, samples), got shape {x.shape}"
        )
    record_leads = tuple(canonical_lead_name(str(name)) for name in leads)
    if x.shape[1] != len(record_leads):
        raise RecordError(
            source, f"{x.shape[1]} signal rows but {len(record_leads)} lead names {record_leads}"
        )
    if x.shape[2] == 0:
        raise RecordError(source, "record has 0 samples")
    if not (_is_real(fs) and math.isfinite(fs) and fs > 0):
        raise RecordError(source, f"sampling rate must be a positive number, got {fs!r}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise RecordError(source, f"signal must be real numbers, got dtype {x.dtype}")
    _check_finite(x, record_leads, source, batched)

    if implementation not in _KERNELS:
        raise ValueError(f"implementation={implementation!r}: expected one of {sorted(_KERNELS)}")
    kernels = _KERNELS[implementation]
    rows, lead_mask = _select_leads(record_leads, contract, source)
    _check_size(x.shape[2], int(lead_mask.sum()), float(fs), contract, source)
    # Fancy indexing copies, so the float64 array below is ours to modify in place (astype only converts).
    present = x[:, rows[lead_mask]].astype(np.float64, copy=False)
    present = _resample_and_filter(present, float(fs), contract, source, kernels)

    if lead_mask.all():
        full = present
    else:
        full = np.zeros((present.shape[0], lead_mask.size, present.shape[-1]), dtype=np.float64)
        full[:, lead_mask] = present
    windows, pad = _cut_windows(full, contract, source)
    windows = kernels.scale(windows, lead_mask, contract)
    valid = np.full(windows.shape[:2], windows.shape[-1], dtype=np.int64)
    if pad:
        windows = np.pad(windows, [(0, 0)] * (windows.ndim - 1) + [(0, pad)])
    if contract.layout == "concat_leads":
        # C order: lead 0's samples, then lead 1's ... -- "lead after lead" as HuBERT-ECG flattens (12, 500).
        windows = windows.reshape(*windows.shape[:-2], -1)
    windows = np.ascontiguousarray(windows, dtype=np.float32)
    return PreparedInput(
        windows=windows if batched else windows[0],
        lead_mask=lead_mask,
        valid_samples=valid if batched else valid[0],
    )


def _check_size(n: int, leads: int, fs: float, contract: InputContract, source: str) -> None:
    """Refuse, before anything is allocated, a record that would become too large (see MAX_PREPARED_VALUES)."""
    target = fs if contract.fs is None else contract.fs
    try:
        up, down = resampling_ratio(fs, target)
    except ValueError as error:
        raise RecordError(source, str(error)) from None
    resampled = -(-n * up // down)
    if resampled * leads > MAX_PREPARED_VALUES:
        raise ContractRefusal(
            source,
            f"record of {n} samples x {leads} leads at {fs:g} Hz becomes {resampled} samples per lead at "
            f"{target:g} Hz, over the cap of {MAX_PREPARED_VALUES} values (crop it, or use a contract length)",
        )
    if contract.length and contract.long_records == "segments" and contract.max_segments is None:
        windows = resampled // contract.length
        if windows > MAX_WINDOWS:
            raise ContractRefusal(
                source,
                f"record gives {windows} windows of {contract.length} samples, over the cap of {MAX_WINDOWS}: "
                "set the contract's max_segments",
            )


@dataclass
class StackedWindows:
    """Several records prepared with one contract and stacked into arrays.

    Attributes:
        windows: float32 ``(B, n_windows, leads, length)`` (``(B, n_windows, leads*length)`` for ``concat_leads``);
            records with fewer windows than the longest are padded with all-zero windows.
        window_mask: bool ``(B, n_windows)``: False for padding windows (excluded from aggregation).
        lead_mask: bool ``(B, leads)``: False where a contract lead was missing from the record and zero-filled.
        valid_samples: int ``(B, n_windows)``: real samples per lead in each window (see :class:`PreparedInput`).
        available: bool ``(B,)``: False for records this contract refused (``on_refusal="mark"``); their
            windows are zeros (one window marked real, so a model can run on them) and must not be used.
        refusals: per record, the reason it was refused (None where available).
    """

    windows: np.ndarray
    window_mask: np.ndarray
    lead_mask: np.ndarray
    valid_samples: np.ndarray | None = None
    available: np.ndarray | None = None
    refusals: list[str | None] = field(default_factory=list)


def apply_contract_records(
    records: Sequence[ECGRecord],
    contract: InputContract,
    *,
    on_refusal: Literal["raise", "mark"] = "raise",
    implementation: Implementation = "fast",
) -> StackedWindows:
    """Apply ``contract`` to several records and stack the results (see :class:`StackedWindows`).

    Vectorised over the batch when the records share rate, leads and length (the common case: one dataset); a
    batch-level error is re-raised per record so that the message names the offending file. With
    ``on_refusal="mark"`` a record the contract refuses (:class:`ContractRefusal`: leads, length) is marked
    unavailable instead of raising; any other problem (NaN values, a bad shape) still raises.
    ``implementation``: see :func:`apply_contract_array`."""
    records = list(records)
    if not records:
        raise ValueError("apply_contract_records needs at least one record")
    first = records[0]
    uniform = all(
        r.fs == first.fs and r.leads == first.leads and r.n_samples == first.n_samples for r in records
    )
    refusals: list[str | None] = [None] * len(records)
    if len(records) > 1 and uniform:
        try:
            batch = apply_contract_array(
                np.stack([r.signal for r in records]),
                first.fs,
                first.leads,
                contract,
                source=f"batch of {len(records)} records",
                implementation=implementation,
            )
        except RecordError:
            pass  # fall through: the per-record pass raises the error naming the record's file
        else:
            # Uniform records give the same number of windows: the batch arrays are the stacked result.
            return StackedWindows(
                windows=batch.windows,
                window_mask=np.ones(batch.windows.shape[:2], dtype=bool),
                lead_mask=np.tile(batch.lead_mask, (len(records), 1)),
                valid_samples=batch.valid_samples,
                available=np.ones(len(records), dtype=bool),
                refusals=refusals,
            )
    outcomes: list[PreparedInput | None] = []
    for i, record in enumerate(records):
        try:
            outcomes.append(apply_contract(record, contract, implementation=implementation))
        except ContractRefusal as refusal:
            if on_refusal == "raise":
                raise
            refusals[i] = refusal.problem
            outcomes.append(None)
    usable = [p for p in outcomes if p is not None]
    if not usable:
        return _all_refused(records, contract, refusals)
    prepared = [p if p is not None else _placeholder(usable[0], contract) for p in outcomes]
    n_windows = max(p.windows.shape[0] for p in prepared)
    windows = np.zeros((len(prepared), n_windows, *prepared[0].windows.shape[1:]), dtype=np.float32)
    window_mask = np.zeros((len(prepared), n_windows), dtype=bool)
    valid_samples = np.zeros((len(prepared), n_windows), dtype=np.int64)
    for i, p in enumerate(prepared):
        windows[i, : p.windows.shape[0]] = p.windows
        window_mask[i, : p.windows.shape[0]] = True
        valid_samples[i, : p.windows.shape[0]] = p.valid_samples
    lead_mask = np.stack([np.asarray(p.lead_mask, dtype=bool) for p in prepared])
    return StackedWindows(
        windows=windows,
        window_mask=window_mask,
        lead_mask=lead_mask,
        valid_samples=valid_samples,
        available=np.array([r is None for r in refusals], dtype=bool),
        refusals=refusals,
    )


def _placeholder(like: PreparedInput, contract: InputContract) -> PreparedInput:
    """Zero input standing in for a refused record (shaped like one real window; never used)."""
    return PreparedInput(
        windows=np.zeros((1, *like.windows.shape[1:]), dtype=np.float32),
        lead_mask=np.zeros_like(np.asarray(like.lead_mask, dtype=bool)),
        valid_samples=np.full(1, contract.length or like.windows.shape[-1], dtype=np.int64),
    )


def _all_refused(
    records: list[ECGRecord], contract: InputContract, refusals: list[str | None]
) -> StackedWindows:
    """Every record refused: zero windows of the contract's shape (when it fixes one) or of the records'."""
    leads = len(contract.leads) if contract.leads is not None else len(records[0].leads)
    length = contract.length or 1
    shape = (leads * length,) if contract.layout == "concat_leads" else (leads, length)
    return StackedWindows(
        windows=np.zeros((len(records), 1, *shape), dtype=np.float32),
        window_mask=np.ones((len(records), 1), dtype=bool),
        lead_mask=np.zeros((len(records), leads), dtype=bool),
        valid_samples=np.full((len(records), 1), length, dtype=np.int64),
        available=np.zeros(len(records), dtype=bool),
        refusals=refusals,
    )


def _check_finite(x: np.ndarray, leads: tuple[str, ...], source: str, batched: bool) -> None:
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    per_lead = bad.sum(axis=(0, 2))
    named = ", ".join(f"{lead} ({int(n)})" for lead, n in zip(leads, per_lead) if n)
    kinds = "/".join(k for k, present in (("NaN", np.isnan(x).any()), ("inf", np.isinf(x).any())) if present)
    where = f" in batch items {sorted(set(np.nonzero(bad.any(axis=(1, 2)))[0].tolist()))}" if batched else ""
    raise RecordError(source, f"signal contains {int(bad.sum())} {kinds} values{where} in leads {named}")


def _select_leads(
    record_leads: tuple[str, ...], contract: InputContract, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Row index into the record for each contract lead (-1 when missing) and the mask of present leads."""
    if contract.leads is None:
        return np.arange(len(record_leads)), np.ones(len(record_leads), dtype=bool)
    positions: dict[str, list[int]] = {}
    for row, name in enumerate(record_leads):
        positions.setdefault(name, []).append(row)
    rows = []
    for lead in contract.leads:
        found = positions.get(lead, [])
        if len(found) > 1:
            raise RecordError(
                source, f"lead {lead} appears {len(found)} times in the record's leads {record_leads}"
            )
        rows.append(found[0] if found else -1)
    rows_array = np.asarray(rows, dtype=np.intp)
    mask = rows_array >= 0
    missing = [lead for lead, ok in zip(contract.leads, mask) if not ok]
    if mask.sum() == 0:
        raise ContractRefusal(
            source,
            f"none of the contract leads {list(contract.leads)} is in the record's leads "
            f"{list(record_leads)}",
        )
    if missing and contract.missing_leads == "refuse":
        raise ContractRefusal(
            source,
            f"record lacks contract leads {missing} (has {list(record_leads)}; missing_leads='refuse')",
        )
    if contract.min_leads is not None and mask.sum() < contract.min_leads:
        raise ContractRefusal(
            source,
            f"record has {int(mask.sum())} of the model's {len(contract.leads)} leads "
            f"({[lead for lead, ok in zip(contract.leads, mask) if ok]}), fewer than its min_leads "
            f"{contract.min_leads}",
        )
    lacking = [lead for lead in contract.required_leads or () if lead in missing]
    if lacking:
        raise ContractRefusal(
            source, f"record lacks the model's required leads {lacking} (has {list(record_leads)})"
        )
    return rows_array, mask


def resampling_ratio(source_fs: float, target_fs: float) -> tuple[int, int]:
    """Exact ``(up, down)`` for :func:`scipy.signal.resample_poly` from ``source_fs`` to ``target_fs``.

    Rates are read as decimals (``Fraction(str(fs))``), so 500 -> 100 is (1, 5) and 360 -> 500 is (25, 18),
    and a rate such as 1000/3 written with enough digits is recognised. Raises ``ValueError`` when the reduced
    ratio needs a term above 2000 (the polyphase filter would be huge).
    """
    ratio = _as_fraction(target_fs) / _as_fraction(source_fs)
    if max(ratio.numerator, ratio.denominator) > _MAX_RATIO_TERM:
        raise ValueError(
            f"resampling {source_fs} Hz -> {target_fs} Hz needs the ratio {ratio}, whose terms exceed "
            f"{_MAX_RATIO_TERM}"
        )
    return ratio.numerator, ratio.denominator


def _as_fraction(rate: float) -> Fraction:
    exact = Fraction(str(float(rate)))
    close = exact.limit_denominator(1000)
    # Accept a nearby simple fraction only when it matches to float precision (333.333333333 Hz -> 1000/3).
    return close if abs(close - exact) <= 1e-9 * exact else exact


def _resample_and_filter(
    x: np.ndarray, fs: float, contract: InputContract, source: str, kernels: _Kernels
) -> np.ndarray:
    target = fs if contract.fs is None else contract.fs
    if target < fs:
        x = _filter(x, fs, contract, source, kernels)
        return _resample(x, fs, target, source)
    x = _resample(x, fs, target, source)
    return _filter(x, target, contract, source, kernels)


def _resample(x: np.ndarray, fs: float, target: float, source: str) -> np.ndarray:
    try:
        up, down = resampling_ratio(fs, target)
    except ValueError as error:
        raise RecordError(source, str(error)) from None
    if up == down:
        return x
    # padtype='line' extends the signal along the line through its end points instead of with zeros: a DC
    # offset or a flat lead does not ring at the edges (a zero-padded offset would).
    return signal.resample_poly(x, up, down, axis=-1, padtype="line")


def _filter(
    x: np.ndarray, rate: float, contract: InputContract, source: str, kernels: _Kernels
) -> np.ndarray:
    nyquist = rate / 2
    n = x.shape[-1]
    if contract.notch is not None:
        if contract.notch >= nyquist:
            raise RecordError(
                source,
                f"notch at {contract.notch} Hz is at/above the Nyquist frequency {nyquist} Hz "
                f"of the {rate} Hz rate the filters run at",
            )
        b, a = _notch_design(contract.notch, contract.notch_q, rate)
        x = _zero_phase(
            lambda v, pad: signal.filtfilt(b, a, v, axis=-1, padlen=pad), x, 3 * len(a), "notch", source
        )
    if contract.bandpass is not None:
        low, high = contract.bandpass
        if high >= nyquist:
            raise RecordError(
                source,
                f"band-pass high corner {high} Hz is at/above the Nyquist frequency {nyquist} "
                f"Hz of the {rate} Hz rate the filters run at",
            )
        if contract.bandpass_design == "butter":
            sos = _butter_design(low, high, contract.bandpass_order, rate)
            # sosfiltfilt's default padlen, spelled out to check the record length first.
            pad = 3 * (2 * len(sos) + 1 - min((sos[:, 2] == 0).sum(), (sos[:, 5] == 0).sum()))
            x = _zero_phase(
                lambda v, p: signal.sosfiltfilt(sos, v, axis=-1, padlen=p), x, pad, "band-pass", source
            )
        else:
            taps = _fir_design(low, high, contract.bandpass_order, rate)
            x = _zero_phase(
                lambda v, p: kernels.fir_zero_phase(taps, v, p), x, 3 * len(taps), "FIR band-pass", source
            )
    if contract.baseline == "median":
        # Odd kernel centred on each sample. scipy.ndimage's median filter rather than scipy.signal.medfilt:
        # medfilt zero-pads (a false baseline at both ends) and is much slower on long kernels; mode='reflect'
        # mirrors the signal at the edges instead.
        kernel = max(1, round(contract.baseline_window_s * rate)) | 1
        if kernel > n:
            raise RecordError(
                source,
                f"record has {n} samples at {rate} Hz, shorter than the {kernel}-sample "
                "baseline median window",
            )
        x = x - kernels.median_baseline(x, kernel)
    return x


def _zero_phase(apply: Any, x: np.ndarray, padlen: int, name: str, source: str) -> np.ndarray:
    # filtfilt needs more samples than its edge padding; say so rather than let scipy raise a bare ValueError.
    if x.shape[-1] <= padlen:
        raise RecordError(
            source,
            f"record has {x.shape[-1]} samples, too short for the {name} filter (needs more than {padlen})",
        )
    return apply(x, padlen)


@functools.lru_cache(maxsize=64)
def _notch_design(freq: float, quality: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    return signal.iirnotch(freq, quality, fs=rate)


@functools.lru_cache(maxsize=64)
def _butter_design(low: float, high: float, order: int, rate: float) -> np.ndarray:
    return signal.butter(order, [low, high], btype="bandpass", fs=rate, output="sos")


@functools.lru_cache(maxsize=64)
def _fir_design(low: float, high: float, taps: int, rate: float) -> np.ndarray:
    # Band-pass (pass_zero=False): zero gain at DC and at Nyquist, so an even number of taps is allowed too.
    return signal.firwin(taps, [low, high], pass_zero=False, fs=rate)


# --- Kernels: the two implementations of the costly steps ---------------------------------------------------
#
# "reference" is the plain scipy call per step (filtfilt, one median_filter per lead, numpy statistics);
# "fast" computes the same quantities with less work. Everything around them (checks, error messages, designs,
# the IIR filters, resampling, windows) is shared, so both raise the same errors and differ only by rounding.
# The IIR filters (notch, Butterworth) are the same scipy calls in both: float32 recursions drift by up to
# ~3e-4 mV through the 0.67 Hz poles (over the tolerance), and scipy's sosfilt/lfilter cost the same per
# sample whatever the layout or cascade (measured; bench/README.md, "Contract cost").

#: Largest absolute difference allowed between the "fast" and "reference" windows (after scaling, so in the
#: model's input units): tests/test_contract_fast.py checks every bundled adapter contract against it on real
#: PTB-XL records at 500 and 100 Hz. Measured differences are ~1e-6 or below (float32 output rounding).
FAST_TOLERANCE = 1e-4


@dataclass(frozen=True)
class _Kernels:
    """The costly steps of one implementation (see the comment above)."""

    fir_zero_phase: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    median_baseline: Callable[[np.ndarray, int], np.ndarray]
    scale: Callable[[np.ndarray, np.ndarray, InputContract], np.ndarray]


def _fir_zero_phase_reference(taps: np.ndarray, x: np.ndarray, padlen: int) -> np.ndarray:
    return signal.filtfilt(taps, [1.0], x, axis=-1, padlen=padlen)


def _fir_zero_phase_fft(taps: np.ndarray, x: np.ndarray, padlen: int) -> np.ndarray:
    """``filtfilt(taps, [1], x, padlen=padlen)`` as one FFT convolution over all rows (padlen >= len(taps) - 1).

    filtfilt runs the FIR forward and backward over ``x`` odd-extended by ``padlen`` samples, each pass started
    in the steady state of its first input (for an FIR that is the same as extending that input with a
    constant), and crops the extension. An output sample inside the crop depends only on the odd extension
    within ``len(taps) - 1`` samples of it, which neither the constants nor a longer extension reach, so the
    two passes are one convolution with the taps' autocorrelation (symmetric, ``2 * len(taps) - 1`` long) over
    ``x`` odd-extended by ``len(taps) - 1``: equal to filtfilt up to rounding. scipy runs filtfilt's FIR passes
    as one np.convolve per row; this is one FFT convolution for the whole batch (scipy's overlap-add
    oaconvolve measured slower here: its block reshaping costs more than the FFT it saves).
    """
    reach = len(taps) - 1
    if padlen < reach:  # not reached with the contract's padlen (3 * taps); kept exact for any caller
        return _fir_zero_phase_reference(taps, x, padlen)
    kernel = np.convolve(taps, taps[::-1])
    extended = np.concatenate(
        [2 * x[..., :1] - x[..., reach:0:-1], x, 2 * x[..., -1:] - x[..., -2 : -reach - 2 : -1]], axis=-1
    )
    return signal.fftconvolve(extended, kernel.reshape((1,) * (x.ndim - 1) + (-1,)), mode="valid", axes=-1)


def _median_baseline_reference(x: np.ndarray, kernel: int) -> np.ndarray:
    # One 1-D call per lead: scipy only takes its fast running-median path for 1-D input (~50x faster here
    # than one N-D call with a (1, 1, kernel) footprint, identical output).
    n = x.shape[-1]
    baseline = np.stack([ndimage.median_filter(row, size=kernel, mode="reflect") for row in x.reshape(-1, n)])
    return baseline.reshape(x.shape)


def _median_baseline_float32(x: np.ndarray, kernel: int) -> np.ndarray:
    """The reference baseline rounded to float32, computed in float32 (~20 % faster, exactly that rounding).

    A running median only compares values, and rounding to float32 keeps their order (it is monotone), so the
    median of the rounded values is the rounded median: the baseline differs from the float64 one by at most
    half a float32 ulp (6e-8 relative). No exact running median cheaper than scipy's was found: bottleneck's
    move_median and pandas' rolling median are as fast or slower on these 301-sample windows (measured), and
    the windows of neighbouring samples share all but one value, which a double heap already exploits.
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n).astype(np.float32)
    baseline = np.empty_like(rows)
    for row, out in zip(rows, baseline):
        ndimage.median_filter(row, size=kernel, mode="reflect", output=out)
    return baseline.reshape(x.shape)


def _cut_windows(x: np.ndarray, contract: InputContract, source: str) -> tuple[np.ndarray, int]:
    """``(B, L, T)`` -> windows ``(B, W, L, t)`` and the zero padding still to append (t + pad = length)."""
    n = x.shape[-1]
    length = contract.length
    if length is None or n == length:
        return x[:, np.newaxis], 0
    if n < length:
        if contract.short_records == "refuse":
            raise ContractRefusal(
                source,
                f"record has {n} samples after resampling, shorter than the contract length "
                f"{length} (short_records='refuse')",
            )
        # Padded after scaling, so the zeros do not enter the window's statistics.
        return x[:, np.newaxis], length - n
    if contract.long_records == "crop_start":
        return x[:, np.newaxis, :, :length], 0
    if contract.long_records == "crop_center":
        start = (n - length) // 2
        return x[:, np.newaxis, :, start : start + length], 0
    count = n // length
    if contract.max_segments is not None:
        count = min(count, contract.max_segments)
    batch, leads = x.shape[:2]
    segments = x[..., : count * length].reshape(batch, leads, count, length)
    return segments.transpose(0, 2, 1, 3), 0


def _scale_reference(windows: np.ndarray, lead_mask: np.ndarray, contract: InputContract) -> np.ndarray:
    """Scale ``(B, W, L, t)`` windows; zero-filled leads stay exactly 0 and do not enter record statistics.

    Constant leads (see ``_CONSTANT_ATOL``) get a unit denominator instead of a zero one, so no NaN/inf:
    z-scores give 0, min-max gives -1 (what HuBERT-ECG's ``(x - min) / (max - min + 1e-8)`` gives);
    ``zero_constant_leads`` then sets them exactly to 0.
    """
    peak = np.abs(windows).max(axis=-1, keepdims=True)
    constant = np.ptp(windows, axis=-1, keepdims=True) <= _CONSTANT_ATOL + _CONSTANT_RTOL * peak
    if contract.scaling == "zscore_lead":
        # Per lead and window, population std (ECG-FM, ST-MEM).
        centre = windows.mean(axis=-1, keepdims=True)
        spread = windows.std(axis=-1, keepdims=True)
        windows = (windows - centre) / np.where(constant, 1.0, spread)
    elif contract.scaling == "zscore_record":
        # One mean/std over all present leads and samples of the window (ECGFounder's np.mean/np.std of the
        # array).
        present = windows[:, :, lead_mask]
        centre = present.mean(axis=(-2, -1), keepdims=True)
        spread = present.std(axis=(-2, -1), keepdims=True)
        record_peak = np.abs(present).max(axis=(-2, -1), keepdims=True)
        flat = np.ptp(present, axis=(-2, -1), keepdims=True) <= _CONSTANT_ATOL + _CONSTANT_RTOL * record_peak
        windows = (windows - centre) / np.where(flat, 1.0, spread)
    elif contract.scaling == "minmax_lead":
        # Per lead to [-1, 1] (HuBERT-ECG's `scaling`).
        low = windows.min(axis=-1, keepdims=True)
        span = windows.max(axis=-1, keepdims=True) - low
        windows = 2.0 * (windows - low) / np.where(constant, 1.0, span) - 1.0
    if contract.zero_constant_leads:
        windows = np.where(constant, 0.0, windows)
    windows[:, :, ~lead_mask] = 0.0
    return windows


def _scale_fast(windows: np.ndarray, lead_mask: np.ndarray, contract: InputContract) -> np.ndarray:
    """:func:`_scale_reference` with fewer passes over the data, in place (``windows`` is a float64 array this
    module owns): min and max once give both the peak-to-peak and the peak, the deviations from the mean are
    computed once for the spread and reused as the output, and all-present leads are not copied out."""
    low = windows.min(axis=-1, keepdims=True)
    high = windows.max(axis=-1, keepdims=True)
    span = high - low
    constant = span <= _CONSTANT_ATOL + _CONSTANT_RTOL * np.maximum(high, -low)
    if contract.scaling == "zscore_lead":
        windows -= windows.mean(axis=-1, keepdims=True)
        spread = np.sqrt(np.einsum("...t,...t->...", windows, windows)[..., np.newaxis] / windows.shape[-1])
        windows /= np.where(constant, 1.0, spread)
    elif contract.scaling == "zscore_record":
        present = windows if lead_mask.all() else windows[:, :, lead_mask]
        lows, highs = low[:, :, lead_mask], high[:, :, lead_mask]
        record_low = lows.min(axis=(-2, -1), keepdims=True)
        record_high = highs.max(axis=(-2, -1), keepdims=True)
        flat = record_high - record_low <= _CONSTANT_ATOL + _CONSTANT_RTOL * np.maximum(
            record_high, -record_low
        )
        centre = present.mean(axis=(-2, -1), keepdims=True)
        windows -= centre
        deviations = windows if lead_mask.all() else windows[:, :, lead_mask]
        spread = np.sqrt(
            np.einsum("...lt,...lt->...", deviations, deviations)[..., np.newaxis, np.newaxis]
            / (deviations.shape[-2] * deviations.shape[-1])
        )
        windows /= np.where(flat, 1.0, spread)
    elif contract.scaling == "minmax_lead":
        windows -= low
        windows *= 2.0 / np.where(constant, 1.0, span)
        windows -= 1.0
    if contract.zero_constant_leads:
        windows = np.where(constant, 0.0, windows)
    windows[:, :, ~lead_mask] = 0.0
    return windows


_KERNELS: dict[str, _Kernels] = {
    "reference": _Kernels(
        fir_zero_phase=_fir_zero_phase_reference,
        median_baseline=_median_baseline_reference,
        scale=_scale_reference,
    ),
    "fast": _Kernels(
        fir_zero_phase=_fir_zero_phase_fft, median_baseline=_median_baseline_float32, scale=_scale_fast
    ),
}
