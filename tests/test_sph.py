"""SPH (Shandong Provincial Hospital) records: the .h5 reader and `enecg data prepare sph`.

No SPH file is stored here, so the tests write SPH-format records from PTB-XL 500 Hz records, in the layout of the
release (Liu et al., Scientific Data 9, 272 (2022); figshare 10.6084/m9.figshare.c.5779802): ``records/<ECG_ID>.h5``
with one dataset ``ecg`` (float16, 12 x samples, mV, 500 Hz, standard lead order) and ``metadata.csv`` with
``ECG_ID, AHA_Code, Patient_ID, Age, Sex, N, Date`` (``AHA_Code``: ``;``-separated statements, ``+`` modifiers).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="h5py not installed (a dependency of enecg: pip install h5py)")

from enecg.cli import main  # noqa: E402
from enecg.data.build import load_dataset_dir  # noqa: E402
from enecg.data.sph import SphOptions, plan_sph, prepare_sph, primary_codes  # noqa: E402
from enecg.io import read_record  # noqa: E402
from enecg.io.sph import read_sph_record  # noqa: E402
from enecg.record import RecordError  # noqa: E402

# (ECG_ID, AHA_Code, Patient_ID, Age, Sex); A00002 and A00003 are one patient.
ROWS = [
    ("A00001", "1", "S00001", "56", "M"),
    ("A00002", "50+346;22", "S00002", "19", "F"),
    ("A00003", "22", "S00002", "19", "F"),
    ("A00004", "147", "S00003", "", "F"),
    ("A00005", "1", "S00004", "77", "M"),
    ("A00006", "60;1", "S00005", "64", "M"),
]


def _ptbxl_signal(ptbxl_dir: Path, i: int) -> np.ndarray:
    return read_record(ptbxl_dir / "records500" / "00000" / f"{i:05d}_hr.hea").signal


def _write_h5(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("ecg", data=data)
    return path


def _write_release(root: Path, ptbxl_dir: Path, rows=ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ECG_ID", "AHA_Code", "Patient_ID", "Age", "Sex", "N", "Date"])
        for i, (ecg_id, codes, patient, age, sex) in enumerate(rows, start=1):
            signal = _ptbxl_signal(ptbxl_dir, i).astype(np.float16)
            _write_h5(root / "records" / f"{ecg_id}.h5", signal)
            writer.writerow([ecg_id, codes, patient, age, sex, signal.shape[1], "2020-01-01"])
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, ptbxl_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("sph")
    return _write_release(root, ptbxl_dir)


def test_read_sph_record(release: Path, ptbxl_dir: Path) -> None:
    record = read_sph_record(release / "records" / "A00001.h5")
    assert record.fs == 500 and record.signal.shape == (12, 5000) and record.signal.dtype == np.float32
    assert record.leads == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert record.record_id == "A00001"
    expected = _ptbxl_signal(ptbxl_dir, 1).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(record.signal, expected)
    # read_record (what `enecg predict` uses) reads .h5 records too.
    np.testing.assert_array_equal(read_record(release / "records" / "A00001.h5").signal, record.signal)


def test_primary_codes() -> None:
    assert primary_codes("50+346;22") == ["50", "22"]
    assert primary_codes("1;1") == ["1"] and primary_codes(float("nan")) == []
    assert primary_codes("310") == []  # a modifier alone
    with pytest.raises(ValueError, match="not a whole number"):
        primary_codes("AF")


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "SPH record file not found"),
        ("not_hdf5", "cannot read as HDF5"),
        ("no_ecg", "no 'ecg' dataset"),
        ("three_leads", "has shape (3, 5000), expected (12, samples)"),
        ("complex", "complex-valued"),
        ("nan", "NaN/inf samples"),
        ("short", "record is too short"),
        ("strings", "not numbers"),
    ],
)
def test_bad_sph_records_give_one_clear_error(tmp_path: Path, case: str, fragment: str) -> None:
    path = tmp_path / f"{case}.h5"
    good = np.random.default_rng(0).normal(0, 0.3, (12, 5000)).astype(np.float16)
    if case == "not_hdf5":
        path.write_bytes(b"this is not HDF5")
    elif case == "no_ecg":
        with h5py.File(path, "w") as handle:
            handle.create_dataset("signal", data=good)
    elif case == "three_leads":
        _write_h5(path, good[:3])
    elif case == "complex":
        _write_h5(path, good.astype(np.complex64))
    elif case == "nan":
        bad = good.copy()
        bad[4, 10] = np.nan
        _write_h5(path, bad)
    elif case == "short":
        _write_h5(path, good[:, :100])
    elif case == "strings":
        _write_h5(path, np.array([[b"a"] * 600] * 12))
    with pytest.raises(RecordError) as info:
        read_sph_record(path)
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_sample_count_is_checked_against_metadata(release: Path) -> None:
    with pytest.raises(RecordError, match=r"has 5000 samples but metadata\.csv says 4000"):
        read_sph_record(release / "records" / "A00001.h5", expected_samples=4000)


def test_prepare_sph(release: Path, tmp_path: Path) -> None:
    options = SphOptions(validation_fraction=0.2, test_fraction=0.2, seed=1)
    dataset_dict, meta = prepare_sph(release, tmp_path / "ds", options, workers=1)
    assert meta.source == "sph" and sum(meta.splits.values()) == len(ROWS) and not meta.skipped
    assert meta.task("aha").names == ["1", "22", "50", "60", "147"]  # primary codes, by code; 346 a modifier
    rows = {r["record_id"]: r for part in dataset_dict.values() for r in part.with_format("numpy")}
    a2 = rows["sph:A00002"]
    assert a2["aha"].tolist() == [0, 1, 1, 0, 0] and a2["sex"] == 1 and a2["age"] == 19
    assert a2["patient_id"] == "sph:S00002" and a2["signal"].shape == (12, 5000) and a2["fs"] == 500
    assert np.isnan(rows["sph:A00004"]["age"]) and rows["sph:A00001"]["sex"] == 0
    # One patient, one part.
    assert rows["sph:A00002"]["split"] == rows["sph:A00003"]["split"]


def test_prepare_sph_skips_bad_records_and_drops_unlisted_files(
    tmp_path: Path, ptbxl_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _write_release(tmp_path / "sph", ptbxl_dir, ROWS[:4])
    (root / "records" / "A00003.h5").unlink()  # listed, missing
    bad = np.full((12, 5000), 0.5, dtype=np.float16)
    _write_h5(root / "records" / "A00004.h5", bad)  # every lead flat
    _write_h5(root / "records" / "A09999.h5", bad)  # not in metadata.csv
    out = tmp_path / "ds"
    argv = ["data", "prepare", "sph", "--root", str(root), "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    assert "2 records" in capsys.readouterr().out
    _, meta = load_dataset_dir(out)
    reasons = {entry["record"]: entry["reason"] for entry in meta.skipped}
    assert reasons.keys() == {"sph:A00003", "sph:A00004"}
    assert "not found" in reasons["sph:A00003"] and "flat" in reasons["sph:A00004"]
    assert [d["record"] for d in meta.dropped] == ["sph:A09999"]
    assert json.loads((out / "enecg_dataset.json").read_text())["source"] == "sph"


def test_metadata_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["data", "prepare", "sph", "--root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "metadata.csv: not found" in capsys.readouterr().err
    (tmp_path / "metadata.csv").write_text("ID,Code\nA1,1\n")
    assert main(argv) == 2
    assert "missing columns ['ECG_ID', 'AHA_Code', 'Patient_ID']" in capsys.readouterr().err
    (tmp_path / "metadata.csv").write_text("ECG_ID,AHA_Code,Patient_ID\nA1,1;AF,S1\n")
    with pytest.raises(ValueError, match="ECG_ID A1: AHA code 'AF'"):
        plan_sph(tmp_path)
