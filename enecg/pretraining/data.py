"""Unlabelled records for pretraining, and the collate function that applies the input contract per batch.

Two sources, both map-style ``torch.utils.data.Dataset`` of raw records (labels are never read):

* :class:`ArrowRecords`: one or more parts of a prepared enecg dataset (:mod:`enecg.data.schema`), read row by row
  from the memory-mapped Arrow files (nothing is loaded up front);
* :class:`WfdbFolderRecords`: every WFDB record under a folder, read with :func:`enecg.io.read_record` on access. A
  record that fails to read is logged (file and problem) and dropped from its batch, and counted, so one broken file
  does not end a long run; build a dataset with ``enecg data prepare wfdb`` to have them listed up front instead.

:class:`SegmentPairCollator` applies the contract (``long_records="segments"``) to a batch, vectorised with
:func:`~enecg.contract.apply_contract_array` over records that share rate, leads and length, and picks two
temporally adjacent windows per record for CMSC.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from enecg.contract import InputContract, apply_contract_array
from enecg.data.schema import META_FILE
from enecg.record import RecordError

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ("record_id", "patient_id", "signal", "fs", "leads")


@dataclass
class RawRecord:
    """One record as stored: signal ``(leads, samples)`` at its own rate, before the contract."""

    signal: np.ndarray
    fs: float
    leads: tuple[str, ...]
    record_id: str
    patient_id: str | None
    source: str


class ArrowRecords(Dataset):
    """The rows of the given parts of a prepared dataset folder (only the signal columns are read)."""

    def __init__(
        self, path: str | os.PathLike, splits: tuple[str, ...], max_records: int | None = None
    ) -> None:
        import datasets

        from enecg.data import load_dataset_dir

        self.path = Path(path)
        dataset_dict, _ = load_dataset_dir(self.path)
        unknown = [s for s in splits if s not in dataset_dict]
        if unknown:
            raise ValueError(f"{self.path}: no part(s) {unknown}; parts: {sorted(dataset_dict)}")
        parts = [dataset_dict[s].select_columns(list(RECORD_COLUMNS)) for s in splits]
        rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if max_records is not None:
            rows = rows.select(range(min(max_records, len(rows))))
        self.rows = rows.with_format("numpy")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> RawRecord:
        row = self.rows[int(index)]
        record_id = str(row["record_id"])
        return RawRecord(
            signal=np.asarray(row["signal"], dtype=np.float32),
            fs=float(row["fs"]),
            leads=tuple(str(name) for name in row["leads"]),
            record_id=record_id,
            patient_id=str(row["patient_id"]) if row["patient_id"] else None,
            source=f"{self.path}:{record_id}",
        )


class WfdbFolderRecords(Dataset):
    """Every WFDB record (``*.hea``) under a folder, sorted by path; read on access (``None`` if unreadable)."""

    def __init__(self, root: str | os.PathLike, max_records: int | None = None) -> None:
        from enecg.data.wfdb_folder import find_headers

        self.root = Path(root)
        self.headers = find_headers(self.root, max_records)

    def __len__(self) -> int:
        return len(self.headers)

    def __getitem__(self, index: int) -> RawRecord | None:
        from enecg.io import read_record

        path = self.headers[int(index)]
        try:
            record = read_record(path)
        except RecordError as exc:
            logger.warning("skipping unreadable record: %s", exc)
            return None
        return RawRecord(
            signal=record.signal,
            fs=float(record.fs),
            leads=tuple(record.leads),
            record_id=record.record_id,
            patient_id=record.patient_id,
            source=str(path),
        )


def open_records(
    path: str | os.PathLike, splits: tuple[str, ...] = ("train",), max_records: int | None = None
) -> ArrowRecords | WfdbFolderRecords:
    """A prepared dataset folder (has ``enecg_dataset.json``) or a folder of WFDB records -> a records Dataset."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: pretraining data not found (expected a dataset or record folder)")
    if (path / META_FILE).is_file():
        return ArrowRecords(path, splits, max_records)
    return WfdbFolderRecords(path, max_records)


