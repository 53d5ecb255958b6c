"""The Efficiency Score (monotonicity, edge cases), the subprocess measurement, the ``enecg efficiency`` recipe and
its ``--quick`` end-to-end run. No timing is asserted (numbers live in bench/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from enecg.cli import main
from enecg.cli.seeds import load_seed_recipe
from enecg.contract import InputContract
from enecg.evaluation import efficiency as efficiency_module
from enecg.evaluation.efficiency import (
    COST_KEYS,
    MeasurementSettings,
    ScoreSettings,
    count_parameters,
    efficiency_score,
    measure_latency,
    measure_saved_model,
    measured_model,
)
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import save_inhouse_expert
from enecg.leads import STANDARD_12_LEADS
from enecg.training.recipe import RecipeError

RECIPE = REPO_ROOT / "recipes" / "efficiency_benchmark.yaml"
REFERENCE = {"params": 150_000.0, "latency_ms": 1.0, "memory_mb": 20.0}


# --------------------------------------------------------------------------------------------------- score


def _random_case(rng: np.random.Generator) -> tuple[float, dict[str, float]]:
    auroc = float(rng.uniform(0.51, 0.99))
    costs = {
        "params": float(10 ** rng.uniform(3.5, 7)),
        "latency_ms": float(10 ** rng.uniform(-1, 2)),
        "memory_mb": float(10 ** rng.uniform(0.5, 3)),
    }
    return auroc, costs


@pytest.mark.parametrize(
    "settings",
    [
        ScoreSettings(),
        ScoreSettings(cost_exponent=0.5, weight_params=3.0, weight_latency=0.5, weight_memory=1.0),
    ],
)
def test_score_is_strictly_monotone_in_each_input(settings: ScoreSettings) -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        auroc, costs = _random_case(rng)
        base = efficiency_score(auroc, costs, REFERENCE, settings)
        assert base is not None and base > 0
        step = float(rng.uniform(1e-3, 0.01))
        assert efficiency_score(auroc + step, costs, REFERENCE, settings) > base
        assert efficiency_score(auroc - step, costs, REFERENCE, settings) < base
        for key in COST_KEYS:
            factor = float(rng.uniform(1.01, 3.0))
            higher = dict(costs, **{key: costs[key] * factor})
            lower = dict(costs, **{key: costs[key] / factor})
            assert efficiency_score(auroc, higher, REFERENCE, settings) < base, key
            assert efficiency_score(auroc, lower, REFERENCE, settings) > base, key


def test_score_reference_chance_and_units() -> None:
    settings = ScoreSettings()
    # A model with the reference's costs scores 100 * skill above chance.
    assert efficiency_score(0.9, REFERENCE, REFERENCE, settings) == pytest.approx(80.0)
    assert efficiency_score(1.0, REFERENCE, REFERENCE, settings) == pytest.approx(100.0)
    # No better than chance: no value at any cost (never negative).
    assert efficiency_score(0.5, REFERENCE, REFERENCE, settings) == 0.0
    assert (
        efficiency_score(0.3, {"params": 2e3, "latency_ms": 0.05, "memory_mb": 2.0}, REFERENCE, settings)
        == 0.0
    )
    # 10x every cost needs 10 ** beta times the skill to tie.
    costly = {k: v * 10 for k, v in REFERENCE.items()}
    assert efficiency_score(0.9, costly, REFERENCE, settings) == pytest.approx(
        80.0 / 10**settings.cost_exponent
    )
    # Unit-free: the same change of unit on model and reference changes nothing (above the floors).
    tiny = ScoreSettings(floor_params=1e-9, floor_latency_ms=1e-9, floor_memory_mb=1e-9)
    costs = {"params": 5e4, "latency_ms": 3.0, "memory_mb": 7.0}
    scaled = {k: v / 1000 for k, v in costs.items()}
    ref_scaled = {k: v / 1000 for k, v in REFERENCE.items()}
    assert efficiency_score(0.8, costs, REFERENCE, tiny) == pytest.approx(
        efficiency_score(0.8, scaled, ref_scaled, tiny)
    )
    # cost_exponent 0: AUROC only.
    assert efficiency_score(0.8, costly, REFERENCE, ScoreSettings(cost_exponent=0.0)) == pytest.approx(60.0)


def test_score_edge_cases() -> None:
    settings = ScoreSettings()
    assert efficiency_score(None, REFERENCE, REFERENCE, settings) is None
    assert efficiency_score(math.nan, REFERENCE, REFERENCE, settings) is None
    # Costs below the floors count as the floor: zero memory gives a finite score, equal to the floor's.
    at_zero = efficiency_score(0.9, dict(REFERENCE, memory_mb=0.0), REFERENCE, settings)
    at_floor = efficiency_score(0.9, dict(REFERENCE, memory_mb=settings.floor_memory_mb), REFERENCE, settings)
    assert math.isfinite(at_zero) and at_zero == pytest.approx(at_floor)
    for bad_auroc in (1.2, -0.1, "0.9"):
        with pytest.raises(ValueError, match="AUROC"):
            efficiency_score(bad_auroc, REFERENCE, REFERENCE, settings)
    for key in COST_KEYS:
        for bad in (-1.0, math.inf, math.nan, None, True):
            with pytest.raises(ValueError, match=key):
                efficiency_score(0.9, dict(REFERENCE, **{key: bad}), REFERENCE, settings)
        with pytest.raises(ValueError, match=key):
            efficiency_score(0.9, {k: v for k, v in REFERENCE.items() if k != key}, REFERENCE, settings)
    with pytest.raises(ValueError, match="weights"):
        ScoreSettings(weight_params=0.0, weight_latency=0.0, weight_memory=0.0)
    with pytest.raises(ValueError, match="weights"):
        ScoreSettings(weight_latency=-1.0)
    with pytest.raises(ValueError, match="cost_exponent"):
        ScoreSettings(cost_exponent=-0.1)
    # A weight of 0 removes that cost from the score.
    no_memory = ScoreSettings(weight_memory=0.0)
    assert efficiency_score(0.9, dict(REFERENCE, memory_mb=1e4), REFERENCE, no_memory) == pytest.approx(80.0)


# --------------------------------------------------------------------------------------------- measurement


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = LightCNNConfig(
        "SimpleNet", width_multiplier=0.25, embedding_dim=16, n_outputs=5, use_demographics=True
    )
    model = build_light_model(config).eval()
    folder = tmp_path_factory.mktemp("expert") / "simplenet"
    contract = InputContract(fs=100.0, leads=tuple(STANDARD_12_LEADS), length=1000, scaling="zscore_lead")
    save_inhouse_expert(model, family="light", config=config, contract=contract, folder=folder, name="tiny")
    return folder, model


def test_measurement_in_a_fresh_subprocess(tiny_expert) -> None:
    folder, model = tiny_expert
    settings = MeasurementSettings(threads=1, batch_size=2, warmup=0, repeats=2)
    result = measure_saved_model("light", folder, settings)
    assert result["params"] == count_parameters(model)
    assert result["threads"] == 1 and result["batch"]["batch_size"] == 2 and result["batch1"]["repeats"] == 2
    for key in ("latency_ms", "latency_ms_per_record_batched"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["latency_ms_per_record_batched"] == pytest.approx(result["batch"]["median_ms"] / 2)
    assert result["peak_memory_mb"] >= 0 and result["process_peak_rss_mb"] >= result["baseline_rss_mb"]
    assert "VmHWM" in result["memory_method"] or "ru_maxrss" in result["memory_method"]


def test_measurement_errors_are_one_line(tmp_path: Path, capsys) -> None:
    # What the measurement subprocess runs, in this process: a folder without an expert fails with one line.
    assert efficiency_module._main(["light", str(tmp_path), json.dumps({"batch_size": 1})]) == 1
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and "\n" not in err
    assert efficiency_module._main(["light"]) == 2
    with pytest.raises(ValueError, match="unknown model kind"):
        measured_model("cnn", tmp_path)


def test_in_process_latency_uses_the_forward_and_restores_threads(tiny_expert) -> None:
    folder, _ = tiny_expert
    spec = measured_model("light", folder)
    model = spec.load()
    calls = []

    def forward(m, inputs):
        calls.append(inputs[0].shape[0])
        return spec.forward(m, inputs)

    threads = torch.get_num_threads()
    result = measure_latency(
        model,
        forward,
        spec.make_inputs(model, 1),
        spec.make_inputs(model, 3),
        MeasurementSettings(threads=1, batch_size=3, warmup=1, repeats=2),
    )
    assert torch.get_num_threads() == threads
    assert calls == [1, 1, 1, 3, 3, 3]  # warm-up + repeats at each batch size
    assert result["batch1"]["repeats"] == 2 and result["latency_ms"] > 0


# -------------------------------------------------------------------------------------------------- recipe


def test_shipped_recipe_parses_and_unknown_keys_are_rejected(tmp_path: Path) -> None:
    recipe = load_seed_recipe("efficiency", str(RECIPE), [])
    assert len(recipe.model.architectures) == 5 and recipe.model.demographics == [False, True]
    assert recipe.score.reference == "AttiaNet" and recipe.ensemble.enabled
    quick = load_seed_recipe("efficiency", str(RECIPE), ["--training.epochs=2"], quick=True)
    assert quick.model.architectures == ["SimpleNet"] and quick.training.epochs == 2  # user flags win
    with pytest.raises(RecipeError, match=r"score\.bogus"):
        load_seed_recipe("efficiency", str(RECIPE), ["--score.bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("  repeats: 30", "  repeats: 30\n  repeat_count: 3"))
    with pytest.raises(RecipeError, match=r"bad\.yaml.*measurement\.repeat_count"):
        load_seed_recipe("efficiency", str(bad), [])
    with pytest.raises(RecipeError, match="architectures"):
        load_seed_recipe("efficiency", str(RECIPE), ["--model.architectures=[ResNet]"])
    with pytest.raises(RecipeError, match=r"measurement\.repeats"):
        load_seed_recipe("efficiency", str(RECIPE), ["--measurement.repeats=many"])


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["efficiency", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["efficiency", "--help-recipe"]) == 0
    out = capsys.readouterr().out
    assert "score.cost_exponent" in out and "ensemble.model.gate" in out
    assert main(["efficiency"]) == 2  # no recipe: one clear error line
    assert "needs a recipe file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- end to end


def test_quick_run_writes_json_and_report(ptbxl_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "efficiency",
            str(RECIPE),
            "--quick",
            f"--data.path={tmp_path / 'ptbxl'}",
            f"--data.prepare_from={ptbxl_dir}",
            f"--output.dir={out}",
            "--measurement.repeats=2",
        ]
    )
    assert code == 0
    document = json.loads((out / "efficiency.json").read_text())
    rows = {r["name"]: r for r in document["rows"]}
    assert set(rows) == {"SimpleNet", "SimpleNet+age/sex", "ensemble(SimpleNet)"}
    assert rows["ensemble(SimpleNet)"]["kind"] == "ensemble" and rows["ensemble(SimpleNet)"]["members"] == [
        "SimpleNet"
    ]
    for row in rows.values():
        assert row["params"] > 0 and row["latency_ms"] > 0 and row["memory_mb"] >= 0
        assert row["measurement"]["threads"] == 1 and row["measurement"]["batch1"]["repeats"] == 2
        assert row["test"]["n_records"] == document["dataset"]["test"] > 0
        assert row["auroc"] is None or 0.0 <= row["auroc"] <= 1.0
    # Demographics add parameters; the ensemble holds its expert plus heads and gate.
    assert rows["SimpleNet+age/sex"]["params"] > rows["SimpleNet"]["params"]
    assert rows["ensemble(SimpleNet)"]["params"] > rows["SimpleNet"]["params"]
    reference = document["score"]["reference"]
    assert reference["name"] == "SimpleNet" and reference["params"] == rows["SimpleNet"]["params"]
    for row in rows.values():
        expected = efficiency_score(
            row["auroc"],
            {k: row[k] for k in ("params", "latency_ms", "memory_mb")},
            reference,
            ScoreSettings(**document["score"]["settings"]),
        )
        assert row["efficiency_score"] == pytest.approx(expected)
    html = (out / "report.html").read_text()
    assert "Efficiency Score" in html and "SimpleNet+age/sex" in html and 'src="auroc_vs_latency.png"' in html
    assert (out / "auroc_vs_latency.png").stat().st_size > 1000
    assert (out / "experts" / "simplenet" / "enecg_expert.json").is_file()
    assert "score" in capsys.readouterr().out
