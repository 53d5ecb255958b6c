"""`enecg data ...`: --help everywhere, prepare for each source, describe, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from enecg.cli import main
from enecg.data.build import load_dataset_dir


@pytest.mark.parametrize(
    "argv",
    [
        ["data"],
        ["data", "prepare"],
        ["data", "prepare", "ptbxl"],
        ["data", "prepare", "cinc"],
        ["data", "prepare", "sph"],
        ["data", "prepare", "wfdb"],
        ["data", "describe"],
    ],
)
def test_help_on_every_subcommand(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: enecg " + " ".join(argv))


def test_prepare_wfdb_and_describe(ptbxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plain"
    argv = [
        "data",
        "prepare",
        "wfdb",
        "--root",
        str(ptbxl_dir / "records500"),
        "--out",
        str(out),
        "--limit",
        "8",
        "--hr-target",
        "--kfold",
        "2",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    assert "8 records" in capsys.readouterr().out
    dataset_dict, meta = load_dataset_dir(out)
    assert set(dataset_dict) == {"fold_0", "fold_1"} and meta.options["hr_target"] is True
    rates = np.concatenate(
        [np.asarray(ds.with_format("numpy")["heart_rate"]) for ds in dataset_dict.values()]
    )
    assert np.isfinite(rates).all() and ((rates > 30) & (rates < 200)).all()
    assert main(["data", "describe", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 8 and info["sampling_rates"] == {"500": 8}
    assert info["labels"]["heart_rate"]["unit"] == "bpm"


def test_prepare_cinc_with_custom_classes(
    cinc_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cinc"
    argv = [
        "data",
        "prepare",
        "cinc",
        "--root",
        str(cinc_dir / "cinc2021"),
        "--out",
        str(out),
        "--limit",
        "6",
        "--classes",
        "NSR=426783006,SB=426177001",
        "--tasks",
        "dx,age",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    _, meta = load_dataset_dir(out)
    assert [t.name for t in meta.tasks] == ["dx", "age"] and meta.task("dx").names == ["NSR", "SB"]
    capsys.readouterr()
    assert main(["data", "describe", str(out)]) == 0
    assert "dx (multilabel): 6 labelled" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "describe", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("enecg: error: ") and err.count("\n") == 1
    assert main(["data", "prepare", "ptbxl", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ptbxl_database.csv" in capsys.readouterr().err
