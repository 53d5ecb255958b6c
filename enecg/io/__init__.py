"""Reading ECG records from files into :class:`~enecg.record.ECGRecord` (built on wfdb).

:func:`read_record` reads any single-segment WFDB record (``.hea`` + ``.dat``: PTB-XL, MIT-BIH style, any lead
set and length) and PhysioNet/CinC Challenge records (``.hea`` + ``.mat`` holding ``val``), choosing the signal
reader from the files the header names, and SPH records (``.h5``, :mod:`enecg.io.sph`). Signals are float32
``(leads, samples)`` in mV. :func:`write_wfdb` writes a record back as WFDB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from enecg.io.checks import check_signal, check_timing
from enecg.io.comments import comment_metadata
from enecg.io.header import WfdbHeader, read_header
from enecg.io.signals import millivolt_factors, read_dat_signal, read_mat_signal
from enecg.io.sph import read_sph_record
from enecg.io.writer import write_wfdb
from enecg.leads import canonical_lead_name
from enecg.record import ECGRecord, RecordError

__all__ = ["ECGRecord", "RecordError", "WfdbHeader", "header_path", "read_header", "read_record", "write_wfdb"]

_RECORD_SUFFIXES = (".hea", ".dat", ".mat")
_HDF5_SUFFIXES = (".h5", ".hdf5")


def header_path(path: str | Path) -> Path:
    """The ``.hea`` file of a record given as its header, a signal file, or its name without extension."""
    path = Path(path)
    if path.suffix.lower() in _RECORD_SUFFIXES:
        path = path.with_suffix("")
    return path.with_name(path.name + ".hea")


def read_record(path: str | Path) -> ECGRecord:
    """Read one record.

    Args:
        path: the record's ``.hea`` file, one of its signal files, or its path without extension; or an SPH
            ``.h5`` file (read by :func:`enecg.io.sph.read_sph_record`: no header, labels in ``metadata.csv``).

    Returns:
        An :class:`ECGRecord` with ``record_id`` = the header's record name, ``patient_id`` None (datasets fill it
        in), and ``metadata``: ``path`` (the header), ``age``/``sex`` (float, NaN when missing) and ``dx`` (SNOMED
        CT codes) from header comments, ``comments``, ``signal_files``, and ``flat_leads``/``unknown_leads`` when
        there are some (see :mod:`enecg.io.checks`).

    Raises:
        RecordError: one line naming the file and the problem.
    """
    if Path(path).suffix.lower() in _HDF5_SUFFIXES:
        return read_sph_record(path)
    hea = header_path(path)
    header = read_header(hea)
    fs = float(header.record.fs)
    check_timing(fs, header.record.sig_len, str(hea))  # before reading: a misread header can mean gigabytes
    files = header.signal_files
    is_mat = [name.lower().endswith(".mat") for name in files]
    if any(is_mat):
        if len(files) != 1 or not all(is_mat):
            raise RecordError(
                hea, f"a .mat record must keep all signals in one .mat file, header names {files}"
            )
        physical = read_mat_signal(header)
        kind = "mat"
    else:
        physical = read_dat_signal(header)
        kind = "wfdb"
    signal = (physical * millivolt_factors(header)).T.astype(np.float32)
    leads = tuple(canonical_lead_name(name or f"signal{i}") for i, name in enumerate(header.record.sig_name))
    flags = check_signal(signal, leads, str(hea))
    check_timing(fs, signal.shape[1], str(hea))
    metadata = {
        "path": str(hea),
        "format": kind,
        "signal_files": files,
        "comments": header.comments,
        **comment_metadata(header.comments),
        **flags,
    }
    return ECGRecord(
        signal=signal,
        fs=fs,
        leads=leads,
        record_id=header.record.record_name,
        patient_id=None,
        metadata=metadata,
    )
