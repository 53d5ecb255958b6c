"""Pool records of other prepared datasets into a training part (e.g. the CinC sample next to PTB-XL).

The pooled sources join *training* only: validation and test stay one source's patient-disjoint parts, so the
reported metrics keep their meaning. Each source must carry the tasks used, with the same type and label names
(e.g. the CinC builder's ``superclass`` task maps SNOMED CT codes onto the PTB-XL superclasses); only the base
columns and those tasks are kept, so the sources' other label sets do not need to agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import datasets

from enecg.data.build import load_dataset_dir
from enecg.data.schema import BASE_COLUMNS, TaskInfo


def pool_training_part(
    part: datasets.Dataset,
    sources: Sequence[str | os.PathLike],
    tasks: Sequence[TaskInfo],
    max_records: int | None = None,
) -> datasets.Dataset:
    """``part`` followed by every record of each prepared dataset in ``sources`` (all its parts).

    Raises ValueError naming the source when it lacks a task or labels it differently."""
    if not sources:
        return part
    columns = list(dict.fromkeys(c for c in (*BASE_COLUMNS, *(t.name for t in tasks)) if c in part.column_names))
    pieces = [part.select_columns(columns)]
    for source in sources:
        dataset, meta = load_dataset_dir(source)
        for task in tasks:
            theirs = next((t for t in meta.tasks if t.name == task.name), None)
            if theirs is None and task.name not in BASE_COLUMNS:
                raise ValueError(
                    f"{source}: pooled training source has no task {task.name!r} "
                    f"(its tasks: {[t.name for t in meta.tasks]})"
                )
            if theirs is not None and (theirs.type, list(theirs.names)) != (task.type, list(task.names)):
                raise ValueError(
                    f"{source}: task {task.name!r} is {theirs.type} {list(theirs.names)} there but "
                    f"{task.type} {list(task.names)} in the training data"
                )
        rows = datasets.concatenate_datasets([dataset[name] for name in sorted(dataset)])
        if max_records is not None and len(rows) > max_records:
            rows = rows.select(range(max_records))
        pieces.append(rows.select_columns(columns).cast(pieces[0].features))
    return datasets.concatenate_datasets(pieces)
