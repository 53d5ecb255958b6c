"""The multi-task ensemble training loop (Accelerate), with evaluation, early stopping, checkpoints and resume.

:func:`train` runs every run of a recipe (hold-out, k-fold folds, repeats; see
:func:`enecg.training.data.plan_runs`). Each run builds everything afresh: experts are (re)loaded, a new
:class:`~enecg.ensemble.model.Ensemble` is initialised from the run's seed, and the run's test part is read only
once, at the end, by the selected model.

Per run:

1. **Features.** When the ensemble allows it (frozen experts), every expert embeds every record once through the
   feature cache (:mod:`enecg.training.feature_cache`), on the main process first; epochs then train heads, LoRA
   and gate from the embeddings (``from_embeddings=True``). Otherwise records are prepared per batch.
2. **Loop.** ``Accelerator(gradient_accumulation_steps, mixed_precision, log_with, project_dir)``; AdamW on the
   trainable parameters; a ``transformers`` schedule; gradient clipping; per-micro-batch seeding from
   ``(seed, process, step)`` so dropout does not depend on what touched the global RNG before (resume is exact).
3. **Each epoch**: validation metrics (per task headline: macro AUROC / AUROC / -MAE in target std units), the
   selection metric, best-model weights (``<run>/best/``), early stopping, tracker logs (losses per task,
   metrics, mean gate weights per expert), and a checkpoint.
4. **Checkpoints** (``<run>/checkpoints/checkpoint_NNNNN-step_SSSSSSS``): ``accelerator.save_state`` (optimizer,
   scheduler, RNG; the model part is replaced by the trainable weights + buffers, not the frozen experts) plus
   ``trainer_state.json`` (epoch, batches done in it, counters, best metric, history), every
   ``output.checkpoint_every_steps`` optimizer steps and at each epoch end. A checkpoint is written into a hidden
   folder and renamed when complete, so a killed run never leaves a half checkpoint that ``resume: auto`` would
   pick. Resuming mid-epoch replays the epoch's order and skips the batches done (``skip_first_batches``).
5. **End**: the best weights are loaded, validation and test are evaluated with
   :func:`enecg.evaluation.task_eval.evaluate_task` (thresholds from validation, patient-level bootstrap) into
   ``<run>/metrics.json``, and the model is saved with ``save_pretrained`` into ``<run>/model`` (main process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from enecg.data.schema import DatasetMeta, TaskInfo, write_text_atomic
from enecg.ensemble.config import EnsembleConfig, ExpertRef, TaskConfig
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.ensemble.model import Ensemble
from enecg.evaluation.metrics import (
    BootstrapConfig,
    OperatingPoint,
    binary_metrics,
    choose_thresholds,
    multiclass_metrics,
    multilabel_metrics,
    regression_metrics,
)
from enecg.evaluation.task_eval import evaluate_task
from enecg.experts.expert import load_expert
from enecg.training.data import (
    EpochShuffleSampler,
    IndexDataset,
    RecordBatches,
    RunPlan,
    load_training_dataset,
    plan_runs,
    regression_stats,
    select_part,
    step_seed,
)
from enecg.training.feature_cache import FeatureCache, FeatureTable, build_feature_table
from enecg.training.light_experts import create_light_expert, expert_exists
from enecg.training.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_WEIGHTS_FILE = "trainable_model.safetensors"
BEST_DIR = "best"
METRICS_FILE = "metrics.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)-step_(\d+)$")
_BUFFER_PREFIX = "buffer::"


# ------------------------------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """Outcome of one run (all processes return the same values)."""

    name: str
    run_dir: str
    seed: int
    fold: int | None
    epochs_completed: int
    global_step: int
    best_epoch: int | None
    best_metric: float | None
    selection_metric: str
    stopped_early: bool
    resumed_from: str | None
    validation: dict[str, float] = field(default_factory=dict)  # headline metrics of the selected model
    test: dict[str, float] = field(default_factory=dict)  # headline metrics on the test part
    evaluation: dict[str, Any] = field(default_factory=dict)  # full evaluate_task results (validation, test)
    history: list[dict[str, Any]] = field(default_factory=list)
    feature_cache: dict[str, Any] = field(default_factory=dict)
    model_dir: str | None = None
    validation_part: str | None = None  # dataset parts of this run (for reports on the saved model)
    test_part: str | None = None


@dataclass
class TrainResult:
    """Outcome of :func:`train`: one :class:`RunResult` per run and a summary over runs."""

    output_dir: str
    runs: list[RunResult]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> RunResult:
        """The only run (hold-out recipes without repeats)."""
        if len(self.runs) != 1:
            raise ValueError(f"{len(self.runs)} runs: use .runs")
        return self.runs[0]


@dataclass
class TrainerState:
    """Loop position and selection bookkeeping, saved with each checkpoint as JSON."""

    epoch: int = 0  # current epoch (epochs fully done when batches_done == 0)
    batches_done: int = 0  # micro-batches of `epoch` already trained
    global_step: int = 0  # optimizer steps
    micro_step: int = 0  # micro-batches overall (seeds dropout)
    save_index: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    running: dict[str, float] = field(default_factory=dict)  # sums for the epoch's training logs
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        """Read a checkpoint's ``trainer_state.json``; errors name the file."""
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{path}: unknown trainer-state keys {unknown} (written by another enecg version?)"
            )
        return cls(**data)