class SegmentPairCollator:
    """Collate raw records into a CMSC batch under ``contract`` (which must cut ``segments``).

    Returns a dict of tensors:

    * ``first``, ``second``: float32 ``(B, leads, length)``: windows ``i`` and ``i + 1`` of each record, ``i``
      drawn uniformly (torch's global RNG: seeded by ``set_seed`` and per DataLoader worker). A record with a single
      window (shorter than two windows) gives it twice: its positive pair is then two augmentations of one segment,
      as in SimCLR.
    * ``adjacent``: bool ``(B,)``: True where the pair really is two adjacent segments.
    * ``groups``: int64 ``(B,)``: the patient of each record as a batch-local integer (records without a patient id
      get their own), for patient-level positives.
    * ``n_records``, ``n_skipped``: int64 scalars: records in the batch, records dropped as unreadable.
    """

    def __init__(self, contract: InputContract) -> None:
        if contract.long_records != "segments" or contract.length is None or contract.layout != "leads_time":
            raise ValueError(
                "pretraining needs a contract with a window length, long_records='segments' and layout='leads_time'"
            )
        self.contract = contract

    def _windows(self, records: list[RawRecord]) -> list[np.ndarray | None]:
        """Contract windows ``(n_windows, leads, length)`` per record (None where the contract refuses it)."""
        out: list[np.ndarray | None] = [None] * len(records)
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            groups[(record.fs, record.leads, record.signal.shape)].append(i)
        for indices in groups.values():
            first = records[indices[0]]
            if len(indices) > 1:
                try:
                    prepared = apply_contract_array(
                        np.stack([records[i].signal for i in indices]),
                        first.fs,
                        first.leads,
                        self.contract,
                        source=f"batch of {len(indices)} records ({first.source}, ...)",
                    )
                except RecordError:
                    pass  # one bad record in the group: redo them one by one so the error names its file
                else:
                    for i, windows in zip(indices, prepared.windows):
                        out[i] = windows
                    continue
            for i in indices:
                record = records[i]
                try:
                    out[i] = apply_contract_array(
                        record.signal, record.fs, record.leads, self.contract, source=record.source
                    ).windows
                except RecordError as exc:
                    logger.warning("skipping record the contract refuses: %s", exc)
        return out

    def __call__(self, items: list[RawRecord | None]) -> dict[str, torch.Tensor]:
        records = [item for item in items if item is not None]
        prepared = self._windows(records)
        kept = [(r, w) for r, w in zip(records, prepared) if w is not None]
        n_skipped = len(items) - len(kept)
        if not kept:
            raise RuntimeError(f"no usable record in a batch of {len(items)} (see the warnings above)")
        first, second, adjacent, patients = [], [], [], []
        for record, windows in kept:
            n = windows.shape[0]
            start = int(torch.randint(n - 1, ()).item()) if n > 1 else 0
            first.append(windows[start])
            second.append(windows[min(start + 1, n - 1)])
            adjacent.append(n > 1)
            patients.append(record.patient_id if record.patient_id else f"record:{record.record_id}")
        index = {patient: k for k, patient in enumerate(dict.fromkeys(patients))}
        return {
            "first": torch.from_numpy(np.stack(first)),
            "second": torch.from_numpy(np.stack(second)),
            "adjacent": torch.tensor(adjacent, dtype=torch.bool),
            "groups": torch.tensor([index[p] for p in patients], dtype=torch.long),
            "n_records": torch.tensor(len(kept), dtype=torch.long),
            "n_skipped": torch.tensor(n_skipped, dtype=torch.long),
        }


__all__ = [
    "ArrowRecords",
    "RawRecord",
    "SegmentPairCollator",
    "WfdbFolderRecords",
    "open_records",
]
