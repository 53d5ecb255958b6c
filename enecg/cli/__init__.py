"""The ``enecg`` command line: one entry point, one sub-command group per module.

Each module in :data:`COMMAND_MODULES` defines ``register(subparsers)`` which adds its sub-command(s) with their
own ``--help`` and sets ``func`` (called with the parsed args, returning an exit code). A sub-command that reads a
config file with ``--a.b=c`` overrides (``enecg pretrain``, ``enecg generate train``) sets the default
``takes_overrides=True``: the arguments its parser does not know are then handed to it as ``args.overrides`` (the
config engine, :func:`enecg.utils.config.apply_overrides`, checks them against the schema) instead of being an
error, wherever they stand among its own options.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES: tuple[str, ...] = (
    "enecg.cli.data",
    "enecg.cli.experts",
    "enecg.cli.push",
    "enecg.cli.pretrain",
    "enecg.cli.evaluate",
    "enecg.cli.train",
    "enecg.cli.embed",
    "enecg.cli.seeds",
    "enecg.cli.quickstart",
    "enecg.cli.generate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enecg",
        description="Ensembles of pretrained ECG foundation models: data, experts, training, evaluation, Hub.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        args.overrides = extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        # One clear line for user errors; tracebacks only with --verbose.
        if args.verbose:
            raise
        print(f"enecg: error: {exc}", file=sys.stderr)
        return 2


