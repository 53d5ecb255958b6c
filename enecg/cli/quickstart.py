"""``enecg quickstart``: the whole enecg mission offline, in a few minutes on 2 CPU cores.

One command composes the project's own building blocks, nothing re-implemented:

1. **data**: the PTB-XL sample (:func:`enecg.data.ptbxl.prepare_ptbxl`, 100 Hz, official strat folds) when it is
   found, else a labelled synthetic set simulated with ECGSYN (:func:`enecg.data.synthetic.prepare_synthetic`);
2. **experts**: small in-house encoders of different architectures, self-supervised (CMSC and/or masked
   reconstruction, :func:`enecg.pretraining.pretrainer.pretrain`) on the *training* part only;
3. **Hub**: a loopback Hub-protocol server (:class:`enecg.testing.local_hub.LocalHub`, storage ``OUT/hub``) gets each
   expert with its model card (:func:`enecg.hub.upload.push_folder`);
4. **training**: the MoE ensemble (heads with LoRA + gate, several tasks) is trained with Accelerate
   (:func:`enecg.training.trainer.train`, ``recipes/quickstart.yaml``) on experts given *by Hub ID* at the pushed
   commit, downloaded into a fresh Hub cache under ``OUT`` so every load goes through the Hub protocol;
5. **evaluation**: :func:`enecg.evaluation.runner.evaluate_ensemble` on the test part -> ``report.html``;
6. **sharing**: the ensemble is pushed with its card (:func:`enecg.hub.publish.push_ensemble`), pulled back by ID
   into another fresh cache, and its predictions on a few test records must equal the in-memory model's;
7. **summary**: printed and written to ``OUT/quickstart_summary.json`` (where everything went, headline metrics
   next to a constant predictor's, timings).

Nothing leaves 127.0.0.1: the Hub runs in this process, is reached through :func:`enecg.testing.endpoint.use_endpoint`
and is shut down at the end (also on errors). Steps reuse what is still valid: the dataset builders' cache keys,
experts whose pretraining config and dataset are unchanged (their re-push makes no new commit), the feature
cache of the experts' embeddings. The ensemble is retrained each run (seconds; the same seed gives the same
weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

HUB_ORG = "local-org"
ENSEMBLE_REPO = f"{HUB_ORG}/enecg-quickstart-ensemble"
DEFAULT_OUT = "outputs/quickstart"
SUMMARY_FILE = "quickstart_summary.json"
def _default_recipe() -> Path:
    """``recipes/quickstart.yaml`` of a source checkout, else the copy shipped in the wheel (``enecg.recipes``)."""
    checkout = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    if checkout.is_file():
        return checkout
    import importlib.resources

    return Path(str(importlib.resources.files("enecg.recipes") / "quickstart.yaml"))


DEFAULT_RECIPE = _default_recipe()
DATA_ENV = "ENECG_DATA_DIR"
PTBXL_SAMPLE = "ptbxl500"
PTBXL_TABLE = "ptbxl_database.csv"
# The synthetic set's tasks (the recipe's are PTB-XL's): one of each kind the ensemble supports.
SYNTHETIC_RECIPE_TASKS: tuple[dict[str, Any], ...] = (
    {"name": "rhythm"},  # multiclass SBRAD / SR / STACH
    {"name": "morphology"},  # multilabel TINV / WIDEQRS / LOWVOLT
    {"name": "heart_rate", "regression_loss": "huber"},  # regression, bpm
    # binary: the signal-quality flag. Not sex: the simulator ties sex to voltage and QRS width only weakly, and
    # a task no model beats chance on would make a poor demonstration.
    {"name": "noisy"},
)
SYNTHETIC_RECORDS = 240  # ~0.5 s of CPU each (ECGSYN): ~1 min on 2 workers
FAST_SYNTHETIC_RECORDS = 160
FAST_EPOCHS = 15
REPORT_BOOTSTRAP = 200  # patient-level resamples of the report's CIs (1000 is the evaluation default)
FAST_REPORT_BOOTSTRAP = 100
N_RELOAD_CHECK_RECORDS = 4
HUB_CACHE_DIR = "hf-cache"  # where training and evaluation download experts (fresh each run)
RELOAD_CACHE_DIR = "hf-cache-reload"  # where the pushed ensemble is pulled back (fresh each run)
_INPUTS_SUFFIX = ".inputs.json"

DataKind = Literal["ptbxl", "synthetic"]


# ------------------------------------------------------------------------------------------------- options


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

    def config(self, data_dir: Path, folder: Path, *, seed: int, fast: bool) -> Any:
        """The :class:`~enecg.pretraining.pretrainer.PretrainConfig` of this expert (training part only)."""
        from enecg.pretraining.pretrainer import PretrainConfig

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


# Three architectures (different receptive fields and depths), each pretrained with both objectives (CMSC +
# masked reconstruction): an ensemble gains over its best member only when the members are about as good as each
# other and err differently. Measured on the sample's test part with linear probes, a reconstruction-only expert
# scored 0.70 macro AUROC against 0.83-0.86 for the combined objective, and dragged every combination of it below
# its best member. None fuses age/sex: they are prediction targets here, so feeding them to an expert would leak.
QUICKSTART_EXPERTS: tuple[ExpertPlan, ...] = (
    ExpertPlan("simplenet", "SimpleNet", "combined", steps=300, fast_steps=40),
    ExpertPlan("parallelcnn", "ParallelCNN", "combined", steps=300, fast_steps=30),
    ExpertPlan("attianet", "AttiaNet", "combined", steps=300, fast_steps=30),
)


# ------------------------------------------------------------------------------------------------ data


def _is_ptbxl(folder: Path) -> bool:
    return (folder / PTBXL_TABLE).is_file()


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
    repository; the first PTB-XL folder found wins, and without one the synthetic set is used.
    """
    if data == "synthetic":
        return DataSource("synthetic", None, "--data synthetic")
    if data != "auto":
        given = Path(data).expanduser()
        for folder in (given, given / PTBXL_SAMPLE):
            if _is_ptbxl(folder):
                return DataSource("ptbxl", folder.resolve(), f"--data {data}")
        raise FileNotFoundError(
            f"{given}: not a PTB-XL folder (no {PTBXL_TABLE} there or in {PTBXL_SAMPLE}/); "
            "use --data auto or --data synthetic"
        )
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    repo_root = Path(__file__).resolve().parents[2] if repo_root is None else repo_root
    if environ.get(DATA_ENV):
        candidates = [(Path(environ[DATA_ENV]) / PTBXL_SAMPLE, f"${DATA_ENV}")]
    else:
        candidates = [
            (
                cwd / ".." / "shared" / "data" / PTBXL_SAMPLE,
                "../shared/data relative to the working directory",
            ),
            (
                repo_root / ".." / "shared" / "data" / PTBXL_SAMPLE,
                "../shared/data relative to the repository",
            ),
        ]
    for folder, where in candidates:
        if _is_ptbxl(folder):
            return DataSource("ptbxl", folder.resolve(), f"--data auto: PTB-XL sample found via {where}")
    looked = ", ".join(str(folder) for folder, _ in candidates)
    return DataSource("synthetic", None, f"--data auto: no PTB-XL sample at {looked}; using synthetic ECGs")


