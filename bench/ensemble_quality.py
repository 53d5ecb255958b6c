"""Ensemble quality over folds x seeds: does the gated ensemble beat its members? (``bench_training.py``'s
``ensemble`` section; see ``bench/README.md`` for the protocol and how to read the numbers.)

Protocol, in one pass:

1. **Data**: the PTB-XL sample at 500 Hz, 5 patient-disjoint parts (strat folds {1,2}, ..., {9,10}); run ``i``
   tests on part ``i``, selects (early stopping, thresholds, the validation-chosen single expert) on part
   ``i+1`` and trains on the other three. With ``--pool cinc`` the CinC sample (PTB-XL duplicates dropped,
   SNOMED CT codes mapped to the PTB-XL superclasses) joins every run's *training* part (never validation/test).
2. **Experts**: in-house encoders of four architectures, two pretraining objectives and two input rates
   (:data:`EXPERTS`): three self-supervised (CMSC + masked reconstruction) ONCE on every record of the sample
   without labels (no label of any part is read; the test parts' signals are seen unlabelled: a transductive
   caveat that affects every strategy and baseline alike), one supervised on age per fold on that fold's
   training parts only; all frozen, their embeddings in one shared feature cache.
3. **Runs**: every variant (:data:`VARIANTS`) x fold x seed trains with the shipped light recipe's model and
   optimisation (``recipes/ptbxl_light_ensemble.yaml``) plus the variant's overrides, and is evaluated on its test
   part by :func:`enecg.evaluation.runner.evaluate_ensemble`: the ensemble, the uniform average of its heads,
   the best single expert chosen on validation, a linear probe per expert, the stacker on the probes'
   out-of-fold outputs, and paired patient-level bootstrap CIs of the differences. Variants that differ from
   another only after its head phases reuse that run's finished phases (``output.resume: auto``: the
   heads are the same by construction, only the gate or the fine-tuning is trained anew).
4. **Summary**: mean +- sd over the runs of every row, paired differences (mean +- sd, and how many runs' paired
   95% CIs exclude 0 either way), the gate's routing statistics (how much weights vary across records), and a
   figure.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

LOG = logging.getLogger("bench_training.ensemble")
REPO = Path(__file__).resolve().parents[1]
LIGHT_RECIPE = REPO / "recipes" / "ptbxl_light_ensemble.yaml"
TASKS = ("superclass", "sex", "age")
ROWS = ("ensemble", "uniform average", "best single expert (validation)", "stacker (out-of-fold probes)")
PAIRED = ("best single expert (validation)", "uniform average", "stacker (out-of-fold probes)")


@dataclass(frozen=True)
class ExpertPlan:
    """One in-house expert of the benchmark: self-supervised once (``objective`` cmsc | reconstruction |
    combined), or supervised on a task per fold, on that fold's training parts only (``objective`` ``task:NAME``,
    created by the recipe's ``create:`` mechanism)."""

    name: str
    architecture: str
    objective: str
    fs: float
    window_length: int  # samples per window
    steps: int

    @property
    def supervised_task(self) -> str | None:
        return self.objective.split(":", 1)[1] if self.objective.startswith("task:") else None


EXPERTS: tuple[ExpertPlan, ...] = (
    ExpertPlan("simplenet", "SimpleNet", "combined", 100.0, 500, 300),
    ExpertPlan("parallelcnn", "ParallelCNN", "combined", 100.0, 500, 300),
    # 500 Hz: 2.5-s windows (a 10-s record gives four adjacent segments for CMSC) keep pretraining affordable.
    ExpertPlan("attianet500", "AttiaNet", "combined", 500.0, 1250, 250),
    ExpertPlan("parallelcnnew_age", "ParallelCNNew", "task:age", 100.0, 1000, 150),
)

