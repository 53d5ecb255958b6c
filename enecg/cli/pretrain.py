"""``enecg pretrain``: self-supervised pretraining of an in-house encoder from a YAML recipe.

Usage::

    enecg pretrain --config recipes/pretrain_ssl.yaml [--KEY=VALUE ...] [--dry-run]

Every :class:`~enecg.pretraining.pretrainer.PretrainConfig` field is an option (``--help`` lists them with their
help text); an option overrides the recipe's key. Augmentation settings are ``--augmentation.FIELD=VALUE``.
Values are parsed as YAML (``--bandpass=[0.5,40]``, ``--max_steps=null``); string fields are taken verbatim.
An unknown key, in the recipe or on the command line, is an error. For several processes run
``accelerate launch -m enecg.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from enecg.pretraining.augment import AugmentConfig
from enecg.pretraining.pretrainer import PretrainConfig, pretrain

AUGMENTATION_PREFIX = "augmentation."


def _string_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if hints[f.name] is str}


def _value_parser(verbatim: bool) -> Any:
    def parse(text: str) -> Any:
        if verbatim:
            return text
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({exc})") from None

    return parse


def _add_field_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    strings = _string_fields(cls)
    for f in dataclasses.fields(cls):
        if f.name == "augmentation":
            continue  # one option per augmentation field instead (below)
        default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
        parser.add_argument(
            f"--{prefix}{f.name}",
            dest=f"{prefix}{f.name}",
            type=_value_parser(f.name in strings),
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f.metadata.get("help", "") + default,
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="Self-supervised pretraining of an in-house encoder (CMSC + masked reconstruction).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a mistyped key must be an error, not a prefix of another field
    )
    parser.add_argument("--config", type=Path, help="YAML recipe whose keys are PretrainConfig fields.")
    parser.add_argument("--dry-run", action="store_true", help="Print the resolved config as YAML and exit.")
    fields = parser.add_argument_group("config fields (override the recipe)")
    _add_field_options(fields, PretrainConfig)
    _add_field_options(fields, AugmentConfig, AUGMENTATION_PREFIX)
    parser.set_defaults(func=_run)


def resolve_config(recipe: Path | None, overrides: dict[str, Any]) -> PretrainConfig:
    """The recipe's mapping (if any) updated with ``overrides`` (``augmentation.X`` keys go into the nested
    mapping) -> a validated :class:`PretrainConfig`."""
    data: dict[str, Any] = {}
    if recipe is not None:
        try:
            loaded = yaml.safe_load(recipe.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{recipe}: recipe not found") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{recipe}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{recipe}: a recipe must be a mapping of PretrainConfig fields")
        data.update(loaded)
    augmentation = dict(data.get("augmentation") or {})
    for key, value in overrides.items():
        if key.startswith(AUGMENTATION_PREFIX):
            augmentation[key[len(AUGMENTATION_PREFIX) :]] = value
        else:
            data[key] = value
    if augmentation:
        data["augmentation"] = augmentation
    try:
        return PretrainConfig.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{recipe or 'command line'}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    reserved = {"command", "func", "config", "dry_run", "verbose"}
    overrides = {k: v for k, v in vars(args).items() if k not in reserved}
    config = resolve_config(args.config, overrides)
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
