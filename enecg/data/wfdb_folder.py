"""A folder of plain WFDB records (any lead set, length, rate; ``.dat`` or ``.mat``) -> an enecg dataset.

No labels are needed: rows carry the signal, age/sex when header comments give them, and optionally the
``heart_rate`` target. Each record is its own patient (headers carry no patient ids); parts are drawn per record
with a seed (hold-out fractions or k-fold).

Labels may come from a CSV (``--labels``; ``enecg generate sample`` writes one): a ``record`` column (path below
the folder, without suffix), an optional ``source`` column, and one 0/1 column per label named ``<task>:<label>``
(each task becomes a multilabel label set). A record whose header has a ``# Synthetic: <model>`` comment (or whose
CSV ``source`` is ``synthetic:<model>``) is generated: its ``source`` is ``synthetic:<model>`` and it always goes
to the training part; k-fold parts (each a test fold once) refuse such records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from enecg.data.build import BuildPlan, RecordJob, build_dataset
from enecg.data.schema import SYNTHETIC_PREFIX, TaskInfo, is_synthetic
from enecg.data.splits import HOLDOUT_PARTS, group_holdout, group_kfold, kfold_parts
from enecg.data.targets import AGE_TASK, SEX_TASK
from enecg.io.comments import comment_fields

SOURCE = "wfdb"
# Header comment key of generated records: ``# Synthetic: <model>``.
SYNTHETIC_COMMENT = "Synthetic"
WFDB_TASKS = ("age", "sex")


@dataclass
class SplitOptions:
    """Random patient-level parts (sources without official folds)."""

    seed: int = field(default=0, metadata={"help": "Seed of the patient-level split."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Fraction of patients in validation."})
    test_fraction: float = field(default=0.1, metadata={"help": "Fraction of patients in test."})
    kfold: int | None = field(
        default=None, metadata={"help": "k-fold parts fold_0..fold_{k-1} instead of hold-out."}
    )

    def parts(self) -> list[str]:
        return kfold_parts(self.kfold) if self.kfold else list(HOLDOUT_PARTS)

    def assign(self, jobs: list[RecordJob]) -> None:
        """Set each job's part from its patient (record id when the patient is unknown)."""
        patients = [job.patient_id or job.record_id for job in jobs]
        if self.kfold:
            part_of = group_kfold(patients, self.kfold, self.seed)
        else:
            part_of = group_holdout(patients, self.seed, self.validation_fraction, self.test_fraction)
        for job, patient in zip(jobs, patients):
            job.split = part_of[patient]


@dataclass
class WfdbFolderOptions(SplitOptions):
    tasks: tuple[str, ...] = field(
        default=(), metadata={"help": f"Label sets from header comments, of {WFDB_TASKS}."}
    )
    hr_target: bool = field(default=False, metadata={"help": "Add the heart_rate regression target (gqrs)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N records (sorted by path)."})
    labels: str | None = field(
        default=None,
        metadata={"help": "CSV of labels: record, [source], one 0/1 column per '<task>:<label>'."},
    )


def find_headers(root: Path, limit: int | None = None) -> list[Path]:
    """Every ``.hea`` under ``root``, sorted by relative path (deterministic record order)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    headers = sorted(root.rglob("*.hea"), key=lambda p: p.relative_to(root).as_posix())
    if not headers:
        raise FileNotFoundError(f"{root}: no WFDB headers (*.hea) found")
    return headers[:limit] if limit else headers


def synthetic_mark(path: Path) -> str | None:
    """The model named by a ``# Synthetic: <model>`` header comment, or None for a real record."""
    hea = path.with_suffix(".hea") if path.suffix != ".hea" else path
    try:  # headers in the wild use any encoding; an unreadable one is the reader's to report (skipped)
        text = hea.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    comments = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    return comment_fields(comments).get(SYNTHETIC_COMMENT.lower())


def apply_labels_csv(path: Path, root: Path, jobs: list[RecordJob]) -> list[TaskInfo]:
    """Read a labels CSV into the jobs' values; returns the label sets it defines (multilabel)."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels CSV not found")
    table = pd.read_csv(path, dtype={"record": str})
    if "record" not in table.columns:
        raise ValueError(f"{path}: a labels CSV needs a 'record' column; columns: {list(table.columns)}")
    names: dict[str, list[str]] = {}
    for column in table.columns:
        task, sep, label = str(column).partition(":")
        if sep:
            names.setdefault(task, []).append(label)
    by_record = {str(r["record"]): r for r in table.to_dict("records")}
    for job in jobs:
        row = by_record.get(job.record_id.removeprefix(f"{SOURCE}:"))
        for task, labels in names.items():
            job.values[task] = [float(row[f"{task}:{label}"]) if row else math.nan for label in labels]
        if row and isinstance(row.get("source"), str) and row["source"]:
            job.values["source"] = row["source"]
    return [
        TaskInfo(name=task, type="multilabel", names=labels, description=f"from {path.name}")
        for task, labels in names.items()
    ]


def plan_wfdb_folder(root: str | Path, options: WfdbFolderOptions | None = None) -> BuildPlan:
    options = options or WfdbFolderOptions()
    unknown = sorted(set(options.tasks) - set(WFDB_TASKS))
    if unknown:
        raise ValueError(f"unknown wfdb-folder tasks {unknown}; known: {list(WFDB_TASKS)}")
    root = Path(root).absolute()
    jobs = [
        RecordJob(
            path=str(hea), record_id=f"{SOURCE}:{hea.relative_to(root).with_suffix('').as_posix()}", split=""
        )
        for hea in find_headers(root, options.limit)
    ]
    tasks: list[TaskInfo] = [t for t in (AGE_TASK, SEX_TASK) if t.name in options.tasks]
    for job in jobs:
        model = synthetic_mark(Path(job.path))
        if model is not None:
            job.values["source"] = f"{SYNTHETIC_PREFIX}{model}"
    if options.labels:
        tasks += apply_labels_csv(Path(options.labels), root, jobs)
    options.assign(jobs)
    generated = [job for job in jobs if is_synthetic(job.values.get("source"))]
    if generated and options.kfold:
        raise ValueError(
            f"{root}: {len(generated)} synthetic record(s) cannot be k-folded (every fold is a test fold once); "
            "use hold-out parts (they join the training part)"
        )
    for job in generated:
        job.split = "train"
    recorded = asdict(options)
    recorded["root"] = str(root)
    return BuildPlan(
        source=SOURCE,
        jobs=jobs,
        tasks=tasks,
        parts=options.parts(),
        options=recorded,
        input_files=[Path(options.labels)] if options.labels else [],
        hr_target=options.hr_target,
    )


def prepare_wfdb_folder(
    root: str | Path,
    out: str | Path,
    options: WfdbFolderOptions | None = None,
    workers: int = 2,
    force: bool = False,
):
    """Build (or reuse) a dataset from a folder of WFDB records; returns ``(DatasetDict, DatasetMeta)``."""
    return build_dataset(plan_wfdb_folder(root, options), out, workers=workers, force=force)
