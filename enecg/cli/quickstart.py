"""``enecg quickstart``: the whole enecg mission offline, in a few minutes on 2 CPU cores.

A thin script over the public API, one step after the other (the demo's own choices of data, experts,
recipe and card texts are in :mod:`enecg.cli.quickstart_plan`):

1. **data**: the PTB-XL sample (100 Hz, official strat folds) when found, else a synthetic ECGSYN set;
2. **experts**: small in-house encoders of different architectures, self-supervised on the training part;
3. **Hub**: a loopback Hub-protocol server (storage ``OUT/hub``) gets each expert with its model card;
4. **training**: the MoE ensemble (``recipes/quickstart.yaml``) on the experts given *by Hub ID* at the pushed
   commit, downloaded into a fresh Hub cache under ``OUT`` so every load goes through the Hub protocol;
5. **evaluation**: the test part against a constant predictor and the baselines -> ``report.html``;
6. **sharing**: the ensemble is pushed with its card, pulled back by ID into another fresh cache, and its
   predictions on a few test records must equal the in-memory model's;
7. **summary**: printed and written to ``OUT/quickstart_summary.json``, with the commands a user types next.

Nothing leaves 127.0.0.1: the Hub runs in this process and is shut down at the end (also on errors). Steps
reuse what is still valid: the dataset builders' cache keys, experts whose pretraining inputs are unchanged
(their re-push makes no new commit), the feature cache. The ensemble is retrained each run (same seed, same
weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from enecg.cli.quickstart_plan import (
    DEFAULT_RECIPE,
    HUB_CACHE_DIR,
    build_recipe,
    choose_data_source,
    ensemble_card,
    example_record,
    expert_card,
    next_commands,
    prepare_data,
    pretrain_experts,
    recipe_experts,
)
from enecg.data.build import load_records
from enecg.ensemble import Ensemble, EnsembleConfig, compare_predictions
from enecg.evaluation.baselines import constant_predictor_headlines
from enecg.evaluation.metrics import BootstrapConfig
from enecg.evaluation.summary import compare_with_constant, comparison_lines
from enecg.hub.publish import push_ensemble, push_expert
from enecg.testing.endpoint import fresh_hub_cache, use_endpoint
from enecg.testing.local_hub import LocalHub
from enecg.training.trainer import train
from enecg.utils.files import write_text_atomic
from enecg.utils.version import __version__

logger = logging.getLogger(__name__)

HUB_ORG = "local-org"
ENSEMBLE_REPO = f"{HUB_ORG}/enecg-quickstart-ensemble"
DEFAULT_OUT = "outputs/quickstart"
SUMMARY_FILE = "quickstart_summary.json"
REPORT_BOOTSTRAP, FAST_REPORT_BOOTSTRAP = 200, 100  # patient-level resamples of the report's CIs
N_RELOAD_CHECK_RECORDS = 4
RELOAD_CACHE_DIR = "hf-cache-reload"  # where the pushed ensemble is pulled back (fresh each run)


@dataclass
class QuickstartOptions:
    """What ``enecg quickstart`` runs (its command-line flags)."""

    out: str = field(default=DEFAULT_OUT, metadata={"help": "Output folder (reused by later runs)."})
    data: str = field(
        default="auto",
        metadata={
            "help": "'auto': the PTB-XL sample at $ENECG_DATA_DIR/ptbxl500 or ../shared/data/ptbxl500 when "
            "present, else synthetic; 'synthetic'; or a PTB-XL folder (ptbxl_database.csv, records100/)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic data, pretraining and training."})
    fast: bool = field(
        default=False, metadata={"help": "Fewer steps, epochs and records (tests): weaker models."}
    )
    recipe: str = field(
        default=str(DEFAULT_RECIPE), metadata={"help": "Ensemble-training recipe (experts named there)."}
    )


def run_quickstart(options: QuickstartOptions) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the summary, also written to ``OUT``."""
    # The report's plots import matplotlib: only when the quickstart runs, not at every `enecg` start-up.
    from enecg.evaluation.runner import evaluate_ensemble

    started, out, recipe_path = time.monotonic(), Path(options.out).absolute(), Path(options.recipe)
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path}: quickstart recipe not found (pass --recipe)")
    recipe_data = yaml.safe_load(recipe_path.read_text())
    if not isinstance(recipe_data, dict):
        raise ValueError(f"{recipe_path}: a recipe must be a mapping of sections")
    plans = recipe_experts(recipe_data, recipe_path)
    source = choose_data_source(options.data)
    logger.info("data: %s", source.reason)
    timer = _StepTimer(7)
    out.mkdir(parents=True, exist_ok=True)

    with timer.step("data", f"prepare the dataset ({source.kind})"):
        data_dir, meta = prepare_data(source, out / "data", seed=options.seed, fast=options.fast)
        logger.info("dataset %s: %s", data_dir, meta.splits)

    with timer.step("pretraining", f"pretrain {len(plans)} in-house experts on the training part"):
        folders = pretrain_experts(
            plans, data_dir, meta.cache_key, out / "experts", seed=options.seed, fast=options.fast
        )

    # Everything that talks to the Hub happens inside this block; the server is stopped on the way out.
    with LocalHub(out / "hub") as hub, use_endpoint(hub.url):
        with timer.step("push_experts", f"push the experts to the local Hub {hub.url}"):
            pushed = []
            for plan, repo_id in plans:
                card = expert_card(plan, folders[plan.name], repo_id, source, meta.splits.get("train", 0))
                message = f"enecg quickstart: {plan.name} expert"
                result = push_expert(folders[plan.name], repo_id, card_context=card, commit_message=message)
                assert result is not None  # single process
                state = "new" if result.changed else "unchanged"
                logger.info("pushed %s at %s (%s)", repo_id, result.commit_sha, state)
                pushed.append((plan, repo_id, result.commit_sha))

        with fresh_hub_cache(out / HUB_CACHE_DIR):
            with timer.step("training", "train the MoE ensemble from the experts' Hub IDs (Accelerate)"):
                recipe = build_recipe(
                    recipe_path, recipe_data, data_dir=data_dir, source=source, experts=pushed,
                    output_dir=out / "training", seed=options.seed, fast=options.fast,
                )
                run = train(recipe).run
                if run.model_dir is None:
                    raise RuntimeError(f"{run.run_dir}: training saved no model (output.save_model)")
                loaded = {e.name: (e.hub_id, e.revision) for e in EnsembleConfig.load(run.model_dir).experts}
                mismatched = [p.name for p, repo, sha in pushed if loaded.get(p.name) != (repo, sha)]
                if mismatched:
                    raise RuntimeError(f"experts {mismatched} were not loaded from their pushed Hub commits")

            with timer.step("evaluation", "evaluate on the test part and write the report"):
                ensemble, report_dir = Ensemble.from_pretrained(run.model_dir), out / "report"
                resamples = FAST_REPORT_BOOTSTRAP if options.fast else REPORT_BOOTSTRAP
                evaluation = evaluate_ensemble(
                    ensemble, data_dir, split="test", val_split="validation", train_splits=["train"],
                    feature_cache=Path(run.run_dir) / "feature_cache", n_examples=4, out_dir=report_dir,
                    bootstrap=BootstrapConfig(n_resamples=resamples, seed=options.seed),
                    title=f"enecg quickstart: {meta.source} test part",
                )
                constant = constant_predictor_headlines(data_dir, list(evaluation["tasks"]), seed=options.seed)
                headlines = compare_with_constant(evaluation, constant)

            with timer.step("push_ensemble", f"push the ensemble to {ENSEMBLE_REPO} and pull it back by ID"):
                card = ensemble_card(
                    ensemble, ENSEMBLE_REPO, source=source, meta=meta, run=run, recipe=recipe,
                    recipe_path=recipe_path, evaluation=evaluation,
                )
                published = push_ensemble(
                    run.model_dir, ENSEMBLE_REPO, card_context=card, commit_message="enecg quickstart: ensemble"
                )
                assert published is not None  # single process
                records = load_records(data_dir, "test", N_RELOAD_CHECK_RECORDS)
                with fresh_hub_cache(out / RELOAD_CACHE_DIR) as reload_cache:
                    reloaded = Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=reload_cache)
                    expected, got = ensemble.predict_records(records), reloaded.predict_records(records)
                    check = compare_predictions(expected, got)
                if not check["identical"]:
                    raise RuntimeError(
                        f"{ENSEMBLE_REPO}@{published.commit_sha}: reloaded predictions differ from the trained "
                        f"model's (max |difference| {check['max_abs_difference']})"
                    )
                n = len(records)
                logger.info("pulled %s back by ID: identical predictions on %d test records", ENSEMBLE_REPO, n)
        hub_url = hub.url

    with timer.step("summary", "write the summary"):
        commands = next_commands(out, data_dir, run.model_dir, example_record(source, data_dir, out))
        summary = {
            "enecg_version": __version__,
            "options": dataclasses.asdict(options),
            "data": {
                "source": source.kind, "root": str(source.root) if source.root else None,
                "reason": source.reason, "dataset_dir": str(data_dir), "splits": dict(meta.splits),
            },
            "hub": {"storage": str(out / "hub"), "url_during_run": hub_url, "org": HUB_ORG},
            "experts": [
                {"name": plan.name, "architecture": plan.architecture, "objective": plan.objective,
                 "repo_id": repo_id, "commit": commit, "folder": str(folders[plan.name])}
                for plan, repo_id, commit in pushed
            ],
            "training": {
                "run_dir": run.run_dir, "model_dir": run.model_dir, "epochs_completed": run.epochs_completed,
                "best_epoch": run.best_epoch, "tasks": [task.name for task in recipe.tasks],
                "feature_cache": run.feature_cache,
            },
            "report": {"html": str(report_dir / "report.html"), "json": str(report_dir / "report.json")},
            "ensemble": {
                "repo_id": ENSEMBLE_REPO, "commit": published.commit_sha, "changed": published.changed,
                "reload_check": check,
            },
            "metrics": {"split": "test", "n_records": evaluation["n_records"], "tasks": headlines},
            "strategy": run.strategy.get("name"),
            "next_commands": commands,
            "seconds": {**timer.seconds, "total": round(time.monotonic() - started, 1)},
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        }
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


