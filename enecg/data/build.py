"""The dataset build engine shared by every source (PTB-XL, CinC, plain WFDB folders).

A source module turns its inputs into a :class:`BuildPlan` (one :class:`RecordJob` per record: header path, split
part, labels known from tables); :func:`build_dataset` then reads the records in parallel, writes the
``datasets.DatasetDict`` + ``enecg_dataset.json`` described in :mod:`enecg.data.schema`, and

* skips records that fail to read (:class:`~enecg.record.RecordError`), logging why and listing them in
  ``meta.skipped``; the rest of the build goes on; when no record at all is usable nothing is written and
  :class:`NoUsableRecordsError` says so (never an empty dataset);
* reuses an existing folder when its ``cache_key`` (options + input files' names, sizes and mtimes) matches;
* writes atomically: everything is built in a hidden folder beside the target which is renamed into place only
  when complete, so an interrupted build never leaves a folder that :func:`load_dataset_dir` accepts (and a failed
  rebuild leaves the previous dataset untouched).

Signals are stored as nested lists of float32 (``List(List(float32))``) so records of any lead count and length
fit one column; ``with_format("numpy")`` gives each row's signal back as a float32 ``(leads, samples)`` array.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from enecg.data.rows import row_to_record
from enecg.data.schema import (
    META_FILE,
    SCHEMA_VERSION,
    DatasetMeta,
    TaskInfo,
    is_evaluation_part,
    refuse_synthetic,
)
from enecg.data.splits import assert_patients_disjoint
from enecg.data.targets import heart_rate_target, heart_rate_task
from enecg.io import header_path, read_record
from enecg.record import ECGRecord, RecordError

logger = logging.getLogger(__name__)

# Bump when the rows written for the same inputs change (invalidates cached builds).
BUILDER_VERSION = 1
_SIGNAL_SUFFIXES = (".dat", ".mat")
_List = getattr(datasets, "List", None) or datasets.Sequence  # datasets >= 4 has List; Sequence before


class NoUsableRecordsError(RuntimeError):
    """Every record of a build was skipped: no dataset is written (an existing one is left as it was)."""


@dataclass
class RecordJob:
    """One record to read. ``values`` are columns known before reading (table labels, age, sex); they override
    what the reader finds in the header."""

    path: str
    record_id: str
    split: str
    patient_id: str | None = None
    values: dict[str, Any] = field(default_factory=dict)


Labeler = Callable[[ECGRecord], dict[str, Any]]
# Makes the record of a job instead of reading ``job.path`` (e.g. a simulator); raises RecordError to skip it.
RecordReader = Callable[[RecordJob], ECGRecord]


@dataclass
class BuildPlan:
    """Everything :func:`build_dataset` needs. ``labeler`` (a picklable callable) derives label columns from the
    record itself (e.g. CinC ``Dx`` comments); ``options`` are recorded in the meta and the cache key.
    ``reader`` (a picklable callable) makes each job's record instead of ``read_record(job.path)``: generated
    sources (the synthetic set) have no files, so their cache key is options + jobs only."""

    source: str
    jobs: list[RecordJob]
    tasks: list[TaskInfo]
    parts: list[str]
    options: dict[str, Any]
    input_files: list[Path] = field(default_factory=list)
    labeler: Labeler | None = None
    hr_target: bool = False
    skipped: list[dict[str, str]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    reader: RecordReader | None = None

    def all_tasks(self) -> list[TaskInfo]:
        return [*self.tasks, heart_rate_task()] if self.hr_target else list(self.tasks)


def dataset_features(tasks: list[TaskInfo]) -> datasets.Features:
    """The Arrow schema of a dataset with these tasks (``age``/``sex`` tasks reuse the base columns)."""
    features = {
        "record_id": datasets.Value("string"),
        "patient_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "signal": _List(_List(datasets.Value("float32"))),
        "fs": datasets.Value("float64"),
        "leads": _List(datasets.Value("string")),
        "age": datasets.Value("float32"),
        "sex": datasets.Value("float32"),
        "split": datasets.Value("string"),
    }
    for task in tasks:
        if task.name in features:
            continue
        if task.type == "multilabel":
            features[task.name] = _List(datasets.Value("float32"), length=len(task.names))
        else:
            features[task.name] = datasets.Value("float32")
    return datasets.Features(features)


def cache_key(plan: BuildPlan) -> str:
    """Hash of the options, the task definitions and every input file's path, size and mtime."""
    files: list[Path] = [Path(p) for p in plan.input_files]
    for job in plan.jobs if plan.reader is None else ():
        hea = header_path(job.path)
        files.append(hea)
        files.extend(hea.with_suffix(suffix) for suffix in _SIGNAL_SUFFIXES)
    stats = []
    for path in files:
        try:
            st = path.stat()
            stats.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(path), None, None))
    payload = {
        "builder_version": BUILDER_VERSION,
        "schema_version": SCHEMA_VERSION,
        "source": plan.source,
        "options": plan.options,
        "tasks": [asdict(t) for t in plan.all_tasks()],
        "parts": plan.parts,
        "jobs": [asdict(job) for job in plan.jobs],
        "files": stats,
    }
    text = json.dumps(payload, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_row(
    job: RecordJob,
    source: str,
    labeler: Labeler | None,
    hr_target: bool,
    reader: RecordReader | None = None,
) -> tuple[Any, ...]:
    """Worker: read one record into a row. Returns (row, None, hr_note) or (None, skip_entry, None)."""
    try:
        record = reader(job) if reader is not None else read_record(job.path)
    except RecordError as exc:
        return None, {"record": job.record_id, "path": exc.path, "reason": exc.problem}, None
    row: dict[str, Any] = {
        "record_id": job.record_id,
        "patient_id": job.patient_id or job.record_id,
        "source": source,
        "signal": record.signal,
        "fs": record.fs,
        "leads": list(record.leads),
        "age": record.metadata.get("age", math.nan),
        "sex": record.metadata.get("sex", math.nan),
        "split": job.split,
    }
    if labeler is not None:
        row.update(labeler(record))
    row.update(job.values)
    note = None
    if hr_target:
        row["heart_rate"], note = heart_rate_target(record)
    return row, None, note


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is cheapest (workers need no re-import); elsewhere (macOS, Windows) spawn is the safe default.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context(
        "fork" if sys.platform.startswith("linux") and "fork" in methods else None
    )


@contextmanager
def _datasets_bars_off() -> Iterator[None]:
    """Our own tqdm bar shows the record progress; datasets' per-split bars would only add noise."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def build_dataset(
    plan: BuildPlan, out: str | os.PathLike, workers: int = 2, force: bool = False
) -> tuple[datasets.DatasetDict, DatasetMeta]:
    """Build (or reuse) the dataset folder ``out`` from ``plan``; return it as loaded from disk.

    Args:
        plan: the records, parts, tasks and options (from a source module).
        out: target folder. An existing folder is replaced only if it is an enecg dataset.
        workers: reader processes (1: read in this process).
        force: rebuild even if ``out`` holds a dataset with the same cache key.
    """
    out = Path(out).absolute()
    key = cache_key(plan)
    if not force and (out / META_FILE).is_file():
        try:
            existing = DatasetMeta.load(out)
        except (ValueError, TypeError, KeyError) as exc:
            logger.info("%s: existing dataset unreadable (%s); rebuilding", out, exc)
        else:
            if existing.cache_key == key:
                logger.info("%s: inputs and options unchanged (cache key %s): reusing it", out, key[:12])
                return load_dataset_dir(out)
    if out.exists() and not (out / META_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise RuntimeError(f"{out}: exists and is not an enecg dataset; refusing to replace it")
    assert_patients_disjoint((job.patient_id or job.record_id, job.split) for job in plan.jobs)
    refuse_synthetic(
        [job.values.get("source", plan.source) for job in plan.jobs if is_evaluation_part(job.split)],
        f"{out}: validation/test parts",
    )
    _remove_stale_temporaries(out)

    tasks = plan.all_tasks()
    features = dataset_features(tasks)
    token = uuid.uuid4().hex[:8]
    staging = out.parent / f".{out.name}.building-{token}"
    generator_cache = out.parent / f".{out.name}.cache-{token}"
    skipped = list(plan.skipped)
    hr_notes: list[tuple[str, str]] = []
    read = functools.partial(
        _read_row, source=plan.source, labeler=plan.labeler, hr_target=plan.hr_target, reader=plan.reader
    )
    try:
        staging.mkdir(parents=True)
        parts: dict[str, datasets.Dataset] = {}
        pool = _pool_context().Pool(workers) if workers > 1 else None
        try:
            with (
                _datasets_bars_off(),
                tqdm(total=len(plan.jobs), desc=f"{plan.source} records", unit="rec") as bar,
            ):
                for part in plan.parts:
                    jobs = [job for job in plan.jobs if job.split == part]
                    results = pool.imap(read, jobs, chunksize=4) if pool else map(read, jobs)
                    parts[part] = _part_dataset(
                        results, features, generator_cache, f"{key}-{part}", bar, skipped, hr_notes
                    )
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        for entry in skipped[len(plan.skipped) :]:
            logger.warning("skipped %s: %s: %s", entry["record"], entry["path"], entry["reason"])
        for record_id, note in hr_notes:
            logger.info("heart_rate NaN for %s: %s", record_id, note)
        if skipped and any(len(ds) for ds in parts.values()):
            logger.warning(
                "%d of %d records skipped (listed in %s 'skipped')", len(skipped), len(plan.jobs), META_FILE
            )
        if plan.jobs and not any(len(ds) for ds in parts.values()):
            first = skipped[len(plan.skipped)] if len(skipped) > len(plan.skipped) else None
            example = f"; first: {first['path']}: {first['reason']}" if first else ""
            raise NoUsableRecordsError(
                f"{out}: nothing written, none of the {len(plan.jobs)} {plan.source} records is usable "
                f"({len(skipped) - len(plan.skipped)} skipped, reasons logged above){example}"
            )
        meta = DatasetMeta(
            source=plan.source,
            tasks=tasks,
            splits={part: len(ds) for part, ds in parts.items()},
            skipped=skipped,
            options=plan.options,
            dropped=plan.dropped,
            cache_key=key,
        )
        with _datasets_bars_off():
            # datasets writes 0 shards for an empty part, which then fails to load: ask for one shard.
            empty_parts = {part: 1 for part, ds in parts.items() if len(ds) == 0}
            datasets.DatasetDict(parts).save_to_disk(str(staging), num_shards=empty_parts or None)
        del parts
        meta.save(staging)  # written last: a staging folder without it is never a dataset
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(generator_cache, ignore_errors=True)
    logger.info("wrote %s: %s", out, meta.splits)
    return load_dataset_dir(out)


def _part_dataset(
    results: Iterator[tuple[Any, ...]],
    features: datasets.Features,
    cache_dir: Path,
    fingerprint: str,
    bar: tqdm,
    skipped: list[dict[str, str]],
    hr_notes: list[tuple[str, str]],
) -> datasets.Dataset:
    n_rows = 0
    exhausted = False
    failures: list[BaseException] = []

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal n_rows, exhausted
        try:
            for row, skip, note in results:
                bar.update(1)
                if skip is not None:
                    skipped.append(skip)
                    continue
                if note is not None:
                    hr_notes.append((row["record_id"], note))
                n_rows += 1
                yield row
        except BaseException as exc:
            failures.append(exc)
            raise
        exhausted = True

    try:
        return datasets.Dataset.from_generator(
            rows, features=features, cache_dir=str(cache_dir), fingerprint=fingerprint
        )
    except Exception as exc:
        if failures:  # the real error, not datasets' DatasetGenerationError wrapper
            raise failures[0] from None
        if exhausted and n_rows == 0 and isinstance(exc, ValueError):
            # datasets refuses to generate a part without rows; an empty part is legitimate here.
            return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        raise


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the complete ``staging`` folder to ``out``; an older dataset there is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Remove leftovers of builds of ``out`` that were killed (they are hidden and never load as datasets)."""
    if not out.parent.is_dir():
        return
    for pattern in (f".{out.name}.building-*", f".{out.name}.cache-*", f".{out.name}.old-*"):
        for leftover in out.parent.glob(pattern):
            logger.info("removing leftover of an interrupted build: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def load_dataset_dir(path: str | os.PathLike) -> tuple[datasets.DatasetDict, DatasetMeta]:
    """Load a prepared dataset folder: ``(DatasetDict, DatasetMeta)``; memory-mapped, fast.

    Raises FileNotFoundError when ``path`` is not a complete enecg dataset, ValueError when its parts disagree
    with its meta.
    """
    path = Path(path)
    meta = DatasetMeta.load(path)
    dataset_dict = datasets.load_from_disk(str(path))
    if not isinstance(dataset_dict, datasets.DatasetDict):
        raise ValueError(f"{path}: holds a single Dataset, expected a DatasetDict of split parts")
    found = {name: len(ds) for name, ds in dataset_dict.items()}
    if found != meta.splits:
        raise ValueError(f"{path}: parts {found} do not match {META_FILE} splits {meta.splits}")
    return dataset_dict, meta


def load_records(path: str | os.PathLike, part: str, limit: int | None = None) -> list[ECGRecord]:
    """The records of one part of a prepared dataset folder, in row order, as :class:`ECGRecord` objects (the
    first ``limit`` ones when given)."""
    dataset, _ = load_dataset_dir(path)
    rows = dataset[part].with_format("numpy")
    n = len(rows) if limit is None else min(limit, len(rows))
    return [row_to_record(rows[i]) for i in range(n)]
