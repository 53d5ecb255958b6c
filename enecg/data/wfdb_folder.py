"""A folder of plain WFDB records (any lead set, length, rate; ``.dat`` or ``.mat``) -> an enecg dataset.

No labels are needed: rows carry the signal, age/sex when header comments give them, and optionally the
``heart_rate`` target. Each record is its own patient (headers carry no patient ids); parts are drawn per record
with a seed (hold-out fractions or k-fold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from enecg.data.build import BuildPlan, RecordJob, build_dataset
from enecg.data.schema import TaskInfo
from enecg.data.splits import HOLDOUT_PARTS, group_holdout, group_kfold, kfold_parts
from enecg.data.targets import AGE_TASK, SEX_TASK

SOURCE = "wfdb"
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


def find_headers(root: Path, limit: int | None = None) -> list[Path]:
    """Every ``.hea`` under ``root``, sorted by relative path (deterministic record order)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    headers = sorted(root.rglob("*.hea"), key=lambda p: p.relative_to(root).as_posix())
    if not headers:
        raise FileNotFoundError(f"{root}: no WFDB headers (*.hea) found")
    return headers[:limit] if limit else headers


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
    options.assign(jobs)
    tasks: list[TaskInfo] = [t for t in (AGE_TASK, SEX_TASK) if t.name in options.tasks]
    recorded = asdict(options)
    recorded["root"] = str(root)
    return BuildPlan(
        source=SOURCE,
        jobs=jobs,
        tasks=tasks,
        parts=options.parts(),
        options=recorded,
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
