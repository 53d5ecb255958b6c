"""One training *phase* of an ensemble run: an optimizer over chosen parameters, a loss, model selection on
validation, checkpoints and exact resume, run on the engine's one loop (:class:`PhaseLoop` is an
:class:`enecg.engine.Trainer`).

A training strategy (:mod:`enecg.training.strategies`) is a sequence of phases. ``joint`` is one phase that
trains everything on the gated mixture's loss; ``staged`` trains every expert's heads on its own loss, then the
gate on out-of-fold predictions. :func:`run_phase` runs one :class:`Phase`:

1. The phase's parameters train (``Phase.trainable``), everything else is frozen for the phase; one AdamW param
   group per *selection group* (:class:`SelectionGroup`: the whole ensemble, or one expert's branch).
2. ``Accelerator.prepare`` wraps model, optimizer, loader and a ``transformers`` schedule; gradients are clipped
   per selection group (groups never influence each other); dropout is seeded per micro-batch from
   ``(seed, process, step)`` so a resumed run draws what an uninterrupted one does.
3. Each epoch: validation, each group's selection metric, its best weights (``<phase>/best/``), its own early
   stopping (a stopped group's learning rate becomes 0, so it stays at its best epoch's path exactly as if it had
   trained alone), tracker logs, a checkpoint. The phase ends when every group stopped or the epochs are done.
4. Checkpoints (``<phase>/checkpoints/checkpoint_NNNNN-step_SSSSSSS``): ``accelerator.save_state`` (optimizer,
   scheduler, RNG; the model part replaced by the trainable weights + buffers) plus ``trainer_state.json``, every
   ``output.checkpoint_every_steps`` optimizer steps and at each epoch end, written into a hidden folder renamed
   when complete. A phase resumed with ``output.resume: auto`` continues from its newest complete checkpoint (also
   mid-epoch, replaying the epoch's order and skipping the batches done); a finished phase resumes to its end and
   reloads its best weights, so a strategy re-run after a crash replays its finished phases in seconds.
5. At the end each group's best weights are loaded into the model.

The epochs, steps, accumulation, checkpoints and resume are the engine's (``eval_strategy: epoch``,
``eval_on_start`` for ``Phase.select_initial``); the phase plugs in its selection policy
(:class:`GroupSelection`: per-group scores, best weights, early stopping) and the engine's hooks (dropout seeds,
per-group clipping, the running training means, its tracker logs and validation). Callbacks
(:class:`TrainerCallback`, the engine's base class, re-exported here) see phase starts and ends (the engine's
``on_train_begin``/``on_train_end`` become ``on_phase_begin``/``on_phase_end``), optimizer steps, epochs and
checkpoints: the resume and multi-process tests and the benchmarks hook in there, not into private methods.

**Data wait.** Every training micro-batch is timed twice: how long the loop was blocked fetching it from the loader
(reading records and applying contracts in the main process, or waiting for workers) and its whole time (that wait
plus forward, backward and optimizer step; validation and checkpoints are not steps). The trackers get
``time/data_wait_share`` (and the seconds) of the steps since their previous log, and :class:`PhaseResult` the
phase's totals over every process (the engine's :class:`DataWait`, timed by its loop): the share of a step an
accelerator would idle waiting for data. A resumed phase counts only the steps it ran itself. Accelerate's loader
fetches one batch ahead, so the first step of an epoch waits for two batches and the last for none: sums over
steps are exact, single steps are not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from enecg.data.schema import TaskInfo
from enecg.engine.callbacks import TrainerCallback  # re-exported: the hooks of every loop
from enecg.engine.checkpoint import (
    TRAINER_STATE_FILE,
    complete_checkpoints,
    read_trainer_state,
)
from enecg.engine.selection import Selection
from enecg.engine.trainer import DataWait, Trainer, TrainerArguments
from enecg.ensemble.inference import evaluating
from enecg.ensemble.model import Ensemble, EnsembleOutput, seed_rng
from enecg.ensemble.tasks import evaluated_as, task_type
from enecg.evaluation.metrics import (
    binary_metrics,
    multiclass_metrics,
    multilabel_metrics,
    regression_metrics,
)
from enecg.training.data import EpochShuffleSampler, IndexDataset, step_seed
from enecg.utils.files import write_text_atomic
from enecg.utils.loaders import loader_options

if TYPE_CHECKING:
    from accelerate import Accelerator

    from enecg.training.data import RunPlan
    from enecg.training.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_WEIGHTS_FILE = "trainable_model.safetensors"
BEST_DIR = "best"
ENSEMBLE_GROUP = "ensemble"
_BUFFER_PREFIX = "buffer::"
LossFn = Callable[[Ensemble, EnsembleOutput, Mapping[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


# ------------------------------------------------------------------------------------------------ phase spec


@dataclass
class SelectionGroup:
    """Parameters selected and early-stopped together, by one validation metric.

    Attributes:
        name: ``ensemble`` (the gated mixture), an expert's name (its branch), or ``<expert>/<task>`` (one head).
        match: parameter name -> in this group (None: every parameter the phase trains).
        expert: for an expert group, the expert whose own predictions are scored on validation.
        task: for a head group, the one task scored (its headline, or its loss with ``selection_metric: loss``).
    """

    name: str
    match: Callable[[str], bool] | None = None
    expert: str | None = None
    task: str | None = None


@dataclass
class Phase:
    """What one phase trains, on which rows, with which loss, and how its result is selected."""

    name: str = field(metadata={"help": "Folder of the phase under the run folder ('' = the run folder)."})
    trainable: Callable[[str], bool] = field(metadata={"help": "Parameter name -> trained in this phase."})
    loss: LossFn = field(metadata={"help": "(ensemble, output, labels) -> (loss, logged parts)."})
    groups: list[SelectionGroup] = field(
        default_factory=lambda: [SelectionGroup(ENSEMBLE_GROUP)],
        metadata={"help": "Selection groups (one param group and one early stopping each)."},
    )
    train_rows: np.ndarray | None = field(
        default=None, metadata={"help": "Rows of the training table (None: all)."}
    )
    expert_logits: dict[str, Tensor] | None = field(
        default=None,
        metadata={"help": "task -> (N_train, E, ...) logits fed instead of the heads' (gate fitting)."},
    )
    use_gate: bool = field(default=True, metadata={"help": "False: every expert on every record, no gate."})
    epochs: int | None = field(default=None, metadata={"help": "None: optim.epochs."})
    lr: float | None = field(default=None, metadata={"help": "None: optim.lr."})
    warmup_steps: int | None = field(default=None, metadata={"help": "None: optim.warmup_steps."})
    select_initial: bool = field(
        default=False,
        metadata={
            "help": "Validate before training too: the starting weights (epoch 0) are a candidate, so the phase "
            "keeps them when no epoch beats them on validation."
        },
    )
    title: str = field(default="", metadata={"help": "Progress-bar and log label."})


# ----------------------------------------------------------------------------------------------- state


@dataclass
class GroupState:
    """Selection bookkeeping of one :class:`SelectionGroup`."""

    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped: bool = False


@dataclass
class TrainerState:
    """Loop position and selection bookkeeping of a phase, saved with each checkpoint as JSON."""

    epoch: int = 0  # current epoch (epochs fully done when batches_done == 0)
    batches_done: int = 0  # micro-batches of `epoch` already trained
    global_step: int = 0  # optimizer steps
    micro_step: int = 0  # micro-batches overall (seeds dropout)
    save_index: int = 0
    groups: dict[str, GroupState] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)  # sums for the epoch's training logs
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stopped_early(self) -> bool:
        return bool(self.groups) and all(g.stopped for g in self.groups.values())

    @property
    def eval_history(self) -> list[dict[str, Any]]:
        """The engine's name of :attr:`history` (one entry per epoch's evaluation)."""
        return self.history

    def group(self, name: str) -> GroupState:
        return self.groups.setdefault(name, GroupState())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        """Read a checkpoint's ``trainer_state.json``; errors name the file."""
        data = read_trainer_state(path, cls)
        data["groups"] = {k: GroupState(**v) for k, v in (data.get("groups") or {}).items()}
        return cls(**data)


