"""``enecg efficiency RECIPE.yaml`` and ``enecg transfer RECIPE.yaml``: the seed papers' methods as recipes.

- ``efficiency``: the light CNN experts (with and without age/sex) and their ensemble, each measured for
  parameters, latency and peak memory, evaluated for test macro AUROC and combined into an Efficiency Score
  (:mod:`enecg.training.efficiency_benchmark`).
- ``transfer``: pretrain a light model on a source mix (CinC), fine-tune it on the target (PTB-XL), against the
  same model trained on the target alone (:mod:`enecg.training.transfer`).

Flags after the recipe override its keys (``--training.epochs=3``, YAML values; unknown keys are errors);
``--quick`` first applies a tiny budget that checks the pipeline end to end (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

_COMMANDS = {
    "efficiency": (
        "Efficiency benchmark of the light experts and their ensemble (Efficiency Score).",
        "enecg.training.efficiency_benchmark",
        "EfficiencyRecipe",
        "run_efficiency_benchmark",
    ),
    "transfer": (
        "Pretrain on a source mix (CinC), fine-tune on the target (PTB-XL), vs target-only training.",
        "enecg.training.transfer",
        "TransferRecipe",
        "run_transfer",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (summary, _, _, _) in _COMMANDS.items():
        parser = subparsers.add_parser(
            name,
            help=summary,
            description=f"{summary} Flags after the recipe override its keys (--key=value, YAML values; "
            "unknown keys are errors). See recipes/README.md.",
        )
        parser.add_argument("recipe", nargs="?", help="Recipe YAML file (see recipes/).")
        parser.add_argument(
            "--quick", action="store_true", help="Tiny budget: checks the pipeline, its numbers mean nothing."
        )
        parser.add_argument("--help-recipe", action="store_true", help="List every recipe key with its help.")
        parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value recipe overrides.")
        parser.set_defaults(func=_runner(name))


def load_seed_recipe(command: str, path: str, overrides: list[str], quick: bool = False) -> Any:
    """Parse the recipe of ``command`` (``efficiency`` | ``transfer``) with the package's configuration engine
    (:mod:`enecg.utils.config`: unknown keys and wrong types are errors); ``quick`` prepends the module's
    ``QUICK_OVERRIDES``."""
    import importlib

    from enecg.utils.config import load_config

    _, module_name, schema_name, _ = _COMMANDS[command]
    module = importlib.import_module(module_name)
    extra = list(module.QUICK_OVERRIDES) if quick else []
    return load_config(path, getattr(module, schema_name), [*extra, *overrides])


def _runner(command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        from enecg.utils.config import config_help

        _, module_name, schema_name, function = _COMMANDS[command]
        module = importlib.import_module(module_name)
        if args.help_recipe:
            print(config_help(getattr(module, schema_name)))
            return 0
        if not args.recipe:
            raise ValueError(
                f"enecg {command} needs a recipe file: enecg {command} RECIPE.yaml [--key=value ...]"
            )
        overrides = list(args.overrides)
        quick = args.quick or "--quick" in overrides  # also accepted after the recipe
        overrides = [o for o in overrides if o != "--quick"]
        recipe = load_seed_recipe(command, args.recipe, overrides, quick)
        document = getattr(module, function)(recipe)
        _print_summary(command, document, recipe.output.dir)
        return 0

    return run


def _print_summary(command: str, document: dict[str, Any], out: str) -> None:
    if command == "efficiency":
        for row in document["rows"]:
            score = row["efficiency_score"]
            print(
                f"{row['name']}: params {row['params']:,}, latency {row['latency_ms']:.2f} ms, memory "
                f"{row['memory_mb']:.1f} MB, AUROC {row['auroc']}, score {score if score is None else round(score, 1)}"
            )
    else:
        for key, value in document["summary"].items():
            print(f"{key}: mean {value['mean']}, std {value['std']} over {value['n']} seed(s)")
    print(f"results: {out}/ (JSON + report.html)")
