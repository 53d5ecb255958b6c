"""PTB-XL SCP-ECG statements <-> SNOMED CT codes, for the findings both label systems describe.

PTB-XL labels records with SCP-ECG statements (``scp_statements.csv``); the PhysioNet/Computing in Cardiology
Challenge 2020/2021 data (CPSC, Georgia, Chapman, Ningbo, and a relabelled copy of PTB-XL) uses SNOMED CT codes in
``# Dx:`` header comments. Cross-dataset validation (train on one, test on the other) needs the findings they
share. Each :class:`Finding` below is keyed by its PTB-XL statement and lists the SNOMED CT codes that denote the
same finding.

How entries were chosen (only defensible one-to-one and one-to-many mappings):

* the SCP statement description and the SNOMED CT concept name denote the same finding;
* where the Challenge mapping tables (``dx_mapping_scored.csv`` / ``dx_mapping_unscored.csv`` of
  github.com/physionetchallenges/evaluation-2021) give a ``PTB_XL`` count for the code, it is quoted in
  ``evidence``. These counts were produced by the Challenge organisers' own relabelling of PTB-XL. For most codes
  the count equals the statement's frequency in PTB-XL, which shows that the same one-to-one mapping was used;
* codes the Challenge *scores as the same diagnosis* (``weights.csv``: CLBBB|LBBB, CRBBB|RBBB, PAC|SVPB, PVC|VPB)
  belong to one finding, so a Challenge class merging them maps onto the PTB-XL statement (one-to-many).

Left out on purpose:

* ``SVARR`` (supraventricular arrhythmia): the Challenge's PTB_XL counts show it became 63593006 *supraventricular
  premature beats*, a narrower finding.
* ``BIGU``/``TRIGU`` (bigeminal/trigeminal pattern *of unknown origin*): the Challenge's VBig/VTrig codes are
  ventricular.
* T-wave statements (``NDT``, ``NT_``, ``TAB_``, ``LOWT``) -> 164934002 *T wave abnormal*: the Challenge's PTB_XL
  count (2345) is a union of several statements, a many-to-one mapping.
* ``VCLVH``/``HVOLT`` (voltage criteria) -> 55827005 *left ventricular high voltage*: PTB_XL count 0.
* The superclasses ``STTC``, ``CD`` and ``HYP`` are unions of many statements; only ``NORM`` and ``MI`` map.
  ``NORM`` (normal ECG) is *not* 426783006 (sinus rhythm: a rhythm, which a record with a bundle branch block also
  has); it maps to 164854000 *ECG normal* (SNOMED CT; DICOM CID 3230 "ECG Finding"), which no Challenge source
  uses, so NORM has no positives in Challenge data.
* Two corrections to common shortcuts: sinus bradycardia (``SBRAD``) is 426177001, not 426627000 (*bradycardia*
  of any cause, PTB_XL count 0); PTB-XL's ``PVC`` was coded by the Challenge as 164884008 *ventricular ectopics*
  (PTB_XL count 1154; PVC/VPB have 0), which is therefore part of the PVC finding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

FindingGroup = Literal["rhythm", "conduction", "form", "hypertrophy", "ischaemia", "infarction", "normal"]

_SCORED = "dx_mapping_scored.csv"
_UNSCORED = "dx_mapping_unscored.csv"


@dataclass(frozen=True)
class Finding:
    """One finding shared by PTB-XL and SNOMED CT-coded data.

    Attributes:
        key: the PTB-XL SCP statement (or superclass, for ``MI``) naming the finding.
        snomed: the SNOMED CT codes that denote it; the first is the code the Challenge used for PTB-XL records.
        name: a readable name.
        group: rhythm, conduction, form, hypertrophy, ischaemia, infarction or normal.
        evidence: where the mapping comes from.
    """

    key: str
    snomed: tuple[str, ...]
    name: str
    group: FindingGroup
    evidence: str


PTBXL_SNOMED_FINDINGS: tuple[Finding, ...] = (
    # -- rhythm statements
    Finding("SR", ("426783006",), "sinus rhythm", "rhythm", f"{_SCORED}: NSR"),
    Finding("AFIB", ("164889003",), "atrial fibrillation", "rhythm", f"{_SCORED}: AF, PTB_XL count 1514"),
    Finding("AFLT", ("164890007",), "atrial flutter", "rhythm", f"{_SCORED}: AFL, PTB_XL count 73"),
    Finding("STACH", ("427084000",), "sinus tachycardia", "rhythm", f"{_SCORED}: STach, PTB_XL count 826"),
    Finding("SBRAD", ("426177001",), "sinus bradycardia", "rhythm", f"{_SCORED}: SB, PTB_XL count 637"),
    Finding("SARRH", ("427393009",), "sinus arrhythmia", "rhythm", f"{_SCORED}: SA, PTB_XL count 772"),
    Finding("PACE", ("10370003",), "pacing rhythm", "rhythm", f"{_SCORED}: PR, PTB_XL count 296"),
    Finding(
        "SVTAC",
        ("426761007",),
        "supraventricular tachycardia",
        "rhythm",
        f"{_UNSCORED}: SVT, PTB_XL count 27",
    ),
    Finding(
        "PSVT",
        ("67198005",),
        "paroxysmal supraventricular tachycardia",
        "rhythm",
        f"{_UNSCORED}: PSVT, PTB_XL count 24",
    ),
    # -- conduction (diagnostic class CD)
    Finding(
        "1AVB", ("270492004",), "first degree AV block", "conduction", f"{_SCORED}: IAVB, PTB_XL count 797"
    ),
    Finding(
        "2AVB", ("195042002",), "second degree AV block", "conduction", f"{_UNSCORED}: IIAVB, PTB_XL count 14"
    ),
    Finding(
        "3AVB",
        ("27885002",),
        "third degree (complete) AV block",
        "conduction",
        f"{_UNSCORED}: CHB, PTB_XL count 16",
    ),
    Finding(
        "CLBBB",
        ("733534002", "164909002"),
        "(complete) left bundle branch block",
        "conduction",
        f"{_SCORED}: CLBBB|LBBB scored as one; PTB-XL's CLBBB was coded 164909002 (PTB_XL count 536)",
    ),
    Finding(
        "CRBBB",
        ("713427006", "59118001"),
        "(complete) right bundle branch block",
        "conduction",
        f"{_SCORED}: CRBBB|RBBB scored as one, PTB_XL count 542",
    ),
    Finding(
        "IRBBB",
        ("713426002",),
        "incomplete right bundle branch block",
        "conduction",
        f"{_SCORED}: IRBBB, PTB_XL count 1118",
    ),
    Finding(
        "ILBBB",
        ("251120003",),
        "incomplete left bundle branch block",
        "conduction",
        f"{_UNSCORED}: ILBBB, PTB_XL count 77",
    ),
    Finding(
        "LAFB",
        ("445118002",),
        "left anterior fascicular block",
        "conduction",
        f"{_SCORED}: LAnFB, PTB_XL count 1626",
    ),
    Finding(
        "LPFB",
        ("445211001",),
        "left posterior fascicular block",
        "conduction",
        f"{_UNSCORED}: LPFB, PTB_XL count 177",
    ),
    Finding(
        "IVCD",
        ("698252002",),
        "non-specific intraventricular conduction disturbance",
        "conduction",
        f"{_SCORED}: NSIVCB, PTB_XL count 789",
    ),
    Finding(
        "WPW",
        ("74390002",),
        "Wolff-Parkinson-White pattern",
        "conduction",
        f"{_UNSCORED}: WPW, PTB_XL count 80",
    ),
    # -- form statements
    Finding(
        "PAC",
        ("284470004", "63593006"),
        "atrial premature complex",
        "form",
        f"{_SCORED}: PAC|SVPB scored as one; PAC PTB_XL count 398",
    ),
    Finding(
        "PVC",
        ("427172004", "17338001", "164884008"),
        "ventricular premature complex",
        "form",
        f"{_SCORED}: PVC|VPB scored as one; PTB-XL's PVC was coded 164884008 ({_UNSCORED}: VEB, PTB_XL "
        "count 1154)",
    ),
    Finding("LPR", ("164947007",), "prolonged PR interval", "form", f"{_SCORED}: LPR, PTB_XL count 340"),
    Finding("LNGQT", ("111975006",), "prolonged QT interval", "form", f"{_SCORED}: LQT, PTB_XL count 118"),
    Finding("QWAVE", ("164917005",), "Q wave abnormal", "form", f"{_SCORED}: QAb, PTB_XL count 548"),
    Finding("INVT", ("59931005",), "T wave inversion", "form", f"{_SCORED}: TInv, PTB_XL count 294"),
    Finding("LVOLT", ("251146004",), "low QRS voltages", "form", f"{_SCORED}: LQRSV, PTB_XL count 182"),
    Finding("STD_", ("429622005",), "ST depression", "form", f"{_UNSCORED}: STD, PTB_XL count 1009"),
    Finding("STE_", ("164931005",), "ST elevation", "form", f"{_UNSCORED}: STE, PTB_XL count 28"),
    Finding("NST_", ("55930002",), "non-specific ST changes", "form", f"{_UNSCORED}: STC, PTB_XL count 770"),
    Finding("ABQRS", ("164951009",), "abnormal QRS", "form", f"{_UNSCORED}: abQRS, PTB_XL count 3389"),
    # -- hypertrophy (diagnostic class HYP)
    Finding("LVH", ("164873001",), "left ventricular hypertrophy", "hypertrophy", f"{_UNSCORED}: LVH"),
    Finding(
        "RVH",
        ("89792004",),
        "right ventricular hypertrophy",
        "hypertrophy",
        f"{_UNSCORED}: RVH, PTB_XL count 126",
    ),
    Finding(
        "LAO/LAE",
        ("67741000119109",),
        "left atrial enlargement",
        "hypertrophy",
        f"{_UNSCORED}: LAE, PTB_XL count 427",
    ),
    Finding(
        "RAO/RAE",
        ("446358003",),
        "right atrial overload/hypertrophy",
        "hypertrophy",
        f"{_UNSCORED}: RAH, PTB_XL count 99",
    ),
    # -- ischaemia (diagnostic class STTC)
    Finding(
        "ISCAN", ("426434006",), "anterior ischaemia", "ischaemia", f"{_UNSCORED}: AnMIs, PTB_XL count 44"
    ),
    Finding(
        "ISCIN", ("425419005",), "inferior ischaemia", "ischaemia", f"{_UNSCORED}: IIs, PTB_XL count 219"
    ),
    Finding("ISCLA", ("425623009",), "lateral ischaemia", "ischaemia", f"{_UNSCORED}: LIs, PTB_XL count 142"),
    # -- superclasses
    Finding(
        "MI",
        ("164865005", "54329005", "57054005", "164867002"),
        "myocardial infarction",
        "infarction",
        f"{_UNSCORED}: MI (PTB_XL count 5261); anterior (AnMI), acute (AMI) and old (OldMI) MI of other "
        "sources are kinds of MI",
    ),
    Finding(
        "NORM",
        ("164854000",),
        "normal ECG",
        "normal",
        "SNOMED CT 164854000 |ECG normal| (DICOM CID 3230); used by no Challenge source",
    ),
)

FINDINGS: dict[str, Finding] = {f.key: f for f in PTBXL_SNOMED_FINDINGS}
_BY_SNOMED: dict[str, str] = {code: f.key for f in PTBXL_SNOMED_FINDINGS for code in f.snomed}

# PTB-XL diagnostic subclasses made of exactly one statement (scp_statements.csv ``diagnostic_subclass``), so a
# subclass label means that statement. Multi-statement subclasses (_AVB, LAFB/LPFB, ISCA, ...) do not map.
SINGLE_STATEMENT_SUBCLASSES: frozenset[str] = frozenset(
    {
        "NORM",
        "NST_",
        "ISC_",
        "IRBBB",
        "IVCD",
        "CRBBB",
        "CLBBB",
        "LAO/LAE",
        "RVH",
        "RAO/RAE",
        "WPW",
        "ILBBB",
        "LVH",
        "SEHYP",
        "LMI",
        "PMI",
    }
)
# The PTB-XL superclasses that map (the others are unions of many findings).
MAPPED_SUPERCLASSES: frozenset[str] = frozenset({"NORM", "MI"})
_SUPERCLASS_ONLY = frozenset({"MI"})  # keys that are superclasses, not SCP statements


def scp_to_snomed(statement: str) -> tuple[str, ...]:
    """SNOMED CT codes of a PTB-XL SCP statement; ``()`` when the statement has no shared finding."""
    finding = FINDINGS.get(statement)
    if finding is None or statement in _SUPERCLASS_ONLY:
        return ()
    return finding.snomed


def snomed_to_scp(code: str) -> str | None:
    """The PTB-XL finding key (SCP statement, or ``MI``) of a SNOMED CT code; None for unmapped codes."""
    return _BY_SNOMED.get(str(code).strip())


def findings_of_snomed(codes: Iterable[str]) -> set[str]:
    """Finding keys present in a list of SNOMED CT codes (e.g. a ``Dx`` line); unmapped codes are ignored."""
    return {key for key in (snomed_to_scp(c) for c in codes) if key is not None}


def findings_of_scp(statements: Iterable[str]) -> set[str]:
    """Finding keys present in a list of SCP statements (e.g. ``scp_codes`` keys); unmapped ones are ignored."""
    return {s for s in statements if scp_to_snomed(s)}


def snomed_of_scp(statements: Iterable[str]) -> set[str]:
    """All SNOMED CT codes equivalent to a list of SCP statements (unmapped statements ignored)."""
    return {code for s in statements for code in scp_to_snomed(s)}


def snomed_class_finding(codes: Iterable[str]) -> str | None:
    """The finding a class of SNOMED CT codes (e.g. the Challenge's ``CRBBB|RBBB``) stands for.

    None unless every code maps and all map to the same finding: a class mixing findings, or holding a code
    outside the table, is not the same label as any PTB-XL statement.
    """
    keys = {snomed_to_scp(c) for c in codes}
    if len(keys) != 1 or None in keys:
        return None
    return next(iter(keys))


def ptbxl_label_finding(task: str, label: str) -> str | None:
    """The finding a PTB-XL task's label stands for, or None.

    ``superclass`` labels map for NORM and MI; ``subclass`` labels when the subclass is a single statement;
    labels of any other task (``rhythm``, ``form``, ...) are SCP statements.
    """
    if task == "superclass":
        return label if label in MAPPED_SUPERCLASSES else None
    if task == "subclass":
        return label if label in SINGLE_STATEMENT_SUBCLASSES and label in FINDINGS else None
    return label if scp_to_snomed(label) else None


# --------------------------------------------------------------------------------- superclasses from SNOMED CT

# PTB-XL diagnostic superclass of each finding key whose SCP statement is *diagnostic* (scp_statements.csv:
# diagnostic == 1, column diagnostic_class; ``MI`` is the superclass itself). Rhythm and form statements have no
# diagnostic class: their codes are known, and say nothing about the superclasses.
FINDING_SUPERCLASS: dict[str, str] = {
    **dict.fromkeys(
        ("1AVB", "2AVB", "3AVB", "CLBBB", "CRBBB", "IRBBB", "ILBBB", "LAFB", "LPFB", "IVCD", "WPW"), "CD"
    ),
    **dict.fromkeys(("LVH", "RVH", "LAO/LAE", "RAO/RAE"), "HYP"),
    **dict.fromkeys(("LNGQT", "NST_", "ISCAN", "ISCIN", "ISCLA"), "STTC"),
    "MI": "MI",
    "NORM": "NORM",
}
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")


def superclass_labels(codes: Iterable[str] | None) -> list[float]:
    """PTB-XL diagnostic superclass labels (:data:`SUPERCLASSES` order) of a record's SNOMED CT ``Dx`` codes.

    A superclass is present (1) when any code maps to one of its diagnostic statements. It is absent (0) only when
    every code of the record is in the table (:data:`PTBXL_SNOMED_FINDINGS`) — a code outside it could belong to
    the superclass — and missing (NaN) otherwise. ``NORM`` (normal ECG) has no code the Challenge sources use, so
    it is never positive: it is 0 when another superclass is present (a record with a diagnostic abnormality is
    not normal) and NaN otherwise (sinus rhythm alone does not make a normal ECG). No ``Dx`` line: all NaN.
    """
    if codes is None:
        return [math.nan] * len(SUPERCLASSES)
    codes = [str(c).strip() for c in codes if str(c).strip()]
    keys = [snomed_to_scp(c) for c in codes]
    present = {FINDING_SUPERCLASS[k] for k in keys if k in FINDING_SUPERCLASS}
    complete = all(k is not None for k in keys)
    labels = []
    for name in SUPERCLASSES:
        if name == "NORM":
            labels.append(1.0 if "NORM" in present else 0.0 if present - {"NORM"} else math.nan)
        elif name in present:
            labels.append(1.0)
        else:
            labels.append(0.0 if complete else math.nan)
    return labels
