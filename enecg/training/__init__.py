"""Multi-task ensemble training with Accelerate: recipes, the feature cache, the loop, checkpoints and resume.

Entry points: :func:`enecg.training.recipe.load_recipe` + :func:`enecg.training.trainer.train` (a function, so it
runs under ``accelerate launch``, ``torchrun`` or ``accelerate.debug_launcher``), ``enecg train RECIPE.yaml`` and
``accelerate launch -m enecg.train --config RECIPE.yaml``.
"""

from __future__ import annotations

from typing import Any

from enecg.training.recipe import Recipe, RecipeError, load_recipe, parse_recipe_dict, recipe_help

__all__ = [
    "Recipe",
    "RecipeError",
    "RunResult",
    "TrainResult",
    "load_recipe",
    "parse_recipe_dict",
    "recipe_help",
    "train",
]


def __getattr__(name: str) -> Any:
    # Lazy: parsing a recipe must not import accelerate/transformers.
    if name in ("train", "TrainResult", "RunResult"):
        from enecg.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
