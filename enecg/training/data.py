"""Training data: which parts each run uses, records -> batches, and the deterministic epoch sampler.

A *run* is one training of a fresh ensemble: the hold-out run (``train``/``validation``/``test`` parts), or one
fold of k-fold cross-validation (fold i = test, fold i+1 = validation, the others = training), times
``optim.repeats``. Runs never share trained state and a run's test part never reaches its training parts.

Batches are plain dicts of tensors (what ``accelerate`` moves between devices and gathers)::

    {"index": (B,) row positions in the part, "expert_inputs": {expert: windows or embeddings},
     "gate_input": (B, ...) (signal gate only), "demographics": (B, 2), "labels": {task: (B,) or (B, K)}}

:class:`RecordBatches` prepares records on the fly with :class:`~enecg.ensemble.inputs.EnsembleInputBuilder`
(every expert's contract and the gate's on the same records); :class:`enecg.ensemble.feature_cache.FeatureTable`
serves the same dicts from cached embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from enecg.data.rows import label_arrays, rows_to_records
from enecg.data.schema import DatasetMeta, TaskInfo
from enecg.data.splits import fold_part
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.record import ECGRecord
from enecg.training.recipe import DataSection, Recipe

logger = logging.getLogger(__name__)

# Columns a batch needs (the signal is the heavy one; label columns are added per task).
_RECORD_COLUMNS = ("record_id", "patient_id", "source", "signal", "fs", "leads", "age", "sex", "split")


@dataclass
class RunPlan:
    """One training run: its name, seed and the dataset parts it reads."""

    name: str = field(metadata={"help": "Sub-folder of the output folder ('' for a single hold-out run)."})
    seed: int = field(metadata={"help": "Seed of this run (initialisation, shuffling, dropout)."})
    train_parts: list[str] = field(metadata={"help": "Parts trained on."})
    validation_part: str = field(metadata={"help": "Part for model selection / early stopping."})
    test_part: str | None = field(metadata={"help": "Part evaluated once at the end (never trained on)."})
    fold: int | None = field(default=None, metadata={"help": "k-fold index, or None."})
    repeat: int = field(default=0, metadata={"help": "Repeat index (seed = optim.seed + repeat)."})


def plan_runs(recipe: Recipe, meta: DatasetMeta | None = None) -> list[RunPlan]:
    """The runs of a recipe: hold-out (x repeats) or k-fold (x repeats); checks the parts exist in ``meta``."""
    data, optim = recipe.data, recipe.optim
    runs: list[RunPlan] = []
    for repeat in range(optim.repeats):
        seed = optim.seed + repeat
        suffix = f"repeat_{repeat}" if optim.repeats > 1 else ""
        if data.kfold is None:
            runs.append(
                RunPlan(
                    suffix, seed, list(data.train_parts), data.validation_part, data.test_part, None, repeat
                )
            )
            continue
        k = data.kfold
        for fold in data.folds if data.folds is not None else range(k):
            if not 0 <= fold < k:
                raise ValueError(f"data.folds: fold {fold} is not in 0..{k - 1}")
            test, validation = fold_part(fold), fold_part((fold + 1) % k)
            train = [fold_part(i) for i in range(k) if fold_part(i) not in (test, validation)]
            name = f"fold_{fold}" + (f"/{suffix}" if suffix else "")
            # Each fold gets its own seed too, so folds are not trained with identical randomness.
            runs.append(RunPlan(name, seed + 1000 * fold, train, validation, test, fold, repeat))
    if meta is not None:
        available = set(meta.splits)
        for run in runs:
            used = [*run.train_parts, run.validation_part, *([run.test_part] if run.test_part else [])]
            missing = sorted(set(used) - available)
            if missing:
                raise ValueError(
                    f"{recipe.data.path}: dataset has no parts {missing} (it has {sorted(available)}); "
                    + (
                        "build it with kfold"
                        if data.kfold
                        else "check data.train_parts/validation_part/test_part"
                    )
                )
            if run.test_part and run.test_part in [*run.train_parts, run.validation_part]:
                raise ValueError(
                    f"run {run.name or 'hold-out'}: test part {run.test_part!r} is also trained on"
                )
    return runs


def load_training_dataset(data: DataSection) -> tuple[datasets.DatasetDict, DatasetMeta]:
    """Load the prepared dataset of a recipe, building it from ``prepare_from`` (PTB-XL) when it is missing."""
    from enecg.data.build import load_dataset_dir

    path = Path(data.path)
    if data.prepare_from and not (path / "enecg_dataset.json").is_file():
        from enecg.data.download import download_ptbxl, ptbxl_present
        from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

        if data.download and not ptbxl_present(data.prepare_from, data.rate):
            logger.info("PTB-XL not found in %s: downloading it from PhysioNet (wfdb)", data.prepare_from)
            download_ptbxl(data.prepare_from, rates=(data.rate,))
        logger.info("preparing PTB-XL from %s into %s", data.prepare_from, path)
        prepare_ptbxl(data.prepare_from, path, PtbxlOptions(rate=data.rate, kfold=data.kfold))
    return load_dataset_dir(path)


def select_part(
    dataset: datasets.DatasetDict, parts: Sequence[str], max_records: int | None
) -> datasets.Dataset:
    """The rows of one or more parts (concatenated, in order), optionally only the first ``max_records`` of each."""
    pieces = []
    for part in parts:
        piece = dataset[part]
        if max_records is not None and len(piece) > max_records:
            piece = piece.select(range(max_records))
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def regression_stats(part: datasets.Dataset, task: str) -> tuple[float, float]:
    """Mean and standard deviation of a regression target over labelled rows (the training parts only)."""
    values = np.asarray(part.with_format("numpy")[task], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size < 2:
        raise ValueError(f"regression task {task!r}: fewer than 2 labelled training records")
    std = float(values.std())
    return float(values.mean()), std if std > 0 else 1.0


class IndexDataset(Dataset):
    """Yields row positions ``0..n-1``; the collate function turns a list of positions into a batch."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


