"""ECG datasets: builders (PTB-XL, CinC Challenge, WFDB folders) writing the layout of :mod:`enecg.data.schema`.

Training and evaluation read a prepared folder with :func:`load_dataset_dir` (:func:`load_records`: one part's
records as :class:`~enecg.record.ECGRecord` objects).
"""

from __future__ import annotations

from typing import Any

from enecg.data.schema import META_FILE, DatasetMeta, TaskInfo

__all__ = ["META_FILE", "DatasetMeta", "TaskInfo", "load_dataset_dir", "load_records"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the schema alone must not pull in datasets/wfdb.
    if name in ("load_dataset_dir", "load_records"):
        from enecg.data import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
