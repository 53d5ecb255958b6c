"""What ``enecg quickstart`` runs: the data it uses, the in-house experts it pretrains, the recipe it trains, the
words on the cards it pushes and the commands it suggests next. These are the demo's own choices;
:mod:`enecg.cli.quickstart` runs them, in the order of the mission, through the public API.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from enecg.data.build import load_records
from enecg.data.ptbxl import DATABASE_CSV, PtbxlOptions, prepare_ptbxl, record_header
from enecg.data.schema import DatasetMeta
from enecg.data.synthetic import SyntheticOptions, prepare_synthetic
from enecg.ensemble import Ensemble
from enecg.experts.inhouse import EXPERT_SPEC_FILE
from enecg.hub.cards import (
    DatasetCardInfo,
    EnsembleCardContext,
    EvaluationSummary,
    ExpertCardContext,
    TrainingSummary,
)
from enecg.hub.publish import ensemble_card_context, expert_card_context
from enecg.io import write_wfdb
from enecg.pretraining.pretrainer import PretrainConfig, pretrain
from enecg.training.recipe import Recipe, parse_recipe_dict
from enecg.training.trainer import RunResult
from enecg.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

_CHECKOUT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
# A source checkout's recipe, else the copy shipped in the wheel (the package enecg.recipes).
DEFAULT_RECIPE = (
    _CHECKOUT_RECIPE
    if _CHECKOUT_RECIPE.is_file()
    else Path(str(importlib.resources.files("enecg.recipes") / "quickstart.yaml"))
)
DataKind = Literal["ptbxl", "synthetic"]
HUB_CACHE_DIR = "hf-cache"  # where training and evaluation download experts (fresh each run)
DATA_ENV = "ENECG_DATA_DIR"
PTBXL_SAMPLE = "ptbxl500"
# The synthetic set's tasks (the recipe's are PTB-XL's): one of each kind the ensemble supports. Not sex: the
# simulator ties it to voltage and QRS width only weakly, and a task nothing beats chance on demonstrates little.
SYNTHETIC_RECIPE_TASKS = (
    {"name": "rhythm"},
    {"name": "morphology"},
    {"name": "heart_rate", "regression_loss": "huber"},
    {"name": "noisy"},
)
SYNTHETIC_RECORDS, FAST_SYNTHETIC_RECORDS = 240, 160  # ~0.5 s of CPU each (ECGSYN)
FAST_EPOCHS = 15


@dataclass(frozen=True)
class DataSource:
    """Where the quickstart's records come from, and why."""

    kind: DataKind
    root: Path | None  # the PTB-XL folder; None for synthetic
    reason: str


