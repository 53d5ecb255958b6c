"""The one in-memory ECG record type used everywhere in enecg."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enecg.leads import canonical_lead_name


class RecordError(ValueError):
    """A record (file) that cannot be used. The message always names the file and the problem on one line."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class ECGRecord:
    """One ECG recording.

    Attributes:
        signal: float32 array ``(leads, samples)`` in millivolts.
        fs: sampling rate in Hz.
        leads: lead names, canonicalised (see :func:`enecg.leads.canonical_lead_name`), one per signal row.
        record_id: identifier unique within its source (e.g. PTB-XL ``ecg_id`` ``"00001"``, CinC ``"E00001"``).
        patient_id: identifier of the patient, used for patient-level splits (``None`` when unknown).
        metadata: anything else read with the record (``age``, ``sex``, ``source``, ``path``, labels ...).
    """

    signal: np.ndarray
    fs: float
    leads: tuple[str, ...]
    record_id: str
    patient_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.signal = np.asarray(self.signal, dtype=np.float32)
        self.leads = tuple(canonical_lead_name(name) for name in self.leads)
        if self.signal.ndim != 2:
            raise RecordError(self.source, f"signal must be 2-D (leads, samples), got shape {self.signal.shape}")
        if self.signal.shape[0] != len(self.leads):
            raise RecordError(
                self.source, f"{self.signal.shape[0]} signal rows but {len(self.leads)} lead names {self.leads}"
            )
        if not np.isfinite(self.fs) or self.fs <= 0:
            raise RecordError(self.source, f"sampling rate must be a positive number, got {self.fs!r}")

    @property
    def source(self) -> str:
        """The file the record came from (or its id when it was built in memory), for error messages."""
        return str(self.metadata.get("path", self.record_id))

    def with_lead_aliases(self, aliases: dict[str, str]) -> ECGRecord:
        """A copy whose leads named like a key of ``aliases`` are renamed to its value, e.g. ``{"MLII": "II"}``
        to let a Holter's modified lead II serve as lead II. Only on the user's word: MLII is not lead II (other
        electrode sites), so nothing maps it by default. Renaming onto a lead the record already has is an
        error naming the file."""
        aliases = {canonical_lead_name(k): canonical_lead_name(v) for k, v in aliases.items()}
        renamed = tuple(aliases.get(lead, lead) for lead in self.leads)
        if renamed == self.leads:
            return self
        if len(set(renamed)) != len(renamed):
            raise RecordError(
                self.source, f"lead aliases {aliases} would give duplicate leads {list(renamed)}"
            )
        metadata = {**self.metadata, "lead_aliases": {k: v for k, v in aliases.items() if k in self.leads}}
        return ECGRecord(self.signal, self.fs, renamed, self.record_id, self.patient_id, metadata)

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs


def demographics_array(rows: Sequence[Mapping[str, Any]] | Sequence[ECGRecord]) -> np.ndarray:
    """``(B, 2)`` float32 (age in years, sex 0 male / 1 female) of records or dataset rows; NaN where unknown."""
    out = np.full((len(rows), 2), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        meta = row.metadata if isinstance(row, ECGRecord) else row
        out[i, 0] = number_or_nan(meta.get("age"))
        out[i, 1] = number_or_nan(meta.get("sex"))
    return out


def number_or_nan(value: Any) -> float:
    """A metadata value as float; NaN for None, empty or non-numeric values."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