# name -> (recipe overrides as dotted keys, variant whose finished phases this one reuses, phases it re-runs)
VARIANTS: dict[str, tuple[dict[str, Any], str | None, tuple[str, ...]]] = {
    # Stages 1 and 2 only: heads on their own losses, the gate on out-of-fold predictions.
    "staged": ({"model.strategy.finetune_epochs": 0}, None, ()),
    # The shipped default (ptbxl_light_ensemble.yaml as committed): + stage 3, joint fine-tuning at lr x 0.1
    # for 10 epochs, kept only if validation improves.
    "staged_finetune": ({}, "staged", ("finetune",)),
    # EnECG's joint training with the gate as main had it (signal gate, random router start, shared weights).
    "joint": (
        {
            "model.strategy.name": "joint",
            "model.gate.input": "signal",
            "model.gate.per_task": False,
            "model.gate.init_uniform": False,
            "model.gate.routing_penalty": 0.0,
            "model.gate.hidden_sizes": [64],
            "model.heads.hidden_sizes": [128, 128],
            "model.heads.dropout": 0.1,
        },
        None,
        (),
    ),
    # Stages 1 and 2 with the paper's raw-signal gate (lead II) instead of the shipped embedding gate.
    "staged_signal_gate": (
        {
            "model.strategy.finetune_epochs": 0,
            "model.gate.input": "signal",
            "model.gate.hidden_sizes": [64],
            "model.gate.routing_penalty": 0.0,
        },
        "staged",
        ("gate",),
    ),
    # Stages 1 and 2 with one learned weight vector per task for every record (no routing).
    "staged_global_gate": (
        {"model.strategy.finetune_epochs": 0, "model.gate.input": "global"},
        "staged",
        ("gate",),
    ),
}
DEFAULT_VARIANT = "staged_finetune"


# ----------------------------------------------------------------------------------------------- preparation


def prepare_data(data_dir: Path, work: Path, quick: bool) -> Path:
    """The PTB-XL sample at 500 Hz with k-fold parts (built once under ``work``)."""
    from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

    ptbxl = data_dir / "ptbxl500"
    if not (ptbxl / "ptbxl_database.csv").is_file():
        raise FileNotFoundError(f"{ptbxl}: PTB-XL sample not found (set ENECG_DATA_DIR or --data-dir)")
    out = work / "data" / "ptbxl500-500hz-kfold5"
    prepare_ptbxl(ptbxl, out, PtbxlOptions(rate=500, tasks=TASKS, kfold=5))
    return out


def pretrain_experts(dataset_dir: Path, work: Path, quick: bool, seed: int = 0) -> dict[str, Path]:
    """Every expert pretrained once, self-supervised, on all records of the sample (reused when present)."""
    from enecg.data.build import load_dataset_dir
    from enecg.experts.inhouse import EXPERT_SPEC_FILE
    from enecg.pretraining.pretrainer import PretrainConfig, pretrain

    _, meta = load_dataset_dir(dataset_dir)
    folders = {}
    for index, plan in enumerate(EXPERTS):
        folder = work / "experts" / plan.name
        if plan.supervised_task is not None:
            folders[plan.name] = folder  # created per fold by the trainer (training parts only)
            continue
        if not (folder / EXPERT_SPEC_FILE).is_file():
            started = time.perf_counter()
            pretrain(
                PretrainConfig(
                    data=str(dataset_dir),
                    splits=tuple(sorted(meta.splits)),
                    max_records=32 if quick else None,
                    architecture=plan.architecture,
                    width_multiplier=0.25 if quick else 0.5,
                    embedding_dim=16 if quick else 64,
                    fs=plan.fs,
                    window_length=plan.window_length,
                    objective=plan.objective,
                    batch_size=32,
                    max_steps=3 if quick else plan.steps,
                    lr=2e-3,
                    warmup_fraction=0.1,
                    seed=seed + index,
                    log_every=10_000,
                    output_dir=str(folder),
                    name=f"bench-{plan.name}",
                    overwrite=True,
                )
            )
            LOG.info("pretrained %s in %.0f s", plan.name, time.perf_counter() - started)
        folders[plan.name] = folder
    return folders


def pool_dataset(args: Any, work: Path, dataset_dir: Path) -> Path | None:
    """With ``--pool cinc``: the CinC sample prepared with PTB-XL superclass labels (duplicates of PTB-XL dropped),
    to join every run's training part."""
    if args.pool != "cinc":
        return None
    from enecg.data.cinc import CincOptions, prepare_cinc

    cinc = args.data_dir / "cinc"
    out = work / "data" / "cinc-superclass"
    prepare_cinc(cinc, out, CincOptions(tasks=("superclass", "age", "sex"), ptbxl_root=str(args.data_dir / "ptbxl500")))
    return out


# ------------------------------------------------------------------------------------------------------- runs