class RecordBatches:
    """Collate function: row positions -> batch dict with every expert's contract (and the gate's) applied.

    Picklable (an Arrow dataset is memory-mapped), so it runs in DataLoader workers.
    """

    def __init__(
        self, part: datasets.Dataset, builder: EnsembleInputBuilder, tasks: Sequence[TaskInfo]
    ) -> None:
        wanted = (*_RECORD_COLUMNS, *(t.name for t in tasks))
        columns = list(dict.fromkeys(c for c in wanted if c in part.column_names))  # age/sex are both
        self.part = part.select_columns(columns).with_format("numpy")
        self.builder = builder
        self.tasks = list(tasks)

    def __len__(self) -> int:
        return len(self.part)

    def records(self, indices: Sequence[int]) -> tuple[list[ECGRecord], list[dict[str, Any]]]:
        return rows_to_records(self.part[list(indices)])

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        records, rows = self.records(indices)
        prepared = self.builder(records)
        batch: dict[str, Any] = {
            "index": torch.as_tensor(list(indices), dtype=torch.long),
            "expert_inputs": prepared.expert_inputs,
            "window_masks": prepared.window_masks,
            "lead_masks": prepared.lead_masks,
            "valid_samples": prepared.valid_samples,
            "available": prepared.available,
            "demographics": prepared.demographics,
            "labels": {k: torch.from_numpy(v) for k, v in label_arrays(rows, self.tasks).items()},
        }
        if prepared.gate_input is not None:
            batch["gate_input"] = prepared.gate_input
        return batch


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``.

    Resuming mid-epoch replays the same order (call :meth:`set_epoch` and skip the batches already done), and every
    process of a distributed run draws the same permutation (Accelerate then gives each process its share), without
    touching the global RNG.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.length, generator=generator).tolist()


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of one micro-batch on one process: dropout/noise depend on (seed, rank, step) only, so a resumed run
    draws exactly what an uninterrupted one does, whatever RNG state checkpoint loading or iterators left."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63 - 1)
