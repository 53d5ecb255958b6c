"""The training engine (:mod:`enecg.engine`): a toy model trains, callbacks fire in order, early stopping restores
the best state, epoch evaluation and a selection policy plug in, and a run resumed from a checkpoint ends exactly
where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from enecg.engine import Selection, Trainer, TrainerArguments, TrainerCallback
from enecg.engine.checkpoint import complete_checkpoints
from enecg.training.loop import TrainerCallback as LoopTrainerCallback


def _data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return TensorDataset(x, y)


class EpochSampler(Sampler[int]):
    """A new permutation per epoch, from (seed, epoch) only: an epoch's order can be replayed on resume."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter(
            torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))


def _trainer(args: TrainerArguments, batch_size: int = 8, **options: Any) -> tuple[nn.Module, Trainer]:
    """A fresh toy model and its AdamW trainer over the toy data."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, Trainer(model, optimizer, _loader(batch_size), _loss, args, **options)


def _loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch
    loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
    return loss, {"loss": loss.detach()}


def _val_loss(model: nn.Module) -> dict[str, float]:
    x, y = _data(16).tensors
    model.eval()
    with torch.no_grad():
        return {"val_loss": float(nn.functional.mse_loss(model(x).squeeze(-1), y))}


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_begin(self, loop: Any) -> None:
        self.events.append("train_begin")

    def on_train_end(self, loop: Any) -> None:
        self.events.append("train_end")

    def on_epoch_begin(self, loop: Any) -> None:
        self.events.append(f"epoch_begin:{loop.state.epoch}")

    def on_epoch_end(self, loop: Any) -> None:
        self.events.append(f"epoch_end:{loop.state.epoch}")

    def on_micro_batch_end(self, loop: Any) -> None:
        self.events.append(f"micro:{loop.state.micro_step}")

    def on_step_end(self, loop: Any) -> None:
        self.events.append(f"step:{loop.state.global_step}")

    def on_log(self, loop: Any, logs: dict[str, Any]) -> None:
        self.events.append(f"log:{loop.state.global_step}")

    def on_evaluate(self, loop: Any, logs: dict[str, Any]) -> None:
        self.events.append(f"evaluate:{logs['step']}")

    def on_checkpoint(self, loop: Any, path: Path) -> None:
        self.events.append(f"checkpoint:{loop.state.global_step}")


def _loader(batch_size: int = 8) -> DataLoader:
    data = _data()
    # Its own generator: starting an epoch draws no global random number (the dropout's), so a resumed run's
    # RNG stream matches an uninterrupted one's.
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=EpochSampler(len(data)),
        generator=torch.Generator().manual_seed(1),
    )


def test_the_loop_callback_base_is_the_engines() -> None:
    assert LoopTrainerCallback is TrainerCallback


def test_a_toy_model_trains_without_an_accelerator() -> None:
    model, trainer = _trainer(TrainerArguments(epochs=30, max_grad_norm=1.0, log_every=20))
    before = _val_loss(_model())["val_loss"]
    state = trainer.train()
    assert trainer.steps_per_epoch == 4 and state.global_step == 120 and state.epoch == 30
    assert [entry["step"] for entry in state.log_history] == [20, 40, 60, 80, 100, 120]
    assert _val_loss(model)["val_loss"] < before / 4


def test_gradient_accumulation_steps_once_per_window() -> None:
    model = _model()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=1e-2),
        _loader(),
        _loss,
        TrainerArguments(epochs=2, gradient_accumulation_steps=2),
    )
    state = trainer.train()
    assert (state.micro_step, state.global_step) == (8, 4)


def test_callbacks_fire_in_order(tmp_path: Path, fresh_accelerate_state: None) -> None:
    from accelerate import Accelerator

    recorder = Recorder()
    _, trainer = _trainer(
        TrainerArguments(
            max_steps=3, log_every=2, eval_every=2, checkpoint_every=2, output_dir=str(tmp_path)
        ),
        batch_size=16,
        accelerator=Accelerator(cpu=True),
        evaluate=_val_loss,
        callbacks=[recorder],
    )
    trainer.train()
    assert recorder.events == [
        "train_begin",
        "epoch_begin:0",
        "micro:1",
        "step:1",
        "micro:2",
        "log:2",
        "step:2",
        "evaluate:2",
        "checkpoint:2",
        "epoch_end:1",
        "epoch_begin:1",
        "micro:3",
        "log:3",
        "step:3",
        "evaluate:3",
        "train_end",
    ]


def test_early_stopping_restores_the_best_state() -> None:
    scripted = iter([3.0, 1.0, 2.0, 1.5, 0.5])  # best at the 2nd evaluation, then 2 worse ones: stop
    weights: dict[int, dict[str, torch.Tensor]] = {}

    class Keep(TrainerCallback):
        def on_evaluate(self, loop: Any, logs: dict[str, Any]) -> None:
            weights[logs["step"]] = {k: v.clone() for k, v in loop.model.state_dict().items()}

    model, trainer = _trainer(
        TrainerArguments(max_steps=100, eval_every=2, metric_for_best="val_loss", early_stopping_patience=2),
        evaluate=lambda _: {"val_loss": next(scripted)},
        callbacks=[Keep()],
    )
    state = trainer.train()
    assert state.stopped_early and state.global_step == 8
    assert (state.best_step, state.best_metric) == (4, 1.0)
    assert [e["val_loss"] for e in state.eval_history] == [3.0, 1.0, 2.0, 1.5]
    final = model.state_dict()
    assert all(torch.equal(final[k], weights[4][k]) for k in final)
    assert not all(torch.equal(final[k], weights[8][k]) for k in final)


def test_epoch_evaluation_with_a_starting_candidate_and_a_selection_policy(
    tmp_path: Path, fresh_accelerate_state: None
) -> None:
    from accelerate import Accelerator

    class Lowest(Selection):
        """Keeps the step of the lowest val_loss and stops after the 3rd evaluation (the ensemble's phases plug in
        their per-group selection the same way)."""

        def __init__(self) -> None:
            self.seen: list[int] = []
            self.finished = False

        def update(self, trainer: Any, metrics: Any, logs: dict[str, Any]) -> None:
            self.seen.append(trainer.state.global_step)
            logs["policy"] = len(self.seen)

        def finish(self, trainer: Any) -> None:
            self.finished = True

    recorder, policy = Recorder(), Lowest()
    _, trainer = _trainer(
        TrainerArguments(
            max_steps=10,
            eval_strategy="epoch",
            eval_on_start=True,
            checkpoint_every=3,
            output_dir=str(tmp_path),
            keep_checkpoints=10,
        ),
        accelerator=Accelerator(cpu=True),
        evaluate=_val_loss,
        callbacks=[recorder],
        selection=policy,
    )
    state = trainer.train()
    # 4 steps an epoch: evaluations at the start and after each epoch, also the one max_steps cut short.
    assert policy.seen == [0, 4, 8, 10] and policy.finished
    assert state.epoch == 3 and [e["policy"] for e in state.eval_history] == [1, 2, 3, 4]
    # Step checkpoints, except an epoch's last step (checkpointed after the epoch's evaluation) and the run's.
    assert [e for e in recorder.events if e.startswith(("checkpoint", "evaluate", "epoch_end"))] == [
        "evaluate:0",
        "checkpoint:3",
        "epoch_end:1",
        "evaluate:4",
        "checkpoint:4",
        "checkpoint:6",
        "epoch_end:2",
        "evaluate:8",
        "checkpoint:8",
        "checkpoint:9",
        "epoch_end:3",
        "evaluate:10",
        "checkpoint:10",
    ]
    assert trainer.data_wait.steps == state.micro_step == 10


class Stop(Exception):
    pass


def _checkpointed_run(
    folder: Path, *, kill_at: int | None = None, resume: Path | None = None
) -> tuple[nn.Module, Trainer]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)

    class Killer(TrainerCallback):
        def on_micro_batch_end(self, loop: Any) -> None:
            if kill_at is not None and loop.state.micro_step == kill_at:
                raise Stop

    model, trainer = _trainer(
        TrainerArguments(
            epochs=3,
            eval_every=3,
            metric_for_best="val_loss",
            checkpoint_every=5,
            output_dir=str(folder),
            keep_checkpoints=1,
        ),
        accelerator=Accelerator(cpu=True),
        scheduler=lambda optimizer, total: torch.optim.lr_scheduler.LinearLR(
            optimizer, 1.0, 0.1, total_iters=total
        ),
        evaluate=_val_loss,
        callbacks=[Killer()],
    )
    try:
        trainer.train(resume_from=resume)
    except Stop:
        pass
    return model, trainer


def test_resume_from_a_checkpoint_ends_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, full = _checkpointed_run(tmp_path / "full")
    _, killed = _checkpointed_run(tmp_path / "killed", kill_at=8)  # mid-epoch 1, after the step-5 checkpoint
    assert (killed.state.micro_step, killed.state.global_step) == (8, 7)
    checkpoints = complete_checkpoints(tmp_path / "killed")
    assert [p.name for p in checkpoints] == ["checkpoint_00001-step_0000005"]
    resumed, trainer = _checkpointed_run(tmp_path / "killed", resume=checkpoints[0])
    assert trainer.state.global_step == full.state.global_step == 12
    assert trainer.state.best_step == full.state.best_step
    assert trainer.state.eval_history == full.state.eval_history
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="early_stopping_patience needs metric_for_best"):
        TrainerArguments(early_stopping_patience=2)
    with pytest.raises(ValueError, match="checkpoint_every needs output_dir"):
        TrainerArguments(checkpoint_every=2)
    with pytest.raises(ValueError, match="eval_strategy must be 'steps' or 'epoch'"):
        TrainerArguments(eval_strategy="never")
    model = _model()
    with pytest.raises(ValueError, match="needs max_steps"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), iter([]), _loss, TrainerArguments())
