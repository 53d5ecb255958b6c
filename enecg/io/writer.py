"""Writing an :class:`~enecg.record.ECGRecord` as a WFDB record (``.hea`` + ``.dat``), the format
:func:`enecg.io.read_record` reads: e.g. to hand a record from a prepared dataset to ``enecg predict``."""

from __future__ import annotations

import os
from pathlib import Path

import wfdb

from enecg.record import ECGRecord


def write_wfdb(record: ECGRecord, folder: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``record`` into ``folder`` (created when missing) as the WFDB record ``name`` (default: its
    ``record_id`` with ``:`` replaced by ``_``), signals in mV stored as 16-bit samples; returns the ``.hea`` path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or record.record_id.replace(":", "_")
    wfdb.wrsamp(
        name,
        fs=record.fs,
        units=["mV"] * len(record.leads),
        sig_name=list(record.leads),
        p_signal=record.signal.T.astype("float64"),
        fmt=["16"] * len(record.leads),
        write_dir=str(folder),
    )
    return folder / f"{name}.hea"


__all__ = ["write_wfdb"]
