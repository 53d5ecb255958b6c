"""``enecg train``: train an ensemble from a recipe, then report, card and push the saved model.

    enecg train RECIPE.yaml [--key=value ...]
    accelerate launch --config_file recipes/accelerate_configs/cpu_single.yaml -m enecg.train \
        --config recipes/ptbxl_light_ensemble.yaml [--optim.lr=3e-4 ...]     (several processes or GPUs)

Command-line ``--key=value`` flags override the recipe (dotted keys, YAML values); unknown keys are errors. The
training itself is :func:`enecg.training.trainer.train`; this command adds what sits above it: the saved model's
card (hub layer), the test-part evaluation report with the card's results (``evaluation.report``) and, with
``hub.push``, the upload from the main process. ``enecg.train`` is the module ``accelerate launch -m`` runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from enecg.data.build import load_dataset_dir
from enecg.ensemble import Ensemble
from enecg.evaluation.metrics import BootstrapConfig, OperatingPoint
from enecg.hub.cards import (
    DatasetCardInfo,
    EvaluationSummary,
    TrainingSummary,
    render_ensemble_card,
    save_card,
    save_card_context,
)
from enecg.hub.publish import ensemble_card_context, push_ensemble, update_card
from enecg.training.data import plan_runs
from enecg.training.recipe import Recipe, RecipeError, load_recipe, recipe_help
from enecg.training.trainer import RunResult, TrainResult, train
from enecg.utils.distributed import finish_process_group

logger = logging.getLogger(__name__)


def _dataset_cards() -> dict:
    return {
        "ptbxl": DatasetCardInfo(
            name="PTB-XL", url="https://physionet.org/content/ptb-xl/", license="cc-by-4.0",
            citation="Wagner et al., PTB-XL, a large publicly available electrocardiography dataset, "
            "Scientific Data 7, 154 (2020)",
        ),
        "cinc": DatasetCardInfo(
            name="PhysioNet/CinC Challenge 2021", url="https://physionet.org/content/challenge-2021/",
            license="cc-by-4.0",
            citation="Reyna et al., Will Two Do? Varying Dimensions in Electrocardiography: The PhysioNet/Computing "
            "in Cardiology Challenge 2021 (2021)",
        ),
        "synthetic": DatasetCardInfo(name="enecg synthetic ECGSYN set (simulated, not patient data)"),
    }


def run_recipe_file(config: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Load ``config`` with ``overrides``, train, and push the model when the recipe asks for it."""
    recipe = load_recipe(config, overrides)
    if recipe.data.synthetic is not None:
        from enecg.generative.augment import materialize_synthetic  # diffusers: only when a recipe generates

        recipe = materialize_synthetic(recipe)  # generated records join the training parts only
    result = train(recipe)
    if _rank() == 0:
        _card_saved_models(recipe, result)
    if recipe.evaluation.report and _rank() == 0:
        for run in result.runs:
            report_run(recipe, run, recipe_path=config)
    if recipe.hub.push:
        push_result(recipe, result)
    return result


def _card_saved_models(recipe: Recipe, result: TrainResult) -> None:
    """Give every saved model its card (experts, licences, tasks; the report below adds test results)."""
    for run in result.runs:
        if run.model_dir is not None:
            update_card(run.model_dir, recipe.hub.repo_id or Path(run.model_dir).name)


