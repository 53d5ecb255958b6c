"""PTB-XL builder on the shared 500-record sample: label counts, splits, signals, cache reuse, atomic writes."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

import enecg.data.build as build_module
from enecg.cli import main
from enecg.data.build import build_dataset, load_dataset_dir
from enecg.data.describe import describe_dataset
from enecg.data.ptbxl import PtbxlOptions, plan_ptbxl, prepare_ptbxl
from enecg.data.splits import assert_patients_disjoint

SUPERCLASS_COUNTS = {"NORM": 297, "STTC": 96, "CD": 78, "MI": 73, "HYP": 40}


@pytest.fixture(scope="module")
def ptbxl100(ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full ptbxl500 sample at 100 Hz, built once for this module."""
    out = tmp_path_factory.mktemp("ptbxl") / "ptbxl100"
    prepare_ptbxl(ptbxl_dir, out, PtbxlOptions(rate=100), workers=2)
    return out


def _stack(dataset_dict, column: str) -> np.ndarray:
    return np.concatenate([np.asarray(part.with_format("numpy")[column]) for part in dataset_dict.values()])


def test_superclass_counts_and_missing_labels(ptbxl100: Path) -> None:
    dataset_dict, meta = load_dataset_dir(ptbxl100)
    assert sum(meta.splits.values()) == 500 and not meta.skipped
    task = meta.task("superclass")
    labels = _stack(dataset_dict, "superclass")
    assert labels.shape == (500, 5) and labels.dtype == np.float32
    assert dict(zip(task.names, np.nansum(labels, axis=0).astype(int).tolist())) == SUPERCLASS_COUNTS
    unlabelled = np.isnan(labels).all(axis=1)
    assert unlabelled.sum() == 12  # no diagnostic statement: missing, not all-zero
    assert not np.isnan(labels[~unlabelled]).any()
    rhythm = dict(
        zip(meta.task("rhythm").names, np.nansum(_stack(dataset_dict, "rhythm"), axis=0).astype(int))
    )
    assert {k: rhythm[k] for k in ("SR", "SARRH", "AFIB", "SBRAD", "AFLT", "PACE", "STACH")} == {
        "SR": 407,
        "SARRH": 26,
        "AFIB": 13,
        "SBRAD": 9,
        "AFLT": 8,
        "PACE": 6,
        "STACH": 5,
    }
    assert meta.task("age").unit == "years" and meta.task("sex").type == "binary"


def test_min_likelihood_option(ptbxl_dir: Path) -> None:
    plan = plan_ptbxl(ptbxl_dir, PtbxlOptions(min_likelihood=1))
    labels = np.array([job.values["superclass"] for job in plan.jobs])
    counts = dict(zip(("NORM", "MI", "STTC", "CD", "HYP"), np.nansum(labels, axis=0).astype(int).tolist()))
    assert counts == {**SUPERCLASS_COUNTS, "STTC": 93}


def test_splits_follow_strat_fold_without_patient_overlap(ptbxl100: Path, ptbxl_dir: Path) -> None:
    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv", index_col="ecg_id")
    folds = database["strat_fold"]
    dataset_dict, meta = load_dataset_dir(ptbxl100)
    assert meta.splits == {
        "train": int((folds <= 8).sum()),
        "validation": int((folds == 9).sum()),
        "test": int((folds == 10).sum()),
    }
    pairs = [(pid, part) for part, ds in dataset_dict.items() for pid in ds["patient_id"]]
    assert_patients_disjoint(pairs)
    for part, ds in dataset_dict.items():
        assert set(ds["split"]) == {part}
        ecg_ids = [int(rid.split(":")[1]) for rid in ds["record_id"]]
        wanted = {"train": range(1, 9), "validation": [9], "test": [10]}[part]
        assert set(folds.loc[ecg_ids]) <= set(wanted)


def test_kfold_parts_group_strat_folds(ptbxl_dir: Path) -> None:
    plan = plan_ptbxl(ptbxl_dir, PtbxlOptions(kfold=5))
    assert plan.parts == [f"fold_{i}" for i in range(5)]
    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv", index_col="ecg_id")
    for job in plan.jobs:
        fold = database.loc[int(job.record_id.split(":")[1]), "strat_fold"]
        assert job.split == f"fold_{(fold - 1) // 2}"
    assert_patients_disjoint((job.patient_id, job.split) for job in plan.jobs)
    assert Counter(job.split for job in plan.jobs)["fold_4"] == int(
        database["strat_fold"].isin([9, 10]).sum()
    )


