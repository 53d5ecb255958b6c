"""Readers: values identical to wfdb / scipy.io.loadmat, headers wfdb rejects, any lead set and length."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from enecg.io import read_header, read_record
from enecg.io.comments import comment_metadata
from enecg.io.header import normalise_record_line
from enecg.record import RecordError


def _mat_physical(hea: Path) -> np.ndarray:
    """Expected signal of a CinC record computed independently: loadmat 'val' and the header's gain/baseline."""
    val = scipy.io.loadmat(str(hea.with_suffix(".mat")))["val"].astype(np.float64)
    gains, baselines = [], []
    for line in hea.read_text().splitlines()[1 : 1 + val.shape[0]]:
        gain_field = line.split()[2]  # e.g. 1000.0(0)/mV or 1000/mV
        gain_text = gain_field.split("/")[0]
        gain, _, rest = gain_text.partition("(")
        gains.append(float(gain))
        baselines.append(float(rest.rstrip(")")) if rest else 0.0)
    return ((val - np.array(baselines)[:, None]) / np.array(gains)[:, None]).astype(np.float32)


@pytest.mark.parametrize("rel", ["records100/00000/00001_lr", "records500/00000/00007_hr"])
def test_ptbxl_record_equals_wfdb(ptbxl_dir: Path, rel: str) -> None:
    record = read_record(ptbxl_dir / f"{rel}.hea")
    expected = wfdb.rdrecord(str(ptbxl_dir / rel))
    assert record.signal.dtype == np.float32
    assert record.signal.shape == (12, expected.sig_len)
    np.testing.assert_array_equal(record.signal, expected.p_signal.T.astype(np.float32))
    assert record.fs == expected.fs
    # Headers spell AVR/AVL/AVF; records carry canonical names.
    assert record.leads == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert record.record_id == Path(rel).name
    assert record.metadata["path"].endswith(f"{Path(rel).name}.hea")


def test_record_path_forms_are_equivalent(ptbxl_dir: Path) -> None:
    base = ptbxl_dir / "records100/00000/00002_lr"
    by_header = read_record(base.with_suffix(".hea"))
    for form in (base, base.with_suffix(".dat"), str(base)):
        np.testing.assert_array_equal(read_record(form).signal, by_header.signal)


@pytest.mark.parametrize(
    "rel", ["cinc2021/E07500", "cinc2021/HR06003", "cinc2021/JS20000", "training_data/A0689"]
)
def test_cinc_mat_record_equals_loadmat_and_wfdb(cinc_dir: Path, rel: str) -> None:
    hea = cinc_dir / f"{rel}.hea"
    if not hea.is_file():
        pytest.skip(f"{hea} not in this data sample")
    record = read_record(hea)
    np.testing.assert_array_equal(record.signal, _mat_physical(hea))
    np.testing.assert_array_equal(
        record.signal, wfdb.rdrecord(str(hea.with_suffix(""))).p_signal.T.astype(np.float32)
    )
    assert record.metadata["format"] == "mat"
    assert record.fs == 500


def test_georgia_header_that_wfdb_rejects(cinc_dir: Path) -> None:
    hea = cinc_dir / "training_data/E00271.hea"
    with pytest.raises(wfdb.io.header.HeaderSyntaxError):
        wfdb.rdheader(str(hea.with_suffix("")))
    record = read_record(hea)
    assert record.record_id == "E00271"
    assert record.fs == 500 and record.signal.shape == (12, 5000)
    np.testing.assert_array_equal(record.signal, _mat_physical(hea))
    assert record.metadata["age"] == 83 and record.metadata["sex"] == 1.0
    assert record.metadata["dx"] == ["59118001"]
    header = read_header(hea)
    assert header.record_line_normalised
    assert str(header.record.base_time) == "14:50:55" and str(header.record.base_date) == "2020-05-05"


def test_every_shared_cinc_header_reads(cinc_dir: Path) -> None:
    headers = sorted(cinc_dir.rglob("*.hea"))
    assert len(headers) >= 50
    georgia_style = 0
    for hea in headers:
        header = read_header(hea)
        georgia_style += header.record.record_name != hea.read_text().split()[0]
        assert header.record.record_name == hea.stem
        assert header.record.n_sig == 12 and header.record.fs == 500
    assert georgia_style >= 1