def report_run(recipe: Recipe, run: RunResult, *, recipe_path: str | None = None) -> Path | None:
    """Evaluate a run's saved model on its test part (``enecg evaluate``: report.json + report.html in
    ``<run>/report``) and give the model a card with those results (``README.md`` + ``card_context.json``, which
    later pushes re-render for their repo). The model is reloaded from disk, so the report describes exactly what
    was saved. Returns the report folder, or None when the run saved no model or has no test part."""
    # The report's plots import matplotlib: only when a report is made, not at every `enecg` start-up.
    from enecg.evaluation.runner import evaluate_ensemble

    if run.model_dir is None or run.test_part is None:
        logger.info("run %s: no saved model or no test part: no report", run.name or "hold-out")
        return None
    model_dir, report_dir = Path(run.model_dir), Path(run.run_dir) / "report"
    model = Ensemble.from_pretrained(model_dir)
    _, meta = load_dataset_dir(recipe.data.path)
    evaluation = evaluate_ensemble(
        model,
        recipe.data.path,
        split=run.test_part,
        val_split=run.validation_part,
        operating_point=OperatingPoint(recipe.evaluation.operating_point, recipe.evaluation.target_sensitivity),
        bootstrap=BootstrapConfig(n_resamples=recipe.evaluation.bootstrap_resamples, seed=run.seed),
        n_examples=recipe.evaluation.report_examples,
        out_dir=report_dir,
        title=f"enecg ensemble — {meta.source} {run.test_part}",
        train_splits=_train_parts(recipe, run),
        feature_cache=recipe.data.cache_dir or Path(recipe.output.dir) / "feature_cache",
        extra_train=recipe.data.extra_train,
    )
    dataset = _dataset_cards().get(meta.source, DatasetCardInfo(name=meta.source))
    repo_id = recipe.hub.repo_id or model_dir.name
    context = ensemble_card_context(
        model,
        repo_id,
        datasets=[dataset],
        evaluations=[EvaluationSummary.from_evaluation(evaluation, run.test_part, dataset=dataset.name)],
        gate_mean_weights=(evaluation.get("gate") or {}).get("mean_weights", {}),
        gate_split=run.test_part,
        training=TrainingSummary(
            splits={part: meta.splits.get(part, 0) for part in (*recipe.data.train_parts, run.validation_part)
                    if part},
            epochs=run.epochs_completed,
            recipe=recipe_path,
            split_method=f"train {'+'.join(recipe.data.train_parts)}, select on {run.validation_part}, "
            f"test {run.test_part} (patient-disjoint parts of {meta.source})",
        ),
    )
    save_card(render_ensemble_card(context), model_dir)
    save_card_context(context, model_dir)
    logger.info("run %s: report in %s, card with test results in %s", run.name or "hold-out", report_dir, model_dir)
    return report_dir


def _train_parts(recipe: Recipe, run: RunResult) -> list[str]:
    """The dataset parts a run trained on (hold-out: the recipe's; k-fold: every fold but its validation and
    test folds)."""
    plans = {plan.name: plan for plan in plan_runs(recipe)}
    return list(plans[run.name].train_parts) if run.name in plans else list(recipe.data.train_parts)


def push_result(recipe: Recipe, result: TrainResult) -> None:
    """Push the saved model of a single-run recipe (main process only)."""
    run = result.run
    if run.model_dir is None:
        if _rank() == 0:
            raise RuntimeError("hub.push is set but no model was saved (output.save_model / serialization)")
        return
    push_ensemble(
        run.model_dir,
        recipe.hub.repo_id,
        private=recipe.hub.private,
        revision=recipe.hub.revision,
        is_main_process=_rank() == 0,
    )


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m enecg.train",
        description="Train an enecg ensemble from a recipe. Extra --key=value flags override recipe keys "
        "(e.g. --optim.lr=3e-4 --model.gate.top_k=1).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="Recipe YAML file.")
    parser.add_argument("--help-recipe", action="store_true", help="List every recipe key with its help.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.help_recipe:
        print(recipe_help())
        return 0
    if not args.config:
        parser.error("--config RECIPE.yaml is required")
    try:
        run_recipe_file(args.config, overrides)
        code = 0
    except (RecipeError, FileNotFoundError) as exc:
        print(f"enecg.train: error: {exc}", file=sys.stderr)
        code = 2
    return finish_process_group(code)


# ------------------------------------------------------------------------------------------ `enecg train`


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Train an ensemble from a recipe YAML.",
        description="Train an ensemble from a recipe YAML. Flags after the recipe override its keys: "
        "--optim.lr=3e-4 --model.gate.top_k=1 --experts.0.revision=abc (YAML values; unknown keys are errors). "
        "Multi-process: accelerate launch -m enecg.train --config RECIPE.yaml.",
    )
    parser.add_argument("recipe", nargs="?", help="Recipe YAML file (see recipes/).")
    parser.add_argument("--help-recipe", action="store_true", help="List every recipe key with its help.")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value recipe overrides.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.help_recipe:
        print(recipe_help())
        return 0
    if not args.recipe:
        raise ValueError("enecg train needs a recipe file: enecg train RECIPE.yaml [--key=value ...]")
    result = run_recipe_file(args.recipe, list(args.overrides))
    for run_result in result.runs:
        label = run_result.name or "hold-out"
        metrics = run_result.test or run_result.validation
        shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith("headline") or k == "mean_headline"}
        print(f"{label}: best epoch {run_result.best_epoch}, {shown}, folder {run_result.run_dir}")
    return 0