def _set(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    node = recipe
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def run_recipe(
    dataset_dir: Path,
    experts: dict[str, Path],
    cache_dir: Path,
    out_dir: Path,
    *,
    fold: int,
    seed: int,
    overrides: dict[str, Any],
    quick: bool,
    pool_dir: Path | None,
) -> dict[str, Any]:
    """The light recipe (model, optimisation) on the benchmark's data and experts for one fold and seed."""
    recipe = yaml.safe_load(LIGHT_RECIPE.read_text())
    recipe["data"] = {
        "path": str(dataset_dir),
        "kfold": 5,
        "folds": [fold],
        "cache_dir": str(cache_dir),
        "feature_cache": "on",
        "max_records": 24 if quick else None,
    }
    if pool_dir is not None:
        recipe["data"]["extra_train"] = [str(pool_dir)]
    plans = {p.name: p for p in EXPERTS}
    recipe["experts"] = []
    for name, folder in experts.items():
        entry: dict[str, Any] = {"name": name, "source": str(folder)}
        plan = plans.get(name)
        if plan is not None and plan.supervised_task is not None:
            entry["create"] = {
                "architecture": plan.architecture,
                "width_multiplier": 0.25 if quick else 0.5,
                "embedding_dim": 16 if quick else 64,
                "fs": plan.fs,
                "input_length": plan.window_length,
                "pretrain_task": plan.supervised_task,
                "pretrain_steps": 2 if quick else plan.steps,
                "pretrain_lr": 3e-3,
            }
        recipe["experts"].append(entry)
    recipe["optim"]["seed"] = seed
    if quick:
        recipe["optim"]["epochs"] = 2
        recipe["model"]["strategy"]["oof_folds"] = 2
    recipe["evaluation"] = {"bootstrap_resamples": 0, "report": False}
    recipe["output"] = {
        "dir": str(out_dir),
        "resume": "auto",
        "checkpoint_every_steps": None,
        "keep_checkpoints": 1,
    }
    recipe["hub"] = {"push": False}
    recipe["tracking"] = {"log_with": []}
    for key, value in overrides.items():
        _set(recipe, key, value)
    return recipe


def train_and_evaluate(recipe_dict: dict[str, Any], dataset_dir: Path, resamples: int) -> dict[str, Any]:
    """Train one run and evaluate its saved model on its test part (every baseline, paired CIs)."""
    from accelerate.state import AcceleratorState

    from enecg.ensemble.model import Ensemble
    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.evaluation.report import headline
    from enecg.training.recipe import parse_recipe_dict
    from enecg.training.trainer import train

    AcceleratorState._reset_state(True)  # each train() call is its own run
    started = time.perf_counter()
    result = train(parse_recipe_dict(copy.deepcopy(recipe_dict)))
    train_s = time.perf_counter() - started
    run = result.run
    model = Ensemble.from_pretrained(run.model_dir)
    from enecg.evaluation.runner import evaluate_ensemble
    from enecg.training.data import plan_runs

    plan = plan_runs(parse_recipe_dict(copy.deepcopy(recipe_dict)))[0]
    started = time.perf_counter()
    evaluation = evaluate_ensemble(
        model,
        dataset_dir,
        split=run.test_part,
        val_split=run.validation_part,
        train_splits=plan.train_parts,
        feature_cache=recipe_dict["data"]["cache_dir"],
        bootstrap=BootstrapConfig(n_resamples=resamples, seed=run.seed),
        n_examples=0,
        out_dir=Path(run.run_dir) / "report",
        extra_train=recipe_dict["data"].get("extra_train") or (),
    )
    rows: dict[str, dict[str, float | None]] = {
        "ensemble": {t: headline(r)[1] for t, r in evaluation["tasks"].items()}
    }
    for name, per_task in evaluation["baselines"].items():
        rows[name] = {t: headline(r)[1] for t, r in per_task.items()}
    gate = evaluation["gate"]
    return {
        "test_part": run.test_part,
        "n_test": evaluation["n_records"],
        "rows": rows,
        "paired": {
            task: {
                name: {k: d[k] for k in ("difference", "ci", "better", "metric", "higher_is_better")}
                for name, d in per.items()
            }
            for task, per in evaluation["paired"].items()
        },
        "best_single_expert": evaluation["baseline_details"].get("best_single_expert"),
        "gate": {
            "mean_weights": gate["mean_weights"],
            "std_weights": gate["std_weights"],
            # How much the weights move from record to record: the mean over experts of the per-record sd.
            "record_sd": {t: float(np.mean(list(w.values()))) for t, w in gate["std_weights"].items()},
        },
        "strategy": {
            "final_phase": run.strategy.get("final_phase"),
            "best_epochs": {
                name: {g: s["best_epoch"] for g, s in phase["groups"].items()}
                for name, phase in (run.strategy.get("phases") or {}).items()
            },
        },
        "train_s": train_s,
        "evaluate_s": time.perf_counter() - started,
    }


def _reuse(source: Path, target: Path, rerun: Sequence[str]) -> None:
    """Start ``target`` from a copy of the finished run ``source`` without the phases it re-runs."""
    if target.exists() or not source.is_dir():
        return
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model", "report", *rerun))


# ---------------------------------------------------------------------------------------------------- summary


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if array.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if array.size > 1 else None,
        "n": int(array.size),
        "values": [round(float(v), 5) for v in array],
    }


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and task: mean +- sd of every row, paired differences, routing statistics."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        per_task: dict[str, Any] = {}
        for task in TASKS:
            if not all(task in r["rows"]["ensemble"] for r in mine):
                continue
            names = [n for n in mine[0]["rows"] if task in mine[0]["rows"][n]]
            rows = {name: _stats([r["rows"][name].get(task) for r in mine]) for name in names}
            paired = {}
            for name in PAIRED:
                diffs = [r["paired"][task][name] for r in mine if name in r["paired"].get(task, {})]
                if not diffs:
                    continue
                higher = diffs[0]["higher_is_better"]
                paired[name] = {
                    **_stats([d["difference"] for d in diffs]),
                    "ensemble_better_ci": sum(d["better"] == "a" for d in diffs),
                    "baseline_better_ci": sum(d["better"] == "b" for d in diffs),
                    "ensemble_better_point": sum((d["difference"] > 0) == higher for d in diffs),
                }
            per_task[task] = {
                "metric": mine[0]["paired"][task][PAIRED[0]]["metric"] if mine[0]["paired"].get(task) else None,
                "rows": rows,
                "paired": paired,
                "gate_record_sd": _stats([r["gate"]["record_sd"].get(task) for r in mine]),
            }
        out[variant] = {
            "n_runs": len(mine),
            "tasks": per_task,
            "train_s": _stats([r["train_s"] for r in mine]),
        }
    return out