def prepare_data(source: DataSource, data_root: Path, *, seed: int, fast: bool) -> tuple[Path, Any]:
    """Build (or reuse, by cache key) the dataset folder; returns ``(folder, DatasetMeta)``."""
    if source.kind == "ptbxl":
        from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

        assert source.root is not None
        folder = data_root / "ptbxl500-100hz"
        _, meta = prepare_ptbxl(source.root, folder, PtbxlOptions(rate=100))  # all records, strat folds
        return folder, meta
    from enecg.data.synthetic import SyntheticOptions, prepare_synthetic

    n_records = FAST_SYNTHETIC_RECORDS if fast else SYNTHETIC_RECORDS
    folder = data_root / f"synthetic-{n_records}-seed{seed}"
    # 500 Hz, the builder's default (the experts' 100 Hz contracts resample): at 100 Hz neurokit2's ECGSYN
    # resamples its RR series with trailing zeros and can loop forever on a record (seed 0: record 22).
    options = SyntheticOptions(
        seed=seed, n_records=n_records, rate=500, validation_fraction=0.2, test_fraction=0.2
    )
    _, meta = prepare_synthetic(folder, options)
    return folder, meta


def dataset_card_info(source: DataSource) -> Any:
    """The dataset as the model cards show it."""
    from enecg.hub.cards import DatasetCardInfo

    if source.kind == "ptbxl":
        return DatasetCardInfo(
            name="PTB-XL (records 1-500, 100 Hz)",
            url="https://physionet.org/content/ptb-xl/1.0.3/",
            license="cc-by-4.0",
            citation=(
                "@article{wagner2020ptbxl, title={PTB-XL, a large publicly available electrocardiography "
                "dataset}, author={Wagner, Patrick and Strodthoff, Nils and Bousseljot, Ralf-Dieter and others}, "
                "journal={Scientific Data}, volume={7}, pages={154}, year={2020}}"
            ),
        )
    return DatasetCardInfo(name="enecg synthetic ECGs (ECGSYN via neurokit2; simulated, not clinical data)")