# ------------------------------------------------------------------------------------------------ entry point


def train(
    recipe: Recipe,
    *,
    accelerator_kwargs: Mapping[str, Any] | None = None,
    expert_loader: Callable[..., nn.Module] | None = None,
) -> TrainResult:
    """Run every run of ``recipe``; returns the results (the same on every process).

    Args:
        recipe: the parsed recipe.
        accelerator_kwargs: extra ``Accelerator(...)`` arguments (e.g. ``cpu=True`` inside
            ``accelerate.notebook_launcher``).
        expert_loader: replaces :func:`enecg.experts.expert.load_expert` (tests count or wrap expert calls).
    """
    output_dir = Path(recipe.output.dir)
    accelerator = make_accelerator(recipe, accelerator_kwargs)
    with accelerator.main_process_first():  # the main process builds the dataset when it is missing
        dataset, meta = load_training_dataset(recipe.data)
    runs = plan_runs(recipe, meta)
    results = []
    for run in runs:
        results.append(_train_run(recipe, run, accelerator, dataset, meta, expert_loader or load_expert))
    summary = _summarise(results)
    if accelerator.is_main_process:
        write_text_atomic(
            output_dir / "summary.json",
            json.dumps(
                {"runs": [r.name or "hold-out" for r in results], **summary}, indent=2, sort_keys=True
            ),
        )
        write_text_atomic(output_dir / "recipe.yaml", recipe.to_yaml())
    accelerator.wait_for_everyone()
    return TrainResult(str(output_dir), results, summary)


def make_accelerator(recipe: Recipe, extra: Mapping[str, Any] | None = None) -> Accelerator:
    """The run's Accelerator: accumulation, precision (recipe or launcher), trackers, project folder."""
    output_dir = Path(recipe.output.dir)
    kwargs: dict[str, Any] = {
        "gradient_accumulation_steps": recipe.optim.gradient_accumulation_steps,
        "log_with": list(recipe.tracking.log_with) or None,
        "project_config": ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # With sparse top-k routing, unrouted experts' heads get no gradient in a step.
        "kwargs_handlers": [
            DistributedDataParallelKwargs(find_unused_parameters=recipe.model.gate.top_k is not None)
        ],
    }
    if recipe.optim.mixed_precision is not None:
        kwargs["mixed_precision"] = recipe.optim.mixed_precision
    kwargs.update(extra or {})
    return Accelerator(**kwargs)


# ------------------------------------------------------------------------------------------------- one run


