"""``enecg experts list`` / ``enecg experts check``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import parity_dir
from huggingface_hub import constants as hf_constants

import enecg.cli
from enecg.cli.experts import synthetic_record
from enecg.experts.family import family_names
from enecg.experts.spec import bundled_spec, bundled_specs

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REGISTERED_COMMAND_MODULES = enecg.cli.COMMAND_MODULES  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def only_expert_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the real entry point with just this command group (other groups are tested on their own)."""
    monkeypatch.setattr(enecg.cli, "COMMAND_MODULES", ("enecg.cli.experts",))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = enecg.cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_experts_is_a_registered_command_group() -> None:
    assert "enecg.cli.experts" in REGISTERED_COMMAND_MODULES


def test_list_json_has_every_bundled_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["experts", "list", "--json"], capsys)
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == set(bundled_specs())
    row = rows["ecg-fm-pretrained"]
    assert row["hub_id"] == "wanglab/ecg-fm" and row["family"] == "ecg_fm" and row["embedding_dim"] == 768
    assert row["license"] == "mit" and "2500 samples" in row["contract"] and "segments" in row["contract"]
    assert rows["hubert-ecg-small"]["license"] == "cc-by-nc-4.0"


def test_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["experts", "list"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "HUB", "ID"]
    assert len(lines) == 1 + len(bundled_specs())
    assert any(
        line.startswith("hubert-ecg-small ") and "Edoardo-BS/hubert-ecg-small" in line for line in lines
    )


def _hubert_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if "hubert_ecg" not in family_names():
        pytest.skip("expert family 'hubert_ecg' not available")
    tiny = parity_dir() / "hubert_ecg" / "tiny_a"
    if not tiny.is_dir():
        pytest.skip(f"parity fixture {tiny} not found")
    cache = tmp_path / "hub"
    repo = cache / "models--enecg-test--hubert-ecg-tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, snapshot / name)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    spec = bundled_spec("hubert-ecg-small").replace(
        name="hubert-ecg-tiny", hub_id="enecg-test/hubert-ecg-tiny", embedding_dim=32
    )
    spec_path = tmp_path / "hubert-ecg-tiny.json"
    spec.save_json(spec_path)
    return spec_path


def test_check_hub_id_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = _hubert_cache(tmp_path, monkeypatch)
    code, out, err = run(
        ["experts", "check", "enecg-test/hubert-ecg-tiny", "--spec", str(spec_path), "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["family"] == "hubert_ecg" and report["revision"] == COMMIT
    assert report["hub_id"] == "enecg-test/hubert-ecg-tiny"
    assert (
        report["embedding_dim"] == 32 and report["embedding_shape"] == [1, 32] and report["embedding_finite"]
    )
    assert report["prepared_shape"] == [1, 1, 6000]
    assert report["key_check"].startswith("ok") and report["num_parameters"] > 0
    assert report["contract"]["fs"] == 100.0 and report["license"] == "cc-by-nc-4.0"


def test_check_spec_file_text_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = _hubert_cache(tmp_path, monkeypatch)
    code, out, err = run(["experts", "check", str(spec_path), "--revision", "main"], capsys)
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["revision"] == COMMIT and fields["embedding_shape"] == "[1, 32]"


def test_check_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path = _hubert_cache(tmp_path, monkeypatch)
    code, out, err = run(
        ["experts", "check", "enecg-test/hubert-ecg-tiny", "--spec", str(spec_path), "--revision", "v404"],
        capsys,
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("enecg: error: ") and "'v404'" in err
    code, _, err = run(["experts", "check", "no such thing"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such thing" in err


def test_synthetic_record_matches_the_contract() -> None:
    for spec in bundled_specs().values():
        record = synthetic_record(spec.contract)
        c = spec.contract
        assert record.fs == c.fs and record.leads == c.leads
        assert record.n_samples == c.length * (2 if c.long_records == "segments" else 1)
