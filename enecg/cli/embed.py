"""``enecg embed``: embed a prepared dataset with frozen experts into the feature cache and export a table.

    enecg embed DATASET --experts hubert-ecg-small runs/expert_a --out embeddings/ptbxl [--max-records N]
        [--batch-size 64] [--dtype float32|bfloat16] [--cache-dir DIR] [--splits train validation] [--num-workers 2]
    accelerate launch -m enecg.embed DATASET --experts ... --out DIR      (every process embeds its share)
"""

from __future__ import annotations

import argparse
import logging
import sys

from enecg.training.embed import EmbedConfig, embed_dataset
from enecg.utils.distributed import finish_process_group


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="Prepared dataset folder (enecg data prepare ...).")
    parser.add_argument("--experts", nargs="+", required=True, help="Spec names, Hub IDs or folders (NAME=SOURCE).")
    parser.add_argument("--out", help="Export folder for the table (datasets.load_from_disk); none: cache only.")
    parser.add_argument("--cache-dir", help="Feature cache (default $ENECG_CACHE/features or ~/.cache/enecg/features).")
    parser.add_argument("--splits", nargs="+", help="Dataset parts to embed (default all).")
    parser.add_argument("--max-records", type=int, help="Only the first N records of each part.")
    parser.add_argument("--batch-size", type=int, default=64, help="Records per forward pass (default 64).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="Expert precision.")
    parser.add_argument("--shard-records", type=int, default=1024, help="Records per cache shard (default 1024).")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers per process applying the contracts while it runs the experts (default 0).",
    )
    parser.add_argument("--revision", help="Hub revision for experts given by name.")
    parser.add_argument("--hub-cache-dir", help="Hugging Face cache folder.")
    parser.add_argument("--offline", action="store_true", help="Use the Hugging Face cache only.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")


def config_from(args: argparse.Namespace) -> EmbedConfig:
    return EmbedConfig(
        dataset=args.dataset,
        experts=list(args.experts),
        out=args.out,
        cache_dir=args.cache_dir,
        splits=args.splits,
        max_records=args.max_records,
        batch_size=args.batch_size,
        dtype=args.dtype,
        shard_records=args.shard_records,
        num_workers=args.num_workers,
        revision=args.revision,
        hub_cache_dir=args.hub_cache_dir,
        local_files_only=args.offline,
        progress=not args.no_progress,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="Embed a dataset with frozen experts (feature cache + datasets table).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = embed_dataset(config_from(args))
    if not result.main_process:
        return 0
    print(f"processes: {result.num_processes}, {result.seconds:.1f} s")
    for split, per in result.computed.items():
        print(f"{split}: computed {per}, reused {result.reused[split]}")
    print(f"feature cache: {result.cache_dir}")
    if result.out is not None:
        print(f"table: {result.out}  (datasets.load_from_disk)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m enecg.embed`` / ``accelerate launch -m enecg.embed``: one process per device."""
    parser = argparse.ArgumentParser(prog="python -m enecg.embed", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = run(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"enecg.embed: error: {exc}", file=sys.stderr)
        code = 2
    return finish_process_group(code)
