"""PhysioNet/Computing in Cardiology Challenge 2020/2021 records (``.hea`` + ``.mat``) -> an enecg dataset.

Labels are the SNOMED CT codes of the ``# Dx:`` header comment, mapped to a configurable class list. The preset
``cinc2021`` is the Challenge 2021 scored classes (``dx_mapping_scored.csv`` / ``weights.csv`` of
physionetchallenges/evaluation-2021): 30 codes scored as 26 classes, four pairs being scored as one diagnosis
(CLBBB|LBBB, CRBBB|RBBB, PAC|SVPB, PVC|VPB). A record whose ``Dx`` lists none of the classes is labelled negative
for all of them (the Dx line is a complete diagnosis list, as in the Challenge scoring); a record with no ``Dx``
line gets an all-NaN (missing) label.

The ``superclass`` task gives the PTB-XL diagnostic superclasses (NORM, MI, STTC, CD, HYP) from the same codes
(:func:`enecg.data.label_maps.superclass_labels`: present when any code maps to one of the superclass's
statements, absent only when every code is known, else missing), so CinC records can train or test a PTB-XL
superclass model.

The sources carry no patient ids, so each record is its own patient for the seeded patient-level split.
``HR*`` records are PTB-XL records (``HR00042`` = PTB-XL ``ecg_id`` 42, resampled to 500 Hz): when both
sources are used, pass ``ptbxl_root`` and the CinC copies of records present in that PTB-XL database are dropped
(listed in the meta's ``dropped``), so one recording never sits in two datasets or two split parts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from enecg.data.build import BuildPlan, RecordJob, build_dataset
from enecg.data.label_maps import SUPERCLASSES, superclass_labels
from enecg.data.schema import TaskInfo
from enecg.data.targets import AGE_TASK, SEX_TASK
from enecg.data.wfdb_folder import SplitOptions, find_headers
from enecg.record import ECGRecord

SOURCE = "cinc"
CINC_TASKS = ("dx", "superclass", "age", "sex")
_PTBXL_COPY = re.compile(r"^HR(\d+)$")


@dataclass(frozen=True)
class DxClass:
    """One output class: a name and the SNOMED CT codes scored as it."""

    name: str
    codes: tuple[str, ...]


# Challenge 2021 scored classes, in dx_mapping_scored.csv order; merged pairs as in weights.csv.
CINC2021_SCORED: tuple[DxClass, ...] = (
    DxClass("AF", ("164889003",)),
    DxClass("AFL", ("164890007",)),
    DxClass("BBB", ("6374002",)),
    DxClass("Brady", ("426627000",)),
    DxClass("CLBBB|LBBB", ("733534002", "164909002")),
    DxClass("CRBBB|RBBB", ("713427006", "59118001")),
    DxClass("IAVB", ("270492004",)),
    DxClass("IRBBB", ("713426002",)),
    DxClass("LAD", ("39732003",)),
    DxClass("LAnFB", ("445118002",)),
    DxClass("LQRSV", ("251146004",)),
    DxClass("NSIVCB", ("698252002",)),
    DxClass("NSR", ("426783006",)),
    DxClass("PAC|SVPB", ("284470004", "63593006")),
    DxClass("PR", ("10370003",)),
    DxClass("PRWP", ("365413008",)),
    DxClass("PVC|VPB", ("427172004", "17338001")),
    DxClass("LPR", ("164947007",)),
    DxClass("LQT", ("111975006",)),
    DxClass("QAb", ("164917005",)),
    DxClass("RAD", ("47665007",)),
    DxClass("SA", ("427393009",)),
    DxClass("SB", ("426177001",)),
    DxClass("STach", ("427084000",)),
    DxClass("TAb", ("164934002",)),
    DxClass("TInv", ("59931005",)),
)
CLASS_PRESETS: dict[str, tuple[DxClass, ...]] = {"cinc2021": CINC2021_SCORED}


def parse_classes(spec: str) -> tuple[DxClass, ...]:
    """A preset name (``cinc2021``) or a comma-separated list of classes, each ``[NAME=]CODE[|CODE...]``.

    ``164889003,AFL=164890007,713427006|59118001`` gives classes ``164889003``, ``AFL`` and ``713427006|59118001``
    (the last two codes scored as one class).
    """
    if spec in CLASS_PRESETS:
        return CLASS_PRESETS[spec]
    classes = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, codes_text = item.rpartition("=")
        codes = tuple(code.strip() for code in codes_text.split("|") if code.strip())
        if not codes or not all(code.isdigit() for code in codes):
            raise ValueError(
                f"class {item!r}: expected [NAME=]CODE[|CODE...] with SNOMED CT codes, or a preset {sorted(CLASS_PRESETS)}"
            )
        classes.append(DxClass(name.strip() or "|".join(codes), codes))
    if not classes:
        raise ValueError(f"no classes in {spec!r}")
    seen: dict[str, str] = {}
    for cls in classes:
        for code in cls.codes:
            if code in seen:
                raise ValueError(f"code {code} is in two classes ({seen[code]!r} and {cls.name!r})")
            seen[code] = cls.name
    return tuple(classes)


@dataclass
class DxLabeler:
    """Picklable record -> ``{"dx": multi-hot, "superclass": PTB-XL superclasses}`` from the header's ``Dx``
    codes (only the tasks asked for)."""

    classes: tuple[DxClass, ...]
    tasks: tuple[str, ...] = ("dx",)

    def __call__(self, record: ECGRecord) -> dict[str, Any]:
        codes = record.metadata.get("dx")
        out: dict[str, Any] = {}
        if "dx" in self.tasks:
            present = set(codes or ())
            out["dx"] = (
                [math.nan] * len(self.classes)
                if codes is None
                else [1.0 if present.intersection(c.codes) else 0.0 for c in self.classes]
            )
        if "superclass" in self.tasks:
            out["superclass"] = superclass_labels(codes)
        return out


SUPERCLASS_TASK = TaskInfo(
    name="superclass",
    type="multilabel",
    names=list(SUPERCLASSES),
    description="PTB-XL diagnostic superclasses from the SNOMED CT Dx codes (enecg.data.label_maps."
    "superclass_labels): 1 when a code maps to one of the superclass's statements, 0 when every code is known, "
    "else NaN; NORM is never positive (no Challenge code means 'normal ECG').",
)


def dx_task(classes: tuple[DxClass, ...], spec: str) -> TaskInfo:
    codes = "; ".join(f"{c.name}={'|'.join(c.codes)}" for c in classes)
    return TaskInfo(
        name="dx",
        type="multilabel",
        names=[c.name for c in classes],
        description=f"SNOMED CT Dx codes from header comments, classes {spec!r} ({codes}); a record without a "
        "listed code is negative for all; all-NaN when the header has no Dx line.",
    )


@dataclass
class CincOptions(SplitOptions):
    classes: str = field(
        default="cinc2021", metadata={"help": "Class preset (cinc2021) or list [NAME=]CODE[|CODE],... ."}
    )
    tasks: tuple[str, ...] = field(
        default=CINC_TASKS, metadata={"help": f"Label sets to build, of {CINC_TASKS}."}
    )
    ptbxl_root: str | None = field(
        default=None, metadata={"help": "PTB-XL folder: drop HR* records whose ecg_id is in its database."}
    )
    hr_target: bool = field(default=False, metadata={"help": "Add the heart_rate regression target (gqrs)."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N records (sorted by path)."})


def ptbxl_ecg_ids(ptbxl_root: str | Path) -> set[int]:
    """The ``ecg_id``s of a PTB-XL database (its ``ptbxl_database.csv``)."""
    csv = Path(ptbxl_root) / "ptbxl_database.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: not found (ptbxl_root must be a PTB-XL folder)")
    return set(pd.read_csv(csv, usecols=["ecg_id"])["ecg_id"].astype(int))


def ptbxl_duplicate(record_name: str, ecg_ids: set[int]) -> int | None:
    """The PTB-XL ``ecg_id`` a CinC record copies (``HR00042`` -> 42) when it is in ``ecg_ids``, else None."""
    match = _PTBXL_COPY.match(record_name)
    if match and int(match.group(1)) in ecg_ids:
        return int(match.group(1))
    return None


def plan_cinc(root: str | Path, options: CincOptions | None = None) -> BuildPlan:
    """Find the records under ``root`` (recursively), drop duplicates, assign patient-level parts."""
    options = options or CincOptions()
    unknown = sorted(set(options.tasks) - set(CINC_TASKS))
    if unknown:
        raise ValueError(f"unknown CinC tasks {unknown}; known: {list(CINC_TASKS)}")
    classes = parse_classes(options.classes)
    root = Path(root).absolute()
    ecg_ids = ptbxl_ecg_ids(options.ptbxl_root) if options.ptbxl_root else set()
    jobs: list[RecordJob] = []
    dropped: list[dict[str, str]] = []
    first_seen: dict[str, Path] = {}
    for hea in find_headers(root, options.limit):
        name = hea.stem
        record_id = f"{SOURCE}:{name}"
        if name in first_seen:
            dropped.append(
                {"record": record_id, "path": str(hea), "reason": f"same record name as {first_seen[name]}"}
            )
            continue
        first_seen[name] = hea
        ecg_id = ptbxl_duplicate(name, ecg_ids)
        if ecg_id is not None:
            dropped.append(
                {
                    "record": record_id,
                    "path": str(hea),
                    "reason": f"copy of PTB-XL ecg_id {ecg_id} (ptbxl_root)",
                }
            )
            continue
        jobs.append(RecordJob(path=str(hea), record_id=record_id, split=""))
    options.assign(jobs)
    tasks = [
        t
        for t in (dx_task(classes, options.classes), SUPERCLASS_TASK, AGE_TASK, SEX_TASK)
        if t.name in options.tasks
    ]
    recorded = asdict(options)
    recorded["root"] = str(root)
    recorded["ptbxl_root"] = str(Path(options.ptbxl_root).absolute()) if options.ptbxl_root else None
    input_files = [Path(options.ptbxl_root) / "ptbxl_database.csv"] if options.ptbxl_root else []
    return BuildPlan(
        source=SOURCE,
        jobs=jobs,
        tasks=tasks,
        parts=options.parts(),
        options=recorded,
        input_files=input_files,
        labeler=DxLabeler(classes, tuple(t for t in ("dx", "superclass") if t in options.tasks))
        if {"dx", "superclass"} & set(options.tasks)
        else None,
        hr_target=options.hr_target,
        dropped=dropped,
    )


def prepare_cinc(
    root: str | Path,
    out: str | Path,
    options: CincOptions | None = None,
    workers: int = 2,
    force: bool = False,
):
    """Build (or reuse) a CinC dataset folder; returns ``(DatasetDict, DatasetMeta)``."""
    return build_dataset(plan_cinc(root, options), out, workers=workers, force=force)
