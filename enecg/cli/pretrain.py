"""``enecg pretrain``: self-supervised pretraining of an in-house encoder from a YAML recipe.

Usage::

    enecg pretrain --config recipes/pretrain_ssl.yaml [--KEY=VALUE ...] [--dry-run]

The recipe and the ``--KEY=VALUE`` overrides are read by the package's one config engine
(:mod:`enecg.utils.config`), as ``enecg train`` reads its recipes: keys are the fields of
:class:`~enecg.pretraining.pretrainer.PretrainConfig` (listed below, and by ``--help-config``), nested ones dotted
(``--augmentation.noise_p=1.0``); values are YAML (``--bandpass=[0.5,40]``, ``--max_steps=null``), string keys take
numbers as written (``--name=2024``). ``--KEY VALUE`` works too. The per-field flags of earlier versions
(``--max_records=16``, ``--augmentation.noise_p=1``) are exactly these overrides, so existing command lines keep
working; a key the config does not have, in the recipe or on the command line, is an error naming it. Without
``--config`` every required key comes from the command line (``--data=...``). For several processes run
``accelerate launch -m enecg.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from enecg.pretraining.pretrainer import PretrainConfig, pretrain
from enecg.utils.config import COMMAND_LINE, apply_overrides, config_help, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="Self-supervised pretraining of an in-house encoder (CMSC + masked reconstruction).",
        description=__doc__,
        epilog="config keys (--KEY=VALUE overrides the recipe):\n" + config_help(PretrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--dry` or `--conf` must be an (unknown) key, not a prefix of an option
    )
    parser.add_argument("--config", type=Path, help="YAML recipe whose keys are PretrainConfig fields.")
    parser.add_argument("--dry-run", action="store_true", help="Print the resolved config as YAML and exit.")
    parser.add_argument(
        "--help-config", action="store_true", help="List every config key with its type, default and help."
    )
    # Every other argument is a --KEY=VALUE override (enecg.cli.main hands them over as args.overrides).
    parser.set_defaults(func=_run, takes_overrides=True)


def resolve_config(recipe: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """The recipe (if any) with the ``--KEY=VALUE`` ``overrides`` applied -> a validated :class:`PretrainConfig`;
    errors name the recipe file (or the command line) and the key."""
    if recipe is None:
        data = apply_overrides({}, list(overrides), PretrainConfig)
        return PretrainConfig.from_dict(data, COMMAND_LINE)
    return load_config(recipe, PretrainConfig, list(overrides))


def _run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(config_help(PretrainConfig))
        return 0
    config = resolve_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    folder = pretrain(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrained expert saved to {folder} (load it with enecg.load_expert({str(folder)!r}))")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Multi-process (gloo) jobs abort at interpreter exit about one run in five, after all work is done;
        # leaving without the interpreter's teardown avoids it (see the machine notes on Accelerate).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
