"""Dataset rows back to records and label tensors (the read side of :mod:`enecg.data.schema`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from enecg.data.schema import TaskInfo
from enecg.record import ECGRecord


def row_to_record(row: Mapping[str, Any]) -> ECGRecord:
    """An :class:`ECGRecord` from one dataset row (any format: python lists or numpy arrays)."""
    age, sex = _float(row.get("age")), _float(row.get("sex"))
    return ECGRecord(
        signal=np.asarray(row["signal"], dtype=np.float32),
        fs=float(row["fs"]),
        leads=tuple(row["leads"]),
        record_id=str(row["record_id"]),
        patient_id=str(row["patient_id"]),
        metadata={"age": age, "sex": sex, "source": row.get("source"), "split": row.get("split")},
    )


def rows_to_records(columns: Mapping[str, Any]) -> tuple[list[ECGRecord], list[dict[str, Any]]]:
    """A batch of columns (``Dataset[indices]`` in numpy format) -> records and per-row dicts."""
    n = len(columns["record_id"])
    rows = [{name: values[i] for name, values in columns.items()} for i in range(n)]
    return [row_to_record(row) for row in rows], rows


def demographics_array(rows: Sequence[Mapping[str, Any]] | Sequence[ECGRecord]) -> np.ndarray:
    """``(B, 2)`` float32 (age in years, sex 0 male / 1 female); NaN where unknown."""
    out = np.full((len(rows), 2), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        meta = row.metadata if isinstance(row, ECGRecord) else row
        out[i, 0] = _float(meta.get("age"))
        out[i, 1] = _float(meta.get("sex"))
    return out


def label_arrays(rows: Sequence[Mapping[str, Any]], tasks: Sequence[TaskInfo]) -> dict[str, np.ndarray]:
    """Task name -> float32 labels: ``(B, K)`` for multilabel, ``(B,)`` otherwise; NaN = missing (masked)."""
    labels: dict[str, np.ndarray] = {}
    for task in tasks:
        if task.type == "multilabel":
            labels[task.name] = np.asarray([row[task.name] for row in rows], dtype=np.float32).reshape(
                len(rows), len(task.names)
            )
        else:
            labels[task.name] = np.asarray([_float(row[task.name]) for row in rows], dtype=np.float32)
    return labels


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
