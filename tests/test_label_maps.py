"""The PTB-XL SCP-ECG <-> SNOMED CT table: integrity, round trips, unknown codes, and counts on the shared samples."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pandas as pd

from enecg.data.cinc import CINC2021_SCORED
from enecg.data.label_maps import (
    FINDINGS,
    PTBXL_SNOMED_FINDINGS,
    SINGLE_STATEMENT_SUBCLASSES,
    findings_of_scp,
    findings_of_snomed,
    ptbxl_label_finding,
    scp_to_snomed,
    snomed_class_finding,
    snomed_of_scp,
    snomed_to_scp,
)
from enecg.io import read_record


def test_every_code_belongs_to_one_finding() -> None:
    codes = [code for f in PTBXL_SNOMED_FINDINGS for code in f.snomed]
    assert len(codes) == len(set(codes))
    assert all(code.isdigit() for code in codes)
    assert len(FINDINGS) == len(PTBXL_SNOMED_FINDINGS)
    assert all(f.evidence for f in PTBXL_SNOMED_FINDINGS)


def test_round_trip() -> None:
    for finding in PTBXL_SNOMED_FINDINGS:
        for code in finding.snomed:
            assert snomed_to_scp(code) == finding.key
        assert snomed_class_finding(finding.snomed) == finding.key
        if finding.key != "MI":  # MI is a superclass, not an SCP statement
            assert scp_to_snomed(finding.key) == finding.snomed
            assert findings_of_snomed(scp_to_snomed(finding.key)) == {finding.key}
    assert snomed_of_scp(["CLBBB", "AFIB"]) == {"733534002", "164909002", "164889003"}


def test_unknown_codes_are_ignored() -> None:
    assert findings_of_snomed(["164889003", "999999999", "", " 426783006 "]) == {"AFIB", "SR"}
    assert findings_of_scp(["SR", "NOT_A_STATEMENT", "SVARR", "MI"]) == {"SR"}
    assert scp_to_snomed("XYZ") == () and scp_to_snomed("MI") == ()
    assert snomed_to_scp("12345") is None
    # A class holding an unmapped code, or two findings, is no PTB-XL label.
    assert snomed_class_finding(["164889003", "12345"]) is None
    assert snomed_class_finding(["164889003", "426783006"]) is None
    assert snomed_class_finding([]) is None


def test_known_pitfalls() -> None:
    assert scp_to_snomed("SBRAD") == ("426177001",)  # sinus bradycardia, not 426627000 (bradycardia)
    assert snomed_to_scp("426627000") is None
    assert snomed_to_scp("426783006") == "SR"  # sinus rhythm is a rhythm, not a normal ECG
    assert "426783006" not in FINDINGS["NORM"].snomed
    assert snomed_to_scp("164884008") == "PVC"  # how the Challenge coded PTB-XL's PVC
    for excluded in ("SVARR", "BIGU", "TRIGU", "TAB_", "NT_", "NDT", "LOWT", "STTC", "CD", "HYP"):
        assert excluded not in FINDINGS


def test_challenge_scored_classes() -> None:
    mapped = {c.name: snomed_class_finding(c.codes) for c in CINC2021_SCORED}
    assert {k: v for k, v in mapped.items() if v} == {
        "AF": "AFIB",
        "AFL": "AFLT",
        "CLBBB|LBBB": "CLBBB",
        "CRBBB|RBBB": "CRBBB",
        "IAVB": "1AVB",
        "IRBBB": "IRBBB",
        "LAnFB": "LAFB",
        "LQRSV": "LVOLT",
        "NSIVCB": "IVCD",
        "NSR": "SR",
        "PAC|SVPB": "PAC",
        "PR": "PACE",
        "PVC|VPB": "PVC",
        "LPR": "LPR",
        "LQT": "LNGQT",
        "QAb": "QWAVE",
        "SA": "SARRH",
        "SB": "SBRAD",
        "STach": "STACH",
        "TInv": "INVT",
    }
    # No PTB-XL statement means: bundle branch block (unspecified), bradycardia (any), axis deviations (PTB-XL
    # keeps them outside the statements), poor R progression, T wave abnormal (a union of statements).
    assert {k for k, v in mapped.items() if v is None} == {"BBB", "Brady", "LAD", "PRWP", "RAD", "TAb"}


def test_ptbxl_labels() -> None:
    assert ptbxl_label_finding("superclass", "NORM") == "NORM"
    assert ptbxl_label_finding("superclass", "MI") == "MI"
    assert ptbxl_label_finding("superclass", "CD") is None
    assert ptbxl_label_finding("subclass", "CLBBB") == "CLBBB"
    assert ptbxl_label_finding("subclass", "_AVB") is None  # 1AVB + 2AVB + 3AVB
    assert ptbxl_label_finding("subclass", "LAFB/LPFB") is None
    assert ptbxl_label_finding("rhythm", "SVARR") is None
    assert ptbxl_label_finding("form", "PVC") == "PVC"


def test_table_agrees_with_scp_statements(ptbxl_dir: Path) -> None:
    table = pd.read_csv(ptbxl_dir / "scp_statements.csv", index_col=0)
    for finding in PTBXL_SNOMED_FINDINGS:
        if finding.key == "MI":
            assert "MI" in set(table["diagnostic_class"])
            continue
        row = table.loc[finding.key]
        expected_flag = {
            "rhythm": row["rhythm"] == 1,
            "form": row["form"] == 1,
            "conduction": row["diagnostic_class"] == "CD",
            "hypertrophy": row["diagnostic_class"] == "HYP",
            "ischaemia": row["diagnostic_class"] == "STTC",
            "normal": row["diagnostic_class"] == "NORM",
        }
        assert expected_flag[finding.group], finding.key
    diagnostic = table[table["diagnostic"] == 1]
    sizes = diagnostic.groupby("diagnostic_subclass").size()
    single = {sub for sub, n in sizes.items() if n == 1}
    assert single == set(SINGLE_STATEMENT_SUBCLASSES)
    for sub in single:  # a single-statement subclass is named after its statement
        assert diagnostic.index[diagnostic["diagnostic_subclass"] == sub].tolist() == [sub]


def test_counts_on_ptbxl_sample(ptbxl_dir: Path) -> None:
    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv")
    counts = Counter(f for codes in database["scp_codes"] for f in findings_of_scp(ast.literal_eval(codes)))
    # The sample's README counts for the rhythm statements.
    assert {k: counts[k] for k in ("SR", "AFIB", "SBRAD", "AFLT", "PACE", "STACH", "SARRH")} == {
        "SR": 407,
        "AFIB": 13,
        "SBRAD": 9,
        "AFLT": 8,
        "PACE": 6,
        "STACH": 5,
        "SARRH": 26,
    }


def test_counts_on_cinc_sample(cinc_dir: Path) -> None:
    counts: Counter[str] = Counter()
    headers = sorted(cinc_dir.rglob("*.hea"))
    for header in headers:
        counts.update(findings_of_snomed(read_record(header).metadata.get("dx") or []))
    assert len(headers) == 127
    assert {
        k: counts[k]
        for k in (
            "SR",
            "SBRAD",
            "STACH",
            "AFIB",
            "AFLT",
            "SARRH",
            "PACE",
            "PAC",
            "PVC",
            "CRBBB",
            "IVCD",
            "NORM",
        )
    } == {
        "SR": 45,
        "SBRAD": 29,
        "STACH": 30,
        "AFIB": 4,
        "AFLT": 7,
        "SARRH": 6,
        "PACE": 2,
        "PAC": 25,
        "PVC": 8,  # 7 x 427172004 (PVC) + 1 x 164884008 (ventricular ectopics)
        "CRBBB": 6,
        "IVCD": 11,
        "NORM": 0,
    }