def _split_method(source: DataSource) -> str:
    if source.kind == "ptbxl":
        return "PTB-XL strat_fold 1-8 train / 9 validation / 10 test (patient-wise)"
    return "synthetic patients: random patient-level hold-out 60 / 20 / 20 %"


# --------------------------------------------------------------------------------------------- experts


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


def _expert_inputs(config: Any, dataset_key: str) -> dict[str, Any]:
    return {"pretraining_config": config.to_dict(), "dataset_cache_key": dataset_key}


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
    from enecg.experts.inhouse import EXPERT_SPEC_FILE
    from enecg.pretraining.pretrainer import pretrain
    from enecg.utils.files import write_text_atomic

    folders = {}
    for index, (plan, _) in enumerate(plans):
        folder = experts_dir / plan.name
        config = plan.config(data_dir, folder, seed=seed + index, fast=fast)
        inputs = _expert_inputs(config, dataset_key)
        stamp = experts_dir / f"{plan.name}{_INPUTS_SUFFIX}"
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


def write_expert_card(folder: Path, plan: ExpertPlan, repo_id: str, source: DataSource, n_train: int) -> Path:
    """Render the expert's model card into ``folder/README.md`` (pushed with it)."""
    from enecg.experts import load_expert
    from enecg.hub.cards import (
        ExpertCardContext,
        ExpertCardInfo,
        TrainingSummary,
        render_expert_card,
        save_card,
    )

    expert = load_expert(folder)
    info = ExpertCardInfo.from_dict({**expert.describe(), "hub_id": repo_id})
    info.description = expert.spec.description
    metrics = json.loads((folder / "metrics.json").read_text())
    pretraining = metrics.get("pretraining_config", {})
    file_config = json.loads((folder / "config.json").read_text())
    context = ExpertCardContext(
        repo_id=repo_id,
        expert=info,
        description=expert.spec.description,
        architecture=(
            f"{plan.architecture} (enecg light CNN family), width x{plan.width_multiplier:g}, "
            f"{plan.embedding_dim}-d embedding; trained by `enecg quickstart` as a small demonstration expert."
        ),
        architecture_config=dict(file_config.get("config", {})),
        datasets=[dataset_card_info(source)],
        training=TrainingSummary(
            splits={"train": n_train},
            split_method=_split_method(source) + "; pretraining reads the training part only",
            hyperparameters={
                key: pretraining.get(key)
                for key in ("objective", "max_steps", "batch_size", "lr", "window_length", "seed")
            },
        ),
        tags=["self-supervised", "enecg-quickstart"],
    )
    return save_card(render_expert_card(context), folder)


# ------------------------------------------------------------------------------------------ Hub cache


@contextlib.contextmanager
def fresh_hub_cache(path: Path) -> Iterator[Path]:
    """Empty ``path`` and make it ``huggingface_hub``'s default cache inside the block, so every download really
    goes through the Hub protocol (nothing answered from an older cache). Restored afterwards."""
    from huggingface_hub import constants

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    old_constant, old_env = constants.HF_HUB_CACHE, os.environ.get("HF_HUB_CACHE")
    constants.HF_HUB_CACHE = str(path)
    os.environ["HF_HUB_CACHE"] = str(path)  # for subprocesses
    try:
        yield path
    finally:
        constants.HF_HUB_CACHE = old_constant
        if old_env is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = old_env