@dataclass
class PhaseResult:
    """What a finished phase reports (the same on every process)."""

    name: str
    epochs_completed: int
    global_step: int
    groups: dict[str, GroupState]
    history: list[dict[str, Any]]
    resumed_from: str | None
    data_wait: DataWait = field(default_factory=DataWait)  # summed over processes

    @property
    def best_metric(self) -> float | None:
        return self.groups[ENSEMBLE_GROUP].best_metric if ENSEMBLE_GROUP in self.groups else None

    @property
    def best_epoch(self) -> int | None:
        if ENSEMBLE_GROUP in self.groups:
            return self.groups[ENSEMBLE_GROUP].best_epoch
        epochs = [g.best_epoch for g in self.groups.values() if g.best_epoch is not None]
        return max(epochs) if epochs else None

    @property
    def stopped_early(self) -> bool:
        return bool(self.groups) and all(g.stopped for g in self.groups.values())

    def summary(self) -> dict[str, Any]:
        return {
            "epochs_completed": self.epochs_completed,
            "global_step": self.global_step,
            "groups": {k: dataclasses.asdict(v) for k, v in self.groups.items()},
            "resumed_from": self.resumed_from,
            "data_wait": self.data_wait.summary(),
        }


# ------------------------------------------------------------------------------------------- run context


@dataclass
class RunContext:
    """Everything a strategy needs to run its phases (built by :func:`enecg.training.trainer.train`)."""

    recipe: Recipe
    run: RunPlan
    accelerator: Accelerator
    ensemble: Ensemble
    collates: dict[str, Any]  # "train" / "validation" / "test" -> collate (FeatureTable or RecordBatches)
    from_embeddings: bool
    num_workers: int
    run_dir: Path
    task_infos: list[TaskInfo]
    callbacks: list[TrainerCallback] = field(default_factory=list)
    logged_steps: int = 0  # tracker step offset: phases continue the run's step count

    @property
    def n_train(self) -> int:
        return len(self.collates["train"])

    def loader_options(self) -> dict[str, Any]:
        """``DataLoader`` keyword arguments of this run: workers, pinned memory on CUDA, the recipe's
        ``persistent_workers`` / ``prefetch_factor``."""
        data = self.recipe.data
        return loader_options(
            self.num_workers,
            self.accelerator.device,
            persistent_workers=data.persistent_workers,
            prefetch_factor=data.prefetch_factor,
        )

    def patient_ids(self, label: str) -> list[str]:
        """Patient of every row of a part (in row order)."""
        collate = self.collates[label]
        ids = getattr(collate, "patient_ids", None)
        if ids is None:
            ids = list(collate.part["patient_id"])
        return [str(p) for p in ids]


