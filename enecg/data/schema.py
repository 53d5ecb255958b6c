"""The on-disk layout of an enecg dataset (shared contract between the data layer, training and evaluation).

A prepared dataset is a folder written by ``datasets.DatasetDict.save_to_disk`` (one Arrow split per part:
``train``/``validation``/``test``, or ``fold_k`` for k-fold) plus :data:`META_FILE`, a JSON file describing the
tasks (label sets) it carries. Rows have these columns:

========================  ==============================================================================
``record_id``             str, unique within the dataset (``"ptbxl:00001"``, ``"cinc:E00001"``)
``patient_id``            str (record id when the source has no patient ids)
``source``                str, dataset source name (``"ptbxl"``, ``"cinc"``, ``"wfdb"``)
``signal``                float32 ``(leads, samples)`` in mV at the record's own rate (not contract-prepared)
``fs``                    float, sampling rate in Hz
``leads``                 list[str], canonical lead names in signal-row order
``age``                   float32 years, NaN when missing
``sex``                   float32 0 = male, 1 = female, NaN when missing
``split``                 str, the part this row belongs to
``<task name>``           one column per task in META_FILE (see below)
========================  ==============================================================================

Task label columns (missing labels are NaN and masked out of losses and metrics):

* ``multilabel``: list[float32] of length ``len(names)``, multi-hot; all-NaN when the record has no label for
  this label set (e.g. a PTB-XL record with no diagnostic superclass statement).
* ``multiclass``: float32 class index in ``names``; NaN when missing.
* ``binary``: float32 0/1; NaN when missing.
* ``regression``: float32 target; NaN when missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from enecg.utils.files import write_text_atomic

META_FILE = "enecg_dataset.json"
# ``source`` of a generated record (enecg generate sample): ``synthetic:<model>``. Such rows may join a training
# part (augmentation) but never a validation/test part or a reported metric.
SYNTHETIC_PREFIX = "synthetic:"
# Parts that feed reported metrics (k-fold parts are each a test fold once, so they count too).
EVALUATION_PARTS = ("validation", "test")
SCHEMA_VERSION = 1

TaskType = Literal["multilabel", "multiclass", "binary", "regression"]
BASE_COLUMNS = ("record_id", "patient_id", "source", "signal", "fs", "leads", "age", "sex", "split")


def is_synthetic(source: Any) -> bool:
    """Whether a row's ``source`` marks it generated (``synthetic:<model>``)."""
    return isinstance(source, str) and source.startswith(SYNTHETIC_PREFIX)


def is_evaluation_part(part: str) -> bool:
    return part in EVALUATION_PARTS or part.startswith("fold_")


def refuse_synthetic(rows: Any, where: str) -> None:
    """Raise ValueError (one line) when any of ``rows`` (row dicts, or ``source`` strings) is synthetic: used by
    the dataset builders for validation/test parts and by evaluation for every scored record."""
    sources = [row.get("source") if isinstance(row, dict) else row for row in rows]
    bad = [s for s in sources if is_synthetic(s)]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} synthetic record(s) (source {bad[0]!r}); generated records may only join a "
            "training part, never validation/test or a reported metric"
        )


@dataclass
class TaskInfo:
    """One label set stored in a dataset."""

    name: str = field(metadata={"help": "Column name of the labels."})
    type: TaskType = field(metadata={"help": "multilabel | multiclass | binary | regression"})
    names: list[str] = field(default_factory=list, metadata={"help": "Label names (classification tasks)."})
    description: str = field(default="", metadata={"help": "How the labels were derived."})
    unit: str | None = field(default=None, metadata={"help": "Unit of a regression target (e.g. 'years')."})


@dataclass
class DatasetMeta:
    """Content of :data:`META_FILE`."""

    source: str
    tasks: list[TaskInfo]
    splits: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Records deliberately left out (not errors), e.g. CinC HR* records duplicating PTB-XL ones: {record, reason}.
    dropped: list[dict[str, str]] = field(default_factory=list)
    # Hash of the build inputs (options + input files' names/sizes/mtimes): an identical re-run reuses the folder.
    cache_key: str = ""

    def task(self, name: str) -> TaskInfo:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"dataset has no task {name!r}; tasks: {[t.name for t in self.tasks]}")

    def save(self, directory: str | os.PathLike) -> None:
        write_text_atomic(Path(directory) / META_FILE, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DatasetMeta:
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not an enecg dataset (no {META_FILE}); run `enecg data prepare`"
            )
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {data.get('schema_version')} != {SCHEMA_VERSION}")
        data["tasks"] = [TaskInfo(**t) for t in data["tasks"]]
        return cls(**data)
