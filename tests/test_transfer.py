"""Pretrain -> fine-tune (``enecg transfer``): head replacement, the reusable supervised trainer, the recipe and the
``--quick`` end-to-end run on the shared CinC and PTB-XL samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from enecg.cli import main
from enecg.cli.seeds import load_seed_recipe
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.weights import WeightsError
from enecg.training.light_experts import (
    SupervisedDataSection,
    SupervisedSettings,
    fit_light_model,
    load_supervised_parts,
    predict_supervised,
)
from enecg.training.recipe import RecipeError
from enecg.training.transfer import transfer_weights

RECIPE = REPO_ROOT / "recipes" / "pretrain_cinc_finetune_ptbxl.yaml"


def test_transfer_weights_replaces_only_the_head() -> None:
    torch.manual_seed(0)
    source = build_light_model(LightCNNConfig("SimpleNet", width_multiplier=0.25, n_outputs=26))
    target = build_light_model(LightCNNConfig("SimpleNet", width_multiplier=0.25, n_outputs=5))
    head_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("classifier.")}
    left = transfer_weights(source, target, "test source")
    assert left == ["classifier.1.bias", "classifier.1.weight"]
    for key, value in target.state_dict().items():
        if key.startswith("classifier."):
            assert torch.equal(value, head_before[key])  # the new head keeps its own initialisation
        else:
            assert torch.equal(value, source.state_dict()[key]), key
    other = build_light_model(LightCNNConfig("AttiaNet", width_multiplier=0.25, n_outputs=5))
    with pytest.raises(WeightsError, match="test source"):
        transfer_weights(other, target, "test source")


def test_recipe_parses_and_rejects_unknown_keys(tmp_path: Path) -> None:
    recipe = load_seed_recipe("transfer", str(RECIPE), [])
    assert recipe.source.classes == "cinc2021" and recipe.target.task == "superclass"
    assert recipe.model.architecture == "SimpleNet" and len(recipe.seeds) == 5
    quick = load_seed_recipe("transfer", str(RECIPE), [], quick=True)
    assert quick.seeds == [0] and quick.finetuning.epochs == 1
    with pytest.raises(RecipeError, match=r"finetuning\.warmup"):
        load_seed_recipe("transfer", str(RECIPE), ["--finetuning.warmup=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("seeds: [0, 1, 2, 3, 4]", "seeds: [0, 1]\nfolds: 3"))
    with pytest.raises(RecipeError, match=r"bad\.yaml.*'folds'"):
        load_seed_recipe("transfer", str(bad), [])
    with pytest.raises(RecipeError, match="seeds"):
        load_seed_recipe("transfer", str(RECIPE), ["--seeds=[1, 1]"])
    with pytest.raises(RecipeError, match="architecture"):
        load_seed_recipe("transfer", str(RECIPE), ["--model.architecture=VGG"])


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", "--help"])
    assert exit_info.value.code == 0
    assert "fine-tune" in capsys.readouterr().out
    assert main(["transfer", "--help-recipe"]) == 0
    assert "source.exclude_ptbxl_copies" in capsys.readouterr().out


@pytest.fixture(scope="module")
def ptbxl_prepared(ptbxl_dir: Path, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "ptbxl"


def test_supervised_training_keeps_the_best_validation_epoch(ptbxl_dir: Path, ptbxl_prepared: Path) -> None:
    recipe_model = load_seed_recipe("transfer", str(RECIPE), ["--model.width_multiplier=0.25"]).model
    section = SupervisedDataSection(path=str(ptbxl_prepared), prepare_from=str(ptbxl_dir), max_records=40)
    parts = load_supervised_parts(section, recipe_model.contract())
    assert parts.task.name == "superclass" and len(parts.train) > 0 and len(parts.test) > 0
    torch.manual_seed(0)
    model = build_light_model(recipe_model.light_config("SimpleNet", 5, False))
    settings = SupervisedSettings(epochs=3, batch_size=16, lr=1e-2)
    result = fit_light_model(model, parts, settings, seed=0)
    assert [h["step"] for h in result.history] == [3, 6, 9]  # one validation per epoch of ceil(n/16) steps
    best = min(result.history, key=lambda h: h["validation_loss"])
    assert result.best_step == best["step"] and result.best_validation_loss == best["validation_loss"]
    assert not model.training
    predictions, labels = predict_supervised(model, parts.test)
    assert predictions.shape == labels.shape == (len(parts.test), 5)
    assert ((predictions >= 0) & (predictions <= 1)).all()


def test_quick_run_writes_json_and_report(
    ptbxl_dir: Path, cinc_dir: Path, ptbxl_prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "transfer",
            str(RECIPE),
            "--quick",
            f"--source.path={tmp_path / 'cinc'}",
            f"--source.prepare_from={cinc_dir}",
            f"--target.path={ptbxl_prepared}",
            f"--target.prepare_from={ptbxl_dir}",
            f"--output.dir={out}",
            "--seeds=[3, 4]",
        ]
    )
    assert code == 0
    document = json.loads((out / "transfer.json").read_text())
    assert document["source"]["task"] == "dx" and len(document["source"]["labels"]) == 26
    assert sorted(document["target"]["labels"]) == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert [r["seed"] for r in document["runs"]] == [3, 4]
    for run in document["runs"]:
        a, b = run["pretrained_finetuned"]["auroc"], run["target_only"]["auroc"]
        assert run["auroc_difference"] == pytest.approx(a - b)
        assert run["pretraining"]["reinitialised_keys"] == ["classifier.1.bias", "classifier.1.weight"]
        # Same fine-tuning budget for both arms.
        assert run["pretrained_finetuned"]["training"]["steps"] == run["target_only"]["training"]["steps"]
        assert run["pretrained_finetuned"]["test"]["n_records"] == document["target"]["test"]
    assert document["summary"]["auroc_difference"]["n"] == 2
    html = (out / "report.html").read_text()
    assert "pretrained -&gt; fine-tuned" in html and "demonstrates the protocol" in html
