"""``enecg train RECIPE.yaml [--key=value ...]``: train an ensemble from a recipe (one process).

For several processes or GPUs use ``accelerate launch -m enecg.train --config RECIPE.yaml`` (see
``recipes/README.md``).
"""

from __future__ import annotations

import argparse


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
    from enecg.training.recipe import recipe_help

    if args.help_recipe:
        print(recipe_help())
        return 0
    if not args.recipe:
        raise ValueError("enecg train needs a recipe file: enecg train RECIPE.yaml [--key=value ...]")
    from enecg.train import run_recipe_file

    result = run_recipe_file(args.recipe, list(args.overrides))
    for run_result in result.runs:
        label = run_result.name or "hold-out"
        metrics = run_result.test or run_result.validation
        shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith("headline") or k == "mean_headline"}
        print(f"{label}: best epoch {run_result.best_epoch}, {shown}, folder {run_result.run_dir}")
    return 0