class PhaseRows:
    """Collate over a subset of a part's rows (``rows``), adding per-row ``expert_logits`` when given.

    Batches keep the part's own row numbers in ``index``."""

    def __init__(
        self, collate: Any, rows: np.ndarray | None = None, expert_logits: Mapping[str, Tensor] | None = None
    ) -> None:
        self.collate = collate
        self.rows = np.arange(len(collate)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.expert_logits = dict(expert_logits) if expert_logits is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, positions: Sequence[int]) -> dict[str, Any]:
        rows = self.rows[np.asarray(list(positions), dtype=np.int64)]
        batch = self.collate(rows.tolist())
        if self.expert_logits is not None:
            index = torch.as_tensor(rows, dtype=torch.long)
            batch["expert_logits"] = {t: v.index_select(0, index) for t, v in self.expert_logits.items()}
        return batch


def eval_loader(ctx: RunContext, label: str, rows: np.ndarray | None = None) -> DataLoader:
    """A prepared (sharded over processes) evaluation loader over ``rows`` of a part (None: every row)."""
    collate = PhaseRows(ctx.collates[label], rows)
    loader = DataLoader(
        IndexDataset(len(collate)),
        batch_size=ctx.recipe.optim.eval_batch_size,
        shuffle=False,
        collate_fn=collate,
        **ctx.loader_options(),
    )
    return ctx.accelerator.prepare(loader)


# ---------------------------------------------------------------------------------------------- the loop


def run_phase(ctx: RunContext, phase: Phase) -> PhaseResult:
    """Train one phase to its end (resuming it when its checkpoints allow) and load each group's best weights."""
    ensemble = ctx.ensemble
    phase_dir = ctx.run_dir / phase.name if phase.name else ctx.run_dir
    # Freeze what the phase does not train (the ensemble's own trainable set is the ceiling).
    base_trainable = {n for n, p in ensemble.named_parameters() if p.requires_grad}
    names = sorted(n for n in base_trainable if phase.trainable(n))
    if not names:
        raise ValueError(f"phase {phase.name or 'train'!r} has no parameter to train")
    for name, parameter in ensemble.named_parameters():
        parameter.requires_grad_(name in names)
    try:
        result = _run_phase(ctx, phase, phase_dir, names)
    finally:
        for name, parameter in ensemble.named_parameters():
            parameter.requires_grad_(name in base_trainable)
    ctx.logged_steps += result.global_step
    return result


def _group_parameters(phase: Phase, names: list[str]) -> dict[str, list[str]]:
    """Parameter names of each selection group (a name belongs to the first group that matches it)."""
    out: dict[str, list[str]] = {g.name: [] for g in phase.groups}
    for name in names:
        for group in phase.groups:
            if group.match is None or group.match(name):
                out[group.name].append(name)
                break
        else:
            raise ValueError(f"phase {phase.name!r}: parameter {name!r} is in no selection group")
    return out


def _run_phase(ctx: RunContext, phase: Phase, phase_dir: Path, names: list[str]) -> PhaseResult:
    recipe, accelerator, ensemble = ctx.recipe, ctx.accelerator, ctx.ensemble
    optim = recipe.optim
    params = dict(ensemble.named_parameters())
    group_names = _group_parameters(phase, names)
    train_collate = PhaseRows(ctx.collates["train"], phase.train_rows, phase.expert_logits)
    sampler = EpochShuffleSampler(len(train_collate), ctx.run.seed)
    train_loader = DataLoader(
        IndexDataset(len(train_collate)),
        batch_sampler=BatchSampler(sampler, optim.batch_size, drop_last=False),
        collate_fn=train_collate,
        **ctx.loader_options(),
    )
    lr = phase.lr if phase.lr is not None else optim.lr
    optimizer = torch.optim.AdamW(
        [{"params": [params[n] for n in group_names[g.name]], "name": g.name} for g in phase.groups],
        lr=lr,
        weight_decay=optim.weight_decay,
        foreach=True,  # one fused update over the many small head tensors (the default only on GPU)
    )
    loop = PhaseLoop(ctx, phase, phase_dir, group_names, optimizer, train_loader, sampler)
    hooks = [
        accelerator.register_save_state_pre_hook(_save_trainable_hook(accelerator)),
        accelerator.register_load_state_pre_hook(_load_trainable_hook(accelerator)),
    ]
    resumed_from = _resume_point(recipe.output.resume, phase_dir / CHECKPOINTS_DIR, accelerator)
    try:
        loop.train(resume_from=resumed_from)
    finally:
        for handle in hooks:
            handle.remove()
    state = loop.state
    data_wait = _sum_over_processes(accelerator, loop.data_wait)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # forget this phase's wrapped model/optimizer/loaders before the next phase
    return PhaseResult(
        name=phase.name,
        epochs_completed=state.epoch,
        global_step=state.global_step,
        groups={k: dataclasses.replace(v) for k, v in state.groups.items()},
        history=list(state.history),
        resumed_from=str(resumed_from) if resumed_from else None,
        data_wait=data_wait,
    )


