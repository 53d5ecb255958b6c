"""Training strategies (``model.strategy``): ``staged`` stage 1 trains each expert's heads exactly as training that
expert alone would; its out-of-fold predictions never come from heads that saw the row they predict; the gate is
fitted on those predictions; unknown strategies fail before any work; new strategies register by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from enecg.data.build import load_dataset_dir
from enecg.training.loop import TrainerCallback, collect_expert_logits
from enecg.training.recipe import LightExpertSpec, parse_recipe_dict
from enecg.training.strategies import (
    StrategyResult,
    TrainingStrategy,
    get_strategy,
    register_strategy,
    strategy_names,
)
from enecg.training.strategies.staged import OOF_DIR, OOF_FOLDS_FILE, OOF_LOGITS_FILE
from enecg.training.trainer import train

TASKS = ("superclass", "sex", "age")
pytestmark = pytest.mark.usefixtures("single_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def experts(ptbxl_training_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from enecg.training.light_experts import create_light_expert

    _, meta = load_dataset_dir(ptbxl_training_dataset)
    root = tmp_path_factory.mktemp("strategy-experts")
    out = {}
    for index, architecture in enumerate(("SimpleNet", "AttiaNet")):
        spec = LightExpertSpec(architecture=architecture, width_multiplier=0.25, embedding_dim=16)
        out[architecture.lower()] = create_light_expert(
            spec, root / architecture, name=architecture.lower(), train_part=None, tasks=meta.tasks, seed=index
        )
    return out


def _recipe(dataset: Path, experts: dict[str, Path], names: list[str], out: Path, **strategy: Any) -> Any:
    return parse_recipe_dict(
        {
            "data": {"path": str(dataset), "max_records": 90, "cache_dir": str(out.parent / "cache")},
            "experts": [{"name": n, "source": str(experts[n])} for n in names],
            "tasks": [{"name": t} for t in TASKS],
            "model": {
                # Dropout everywhere in the heads: each expert's randomness must be its own.
                "heads": {"hidden_sizes": [16], "dropout": 0.3},
                "lora": {"r": 2, "dropout": 0.1},
                "gate": {"input": "embeddings", "hidden_sizes": [8], "per_task": True},
                "strategy": {"name": "staged", "oof_folds": 3, **strategy},
            },
            "optim": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "early_stopping_patience": 2, "seed": 3},
            "evaluation": {"bootstrap_resamples": 0, "report": False},
            "output": {"dir": str(out), "checkpoint_every_steps": None, "keep_checkpoints": 1},
            "tracking": {"log_with": []},
        }
    )


def _branch(path: Path, expert: str) -> dict[str, torch.Tensor]:
    state = load_file(str(path))
    return {k: v for k, v in state.items() if k.startswith(f"branches.{expert}.")}


def test_stage1_heads_equal_training_the_expert_alone(
    ptbxl_training_dataset: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    both = train(_recipe(ptbxl_training_dataset, experts, ["simplenet", "attianet"], tmp_path / "both")).run
    alone = train(_recipe(ptbxl_training_dataset, experts, ["simplenet"], tmp_path / "alone")).run
    a = _branch(Path(both.model_dir) / "model.safetensors", "simplenet")
    b = _branch(Path(alone.model_dir) / "model.safetensors", "simplenet")
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # ... and each head kept its own best epoch: the heads were selected per expert and task.
    groups = both.strategy["phases"]["stage1"]["groups"]
    assert set(groups) == {f"{e}/{t}" for e in ("simplenet", "attianet") for t in TASKS}
    assert groups["simplenet/superclass"] == alone.strategy["phases"]["stage1"]["groups"]["simplenet/superclass"]
    # The heads did train (selected after at least one epoch: not two untouched initialisations).
    assert all(groups[f"simplenet/{t}"]["best_epoch"] >= 1 for t in TASKS)


class OutOfFoldAudit(TrainerCallback):
    """Records what each out-of-fold phase trained on and what its heads predict for the rows it held out."""

    def __init__(self) -> None:
        self.train_rows: dict[str, np.ndarray] = {}
        self.held_out_logits: dict[str, dict[str, torch.Tensor]] = {}
        self.gate_logits: dict[str, torch.Tensor] | None = None

    def on_phase_end(self, loop: Any) -> None:
        name = loop.phase.name
        if name.startswith("oof_"):
            rows = loop.phase.train_rows
            self.train_rows[name] = rows
            held = np.setdiff1d(np.arange(loop.ctx.n_train), rows)
            logits = collect_expert_logits(loop.ctx, "train", held)
            self.held_out_logits[name] = {"rows": torch.as_tensor(held), **logits}

    def on_phase_begin(self, loop: Any) -> None:
        if loop.phase.name == "gate":
            self.gate_logits = loop.phase.expert_logits


def test_out_of_fold_predictions_come_from_heads_that_never_saw_the_row(
    ptbxl_training_dataset: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    audit = OutOfFoldAudit()
    run = train(
        _recipe(ptbxl_training_dataset, experts, ["simplenet", "attianet"], tmp_path / "run"), callbacks=[audit]
    ).run
    folder = Path(run.run_dir) / OOF_DIR
    saved = json.loads((folder / OOF_FOLDS_FILE).read_text())
    folds = np.asarray(saved["fold"])
    n = len(folds)
    assert sorted(audit.train_rows) == ["oof_0", "oof_1", "oof_2"] and sorted(set(folds.tolist())) == [0, 1, 2]

    dataset, _ = load_dataset_dir(ptbxl_training_dataset)
    patients = np.asarray(dataset["train"].select(range(n))["patient_id"])
    logits = load_file(str(folder / OOF_LOGITS_FILE))
    covered = np.zeros(n, dtype=bool)
    for k in range(3):
        trained_on = audit.train_rows[f"oof_{k}"]
        held = np.flatnonzero(folds == k)
        # Never trained on the rows it predicts, nor on another record of their patients.
        assert not set(trained_on) & set(held)
        assert not set(patients[trained_on]) & set(patients[held])
        assert set(trained_on) | set(held) == set(range(n))
        covered[held] = True
        recorded = audit.held_out_logits[f"oof_{k}"]
        assert torch.equal(recorded["rows"], torch.as_tensor(held))
        for task in TASKS:
            # The saved out-of-fold logits of these rows are exactly what fold k's heads predicted.
            assert torch.equal(logits[task][torch.as_tensor(held)], recorded[task])
    assert covered.all()
    # The gate was fitted on those out-of-fold logits (and only the gate trained then).
    assert audit.gate_logits is not None
    assert all(torch.equal(audit.gate_logits[t], logits[t]) for t in TASKS)
    assert run.strategy["final_phase"] == "gate"
    assert not any(torch.isnan(v).any() for v in logits.values())


def test_finetune_is_kept_only_when_validation_improves(
    ptbxl_training_dataset: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    run = train(
        _recipe(
            ptbxl_training_dataset, experts, ["simplenet", "attianet"], tmp_path / "ft", finetune_epochs=2
        )
    ).run
    phases = run.strategy["phases"]
    finetune = phases["finetune"]["groups"]["ensemble"]
    gate = phases["gate"]["groups"]["ensemble"]
    # Epoch 0 of the fine-tuning phase is the stage-2 model; a later epoch is kept only if it scores higher.
    if finetune["best_epoch"] == 0:
        assert run.strategy["final_phase"] == "gate"
    else:
        assert run.strategy["final_phase"] == "finetune" and finetune["best_metric"] > gate["best_metric"]


def test_unknown_strategy_fails_before_any_work(ptbxl_training_dataset: Path, tmp_path: Path) -> None:
    recipe = _recipe(ptbxl_training_dataset, {"x": tmp_path}, ["x"], tmp_path / "run")
    recipe.model.strategy.name = "nonsense"
    with pytest.raises(ValueError, match=r"model\.strategy\.name 'nonsense' is not a training strategy"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_a_new_strategy_is_one_registered_class(
    ptbxl_training_dataset: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    from enecg.training.loop import Phase, run_phase

    @register_strategy
    class HeadsOnly(TrainingStrategy):
        """A toy: train each expert's heads on their own loss and stop (a uniform mixture of them)."""

        name = "test-heads-only"

        def fit(self, ctx: Any) -> StrategyResult:
            phase = Phase(
                name="heads",
                trainable=lambda n: n.startswith("branches."),
                loss=lambda e, o, y: (sum(e.expert_losses(o, y)[0].values()), {}),
                use_gate=False,
            )
            return StrategyResult(phases={"heads": run_phase(ctx, phase)}, final="heads")

    assert "test-heads-only" in strategy_names()
    recipe = _recipe(ptbxl_training_dataset, experts, ["simplenet"], tmp_path / "toy")
    recipe.model.strategy.name = "test-heads-only"
    run = train(recipe).run
    assert run.strategy["name"] == "test-heads-only" and (Path(run.run_dir) / "heads" / "best").is_dir()
    assert isinstance(get_strategy(recipe.model.strategy), HeadsOnly)
    with pytest.raises(ValueError, match="already registered"):

        @register_strategy
        class Clash(TrainingStrategy):
            name = "staged"

            def fit(self, ctx: Any) -> StrategyResult:
                raise NotImplementedError
