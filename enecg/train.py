"""Training entry point, alignment-handbook style.

    accelerate launch --config_file recipes/accelerate_configs/cpu_single.yaml -m enecg.train \
        --config recipes/ptbxl_light_ensemble.yaml [--optim.lr=3e-4 ...]
    python -m enecg.train --config RECIPE.yaml [--key=value ...]
    enecg train RECIPE.yaml [--key=value ...]            (the same, through the enecg CLI)

Command-line ``--key=value`` flags override the recipe (dotted keys, YAML values); unknown keys are errors.
After training, ``hub.push`` publishes the saved model from the main process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from enecg.training.recipe import Recipe, RecipeError, load_recipe, recipe_help
from enecg.training.trainer import TrainResult, train

logger = logging.getLogger("enecg.train")


def run_recipe_file(config: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Load ``config`` with ``overrides``, train, and push the model when the recipe asks for it."""
    recipe = load_recipe(config, overrides)
    result = train(recipe)
    if recipe.hub.push:
        push_result(recipe, result)
    return result


def push_result(recipe: Recipe, result: TrainResult) -> None:
    """Push the saved model of a single-run recipe (main process only)."""
    from enecg.hub.publish import push_ensemble

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
    return _finish(code)


def _finish(code: int) -> int:
    """End a distributed run cleanly: destroy the process group, flush, and leave without interpreter teardown.

    Two-process gloo jobs abort at interpreter exit about one run in five ('terminate called without an active
    exception') after all work is done; leaving with ``os._exit`` after the process group is destroyed avoids it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