def test_patient_in_two_folds_is_refused(ptbxl_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ptbxl_leaky"
    root.mkdir()
    shutil.copy(ptbxl_dir / "scp_statements.csv", root)
    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv")
    database = database[database["ecg_id"] <= 20].copy()
    database.loc[database["ecg_id"] == 2, "patient_id"] = database.loc[
        database["ecg_id"] == 1, "patient_id"
    ].item()
    database.loc[database["ecg_id"] == 2, "strat_fold"] = 10
    database.loc[database["ecg_id"] == 1, "strat_fold"] = 1
    database.to_csv(root / "ptbxl_database.csv", index=False)
    with pytest.raises(ValueError, match="more than one split part"):
        prepare_ptbxl(root, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_signals_equal_wfdb(ptbxl100: Path, ptbxl_dir: Path) -> None:
    dataset_dict, _ = load_dataset_dir(ptbxl100)
    row = dataset_dict["test"].with_format("numpy")[0]
    ecg_id = int(row["record_id"].split(":")[1])
    expected = wfdb.rdrecord(str(ptbxl_dir / f"records100/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_lr"))
    assert row["signal"].dtype == np.float32 and row["signal"].shape == (12, 1000)
    np.testing.assert_array_equal(row["signal"], expected.p_signal.T.astype(np.float32))
    assert row["fs"] == 100 and list(row["leads"])[3] == "aVR"


def test_500hz_subset(ptbxl_dir: Path, tmp_path: Path) -> None:
    dataset_dict, meta = prepare_ptbxl(
        ptbxl_dir, tmp_path / "hr", PtbxlOptions(rate=500, ecg_ids=(1, 2, 3, 4)), workers=1
    )
    rows = [row for part in dataset_dict.values() for row in part.with_format("numpy")]
    assert len(rows) == 4 and meta.options["rate"] == 500
    first = next(r for r in rows if r["record_id"] == "ptbxl:00001")
    expected = wfdb.rdrecord(str(ptbxl_dir / "records500/00000/00001_hr"))
    np.testing.assert_array_equal(first["signal"], expected.p_signal.T.astype(np.float32))
    assert first["age"] == 56 and first["sex"] == 1 and first["patient_id"] == "ptbxl:15709"


def _counting_reader(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[str]:
    calls: list[str] = []
    real = build_module.read_record

    def reader(path):
        calls.append(str(path))
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("simulated crash mid-build")
        return real(path)

    monkeypatch.setattr(build_module, "read_record", reader)
    return calls


def test_rebuild_is_reused_until_options_change(ptbxl_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls = _counting_reader(monkeypatch)
    out = tmp_path / "cached"
    options = PtbxlOptions(ecg_ids=(1, 2, 3), tasks=("superclass",))
    _, first = prepare_ptbxl(ptbxl_dir, out, options, workers=1)
    assert len(calls) == 3 and first.cache_key
    _, second = prepare_ptbxl(ptbxl_dir, out, options, workers=1)
    assert len(calls) == 3 and second.cache_key == first.cache_key  # reused: nothing read
    _, third = prepare_ptbxl(
        ptbxl_dir, out, PtbxlOptions(ecg_ids=(1, 2, 3), tasks=("superclass", "form")), workers=1
    )
    assert len(calls) == 6 and third.cache_key != first.cache_key
    assert [t.name for t in third.tasks] == ["superclass", "form"]


def test_interrupted_build_leaves_no_loadable_folder(ptbxl_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "atomic"
    _counting_reader(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_ptbxl(ptbxl_dir, out, PtbxlOptions(ecg_ids=(1, 2, 3, 4, 5)), workers=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # staging and generator cache removed
    with pytest.raises(FileNotFoundError):
        load_dataset_dir(out)

    # A complete dataset survives a failed rebuild untouched.
    monkeypatch.undo()
    _, good = prepare_ptbxl(ptbxl_dir, out, PtbxlOptions(ecg_ids=(1, 2)), workers=1)
    _counting_reader(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError):
        prepare_ptbxl(ptbxl_dir, out, PtbxlOptions(ecg_ids=(1, 2, 3)), workers=1)
    _, meta = load_dataset_dir(out)
    assert meta.cache_key == good.cache_key and sum(meta.splits.values()) == 2

    # Leftovers of a killed build (no cleanup possible) never load, and the next build removes them.
    leftover = tmp_path / ".atomic2.building-deadbeef"
    leftover.mkdir()
    (leftover / "dataset_dict.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        load_dataset_dir(leftover)
    monkeypatch.undo()
    build_dataset(plan_ptbxl(ptbxl_dir, PtbxlOptions(ecg_ids=(1,))), tmp_path / "atomic2", workers=1)
    assert not leftover.exists()


def test_describe_reports_counts(ptbxl100: Path, capsys: pytest.CaptureFixture) -> None:
    info = describe_dataset(ptbxl100)
    assert info["records"] == 500
    assert info["labels"]["superclass"]["positives"] == {
        k: SUPERCLASS_COUNTS[k] for k in ("NORM", "MI", "STTC", "CD", "HYP")
    }
    assert info["sampling_rates"] == {"100": 500}
    assert info["lead_sets"] == {"I II III aVR aVL aVF V1 V2 V3 V4 V5 V6": 500}
    assert main(["data", "describe", str(ptbxl100), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["records"] == 500 and printed["splits"]["test"] == info["splits"]["test"]
    assert main(["data", "describe", str(ptbxl100)]) == 0
    text = capsys.readouterr().out
    assert "500 records" in text and "NORM 297" in text and "HYP 40" in text


def test_record_header_names_the_file_at_each_rate(tmp_path: Path) -> None:
    from enecg.data.ptbxl import record_header

    (tmp_path / "ptbxl_database.csv").write_text(
        "ecg_id,filename_lr,filename_hr\n42,records100/00000/00042_lr,records500/00000/00042_hr\n"
    )
    assert record_header(tmp_path, "ptbxl:00042") == tmp_path / "records100/00000/00042_lr.hea"
    assert record_header(tmp_path, 42, rate=500) == tmp_path / "records500/00000/00042_hr.hea"