def _train_run(
    recipe: Recipe,
    run: RunPlan,
    accelerator: Accelerator,
    dataset: Any,
    meta: DatasetMeta,
    expert_loader: Callable[..., nn.Module],
) -> RunResult:
    run_dir = Path(recipe.output.dir) / run.name if run.name else Path(recipe.output.dir)
    set_seed(run.seed)
    task_infos = [_task_info(meta, t.name, recipe.data.path) for t in recipe.tasks]
    _check_selection_metric(recipe.optim.selection_metric, task_infos)
    limit = recipe.data.max_records
    train_part = select_part(dataset, run.train_parts, limit)
    val_part = select_part(dataset, [run.validation_part], limit)
    test_part = select_part(dataset, [run.test_part], limit) if run.test_part else None

    experts = _load_experts(recipe, run, accelerator, train_part, meta.tasks, expert_loader)
    ensemble = Ensemble(_ensemble_config(recipe, run, experts, task_infos, train_part), experts)
    fingerprints = _expert_fingerprints(ensemble)

    use_cache = _use_feature_cache(recipe, ensemble)
    cache_stats: dict[str, Any] = {"enabled": use_cache}
    if use_cache:
        cache = FeatureCache(recipe.data.cache_dir or Path(recipe.output.dir) / "feature_cache")
        cache_stats["dir"] = str(cache.root)
        tables: dict[str, FeatureTable] = {}
        with accelerator.main_process_first():
            for label, part in (("train", train_part), ("validation", val_part), ("test", test_part)):
                if part is not None:
                    tables[label] = build_feature_table(
                        ensemble, part, task_infos, cache, batch_size=recipe.optim.eval_batch_size
                    )
        cache_stats["computed"] = {k: t.computed for k, t in tables.items()}
        cache_stats["reused"] = {k: t.reused for k, t in tables.items()}
        collates: dict[str, Any] = dict(tables)
        workers = 0  # batches are tensor slices: no worker processes needed
    else:
        builder = EnsembleInputBuilder.for_ensemble(ensemble)
        collates = {
            label: RecordBatches(part, builder, task_infos)
            for label, part in (("train", train_part), ("validation", val_part), ("test", test_part))
            if part is not None
        }
        workers = recipe.data.num_workers

    optim = recipe.optim
    sampler = EpochShuffleSampler(len(train_part), run.seed)
    train_loader = DataLoader(
        IndexDataset(len(train_part)),
        batch_sampler=BatchSampler(sampler, optim.batch_size, drop_last=False),
        collate_fn=collates["train"],
        num_workers=workers,
    )
    eval_loaders = {
        label: DataLoader(
            IndexDataset(len(collates[label])),
            batch_size=optim.eval_batch_size,
            shuffle=False,
            collate_fn=collates[label],
            num_workers=workers,
        )
        for label in collates
        if label != "train"
    }
    parameters = [p for p in ensemble.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(ensemble, optimizer, train_loader)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    steps_per_epoch = math.ceil(len(train_loader) / optim.gradient_accumulation_steps)
    total_steps = steps_per_epoch * optim.epochs
    if optim.max_steps is not None:
        total_steps = min(total_steps, optim.max_steps)
    from transformers import get_scheduler

    # Accelerate steps a prepared scheduler once per process per optimizer step (see AcceleratedScheduler).
    scheduler = accelerator.prepare(
        get_scheduler(
            optim.lr_scheduler,
            optimizer,
            num_warmup_steps=optim.warmup_steps * accelerator.num_processes,
            num_training_steps=total_steps * accelerator.num_processes,
        )
    )
    unwrapped: Ensemble = accelerator.unwrap_model(model)
    hooks = [
        accelerator.register_save_state_pre_hook(_save_trainable_hook(accelerator)),
        accelerator.register_load_state_pre_hook(_load_trainable_hook(accelerator)),
    ]
    tracker_name = recipe.tracking.project_name + (f"/{run.name}" if run.name else "")
    if recipe.tracking.log_with:
        accelerator.init_trackers(tracker_name, config=recipe.flat())

    checkpoints = run_dir / CHECKPOINTS_DIR
    state = TrainerState()
    resumed_from = _resume_point(recipe.output.resume, checkpoints, accelerator)
    if resumed_from is not None:
        accelerator.load_state(str(resumed_from))
        state = TrainerState.load(resumed_from / TRAINER_STATE_FILE)
        logger.info("resumed from %s (epoch %d, step %d)", resumed_from, state.epoch, state.global_step)

    loop = _Loop(
        recipe,
        run,
        accelerator,
        model,
        unwrapped,
        optimizer,
        scheduler,
        train_loader,
        sampler,
        eval_loaders.get("validation"),
        use_cache,
        run_dir,
        state,
        total_steps,
        task_infos,
    )
    try:
        loop.run()
        final = _final_evaluation(loop, eval_loaders, collates, run_dir)
    finally:
        for handle in hooks:
            handle.remove()
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []

    _check_experts_untouched(ensemble, fingerprints)
    unwrapped.decision_thresholds = final["thresholds"]
    if recipe.output.save_model and accelerator.is_main_process:
        _save_model(unwrapped, run_dir / "model")
    accelerator.wait_for_everyone()
    model_dir = run_dir / "model" if recipe.output.save_model and (run_dir / "model").is_dir() else None
    accelerator.free_memory()  # forget this run's model/optimizer/loaders before the next run
    state = loop.state
    return RunResult(
        name=run.name,
        run_dir=str(run_dir),
        seed=run.seed,
        fold=run.fold,
        epochs_completed=state.epoch,
        global_step=state.global_step,
        best_epoch=state.best_epoch,
        best_metric=state.best_metric,
        selection_metric=recipe.optim.selection_metric,
        stopped_early=state.stopped_early,
        resumed_from=str(resumed_from) if resumed_from else None,
        validation=final["validation_headline"],
        test=final.get("test_headline", {}),
        evaluation=final["evaluation"],
        history=list(state.history),
        feature_cache=cache_stats,
        model_dir=str(model_dir) if model_dir else None,
        validation_part=run.validation_part,
        test_part=run.test_part,
    )


class _Loop:
    """The epoch/step loop of one run (state in :class:`TrainerState`)."""

    def __init__(
        self,
        recipe: Recipe,
        run: RunPlan,
        accelerator: Accelerator,
        model: nn.Module,
        unwrapped: Ensemble,
        optimizer: Any,
        scheduler: Any,
        train_loader: DataLoader,
        sampler: EpochShuffleSampler,
        val_loader: DataLoader | None,
        from_embeddings: bool,
        run_dir: Path,
        state: TrainerState,
        total_steps: int,
        task_infos: list[TaskInfo],
    ) -> None:
        self.recipe, self.run_plan, self.accelerator = recipe, run, accelerator
        self.model, self.unwrapped, self.optimizer, self.scheduler = model, unwrapped, optimizer, scheduler
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.from_embeddings = from_embeddings
        self.run_dir, self.state, self.total_steps, self.task_infos = run_dir, state, total_steps, task_infos
        self.params = [p for p in unwrapped.parameters() if p.requires_grad]

    def run(self) -> None:
        recipe, state, accelerator = self.recipe, self.state, self.accelerator
        optim = recipe.optim
        bar = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            desc=f"train {self.run_plan.name}".strip(),
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        try:
            # Re-evaluated on resume, so a finished run resumed with more epochs or steps continues.
            while not state.stopped_early and state.epoch < optim.epochs and not self._reached_max_steps():
                self._train_epoch(bar)
                # An epoch cut short by max_steps still ends with validation and a checkpoint.
                state.epoch += 1
                state.batches_done = 0
                self._end_of_epoch()
                self._checkpoint()
        finally:
            bar.close()

    def _reached_max_steps(self) -> bool:
        max_steps = self.recipe.optim.max_steps
        return max_steps is not None and self.state.global_step >= max_steps

    def _train_epoch(self, bar: tqdm) -> None:
        state, accelerator, optim = self.state, self.accelerator, self.recipe.optim
        loader = (
            accelerator.skip_first_batches(self.train_loader, state.batches_done)
            if state.batches_done
            else self.train_loader
        )
        # On the loader actually iterated: Accelerate re-applies its own pass counter to the sampler when an
        # iteration starts, and the loader skip_first_batches returns counts from 0.
        loader.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch)
        self.model.train()
        every = self.recipe.output.checkpoint_every_steps
        for batch in loader:
            torch.manual_seed(step_seed(self.run_plan.seed, accelerator.process_index, state.micro_step))
            with accelerator.accumulate(self.model):
                output = self.model(
                    batch["expert_inputs"],
                    batch.get("gate_input"),
                    batch["demographics"],
                    from_embeddings=self.from_embeddings,
                )
                loss, parts = self.unwrapped.compute_loss(output, batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(self.params, optim.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            state.micro_step += 1
            state.batches_done += 1
            self._accumulate_logs(loss, parts, output, len(batch["index"]))
            if accelerator.sync_gradients:
                state.global_step += 1
                bar.update(1)
                if state.global_step % self.recipe.tracking.log_every_steps == 0:
                    logs = {
                        "train/step_loss": float(loss.detach()),
                        "train/lr": self.scheduler.get_last_lr()[0],
                    }
                    logs |= {f"train/step_{k}": float(v) for k, v in parts.items()}
                    accelerator.log(logs, step=state.global_step)
                if self._reached_max_steps():
                    return
                # (the epoch's last step is checkpointed after validation, at the epoch's end)
                end_of_epoch = accelerator.gradient_state.end_of_dataloader
                if every is not None and state.global_step % every == 0 and not end_of_epoch:
                    self._checkpoint()

    def _accumulate_logs(self, loss: Tensor, parts: Mapping[str, Tensor], output: Any, size: int) -> None:
        running = self.state.running
        values = {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}
        per_task = self.recipe.model.gate.per_task
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

    def _end_of_epoch(self) -> None:
        state, accelerator = self.state, self.accelerator
        logs: dict[str, Any] = {"epoch": state.epoch, "global_step": state.global_step}
        # Per-process running means, averaged over processes.
        for key in sorted(k for k in state.running if not k.startswith("n::")):
            prefix = "" if key.startswith("gate_weight/") else "train/"
            logs[prefix + key] = _mean_over_processes(
                accelerator, state.running[key], state.running[f"n::{key}"]
            )
        state.running = {}
        if self.val_loader is not None:
            evaluation = evaluate_loader(self, self.val_loader)
            headline = headline_metrics(evaluation, self.task_infos, self.unwrapped)
            logs |= {f"val/{k}": v for k, v in headline.items()}
            for expert, weight in evaluation["gate"].items():
                logs[f"val/gate_weight/{expert}"] = weight
            metric = selection_value(self.recipe.optim.selection_metric, headline)
            logs["val/selection"] = metric
            improved = metric is not None and (state.best_metric is None or metric > state.best_metric)
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
                self._save_best()
            else:
                state.bad_epochs += 1
                patience = self.recipe.optim.early_stopping_patience
                if patience is not None and state.bad_epochs >= patience:
                    state.stopped_early = True
                    logger.info(
                        "early stopping after epoch %d (best epoch %s)", state.epoch, state.best_epoch
                    )
        state.history.append(logs)
        accelerator.log(
            {k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=state.global_step
        )

    def _save_best(self) -> None:
        if self.accelerator.is_main_process:
            _write_trainable(self.unwrapped, self.run_dir / BEST_DIR / TRAINABLE_WEIGHTS_FILE)
            write_text_atomic(
                self.run_dir / BEST_DIR / "best.json",
                json.dumps(
                    {
                        "epoch": self.state.best_epoch,
                        "metric": self.state.best_metric,
                        "selection_metric": self.recipe.optim.selection_metric,
                    },
                    indent=2,
                ),
            )
        self.accelerator.wait_for_everyone()

    def _checkpoint(self) -> None:
        accelerator, state = self.accelerator, self.state
        state.save_index += 1
        checkpoints = self.run_dir / CHECKPOINTS_DIR
        name = f"checkpoint_{state.save_index:05d}-step_{state.global_step:07d}"
        staging = checkpoints / f".tmp-{name}"
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_text_atomic(staging / TRAINER_STATE_FILE, state.to_json())
            target = checkpoints / name
            if target.exists():  # only after a crash between two saves of the same index
                shutil.rmtree(target)
            staging.rename(target)  # complete checkpoints appear atomically
            for old in _complete_checkpoints(checkpoints)[: -self.recipe.output.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_loader(loop: _Loop, loader: DataLoader) -> dict[str, Any]:
    """Predictions, labels and row indices of a prepared evaluation loader, gathered over processes."""
    accelerator, model = loop.accelerator, loop.model
    model.eval()
    preds: dict[str, list[Tensor]] = {}
    labels: dict[str, list[Tensor]] = {}
    indices: list[Tensor] = []
    gate_sums: dict[str, Tensor] = {}
    loss_sum, count = 0.0, 0
    for batch in loader:
        output = model(
            batch["expert_inputs"],
            batch.get("gate_input"),
            batch["demographics"],
            from_embeddings=loop.from_embeddings,
        )
        loss, _ = loop.unwrapped.compute_loss(output, batch["labels"])
        size = len(batch["index"])
        if math.isfinite(float(loss)):
            loss_sum += float(loss) * size
            count += size
        for task, weights in output.gate_weights.items():
            total = weights.detach().float().sum(0)
            gate_sums[task] = gate_sums[task] + total if task in gate_sums else total
        gathered = accelerator.gather_for_metrics(
            {"index": batch["index"], "predictions": output.predictions, "labels": batch["labels"]}
        )
        indices.append(gathered["index"].cpu())
        for task, value in gathered["predictions"].items():
            preds.setdefault(task, []).append(value.float().cpu())
        for task, value in gathered["labels"].items():
            labels.setdefault(task, []).append(value.float().cpu())
    model.train()
    totals = accelerator.reduce(torch.tensor([loss_sum, float(count)], device=accelerator.device), "sum")
    # Mean gate weight per expert (per task and expert with a per-task gate).
    gate_weights = {}
    per_task = loop.recipe.model.gate.per_task
    for t_index, (task, sums) in enumerate(gate_sums.items()):
        if t_index > 0 and not per_task:
            break
        sums = accelerator.reduce(sums.to(accelerator.device), "sum")
        for e, expert in enumerate(loop.unwrapped.expert_names):
            gate_weights[f"{task}/{expert}" if per_task else expert] = float(sums[e] / sums.sum())
    return {
        "index": torch.cat(indices).numpy(),
        "predictions": {k: torch.cat(v).numpy() for k, v in preds.items()},
        "labels": {k: torch.cat(v).numpy() for k, v in labels.items()},
        "loss": float(totals[0] / totals[1].clamp(min=1)),
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
        if info.type == "multilabel":
            res = multilabel_metrics(y, p, np.full(y.shape[1], 0.5), info.names)
            values = {"macro_auroc": res["macro"]["auroc"], "macro_auprc": res["macro"]["auprc"]}
            headline = values["macro_auroc"]
        elif info.type == "binary":
            res = binary_metrics(y, p, 0.5)
            values = {"auroc": res["auroc"], "auprc": res["auprc"]}
            headline = values["auroc"]
        elif info.type == "multiclass":
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
_TASK_METRICS = {
    "multilabel": ("macro_auroc", "macro_auprc"),
    "binary": ("auroc", "auprc"),
    "multiclass": ("macro_auroc", "accuracy"),
    "regression": ("mae", "rmse", "r2"),
}


def _check_selection_metric(name: str, tasks: list[TaskInfo]) -> None:
    """Fail before training when ``optim.selection_metric`` names no validation metric."""
    known = ["mean_headline", "loss"]
    for info in tasks:
        known += [f"{info.name}/{m}" for m in (*_TASK_METRICS[info.type], "headline")]
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


def _final_evaluation(
    loop: _Loop, loaders: Mapping[str, DataLoader], collates: Mapping[str, Any], run_dir: Path
) -> dict[str, Any]:
    """Load the best weights; evaluate validation and test (thresholds fitted on validation)."""
    accelerator, recipe = loop.accelerator, loop.recipe
    best = run_dir / BEST_DIR / TRAINABLE_WEIGHTS_FILE
    if best.is_file():
        _read_trainable(loop.unwrapped, best)
    results: dict[str, Any] = {}
    headline: dict[str, dict[str, float]] = {}
    evaluations = {label: evaluate_loader(loop, loader) for label, loader in loaders.items()}
    val = evaluations.get("validation")
    operating = OperatingPoint(recipe.evaluation.operating_point, recipe.evaluation.target_sensitivity)
    bootstrap = BootstrapConfig(n_resamples=recipe.evaluation.bootstrap_resamples, seed=loop.run_plan.seed)
    for label, evaluation in evaluations.items():
        headline[label] = headline_metrics(evaluation, loop.task_infos, loop.unwrapped)
        groups = _patients(collates[label], evaluation["index"])
        per_task = {}
        for info in loop.task_infos:
            fit = val if (label != "validation" and val is not None) else None
            per_task[info.name] = evaluate_task(
                info.type,
                loop.unwrapped.config.task(info.name).label_names or [info.name],
                evaluation["labels"][info.name],
                evaluation["predictions"][info.name],
                val_true=None if fit is None else fit["labels"][info.name],
                val_pred=None if fit is None else fit["predictions"][info.name],
                test_groups=groups,
                operating_point=operating,
                bootstrap=bootstrap,
            )
        results[label] = {
            "headline": headline[label],
            "tasks": per_task,
            "n_records": len(evaluation["index"]),
        }
    document = {
        "run": loop.run_plan.name or "hold-out",
        "seed": loop.run_plan.seed,
        "parts": {
            "train": loop.run_plan.train_parts,
            "validation": loop.run_plan.validation_part,
            "test": loop.run_plan.test_part,
        },
        "best_epoch": loop.state.best_epoch,
        "selection_metric": recipe.optim.selection_metric,
        "best_metric": loop.state.best_metric,
        **results,
    }
    if accelerator.is_main_process:
        write_text_atomic(run_dir / METRICS_FILE, json.dumps(document, indent=2, sort_keys=True, default=str))
    accelerator.wait_for_everyone()
    out = {
        "evaluation": results,
        "validation_headline": headline.get("validation", {}),
        "thresholds": _validation_thresholds(loop, val, operating),
    }
    if "test" in headline:
        out["test_headline"] = headline["test"]
    return out


def _validation_thresholds(
    loop: _Loop, val: Mapping[str, Any] | None, operating: OperatingPoint
) -> dict[str, dict[str, float]]:
    """Decision thresholds per binary/multilabel task and label, chosen on validation (saved with the model)."""
    if val is None:
        return {}
    out = {}
    for info in loop.task_infos:
        if info.type not in ("binary", "multilabel"):
            continue
        labels = loop.unwrapped.config.task(info.name).label_names or [info.name]
        values = choose_thresholds(val["labels"][info.name], val["predictions"][info.name], operating)
        out[info.name] = {label: float(np.clip(v, 0.0, 1.0)) for label, v in zip(labels, values)}
    return out


def _patients(collate: Any, index: np.ndarray) -> list[str]:
    if isinstance(collate, FeatureTable):
        ids = collate.patient_ids
    else:
        ids = list(collate.part["patient_id"])
    return [str(ids[i]) for i in index]


# ------------------------------------------------------------------------------------------ experts, config


def _task_info(meta: DatasetMeta, name: str, path: str) -> TaskInfo:
    try:
        return meta.task(name)
    except KeyError:
        raise ValueError(
            f"{path}: dataset has no task {name!r}; its tasks: {[t.name for t in meta.tasks]}"
        ) from None


def _load_experts(
    recipe: Recipe,
    run: RunPlan,
    accelerator: Accelerator,
    train_part: Any,
    tasks: list[TaskInfo],
    loader: Callable[..., nn.Module],
) -> dict[str, nn.Module]:
    """Load (creating in-house light experts first where asked) every expert, freshly, for this run."""
    experts = {}
    for index, entry in enumerate(recipe.experts):
        source: str | Path = entry.source
        if entry.create is not None:
            folder = Path(entry.source)
            if run.fold is not None:
                folder = folder / f"fold_{run.fold}"  # pretrained on this fold's training parts only
            with accelerator.main_process_first():
                if accelerator.is_main_process and not expert_exists(folder):
                    if folder.exists() and any(folder.iterdir()):
                        raise ValueError(
                            f"{folder}: exists but holds no complete expert; remove it to rebuild"
                        )
                    create_light_expert(
                        entry.create,
                        folder,
                        name=entry.name,
                        train_part=train_part,
                        tasks=tasks,
                        seed=recipe.optim.seed + 7 * index + 1000 * (run.fold or 0),
                    )
            source = folder
        experts[entry.name] = loader(source, revision=entry.revision, spec=entry.spec)
    return experts


def _ensemble_config(
    recipe: Recipe,
    run: RunPlan,
    experts: Mapping[str, nn.Module],
    task_infos: list[TaskInfo],
    train_part: Any,
) -> EnsembleConfig:
    refs = []
    for entry in recipe.experts:
        expert = experts[entry.name]
        hub_id = getattr(expert, "hub_id", None)
        spec = getattr(expert, "spec", None)
        refs.append(
            ExpertRef(
                name=entry.name,
                hub_id=hub_id or _local_source(entry.source, run, created=entry.create is not None),
                embedding_dim=int(expert.embedding_dim),
                revision=getattr(expert, "revision", None),
                spec=spec.to_dict() if spec is not None and hasattr(spec, "to_dict") else None,
                lora_target_modules=list(getattr(expert, "lora_target_modules", []) or []),
            )
        )
    tasks = []
    for section, info in zip(recipe.tasks, task_infos):
        extra: dict[str, Any] = {"loss_weight": section.loss_weight}
        if info.type == "regression":
            extra |= {"regression_loss": section.regression_loss, "huber_delta": section.huber_delta}
            if section.normalize_target:
                mean, std = regression_stats(train_part, info.name)
                extra |= {"target_mean": mean, "target_std": std}
        tasks.append(TaskConfig.from_task_info(info, **extra))
    model = recipe.model
    return EnsembleConfig(
        experts=refs,
        tasks=tasks,
        heads=model.heads,
        lora=model.lora,
        gate=model.gate,
        task_weighting=model.task_weighting,
        seed=run.seed,
    )


def _local_source(source: str, run: RunPlan, *, created: bool) -> str:
    """The expert's source as recorded in the ensemble config: an absolute folder path for local experts."""
    path = Path(source) / f"fold_{run.fold}" if created and run.fold is not None else Path(source)
    return str(path.resolve()) if path.exists() else source


def _use_feature_cache(recipe: Recipe, ensemble: Ensemble) -> bool:
    mode = recipe.data.feature_cache
    if mode == "off":
        return False
    if not ensemble.supports_cached_embeddings:
        if mode == "on":
            raise ValueError(
                "data.feature_cache='on' but model.lora.on_experts adapts the experts' own layers: their "
                "embeddings change during training and cannot be cached (use 'auto' or 'off')"
            )
        logger.info("feature cache disabled: LoRA adapts the experts' own layers")
        return False
    return True


def _expert_fingerprints(ensemble: Ensemble) -> dict[str, str]:
    """Hashes of each frozen expert's weights (checked after training: a run must never change them)."""
    if ensemble.config.lora.on_experts:
        return {}
    out = {}
    for name in ensemble.expert_names:
        digest = hashlib.sha256()
        for key, tensor in sorted(ensemble.branch(name).expert.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        out[name] = digest.hexdigest()
    return out


def _check_experts_untouched(ensemble: Ensemble, before: Mapping[str, str]) -> None:
    after = _expert_fingerprints(ensemble)
    changed = sorted(name for name in before if after.get(name) != before[name])
    if changed:
        raise RuntimeError(f"frozen experts {changed} changed during training (weights or buffers)")


# ------------------------------------------------------------------------------------------- checkpoints


def _state_for_checkpoint(model: Ensemble) -> dict[str, Tensor]:
    """Trainable parameters + every buffer (e.g. batch-norm statistics of experts adapted with LoRA)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    state |= {_BUFFER_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.named_buffers()}
    return state


def _write_trainable(model: Ensemble, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_state_for_checkpoint(model), str(tmp))
    tmp.replace(path)


def _read_trainable(model: Ensemble, path: Path) -> None:
    state = load_file(str(path))
    params = {k: v for k, v in state.items() if not k.startswith(_BUFFER_PREFIX)}
    buffers = {k[len(_BUFFER_PREFIX) :]: v for k, v in state.items() if k.startswith(_BUFFER_PREFIX)}
    model.load_trainable_state_dict(params, source=str(path))
    own = dict(model.named_buffers())
    if set(own) != set(buffers):
        raise ValueError(f"{path}: buffers {sorted(set(own) ^ set(buffers))[:5]} missing or unexpected")
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)


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


def _complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (renamed from staging, with a trainer state), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _resume_point(resume: str, checkpoints: Path, accelerator: Accelerator) -> Path | None:
    if accelerator.is_main_process and checkpoints.is_dir():
        for leftover in checkpoints.glob(".tmp-*"):  # staging folders of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    if resume == "never":
        if accelerator.is_main_process and _complete_checkpoints(checkpoints):
            # A fresh start: old checkpoints would collide with the new ones and confuse a later `auto`.
            logger.warning("output.resume=never: removing the previous checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints, ignore_errors=True)
            shutil.rmtree(checkpoints.parent / BEST_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()
        return None
    if resume == "auto":
        complete = _complete_checkpoints(checkpoints)
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete enecg checkpoint (no {TRAINER_STATE_FILE})")
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recent complete checkpoint of a run folder (what ``output.resume: auto`` resumes from)."""
    complete = _complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)
    return complete[-1] if complete else None


def _save_model(model: Ensemble, directory: Path) -> Path | None:
    try:
        from enecg.ensemble.serialization import save_pretrained
    except ImportError:
        logger.warning(
            "enecg.ensemble.serialization is not available: the model was not saved to %s", directory
        )
        return None
    save_pretrained(model, directory)
    return directory


# ----------------------------------------------------------------------------------------------- helpers


def _mean_over_processes(accelerator: Accelerator, total: float, count: float) -> float:
    """Record-weighted mean of a running sum over all processes (NaN when nothing counted)."""
    if accelerator.num_processes > 1:
        pair = accelerator.reduce(
            torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum"
        )
        total, count = float(pair[0]), float(pair[1])
    return total / count if count > 0 else math.nan


def _summarise(results: list[RunResult]) -> dict[str, Any]:
    """Mean and standard deviation of each test (else validation) headline metric over runs."""
    table: dict[str, list[float]] = {}
    for result in results:
        for key, value in (result.test or result.validation).items():
            if value is not None and math.isfinite(value):
                table.setdefault(key, []).append(value)
    return {
        "split": "test" if all(r.test for r in results) else "validation",
        "metrics": {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
            for k, v in sorted(table.items())
        },
    }