# ------------------------------------------------------------------------------------------ training


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
) -> Any:
    """The training :class:`~enecg.training.recipe.Recipe`: the file's settings with the run's data folder, the
    pushed experts (Hub ID + commit), the data source's tasks, output folder, seed and (``fast``) epochs."""
    from enecg.training.recipe import parse_recipe_dict

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


# ------------------------------------------------------------------------------------------ evaluation


def constant_predictor_headlines(data_dir: Path, task_names: list[str], *, seed: int) -> dict[str, Any]:
    """Per task, the test headline metric of a constant predictor fitted on the training part: label prevalences
    (class frequencies) for classification, whose AUROC is 0.5 by construction, and the training mean for
    regression. Computed with the same metric code as the ensemble's."""
    import numpy as np

    from enecg.data.build import load_dataset_dir
    from enecg.data.rows import label_arrays
    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.evaluation.report import headline
    from enecg.evaluation.task_eval import evaluate_task

    dataset, meta = load_dataset_dir(data_dir)
    out = {}
    for name in task_names:
        info = meta.task(name)
        train = label_arrays(_rows(dataset["train"], name), [info])[name].astype(np.float64)
        test = label_arrays(_rows(dataset["test"], name), [info])[name].astype(np.float64)
        if info.type == "regression":
            constant = np.full(len(test), np.nanmean(train))
            names = [name]
        elif info.type == "multiclass":
            counts = np.bincount(train[~np.isnan(train)].astype(int), minlength=len(info.names))
            constant = np.tile(counts / counts.sum(), (len(test), 1))
            names = list(info.names)
        elif info.type == "binary":
            constant = np.full(len(test), np.nanmean(train))
            names = [info.names[-1] if info.names else name]
        else:
            constant = np.tile(np.nanmean(train, axis=0), (len(test), 1))
            names = list(info.names)
        result = evaluate_task(
            info.type, names, test, constant, bootstrap=BootstrapConfig(n_resamples=0, seed=seed)
        )
        metric, value, _ = headline(result)
        out[name] = {
            "metric": metric,
            "value": value,
            "fit_on": "train",
            "prediction": _describe_constant(constant),
        }
    return out


def _rows(part: Any, column: str) -> list[dict[str, Any]]:
    values = part.select_columns([column]).with_format("numpy")[column]
    return [{column: value} for value in values]


def _describe_constant(constant: Any) -> Any:
    first = constant[0] if len(constant) else constant
    return [round(float(v), 4) for v in first] if getattr(first, "ndim", 0) else round(float(first), 4)


def compare_with_constant(evaluation: Mapping[str, Any], constant: Mapping[str, Any]) -> dict[str, Any]:
    """Per task: the ensemble's headline metric with its CI, the constant predictor's and whether it is better
    (higher AUROC, lower MAE; None where a metric is undefined), and the ensemble against its baselines: the
    uniform average, the best single expert chosen on validation and the stacker, each with the paired difference
    and its CI."""
    from enecg.evaluation.report import headline

    chosen = (evaluation.get("baseline_details") or {}).get("best_single_expert") or {}
    out = {}
    for name, result in evaluation["tasks"].items():
        metric, value, ci = headline(result)
        base = constant.get(name, {}).get("value")
        beats = None
        if value is not None and base is not None:
            beats = bool(value < base) if metric == "MAE" else bool(value > base)
        baselines = {}
        for baseline, paired in (evaluation.get("paired") or {}).get(name, {}).items():
            baselines[baseline] = {
                "value": paired["b"],
                "difference": paired["difference"],
                "difference_ci": paired["ci"],
                "ensemble_better": {"a": True, "b": False}.get(paired["better"]),
            }
            if baseline.startswith("best single") and name in chosen:
                baselines[baseline]["expert"] = chosen[name]
        out[name] = {
            "metric": metric,
            "value": value,
            "ci": list(ci) if ci else None,
            "constant": base,
            "beats_constant": beats,
            "baselines": baselines,
        }
    return out


