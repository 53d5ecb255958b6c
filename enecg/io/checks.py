"""Checks every record passes before it is used: each failure is one :class:`RecordError` naming the file.

Policy (see ``tests/test_bad_records.py``):

* no samples, NaN/inf samples (including WFDB invalid-sample codes), every lead flat: **error**: the record
  cannot give a meaningful input, and a silent repair (interpolation, zero-fill) would be a wrong result.
* some leads flat (constant, e.g. a disconnected electrode): **warning**; the record is kept and the leads are
  listed in ``metadata["flat_leads"]`` (input contracts may zero them and mask them).
* lead names enecg does not know (``ECG1``, ``CM5``): **warning**; the name is kept as written and listed in
  ``metadata["unknown_leads"]`` (whether such a lead is usable is the input contract's decision).
* the same lead twice: **error** (lead lookup by name would be ambiguous).
* a sampling rate outside [:data:`MIN_FS`, :data:`MAX_FS`] Hz or a duration outside [:data:`MIN_DURATION_S`,
  :data:`MAX_DURATION_S`] s: **error** (:func:`check_timing`). The bounds cover every clinical and research ECG
  (PhysioNet databases range from 62.5 Hz to 10 kHz; Holter recordings last 24 h) and reject what can only be a
  misread header: a 0.01 Hz or 1e9 Hz rate, a 2-sample record, a year-long one (which would exhaust memory when
  resampled).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from enecg.leads import is_known_lead
from enecg.record import RecordError

logger = logging.getLogger(__name__)

MIN_FS = 50.0
"""Lowest accepted sampling rate (Hz): below it the QRS complex (~100 ms) is not resolved."""
MAX_FS = 10_000.0
"""Highest accepted sampling rate (Hz): the fastest ECG hardware in PhysioNet records at 10 kHz."""
MIN_DURATION_S = 1.0
"""Shortest accepted record (s): less than one heartbeat at rest carries no usable rhythm or morphology."""
MAX_DURATION_S = 24 * 3600.0
"""Longest accepted record (s): a 24 h Holter recording."""


def check_timing(fs: float, n_samples: int | None, source: str) -> None:
    """Refuse an implausible sampling rate or duration (``n_samples`` None: check only the rate)."""
    if not MIN_FS <= fs <= MAX_FS:
        raise RecordError(
            source, f"sampling rate {fs:g} Hz is implausible for an ECG (accepted {MIN_FS:g}-{MAX_FS:g} Hz)"
        )
    if n_samples is None:
        return
    duration = n_samples / fs
    if duration < MIN_DURATION_S:
        raise RecordError(
            source,
            f"record is too short: {n_samples} samples at {fs:g} Hz = {duration:.3g} s "
            f"(at least {MIN_DURATION_S:g} s needed)",
        )
    if duration > MAX_DURATION_S:
        raise RecordError(
            source,
            f"record is too long: {n_samples} samples at {fs:g} Hz = {duration / 3600:.3g} h "
            f"(at most {MAX_DURATION_S / 3600:g} h accepted)",
        )


def check_signal(signal: np.ndarray, leads: tuple[str, ...], source: str) -> dict[str, Any]:
    """Check a ``(leads, samples)`` signal; return metadata flags for the warnings (``flat_leads``, ...)."""
    flags: dict[str, Any] = {}
    if signal.shape[1] == 0:
        raise RecordError(source, "record has 0 samples")
    finite = np.isfinite(signal)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        names = [leads[i] for i in bad_rows]
        raise RecordError(
            source,
            f"{int((~finite).sum())} NaN/inf samples (or WFDB invalid-sample codes) in leads {names}",
        )
    duplicates = sorted({name for name in leads if leads.count(name) > 1})
    if duplicates:
        raise RecordError(source, f"lead names repeated: {duplicates}")
    flat = [leads[i] for i in np.flatnonzero(np.ptp(signal, axis=1) == 0)]
    if len(flat) == len(leads):
        raise RecordError(source, f"all {len(leads)} leads are flat (constant signal)")
    if flat:
        logger.warning(
            "%s: flat (constant) leads %s kept and flagged in metadata['flat_leads']", source, flat
        )
        flags["flat_leads"] = flat
    unknown = [name for name in leads if not is_known_lead(name)]
    if unknown:
        logger.warning(
            "%s: unknown lead names %s kept as written (metadata['unknown_leads'])", source, unknown
        )
        flags["unknown_leads"] = unknown
    return flags