class GroupSelection(Selection):
    """The phase's selection policy: each :class:`SelectionGroup` selected on its own validation score (written
    by the phase's evaluation as ``<phase>/val/[<group>/]selection``), its best weights written to
    ``<phase>/best/`` when it improves, its own early stopping (a stopped group's learning rate becomes 0)."""

    def update(self, trainer: Any, metrics: Mapping[str, Any], logs: dict[str, Any]) -> None:
        loop: PhaseLoop = trainer
        if loop.val_loader is None:
            return
        state, improved = loop.state, []
        for group in loop.phase.groups:
            g = state.group(group.name)
            if g.stopped:
                continue
            metric = logs[loop.selection_key(group)]
            if metric is not None and (g.best_metric is None or metric > g.best_metric):
                g.best_metric, g.best_epoch, g.bad_epochs = metric, state.epoch, 0
                improved.append(group.name)
            else:
                g.bad_epochs += 1
                patience = loop.recipe.optim.early_stopping_patience
                if patience is not None and g.bad_epochs >= patience:
                    g.stopped = True
                    logger.info(
                        "%s: early stopping %s after epoch %d (best epoch %s)",
                        loop.phase.name or "train",
                        group.name,
                        state.epoch,
                        g.best_epoch,
                    )
        for name in improved:
            loop.save_best(name)
        loop.apply_stopped_groups()

    def load(self, trainer: Any, folder: Path) -> None:
        trainer.start_groups()  # a resumed phase: its stopped groups stay at learning rate 0

    def finish(self, trainer: Any) -> None:
        trainer.load_best()