def example_record(source: DataSource, data_dir: Path, out: Path) -> Path:
    """A WFDB record file to show ``enecg predict`` on: the first test record (its PTB-XL file, or for the
    synthetic set a copy written with wfdb into ``out``)."""
    import wfdb

    record = first_test_records(data_dir, 1)[0]
    if source.kind == "ptbxl" and source.root is not None:
        import pandas as pd

        ecg_id = int(record.record_id.rsplit(":", 1)[-1])
        table = pd.read_csv(source.root / PTBXL_TABLE, usecols=["ecg_id", "filename_lr"], index_col="ecg_id")
        path = source.root / table.loc[ecg_id, "filename_lr"]
        if path.with_suffix(".hea").is_file():
            return path.with_suffix(".hea")
    folder = out / "example-record"
    folder.mkdir(parents=True, exist_ok=True)
    name = record.record_id.replace(":", "_")
    wfdb.wrsamp(
        name,
        fs=record.fs,
        units=["mV"] * len(record.leads),
        sig_name=list(record.leads),
        p_signal=record.signal.T.astype("float64"),
        fmt=["16"] * len(record.leads),
        write_dir=str(folder),
    )
    return folder / f"{name}.hea"


def next_commands(out: Path, data_dir: Path, model_dir: str, record: Path) -> list[str]:
    """What a user types next, runnable as printed: the model's experts load by Hub ID from the quickstart's own
    Hub cache (the local Hub is stopped), so the commands name that cache and run offline."""
    cache = f"--cache-dir {out / HUB_CACHE_DIR} --offline"
    return [
        f"enecg evaluate {model_dir} --data {data_dir} --out {out / 'evaluation'} "
        f"--feature-cache {Path(model_dir).parent / 'feature_cache'} {cache}",
        f"enecg predict {record} --model {model_dir} {cache}",
    ]


# ----------------------------------------------------------------------------------------- round trip


