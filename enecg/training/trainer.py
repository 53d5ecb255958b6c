"""Training an ensemble from a recipe (Accelerate): runs, data, experts, a training strategy, evaluation, saving.

:func:`train` runs every run of a recipe (hold-out, k-fold folds, repeats; see
:func:`enecg.training.data.plan_runs`). Each run builds everything afresh: experts are (re)loaded, a new
:class:`~enecg.ensemble.model.Ensemble` is initialised from the run's seed, and the run's test part is read only
once, at the end, by the selected model.

Per run:

1. **Features.** When the ensemble allows it (frozen experts), every expert embeds every record once through the
   feature cache (:mod:`enecg.ensemble.feature_cache`), on the main process first; training then reads
   embeddings (``from_embeddings=True``). Otherwise records are prepared per batch. ``data.num_workers``
   DataLoader workers apply the contracts in both cases (cache fill, uncached batches).
2. **Strategy.** The recipe's training strategy (``model.strategy``, :mod:`enecg.training.strategies`: ``joint``
   or ``staged``) trains heads, LoRA and gate as one or more phases (:mod:`enecg.training.loop`: optimizer,
   schedule, validation-based selection, early stopping, checkpoints and exact resume per phase).
3. **End**: validation and test are evaluated with :func:`enecg.evaluation.task_eval.evaluate_task` (thresholds
   from validation, patient-level bootstrap) into ``<run>/metrics.json``, and the model is saved with
   ``save_pretrained`` into ``<run>/model`` (main process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn

from enecg.data.pool import pool_training_part
from enecg.data.schema import DatasetMeta, TaskInfo
from enecg.ensemble.config import EnsembleConfig, TaskConfig
from enecg.ensemble.factory import expert_ref
from enecg.ensemble.feature_cache import (
    FeatureCache,
    FeatureTable,
    build_feature_table,
    computed_over_processes,
    fill_for_ensemble,
)
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.ensemble.model import Ensemble
from enecg.ensemble.tasks import evaluated_as, task_type
from enecg.evaluation.metrics import BootstrapConfig, OperatingPoint, choose_thresholds
from enecg.evaluation.task_eval import evaluate_task
from enecg.experts.expert import load_expert
from enecg.training.data import (
    RecordBatches,
    RunPlan,
    load_training_dataset,
    plan_runs,
    regression_stats,
    select_part,
)
from enecg.training.light_experts import create_light_expert, expert_exists
from enecg.training.loop import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    TRAINABLE_WEIGHTS_FILE,
    TRAINER_STATE_FILE,
    DataWait,
    RunContext,
    TrainerCallback,
    check_selection_metric,
    eval_loader,
    evaluate_loader,
    headline_metrics,
    latest_checkpoint,
)
from enecg.training.recipe import Recipe
from enecg.training.strategies import StrategyResult, get_strategy
from enecg.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
__all__ = [
    "BEST_DIR",
    "CHECKPOINTS_DIR",
    "METRICS_FILE",
    "TRAINABLE_WEIGHTS_FILE",
    "TRAINER_STATE_FILE",
    "RunResult",
    "TrainResult",
    "headline_metrics",
    "latest_checkpoint",
    "make_accelerator",
    "train",
]


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
    strategy: dict[str, Any] = field(default_factory=dict)  # name, final phase, every phase's summary
    data_wait: dict[str, Any] = field(default_factory=dict)  # of the training steps, all phases (DataWait)


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


# ------------------------------------------------------------------------------------------------ entry point


def train(
    recipe: Recipe,
    *,
    accelerator_kwargs: Mapping[str, Any] | None = None,
    expert_loader: Callable[..., nn.Module] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run every run of ``recipe``; returns the results (the same on every process).

    Args:
        recipe: the parsed recipe.
        accelerator_kwargs: extra ``Accelerator(...)`` arguments (e.g. ``cpu=True`` inside
            ``accelerate.notebook_launcher``).
        expert_loader: replaces :func:`enecg.experts.expert.load_expert` (tests count or wrap expert calls).
        callbacks: :class:`~enecg.training.loop.TrainerCallback` hooks (tests, benchmarks, custom logging).
    """
    if recipe.data.synthetic is not None:
        # Sampling needs enecg.generative (a layer beside this one): enecg train materialises the records first.
        raise ValueError(
            "data.synthetic: generate the records first (enecg train does; from Python: "
            "enecg.generative.augment.materialize_synthetic(recipe))"
        )
    output_dir = Path(recipe.output.dir)
    get_strategy(recipe.model.strategy)  # an unknown strategy fails before any work
    accelerator = make_accelerator(recipe, accelerator_kwargs)
    with accelerator.main_process_first():  # the main process builds the dataset when it is missing
        dataset, meta = load_training_dataset(recipe.data)
    runs = plan_runs(recipe, meta)
    results = []
    for run in runs:
        results.append(
            _train_run(recipe, run, accelerator, dataset, meta, expert_loader or load_expert, list(callbacks))
        )
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
    callbacks: list[TrainerCallback],
) -> RunResult:
    run_dir = Path(recipe.output.dir) / run.name if run.name else Path(recipe.output.dir)
    set_seed(run.seed)
    task_infos = [_task_info(meta, t.name, recipe.data.path) for t in recipe.tasks]
    check_selection_metric(recipe.optim.selection_metric, task_infos)
    strategy = get_strategy(recipe.model.strategy)
    limit = recipe.data.max_records
    train_part = pool_training_part(
        select_part(dataset, run.train_parts, limit), recipe.data.extra_train, task_infos, limit
    )
    val_part = select_part(dataset, [run.validation_part], limit)
    test_part = select_part(dataset, [run.test_part], limit) if run.test_part else None

    experts = _load_experts(recipe, run, accelerator, train_part, meta.tasks, expert_loader)
    ensemble = Ensemble(_ensemble_config(recipe, run, experts, task_infos, train_part), experts)
    strategy.check(ensemble)
    fingerprints = _expert_fingerprints(ensemble)
    ensemble.to(accelerator.device)

    use_cache = _use_feature_cache(recipe, ensemble)
    cache_stats: dict[str, Any] = {"enabled": use_cache}
    parts = (("train", train_part), ("validation", val_part), ("test", test_part))
    if use_cache:
        cache = FeatureCache(recipe.data.cache_dir or Path(recipe.output.dir) / "feature_cache")
        cache_stats["dir"] = str(cache.root)
        tables: dict[str, FeatureTable] = {}
        present = [(label, part) for label, part in parts if part is not None]
        # Every process embeds its own share of the records into the cache; then all read the whole tables.
        filled = {
            label: fill_for_ensemble(
                ensemble,
                part,
                cache,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                batch_size=recipe.optim.eval_batch_size,
                num_workers=recipe.data.num_workers,
            )
            for label, part in present
        }
        accelerator.wait_for_everyone()
        for label, part in present:
            tables[label] = build_feature_table(
                ensemble, part, task_infos, cache, batch_size=recipe.optim.eval_batch_size
            )
        cache_stats["computed"] = computed_over_processes(filled, accelerator.device)
        cache_stats["reused"] = {
            label: {name: len(tables[label]) - count for name, count in per_expert.items()}
            for label, per_expert in cache_stats["computed"].items()
        }
        collates: dict[str, Any] = dict(tables)
        workers = 0  # batches are tensor slices: no worker processes needed
    else:
        builder = EnsembleInputBuilder.for_ensemble(ensemble)
        collates = {
            label: RecordBatches(part, builder, task_infos) for label, part in parts if part is not None
        }
        workers = recipe.data.num_workers

    tracker_name = recipe.tracking.project_name + (f"/{run.name}" if run.name else "")
    if recipe.tracking.log_with:
        accelerator.init_trackers(tracker_name, config=recipe.flat())
    ctx = RunContext(
        recipe=recipe,
        run=run,
        accelerator=accelerator,
        ensemble=ensemble,
        collates=collates,
        from_embeddings=use_cache,
        num_workers=workers,
        run_dir=run_dir,
        task_infos=task_infos,
        callbacks=callbacks,
    )
    try:
        fitted = strategy.fit(ctx)
        final = _final_evaluation(ctx, fitted)
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []

    _check_experts_untouched(ensemble, fingerprints)
    ensemble.decision_thresholds = final["thresholds"]
    if recipe.output.save_model and accelerator.is_main_process:
        _save_model(ensemble, run_dir / "model")
    accelerator.wait_for_everyone()
    model_dir = run_dir / "model" if recipe.output.save_model and (run_dir / "model").is_dir() else None
    accelerator.free_memory()
    last = fitted.final_phase
    return RunResult(
        name=run.name,
        run_dir=str(run_dir),
        seed=run.seed,
        fold=run.fold,
        epochs_completed=last.epochs_completed,
        global_step=last.global_step,
        best_epoch=last.best_epoch,
        best_metric=last.best_metric,
        selection_metric=recipe.optim.selection_metric,
        stopped_early=last.stopped_early,
        resumed_from=next((r.resumed_from for r in fitted.phases.values() if r.resumed_from), None),
        validation=final["validation_headline"],
        test=final.get("test_headline", {}),
        evaluation=final["evaluation"],
        history=[entry for r in fitted.phases.values() for entry in r.history],
        feature_cache=cache_stats,
        model_dir=str(model_dir) if model_dir else None,
        validation_part=run.validation_part,
        test_part=run.test_part,
        strategy={"name": strategy.name, **fitted.summary()},
        data_wait=sum((r.data_wait for r in fitted.phases.values()), DataWait()).summary(),
    )


