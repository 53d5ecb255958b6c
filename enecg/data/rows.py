"""Dataset rows back to records and label tensors (the read side of :mod:`enecg.data.schema`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from enecg.data.schema import TaskInfo
from enecg.record import ECGRecord, number_or_nan


def row_to_record(row: Mapping[str, Any]) -> ECGRecord:
    """An :class:`ECGRecord` from one dataset row (any format: python lists or numpy arrays)."""
    age, sex = number_or_nan(row.get("age")), number_or_nan(row.get("sex"))
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


def label_arrays(rows: Sequence[Mapping[str, Any]], tasks: Sequence[TaskInfo]) -> dict[str, np.ndarray]:
    """Task name -> float32 labels: ``(B, K)`` for multilabel, ``(B,)`` otherwise; NaN = missing (masked)."""
    labels: dict[str, np.ndarray] = {}
    for task in tasks:
        if task.type == "multilabel":
            labels[task.name] = np.asarray([row[task.name] for row in rows], dtype=np.float32).reshape(
                len(rows), len(task.names)
            )
        else:
            labels[task.name] = np.asarray([number_or_nan(row[task.name]) for row in rows], dtype=np.float32)
    return labels