def _numbers(value: Any) -> list[float]:
    if isinstance(value, Mapping):
        return [x for key in sorted(value) for x in _numbers(value[key])]
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _numbers(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def compare_predictions(expected: list[Any], got: list[Any]) -> dict[str, Any]:
    """Record predictions (``RecordPrediction``) of two models: identical? and the largest difference."""
    a = [r.to_dict() for r in expected]
    b = [r.to_dict() for r in got]
    xs, ys = _numbers(a), _numbers(b)
    same_shape = len(xs) == len(ys)
    diff = max((abs(x - y) for x, y in zip(xs, ys) if not (math.isnan(x) and math.isnan(y))), default=0.0)
    return {
        "records": [r["record_id"] for r in a],
        "identical": a == b,
        "max_abs_difference": diff if same_shape else None,
    }


def first_test_records(data_dir: Path, n: int) -> list[Any]:
    """The first ``n`` records of the test part, as ECGRecords."""
    from enecg.data.build import load_dataset_dir
    from enecg.data.rows import row_to_record

    dataset, _ = load_dataset_dir(data_dir)
    part = dataset["test"].with_format("numpy")
    return [row_to_record(part[i]) for i in range(min(n, len(part)))]


# -------------------------------------------------------------------------------------------- the run


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


def run_quickstart(options: QuickstartOptions) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the summary also written to ``OUT/quickstart_summary.json``."""
    import yaml

    from enecg.testing.endpoint import use_endpoint
    from enecg.testing.local_hub import LocalHub
    from enecg.utils.files import write_text_atomic
    from enecg.utils.version import __version__

    started = time.monotonic()
    out = Path(options.out).absolute()
    recipe_path = Path(options.recipe)
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
            from enecg.hub.upload import push_folder

            pushed = []
            for plan, repo_id in plans:
                write_expert_card(folders[plan.name], plan, repo_id, source, meta.splits.get("train", 0))
                result = push_folder(
                    folders[plan.name], repo_id, commit_message=f"enecg quickstart: {plan.name} expert"
                )
                assert result is not None  # single process
                logger.info(
                    "pushed %s at %s (%s)",
                    repo_id,
                    result.commit_sha,
                    "new" if result.changed else "unchanged",
                )
                pushed.append((plan, repo_id, result.commit_sha))

        with fresh_hub_cache(out / HUB_CACHE_DIR):
            with timer.step("training", "train the MoE ensemble from the experts' Hub IDs (Accelerate)"):
                from enecg.training import train

                recipe = build_recipe(
                    recipe_path,
                    recipe_data,
                    data_dir=data_dir,
                    source=source,
                    experts=pushed,
                    output_dir=out / "training",
                    seed=options.seed,
                    fast=options.fast,
                )
                run = train(recipe).run
                if run.model_dir is None:
                    raise RuntimeError(f"{run.run_dir}: training saved no model (output.save_model)")
                loaded = _loaded_experts(run.model_dir)
                mismatched = [p.name for p, repo, sha in pushed if loaded.get(p.name) != (repo, sha)]
                if mismatched:
                    raise RuntimeError(f"experts {mismatched} were not loaded from their pushed Hub commits")

            with timer.step("evaluation", "evaluate on the test part and write the report"):
                from enecg.ensemble import Ensemble
                from enecg.evaluation.metrics import BootstrapConfig
                from enecg.evaluation.runner import evaluate_ensemble

                ensemble = Ensemble.from_pretrained(run.model_dir)
                report_dir = out / "report"
                evaluation = evaluate_ensemble(
                    ensemble,
                    data_dir,
                    split="test",
                    val_split="validation",
                    train_splits=["train"],
                    feature_cache=Path(run.run_dir) / "feature_cache",
                    bootstrap=BootstrapConfig(
                        n_resamples=FAST_REPORT_BOOTSTRAP if options.fast else REPORT_BOOTSTRAP,
                        seed=options.seed,
                    ),
                    n_examples=4,
                    out_dir=report_dir,
                    title=f"enecg quickstart: {meta.source} test part",
                )
                constant = constant_predictor_headlines(
                    data_dir, list(evaluation["tasks"]), seed=options.seed
                )
                headlines = compare_with_constant(evaluation, constant)

            with timer.step("push_ensemble", f"push the ensemble to {ENSEMBLE_REPO} and pull it back by ID"):
                from enecg.hub.cards import EvaluationSummary, TrainingSummary
                from enecg.hub.publish import ensemble_card_context, push_ensemble

                context = ensemble_card_context(
                    ensemble,
                    ENSEMBLE_REPO,
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
                    evaluations=[
                        EvaluationSummary(
                            split="test",
                            tasks=evaluation["tasks"],
                            paired=evaluation["paired"],
                            best_single_expert=evaluation["baseline_details"].get("best_single_expert", {}),
                        )
                    ],
                    gate_mean_weights=evaluation["gate"]["mean_weights"],
                    tags=["enecg-quickstart"],
                )
                published = push_ensemble(
                    run.model_dir,
                    ENSEMBLE_REPO,
                    card_context=context,
                    commit_message="enecg quickstart: ensemble",
                )
                assert published is not None  # single process
                records = first_test_records(data_dir, N_RELOAD_CHECK_RECORDS)
                with fresh_hub_cache(out / RELOAD_CACHE_DIR) as reload_cache:
                    reloaded = Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=reload_cache)
                    check = compare_predictions(
                        ensemble.predict_records(records), reloaded.predict_records(records)
                    )
                if not check["identical"]:
                    raise RuntimeError(
                        f"{ENSEMBLE_REPO}@{published.commit_sha}: reloaded predictions differ from the trained "
                        f"model's (max |difference| {check['max_abs_difference']})"
                    )
                logger.info(
                    "pulled %s back by ID: identical predictions on %d test records",
                    ENSEMBLE_REPO,
                    len(records),
                )
        hub_url = hub.url

    with timer.step("summary", "write the summary"):
        commands = next_commands(out, data_dir, run.model_dir, example_record(source, data_dir, out))
        summary = {
            "enecg_version": __version__,
            "options": dataclasses.asdict(options),
            "data": {
                "source": source.kind,
                "root": str(source.root) if source.root else None,
                "reason": source.reason,
                "dataset_dir": str(data_dir),
                "splits": dict(meta.splits),
            },
            "hub": {"storage": str(out / "hub"), "url_during_run": hub_url, "org": HUB_ORG},
            "experts": [
                {
                    "name": plan.name,
                    "architecture": plan.architecture,
                    "objective": plan.objective,
                    "repo_id": repo_id,
                    "commit": commit,
                    "folder": str(folders[plan.name]),
                }
                for plan, repo_id, commit in pushed
            ],
            "training": {
                "run_dir": run.run_dir,
                "model_dir": run.model_dir,
                "epochs_completed": run.epochs_completed,
                "best_epoch": run.best_epoch,
                "tasks": [task.name for task in recipe.tasks],
                "feature_cache": run.feature_cache,
            },
            "report": {"html": str(report_dir / "report.html"), "json": str(report_dir / "report.json")},
            "ensemble": {
                "repo_id": ENSEMBLE_REPO,
                "commit": published.commit_sha,
                "changed": published.changed,
                "reload_check": check,
            },
            "metrics": {"split": "test", "n_records": evaluation["n_records"], "tasks": headlines},
            "strategy": run.strategy.get("name"),
            "next_commands": commands,
            "seconds": {**timer.seconds, "total": round(time.monotonic() - started, 1)},
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": _torch_threads()},
        }
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _loaded_experts(model_dir: str) -> dict[str, tuple[str, str | None]]:
    """Expert name -> (hub_id, revision) as recorded in a saved ensemble's config."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {e["name"]: (e.get("hub_id"), e.get("revision")) for e in config.get("experts", [])}


def format_summary(summary: Mapping[str, Any], summary_path: Path) -> str:
    """The summary as the lines ``enecg quickstart`` prints."""

    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    data = summary["data"]
    lines = [
        "",
        "enecg quickstart: done",
        f"  data       {data['source']}: {data['dataset_dir']} {data['splits']}",
        f"             ({data['reason']})",
        f"  local Hub  {summary['hub']['storage']} (served at {summary['hub']['url_during_run']}, now stopped)",
    ]
    for expert in summary["experts"]:
        lines.append(
            f"  expert     {expert['repo_id']}@{expert['commit'][:12]}  "
            f"({expert['architecture']}, {expert['objective']})"
        )
    lines += [
        f"  training   {summary['training']['run_dir']} (best epoch {summary['training']['best_epoch']} of "
        f"{summary['training']['epochs_completed']})",
        f"  report     {summary['report']['html']}",
        f"  ensemble   {summary['ensemble']['repo_id']}@{summary['ensemble']['commit'][:12]} (reloaded by ID: "
        f"{'identical' if summary['ensemble']['reload_check']['identical'] else 'DIFFERENT'} predictions)",
        f"  test metrics ({summary['metrics']['n_records']} records) vs a constant predictor fitted on train:",
    ]
    for task, row in summary["metrics"]["tasks"].items():
        ci = row.get("ci")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
        verdict = {True: "better", False: "NOT better", None: "n/a"}[row["beats_constant"]]
        lines.append(
            f"    {task:<12} {row['metric']} ensemble {number(row['value'])}{interval}  constant "
            f"{number(row['constant'])} -> {verdict}"
        )
        for name, base in row.get("baselines", {}).items():
            label = f"{name} ({base['expert']})" if base.get("expert") else name
            d, dci = base["difference"], base.get("difference_ci") or [None, None]
            paired = f"{d:+.3f}" + (f" [{dci[0]:+.3f}, {dci[1]:+.3f}]" if None not in dci else "")
            mark = {True: "ensemble better", False: "baseline better", None: "no clear difference"}[
                base["ensemble_better"]
            ]
            lines.append(f"      vs {label:<44} {number(base['value'])}   ensemble - this {paired} ({mark})")
    lines += [f"  total      {summary['seconds']['total']:.0f} s", f"  summary    {summary_path}"]
    if summary.get("next_commands"):
        lines += ["", "next (these commands work as printed):"] + [f"  {c}" for c in summary["next_commands"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="Run the whole mission offline: data, experts, local Hub, ensemble training, report, push.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = QuickstartOptions()
    for f in dataclasses.fields(QuickstartOptions):
        flag = f"--{f.name}"
        help_text = f.metadata["help"]
        if isinstance(getattr(defaults, f.name), bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif isinstance(getattr(defaults, f.name), int):
            parser.add_argument(
                flag, type=int, default=getattr(defaults, f.name), help=f"{help_text} (default %(default)s)"
            )
        else:
            parser.add_argument(
                flag, default=getattr(defaults, f.name), help=f"{help_text} (default %(default)s)"
            )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    options = QuickstartOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(QuickstartOptions)}
    )
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


__all__ = [
    "ENSEMBLE_REPO",
    "HUB_ORG",
    "QUICKSTART_EXPERTS",
    "SUMMARY_FILE",
    "DataSource",
    "ExpertPlan",
    "QuickstartOptions",
    "choose_data_source",
    "compare_with_constant",
    "constant_predictor_headlines",
    "run_quickstart",
]