class PhaseLoop(Trainer):
    """One phase on the engine's loop (:class:`enecg.engine.Trainer`); state in :class:`TrainerState`.

    The phase configures the engine: epoch evaluation (validation, per-group selection by
    :class:`GroupSelection`, a checkpoint after it), the starting weights as a candidate with
    ``Phase.select_initial``, and its hooks: dropout seeded per micro-batch, per-group clipping, the running
    training means and the tracker logs of the phase."""

    state_class = TrainerState
    state: TrainerState

    def __init__(
        self,
        ctx: RunContext,
        phase: Phase,
        phase_dir: Path,
        group_names: dict[str, list[str]],
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        sampler: EpochShuffleSampler,
    ) -> None:
        self.ctx, self.phase, self.phase_dir = ctx, phase, phase_dir
        self.recipe, self.run_plan = ctx.recipe, ctx.run
        self.task_infos = ctx.task_infos
        self.group_names, self.sampler = group_names, sampler
        optim, output = ctx.recipe.optim, ctx.recipe.output
        self.epochs = phase.epochs if phase.epochs is not None else optim.epochs
        args = TrainerArguments(
            max_steps=optim.max_steps,
            epochs=self.epochs,
            gradient_accumulation_steps=optim.gradient_accumulation_steps,
            max_grad_norm=optim.max_grad_norm,
            eval_strategy="epoch",
            eval_on_start=phase.select_initial,
            checkpoint_every=output.checkpoint_every_steps,
            output_dir=str(phase_dir / CHECKPOINTS_DIR),
            keep_checkpoints=output.keep_checkpoints,
            progress_desc=(phase.title or f"train {ctx.run.name}").strip(),
        )
        super().__init__(
            ctx.ensemble,
            optimizer,
            train_loader,
            self._compute_loss,
            args,
            accelerator=ctx.accelerator,
            scheduler=self._scheduler,
            evaluate=self._validate,
            callbacks=ctx.callbacks,
            selection=GroupSelection(),
        )
        self.total_steps = self.max_steps
        self.val_loader = eval_loader(ctx, "validation") if "validation" in ctx.collates else None
        params = dict(self.unwrapped.named_parameters())
        self.group_params = {g: [params[n] for n in ns] for g, ns in group_names.items()}
        self._logged_wait = DataWait()  # data_wait at the previous tracker log
        self._last: tuple[EnsembleOutput, dict[str, Tensor], int] | None = None  # output, parts, size
        self.start_groups()

    # ------------------------------------------------------------------ the engine's hooks

    def _total_steps(self) -> int:
        """The phase's epochs, cut at ``optim.max_steps``."""
        total = self.epochs * (self.steps_per_epoch or 0)
        max_steps = self.recipe.optim.max_steps
        return min(total, max_steps) if max_steps is not None else total

    def _scheduler(self, optimizer: Any, total_steps: int) -> Any:
        optim, accelerator = self.recipe.optim, self.ctx.accelerator
        warmup = self.phase.warmup_steps if self.phase.warmup_steps is not None else optim.warmup_steps
        # Accelerate steps a prepared scheduler once per process per optimizer step (see AcceleratedScheduler).
        return accelerator.prepare(
            get_scheduler(
                optim.lr_scheduler,
                optimizer,
                num_warmup_steps=warmup * accelerator.num_processes,
                num_training_steps=total_steps * accelerator.num_processes,
            )
        )

    def _call(self, event: str, *args: Any) -> None:
        # A phase is one training run of an ensemble run: its callbacks see phase starts and ends.
        super()._call({"on_train_begin": "on_phase_begin", "on_train_end": "on_phase_end"}.get(event, event), *args)

    def _epoch_data(self) -> Any:
        data = super()._epoch_data()
        self.sampler.set_epoch(self.state.epoch)  # (also when the loader iterated is a skipping one)
        return data

    def _compute_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        accelerator = self.ctx.accelerator
        seed_rng(step_seed(self.run_plan.seed, accelerator.process_index, self.state.micro_step), accelerator.device)
        output = self.forward(model, batch)
        loss, parts = self.phase.loss(self.unwrapped, output, batch["labels"])
        self._last = (output, parts, len(batch["index"]))
        return loss, {}

    def _clip(self) -> None:
        max_norm = self.recipe.optim.max_grad_norm
        if max_norm is None:
            return
        accelerator = self.ctx.accelerator
        if len(self.group_params) == 1:
            accelerator.clip_grad_norm_(next(iter(self.group_params.values())), max_norm)
            return
        # Per group: one group's gradient norm never scales another's (each expert trains as if alone).
        accelerator.unscale_gradients()
        for params in self.group_params.values():
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _record_micro_batch(self, loss: Tensor, logs: Mapping[str, Tensor]) -> None:
        # Reads the loss back (float()), so on a GPU the step's kernels are done before its time is taken.
        assert self._last is not None
        output, parts, size = self._last
        self._accumulate_logs(loss, parts, output, size)

    def _log_step(self, bar: tqdm, last: bool) -> None:
        state = self.state
        if state.global_step % self.recipe.tracking.log_every_steps != 0:
            return
        assert self.last_loss is not None and self._last is not None
        parts = self._last[1]
        logs = {
            f"{self._prefix}train/step_loss": float(self.last_loss),
            f"{self._prefix}train/lr": self.scheduler.get_last_lr()[0],
        }
        logs |= {f"{self._prefix}train/step_{k}": float(v) for k, v in parts.items()}
        logs |= self._data_wait_logs()
        self.ctx.accelerator.log(logs, step=self.ctx.logged_steps + state.global_step)

    def _evaluation_logs(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return dict(metrics)  # the validation's logs are the phase's own (see _validate)

    def _log_evaluation(self, metrics: Mapping[str, Any], logs: Mapping[str, Any]) -> None:
        self.ctx.accelerator.log(
            {k: v for k, v in logs.items() if isinstance(v, (int, float))},
            step=self.ctx.logged_steps + self.state.global_step,
        )

    # ------------------------------------------------------------------ the phase

    @property
    def from_embeddings(self) -> bool:
        return self.ctx.from_embeddings

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> EnsembleOutput:
        return forward_batch(model, batch, from_embeddings=self.ctx.from_embeddings, use_gate=self.phase.use_gate)

    def start_groups(self) -> None:
        """Every group in the state (a fresh or resumed phase); a stopped group's learning rate is 0."""
        for group in self.phase.groups:
            self.state.group(group.name)
        self.apply_stopped_groups()

    def _data_wait_logs(self) -> dict[str, float]:
        """This process's data-wait share and seconds over the steps since the previous tracker log."""
        window = self.data_wait - self._logged_wait
        self._logged_wait = dataclasses.replace(self.data_wait)
        if window.share is None:
            return {}
        return {
            f"{self._prefix}time/data_wait_share": window.share,
            f"{self._prefix}time/data_wait_s": window.wait,
            f"{self._prefix}time/step_s": window.total,
        }

    @property
    def _prefix(self) -> str:
        return f"{self.phase.name}/" if self.phase.name else ""

    def selection_key(self, group: SelectionGroup) -> str:
        """The log key of a group's selection value (higher is better; None when undefined)."""
        return f"{self._prefix}val/{group.name + '/' if group.expert else ''}selection"

    def _accumulate_logs(self, loss: Tensor, parts: Mapping[str, Tensor], output: Any, size: int) -> None:
        running = self.state.running
        values = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
        per_task = self.recipe.model.gate.per_task
        if self.phase.use_gate:
            for t_index, (task, weights) in enumerate(output.gate_weights.items()):
                if t_index > 0 and not per_task:
                    break
                mean = weights.detach().float().mean(dim=0)
                for e, expert in enumerate(self.unwrapped.expert_names):
                    key = f"gate_weight/{task}/{expert}" if per_task else f"gate_weight/{expert}"
                    values[key] = float(mean[e])
        for key, value in values.items():
            # Every key exists on every process (the epoch-end average is a collective call per key); a
            # non-finite value (no labels for a task in this batch) just does not count.
            finite = math.isfinite(value)
            running[key] = running.get(key, 0.0) + (value * size if finite else 0.0)
            running[f"n::{key}"] = running.get(f"n::{key}", 0.0) + (size if finite else 0)

    def _validate(self, model: nn.Module) -> dict[str, Any]:
        """The epoch's logs: training means, validation metrics and each running group's selection value (the
        engine's evaluation; :class:`GroupSelection` then selects on it)."""
        state, accelerator = self.state, self.ctx.accelerator
        logs: dict[str, Any] = {"epoch": state.epoch, "global_step": state.global_step}
        # Per-process running means, averaged over processes.
        for key in sorted(k for k in state.running if not k.startswith("n::")):
            prefix = "" if key.startswith("gate_weight/") else "train/"
            logs[self._prefix + prefix + key] = _mean_over_processes(
                accelerator, state.running[key], state.running[f"n::{key}"]
            )
        state.running = {}
        if self.val_loader is not None:
            evaluation = evaluate_loader(self.ctx, self.val_loader, model=model, use_gate=self.phase.use_gate)
            for group in self.phase.groups:
                if state.group(group.name).stopped:
                    continue
                headline = self._group_headline(evaluation, group)
                logs |= {f"{self._prefix}val/{_group_key(group)}{k}": v for k, v in _group_logs(headline, group)}
                metric = selection_value(_group_metric(self.recipe.optim.selection_metric, group), headline)
                logs[self.selection_key(group)] = metric
            if self.phase.use_gate:
                for expert, weight in evaluation["gate"].items():
                    logs[f"{self._prefix}val/gate_weight/{expert}"] = weight
        return logs

    def _group_headline(self, evaluation: Mapping[str, Any], group: SelectionGroup) -> dict[str, float]:
        if group.expert is None:
            return headline_metrics(evaluation, self.task_infos, self.unwrapped)
        e = self.unwrapped.expert_names.index(group.expert)
        tasks = [t for t in self.task_infos if group.task is None or t.name == group.task]
        own = {
            "predictions": {t: v[:, e] for t, v in evaluation["expert_predictions"].items()},
            "labels": evaluation["labels"],
            "loss": evaluation["expert_loss"][
                group.expert if group.task is None else f"{group.expert}/{group.task}"
            ],
        }
        return headline_metrics(own, tasks, self.unwrapped)

    def apply_stopped_groups(self) -> None:
        """A stopped group's learning rate is 0 from now on (it keeps its best epoch's weights at the end)."""
        scheduler = getattr(self.scheduler, "scheduler", self.scheduler)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        for index, param_group in enumerate(optimizer.param_groups):
            if self.state.group(param_group["name"]).stopped:
                param_group["lr"] = 0.0
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[index] = 0.0

    def _best_path(self, group: str) -> Path:
        if len(self.phase.groups) == 1:
            return self.phase_dir / BEST_DIR / TRAINABLE_WEIGHTS_FILE
        return self.phase_dir / BEST_DIR / group / TRAINABLE_WEIGHTS_FILE

    def save_best(self, group: str) -> None:
        """Write a group's weights (it just improved) and its ``best.json`` (main process; every process calls)."""
        accelerator = self.ctx.accelerator
        if accelerator.is_main_process:
            path = self._best_path(group)
            names = self.group_names[group]
            _write_trainable(self.unwrapped, path, names=None if len(self.phase.groups) == 1 else names)
            g = self.state.group(group)
            write_text_atomic(
                path.parent / "best.json",
                json.dumps(
                    {
                        "epoch": g.best_epoch,
                        "metric": g.best_metric,
                        "selection_metric": self.recipe.optim.selection_metric,
                        "group": group,
                    },
                    indent=2,
                ),
            )
        accelerator.wait_for_everyone()

    def load_best(self) -> None:
        """Load every group's best weights (groups that never improved keep their current weights)."""
        for group in self.phase.groups:
            path = self._best_path(group.name)
            if self.state.group(group.name).best_epoch is not None and path.is_file():
                _read_trainable(self.unwrapped, path, partial=len(self.phase.groups) > 1)


def _group_key(group: SelectionGroup) -> str:
    """Log-key prefix of a group's validation metrics: ``<expert>/`` for expert and head groups."""
    return f"{group.expert}/" if group.expert is not None else ""


def _group_logs(headline: Mapping[str, float], group: SelectionGroup) -> list[tuple[str, float]]:
    """The validation metrics a group logs: a head group only its own task's (``<task>/...``)."""
    if group.task is None:
        return list(headline.items())
    return [(k, v) for k, v in headline.items() if k.startswith(f"{group.task}/")]


def _group_metric(name: str, group: SelectionGroup) -> str:
    """The selection metric of a head group: the recipe's when it concerns the group's task (or is the loss),
    else the task's own headline (a metric of another task cannot select this head)."""
    if group.task is None or name == "loss" or name.startswith(f"{group.task}/"):
        return name
    return "mean_headline"


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def collect_expert_logits(ctx: RunContext, label: str, rows: np.ndarray) -> dict[str, Tensor]:
    """Every expert's own logits (no gate) on ``rows`` of a part: task -> ``(len(rows), E, ...)`` in ``rows``
    order, gathered over processes."""
    ensemble = ctx.ensemble
    loader = eval_loader(ctx, label, rows)
    indices: list[Tensor] = []
    logits: dict[str, list[Tensor]] = {}
    with evaluating(ensemble):
        for batch in loader:
            output = forward_batch(ensemble, batch, from_embeddings=ctx.from_embeddings, use_gate=False)
            gathered = ctx.accelerator.gather_for_metrics(
                {"index": batch["index"], "logits": output.expert_logits}
            )
            indices.append(gathered["index"].cpu())
            for task, value in gathered["logits"].items():
                logits.setdefault(task, []).append(value.float().cpu())
    order = torch.cat(indices)
    position = {int(r): i for i, r in enumerate(order.tolist())}
    pick = torch.as_tensor([position[int(r)] for r in rows], dtype=torch.long)
    return {task: torch.cat(parts).index_select(0, pick) for task, parts in logits.items()}


def forward_batch(
    model: nn.Module, batch: Mapping[str, Any], *, from_embeddings: bool, use_gate: bool = True
) -> EnsembleOutput:
    """The ensemble (or its prepared wrapper) on one collated batch."""
    return model(
        batch["expert_inputs"],
        batch.get("gate_input"),
        batch["demographics"],
        from_embeddings=from_embeddings,
        window_masks=batch.get("window_masks"),
        lead_masks=batch.get("lead_masks"),
        valid_samples=batch.get("valid_samples"),
        available=batch.get("available"),
        expert_logits=batch.get("expert_logits"),
        use_gate=use_gate,
    )


@torch.no_grad()
def evaluate_loader(
    ctx: RunContext, loader: DataLoader, *, model: nn.Module | None = None, use_gate: bool = True
) -> dict[str, Any]:
    """Predictions (combined and each expert's), labels and row indices of a prepared evaluation loader, gathered
    over processes; the mixture's loss and each expert's own loss (record-weighted means).

    ``model``: the prepared (wrapped) model of a phase, else the run's ensemble itself."""
    accelerator, ensemble = ctx.accelerator, ctx.ensemble
    model = ensemble if model is None else model
    preds: dict[str, list[Tensor]] = {}
    expert_preds: dict[str, list[Tensor]] = {}
    labels: dict[str, list[Tensor]] = {}
    indices: list[Tensor] = []
    gate_sums: dict[str, Tensor] = {}
    names = ensemble.expert_names
    # the mixture's loss, each expert's own loss, each expert's loss per task
    keys = ["", *names, *(f"{e}/{t}" for e in names for t in ensemble.tasks)]
    sums = torch.zeros(len(keys), dtype=torch.float64)
    counts = torch.zeros(len(keys), dtype=torch.float64)
    with evaluating(model):  # eval mode, no gradients; the mode it had is restored
        for batch in loader:
            output = forward_batch(model, batch, from_embeddings=ctx.from_embeddings, use_gate=use_gate)
            size = len(batch["index"])
            loss, _ = ensemble.compute_loss(output, batch["labels"])
            own, own_parts = ensemble.expert_losses(output, batch["labels"])
            values = [loss, *(own[n] for n in names), *(own_parts[k] for k in keys[1 + len(names) :])]
            for i, value in enumerate(values):
                if math.isfinite(float(value)):
                    sums[i] += float(value) * size
                    counts[i] += size
            for task, weights in output.gate_weights.items():
                total = weights.detach().float().sum(0)
                gate_sums[task] = gate_sums[task] + total if task in gate_sums else total
            gathered = accelerator.gather_for_metrics(
                {
                    "index": batch["index"],
                    "predictions": output.predictions,
                    "expert_predictions": output.expert_predictions,
                    "labels": batch["labels"],
                }
            )
            indices.append(gathered["index"].cpu())
            for task, value in gathered["predictions"].items():
                preds.setdefault(task, []).append(value.float().cpu())
            for task, value in gathered["expert_predictions"].items():
                expert_preds.setdefault(task, []).append(value.float().cpu())
            for task, value in gathered["labels"].items():
                labels.setdefault(task, []).append(value.float().cpu())
    totals = accelerator.reduce(torch.stack([sums, counts]).to(accelerator.device), "sum").cpu()
    means = totals[0] / totals[1].clamp(min=1)
    # Mean gate weight per expert (per task and expert with a per-task gate).
    gate_weights = {}
    per_task = ctx.recipe.model.gate.per_task
    for t_index, (task, sums_t) in enumerate(gate_sums.items()):
        if t_index > 0 and not per_task:
            break
        sums_t = accelerator.reduce(sums_t.to(accelerator.device), "sum")
        for e, expert in enumerate(names):
            gate_weights[f"{task}/{expert}" if per_task else expert] = float(sums_t[e] / sums_t.sum())
    return {
        "index": torch.cat(indices).numpy(),
        "predictions": {k: torch.cat(v).numpy() for k, v in preds.items()},
        "expert_predictions": {k: torch.cat(v).numpy() for k, v in expert_preds.items()},
        "labels": {k: torch.cat(v).numpy() for k, v in labels.items()},
        "loss": float(means[0]),
        "expert_loss": {k: float(means[i]) for i, k in enumerate(keys) if k},
        "gate": gate_weights,
    }


def headline_metrics(
    evaluation: Mapping[str, Any], tasks: list[TaskInfo], ensemble: Ensemble
) -> dict[str, float]:
    """Per task: ``<task>/<metric>`` values plus ``<task>/headline``; ``mean_headline`` and ``loss``.

    Headlines (higher is better): macro AUROC (multilabel, multiclass), AUROC (binary), ``-MAE / std`` of the
    training targets (regression: scale-free, so one task's unit does not swamp the mean)."""
    out: dict[str, float] = {"loss": evaluation["loss"]}
    headlines = []
    for info in tasks:
        y, p = evaluation["labels"][info.name], evaluation["predictions"][info.name]
        if evaluated_as(info.type) == "multilabel":
            res = multilabel_metrics(y, p, np.full(y.shape[1], 0.5), info.names)
            values = {"macro_auroc": res["macro"]["auroc"], "macro_auprc": res["macro"]["auprc"]}
            headline = values["macro_auroc"]
        elif evaluated_as(info.type) == "binary":
            res = binary_metrics(y, p, 0.5)
            values = {"auroc": res["auroc"], "auprc": res["auprc"]}
            headline = values["auroc"]
        elif evaluated_as(info.type) == "multiclass":
            res = multiclass_metrics(y, p, info.names)
            values = {"macro_auroc": res["macro_auroc"], "accuracy": res["accuracy"]}
            headline = values["macro_auroc"]
        else:
            res = regression_metrics(y, p)
            values = {"mae": res["mae"], "rmse": res["rmse"], "r2": res["r2"]}
            std = ensemble.config.task(info.name).target_std or 1.0
            headline = -res["mae"] / std
        for key, value in values.items():
            out[f"{info.name}/{key}"] = float(value)
        out[f"{info.name}/headline"] = float(headline)
        if math.isfinite(headline):
            headlines.append(headline)
    out["mean_headline"] = float(np.mean(headlines)) if headlines else math.nan
    return out


_LOWER_IS_BETTER = ("loss", "mae", "rmse")


def check_selection_metric(name: str, tasks: list[TaskInfo]) -> None:
    """Fail before training when ``optim.selection_metric`` names no validation metric."""
    known = ["mean_headline", "loss"]
    for info in tasks:
        known += [f"{info.name}/{m}" for m in (*task_type(info.type).headline_metrics, "headline")]
    if name not in known:
        raise ValueError(f"optim.selection_metric {name!r} is not a validation metric; known: {known}")


def selection_value(name: str, metrics: Mapping[str, float]) -> float | None:
    """The selection metric as a higher-is-better number (None when undefined this epoch)."""
    if name not in metrics:
        raise ValueError(
            f"optim.selection_metric {name!r} is not a validation metric; known: {sorted(metrics)}"
        )
    value = metrics[name]
    if value is None or not math.isfinite(value):
        return None
    return -value if name.split("/")[-1] in _LOWER_IS_BETTER else value


# ------------------------------------------------------------------------------------------- checkpoints


def _state_for_checkpoint(model: Ensemble, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Trainable parameters (or just ``names``) + buffers (e.g. batch-norm statistics of experts adapted with
    LoRA; with ``names``, only the buffers of the branches those parameters belong to)."""
    trainable = model.trainable_state_dict()
    if names is not None:
        trainable = {k: trainable[k] for k in names}
    state = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    prefixes = None if names is None else {".".join(n.split(".")[:2]) + "." for n in names}
    for key, value in model.named_buffers():
        if prefixes is None or any(key.startswith(p) for p in prefixes):
            state[_BUFFER_PREFIX + key] = value.detach().cpu().contiguous()
    return state


def _write_trainable(model: Ensemble, path: Path, names: Sequence[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_state_for_checkpoint(model, names), str(tmp))
    tmp.replace(path)


def _read_trainable(model: Ensemble, path: Path, *, partial: bool = False) -> None:
    """Load trainable weights + buffers written by :func:`_write_trainable`; strict unless ``partial`` (then every
    stored key must exist in the model, but the file may hold a subset)."""
    state = load_file(str(path))
    params = {k: v for k, v in state.items() if not k.startswith(_BUFFER_PREFIX)}
    buffers = {k[len(_BUFFER_PREFIX) :]: v for k, v in state.items() if k.startswith(_BUFFER_PREFIX)}
    own_params = dict(model.named_parameters())
    own_buffers = dict(model.named_buffers())
    if partial:
        unknown = sorted((set(params) - set(own_params)) | (set(buffers) - set(own_buffers)))
        if unknown:
            raise ValueError(f"{path}: keys {unknown[:5]} are not in the model")
        with torch.no_grad():
            for name, value in params.items():
                own_params[name].copy_(value)
            for name, value in buffers.items():
                own_buffers[name].copy_(value)
        return
    model.load_trainable_state_dict(params, source=str(path))
    if set(own_buffers) != set(buffers):
        raise ValueError(f"{path}: buffers {sorted(set(own_buffers) ^ set(buffers))[:5]} missing or unexpected")
    with torch.no_grad():
        for name, value in buffers.items():
            own_buffers[name].copy_(value)


def _save_trainable_hook(accelerator: Accelerator) -> Callable[..., None]:
    def hook(models: list[nn.Module], weights: list[dict[str, Tensor]], output_dir: str) -> None:
        # The frozen experts are re-loaded from their recorded revisions: a checkpoint keeps only what trains.
        if accelerator.is_main_process:
            for model in models:
                _write_trainable(accelerator.unwrap_model(model), Path(output_dir) / TRAINABLE_WEIGHTS_FILE)
        weights.clear()

    return hook


def _load_trainable_hook(accelerator: Accelerator) -> Callable[..., None]:
    def hook(models: list[nn.Module], input_dir: str) -> None:
        for model in models:
            _read_trainable(accelerator.unwrap_model(model), Path(input_dir) / TRAINABLE_WEIGHTS_FILE)
        models.clear()

    return hook


def _resume_point(resume: str, checkpoints: Path, accelerator: Accelerator) -> Path | None:
    if accelerator.is_main_process and checkpoints.is_dir():
        for leftover in checkpoints.glob(".tmp-*"):  # staging folders of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    if resume == "never":
        if accelerator.is_main_process and (checkpoints.exists() or (checkpoints.parent / BEST_DIR).exists()):
            # A fresh start: old checkpoints would collide with the new ones and confuse a later `auto`.
            if complete_checkpoints(checkpoints):
                logger.warning("output.resume=never: removing the previous checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints, ignore_errors=True)
            shutil.rmtree(checkpoints.parent / BEST_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()
        return None
    if resume == "auto":
        complete = complete_checkpoints(checkpoints)
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete enecg checkpoint (no {TRAINER_STATE_FILE})")
    if path.resolve().parent != checkpoints.resolve():
        # A checkpoint of another phase of the strategy: this phase resumes from its own newest one.
        complete = complete_checkpoints(checkpoints)
        return complete[-1] if complete else None
    return path


def latest_checkpoint(phase_dir: str | Path) -> Path | None:
    """The most recent complete checkpoint of a run (or phase) folder (what ``output.resume: auto`` resumes)."""
    complete = complete_checkpoints(Path(phase_dir) / CHECKPOINTS_DIR)
    return complete[-1] if complete else None


def _sum_over_processes(accelerator: Accelerator, local: DataWait) -> DataWait:
    """``local`` summed over every process (a collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return dataclasses.replace(local)
    values = torch.tensor(
        [local.wait, local.total, local.steps], dtype=torch.float64, device=accelerator.device
    )
    wait, total, steps = accelerator.reduce(values, "sum").cpu().tolist()
    return DataWait(wait, total, round(steps))


def _mean_over_processes(accelerator: Accelerator, total: float, count: float) -> float:
    """Record-weighted mean of a running sum over all processes (NaN when nothing counted)."""
    if accelerator.num_processes > 1:
        pair = accelerator.reduce(
            torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum"
        )
        total, count = float(pair[0]), float(pair[1])
    return total / count if count > 0 else math.nan