def test_header_fields_equal_wfdb_for_well_formed_headers(cinc_dir: Path, ptbxl_dir: Path) -> None:
    headers = (
        sorted((cinc_dir / "cinc2021").glob("*.hea"))[:10]
        + sorted((ptbxl_dir / "records100/00000").glob("*.hea"))[:5]
    )
    for hea in headers:
        ours = read_header(hea).record
        theirs = wfdb.rdheader(str(hea.with_suffix("")))
        for name in (
            "record_name",
            "n_sig",
            "fs",
            "sig_len",
            "file_name",
            "fmt",
            "samps_per_frame",
            "byte_offset",
            "adc_gain",
            "baseline",
            "units",
            "adc_res",
            "adc_zero",
            "init_value",
            "checksum",
            "sig_name",
            "comments",
        ):
            assert getattr(ours, name) == getattr(theirs, name), (hea, name)


def test_normalise_record_line() -> None:
    path = Path("x.hea")
    assert normalise_record_line("100 2 360 650000", path) == "100 2 360 650000"
    assert (
        normalise_record_line("100 2 360 650000 10:20:30 01/02/2003", path)
        == "100 2 360 650000 10:20:30 01/02/2003"
    )
    assert normalise_record_line("E07500.mat 12 500 5000 05-May-2020 09:49:17", path) == (
        "E07500 12 500 5000 09:49:17 05/05/2020"
    )
    assert normalise_record_line("A0689 12 500 5000 12-May-2020 12:33:59", path) == (
        "A0689 12 500 5000 12:33:59 12/05/2020"
    )
    with pytest.raises(RecordError, match="sampling frequency 'abc'"):
        normalise_record_line("r 12 abc 5000", path)
    with pytest.raises(RecordError, match="no sampling frequency"):
        normalise_record_line("r 12", path)


def test_mit_bih_style_record_any_leads(tmp_path: Path) -> None:
    """Two Holter leads, format 212, 360 Hz, a length unlike PTB-XL: read exactly as wfdb does."""
    rng = np.random.default_rng(0)
    signal = np.cumsum(rng.normal(0, 0.01, size=(3001, 2)), axis=0)
    wfdb.wrsamp(
        "mit",
        fs=360,
        units=["mV", "mV"],
        sig_name=["MLII", "V5"],
        p_signal=signal,
        fmt=["212", "212"],
        adc_gain=[200.0, 200.0],
        baseline=[1024, 1024],
        write_dir=str(tmp_path),
    )
    record = read_record(tmp_path / "mit.hea")
    expected = wfdb.rdrecord(str(tmp_path / "mit"))
    assert record.leads == ("MLII", "V5")
    assert record.fs == 360 and record.signal.shape == (2, 3001)
    np.testing.assert_array_equal(record.signal, expected.p_signal.T.astype(np.float32))
    assert "unknown_leads" not in record.metadata


def test_microvolt_units_are_converted_to_millivolts(tmp_path: Path) -> None:
    signal_uv = np.linspace(-1000, 1000, 500)[:, None] * np.ones((1, 3))
    wfdb.wrsamp(
        "uv",
        fs=250,
        units=["uV"] * 3,
        sig_name=["I", "II", "V1"],
        p_signal=signal_uv,
        fmt=["16"] * 3,
        adc_gain=[1.0] * 3,
        baseline=[0] * 3,
        write_dir=str(tmp_path),
    )
    record = read_record(tmp_path / "uv.hea")
    # 1 adu per uV: rounding to the nearest uV is the only difference.
    np.testing.assert_allclose(record.signal, (signal_uv / 1000).T, atol=0.5e-3 + 1e-6)
    assert np.abs(record.signal).max() == pytest.approx(1.0)


def test_comment_metadata() -> None:
    meta = comment_metadata(["Age: 61", "Sex: Female", "Dx: 164889003, 59118001,164889003"])
    assert meta == {"age": 61.0, "sex": 1.0, "dx": ["164889003", "59118001"]}
    meta = comment_metadata(["Age: NaN", "Sex: Unknown"])
    assert math.isnan(meta["age"]) and math.isnan(meta["sex"]) and "dx" not in meta


def test_write_wfdb_round_trips_through_read_record(tmp_path: Path) -> None:
    from enecg.io import write_wfdb
    from enecg.record import ECGRecord

    signal = (np.sin(np.linspace(0, 20, 3 * 500)) * np.arange(1, 4)[:, None]).astype(np.float32)
    record = ECGRecord(signal=signal, fs=500.0, leads=("I", "II", "V1"), record_id="src:00007")
    path = write_wfdb(record, tmp_path / "out")
    assert path == tmp_path / "out" / "src_00007.hea" and path.is_file()
    back = read_record(path)
    assert back.fs == 500.0 and back.leads == record.leads
    np.testing.assert_allclose(back.signal, signal, atol=2e-3)  # 16-bit samples
