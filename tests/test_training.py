"""Training: the shipped light-ensemble recipe on the real PTB-XL sample (2 in-house experts, multilabel + binary +
regression) trains, evaluates and saves, and learns (beats constant predictors on the test part); bf16 on CPU;
k-fold runs re-initialise everything and never train on their test fold; CLI errors are one line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from enecg.cli import main as cli_main
from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl
from enecg.experts.expert import load_expert
from enecg.training.recipe import load_recipe, parse_recipe_dict
from enecg.training.trainer import BEST_DIR, METRICS_FILE, TRAINABLE_WEIGHTS_FILE, train

REPO = Path(__file__).resolve().parents[1]
LIGHT_RECIPE = REPO / "recipes" / "ptbxl_light_ensemble.yaml"
TASKS = ("superclass", "sex", "age")


# Accelerate's process-wide state is reset around every test: tests here use different precisions in one process.
pytestmark = pytest.mark.usefixtures("single_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def dataset_dir(ptbxl_training_dataset: Path) -> Path:
    return ptbxl_training_dataset


@pytest.fixture(scope="module")
def trained(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shipped recipe run through `enecg train`, with paths moved to temporary folders."""
    root = tmp_path_factory.mktemp("light")
    argv = [
        "train",
        str(LIGHT_RECIPE),
        f"--data.path={dataset_dir}",
        f"--experts.0.source={root / 'experts' / 'simplenet'}",
        f"--experts.1.source={root / 'experts' / 'attianet'}",
        f"--output.dir={root / 'run'}",
        "--evaluation.bootstrap_resamples=50",
    ]
    assert cli_main(argv) == 0
    recipe = load_recipe(LIGHT_RECIPE, argv[2:])
    return {"root": root, "run": root / "run", "recipe": recipe}


