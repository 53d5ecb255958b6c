"""Signal readers behind :func:`enecg.io.read_record`: WFDB signal files (``.dat``) and CinC ``.mat`` files.

Both return the physical signal ``(samples, signals)`` float64 exactly as ``wfdb.rdrecord(...).p_signal`` does
(``(digital - baseline) / gain``, WFDB invalid-sample codes as NaN), so the result is identical to wfdb for any
header wfdb accepts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.io
from wfdb.io import _signal

from enecg.io.header import WfdbHeader
from enecg.record import RecordError

# Physical units -> factor to millivolts. Headers spell units freely (mV, mv, uV, µV).
_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}


def millivolt_factors(header: WfdbHeader) -> np.ndarray:
    """Per-signal factor converting the header's physical units to mV; an unknown unit is an error."""
    factors = []
    for name, unit in zip(header.record.sig_name, header.record.units):
        key = (unit or "mV").strip().lower()
        if key not in _TO_MV:
            raise RecordError(header.path, f"signal {name!r} has unit {unit!r}, not a voltage (mV, uV, V)")
        factors.append(_TO_MV[key])
    return np.asarray(factors, dtype=np.float64)


def _signal_path(header: WfdbHeader, file_name: str) -> Path:
    path = header.path.parent / file_name
    if not path.is_file():
        raise RecordError(header.path, f"signal file {file_name} is missing (expected at {path})")
    return path


def read_dat_signal(header: WfdbHeader) -> np.ndarray:
    """Physical signal of a record stored in WFDB signal files, read with wfdb's own sample decoder."""
    rec = header.record
    channels = list(range(rec.n_sig))
    for file_name in header.signal_files:
        path = _signal_path(header, file_name)
        fmt = rec.fmt[rec.file_name.index(file_name)]
        if fmt not in _signal.BYTES_PER_SAMPLE:
            raise RecordError(header.path, f"unsupported WFDB signal format {fmt!r} in {file_name}")
        if rec.sig_len is not None:
            in_file = [i for i, f in enumerate(rec.file_name) if f == file_name]
            per_frame = sum(rec.samps_per_frame[i] for i in in_file)
            needed = rec.byte_offset[in_file[0]] or 0
            needed += math.ceil(rec.sig_len * per_frame * _signal.BYTES_PER_SAMPLE[fmt])
            size = path.stat().st_size
            if size < needed:
                raise RecordError(
                    header.path,
                    f"signal file {file_name} is truncated: {size} bytes, the header needs {needed}",
                )
    if rec.sig_len is None:
        # WFDB allows omitting the length: infer it from the first file, as wfdb.rdrecord does.
        first = rec.file_name[0]
        per_frame = sum(s for f, s in zip(rec.file_name, rec.samps_per_frame) if f == first)
        rec.sig_len = _signal._infer_sig_len(
            file_name=first,
            fmt=rec.fmt[0],
            tsamps_per_frame=per_frame,
            byte_offset=rec.byte_offset[0],
            dir_name=str(header.path.parent),
        )
    if rec.sig_len == 0:
        raise RecordError(header.path, "record has 0 samples")
    # The same three steps as wfdb.rdrecord (decode, arrange frames, digital->physical), without re-reading
    # the header: header parsing dominates wfdb's per-record cost.
    try:
        rec.e_d_signal = _signal._rd_segment(
            file_name=rec.file_name,
            dir_name=str(header.path.parent),
            pn_dir=None,
            fmt=rec.fmt,
            n_sig=rec.n_sig,
            sig_len=rec.sig_len,
            byte_offset=rec.byte_offset,
            samps_per_frame=rec.samps_per_frame,
            skew=rec.skew,
            init_value=rec.init_value,
            sampfrom=0,
            sampto=rec.sig_len,
            channels=channels,
            ignore_skew=False,
            no_file=False,
            sig_data=None,
            return_res=64,
        )
        rec._arrange_fields(channels=channels, sampfrom=0, smooth_frames=True)
        rec.dac(expanded=False, return_res=64, inplace=True)
    except (ValueError, IndexError, OSError) as exc:
        raise RecordError(header.path, f"cannot decode signal: {exc}") from None
    return np.asarray(rec.p_signal, dtype=np.float64)


def read_mat_signal(header: WfdbHeader) -> np.ndarray:
    """Physical signal of a PhysioNet/CinC Challenge record: ``val`` (signals x samples) in a ``.mat`` file.

    Gain and baseline come from the header, as for a ``.dat`` file; with an integer ``val``, the WFDB invalid
    code of the header's format (e.g. -32768 for format 16) becomes NaN, exactly as wfdb does.
    """
    rec = header.record
    (file_name,) = header.signal_files
    path = _signal_path(header, file_name)
    try:
        content = scipy.io.loadmat(str(path), variable_names=["val"])
    except Exception as exc:  # scipy raises many types for damaged files (ValueError, TypeError, OSError ...)
        raise RecordError(header.path, f"cannot read {file_name}: {type(exc).__name__}: {exc}") from None
    if "val" not in content:
        raise RecordError(header.path, f"{file_name} has no 'val' variable")
    val = np.asarray(content["val"])
    if np.iscomplexobj(val):
        # Keeping only the real part would be a silent wrong result; an ECG is never complex-valued.
        raise RecordError(header.path, f"'val' in {file_name} is complex-valued ({val.dtype}); ECG samples are real")
    if not (np.issubdtype(val.dtype, np.integer) or np.issubdtype(val.dtype, np.floating)):
        raise RecordError(header.path, f"'val' in {file_name} holds {val.dtype} values, not numbers")
    if val.ndim != 2 or val.shape[0] != rec.n_sig:
        raise RecordError(
            header.path, f"'val' in {file_name} has shape {val.shape}, expected ({rec.n_sig}, samples)"
        )
    if rec.sig_len is not None and val.shape[1] != rec.sig_len:
        raise RecordError(
            header.path, f"'val' in {file_name} has {val.shape[1]} samples but the header says {rec.sig_len}"
        )
    if val.shape[1] == 0:
        raise RecordError(header.path, "record has 0 samples")
    digital = val.T
    physical = digital.astype(np.float64)
    physical -= np.asarray(rec.baseline, dtype=np.float64)
    physical /= np.asarray(rec.adc_gain, dtype=np.float64)
    if np.issubdtype(val.dtype, np.integer):
        invalid = np.asarray([_signal.INVALID_SAMPLE_VALUE.get(f, np.iinfo(np.int64).min) for f in rec.fmt])
        physical[digital == invalid] = np.nan
    return physical
