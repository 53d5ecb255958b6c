"""Label encodings shared by the dataset builders, and the heart-rate target derived from the signal.

Encodings follow :mod:`enecg.data.schema`: NaN marks a missing label (masked out of losses and metrics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
from wfdb import processing

from enecg.data.schema import TaskInfo
from enecg.record import ECGRecord

logger = logging.getLogger(__name__)

AGE_TASK = TaskInfo(
    name="age", type="regression", unit="years", description="Age at recording; NaN when unknown."
)
SEX_TASK = TaskInfo(
    name="sex", type="binary", names=["male", "female"], description="0 = male, 1 = female; NaN when unknown."
)

# Heart rates outside this range (bpm) are detector failures, not physiology.
HEART_RATE_RANGE = (20.0, 300.0)
# Leads searched in order for QRS detection: II is the usual rhythm lead.
_RHYTHM_LEADS = ("II", "I", "V5", "V2", "MLII", "aVF", "III", "V1", "V3", "V4", "V6", "aVR", "aVL")
_MIN_BEATS = 3


def heart_rate_task() -> TaskInfo:
    return TaskInfo(
        name="heart_rate",
        type="regression",
        unit="bpm",
        description="60 / median RR interval, RR from wfdb.processing.gqrs_detect on one lead (II, else I, V5, ...); "
        f"NaN when fewer than {_MIN_BEATS} beats are found or the rate is outside {HEART_RATE_RANGE} bpm.",
    )


def multi_hot(present: Iterable[str], names: Sequence[str], missing_when_empty: bool = True) -> list[float]:
    """Multi-hot vector over ``names``; all-NaN (missing) when nothing in ``present`` is in ``names``.

    Args:
        present: labels the record has (labels not in ``names`` are ignored).
        names: the label set, in column order.
        missing_when_empty: with no label from the set, return all-NaN ("not labelled for this set") rather than
            all-zero ("labelled negative for every class").
    """
    index = {name: i for i, name in enumerate(names)}
    vector = [0.0] * len(names)
    hit = False
    for label in present:
        if label in index:
            vector[index[label]] = 1.0
            hit = True
    if not hit and missing_when_empty:
        return [math.nan] * len(names)
    return vector


def _rhythm_lead(record: ECGRecord) -> int | None:
    flat = set(record.metadata.get("flat_leads", ()))
    for name in _RHYTHM_LEADS:
        if name in record.leads and name not in flat:
            return record.leads.index(name)
    usable = [i for i, name in enumerate(record.leads) if name not in flat]
    return usable[0] if usable else None


def heart_rate_target(record: ECGRecord) -> tuple[float, str | None]:
    """Heart rate in bpm from ``wfdb.processing.gqrs_detect``, or ``(NaN, reason)`` when it cannot be computed.

    gqrs rather than xqrs: on PTB-XL's 100 Hz records xqrs double-detects beats (e.g. 146 bpm for a 64 bpm
    record) while gqrs agrees with the 500 Hz version, and gqrs is as fast or faster (see ``bench/bench_data.py``).
    The median RR interval makes the rate robust to an occasional missed or extra beat.
    """
    lead = _rhythm_lead(record)
    if lead is None:
        return math.nan, "no usable lead"
    signal = np.asarray(record.signal[lead], dtype=np.float64)
    if record.duration_s < 2.0:
        return math.nan, f"record too short ({record.duration_s:.1f} s) for a heart rate"
    try:
        beats = processing.gqrs_detect(sig=signal, fs=record.fs)
    except Exception as exc:  # the detector has no documented error types; report whatever it raised
        return math.nan, f"QRS detection failed on lead {record.leads[lead]}: {type(exc).__name__}: {exc}"
    if len(beats) < _MIN_BEATS:
        return math.nan, f"only {len(beats)} QRS complexes detected on lead {record.leads[lead]}"
    rate = 60.0 / float(np.median(np.diff(beats)) / record.fs)
    if not HEART_RATE_RANGE[0] <= rate <= HEART_RATE_RANGE[1]:
        return math.nan, f"implausible heart rate {rate:.0f} bpm on lead {record.leads[lead]}"
    return rate, None