def _final_evaluation(ctx: RunContext, fitted: StrategyResult) -> dict[str, Any]:
    """Evaluate validation and test with the strategy's final weights (thresholds fitted on validation)."""
    accelerator, recipe, ensemble = ctx.accelerator, ctx.recipe, ctx.ensemble
    results: dict[str, Any] = {}
    headline: dict[str, dict[str, float]] = {}
    evaluations = {
        label: evaluate_loader(ctx, eval_loader(ctx, label)) for label in ctx.collates if label != "train"
    }
    val = evaluations.get("validation")
    operating = OperatingPoint(recipe.evaluation.operating_point, recipe.evaluation.target_sensitivity)
    bootstrap = BootstrapConfig(n_resamples=recipe.evaluation.bootstrap_resamples, seed=ctx.run.seed)
    for label, evaluation in evaluations.items():
        headline[label] = headline_metrics(evaluation, ctx.task_infos, ensemble)
        patients = ctx.patient_ids(label)
        groups = [patients[i] for i in evaluation["index"]]
        per_task = {}
        for info in ctx.task_infos:
            fit = val if (label != "validation" and val is not None) else None
            per_task[info.name] = evaluate_task(
                info.type,
                ensemble.config.task(info.name).label_names or [info.name],
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
    final_phase = fitted.final_phase
    document = {
        "run": ctx.run.name or "hold-out",
        "seed": ctx.run.seed,
        "parts": {
            "train": ctx.run.train_parts,
            "validation": ctx.run.validation_part,
            "test": ctx.run.test_part,
        },
        "strategy": {"name": recipe.model.strategy.name, **fitted.summary()},
        "best_epoch": final_phase.best_epoch,
        "selection_metric": recipe.optim.selection_metric,
        "best_metric": final_phase.best_metric,
        **results,
    }
    if accelerator.is_main_process:
        write_text_atomic(ctx.run_dir / METRICS_FILE, json.dumps(document, indent=2, sort_keys=True, default=str))
    accelerator.wait_for_everyone()
    out = {
        "evaluation": results,
        "validation_headline": headline.get("validation", {}),
        "thresholds": _validation_thresholds(ctx, val, operating),
    }
    if "test" in headline:
        out["test_headline"] = headline["test"]
    return out


def _validation_thresholds(
    ctx: RunContext, val: Mapping[str, Any] | None, operating: OperatingPoint
) -> dict[str, dict[str, float]]:
    """Decision thresholds per binary/multilabel task and label, chosen on validation (saved with the model)."""
    if val is None:
        return {}
    out = {}
    for info in ctx.task_infos:
        if evaluated_as(info.type) not in ("binary", "multilabel"):
            continue
        labels = ctx.ensemble.config.task(info.name).label_names or [info.name]
        values = choose_thresholds(val["labels"][info.name], val["predictions"][info.name], operating)
        out[info.name] = {label: float(np.clip(v, 0.0, 1.0)) for label, v in zip(labels, values)}
    return out


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
    refs = [
        expert_ref(
            entry.name,
            experts[entry.name],
            hub_id=_local_source(entry.source, run, created=entry.create is not None),
        )
        for entry in recipe.experts
    ]
    tasks = []
    for section, info in zip(recipe.tasks, task_infos):
        extra: dict[str, Any] = {"loss_weight": section.loss_weight}
        if task_type(info.type).normalised_targets:
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


def _summarise(results: list[RunResult]) -> dict[str, Any]:
    """Mean and standard deviation of each test (else validation) headline metric over runs; the data wait of
    every run's training steps together."""
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
        "data_wait": sum(
            (DataWait.from_summary(r.data_wait) for r in results if r.data_wait), DataWait()
        ).summary(),
    }