def test_recipe_trains_evaluates_and_learns(trained: dict[str, Any], dataset_dir: Path) -> None:
    from enecg.data.build import load_dataset_dir

    metrics = json.loads((trained["run"] / METRICS_FILE).read_text())
    assert metrics["parts"] == {"train": ["train"], "validation": "validation", "test": "test"}
    test = metrics["test"]
    assert test["n_records"] == 66 and metrics["validation"]["n_records"] == 81

    # Multilabel: better than any constant predictor (AUROC 0.5).
    assert test["headline"]["superclass/macro_auroc"] > 0.6
    superclass = test["tasks"]["superclass"]
    assert set(superclass["thresholds"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert superclass["operating_point"]["fitted_on"] == "validation"
    assert "macro_auroc" in superclass["ci"]  # patient-level bootstrap intervals
    # Regression: lower MAE than predicting the training mean age for everyone.
    dataset, _ = load_dataset_dir(dataset_dir)
    train_age = np.asarray(dataset["train"]["age"], dtype=float)
    test_age = np.asarray(dataset["test"]["age"], dtype=float)
    constant_mae = np.nanmean(np.abs(test_age - np.nanmean(train_age)))
    assert test["headline"]["age/mae"] < constant_mae
    assert test["tasks"]["age"]["metrics"]["mae"] == pytest.approx(test["headline"]["age/mae"])
    # Binary: evaluated with its own metrics (no learning bar: sex from ECG needs more than 353 records).
    assert 0.0 <= test["headline"]["sex/auroc"] <= 1.0

    summary = json.loads((trained["run"] / "summary.json").read_text())
    assert summary["split"] == "test"
    assert summary["metrics"]["superclass/macro_auroc"]["mean"] == test["headline"]["superclass/macro_auroc"]


def test_created_experts_and_saved_model(trained: dict[str, Any]) -> None:
    root, run = trained["root"], trained["run"]
    for name, task in (("simplenet", "superclass"), ("attianet", "age")):
        folder = root / "experts" / name
        info = json.loads((folder / "metrics.json").read_text())
        assert info["pretrain_task"] == task and info["pretrain_steps"] == 100
        load_expert(folder)  # a complete, loadable in-house expert

    # The shipped recipe is staged: each expert's task head was selected on its own in stage 1, the gate in stage 2;
    # stage 3 (joint fine-tuning) is kept only when it beat them on validation.
    heads = sorted((run / "stage1" / BEST_DIR).rglob(TRAINABLE_WEIGHTS_FILE))
    assert len(heads) == 6  # 2 experts x 3 tasks
    final = json.loads((run / METRICS_FILE).read_text())["strategy"]["final_phase"]
    assert final in ("gate", "finetune")
    selected = [run / "finetune" / BEST_DIR / TRAINABLE_WEIGHTS_FILE] if final == "finetune" else [
        *heads,
        run / "gate" / BEST_DIR / TRAINABLE_WEIGHTS_FILE,
    ]
    best: dict[str, torch.Tensor] = {}
    for path in selected:
        best |= {k: v for k, v in load_file(str(path)).items() if not k.startswith("buffer::")}
    assert any(".heads.superclass." in k for k in best) and any(k.startswith("gate.") for k in best)
    try:
        from enecg.ensemble.serialization import load_pretrained
    except ImportError:
        pytest.skip("enecg.ensemble.serialization not available: the model is not saved")
    model = load_pretrained(run / "model")
    # The saved model holds the selected (best) weights, and the head weights moved away from initialisation.
    saved = model.trainable_state_dict()
    for key, value in saved.items():
        assert torch.equal(value, best[key]), key
    from enecg.ensemble.model import Ensemble

    initial = Ensemble(model.config, {n: load_expert(root / "experts" / n) for n in model.expert_names})
    moved = [
        k
        for k, v in initial.trainable_state_dict().items()
        if ".heads." in k and not torch.equal(v, saved[k])
    ]
    assert len(moved) > 10
    assert set(model.decision_thresholds) == {"superclass", "sex"}


def test_report_and_card_with_test_results(trained: dict[str, Any]) -> None:
    """After training, `enecg train` evaluates the saved model (report + figures) and cards it with the results."""
    import re

    from huggingface_hub import ModelCard

    from enecg.hub.cards import load_card_context
    from enecg.hub.publish import update_card

    run = trained["run"]
    report = json.loads((run / "report" / "report.json").read_text())
    metrics = json.loads((run / METRICS_FILE).read_text())
    # The report re-evaluates the *saved* model: same test metrics as the trainer's own final evaluation.
    assert report["tasks"]["superclass"]["metrics"]["macro"]["auroc"] == pytest.approx(
        metrics["test"]["tasks"]["superclass"]["metrics"]["macro"]["auroc"], abs=1e-6
    )
    assert set(report["experts"]) == {"simplenet", "attianet"} and "uniform average" in report["baselines"]
    html = (run / "report" / "report.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (run / "report" / src).is_file()

    card = ModelCard.load(run / "model" / "README.md")
    index = card.data.to_dict()["model-index"][0]["results"]
    values = {r["dataset"]["config"]: r["metrics"][0]["value"] for r in index}
    # The card rounds to 4 decimals.
    assert values["superclass"] == pytest.approx(report["tasks"]["superclass"]["metrics"]["macro"]["auroc"], abs=1e-4)
    assert card.data.to_dict()["datasets"] == ["PTB-XL"]
    # Pushing the folder to another repo later keeps the results (re-rendered from card_context.json).
    assert load_card_context(run / "model") is not None
    update_card(run / "model", "someone/elsewhere")
    again = ModelCard.load(run / "model" / "README.md")
    assert 'from_pretrained("someone/elsewhere")' in again.text
    assert again.data.to_dict()["model-index"][0]["results"] == card.data.to_dict()["model-index"][0]["results"]


def test_per_task_losses_metrics_and_gate_weights_are_logged(trained: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = trained["run"] / "logs" / "ptbxl_light_ensemble"
    events = sorted(logs.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events in {logs}"
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    # Staged: stage 1 logs each expert's own losses and validation metrics; the gate phase the mixture's, and the
    # per-task gate weights (training batches and validation).
    expected = {
        "stage1/train/loss",
        "stage1/train/step_loss",
        "stage1/train/lr",
        *(f"stage1/train/{e}/{t}" for e in ("simplenet", "attianet") for t in TASKS),
        "stage1/val/simplenet/superclass/macro_auroc",
        "stage1/val/attianet/age/mae",
        "stage1/val/simplenet/superclass/selection",
        "oof_0/train/loss",
        "gate/train/loss",
        "gate/train/superclass",
        "gate/train/age",
        "gate/gate_weight/superclass/simplenet",
        "gate/val/gate_weight/age/attianet",
        "gate/val/superclass/macro_auroc",
        "gate/val/sex/auroc",
        "gate/val/age/mae",
        "gate/val/mean_headline",
        "gate/val/loss",
    }
    assert expected <= tags, sorted(expected - tags)
    weights = [e.value for e in accumulator.Scalars("gate/gate_weight/superclass/simplenet")]
    others = [e.value for e in accumulator.Scalars("gate/gate_weight/superclass/attianet")]
    assert weights and all(abs(a + b - 1) < 1e-4 for a, b in zip(weights, others))
    # Phases continue the run's step count: the gate's steps come after stage 1's and the folds'.
    assert min(e.step for e in accumulator.Scalars("gate/train/loss")) > max(
        e.step for e in accumulator.Scalars("stage1/train/loss")
    )


def _tiny_recipe(dataset_dir: Path, root: Path, **sections: Any):
    data = {
        "data": {"path": str(dataset_dir), "max_records": 40},
        "experts": [
            {
                "name": "a",
                "source": str(root / "experts" / "a"),
                "create": {"architecture": "SimpleNet", "width_multiplier": 0.25, "embedding_dim": 16},
            },
            {
                "name": "b",
                "source": str(root / "experts" / "b"),
                "create": {"architecture": "ParallelCNN", "width_multiplier": 0.25, "embedding_dim": 16},
            },
        ],
        "tasks": [{"name": t} for t in TASKS],
        "model": {"heads": {"hidden_sizes": [16]}, "gate": {"hidden_sizes": [8]}, "strategy": {"name": "joint"}},
        "optim": {"epochs": 1, "batch_size": 16},
        "evaluation": {"bootstrap_resamples": 0},
        "output": {"dir": str(root / "run"), "save_model": False},
        "tracking": {"log_with": []},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return parse_recipe_dict(data)


def test_bf16_mixed_precision_on_cpu(dataset_dir: Path, tmp_path: Path) -> None:
    recipe = _tiny_recipe(
        dataset_dir,
        tmp_path,
        optim={"mixed_precision": "bf16", "max_steps": 2},
        data={"feature_cache": "off", "max_records": 32},
    )
    result = train(recipe).run
    assert result.global_step == 2
    assert np.isfinite(result.history[-1]["train/loss"])
    assert np.isfinite(result.validation["loss"])


def test_kfold_reinitialises_everything_and_never_trains_on_the_test_fold(
    ptbxl_dir: Path, tmp_path: Path
) -> None:
    from enecg.data.build import load_dataset_dir

    dataset_dir = Path(tempfile.gettempdir()) / "enecg-tests" / "ptbxl500-100hz-kfold3"
    prepare_ptbxl(ptbxl_dir, dataset_dir, PtbxlOptions(rate=100, tasks=TASKS, kfold=3))
    loaded: list[str] = []

    def loader(source: Any, **kwargs: Any) -> torch.nn.Module:
        loaded.append(str(source))
        return load_expert(source, **kwargs)

    data = _tiny_recipe(
        dataset_dir, tmp_path, data={"kfold": 3, "folds": [0, 2], "max_records": 30}
    ).to_dict()
    data["experts"][0]["create"] |= {"pretrain_task": "superclass", "pretrain_steps": 2}
    recipe = parse_recipe_dict(data)
    result = train(recipe, expert_loader=loader)
    assert [r.name for r in result.runs] == ["fold_0", "fold_2"]
    # Experts reloaded for every run; created experts pretrained per fold, on that fold's training parts.
    assert len(loaded) == 4
    assert loaded[0].endswith("a/fold_0") and loaded[2].endswith("a/fold_2")
    weights = [
        load_file(str(tmp_path / "experts" / "a" / f / "model.safetensors")) for f in ("fold_0", "fold_2")
    ]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    dataset, _ = load_dataset_dir(dataset_dir)
    seeds = set()
    for run in result.runs:
        metrics = json.loads((Path(run.run_dir) / METRICS_FILE).read_text())
        parts = metrics["parts"]
        assert parts["test"] == f"fold_{run.fold}" and parts["test"] not in parts["train"]
        train_patients = {p for part in parts["train"] for p in dataset[part]["patient_id"]}
        assert not train_patients & set(dataset[parts["test"]]["patient_id"])
        seeds.add(run.seed)
        init = load_file(str(next((Path(run.run_dir) / "checkpoints").iterdir()) / TRAINABLE_WEIGHTS_FILE))
        assert init  # each run has its own checkpoints
    assert len(seeds) == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["runs"] == ["fold_0", "fold_2"] and summary["metrics"]["mean_headline"]["n"] == 2


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", str(LIGHT_RECIPE), "--optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("enecg: error:") and "optim.lrr" in err and "\n" not in err
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err
