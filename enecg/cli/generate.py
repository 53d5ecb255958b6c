"""``enecg generate``: generative ECG models.

Usage::

    enecg generate train RECIPE.yaml [--KEY=VALUE ...] [--dry-run]   # train + save a Hub-ready model
    enecg generate sample MODEL --label HYP --n 200 --out DIR # WFDB records + labels.csv (marked synthetic)
    enecg generate evaluate MODEL --data DATASET --expert EXPERT --out DIR   # Frechet, HR, QRS width, TSTR

``generate train`` reads the recipe and its ``--KEY=VALUE`` overrides with the package's one config engine
(:mod:`enecg.utils.config`), as ``enecg train`` does: keys are the fields of
:class:`~enecg.generative.train.GenerativeConfig` (``generate train --help-config`` lists them), values are
YAML, ``--KEY VALUE`` works too, and an unknown key is an error naming it. MODEL is a folder written by
``generate train`` or a Hub ID. Samples are read back with
``enecg data prepare wfdb DIR --labels DIR/labels.csv --out DATASET``; they always land in the training part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="Generative ECG models: train, sample synthetic records, evaluate samples.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="generate_command", metavar="ACTION", required=True)

    train = commands.add_parser(
        "train",
        help="Train a generative model (recipe key kind: diffusion | beat) from a YAML recipe.",
        description="Train a generative model from a YAML recipe: `kind` (diffusion, the default, or beat) + that "
        "kind's config keys. --KEY=VALUE flags after the recipe override its keys (YAML values, --KEY VALUE too; "
        "unknown keys are errors). --help-config lists the keys of the recipe's kind (GenerativeConfig / "
        "BeatConfig) with their types, defaults and help.",
        allow_abbrev=False,  # `--dry` must be an (unknown) key, not a prefix of --dry-run
    )
    train.add_argument(
        "recipe", type=Path, nargs="?", help="YAML recipe: `kind` + that kind's config keys (recipes/generate_*.yaml)."
    )
    train.add_argument("--dry-run", action="store_true", help="Print the resolved config as YAML and exit.")
    train.add_argument(
        "--help-config", action="store_true", help="List every config key with its type, default and help."
    )
    # Every other argument is a --KEY=VALUE override (enecg.cli.main hands them over as args.overrides).
    train.set_defaults(func=_train, takes_overrides=True)

    sample = commands.add_parser("sample", help="Write synthetic WFDB records + labels.csv.")
    sample.add_argument("model", help="Model folder or Hub ID.")
    sample.add_argument(
        "--label", action="append", help="Label to condition on (repeat for several); omit: unconditioned."
    )
    sample.add_argument("--n", type=int, required=True, help="Number of records.")
    sample.add_argument("--out", type=Path, required=True, help="Folder for the records (created).")
    sample.add_argument("--seed", type=int, default=0, help="Noise seed (same seed, same records).")
    sample.add_argument("--steps", type=int, help="DDIM steps (default: the model's).")
    sample.add_argument("--guidance", type=float, default=1.0, help="Classifier-free guidance scale.")
    sample.add_argument("--age", type=float, help="Condition on this age (years).")
    sample.add_argument("--sex", type=float, choices=(0.0, 1.0), help="Condition on sex: 0 male, 1 female.")
    sample.set_defaults(func=_sample)

    evaluate = commands.add_parser(
        "evaluate",
        help="Frechet distance, heart rate, QRS width, TSTR vs TRTR, augmentation gain: JSON + PNG.",
    )
    evaluate.add_argument("model", help="Model folder or Hub ID.")
    evaluate.add_argument("--data", required=True, help="Prepared dataset with the model's task.")
    evaluate.add_argument("--expert", required=True, help="Frozen expert (folder or Hub ID) for embeddings.")
    evaluate.add_argument("--out", type=Path, required=True, help="Folder for evaluation.json and figures.")
    evaluate.add_argument(
        "--train-part",
        action="append",
        help="Real training part(s) (TRTR; sample conditions). Default: train.",
    )
    evaluate.add_argument("--test-part", default="test", help="Real test part (never synthetic).")
    evaluate.add_argument(
        "--n-synthetic", type=int, help="Synthetic records (default: as many as labelled training records)."
    )
    evaluate.add_argument("--n-per-label", type=int, default=1, help="12-lead renderings per label.")
    evaluate.add_argument(
        "--augment", action="append", default=[], help="Refit the probe with synthetic records of this label."
    )
    evaluate.add_argument("--augment-n", type=int, default=50, help="Synthetic records per --augment label.")
    evaluate.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    evaluate.add_argument("--steps", type=int, help="DDIM steps (default: the model's).")
    evaluate.add_argument("--guidance", type=float, default=1.0, help="Classifier-free guidance scale.")
    evaluate.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from enecg.generative.base import generative_kinds, recipe_config, train_from_recipe
    from enecg.utils.config import config_help

    if args.help_config:
        # Without a recipe: every kind's keys; with one, the keys of its kind.
        kinds = [recipe_config(args.recipe)[0]] if args.recipe else [generative_kinds.get(n) for n in generative_kinds.names()]
        print("\n\n".join(f"kind: {k.kind}\n{config_help(k.recipe_schema())}" for k in kinds))
        return 0
    if args.recipe is None:
        raise ValueError("enecg generate train needs a recipe: enecg generate train RECIPE.yaml [--KEY=VALUE ...]")
    if args.dry_run:
        kind, config = recipe_config(args.recipe, args.overrides)
        print(yaml.safe_dump({"kind": kind.kind, **config.to_dict()}, sort_keys=False), end="")
        return 0
    # The recipe's `kind` key (default diffusion) picks the registered model kind that trains it.
    folder = train_from_recipe(args.recipe, args.overrides)
    metrics = json.loads((folder / "metrics.json").read_text())
    detail = (
        f"loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}"
        if "final_loss" in metrics
        else f"{metrics.get('records_used', metrics.get('records'))} records"
    )
    print(f"model saved to {folder} ({detail})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from enecg.generative.base import load_generative
    from enecg.generative.sampling import sample_to_folder

    if args.n < 1:  # before loading anything
        raise ValueError(f"--n must be at least 1, got {args.n}")
    model = load_generative(args.model)
    names = sample_to_folder(
        model,
        args.label,
        args.n,
        args.out,
        model_name=str(args.model),
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        age=args.age,
        sex=args.sex,
    )
    print(f"wrote {len(names)} synthetic records to {args.out} (labels in {args.out / 'labels.csv'})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from enecg.generative.evaluate import SampleEvaluationConfig, evaluate_samples

    config = SampleEvaluationConfig(
        model=args.model,
        data=args.data,
        expert=args.expert,
        out=str(args.out),
        train_parts=tuple(args.train_part or ("train",)),
        test_part=args.test_part,
        n_synthetic=args.n_synthetic,
        n_per_label=args.n_per_label,
        augment_labels=tuple(args.augment),
        augment_n=args.augment_n,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
    )
    result = evaluate_samples(config)
    print(json.dumps(result["summary"], indent=2))
    return 0
