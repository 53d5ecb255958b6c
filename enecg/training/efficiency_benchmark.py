"""The efficiency benchmark of the light CNN experts (seed: "Efficient Neural Architectures for Real-Time ECG
Interpretation on Limited Hardware"): ``enecg efficiency recipes/efficiency_benchmark.yaml``.

For every light architecture, without and with age/sex fusion, a model is trained supervised on one
classification task of the training parts (PTB-XL superclasses on the official strat folds by default; the epoch
with the lowest validation loss is kept), evaluated once on the test part (macro AUROC with a patient-level
bootstrap CI, thresholds fitted on validation) and saved as an in-house expert folder. The *ensemble* row is the
project's mixture-of-experts ensemble over the light experts trained without demographics, trained by
:func:`enecg.training.trainer.train` (frozen experts, new heads and gate) on the same parts. Every model is then
measured in a fresh subprocess (:func:`enecg.evaluation.efficiency.measure_saved_model`: parameters, latency,
peak memory) and scored with :func:`enecg.evaluation.efficiency.efficiency_score` against a reference row.

Writes ``<output.dir>/efficiency.json``, ``report.html`` and ``auroc_vs_latency.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from enecg.ensemble.tasks import evaluated_as
from enecg.evaluation.efficiency import (
    MeasurementSettings,
    ScoreSettings,
    efficiency_score,
    fmt,
    fmt_ci,
    machine_info,
    measure_saved_model,
    plot_auroc_vs_latency,
    render_table_page,
)
from enecg.evaluation.metrics import BootstrapConfig
from enecg.evaluation.task_eval import evaluate_task
from enecg.experts.families.light import ARCHITECTURES, build_light_model
from enecg.experts.inhouse import enecg_version, save_inhouse_expert
from enecg.training.light_experts import (
    LightInputSection,
    SupervisedDataSection,
    SupervisedParts,
    SupervisedSettings,
    fit_light_model,
    load_supervised_parts,
    predict_supervised,
    task_outputs,
)
from enecg.training.recipe import ModelSection, parse_recipe_dict
from enecg.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

RESULTS_FILE = "efficiency.json"
CLASSIFICATION = ("multilabel", "binary", "multiclass")
# `enecg efficiency --quick`: one fast architecture with and without demographics, a tiny budget. It checks the
# pipeline end to end; its numbers mean nothing.
QUICK_OVERRIDES = (
    "--data.max_records=48",
    "--model.architectures=[SimpleNet]",
    "--model.width_multiplier=0.5",
    "--training.epochs=1",
    "--training.batch_size=16",
    "--measurement.batch_size=4",
    "--measurement.warmup=1",
    "--measurement.repeats=3",
    "--score.reference=SimpleNet",
    "--ensemble.epochs=1",
    "--evaluation.bootstrap_resamples=20",
)


# ------------------------------------------------------------------------------------------------- recipe


@dataclass
class EfficiencyModelSection(LightInputSection):
    """Which light models are benchmarked (every architecture x every demographics setting)."""

    architectures: list[str] = field(
        default_factory=lambda: list(ARCHITECTURES), metadata={"help": f"Of {sorted(ARCHITECTURES)}."}
    )
    demographics: list[bool] = field(
        default_factory=lambda: [False, True],
        metadata={"help": "Train each architecture without (false) and/or with (true) age/sex fusion."},
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.architectures) - set(ARCHITECTURES))
        if unknown or not self.architectures:
            raise ValueError(f"model.architectures: unknown {unknown}; known: {sorted(ARCHITECTURES)}")
        if not self.demographics or len(set(self.demographics)) != len(self.demographics):
            raise ValueError("model.demographics: a non-empty list of distinct true/false values")


@dataclass
class EnsembleSection:
    """The ensemble row: the enecg ensemble over the light experts trained without demographics."""

    enabled: bool = field(default=True, metadata={"help": "Train and measure the ensemble row."})
    model: ModelSection = field(
        default_factory=ModelSection, metadata={"help": "Heads, LoRA and gate (as in a training recipe)."}
    )
    epochs: int = field(default=10, metadata={"help": "Ensemble training epochs (experts stay frozen)."})
    batch_size: int = field(default=32, metadata={"help": "Ensemble training batch size."})
    lr: float = field(default=3e-3, metadata={"help": "Ensemble learning rate."})
    early_stopping_patience: int | None = field(default=5, metadata={"help": "Epochs without improvement."})


@dataclass
class BenchEvaluationSection:
    """Test evaluation."""

    bootstrap_resamples: int = field(
        default=1000, metadata={"help": "Patient-level bootstrap resamples of the AUROC CI (0: none)."}
    )


@dataclass
class OutputDirSection:
    """Where results go."""

    dir: str = field(metadata={"help": "Output folder (models, efficiency.json, report.html)."})


@dataclass
class EfficiencyRecipe:
    """``enecg efficiency`` recipe (``recipes/efficiency_benchmark.yaml``)."""

    data: SupervisedDataSection = field(metadata={"help": "Dataset, task and parts."})
    output: OutputDirSection = field(metadata={"help": "Output folder."})
    model: EfficiencyModelSection = field(
        default_factory=EfficiencyModelSection, metadata={"help": "Light models benchmarked."}
    )
    training: SupervisedSettings = field(
        default_factory=SupervisedSettings, metadata={"help": "Training budget of every light model."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of every model's initialisation and batches."})
    measurement: MeasurementSettings = field(
        default_factory=MeasurementSettings, metadata={"help": "Latency and memory measurement."}
    )
    score: ScoreSettings = field(default_factory=ScoreSettings, metadata={"help": "Efficiency Score."})
    ensemble: EnsembleSection = field(default_factory=EnsembleSection, metadata={"help": "Ensemble row."})
    evaluation: BenchEvaluationSection = field(
        default_factory=BenchEvaluationSection, metadata={"help": "Test evaluation."}
    )


def row_name(architecture: str, demographics: bool) -> str:
    return f"{architecture}+age/sex" if demographics else architecture


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower()


# ------------------------------------------------------------------------------------------------- runner


def headline_auroc(result: dict[str, Any]) -> tuple[float | None, list[float | None] | None]:
    if result["type"] == "multiclass":
        return result["metrics"].get("macro_auroc"), (result.get("ci") or {}).get("macro_auroc")
    return result["metrics"]["macro"].get("auroc"), (result.get("ci") or {}).get("macro_auroc")


def evaluate_on_test(
    model: torch.nn.Module, parts: SupervisedParts, bootstrap_resamples: int, seed: int
) -> dict[str, Any]:
    """``evaluate_task`` of ``model`` on the test rows, thresholds fitted on validation."""
    assert parts.test is not None
    val_pred, val_true = predict_supervised(model, parts.validation)
    test_pred, test_true = predict_supervised(model, parts.test)
    return evaluate_task(
        parts.task.type,
        parts.task.names or [parts.task.name],
        test_true,
        test_pred,
        val_true=val_true,
        val_pred=val_pred,
        test_groups=parts.test.patient_ids(),
        bootstrap=BootstrapConfig(n_resamples=bootstrap_resamples, seed=seed),
    )


def _train_light_row(
    recipe: EfficiencyRecipe, parts: SupervisedParts, architecture: str, demographics: bool, out: Path
) -> dict[str, Any]:
    name = row_name(architecture, demographics)
    config = recipe.model.light_config(architecture, task_outputs(parts.task), demographics)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = build_light_model(config)
        fitted = fit_light_model(model, parts, recipe.training, recipe.seed)
    evaluation = evaluate_on_test(model, parts, recipe.evaluation.bootstrap_resamples, recipe.seed)
    auroc, ci = headline_auroc(evaluation)
    folder = out / "experts" / _slug(name)
    save_inhouse_expert(
        model,
        family="light",
        config=config,
        contract=recipe.model.contract(),
        folder=folder,
        name=_slug(name),
        metrics={"test": evaluation, "training": dataclasses.asdict(fitted)},
        description=f"{name} trained on {parts.task.name!r} of {parts.dataset_path} by enecg efficiency.",
    )
    logger.info("%s: test macro AUROC %.3f", name, auroc if auroc is not None else float("nan"))
    return {
        "name": name,
        "kind": "light",
        "architecture": architecture,
        "demographics": demographics,
        "folder": str(folder),
        "auroc": auroc,
        "auroc_ci": ci,
        "test": evaluation,
        "training": {
            "steps": fitted.steps,
            "best_step": fitted.best_step,
            "best_validation_loss": fitted.best_validation_loss,
            "final_loss": fitted.final_loss,
        },
    }


def _ensemble_recipe(recipe: EfficiencyRecipe, experts: list[dict[str, Any]], out: Path) -> Any:
    from enecg.training.recipe import EvaluationSection

    data = recipe.data
    evaluation: dict[str, Any] = {"bootstrap_resamples": recipe.evaluation.bootstrap_resamples}
    if "report" in {f.name for f in dataclasses.fields(EvaluationSection)}:
        evaluation["report"] = False  # the benchmark writes its own report
    document = {
        "data": {
            "path": data.path,
            "prepare_from": data.prepare_from,
            "rate": data.rate,
            "train_parts": list(data.train_parts),
            "validation_part": data.validation_part,
            "test_part": data.test_part,
            "max_records": data.max_records,
        },
        "experts": [{"name": _slug(e["name"]), "source": str(Path(e["folder"]).absolute())} for e in experts],
        "tasks": [{"name": data.task}],
        "model": dataclasses.asdict(recipe.ensemble.model),
        "optim": {
            "seed": recipe.seed,
            "epochs": recipe.ensemble.epochs,
            "batch_size": recipe.ensemble.batch_size,
            "lr": recipe.ensemble.lr,
            "early_stopping_patience": recipe.ensemble.early_stopping_patience,
        },
        "evaluation": evaluation,
        "output": {"dir": str(out / "ensemble"), "resume": "never", "checkpoint_every_steps": None},
        "tracking": {"log_with": []},
    }
    return parse_recipe_dict(document, source="enecg efficiency (ensemble row)")


def _train_ensemble_row(
    recipe: EfficiencyRecipe, light_rows: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    from enecg.training.trainer import train

    members = [r for r in light_rows if not r["demographics"]] or light_rows
    result = train(_ensemble_recipe(recipe, members, out)).run
    if result.model_dir is None:
        raise RuntimeError("the ensemble run saved no model (output.save_model)")
    evaluation = result.evaluation["test"]["tasks"][recipe.data.task]
    auroc, ci = headline_auroc(evaluation)
    names = " + ".join(r["name"] for r in members)
    return {
        "name": f"ensemble({names})",
        "kind": "ensemble",
        "architecture": None,
        "demographics": any(r["demographics"] for r in members),
        "members": [r["name"] for r in members],
        "folder": result.model_dir,
        "auroc": auroc,
        "auroc_ci": ci,
        "test": evaluation,
        "training": {"epochs_completed": result.epochs_completed, "best_epoch": result.best_epoch},
    }


def score_rows(rows: list[dict[str, Any]], settings: ScoreSettings) -> dict[str, Any]:
    """Add ``efficiency_score`` to every row against the reference row; returns the reference costs."""
    by_name = {r["name"]: r for r in rows}
    if settings.reference not in by_name:
        raise ValueError(
            f"score.reference {settings.reference!r} is not a benchmarked row ({sorted(by_name)})"
        )
    ref_row = by_name[settings.reference]
    reference = {
        "params": ref_row["params"],
        "latency_ms": ref_row["latency_ms"],
        "memory_mb": ref_row["memory_mb"],
    }
    for row in rows:
        costs = {"params": row["params"], "latency_ms": row["latency_ms"], "memory_mb": row["memory_mb"]}
        row["efficiency_score"] = efficiency_score(row["auroc"], costs, reference, settings)
    return {"name": settings.reference, **reference}


def run_efficiency_benchmark(recipe: EfficiencyRecipe) -> dict[str, Any]:
    """Train, evaluate, measure and score every model of ``recipe``; writes and returns the results document."""
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = load_supervised_parts(recipe.data, recipe.model.contract())
    if evaluated_as(parts.task.type) not in CLASSIFICATION:
        raise ValueError(f"data.task {parts.task.name!r} is {parts.task.type}: the benchmark needs AUROC")
    rows = [
        _train_light_row(recipe, parts, architecture, demographics, out)
        for architecture in recipe.model.architectures
        for demographics in recipe.model.demographics
    ]
    if recipe.ensemble.enabled:
        rows.append(_train_ensemble_row(recipe, rows, out))
    for row in rows:
        measured = measure_saved_model(row["kind"], row["folder"], recipe.measurement)
        row["measurement"] = measured
        row["params"] = measured["params"]
        row["latency_ms"] = measured["latency_ms"]
        row["latency_ms_per_record_batched"] = measured["latency_ms_per_record_batched"]
        row["memory_mb"] = measured["peak_memory_mb"]
        logger.info("%s: %s", row["name"], {k: row[k] for k in ("params", "latency_ms", "memory_mb")})
    reference = score_rows(rows, recipe.score)
    document = {
        "title": "Efficiency benchmark of the light CNN experts",
        "enecg_version": enecg_version(),
        "dataset": {
            "path": recipe.data.path,
            "task": parts.task.name,
            "labels": parts.task.names,
            **parts.sizes(),
        },
        "machine": machine_info(),
        "score": {
            "formula": "100 * max(auroc - 0.5, 0) / 0.5 * prod_k (reference_k / max(cost_k, floor_k)) ** "
            "(cost_exponent * w_k / sum(w)), k in params, latency_ms (batch 1), memory_mb",
            "settings": dataclasses.asdict(recipe.score),
            "reference": reference,
        },
        "rows": rows,
        "recipe": dataclasses.asdict(recipe),
    }
    write_text_atomic(out / RESULTS_FILE, json.dumps(document, indent=2, sort_keys=True, allow_nan=False))
    write_efficiency_report(document, out)
    return document


def write_efficiency_report(document: dict[str, Any], out: Path) -> Path:
    """``report.html`` + ``auroc_vs_latency.png`` for a results document."""
    rows = document["rows"]
    plot_auroc_vs_latency(rows, out / "auroc_vs_latency.png")
    measurement = document["recipe"]["measurement"]
    table = {
        "title": "Efficiency Score",
        "columns": [
            "model",
            "age/sex",
            "parameters",
            "latency ms (batch 1)",
            f"ms/record (batch {measurement['batch_size']})",
            "peak memory MB",
            "test macro AUROC",
            "95% CI",
            "Efficiency Score",
        ],
        "rows": [
            [
                r["name"],
                "yes" if r["demographics"] else "no",
                f"{r['params']:,}",
                fmt(r["latency_ms"], 2),
                fmt(r["latency_ms_per_record_batched"], 2),
                fmt(r["memory_mb"], 1),
                fmt(r["auroc"]),
                fmt_ci(r["auroc_ci"]),
                fmt(r["efficiency_score"], 1),
            ]
            for r in sorted(rows, key=lambda r: -(r["efficiency_score"] or -1.0))
        ],
        "note": f"Reference row: {document['score']['reference']['name']}. Score: {document['score']['formula']}. "
        f"Latency: median of {measurement['repeats']} calls after {measurement['warmup']} warm-up calls, "
        f"{measurement['threads']} torch thread(s), CPU. Memory: {rows[0]['measurement']['memory_method']} "
        "of a fresh subprocess that loads the model and runs one batch.",
    }
    dataset = document["dataset"]
    page = render_table_page(
        document["title"],
        paragraphs=[
            f"Task {dataset['task']} ({', '.join(dataset['labels'])}) of {dataset['path']}: {dataset['train']} "
            f"training, {dataset['validation']} validation, {dataset['test']} test records (labelled).",
            "Test macro AUROC with patient-level bootstrap 95% CIs. On a small sample the intervals are wide and "
            "the ranking by AUROC is not reliable; the costs are.",
        ],
        tables=[table],
        figures=[{"path": "auroc_vs_latency.png", "caption": "AUROC vs latency, marker area ~ parameters"}],
        settings={"machine": document["machine"], "score": document["score"]},
    )
    path = out / "report.html"
    write_text_atomic(path, page)
    return path
