"""The Shandong Provincial Hospital (SPH) 12-lead ECG database -> an enecg dataset.

Source: Liu et al., "A large-scale multi-label 12-lead electrocardiogram database with standardized diagnostic
statements", Scientific Data 9, 272 (2022), released on figshare (10.6084/m9.figshare.c.5779802): 25,770 records
of 24,666 patients, 500 Hz, 10-60 s. Layout read here:

* ``records/<ECG_ID>.h5`` (or ``<ECG_ID>.h5`` beside the table): the signal, read by :func:`enecg.io.sph.read_sph_record`;
* ``metadata.csv``: one row per record, columns ``ECG_ID``, ``AHA_Code``, ``Patient_ID``, ``Age``, ``Sex``
  (``M``/``F``), ``N`` (samples), ``Date``. ``AHA_Code`` lists the record's AHA/ACC/HRS statements separated by
  ``;``, each a primary statement optionally followed by modifiers with ``+`` (``50+346``); as in the release's
  own analysis code, codes 200-499 are modifiers and the others primary statements.

Tasks: ``aha`` (multi-label; the primary statements, by default every one present in ``metadata.csv``, sorted by
code; or those given), ``age`` and ``sex``. Parts are drawn by ``Patient_ID`` (several records of one patient never
sit in two parts). Records listed in ``metadata.csv`` whose file is missing or unusable are skipped with their
reason; ``.h5`` files the table does not list are dropped (no labels), listed in the meta's ``dropped``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from enecg.data.build import BuildPlan, RecordJob, build_dataset
from enecg.data.schema import TaskInfo
from enecg.data.targets import AGE_TASK, SEX_TASK
from enecg.data.wfdb_folder import SplitOptions
from enecg.io.comments import parse_age, parse_sex
from enecg.io.sph import read_sph_record
from enecg.record import ECGRecord

SOURCE = "sph"
SPH_TASKS = ("aha", "age", "sex")
METADATA_FILE = "metadata.csv"
REQUIRED_COLUMNS = ("ECG_ID", "AHA_Code", "Patient_ID")
_MODIFIER_CODES = range(200, 500)  # AHA/ACC/HRS modifiers (the release's analysis code: 200 <= code < 500)


def primary_codes(aha_code: str | float | None) -> list[str]:
    """The primary statements of an ``AHA_Code`` cell (``"50+346;1"`` -> ``["50", "1"]``), in order, no repeats.

    Raises ValueError for a code that is not a whole number (the table is then not the SPH release's).
    """
    if aha_code is None or (isinstance(aha_code, float) and math.isnan(aha_code)):
        return []
    codes: list[str] = []
    for statement in str(aha_code).split(";"):
        for code in (c.strip() for c in statement.split("+")):
            if not code:
                continue
            if not code.isdigit():
                raise ValueError(f"AHA code {code!r} in {aha_code!r} is not a whole number")
            if int(code) not in _MODIFIER_CODES and code not in codes:
                codes.append(code)
    return codes


@dataclass
class SphOptions(SplitOptions):
    classes: str | None = field(
        default=None,
        metadata={"help": "Comma list of primary AHA codes for the aha task (default: all in metadata.csv)."},
    )
    tasks: tuple[str, ...] = field(default=SPH_TASKS, metadata={"help": f"Label sets, of {SPH_TASKS}."})
    hr_target: bool = field(default=False, metadata={"help": "Add the heart_rate regression target (gqrs)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N rows of metadata.csv."})


@dataclass
class SphReader:
    """Picklable job -> record (the build engine's reader): the ``.h5`` file checked against the table's ``N``."""

    expected_samples: dict[str, int] = field(default_factory=dict)

    def __call__(self, job: RecordJob) -> ECGRecord:
        return read_sph_record(
            job.path, record_id=job.record_id, expected_samples=self.expected_samples.get(job.record_id)
        )


def read_metadata(root: Path) -> pd.DataFrame:
    """``metadata.csv`` with its codes and ids as text; one clear error when it is missing or not SPH's."""
    csv = root / METADATA_FILE
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: not found (root must be the SPH release folder)")
    table = pd.read_csv(csv, dtype={"ECG_ID": str, "AHA_Code": str, "Patient_ID": str}, encoding="utf-8-sig")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{csv}: missing columns {missing} (an SPH metadata.csv has {list(REQUIRED_COLUMNS)})")
    duplicated = table["ECG_ID"][table["ECG_ID"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{csv}: ECG_ID repeated: {duplicated[:5]}")
    return table


def _record_file(root: Path, ecg_id: str) -> Path:
    nested = root / "records" / f"{ecg_id}.h5"
    return nested if nested.is_file() or not (root / f"{ecg_id}.h5").is_file() else root / f"{ecg_id}.h5"


def aha_task(codes: list[str]) -> TaskInfo:
    return TaskInfo(
        name="aha",
        type="multilabel",
        names=list(codes),
        description="Primary AHA/ACC/HRS statements of metadata.csv's AHA_Code (modifiers 200-499 ignored); "
        "1 when listed, else 0 (the statement list is the record's complete diagnosis).",
    )


def plan_sph(root: str | Path, options: SphOptions | None = None) -> BuildPlan:
    """Jobs from ``metadata.csv`` (labels, age, sex, patient), parts by patient."""
    options = options or SphOptions()
    unknown = sorted(set(options.tasks) - set(SPH_TASKS))
    if unknown:
        raise ValueError(f"unknown SPH tasks {unknown}; known: {list(SPH_TASKS)}")
    root = Path(root).absolute()
    table = read_metadata(root)
    if options.limit:
        table = table.head(options.limit)
    where = root / METADATA_FILE
    row_codes = []
    for ecg_id, cell in zip(table["ECG_ID"], table["AHA_Code"]):
        try:
            row_codes.append(primary_codes(cell))
        except ValueError as exc:
            raise ValueError(f"{where}: ECG_ID {ecg_id}: {exc}") from None
    if options.classes:
        classes = [c.strip() for c in options.classes.split(",") if c.strip()]
        bad = [c for c in classes if not c.isdigit() or int(c) in _MODIFIER_CODES]
        if bad:
            raise ValueError(f"--classes: {bad} are not primary AHA statement codes")
    else:
        classes = sorted({c for codes in row_codes for c in codes}, key=int)
    jobs: list[RecordJob] = []
    expected: dict[str, int] = {}
    listed: set[Path] = set()
    for (_, row), codes in zip(table.iterrows(), row_codes):
        ecg_id = str(row["ECG_ID"]).strip()
        record_id = f"{SOURCE}:{ecg_id}"
        path = _record_file(root, ecg_id)
        listed.add(path)
        values: dict[str, Any] = {}  # age and sex are base columns of every dataset, tasks or not
        if "Age" in table.columns:
            values["age"] = parse_age(None if pd.isna(row["Age"]) else str(row["Age"]))
        if "Sex" in table.columns:
            values["sex"] = parse_sex(None if pd.isna(row["Sex"]) else str(row["Sex"]))
        if "aha" in options.tasks:
            present = set(codes)
            values["aha"] = [1.0 if c in present else 0.0 for c in classes]
        patient = row["Patient_ID"]
        jobs.append(
            RecordJob(
                path=str(path),
                record_id=record_id,
                split="",
                patient_id=None if pd.isna(patient) else f"{SOURCE}:{str(patient).strip()}",
                values=values,
            )
        )
        if "N" in table.columns and not pd.isna(row["N"]):
            expected[record_id] = int(row["N"])
    dropped = [
        {"record": f"{SOURCE}:{p.stem}", "path": str(p), "reason": f"not listed in {METADATA_FILE} (no labels)"}
        for p in sorted({*root.glob("*.h5"), *(root / "records").glob("*.h5")} - listed)
    ]
    options.assign(jobs)
    tasks = [t for t in (aha_task(classes), AGE_TASK, SEX_TASK) if t.name in options.tasks]
    recorded = asdict(options)
    recorded["root"] = str(root)
    return BuildPlan(
        source=SOURCE,
        jobs=jobs,
        tasks=tasks,
        parts=options.parts(),
        options=recorded,
        input_files=[where, *(Path(job.path) for job in jobs)],
        hr_target=options.hr_target,
        dropped=dropped,
        reader=SphReader(expected),
    )


def prepare_sph(
    root: str | Path,
    out: str | Path,
    options: SphOptions | None = None,
    workers: int = 2,
    force: bool = False,
):
    """Build (or reuse) an SPH dataset folder; returns ``(DatasetDict, DatasetMeta)``."""
    return build_dataset(plan_sph(root, options), out, workers=workers, force=force)
