"""Pretrain on diverse data, fine-tune on the target (seed: the 12-lead generalisation paper):
``enecg transfer recipes/pretrain_cinc_finetune_ptbxl.yaml``.

Protocol, per seed:

1. **Pretrain** a light model supervised on the *source* (default: the PhysioNet/CinC 2020/2021 records, labels
   = the Challenge 2021 scored SNOMED CT classes), selecting the epoch with the lowest source-validation loss.
   CinC copies of PTB-XL records that are in the target database are dropped before (``ptbxl_root``), so no
   target recording is pretrained on.
2. **Replace the head**: a model for the target task is built from the same seed and receives every pretrained
   weight except the classifier (loaded strictly: the classifier keys are the only ones allowed to be missing).
3. **Fine-tune** all layers on the target training parts (default PTB-XL superclasses, official strat folds),
   with the fine-tuning budget.
4. **Baseline**: the same architecture trained on the target alone, same budget, same seed.
5. Both are evaluated once on the target test part (macro AUROC with patient-level bootstrap CI, thresholds
   fitted on validation); the per-seed paired difference is reported.

Writes ``<output.dir>/transfer.json`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from enecg.evaluation.efficiency import fmt, fmt_ci, machine_info, render_table_page
from enecg.experts.families.light import ARCHITECTURES, build_light_model
from enecg.experts.inhouse import enecg_version
from enecg.experts.weights import load_state_dict_strict
from enecg.training.efficiency_benchmark import (
    CLASSIFICATION,
    BenchEvaluationSection,
    OutputDirSection,
    evaluate_on_test,
    headline_auroc,
)
from enecg.training.light_experts import (
    LightInputSection,
    SupervisedDataSection,
    SupervisedParts,
    SupervisedSettings,
    fit_light_model,
    load_supervised_parts,
    select_parts,
    task_outputs,
    validation_loss,
)
from enecg.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

RESULTS_FILE = "transfer.json"
QUICK_OVERRIDES = (
    "--source.max_records=32",
    "--target.max_records=48",
    "--model.width_multiplier=0.5",
    "--pretraining.epochs=1",
    "--finetuning.epochs=1",
    "--seeds=[0]",
    "--evaluation.bootstrap_resamples=20",
)


@dataclass
class SourceSection:
    """The pretraining data: a PhysioNet/CinC records folder (built into `path` when needed)."""

    path: str = field(metadata={"help": "Folder of the prepared source dataset."})
    prepare_from: str | None = field(
        default=None,
        metadata={"help": "CinC folder (.hea + .mat, searched recursively): (re)build `path` from it."},
    )
    classes: str = field(
        default="cinc2021",
        metadata={"help": "CinC class preset (cinc2021: the 26 scored classes) or [NAME=]CODE[|CODE],..."},
    )
    exclude_ptbxl_copies: bool = field(
        default=True,
        metadata={
            "help": "Drop CinC copies (HR*) of records in the target's PTB-XL database (target.prepare_from)."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the source's patient-level split."})
    train_parts: list[str] = field(
        default_factory=lambda: ["train", "test"],
        metadata={"help": "Source parts pretrained on (the source test part is not needed for evaluation)."},
    )
    validation_part: str = field(default="validation", metadata={"help": "Source part for epoch selection."})
    max_records: int | None = field(default=None, metadata={"help": "First N records of each part only."})


@dataclass
class TransferModelSection(LightInputSection):
    """The light model pretrained and fine-tuned."""

    architecture: str = field(default="SimpleNet", metadata={"help": f"One of {sorted(ARCHITECTURES)}."})
    use_demographics: bool = field(default=False, metadata={"help": "Fuse age/sex into the embedding."})

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture {self.architecture!r}: known {sorted(ARCHITECTURES)}")


@dataclass
class TransferRecipe:
    """``enecg transfer`` recipe (``recipes/pretrain_cinc_finetune_ptbxl.yaml``)."""

    source: SourceSection = field(metadata={"help": "Pretraining data."})
    target: SupervisedDataSection = field(metadata={"help": "Fine-tuning / evaluation data (PTB-XL)."})
    output: OutputDirSection = field(metadata={"help": "Output folder."})
    model: TransferModelSection = field(
        default_factory=TransferModelSection, metadata={"help": "Light model."}
    )
    pretraining: SupervisedSettings = field(
        default_factory=SupervisedSettings, metadata={"help": "Budget on the source."}
    )
    finetuning: SupervisedSettings = field(
        default_factory=SupervisedSettings,
        metadata={
            "help": "Budget on the target, for the fine-tuned model and the target-only baseline alike."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One paired run per seed."})
    evaluation: BenchEvaluationSection = field(
        default_factory=BenchEvaluationSection, metadata={"help": "Test evaluation."}
    )

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a non-empty list of distinct integers")


# ------------------------------------------------------------------------------------------------- runner


def load_source_parts(recipe: TransferRecipe) -> SupervisedParts:
    """The source dataset (CinC, labels ``dx``), built from ``source.prepare_from`` when given."""
    from enecg.data.build import load_dataset_dir
    from enecg.data.cinc import CincOptions, prepare_cinc

    source = recipe.source
    if source.prepare_from:
        ptbxl_root = recipe.target.prepare_from if source.exclude_ptbxl_copies else None
        if source.exclude_ptbxl_copies and not ptbxl_root:
            raise ValueError(
                "source.exclude_ptbxl_copies needs target.prepare_from (the PTB-XL folder whose records to drop)"
            )
        options = CincOptions(
            classes=source.classes, tasks=("dx",), ptbxl_root=ptbxl_root, seed=source.split_seed
        )
        dataset, meta = prepare_cinc(source.prepare_from, source.path, options)
    else:
        dataset, meta = load_dataset_dir(source.path)
    return select_parts(
        dataset,
        meta,
        task_name="dx",
        train_parts=list(source.train_parts),
        validation_part=source.validation_part,
        test_part=None,
        contract=recipe.model.contract(),
        max_records=source.max_records,
        where=source.path,
    )


def transfer_weights(pretrained: torch.nn.Module, target: torch.nn.Module, source: str) -> list[str]:
    """Copy every weight but the classifier from ``pretrained`` into ``target`` (strict otherwise); returns the
    target keys left at their initialisation."""
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier.")}
    report = load_state_dict_strict(target, state, source=source, expected_missing=["classifier.*"])
    return sorted(report.get("missing", []))


def _summary(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
    }


def run_transfer(recipe: TransferRecipe) -> dict[str, Any]:
    """Pretrain -> fine-tune vs target-only, per seed; writes and returns the results document."""
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    target = load_supervised_parts(recipe.target, recipe.model.contract())
    if target.task.type not in CLASSIFICATION:
        raise ValueError(
            f"target.task {target.task.name!r} is {target.task.type}: the comparison needs AUROC"
        )
    source = load_source_parts(recipe)
    model = recipe.model
    runs = []
    for seed in recipe.seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pretrained = build_light_model(
                model.light_config(model.architecture, task_outputs(source.task), model.use_demographics)
            )
            pretraining = fit_light_model(pretrained, source, recipe.pretraining, seed)

            target_config = model.light_config(
                model.architecture, task_outputs(target.task), model.use_demographics
            )
            torch.manual_seed(seed)
            finetuned = build_light_model(target_config)
            left = transfer_weights(pretrained, finetuned, f"pretrained {model.architecture} (seed {seed})")
            loss_before = validation_loss(finetuned, target.validation)
            finetuning = fit_light_model(finetuned, target, recipe.finetuning, seed)

            torch.manual_seed(seed)
            scratch = build_light_model(target_config)
            baseline = fit_light_model(scratch, target, recipe.finetuning, seed)
        results = {}
        for label, trained, fitted in (
            ("pretrained_finetuned", finetuned, finetuning),
            ("target_only", scratch, baseline),
        ):
            evaluation = evaluate_on_test(trained, target, recipe.evaluation.bootstrap_resamples, seed)
            auroc, ci = headline_auroc(evaluation)
            results[label] = {
                "auroc": auroc,
                "auroc_ci": ci,
                "test": evaluation,
                "training": {
                    "steps": fitted.steps,
                    "best_step": fitted.best_step,
                    "best_validation_loss": fitted.best_validation_loss,
                },
            }
        a, b = results["pretrained_finetuned"]["auroc"], results["target_only"]["auroc"]
        runs.append(
            {
                "seed": seed,
                **results,
                "auroc_difference": None if a is None or b is None else a - b,
                "pretraining": {
                    "steps": pretraining.steps,
                    "best_step": pretraining.best_step,
                    "best_validation_loss": pretraining.best_validation_loss,
                    "target_validation_loss_before_finetuning": loss_before,
                    "reinitialised_keys": left,
                },
            }
        )
        logger.info("seed %d: fine-tuned %s vs target-only %s", seed, a, b)
    document = {
        "title": "Pretrain on diverse data, fine-tune on the target",
        "enecg_version": enecg_version(),
        "source": {
            "path": recipe.source.path,
            "task": source.task.name,
            "labels": source.task.names,
            **source.sizes(),
        },
        "target": {
            "path": recipe.target.path,
            "task": target.task.name,
            "labels": target.task.names,
            **target.sizes(),
        },
        "runs": runs,
        "summary": {
            "pretrained_finetuned": _summary([r["pretrained_finetuned"]["auroc"] for r in runs]),
            "target_only": _summary([r["target_only"]["auroc"] for r in runs]),
            "auroc_difference": _summary([r["auroc_difference"] for r in runs]),
        },
        "machine": machine_info(),
        "recipe": dataclasses.asdict(recipe),
    }
    write_text_atomic(out / RESULTS_FILE, json.dumps(document, indent=2, sort_keys=True, allow_nan=False))
    write_transfer_report(document, out)
    return document


def write_transfer_report(document: dict[str, Any], out: Path) -> Path:
    """``report.html`` for a transfer results document."""
    summary = document["summary"]
    per_seed = {
        "title": "Test macro AUROC per seed",
        "columns": ["seed", "pretrained -> fine-tuned", "95% CI", "target only", "95% CI", "difference"],
        "rows": [
            [
                r["seed"],
                fmt(r["pretrained_finetuned"]["auroc"]),
                fmt_ci(r["pretrained_finetuned"]["auroc_ci"]),
                fmt(r["target_only"]["auroc"]),
                fmt_ci(r["target_only"]["auroc_ci"]),
                fmt(r["auroc_difference"]),
            ]
            for r in document["runs"]
        ],
    }
    overall = {
        "title": "Over seeds",
        "columns": ["", "mean", "std", "seeds"],
        "rows": [[k, fmt(v["mean"]), fmt(v["std"]), v["n"]] for k, v in summary.items()],
        "note": "Same architecture, seed, fine-tuning budget and test part for both; only the initialisation of "
        "the non-classifier layers differs (pretrained on the source vs random).",
    }
    src, tgt = document["source"], document["target"]
    page = render_table_page(
        document["title"],
        paragraphs=[
            f"Source: {src['path']}, task {src['task']} ({len(src['labels'])} classes), {src['train']} training / "
            f"{src['validation']} validation records. Target: {tgt['path']}, task {tgt['task']} "
            f"({', '.join(tgt['labels'])}), {tgt['train']} training / {tgt['validation']} validation / "
            f"{tgt['test']} test records.",
            "On small samples this demonstrates the protocol; the size (or sign) of the difference is not evidence "
            "for or against the effect the paper reports.",
        ],
        tables=[per_seed, overall],
        settings={"recipe": document["recipe"]},
    )
    path = out / "report.html"
    write_text_atomic(path, page)
    return path
