"""PTB-XL: ``ptbxl_database.csv`` + ``scp_statements.csv`` + WFDB records -> an enecg dataset.

Label sets (tasks), from the SCP-ECG statements of each record (``scp_codes``: statement -> likelihood):

* ``superclass``: the 5 diagnostic superclasses NORM, MI, STTC, CD, HYP (multi-label). Convention of the PTB-XL
  benchmark (Strodthoff et al. 2021): every listed *diagnostic* statement counts, whatever its likelihood (0
  included); ``min_likelihood`` keeps only statements with likelihood >= that value (e.g. 1 to drop the
  likelihood-0 ones). A record with no diagnostic statement gets an all-NaN (missing) label, not all-zero.
* ``subclass``: the diagnostic subclasses (same rules).
* ``rhythm`` / ``form``: rhythm and form statements (their likelihoods are not used: PTB-XL gives them 0);
  all-NaN when the record has none of them.
* ``age`` (regression, years; PTB-XL writes 300 for ages above 89: stored as NaN) and ``sex`` (0 male, 1 female).

Splits come from ``strat_fold`` (the official patient-wise stratified folds): by default 1-8 train, 9 validation,
10 test; or ``kfold=k``: parts ``fold_0..fold_{k-1}`` grouping consecutive strat folds (k=5: {1,2}, {3,4}, ...).
"""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from enecg.data.build import BuildPlan, RecordJob, build_dataset
from enecg.data.schema import TaskInfo
from enecg.data.splits import HOLDOUT_PARTS, kfold_parts, strat_fold_group, strat_fold_part
from enecg.data.targets import AGE_TASK, SEX_TASK, multi_hot

logger = logging.getLogger(__name__)

SOURCE = "ptbxl"
DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
PTBXL_TASKS: tuple[str, ...] = ("superclass", "subclass", "rhythm", "form", "age", "sex")
# PTB-XL stores ages above 89 as 300 (de-identification).
_CENSORED_AGE = 300


@dataclass
class PtbxlOptions:
    """How to build a PTB-XL dataset (every field is recorded in the dataset meta and its cache key)."""

    rate: int = field(default=100, metadata={"help": "Sampling rate of the records to use: 100 or 500 Hz."})
    min_likelihood: float = field(
        default=0.0,
        metadata={
            "help": "Diagnostic statements count when their likelihood is >= this (0: all, the PTB-XL "
            "benchmark convention; e.g. 1 drops likelihood-0 statements)."
        },
    )
    tasks: tuple[str, ...] = field(
        default=PTBXL_TASKS, metadata={"help": f"Label sets to build, of {PTBXL_TASKS}."}
    )
    kfold: int | None = field(
        default=None,
        metadata={"help": "k-fold parts fold_0..fold_{k-1} from groups of strat folds (None: hold-out)."},
    )
    validation_folds: tuple[int, ...] = field(
        default=(9,), metadata={"help": "strat folds of the validation part."}
    )
    test_folds: tuple[int, ...] = field(default=(10,), metadata={"help": "strat folds of the test part."})
    hr_target: bool = field(default=False, metadata={"help": "Add the heart_rate regression target (gqrs)."})
    ecg_ids: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Only these ecg_ids (subsets for quick builds); None: all rows."}
    )

    def __post_init__(self) -> None:
        if self.rate not in (100, 500):
            raise ValueError(f"PTB-XL rate must be 100 or 500, got {self.rate}")
        unknown = sorted(set(self.tasks) - set(PTBXL_TASKS))
        if unknown:
            raise ValueError(f"unknown PTB-XL tasks {unknown}; known: {list(PTBXL_TASKS)}")


@dataclass
class ScpStatements:
    """The statement table, as the lookups the labels need."""

    superclass_of: dict[str, str]
    subclass_of: dict[str, str]
    subclasses: list[str]
    rhythm: list[str]
    form: list[str]
    known: set[str]

    @classmethod
    def read(cls, path: Path) -> ScpStatements:
        table = pd.read_csv(path, index_col=0)
        missing = {"diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"} - set(
            table.columns
        )
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        diagnostic = table[table["diagnostic"] == 1]
        return cls(
            superclass_of=diagnostic["diagnostic_class"].dropna().to_dict(),
            subclass_of=diagnostic["diagnostic_subclass"].dropna().to_dict(),
            subclasses=sorted(diagnostic["diagnostic_subclass"].dropna().unique()),
            rhythm=list(table.index[table["rhythm"] == 1]),
            form=list(table.index[table["form"] == 1]),
            known=set(table.index),
        )


def ptbxl_tasks(statements: ScpStatements, options: PtbxlOptions) -> list[TaskInfo]:
    likelihood = (
        "every listed diagnostic statement counts (any likelihood)"
        if options.min_likelihood <= 0
        else f"diagnostic statements with likelihood >= {options.min_likelihood}"
    )
    available = {
        "superclass": TaskInfo(
            "superclass",
            "multilabel",
            list(SUPERCLASSES),
            f"PTB-XL diagnostic superclasses; {likelihood}; all-NaN when the record has none.",
        ),
        "subclass": TaskInfo(
            "subclass",
            "multilabel",
            list(statements.subclasses),
            f"PTB-XL diagnostic subclasses; {likelihood}; all-NaN when the record has none.",
        ),
        "rhythm": TaskInfo(
            "rhythm",
            "multilabel",
            list(statements.rhythm),
            "PTB-XL rhythm statements; all-NaN when the record has none.",
        ),
        "form": TaskInfo(
            "form",
            "multilabel",
            list(statements.form),
            "PTB-XL form statements; all-NaN when the record has none.",
        ),
        "age": AGE_TASK,
        "sex": SEX_TASK,
    }
    return [available[name] for name in PTBXL_TASKS if name in options.tasks]


