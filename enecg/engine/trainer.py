"""The one training loop of enecg: :class:`Trainer`.

The shape of ``transformers.Trainer``. Pretraining, light-expert training, diffusion training and every phase of
an ensemble's training strategy (:class:`enecg.training.loop.PhaseLoop`, a subclass) run on it: there is one
epoch/step/accumulation/clipping/evaluation/checkpoint/resume loop in the package. A :class:`Trainer` takes a
model, an optimizer, the training batches (a ``DataLoader``, or any iterable: one pass is an epoch) and a
``compute_loss`` function, and runs optimizer steps:

1. With an ``accelerator``, ``accelerator.prepare`` wraps model, optimizer and data; gradient accumulation
   (``accelerator.accumulate``), mixed precision and clipping go through it. Without one the loop is plain torch
   on the model's device (a light expert created by the main process inside a multi-process run trains alone).
2. Each optimizer step: clip (``max_grad_norm``), ``optimizer.step()``, the lr scheduler (stepped here once per
   optimizer step; a scheduler the caller prepared with the accelerator steps as Accelerate does), ``zero_grad``.
3. Every ``log_every`` steps (and at the last): the mean of each value ``compute_loss`` logged over the window's
   micro-batches and over processes goes to ``state.log_history``, the trackers, the progress bar and
   ``on_log``.
4. Evaluation with an ``evaluate`` function: every ``eval_every`` steps and at the last (``eval_strategy:
   steps``), or at each epoch's end followed by a checkpoint (``eval_strategy: epoch``; an epoch cut short by
   ``max_steps`` ends too); ``eval_on_start`` makes the starting weights a candidate. A selection policy
   (:mod:`enecg.engine.selection`) selects the final weights and stops early: by default :class:`BestState`
   on ``metric_for_best`` (a copy of the weights in memory, loaded at the end; early stopping after
   ``early_stopping_patience`` evaluations without improvement); the ensemble's phases select per group.
5. Every ``checkpoint_every`` steps (with an accelerator and ``output_dir``): a checkpoint
   (:mod:`enecg.engine.checkpoint`); ``train(resume_from=...)`` continues from one exactly: model, optimizer,
   scheduler, RNG states, the position in the epoch (the batches done are skipped) and the selection. Exact
   when an epoch's order can be replayed (a sampler with ``set_epoch``) and the loader draws no global random
   number when it starts an epoch (give the ``DataLoader`` its own ``generator``).

Every micro-batch is timed: ``last_data_wait`` (seconds blocked on the loader, set before
``on_micro_batch_begin``) and :class:`DataWait` totals in ``trainer.data_wait``. Callbacks
(:class:`~enecg.engine.callbacks.TrainerCallback`) see all of it. Subclasses adapt the loop through its hook
methods (``_total_steps``, ``_clip``, ``_record_micro_batch``, ``_log_step``, ``_evaluation_logs``,
``_log_evaluation``, ``_epoch_data``) and ``state_class``. RNG use is the caller's: the loop draws nothing
itself, so a loop moved onto the engine consumes random numbers in its old order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.scheduler import AcceleratedScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from enecg.engine.callbacks import TrainerCallback
from enecg.engine.checkpoint import (
    TRAINER_STATE_FILE,
    checkpoint_name,
    read_trainer_state,
    write_checkpoint,
)
from enecg.engine.selection import BEST_STATE_FILE, BestState, Selection

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, Tensor]]]
EvaluateFn = Callable[[nn.Module], Mapping[str, Any]]
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
    eval_strategy: str = field(
        default="steps",
        metadata={
            "help": "'steps': evaluate every eval_every steps and at the last; 'epoch': at each epoch's end (an "
            "epoch cut short by max_steps ends too), followed by a checkpoint when output_dir is set."
        },
    )
    eval_on_start: bool = field(
        default=False,
        metadata={"help": "Evaluate the starting weights before the first step (a candidate of the selection)."},
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
        if self.eval_strategy not in ("steps", "epoch"):
            raise ValueError(f"trainer: eval_strategy must be 'steps' or 'epoch', got {self.eval_strategy!r}")
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


@dataclass
class DataWait:
    """Seconds training micro-batches spent blocked on the loader (``wait``) out of their whole time (``total``),
    and how many micro-batches (``steps``)."""

    wait: float = 0.0
    total: float = 0.0
    steps: int = 0

    def add(self, wait: float, total: float) -> None:
        self.wait += wait
        self.total += total
        self.steps += 1

    def __sub__(self, earlier: DataWait) -> DataWait:
        return DataWait(self.wait - earlier.wait, self.total - earlier.total, self.steps - earlier.steps)

    def __add__(self, other: DataWait) -> DataWait:
        return DataWait(self.wait + other.wait, self.total + other.total, self.steps + other.steps)

    @property
    def share(self) -> float | None:
        """``wait / total`` (None before any step)."""
        return self.wait / self.total if self.total > 0 else None

    def summary(self) -> dict[str, Any]:
        return {
            "data_wait_seconds": self.wait,
            "step_seconds": self.total,
            "micro_batches": self.steps,
            "data_wait_share": self.share,
        }

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> DataWait:
        return cls(summary["data_wait_seconds"], summary["step_seconds"], summary["micro_batches"])


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
        scheduler: ``(optimizer, total optimizer steps) -> lr scheduler``, stepped once per optimizer step (a
            scheduler the factory already prepared with the accelerator steps the way Accelerate does).
        evaluate: ``model -> metrics`` (the loop switches the model back to train mode afterwards).
        callbacks: :class:`TrainerCallback` hooks, called in order.
        selection: the policy that selects the final weights from the evaluations
            (:class:`~enecg.engine.selection.Selection`); None: :class:`~enecg.engine.selection.BestState` on
            ``args.metric_for_best``.

    Subclasses (the ensemble's phase loop) adapt the loop through the methods marked as hooks and ``state_class``
    (the dataclass of :attr:`state`: its fields are the checkpoint's ``trainer_state.json``).
    """

    state_class: type = TrainerState

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
        selection: Selection | None = None,
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
        self.max_steps: int = self._total_steps()
        self.scheduler = scheduler(self.optimizer, self.max_steps) if scheduler is not None else None
        if accelerator is not None and self.scheduler is not None:
            if not isinstance(self.scheduler, AcceleratedScheduler):  # a prepared one is saved already
                accelerator.register_for_checkpointing(self.scheduler)  # save_state keeps only prepared objects
        self.compute_loss, self.evaluate_fn = compute_loss, evaluate
        self.callbacks = list(callbacks)
        self.selection: Selection = selection or BestState(
            args.metric_for_best, args.greater_is_better, args.early_stopping_patience
        )
        self.state = self.state_class()
        self.last_loss: Tensor | None = None  # the last micro-batch's loss (unscaled, detached)
        self.data_wait = DataWait()  # this process's training micro-batches
        self.last_data_wait = 0.0  # seconds the current micro-batch waited for the loader
        self._clip_params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self._window: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ running

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def train(self, resume_from: str | Path | None = None) -> Any:
        """Train to ``max_steps`` (or early stopping), load the selected weights; returns the state."""
        if resume_from is not None:
            self._load_checkpoint(Path(resume_from))
        state, args = self.state, self.args
        local_main = self.accelerator is None or self.accelerator.is_local_main_process
        bar = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc=args.progress_desc,
            unit="step",
            disable=args.progress_desc is None or not local_main,
        )
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)  # gradients left by an earlier use of the model
        self._call("on_train_begin")
        try:
            if args.eval_on_start and state.micro_step == 0 and not state.eval_history:
                self.evaluate()  # the starting weights as a candidate
            cut_short = False  # the run ended within an epoch (epoch evaluation: the epoch ends anyway)
            while True:
                if self._epoch_finished() or cut_short:  # (also a checkpoint written after an epoch's last batch)
                    self._end_epoch()
                if state.stopped_early or state.global_step >= self.max_steps:
                    break
                if state.batches_done == 0:
                    self._call("on_epoch_begin")
                finished = self._train_epoch(bar)
                if finished and not self._epoch_finished():  # an iterable without a length
                    self._epoch_batches = state.batches_done
                cut_short = not finished and args.eval_strategy == "epoch"
        finally:
            bar.close()
        self.selection.finish(self)
        self._call("on_train_end")
        return state

    def _total_steps(self) -> int:
        """Hook: the run's optimizer steps (here: ``max_steps``, else the epochs' steps)."""
        return self.args.max_steps or self.args.epochs * (self.steps_per_epoch or 0)

    def _epoch_finished(self) -> bool:
        return self._epoch_batches is not None and self.state.batches_done >= self._epoch_batches

    def _end_epoch(self) -> None:
        state = self.state
        state.epoch += 1
        state.batches_done = 0
        self._call("on_epoch_end")
        if self.args.eval_strategy == "epoch":
            if self.evaluate_fn is not None:
                self.evaluate()
            if self.accelerator is not None and self.args.output_dir:
                self.save_checkpoint()

    def _train_epoch(self, bar: tqdm) -> bool:
        """One pass over the data; False when the run ends within it (step budget or early stopping)."""
        state = self.state
        data = self._epoch_data()
        empty = True
        fetching = time.perf_counter()
        for batch in data:
            empty = False
            self.last_data_wait = time.perf_counter() - fetching
            self._call("on_micro_batch_begin")
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
            self._record_micro_batch(loss, logs)
            self.data_wait.add(self.last_data_wait, time.perf_counter() - fetching)
            self._call("on_micro_batch_end")
            if sync and not self._step_end(bar):
                return False
            fetching = time.perf_counter()
        if empty:
            raise ValueError("trainer: the training data yielded no batch in an epoch")
        return True

    def _step_end(self, bar: tqdm) -> bool:
        """After an optimizer step: logs, evaluation, checkpoint; False when the run ends here."""
        state, args = self.state, self.args
        state.global_step += 1
        bar.update(1)
        last = state.global_step >= self.max_steps
        self._log_step(bar, last)
        self._call("on_step_end")
        every = args.eval_every
        if (
            args.eval_strategy == "steps"
            and self.evaluate_fn is not None
            and (last or (every and state.global_step % every == 0))
        ):
            self.evaluate()
        if args.checkpoint_every and state.global_step % args.checkpoint_every == 0:
            # With epoch evaluation, an epoch's end (and the run's) is checkpointed after its evaluation.
            if args.eval_strategy == "steps" or not (last or self._epoch_finished()):
                self.save_checkpoint()
        return not (last or state.stopped_early)

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
        """Hook: clip the gradients before an optimizer step."""
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

    def _record_micro_batch(self, loss: Tensor, logs: Mapping[str, Tensor]) -> None:
        """Hook: keep a trained micro-batch's logged values (here: for the window's means)."""
        for key, value in logs.items():
            self._window.setdefault(key, []).append(value.detach().float())

    def _log_step(self, bar: tqdm, last: bool) -> None:
        """Hook: the training logs after an optimizer step (here: every ``log_every`` steps and at the last)."""
        if self.args.log_every and (self.state.global_step % self.args.log_every == 0 or last):
            self._log(bar)

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

    def evaluate(self) -> dict[str, Any]:
        """Run ``evaluate``, let the selection policy select and stop; returns the logs."""
        if self.evaluate_fn is None:
            raise ValueError("trainer: no evaluate function was given")
        metrics = dict(self.evaluate_fn(self.model))
        self.model.train()
        logs = self._evaluation_logs(metrics)
        self.selection.update(self, metrics, logs)
        self.state.eval_history.append(logs)
        self._log_evaluation(metrics, logs)
        self._call("on_evaluate", logs)
        return logs

    def _evaluation_logs(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Hook: an evaluation's record in ``state.eval_history`` (here: step, last training loss, metrics)."""
        logs: dict[str, Any] = {"step": self.state.global_step}
        if self.last_loss is not None:
            logs["train_loss"] = float(self.last_loss)
        return logs | dict(metrics)

    def _log_evaluation(self, metrics: Mapping[str, Any], logs: Mapping[str, Any]) -> None:
        """Hook: an evaluation to the trackers (here: ``eval/<metric>``)."""
        if self.accelerator is not None:
            self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.global_step)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write a checkpoint into ``args.output_dir`` (every process calls this); returns its folder."""
        if self.accelerator is None or not self.args.output_dir:
            raise ValueError("trainer: checkpoints need an accelerator and output_dir")
        self.state.save_index += 1
        target = write_checkpoint(
            self.accelerator,
            Path(self.args.output_dir),
            checkpoint_name(self.state.save_index, self.state.global_step),
            self.state.to_json(),
            keep=self.args.keep_checkpoints,
            extra=lambda folder: self.selection.save(self, folder),
        )
        self._call("on_checkpoint", target)
        return target

    def _load_checkpoint(self, path: Path) -> None:
        if self.accelerator is None:
            raise ValueError("trainer: resuming needs an accelerator")
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a complete enecg checkpoint (no {TRAINER_STATE_FILE})")
        self.accelerator.load_state(str(path))
        self.state = self.state_class.load(path / TRAINER_STATE_FILE)
        self.selection.load(self, path)
        logger.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch, self.state.global_step)


def iterate_forever(draw: Callable[[], Any]) -> Iterator[Any]:
    """An endless iterable of ``draw()`` results (step-wise sampled batches: one endless epoch)."""
    while True:
        yield draw()


__all__ = [
    "BEST_STATE_FILE",
    "BestState",
    "DataWait",
    "Selection",
    "Trainer",
    "TrainerArguments",
    "TrainerState",
    "iterate_forever",
]
