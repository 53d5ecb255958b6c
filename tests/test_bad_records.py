"""Bad input: each broken record gives ONE RecordError naming the file and the problem; builds skip them.

Policy (enecg/io/checks.py): errors for truncated signal files, wrong signal counts, NaN/inf samples, 0 samples,
non-UTF-8 headers, missing signal files and non-numeric sampling rates; warnings (record kept, flagged in metadata)
for a flat lead and for an unknown lead name.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from enecg.data.build import load_dataset_dir
from enecg.data.wfdb_folder import WfdbFolderOptions, prepare_wfdb_folder
from enecg.io import read_record
from enecg.record import RecordError

LEADS = ["I", "II", "V1"]
FS = 250
N = 1000


def _signal(seed: int) -> np.ndarray:
    t = np.arange(N) / FS
    rng = np.random.default_rng(seed)
    return np.stack(
        [np.sin(2 * np.pi * (1 + i) * t) + rng.normal(0, 0.05, N) for i in range(len(LEADS))], axis=1
    )


def _write_dat(folder: Path, name: str, signal: np.ndarray | None = None, leads: list[str] = LEADS) -> Path:
    signal = _signal(len(name)) if signal is None else signal
    wfdb.wrsamp(
        name,
        fs=FS,
        units=["mV"] * len(leads),
        sig_name=leads,
        p_signal=signal,
        fmt=["16"] * len(leads),
        adc_gain=[1000.0] * len(leads),
        baseline=[0] * len(leads),
        write_dir=str(folder),
    )
    return folder / f"{name}.hea"


def _write_mat(folder: Path, name: str, val: np.ndarray) -> Path:
    """A PhysioNet/CinC Challenge record: MAT v4 'val' (leads x samples) + header with gain 1000/mV."""
    scipy.io.savemat(str(folder / f"{name}.mat"), {"val": val}, format="4")
    lines = [f"{name}.mat {val.shape[0]} {FS} {val.shape[1]} 05-May-2020 09:49:17"]
    lines += [f"{name}.mat 16+24 1000/mV 16 0 0 0 0 {lead}" for lead in LEADS[: val.shape[0]]]
    lines += ["#Age: 50", "#Sex: Male", "#Dx: 426783006"]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.hea"


def _corpus(folder: Path) -> dict[str, tuple[Path, str]]:
    """Write good and bad records; return {case: (header, expected message fragment)} for the bad ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        _write_dat(folder, f"good{i}")
    _write_mat(folder, "goodmat", (_signal(7).T * 1000).astype(np.int16))
    bad: dict[str, tuple[Path, str]] = {}

    hea = _write_dat(folder, "truncated")
    dat = folder / "truncated.dat"
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])
    bad["truncated .dat"] = (hea, "truncated")

    hea = _write_dat(folder, "sigcount")
    lines = hea.read_text().splitlines()
    hea.write_text("\n".join([lines[0].replace(" 3 ", " 4 ", 1), *lines[1:]]) + "\n")
    bad["wrong signal count"] = (hea, "declares 4 signals but the header has 3 signal lines")

    signal = _signal(3)
    signal[100:110, 1] = np.nan  # wfdb writes NaN as the format's invalid-sample code
    bad["NaN samples (.dat)"] = (_write_dat(folder, "nansamples", signal), "NaN/inf samples")

    val = _signal(4).T * 1000
    val[2, 5] = np.inf
    bad["inf samples (.mat)"] = (_write_mat(folder, "infmat", val), "NaN/inf samples")

    hea = folder / "empty.hea"
    hea.write_text("empty 3 250 0\n" + "".join(f"empty.dat 16 1000/mV 16 0 0 0 0 {lead}\n" for lead in LEADS))
    (folder / "empty.dat").write_bytes(b"")
    bad["0-sample record"] = (hea, "0 samples")

    hea = _write_dat(folder, "latin1")
    hea.write_bytes(hea.read_bytes() + "# Kommentar: Größe\n".encode("latin-1"))
    bad["non-UTF-8 header"] = (hea, "not UTF-8")

    hea = _write_mat(folder, "nomat", (_signal(5).T * 1000).astype(np.int16))
    (folder / "nomat.mat").unlink()
    bad["missing .mat"] = (hea, "signal file nomat.mat is missing")

    hea = _write_dat(folder, "badfs")
    lines = hea.read_text().splitlines()
    tokens = lines[0].split()
    tokens[2] = "fast"
    hea.write_text("\n".join([" ".join(tokens), *lines[1:]]) + "\n")
    bad["non-numeric sampling rate"] = (hea, "sampling frequency 'fast'")

    for case, rate, fragment in (
        ("0.01 Hz sampling rate", "0.01", "sampling rate 0.01 Hz is implausible"),
        ("1e9 Hz sampling rate", "1e9", "sampling rate 1e+09 Hz is implausible"),
    ):
        hea = _write_dat(folder, f"rate{len(bad)}")
        lines = hea.read_text().splitlines()
        tokens = lines[0].split()
        tokens[2] = rate
        hea.write_text("\n".join([" ".join(tokens), *lines[1:]]) + "\n")
        bad[case] = (hea, fragment)

    bad["2-sample record"] = (_write_dat(folder, "twosamples", _signal(9)[:2]), "record is too short: 2 samples")

    hea = _write_mat(folder, "complexmat", (_signal(10).T * 1000).astype(np.int16))
    scipy.io.savemat(str(folder / "complexmat.mat"), {"val": _signal(10).T * 1000 + 1j}, format="4")
    bad["complex .mat"] = (hea, "complex-valued")

    signal = _signal(6)
    signal[:, 2] = 0.25
    _write_dat(folder, "flatlead", signal)
    _write_dat(folder, "oddlead", leads=["I", "II", "ECG3"])
    _write_dat(folder, "twolead", _signal(8)[:500, :2], leads=["II", "V5"])  # other lead count and length
    return bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[Path, str]]]:
    folder = tmp_path_factory.mktemp("bad") / "records"
    return folder, _corpus(folder)