@dataclass(frozen=True)
class ExpertPlan:
    """One in-house expert the quickstart pretrains (self-supervised, short) and pushes to the local Hub."""

    name: str
    architecture: str
    objective: str  # cmsc | reconstruction | combined (enecg.pretraining.objectives)
    steps: int
    fast_steps: int
    width_multiplier: float = 0.5
    embedding_dim: int = 64

    def config(self, data_dir: Path, folder: Path, *, seed: int, fast: bool) -> PretrainConfig:
        """This expert's pretraining config (training part only)."""
        steps = self.fast_steps if fast else self.steps
        return PretrainConfig(
            data=str(data_dir),
            splits=("train",),
            architecture=self.architecture,
            width_multiplier=self.width_multiplier,
            embedding_dim=self.embedding_dim,
            fs=100.0,
            window_length=500,  # 5 s windows: a 10-s record gives the two adjacent segments CMSC contrasts
            objective=self.objective,
            batch_size=32,
            max_steps=steps,
            lr=2e-3,
            warmup_fraction=0.1,
            seed=seed,
            log_every=max(1, steps // 4),
            output_dir=str(folder),
            name=f"enecg-quickstart-{self.name}",
            overwrite=True,  # only reached when the folder's expert is stale (see pretrain_experts)
        )


# Three architectures, each pretrained with both objectives (CMSC + masked reconstruction): an ensemble gains over
# its best member only when the members are about as good and err differently (a reconstruction-only expert
# probed at 0.70 macro AUROC against 0.83-0.86 and dragged every mix below its best member). None fuses age/sex:
# they are prediction targets here, so feeding them to an expert would leak.
QUICKSTART_EXPERTS: tuple[ExpertPlan, ...] = (
    ExpertPlan("simplenet", "SimpleNet", "combined", steps=300, fast_steps=40),
    ExpertPlan("parallelcnn", "ParallelCNN", "combined", steps=300, fast_steps=30),
    ExpertPlan("attianet", "AttiaNet", "combined", steps=300, fast_steps=30),
)


def choose_data_source(
    data: str,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    repo_root: Path | None = None,
) -> DataSource:
    """Resolve ``--data``: ``auto``, ``synthetic`` or a PTB-XL folder (or a folder holding ``ptbxl500/``).

    ``auto`` looks at ``$ENECG_DATA_DIR/ptbxl500`` when the variable is set (it then overrides the default
    location, as in the tests), else at ``../shared/data/ptbxl500`` relative to the working directory and to the
    repository; the first PTB-XL folder found wins, and without one the synthetic set is used."""
    if data == "synthetic":
        return DataSource("synthetic", None, "--data synthetic")
    if data != "auto":
        for folder in (Path(data).expanduser(), Path(data).expanduser() / PTBXL_SAMPLE):
            if (folder / DATABASE_CSV).is_file():
                return DataSource("ptbxl", folder.resolve(), f"--data {data}")
        raise FileNotFoundError(
            f"{Path(data).expanduser()}: not a PTB-XL folder (no {DATABASE_CSV} there or in "
            f"{PTBXL_SAMPLE}/); use --data auto or --data synthetic"
        )
    environ = os.environ if environ is None else environ
    repo_root = Path(__file__).resolve().parents[2] if repo_root is None else repo_root
    candidates = (
        [(Path(environ[DATA_ENV]) / PTBXL_SAMPLE, f"${DATA_ENV}")]
        if environ.get(DATA_ENV)
        else [
            (
                (cwd or Path.cwd()) / ".." / "shared" / "data" / PTBXL_SAMPLE,
                "../shared/data relative to the working directory",
            ),
            (
                repo_root / ".." / "shared" / "data" / PTBXL_SAMPLE,
                "../shared/data relative to the repository",
            ),
        ]
    )
    for folder, where in candidates:
        if (folder / DATABASE_CSV).is_file():
            return DataSource("ptbxl", folder.resolve(), f"--data auto: PTB-XL sample found via {where}")
    looked = ", ".join(str(folder) for folder, _ in candidates)
    return DataSource("synthetic", None, f"--data auto: no PTB-XL sample at {looked}; using synthetic ECGs")


def prepare_data(source: DataSource, data_root: Path, *, seed: int, fast: bool) -> tuple[Path, Any]:
    """Build (or reuse, by cache key) the dataset folder; returns ``(folder, DatasetMeta)``."""
    if source.kind == "ptbxl":
        folder = data_root / "ptbxl500-100hz"
        _, meta = prepare_ptbxl(source.root, folder, PtbxlOptions(rate=100))  # all records, strat folds
        return folder, meta
    n_records = FAST_SYNTHETIC_RECORDS if fast else SYNTHETIC_RECORDS
    folder = data_root / f"synthetic-{n_records}-seed{seed}"
    # 500 Hz (the experts' 100 Hz contracts resample): at 100 Hz neurokit2's ECGSYN resamples its RR series with
    # trailing zeros and can loop forever on a record (seed 0: record 22).
    options = SyntheticOptions(
        seed=seed, n_records=n_records, rate=500, validation_fraction=0.2, test_fraction=0.2
    )
    _, meta = prepare_synthetic(folder, options)
    return folder, meta


def dataset_card_info(source: DataSource) -> DatasetCardInfo:
    """The dataset as the model cards show it."""
    if source.kind == "synthetic":
        return DatasetCardInfo(
            name="enecg synthetic ECGs (ECGSYN via neurokit2; simulated, not clinical data)"
        )
    return DatasetCardInfo(
        name="PTB-XL (records 1-500, 100 Hz)",
        url="https://physionet.org/content/ptb-xl/1.0.3/",
        license="cc-by-4.0",
        citation="@article{wagner2020ptbxl, title={PTB-XL, a large publicly available electrocardiography "
        "dataset}, author={Wagner, Patrick and Strodthoff, Nils and Bousseljot, Ralf-Dieter and others}, "
        "journal={Scientific Data}, volume={7}, pages={154}, year={2020}}",
    )


def _split_method(source: DataSource) -> str:
    if source.kind == "ptbxl":
        return "PTB-XL strat_fold 1-8 train / 9 validation / 10 test (patient-wise)"
    return "synthetic patients: random patient-level hold-out 60 / 20 / 20 %"


def recipe_experts(recipe_data: Mapping[str, Any], recipe_path: Path) -> list[tuple[ExpertPlan, str]]:
    """The recipe's experts as ``(plan, Hub repo id)``: each name must be a quickstart expert, each source the
    ``ORG/NAME`` the quickstart pushes it to."""
    plans = {plan.name: plan for plan in QUICKSTART_EXPERTS}
    entries = recipe_data.get("experts") or []
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{recipe_path}: 'experts' must list the quickstart experts by name")
    out = []
    for entry in entries:
        name, source = (entry or {}).get("name"), (entry or {}).get("source")
        if name not in plans:
            raise ValueError(
                f"{recipe_path}: expert {name!r} is not one the quickstart pretrains; known: {sorted(plans)}"
            )
        if not isinstance(source, str) or source.count("/") != 1 or Path(source).exists():
            raise ValueError(f"{recipe_path}: expert {name!r}: source must be the Hub ID ORG/NAME to push to")
        out.append((plans[name], source))
    return out


def pretrain_experts(
    plans: list[tuple[ExpertPlan, str]],
    data_dir: Path,
    dataset_key: str,
    experts_dir: Path,
    *,
    seed: int,
    fast: bool,
) -> dict[str, Path]:
    """Pretrain each expert into ``experts_dir/<name>``, or reuse it when its config and dataset are unchanged
    (recorded next to the folder, not in it: the folder is what gets pushed)."""
    folders = {}
    for index, (plan, _) in enumerate(plans):
        folder = experts_dir / plan.name
        config = plan.config(data_dir, folder, seed=seed + index, fast=fast)
        inputs = {"pretraining_config": config.to_dict(), "dataset_cache_key": dataset_key}
        stamp = experts_dir / f"{plan.name}.inputs.json"
        if (
            (folder / EXPERT_SPEC_FILE).is_file()
            and stamp.is_file()
            and json.loads(stamp.read_text()) == inputs
        ):
            logger.info("expert %s: pretraining inputs unchanged, reusing %s", plan.name, folder)
        else:
            logger.info(
                "expert %s: %s, %s objective, %d steps on the training part",
                plan.name,
                plan.architecture,
                plan.objective,
                config.max_steps,
            )
            stamp.unlink(missing_ok=True)
            pretrain(config)
            write_text_atomic(stamp, json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        folders[plan.name] = folder
    return folders


def build_recipe(
    recipe_path: Path,
    recipe_data: Mapping[str, Any],
    *,
    data_dir: Path,
    source: DataSource,
    experts: list[tuple[ExpertPlan, str, str]],
    output_dir: Path,
    seed: int,
    fast: bool,
) -> Recipe:
    """The training recipe: the file's settings with the run's data folder, the pushed experts (Hub ID + commit),
    the data source's tasks, output folder, seed and (``fast``) epochs."""
    data = json.loads(json.dumps(recipe_data))  # a deep copy of plain YAML values
    data.setdefault("data", {})["path"] = str(data_dir)
    data["experts"] = [
        {"name": plan.name, "source": repo_id, "revision": commit} for plan, repo_id, commit in experts
    ]
    if source.kind == "synthetic":
        data["tasks"] = [dict(task) for task in SYNTHETIC_RECIPE_TASKS]
    data.setdefault("output", {})["dir"] = str(output_dir)
    optim = data.setdefault("optim", {})
    optim["seed"] = seed
    if fast:
        optim["epochs"] = min(int(optim.get("epochs", FAST_EPOCHS)), FAST_EPOCHS)
    return parse_recipe_dict(data, source=str(recipe_path))


def expert_card(
    plan: ExpertPlan, folder: Path, repo_id: str, source: DataSource, n_train: int
) -> ExpertCardContext:
    """The card of a pretrained quickstart expert pushed to ``repo_id``."""
    return expert_card_context(
        folder,
        repo_id,
        architecture=f"{plan.architecture} (enecg light CNN family), width x{plan.width_multiplier:g}, "
        f"{plan.embedding_dim}-d embedding; trained by `enecg quickstart` as a small demonstration expert.",
        datasets=[dataset_card_info(source)],
        training=TrainingSummary(
            splits={"train": n_train},
            split_method=_split_method(source) + "; pretraining reads the training part only",
        ),
        tags=["self-supervised", "enecg-quickstart"],
    )


def ensemble_card(
    ensemble: Ensemble,
    repo_id: str,
    *,
    source: DataSource,
    meta: DatasetMeta,
    run: RunResult,
    recipe: Recipe,
    recipe_path: Path,
    evaluation: Mapping[str, Any],
) -> EnsembleCardContext:
    """The card of the quickstart's ensemble: a demonstration, with its test results against the baselines."""
    return ensemble_card_context(
        ensemble,
        repo_id,
        description=(
            "A small demonstration ensemble made by `enecg quickstart`: in-house experts pretrained "
            "for a few steps, heads with LoRA and a signal gate trained for minutes on a CPU. It shows "
            "the workflow; it is not a clinically useful model."
        ),
        datasets=[dataset_card_info(source)],
        training=TrainingSummary(
            splits=dict(meta.splits),
            epochs=run.epochs_completed,
            recipe=str(recipe_path.name),
            split_method=_split_method(source),
            hyperparameters={
                "lr": recipe.optim.lr,
                "batch_size": recipe.optim.batch_size,
                "best_epoch": run.best_epoch,
                "selection_metric": recipe.optim.selection_metric,
            },
        ),
        evaluations=[EvaluationSummary.from_evaluation(evaluation, "test")],
        gate_mean_weights=evaluation["gate"]["mean_weights"],
        tags=["enecg-quickstart"],
    )


def example_record(source: DataSource, data_dir: Path, out: Path) -> Path:
    """A WFDB record to show ``enecg predict`` on: the first test record (its PTB-XL file, or for the synthetic
    set a copy written into ``out``)."""
    record = load_records(data_dir, "test", 1)[0]
    if source.kind == "ptbxl" and source.root is not None:
        header = record_header(source.root, record.record_id)
        if header.is_file():
            return header
    return write_wfdb(record, out / "example-record")


def next_commands(out: Path, data_dir: Path, model_dir: str, record: Path) -> list[str]:
    """What a user types next, runnable as printed: the local Hub is stopped by then, so the commands name the
    quickstart's own Hub cache (where the experts are) and run offline."""
    cache = f"--cache-dir {out / HUB_CACHE_DIR} --offline"
    return [
        f"enecg evaluate {model_dir} --data {data_dir} --out {out / 'evaluation'} "
        f"--feature-cache {Path(model_dir).parent / 'feature_cache'} {cache}",
        f"enecg predict {record} --model {model_dir} {cache}",
    ]


__all__ = [
    "DEFAULT_RECIPE",
    "HUB_CACHE_DIR",
    "QUICKSTART_EXPERTS",
    "DataSource",
    "ExpertPlan",
    "build_recipe",
    "choose_data_source",
    "ensemble_card",
    "example_record",
    "expert_card",
    "next_commands",
    "prepare_data",
    "pretrain_experts",
    "recipe_experts",
]
