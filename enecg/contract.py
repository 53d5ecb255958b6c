"""Input contracts: how a record must be prepared before a given model sees it.

Every expert declares one (in its adapter spec under ``adapters/``). :func:`apply_contract` turns any
:class:`~enecg.record.ECGRecord` into exactly what that model was trained on: sampling rate, lead order, missing
leads, filtering, window length / segmentation and scaling. Feeding a model the wrong rate, lead order, length or
scaling gives silently bad features, so every choice here is explicit and hashed (:meth:`InputContract.digest`)
into feature-cache keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from enecg.record import ECGRecord

Scaling = Literal["none", "zscore_lead", "zscore_record", "minmax_lead"]
LongRecords = Literal["crop_start", "crop_center", "segments"]
ShortRecords = Literal["pad", "refuse"]
MissingLeads = Literal["zero_fill", "refuse"]
Aggregation = Literal["mean", "max"]
Layout = Literal["leads_time", "concat_leads"]


@dataclass(frozen=True)
class InputContract:
    """What a model expects as input. Field defaults describe "leave the record as it is"."""

    fs: float | None = field(default=None, metadata={"help": "Target sampling rate in Hz (None: keep the record's)."})
    leads: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Lead names in the model's order (None: keep the record's leads and order)."},
    )
    length: int | None = field(
        default=None, metadata={"help": "Window length in samples at the target rate (None: whole record)."}
    )
    long_records: LongRecords = field(
        default="crop_start",
        metadata={"help": "Records longer than `length`: keep the first / central window, or cut non-overlapping "
                  "windows ('segments') whose outputs are aggregated."},
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
    bandpass: tuple[float, float] | None = field(
        default=None, metadata={"help": "Band-pass corner frequencies (low, high) in Hz; None: no band-pass."}
    )
    bandpass_design: Literal["butter", "fir"] = field(
        default="butter", metadata={"help": "Band-pass design: Butterworth (IIR) or FIR (windowed)."}
    )
    bandpass_order: int = field(default=4, metadata={"help": "Butterworth order, or FIR taps for 'fir'."})
    notch: float | None = field(default=None, metadata={"help": "Notch frequency in Hz (e.g. 50 or 60); None: off."})
    notch_q: float = field(default=30.0, metadata={"help": "Quality factor of the notch filter."})
    baseline: Literal["none", "median"] = field(
        default="none", metadata={"help": "Baseline-wander removal: subtract a median-filtered baseline, or none."}
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
        metadata={"help": "'leads_time': (leads, length); 'concat_leads': the leads concatenated lead after lead "
                  "into one 1-D sequence of leads*length samples (HuBERT-ECG)."},
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        """Build from a spec/recipe mapping; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown input-contract keys {unknown}; known: {sorted(names)}")
        data = dict(data)
        for key in ("leads", "bandpass"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("leads", "bandpass"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def digest(self) -> str:
        """Stable short hash of every field: part of feature-cache keys (any change invalidates the cache)."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


@dataclass
class PreparedInput:
    """The result of :func:`apply_contract` for one record.

    Attributes:
        windows: float32 ``(n_windows, leads, length)`` (or ``(n_windows, leads*length)`` for ``concat_leads``).
        lead_mask: bool ``(leads,)``; False where a contract lead was missing from the record and zero-filled.
    """

    windows: np.ndarray
    lead_mask: np.ndarray


def apply_contract(record: ECGRecord, contract: InputContract) -> PreparedInput:
    """Prepare ``record`` for a model with ``contract``. Deterministic; raises RecordError naming the record."""
    raise NotImplementedError  # implemented in the data-layer work