CASES = [
    "truncated .dat",
    "wrong signal count",
    "NaN samples (.dat)",
    "inf samples (.mat)",
    "0-sample record",
    "non-UTF-8 header",
    "missing .mat",
    "non-numeric sampling rate",
    "0.01 Hz sampling rate",
    "1e9 Hz sampling rate",
    "2-sample record",
    "complex .mat",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_record_gives_one_clear_error(corpus, case: str) -> None:
    _, bad = corpus
    hea, fragment = bad[case]
    with pytest.raises(RecordError) as info:
        read_record(hea)
    message = str(info.value)
    assert message.startswith(str(hea)), message  # names the file ...
    assert fragment in message, message  # ... and the problem
    assert "\n" not in message


def test_good_records_in_corpus_read(corpus) -> None:
    folder, _ = corpus
    record = read_record(folder / "goodmat.hea")
    assert record.signal.shape == (3, N) and record.metadata["dx"] == ["426783006"]
    assert read_record(folder / "good0.hea").signal.shape == (3, N)


def test_flat_lead_is_a_warning_and_a_flag(corpus, caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = corpus
    with caplog.at_level(logging.WARNING):
        record = read_record(folder / "flatlead.hea")
    assert record.metadata["flat_leads"] == ["V1"]
    assert "flat" in caplog.text and "flatlead.hea" in caplog.text


def test_all_leads_flat_is_an_error(tmp_path: Path) -> None:
    hea = _write_dat(tmp_path, "allflat", np.full((N, 3), 0.1))
    with pytest.raises(RecordError, match="all 3 leads are flat"):
        read_record(hea)


def test_unknown_lead_name_is_kept_with_a_warning(corpus, caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = corpus
    with caplog.at_level(logging.WARNING):
        record = read_record(folder / "oddlead.hea")
    assert record.leads == ("I", "II", "ECG3")
    assert record.metadata["unknown_leads"] == ["ECG3"]
    assert "ECG3" in caplog.text


def test_build_skips_bad_records_and_reports_them(
    corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, bad = corpus
    out = tmp_path / "ds"
    options = WfdbFolderOptions(validation_fraction=0.2, test_fraction=0.2, tasks=("age", "sex"))
    with caplog.at_level(logging.WARNING):
        dataset_dict, meta = prepare_wfdb_folder(folder, out, options, workers=2)
    assert len(meta.skipped) == len(bad)
    skipped_paths = {entry["path"] for entry in meta.skipped}
    assert skipped_paths == {str(hea) for hea, _ in bad.values()}
    assert all(entry["reason"] for entry in meta.skipped)
    assert f"{len(bad)} of {len(bad) + 8} records skipped" in caplog.text
    # 4 good .dat + 1 good .mat + flat-lead + unknown-lead + two-lead records.
    assert sum(len(part) for part in dataset_dict.values()) == 8
    _, reloaded = load_dataset_dir(out)
    assert len(reloaded.skipped) == len(bad)
    rows = {row["record_id"]: row for part in dataset_dict.values() for row in part.with_format("numpy")}
    assert rows["wfdb:oddlead"]["leads"].tolist() == ["I", "II", "ECG3"]
    two = rows["wfdb:twolead"]
    assert two["signal"].dtype == np.float32 and two["signal"].shape == (2, 500)
    np.testing.assert_array_equal(two["signal"], read_record(folder / "twolead.hea").signal)
    assert rows["wfdb:good0"]["signal"].shape == (3, N)
    assert rows["wfdb:goodmat"]["age"] == 50 and rows["wfdb:goodmat"]["sex"] == 0
    assert math.isnan(rows["wfdb:good0"]["age"])


def _with_record_line(hea: Path, fs_token: str) -> None:
    lines = hea.read_text().splitlines()
    tokens = lines[0].split()
    tokens[2] = fs_token
    hea.write_text("\n".join([" ".join(tokens), *lines[1:]]) + "\n")


@pytest.mark.parametrize("token, fs", [("2.5e2", 250.0), ("2.5E+2", 250.0), ("25000e-2", 250.0)])
def test_sampling_rate_in_scientific_notation_is_read_exactly(tmp_path: Path, token: str, fs: float) -> None:
    hea = _write_dat(tmp_path, "sci")
    _with_record_line(hea, token)
    record = read_record(hea)
    assert record.fs == fs and record.signal.shape == (3, N)


def test_rate_read_wrongly_would_be_refused(tmp_path: Path) -> None:
    """3.6e2 with 1000 samples: 360 Hz (2.8 s), never 3.6 Hz; the exponent of a bad rate is named in full."""
    hea = _write_dat(tmp_path, "sci")
    _with_record_line(hea, "3.6e2")
    assert read_record(hea).fs == 360.0
    _with_record_line(hea, "3.6e5")
    with pytest.raises(RecordError, match="sampling rate 360000 Hz is implausible"):
        read_record(hea)


def test_too_long_record_is_refused_before_reading(tmp_path: Path) -> None:
    """A header declaring > 24 h is refused from the header alone (the signal file is never read)."""
    hea = _write_dat(tmp_path, "long")
    lines = hea.read_text().splitlines()
    tokens = lines[0].split()
    tokens[3] = str(250 * 3600 * 25)
    hea.write_text("\n".join([" ".join(tokens), *lines[1:]]) + "\n")
    with pytest.raises(RecordError, match=r"record is too long: .* = 25 h"):
        read_record(hea)


def test_header_with_utf8_bom_is_read(tmp_path: Path) -> None:
    hea = _write_dat(tmp_path, "bom")
    expected = read_record(hea)
    hea.write_bytes(b"\xef\xbb\xbf" + hea.read_bytes())
    record = read_record(hea)
    assert record.record_id == "bom" and record.fs == FS
    np.testing.assert_array_equal(record.signal, expected.signal)


def test_build_with_only_bad_records_writes_nothing_and_fails(corpus, tmp_path: Path) -> None:
    """Only unusable records: `enecg data prepare` exits non-zero with a summary; no (empty) dataset appears."""
    from enecg.cli import main

    folder, bad = corpus
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for hea, _ in bad.values():
        for path in folder.glob(f"{hea.stem}.*"):
            (only_bad / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "ds"
    code = main(["data", "prepare", "wfdb", "--root", str(only_bad), "--out", str(out), "--workers", "1"])
    assert code == 2
    assert not out.exists() and not list(tmp_path.glob(".ds.*"))


def test_only_bad_records_error_message(corpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from enecg.cli import main
    from enecg.data.build import NoUsableRecordsError

    folder, bad = corpus
    hea, _ = bad["2-sample record"]
    only = tmp_path / "one"
    only.mkdir()
    for path in folder.glob(f"{hea.stem}.*"):
        (only / path.name).write_bytes(path.read_bytes())
    with pytest.raises(NoUsableRecordsError, match=r"none of the 1 wfdb records is usable \(1 skipped"):
        prepare_wfdb_folder(only, tmp_path / "ds")
    assert main(["data", "prepare", "wfdb", "--root", str(only), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("enecg: error: ")
    assert "nothing written" in err and "record is too short: 2 samples" in err
