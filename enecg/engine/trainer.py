"""The generic step loop of pretraining, light-expert training and diffusion training: :class:`Trainer`.

The shape of ``transformers.Trainer``, cut to what those loops share. A :class:`Trainer` takes a model, an
optimizer, the training batches (a ``DataLoader``, or any iterable: one pass is an epoch) and a ``compute_loss``
function, and runs optimizer steps:

1. With an ``accelerator``, ``accelerator.prepare`` wraps model, optimizer and data; gradient accumulation
   (``accelerator.accumulate``), mixed precision and clipping go through it. Without one the loop is plain torch
   on the model's device (a light expert created by the main process inside a multi-process run trains alone).
2. Each optimizer step: clip (``max_grad_norm``), ``optimizer.step()``, the lr scheduler (stepped here once per
   optimizer step, never prepared: a prepared scheduler steps once per process), ``zero_grad``.
3. Every ``log_every`` steps (and at the last): the mean of each value ``compute_loss`` logged over the window's
   micro-batches and over processes goes to ``state.log_history``, the trackers, the progress bar and
   ``on_log``.
4. Every ``eval_every`` steps (and at the last), with an ``evaluate`` function: its metrics, best-state selection
   on ``metric_for_best`` (a copy of the weights in memory, loaded at the end) and early stopping after
   ``early_stopping_patience`` evaluations without improvement.
5. Every ``checkpoint_every`` steps (with an accelerator and ``output_dir``): a checkpoint
   (:mod:`enecg.engine.checkpoint`); ``train(resume_from=...)`` continues from one exactly: model, optimizer,
   scheduler, RNG states, the position in the epoch (the batches done are skipped) and the best state. Exact
   when an epoch's order can be replayed (a sampler with ``set_epoch``) and the loader draws no global random
   number when it starts an epoch (give the ``DataLoader`` its own ``generator``).

Callbacks (:class:`~enecg.engine.callbacks.TrainerCallback`) see all of it. RNG use is the caller's: the loop
draws nothing itself, so a loop moved onto the engine consumes random numbers in its old order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from enecg.engine.callbacks import TrainerCallback
from enecg.engine.checkpoint import (
    TRAINER_STATE_FILE,
    checkpoint_name,
    read_trainer_state,
    write_checkpoint,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

BEST_STATE_FILE = "best_state.safetensors"
LossFn = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, Tensor]]]
EvaluateFn = Callable[[nn.Module], Mapping[str, float]]
SchedulerFactory = Callable[[Any, int], Any]


@dataclass
class TrainerArguments:
    """The loop's budget, logging, selection and checkpointing (callers map their own config onto it)."""

    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps; null: epochs x optimizer steps per epoch."}
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the data when max_steps is null."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step (set on the accelerator when given)."}
    )
    max_grad_norm: float | None = field(default=None, metadata={"help": "Gradient clipping norm; null: off."})
    log_every: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps per logging window (and the last step); null: no logs."},
    )
    eval_every: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps between evaluations (the last step always evaluates)."},
    )
    metric_for_best: str | None = field(
        default=None,
        metadata={"help": "Key of evaluate's metrics that selects the best state; null: the last."},
    )
    greater_is_better: bool = field(
        default=False, metadata={"help": "Whether a higher metric_for_best wins."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Evaluations without improvement before stopping; null: never stop."}
    )
    checkpoint_every: int | None = field(
        default=None, metadata={"help": "Optimizer steps between checkpoints (needs an accelerator)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder of the checkpoints."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints kept."})
    progress_desc: str | None = field(
        default=None, metadata={"help": "Label of the progress bar (main process); null: no bar."}
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "log_every", "eval_every", "checkpoint_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"trainer: {name} must be >= 1 or null, got {value}")
        if self.early_stopping_patience is not None and self.metric_for_best is None:
            raise ValueError("trainer: early_stopping_patience needs metric_for_best")
        if self.checkpoint_every is not None and not self.output_dir:
            raise ValueError("trainer: checkpoint_every needs output_dir")


@dataclass
class TrainerState:
    """Position and selection bookkeeping of a run, saved with each checkpoint as JSON."""

    epoch: int = 0  # current epoch (epochs fully done when batches_done == 0)
    batches_done: int = 0  # micro-batches of `epoch` already trained
    global_step: int = 0  # optimizer steps
    micro_step: int = 0  # micro-batches overall
    save_index: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0
    stopped_early: bool = False
    log_history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        """Read a checkpoint's ``trainer_state.json``; errors name the file."""
        data = read_trainer_state(path, cls)
        return cls(**data)


class Trainer:
    """Runs optimizer steps of ``model`` on ``train_data`` (see the module docstring).

    Args:
        model: the module trained (``compute_loss`` receives it prepared).
        optimizer: over the parameters to train.
        train_data: a ``DataLoader`` or any re-iterable of batches; one pass is an epoch (an endless iterable is
            one endless epoch: then give ``args.max_steps``).
        compute_loss: ``(model, batch) -> (loss, logs)``; ``logs`` (tensors) are averaged into the log windows.
        args: :class:`TrainerArguments`.
        accelerator: prepares model, optimizer and data and runs backward, clipping, reductions; None: plain torch.
        scheduler: ``(optimizer, total optimizer steps) -> lr scheduler``, stepped once per optimizer step.
        evaluate: ``model -> metrics`` (the loop switches the model back to train mode afterwards).
        callbacks: :class:`TrainerCallback` hooks, called in order.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_data: Iterable[Any],
        compute_loss: LossFn,
        args: TrainerArguments,
        *,
        accelerator: Accelerator | None = None,
        scheduler: SchedulerFactory | None = None,
        evaluate: EvaluateFn | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.args, self.accelerator = args, accelerator
        if accelerator is not None:
            if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
                accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
            model, optimizer, train_data = accelerator.prepare(model, optimizer, train_data)
        self.model, self.optimizer, self.train_data = model, optimizer, train_data
        self.unwrapped: nn.Module = accelerator.unwrap_model(model) if accelerator is not None else model
        self._epoch_batches: int | None = len(train_data) if hasattr(train_data, "__len__") else None  # type: ignore[arg-type]
        self.steps_per_epoch: int | None = (
            math.ceil(self._epoch_batches / args.gradient_accumulation_steps)
            if self._epoch_batches is not None
            else None
        )
        if args.max_steps is None and self.steps_per_epoch is None:
            raise ValueError("trainer: training data without a length needs max_steps")
        self.max_steps: int = args.max_steps or args.epochs * (self.steps_per_epoch or 0)
        self.scheduler = scheduler(self.optimizer, self.max_steps) if scheduler is not None else None
        if accelerator is not None and self.scheduler is not None:
            accelerator.register_for_checkpointing(self.scheduler)  # save_state keeps only prepared objects
        self.compute_loss, self.evaluate_fn = compute_loss, evaluate
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.last_loss: Tensor | None = None  # the last micro-batch's loss (unscaled, detached)
        self._clip_params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self._best_state: dict[str, Tensor] | None = None
        self._window: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ running

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def train(self, resume_from: str | Path | None = None) -> TrainerState:
        """Train to ``max_steps`` (or early stopping), load the best state if one was selected; returns the state."""
        if resume_from is not None:
            self._load_checkpoint(Path(resume_from))
        state = self.state
        local_main = self.accelerator is None or self.accelerator.is_local_main_process
        bar = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc=self.args.progress_desc,
            unit="step",
            disable=self.args.progress_desc is None or not local_main,
        )
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)  # gradients left by an earlier use of the model
        self._call("on_train_begin")
        try:
            while True:
                if self._epoch_finished():  # (also a checkpoint written after an epoch's last batch)
                    state.epoch += 1
                    state.batches_done = 0
                    self._call("on_epoch_end")
                if state.stopped_early or state.global_step >= self.max_steps:
                    break
                if state.batches_done == 0:
                    self._call("on_epoch_begin")
                if self._train_epoch(bar) and not self._epoch_finished():  # an iterable without a length
                    self._epoch_batches = state.batches_done
        finally:
            bar.close()
        if self._best_state is not None:
            self.unwrapped.load_state_dict(self._best_state)
        self._call("on_train_end")
        return state

    def _epoch_finished(self) -> bool:
        return self._epoch_batches is not None and self.state.batches_done >= self._epoch_batches

    def _train_epoch(self, bar: tqdm) -> bool:
        """One pass over the data; False when the run ends within it (step budget or early stopping)."""
        state = self.state
        data = self._epoch_data()
        empty = True
        for batch in data:
            empty = False
            with self._accumulate():
                loss, logs = self.compute_loss(self.model, batch)
                self._backward(loss)
                sync = self._sync_gradients()
                if sync:
                    self._clip()
                    self.optimizer.step()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            state.micro_step += 1
            state.batches_done += 1
            self.last_loss = loss.detach()
            for key, value in logs.items():
                self._window.setdefault(key, []).append(value.detach().float())
            self._call("on_micro_batch_end")
            if not sync:
                continue
            state.global_step += 1
            bar.update(1)
            last = state.global_step >= self.max_steps
            if self.args.log_every and (state.global_step % self.args.log_every == 0 or last):
                self._log(bar)
            self._call("on_step_end")
            every = self.args.eval_every
            if self.evaluate_fn is not None and (last or (every and state.global_step % every == 0)):
                self.evaluate()
            if self.args.checkpoint_every and state.global_step % self.args.checkpoint_every == 0:
                self.save_checkpoint()
            if last or state.stopped_early:
                return False
        if empty:
            raise ValueError("trainer: the training data yielded no batch in an epoch")
        return True

    def _epoch_data(self) -> Iterable[Any]:
        data, skip = self.train_data, self.state.batches_done
        if skip:  # resuming mid-epoch: the epoch's order replayed, the batches done skipped
            if self.accelerator is not None and isinstance(data, torch.utils.data.DataLoader):
                data = self.accelerator.skip_first_batches(data, skip)
            else:
                data = itertools.islice(data, skip, None)
        # On the loader actually iterated: Accelerate re-applies its own pass counter when an iteration starts.
        for target in (data, getattr(data, "batch_sampler", None), getattr(data, "sampler", None)):
            if callable(getattr(target, "set_epoch", None)):
                target.set_epoch(self.state.epoch)  # type: ignore[union-attr]
                break
        return data

    def _accumulate(self) -> contextlib.AbstractContextManager[Any]:
        return (
            self.accelerator.accumulate(self.model)
            if self.accelerator is not None
            else contextlib.nullcontext()
        )

    def _sync_gradients(self) -> bool:
        if self.accelerator is not None:
            return bool(self.accelerator.sync_gradients)
        return (self.state.micro_step + 1) % self.args.gradient_accumulation_steps == 0

    def _backward(self, loss: Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)  # divides by the accumulation steps itself
        elif self.args.gradient_accumulation_steps > 1:
            (loss / self.args.gradient_accumulation_steps).backward()
        else:
            loss.backward()

    def _clip(self) -> None:
        if self.args.max_grad_norm is None:
            return
        if self.accelerator is not None:
            self.accelerator.clip_grad_norm_(self._clip_params, self.args.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self._clip_params, self.args.max_grad_norm)

    def _call(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    # ------------------------------------------------------------------ logging and evaluation

    def _log(self, bar: tqdm) -> None:
        """Mean of each logged value over the window and over processes (every process calls this)."""
        means = {key: torch.stack(values).mean() for key, values in sorted(self._window.items())}
        self._window = {}
        if self.accelerator is not None:
            means = self.accelerator.reduce(means, reduction="mean")
        logs = {key: float(value) for key, value in means.items()}
        self.state.log_history.append({"step": self.state.global_step, **logs})
        if self.accelerator is not None:
            self.accelerator.log(logs, step=self.state.global_step)
        if "loss" in logs:
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if self.is_main_process:
            shown = " ".join(f"{key}={value:.4f}" for key, value in logs.items())
            logger.info("step %d/%d %s", self.state.global_step, self.max_steps, shown)
        self._call("on_log", logs)

    def evaluate(self) -> dict[str, float]:
        """Run ``evaluate``, select the best state and count towards early stopping; returns the logs."""
        if self.evaluate_fn is None:
            raise ValueError("trainer: no evaluate function was given")
        state, args = self.state, self.args
        metrics = dict(self.evaluate_fn(self.model))
        self.model.train()
        logs: dict[str, float] = {"step": state.global_step}
        if self.last_loss is not None:
            logs["train_loss"] = float(self.last_loss)
        logs |= metrics
        state.eval_history.append(logs)
        if args.metric_for_best is not None:
            if args.metric_for_best not in metrics:
                raise ValueError(
                    f"trainer: metric_for_best {args.metric_for_best!r} not in {sorted(metrics)}"
                )
            value = metrics[args.metric_for_best]
            best = state.best_metric
            if best is None or (value > best if args.greater_is_better else value < best):
                state.best_metric, state.best_step, state.bad_evaluations = value, state.global_step, 0
                self._best_state = {k: v.detach().clone() for k, v in self.unwrapped.state_dict().items()}
            else:
                state.bad_evaluations += 1
                patience = args.early_stopping_patience
                if patience is not None and state.bad_evaluations >= patience:
                    state.stopped_early = True
                    logger.info(
                        "early stopping at step %d (best step %s)", state.global_step, state.best_step
                    )
        if self.accelerator is not None:
            self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.global_step)
        self._call("on_evaluate", logs)
        return logs

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write a checkpoint into ``args.output_dir`` (every process calls this); returns its folder."""
        if self.accelerator is None or not self.args.output_dir:
            raise ValueError("trainer: checkpoints need an accelerator and output_dir")
        self.state.save_index += 1
        best = self._best_state

        def write_best(folder: Path) -> None:
            if best is not None:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in best.items()}, str(folder / BEST_STATE_FILE)
                )

        target = write_checkpoint(
            self.accelerator,
            Path(self.args.output_dir),
            checkpoint_name(self.state.save_index, self.state.global_step),
            self.state.to_json(),
            keep=self.args.keep_checkpoints,
            extra=write_best,
        )
        self._call("on_checkpoint", target)
        return target

    def _load_checkpoint(self, path: Path) -> None:
        if self.accelerator is None:
            raise ValueError("trainer: resuming needs an accelerator")
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a complete enecg checkpoint (no {TRAINER_STATE_FILE})")
        self.accelerator.load_state(str(path))
        self.state = TrainerState.load(path / TRAINER_STATE_FILE)
        best = path / BEST_STATE_FILE
        self._best_state = load_file(str(best)) if best.is_file() else None
        logger.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch, self.state.global_step)


def iterate_forever(draw: Callable[[], Any]) -> Iterator[Any]:
    """An endless iterable of ``draw()`` results (step-wise sampled batches: one endless epoch)."""
    while True:
        yield draw()


__all__ = ["BEST_STATE_FILE", "Trainer", "TrainerArguments", "TrainerState", "iterate_forever"]