def targets(runs: Sequence[dict[str, Any]], default: str = DEFAULT_VARIANT) -> dict[str, Any]:
    """The issue's targets for the shipped default, met or not, with the margins.

    The single-expert and uniform references come from the ``staged`` runs of the same fold and seed: their heads
    are exactly each expert trained alone (stage 1), whereas a fine-tuned variant's own heads have been moved by
    the joint stage and understate the experts. Differences are paired per run (mean +- sd over the runs)."""
    reference = {(r["fold"], r["seed"]): r for r in runs if r["variant"] == "staged"}
    mine = [r for r in runs if r["variant"] == default and (r["fold"], r["seed"]) in reference]
    out: dict[str, Any] = {"variant": default, "references_from": "staged (stage-1 heads = each expert alone)"}
    if not mine:
        return out

    def paired(task: str, baseline: str, higher: bool) -> dict[str, Any]:
        values = []
        for r in mine:
            a, b = r["rows"]["ensemble"].get(task), reference[(r["fold"], r["seed"])]["rows"][baseline].get(task)
            if a is not None and b is not None:
                values.append(a - b if higher else b - a)  # positive: the ensemble is better
        return _stats(values)

    best, uniform = "best single expert (validation)", "uniform average"
    sc_best, sc_uniform = paired("superclass", best, True), paired("superclass", uniform, True)
    if sc_best["n"]:
        out["superclass_vs_best_single_plus_0.01"] = {
            "ensemble_minus_best_single": sc_best,
            "margin": sc_best["mean"] - 0.01,
            "met": sc_best["mean"] >= 0.01,
        }
        out["superclass_vs_uniform"] = {"ensemble_minus_uniform": sc_uniform, "met": sc_uniform["mean"] > 0}
    for task, higher in (("sex", True), ("age", False)):
        diff = paired(task, best, higher)
        if diff["n"]:
            out[f"{task}_no_worse_than_best_single"] = {
                "ensemble_better_by": diff,
                "met": diff["mean"] >= 0,
            }
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    """One panel per task: every variant's ensemble and baselines (mean +- sd over runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5.2 * len(TASKS), 4.2))
    colours = {"ensemble": "#d62728", ROWS[1]: "#1f77b4", ROWS[2]: "#2ca02c", ROWS[3]: "#9467bd"}
    for ax, task in zip(np.atleast_1d(axes), TASKS):
        for v, variant in enumerate(variants):
            rows = summary[variant]["tasks"].get(task, {}).get("rows", {})
            for r, name in enumerate(ROWS):
                stat = rows.get(name)
                if not stat or stat["mean"] is None:
                    continue
                x = v + (r - 1.5) * 0.18
                ax.errorbar(
                    x,
                    stat["mean"],
                    yerr=stat["sd"] or 0.0,
                    fmt="o",
                    color=colours[name],
                    label=name if v == 0 else None,
                    capsize=3,
                )
        metric = "MAE (years, lower is better)" if task == "age" else "AUROC (macro for superclass)"
        ax.set_title(f"{task}: {metric}")
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("PTB-XL sample, 5 folds x seeds: mean +- sd over runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------- main


def bench_ensemble(args: Any, work: Path) -> dict[str, Any]:
    """The whole protocol; per-run results are kept in ``work/runs.jsonl`` so an interrupted bench resumes."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset_dir = prepare_data(args.data_dir, work, args.quick)
    t0 = time.perf_counter()
    experts = pretrain_experts(dataset_dir, work, args.quick)
    pretrain_s = time.perf_counter() - t0
    pool_dir = pool_dataset(args, work, dataset_dir)
    cache_dir = work / "features"
    # Pooled runs train on other records: their own run folders and results log (experts and cache are shared).
    tag = "" if pool_dir is None else f"-pool-{args.pool}"
    log = work / f"runs{tag}.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            done[(row["variant"], row["fold"], row["seed"])] = row
    runs = []
    order = sorted(args.variants, key=lambda v: VARIANTS[v][1] is not None)  # reused variants after their source
    for fold in args.folds:
        for seed in args.seeds:
            for variant in order:
                key = (variant, fold, seed)
                if key in done:
                    runs.append(done[key])
                    continue
                overrides, source, rerun = VARIANTS[variant]
                out_dir = work / f"runs{tag}" / variant / f"fold{fold}-seed{seed}"
                if source is not None:
                    _reuse(work / f"runs{tag}" / source / f"fold{fold}-seed{seed}", out_dir, rerun)
                recipe = run_recipe(
                    dataset_dir,
                    experts,
                    cache_dir,
                    out_dir,
                    fold=fold,
                    seed=seed,
                    overrides=overrides,
                    quick=args.quick,
                    pool_dir=pool_dir,
                )
                row = {"variant": variant, "fold": fold, "seed": seed, **train_and_evaluate(
                    recipe, dataset_dir, args.bootstrap
                )}
                LOG.info(
                    "%s fold %d seed %d: superclass ensemble %.3f | uniform %.3f | best single %.3f (%.0f s)",
                    variant,
                    fold,
                    seed,
                    row["rows"]["ensemble"].get("superclass") or math.nan,
                    row["rows"]["uniform average"].get("superclass") or math.nan,
                    (row["rows"].get("best single expert (validation)") or {}).get("superclass") or math.nan,
                    row["train_s"] + row["evaluate_s"],
                )
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                runs.append(row)
    summary = summarise(runs)
    figure = args.out.with_name(f"{args.out.stem}{tag.replace('-', '_')}.png") if args.figure else None
    if figure is not None:
        plot(summary, figure)
    return {
        "protocol": __doc__.split("Protocol, in one pass:")[1].strip(),
        "dataset": str(dataset_dir),
        "pool": args.pool,
        "experts": {p.name: p.__dict__ for p in EXPERTS},
        "variants": {name: {"overrides": o, "reuses": s, "reruns": list(r)} for name, (o, s, r) in VARIANTS.items()
                     if name in args.variants},
        "recipe": str(LIGHT_RECIPE.relative_to(REPO)),
        "folds": list(args.folds),
        "seeds": list(args.seeds),
        "bootstrap_resamples": args.bootstrap,
        "runs": runs,
        "summary": summary,
        "targets": targets(runs),
        "figure": str(figure.relative_to(REPO)) if figure is not None and figure.is_relative_to(REPO) else (
            str(figure) if figure else None),
        "pretrain_s": pretrain_s,
        "section_s": time.perf_counter() - started,
    }