class _StepTimer:
    """Logs ``[i/N] title`` when a step starts and its duration when it ends; keeps the durations."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.seconds = total, 0, {}

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[None]:
        self.index += 1
        logger.info("[%d/%d] %s", self.index, self.total, title)
        started = time.monotonic()
        yield
        self.seconds[key] = round(time.monotonic() - started, 1)
        logger.info("[%d/%d] %s: done in %.1f s", self.index, self.total, key, self.seconds[key])


def format_summary(summary: Mapping[str, Any], summary_path: Path) -> str:
    """The summary as the lines ``enecg quickstart`` prints."""
    data, hub, training, ensemble = summary["data"], summary["hub"], summary["training"], summary["ensemble"]
    lines = [
        "",
        "enecg quickstart: done",
        f"  data       {data['source']}: {data['dataset_dir']} {data['splits']}",
        f"             ({data['reason']})",
        f"  local Hub  {hub['storage']} (served at {hub['url_during_run']}, now stopped)",
        *(
            f"  expert     {e['repo_id']}@{e['commit'][:12]}  ({e['architecture']}, {e['objective']})"
            for e in summary["experts"]
        ),
        f"  training   {training['run_dir']} (best epoch {training['best_epoch']} of "
        f"{training['epochs_completed']})",
        f"  report     {summary['report']['html']}",
        f"  ensemble   {ensemble['repo_id']}@{ensemble['commit'][:12]} (reloaded by ID: "
        f"{'identical' if ensemble['reload_check']['identical'] else 'DIFFERENT'} predictions)",
        f"  test metrics ({summary['metrics']['n_records']} records) vs a constant predictor fitted on train:",
        *comparison_lines(summary["metrics"]["tasks"]),
        f"  total      {summary['seconds']['total']:.0f} s",
        f"  summary    {summary_path}",
    ]
    if summary.get("next_commands"):
        lines += ["", "next (these commands work as printed):"] + [f"  {c}" for c in summary["next_commands"]]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="Run the whole mission offline: data, experts, local Hub, ensemble training, report, push.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(QuickstartOptions):
        default, help_text = getattr(QuickstartOptions(), f.name), f.metadata["help"]
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(
                f"--{f.name}", type=type(default), default=default, help=f"{help_text} (default %(default)s)"
            )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    names = [f.name for f in dataclasses.fields(QuickstartOptions)]
    options = QuickstartOptions(**{name: getattr(args, name) for name in names})
    with _quiet_http_logs(enabled=not getattr(args, "verbose", False)):
        summary = run_quickstart(options)
    print(format_summary(summary, Path(options.out).absolute() / SUMMARY_FILE))
    return 0


@contextlib.contextmanager
def _quiet_http_logs(enabled: bool) -> Iterator[None]:
    """One INFO line per HTTP request to the local Hub would drown the step log (``--verbose`` keeps them)."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2")] if enabled else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


__all__ = ["ENSEMBLE_REPO", "HUB_ORG", "SUMMARY_FILE", "QuickstartOptions", "format_summary", "run_quickstart"]