def parse_scp_codes(text: str, ecg_id: int, csv: Path) -> dict[str, float]:
    """The ``scp_codes`` cell (a Python dict literal) as statement -> likelihood."""
    try:
        codes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{csv}: ecg_id {ecg_id}: scp_codes {text!r} is not a dict literal") from None
    if not isinstance(codes, dict):
        raise ValueError(f"{csv}: ecg_id {ecg_id}: scp_codes {text!r} is not a dict")
    return {str(k): float(v) for k, v in codes.items()}


def record_labels(
    codes: dict[str, float], statements: ScpStatements, options: PtbxlOptions
) -> dict[str, Any]:
    """Label columns of one record from its statements."""
    diagnostic = [code for code, lik in codes.items() if lik >= options.min_likelihood]
    labels: dict[str, Any] = {}
    if "superclass" in options.tasks:
        present = {statements.superclass_of[c] for c in diagnostic if c in statements.superclass_of}
        labels["superclass"] = multi_hot(present, SUPERCLASSES)
    if "subclass" in options.tasks:
        present = {statements.subclass_of[c] for c in diagnostic if c in statements.subclass_of}
        labels["subclass"] = multi_hot(present, statements.subclasses)
    if "rhythm" in options.tasks:
        labels["rhythm"] = multi_hot(codes, statements.rhythm)
    if "form" in options.tasks:
        labels["form"] = multi_hot(codes, statements.form)
    return labels


def _float_or_nan(value: Any) -> float:
    return math.nan if pd.isna(value) else float(value)


def plan_ptbxl(root: str | Path, options: PtbxlOptions | None = None) -> BuildPlan:
    """Read the PTB-XL tables under ``root`` and plan one job per record."""
    options = options or PtbxlOptions()
    root = Path(root).absolute()
    database_csv, statements_csv = root / DATABASE_CSV, root / STATEMENTS_CSV
    for path in (database_csv, statements_csv):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; --root must be a PTB-XL folder (with {DATABASE_CSV})"
            )
    statements = ScpStatements.read(statements_csv)
    database = pd.read_csv(database_csv, index_col="ecg_id")
    filename_column = "filename_lr" if options.rate == 100 else "filename_hr"
    needed = {"scp_codes", "age", "sex", "patient_id", "strat_fold", filename_column}
    if needed - set(database.columns):
        raise ValueError(f"{database_csv}: missing columns {sorted(needed - set(database.columns))}")
    if options.ecg_ids is not None:
        absent = sorted(set(options.ecg_ids) - set(database.index))
        if absent:
            raise ValueError(f"{database_csv}: no rows for ecg_ids {absent[:10]}")
        database = database.loc[sorted(set(options.ecg_ids))]

    parts = kfold_parts(options.kfold) if options.kfold else list(HOLDOUT_PARTS)
    jobs = []
    for ecg_id, row in database.iterrows():
        codes = parse_scp_codes(row["scp_codes"], ecg_id, database_csv)
        unknown = sorted(set(codes) - statements.known)
        if unknown:
            raise ValueError(f"{database_csv}: ecg_id {ecg_id}: statements {unknown} not in {STATEMENTS_CSV}")
        fold = int(row["strat_fold"])
        if options.kfold:
            part = strat_fold_group(fold, options.kfold)
        else:
            part = strat_fold_part(fold, options.validation_folds, options.test_folds)
        age = _float_or_nan(row["age"])
        values = {
            "age": math.nan if age >= _CENSORED_AGE else age,
            "sex": _float_or_nan(row["sex"]),
            **record_labels(codes, statements, options),
        }
        record_id = f"{SOURCE}:{int(ecg_id):05d}"
        patient = None if pd.isna(row["patient_id"]) else f"{SOURCE}:{int(row['patient_id'])}"
        jobs.append(
            RecordJob(
                path=str(root / f"{row[filename_column]}.hea"),
                record_id=record_id,
                split=part,
                patient_id=patient,
                values=values,
            )
        )
    recorded = asdict(options)
    recorded["root"] = str(root)
    return BuildPlan(
        source=SOURCE,
        jobs=jobs,
        tasks=ptbxl_tasks(statements, options),
        parts=parts,
        options=recorded,
        input_files=[database_csv, statements_csv],
        hr_target=options.hr_target,
    )


def prepare_ptbxl(
    root: str | Path,
    out: str | Path,
    options: PtbxlOptions | None = None,
    workers: int = 2,
    force: bool = False,
):
    """Build (or reuse) a PTB-XL dataset folder; returns ``(DatasetDict, DatasetMeta)``."""
    return build_dataset(plan_ptbxl(root, options), out, workers=workers, force=force)


def record_header(root: str | Path, record_id: str | int, rate: int = 100) -> Path:
    """The ``.hea`` file of one PTB-XL record under ``root``, at ``rate`` Hz (100: ``records100/``, 500:
    ``records500/``); ``record_id`` is an ``ecg_id`` or a dataset record ID (``ptbxl:00042``)."""
    root = Path(root)
    ecg_id = int(str(record_id).rsplit(":", 1)[-1])
    column = "filename_lr" if rate == 100 else "filename_hr"
    table = pd.read_csv(root / DATABASE_CSV, usecols=["ecg_id", column], index_col="ecg_id")
    return root / f"{table.loc[ecg_id, column]}.hea"
