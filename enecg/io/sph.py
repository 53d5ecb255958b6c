"""Shandong Provincial Hospital (SPH) ECG records: one HDF5 file per record.

Format (Liu et al., "A large-scale multi-label 12-lead electrocardiogram database with standardized diagnostic
statements", Scientific Data 9, 272 (2022); figshare collection 10.6084/m9.figshare.c.5779802, and its
``Code for analyzing the ECG records`` which reads ``h5py.File(path)['ecg'][()]``): ``records/<ECG_ID>.h5`` holds
one dataset ``ecg``, float16 ``(12, samples)`` in mV, 500 Hz, leads in the standard order I, II, III, aVR, aVL,
aVF, V1-V6; 10 to 60 s. Labels and demographics are not in the file but in the release's ``metadata.csv`` (see
:mod:`enecg.data.sph`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from enecg.io.checks import check_signal, check_timing
from enecg.leads import STANDARD_12_LEADS
from enecg.record import ECGRecord, RecordError

SPH_FS = 500.0
SPH_LEADS = STANDARD_12_LEADS
SPH_DATASET = "ecg"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:  # a declared dependency; a broken install still gets one clear line
        raise ImportError("reading SPH (.h5) records needs h5py: pip install h5py") from None
    return h5py


def read_sph_record(
    path: str | Path, *, record_id: str | None = None, expected_samples: int | None = None
) -> ECGRecord:
    """Read one SPH ``.h5`` record into an :class:`ECGRecord` (float32 mV, 500 Hz, 12 standard leads).

    Args:
        path: the record's ``.h5`` file.
        record_id: id to give the record (default: the file name without ``.h5``, the SPH ``ECG_ID``).
        expected_samples: the sample count ``metadata.csv`` gives (its ``N`` column), checked when given.

    Raises:
        RecordError: one line naming the file and the problem (missing or not HDF5, no ``ecg`` dataset, not
            12 leads, complex or non-numeric samples, NaN/inf, implausible duration, ...).
    """
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, "SPH record file not found")
    try:
        with h5py.File(path, "r") as handle:
            if SPH_DATASET not in handle or not isinstance(handle[SPH_DATASET], h5py.Dataset):
                raise RecordError(path, f"no '{SPH_DATASET}' dataset (keys: {sorted(handle.keys())})")
            data = handle[SPH_DATASET][()]
    except RecordError:
        raise
    except (OSError, ValueError, TypeError) as exc:  # not an HDF5 file, damaged, unreadable
        raise RecordError(path, f"cannot read as HDF5: {str(exc).splitlines()[0]}") from None
    data = np.asarray(data)
    if np.iscomplexobj(data):
        raise RecordError(path, f"'{SPH_DATASET}' is complex-valued ({data.dtype}); ECG samples are real")
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        raise RecordError(path, f"'{SPH_DATASET}' holds {data.dtype} values, not numbers")
    if data.ndim != 2 or data.shape[0] != len(SPH_LEADS):
        raise RecordError(
            path, f"'{SPH_DATASET}' has shape {data.shape}, expected ({len(SPH_LEADS)}, samples)"
        )
    if expected_samples is not None and data.shape[1] != expected_samples:
        raise RecordError(
            path, f"'{SPH_DATASET}' has {data.shape[1]} samples but metadata.csv says {expected_samples}"
        )
    signal = data.astype(np.float32)
    check_timing(SPH_FS, signal.shape[1], str(path))
    flags = check_signal(signal, SPH_LEADS, str(path))
    return ECGRecord(
        signal=signal,
        fs=SPH_FS,
        leads=SPH_LEADS,
        record_id=record_id or path.stem,
        metadata={"path": str(path), "format": "sph-h5", **flags},
    )
