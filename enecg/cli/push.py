"""``enecg push``: upload a saved model folder to the Hub in one commit (weights, configs, card, plots only).

enecg push OUTPUT_DIR ORG/NAME [--private] [--token TOKEN] [--message MSG] [--revision BRANCH] [--validate]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from enecg.hub.upload import ALLOW_PATTERNS, push_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Push a saved ensemble or expert folder to the Hugging Face Hub (one commit).",
        description=(
            "Upload OUTPUT_DIR to the model repo ORG/NAME in a single commit, creating the repo if needed. Only "
            f"{' '.join(ALLOW_PATTERNS)} files are sent; training checkpoints, optimizer/RNG states and pickles "
            "never are. The Hub is HF_ENDPOINT (default huggingface.co); the token is HF_TOKEN or your saved login."
        ),
    )
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="Saved model folder (must hold config.json)."
    )
    parser.add_argument("repo_id", metavar="ORG/NAME", help="Hub model repo to push to.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private (when it is new).")
    parser.add_argument(
        "--token",
        default=None,
        help="Hub token (prefer the HF_TOKEN environment variable: arguments end up in shell history).",
    )
    parser.add_argument(
        "--message", default=None, help="Commit message (default: 'Upload <folder> with enecg')."
    )
    parser.add_argument(
        "--revision", default=None, help="Branch to commit to (created from main if missing)."
    )
    parser.add_argument(
        "--validate", action="store_true", help="Check README.md with the Hub's model card validation first."
    )
    parser.set_defaults(func=run_push)


def _is_ensemble_folder(folder: str) -> bool:
    """A folder written by ``Ensemble.save_pretrained`` (its config lists experts and tasks)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"experts", "tasks", "format_version"} <= set(config)


def run_push(args: argparse.Namespace) -> int:
    options = dict(
        private=args.private,
        token=args.token,
        commit_message=args.message,
        revision=args.revision,
        validate=args.validate,
    )
    if _is_ensemble_folder(args.output_dir):
        # Ensembles go through push_ensemble so the card's loading snippet names the target repo.
        from enecg.hub.publish import push_ensemble

        result = push_ensemble(args.output_dir, args.repo_id, **options)
    else:
        result = push_folder(args.output_dir, args.repo_id, **options)
    assert result is not None  # the CLI is a single process
    state = "pushed" if result.changed else "already up to date"
    print(f"{result.repo_id}: {state}, {len(result.files)} files at commit {result.commit_sha}")
    print(result.url)
    return 0
