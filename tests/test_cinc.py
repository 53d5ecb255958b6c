"""CinC Challenge builder on the shared sample: Dx classes (2021 scored preset), Georgia headers, splits, HR dedupe."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from enecg.data.build import load_dataset_dir
from enecg.data.cinc import CINC2021_SCORED, CincOptions, DxLabeler, parse_classes, plan_cinc, prepare_cinc
from enecg.data.splits import assert_patients_disjoint
from enecg.record import ECGRecord


@pytest.fixture(scope="module")
def ptbxl_with_hr_ids(tmp_path_factory: pytest.TempPathFactory, ptbxl_dir: Path) -> Path:
    """A PTB-XL table whose ecg_ids include records the CinC sample copies (HR06000, HR06001, HR03961)."""
    root = tmp_path_factory.mktemp("ptbxl_ids")
    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv").head(5)
    database["ecg_id"] = [6000, 6001, 3961, 1, 2]
    database.to_csv(root / "ptbxl_database.csv", index=False)
    return root


@pytest.fixture(scope="module")
def cinc_built(cinc_dir: Path, ptbxl_with_hr_ids: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cinc") / "cinc"
    return prepare_cinc(cinc_dir, out, CincOptions(seed=3, ptbxl_root=str(ptbxl_with_hr_ids)), workers=2)


def test_cinc2021_preset_has_26_classes_from_30_codes() -> None:
    classes = parse_classes("cinc2021")
    assert classes == CINC2021_SCORED and len(classes) == 26
    assert sum(len(c.codes) for c in classes) == 30
    merged = {c.name: c.codes for c in classes if len(c.codes) > 1}
    assert merged == {
        "CLBBB|LBBB": ("733534002", "164909002"),
        "CRBBB|RBBB": ("713427006", "59118001"),
        "PAC|SVPB": ("284470004", "63593006"),
        "PVC|VPB": ("427172004", "17338001"),
    }


def test_custom_class_list() -> None:
    classes = parse_classes("164889003,AFL=164890007,713427006|59118001")
    assert [c.name for c in classes] == ["164889003", "AFL", "713427006|59118001"]
    with pytest.raises(ValueError, match="two classes"):
        parse_classes("164889003,AF=164889003")
    with pytest.raises(ValueError, match="SNOMED"):
        parse_classes("atrial fibrillation")


def test_dx_labeler_merges_codes_and_marks_missing() -> None:
    labeler = DxLabeler(parse_classes("cinc2021"))
    names = [c.name for c in labeler.classes]
    record = ECGRecord(np.zeros((1, 10)), 500, ("I",), "r", metadata={"dx": ["59118001", "999"]})
    vector = labeler(record)["dx"]
    assert vector[names.index("CRBBB|RBBB")] == 1 and sum(vector) == 1
    unscored = ECGRecord(np.zeros((1, 10)), 500, ("I",), "r", metadata={"dx": ["999"]})
    assert labeler(unscored)["dx"] == [0.0] * 26
    no_dx = ECGRecord(np.zeros((1, 10)), 500, ("I",), "r", metadata={})
    assert all(math.isnan(v) for v in labeler(no_dx)["dx"])


def test_build_reads_all_records_including_georgia_headers(cinc_built, cinc_dir: Path) -> None:
    dataset_dict, meta = cinc_built
    n_headers = len(list(cinc_dir.rglob("*.hea")))
    assert not meta.skipped
    assert sum(meta.splits.values()) + len(meta.dropped) == n_headers
    rows = {row["record_id"]: row for part in dataset_dict.values() for row in part.with_format("numpy")}
    georgia = rows["cinc:E00271"]  # record line "E00271.mat 12 500 5000 05-May-2020 14:50:55"
    names = meta.task("dx").names
    assert georgia["dx"][names.index("CRBBB|RBBB")] == 1 and np.nansum(georgia["dx"]) == 1
    assert georgia["age"] == 83 and georgia["sex"] == 1 and georgia["signal"].shape == (12, 5000)
    long_records = [r for r in rows.values() if r["signal"].shape[1] > 5000]
    assert long_records, "the sample has 10-20 s records: different lengths share one column"


def test_patient_level_split_and_seed(cinc_built, cinc_dir: Path) -> None:
    dataset_dict, meta = cinc_built
    assert_patients_disjoint((pid, part) for part, ds in dataset_dict.items() for pid in ds["patient_id"])
    assert set(meta.splits) == {"train", "validation", "test"} and min(meta.splits.values()) > 0
    same = [job.split for job in plan_cinc(cinc_dir, CincOptions(seed=3)).jobs]
    assert same == [job.split for job in plan_cinc(cinc_dir, CincOptions(seed=3)).jobs]
    assert same != [job.split for job in plan_cinc(cinc_dir, CincOptions(seed=4)).jobs]
    folds = plan_cinc(cinc_dir, CincOptions(kfold=5))
    assert folds.parts == [f"fold_{i}" for i in range(5)]
    assert {job.split for job in folds.jobs} == set(folds.parts)


def test_hr_records_copying_ptbxl_are_dropped(cinc_built, cinc_dir: Path, ptbxl_dir: Path) -> None:
    dataset_dict, meta = cinc_built
    dropped = {entry["record"] for entry in meta.dropped}
    expected = {
        f"cinc:{name}" for name in ("HR06000", "HR06001", "HR03961") if any(cinc_dir.rglob(f"{name}.hea"))
    }
    assert dropped == expected and expected
    kept = {rid for ds in dataset_dict.values() for rid in ds["record_id"]}
    assert not kept & dropped and "cinc:HR06002" in kept
    assert all("PTB-XL ecg_id" in entry["reason"] for entry in meta.dropped)
    # The real PTB-XL sample (ecg_ids 1-500) shares no record with the CinC sample (HR03961, HR06000, ...).
    assert plan_cinc(cinc_dir, CincOptions(ptbxl_root=str(ptbxl_dir))).dropped == []
    _, reloaded = load_dataset_dir(_out_of(dataset_dict))
    assert len(reloaded.dropped) == len(expected)


def _out_of(dataset_dict) -> Path:
    """The folder a loaded DatasetDict was memory-mapped from."""
    cache_file = next(iter(dataset_dict.values())).cache_files[0]["filename"]
    return Path(cache_file).parents[1]
