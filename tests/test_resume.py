"""Resume: a run SIGKILLed mid-epoch (after a checkpoint, with a gradient-accumulation step half done) and resumed
with ``output.resume: auto`` ends with exactly the weights and metrics of an uninterrupted run of the same seed —
for every training strategy (``staged`` is killed inside one of its out-of-fold phases: the finished phases are
replayed from their checkpoints, the killed one resumes mid-epoch).

Tolerance: exact equality on CPU (``torch.equal`` on every trainable tensor, ``==`` on logged floats). Every run
is a separate process with the same thread count, so kernels reduce in the same order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from enecg.training.recipe import LightExpertSpec
from enecg.training.trainer import BEST_DIR, TRAINABLE_WEIGHTS_FILE, TRAINER_STATE_FILE, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TASKS = ("superclass", "sex", "age")
# 6 optimizer steps per epoch (12 batches, 2 per step): step 8 is in the middle of the second epoch.
KILL_AFTER_STEP = 8

DRIVER = textwrap.dedent(
    """
    import dataclasses, json, os, signal, sys
    from enecg.training import trainer
    from enecg.training.loop import TrainerCallback
    from enecg.training.recipe import load_recipe

    kill_after = int(os.environ.get("KILL_AFTER_STEP", "0"))
    kill_phase = os.environ.get("KILL_PHASE", "")

    class Killer(TrainerCallback):
        armed = False

        def on_checkpoint(self, loop, path):
            if loop.phase.name == kill_phase and loop.state.global_step == kill_after and loop.state.batches_done:
                self.armed = True

        def on_micro_batch_end(self, loop):
            if self.armed:  # one more micro-batch trained after the checkpoint: then die without any cleanup
                os.kill(os.getpid(), signal.SIGKILL)

    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    result = trainer.train(recipe, callbacks=[Killer()] if kill_after else [])
    with open(os.path.join(recipe.output.dir, "result.json"), "w") as fh:
        json.dump(dataclasses.asdict(result), fh)
    """
)
# (strategy, phase folder killed in)
STRATEGIES = (("joint", ""), ("staged", "oof_1"))


@pytest.fixture(scope="module")
def setup(ptbxl_training_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from enecg.data.build import load_dataset_dir
    from enecg.training.light_experts import create_light_expert

    dataset_dir = ptbxl_training_dataset
    dataset, meta = load_dataset_dir(dataset_dir)
    root = tmp_path_factory.mktemp("resume")
    experts = {}
    for index, architecture in enumerate(("SimpleNet", "ParallelCNN")):
        spec = LightExpertSpec(architecture=architecture, width_multiplier=0.25, embedding_dim=16)
        experts[architecture.lower()] = create_light_expert(
            spec,
            root / architecture,
            name=architecture.lower(),
            train_part=dataset["train"],
            tasks=meta.tasks,
            seed=index,
        )
    recipe = {
        "data": {"path": str(dataset_dir), "cache_dir": str(root / "cache")},
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()],
        "tasks": [{"name": t} for t in TASKS],
        # Dropout in heads and LoRA, a noisy top-1 gate: randomness that a resume must replay exactly.
        "model": {
            "heads": {"hidden_sizes": [32], "dropout": 0.2},
            "lora": {"r": 4, "dropout": 0.1},
            "gate": {"hidden_sizes": [16], "top_k": 1, "noisy_top_k": True, "load_balance_weight": 0.01},
            "task_weighting": "uncertainty",
        },
        "optim": {
            "epochs": 3,
            "batch_size": 30,
            "gradient_accumulation_steps": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "early_stopping_patience": None,
            "seed": 5,
        },
        "evaluation": {"bootstrap_resamples": 20, "report": False},
        "output": {
            "dir": str(root / "unused"),
            "checkpoint_every_steps": 4,
            "keep_checkpoints": 3,
            "save_model": True,
        },
        "tracking": {"log_with": []},
    }
    import yaml

    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "driver.py").write_text(DRIVER)
    return {"root": root}


def _run(
    root: Path, out: Path, strategy: str, kill_after: int = 0, kill_phase: str = ""
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KILL_AFTER_STEP": str(kill_after),
        "KILL_PHASE": kill_phase,
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [
            sys.executable,
            str(root / "driver.py"),
            str(root / "recipe.yaml"),
            f"--output.dir={out}",
            f"--model.strategy.name={strategy}",
            "--model.strategy.oof_folds=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def _trainable(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize(("strategy", "phase"), STRATEGIES)
def test_killed_and_resumed_run_equals_uninterrupted_run(setup: dict[str, Path], strategy: str, phase: str) -> None:
    root = setup["root"]
    straight_dir, killed_dir = root / f"straight-{strategy}", root / f"killed-{strategy}"
    straight = _run(root, straight_dir, strategy)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _run(root, killed_dir, strategy, kill_after=KILL_AFTER_STEP, kill_phase=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (killed_dir / "result.json").exists()
    phase_dir = killed_dir / phase if phase else killed_dir
    checkpoint = latest_checkpoint(phase_dir)
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    # Mid-epoch, on an optimizer-step boundary (the killed run then trained one more micro-batch).
    assert state["global_step"] == KILL_AFTER_STEP and state["epoch"] >= 1 and state["batches_done"] == 4

    # Debris a crash during a later save could leave: a staging folder and a folder without a trainer state.
    (phase_dir / "checkpoints" / ".tmp-checkpoint_00099-step_0000099").mkdir()
    (phase_dir / "checkpoints" / "checkpoint_00098-step_0000098").mkdir()

    resumed = _run(root, killed_dir, strategy)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((killed_dir / "result.json").read_text())["runs"][0]
    reference = json.loads((straight_dir / "result.json").read_text())["runs"][0]
    assert result["resumed_from"] is not None and reference["resumed_from"] is None
    assert not (phase_dir / "checkpoints" / ".tmp-checkpoint_00099-step_0000099").exists()

    # Same selected and saved weights, bit for bit (best weights of the killed phase, per selection group).
    reference_phase = straight_dir / phase if phase else straight_dir
    best = sorted(p.relative_to(reference_phase) for p in (reference_phase / BEST_DIR).rglob(TRAINABLE_WEIGHTS_FILE))
    assert best
    pairs = [(phase_dir / r, reference_phase / r) for r in best]
    pairs.append((killed_dir / "model" / "model.safetensors", straight_dir / "model" / "model.safetensors"))
    for mine, theirs in pairs:
        a, b = _trainable(mine), _trainable(theirs)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    final_a = _trainable(latest_checkpoint(phase_dir) / TRAINABLE_WEIGHTS_FILE)
    final_b = _trainable(latest_checkpoint(reference_phase) / TRAINABLE_WEIGHTS_FILE)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # Weights did change during training (the comparison is not between two untouched models).
    first = _trainable(sorted((reference_phase / "checkpoints").iterdir())[0] / TRAINABLE_WEIGHTS_FILE)
    assert any(not torch.equal(first[k], final_b[k]) for k in first)

    # Same per-epoch logs (training losses accumulated across the kill, validation metrics, gate weights) and
    # the same final evaluation.
    assert result["history"] == reference["history"]
    assert result["validation"] == reference["validation"] and result["test"] == reference["test"]
    assert (
        result["best_epoch"] == reference["best_epoch"] and result["global_step"] == reference["global_step"]
    )
    assert result["evaluation"] == reference["evaluation"]
    assert result["strategy"]["final_phase"] == reference["strategy"]["final_phase"]
