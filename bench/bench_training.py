"""Training benchmarks of the ensemble: what the feature cache saves, what freezing the experts saves in memory and
parameters, and what the mixture-of-experts gate buys over single experts and a plain average.

Four measurements, all taken in ONE run (ratios are between numbers measured side by side on the same machine):

1. **Feature cache** (``feature_cache``): epoch time of :func:`enecg.training.trainer.train` with the feature cache
   (frozen experts embed every record once; epochs train heads, LoRA and gate from embeddings) vs recomputing the
   experts on every batch (``data.feature_cache: off``), same data, seed and recipe otherwise. Two expert sets: the
   light recipe's in-house CNNs on the whole PTB-XL sample, and two full-size foundation models (ECGFounder
   12-lead, HuBERT-ECG small; random weights) on a few records.
2. **Peak memory** (``memory``): resident-set high-water mark (``ru_maxrss``) of a fresh subprocess per mode, for
   the same batch: ``ensemble_cached`` (the trainer's default path: embeddings once, steps from embeddings),
   ``ensemble`` (frozen experts run on every step, without gradients) and ``full_finetune`` (every expert
   parameter unfrozen and trained with the heads, AdamW state for all of them).
3. **Trainable parameters** (``trainable_parameters``): heads + LoRA + gate over all parameters of the ensemble.
4. **Ensemble quality** (``ensemble``, ``bench/ensemble_quality.py``): 5 folds x 3 seeds of the PTB-XL sample, four
   in-house experts, every training strategy variant against the uniform average, the best single expert chosen
   on validation, linear probes and a stacker, with paired patient-level bootstrap CIs; JSON + a PNG figure.

Usage (from the repository root)::

    python bench/bench_training.py                       # default run, ~10 min on 2 idle cores
    python bench/bench_training.py --quick               # tiny sizes: pipeline and JSON schema check only
    python bench/bench_training.py --sections ensemble --folds 0,1 --seeds 0

Foundation-model weights do not exist here and are not needed: time and memory do not depend on weight values,
so the full-size architectures are built from their published configs (the parity manifests
``$ENECG_PARITY_DIR/<family>/keys_full_*.json``) with random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# This file runs as a script, so its folder is on sys.path: the ensemble-quality protocol lives next to it, and the
# expert bench shares the tiny --quick configs and the parity-fixture location.
import ensemble_quality
import numpy as np
import torch
from bench_experts import TINY_HUBERT, TINY_NET1D, default_parity_dir

from enecg.engine.callbacks import TrainerCallback

# Default-off progress bars (dataset preparation); tqdm reads this when first imported. The trainer's own bar sets
# `disable` explicitly and still shows on stderr.
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "training.json"
SCHEMA_VERSION = 1
SECTIONS = ("feature_cache", "memory", "ensemble")
TASKS = ("superclass", "sex", "age")
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
MEMORY_MODES = ("ensemble_cached", "ensemble", "full_finetune")
QUICK_RECORDS = 24  # records per part in --quick runs
CHILD_MARKER = "BENCH_TRAINING_CHILD_RESULT "
LOG = logging.getLogger("bench_training")


# ---------------------------------------------------------------------------------------------------------------
# Experts


@dataclass(frozen=True)
class FoundationExpert:
    """A full-size foundation-model architecture built with random weights (no published weights are needed)."""

    name: str = field(metadata={"help": "Expert key in the ensemble."})
    spec: str = field(metadata={"help": "Bundled adapter spec (family, input contract)."})
    manifest: str = field(
        metadata={"help": "Parity manifest holding the published config (parity-dir relative)."}
    )
    manifest_key: str = field(metadata={"help": "Key of the config in the manifest."})
    quick_config: dict[str, Any] = field(metadata={"help": "Tiny config of the same family for --quick."})


FOUNDATION_EXPERTS = (
    FoundationExpert(
        "ecgfounder",
        "ecgfounder-12lead",
        "ecgfounder/keys_full_12lead.json",
        "constructor_kwargs",
        TINY_NET1D,
    ),
    FoundationExpert(
        "hubert_small", "hubert-ecg-small", "hubert_ecg/keys_full_small.json", "config", TINY_HUBERT
    ),
)

# The MoE experts: different architectures, pretraining tasks and inputs (one fuses age and sex). Recipe
# `create:` entries; the trainer pretrains them on each fold's training parts only.
LIGHT_EXPERTS: tuple[dict[str, Any], ...] = (
    {
        "name": "simplenet",
        "create": {"architecture": "SimpleNet", "pretrain_task": "superclass"},
    },
    {
        "name": "attianet",
        "create": {"architecture": "AttiaNet", "pretrain_task": "age"},
    },
    {
        "name": "parallelcnn_demographics",
        "create": {"architecture": "ParallelCNN", "pretrain_task": "superclass", "use_demographics": True},
    },
)


def default_data_dir() -> Path:
    return Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))


def foundation_config(expert: FoundationExpert, parity_dir: Path, quick: bool) -> tuple[dict[str, Any], str]:
    """``(constructor config, where it came from)``: the published config from the parity manifest."""
    if quick:
        return dict(expert.quick_config), "quick (tiny built-in config)"
    path = parity_dir / expert.manifest
    if not path.is_file():
        raise FileNotFoundError(f"{path}: parity manifest not found (set ENECG_PARITY_DIR or --parity-dir)")
    manifest = json.loads(path.read_text())
    if expert.manifest_key not in manifest:
        raise KeyError(f"{path}: no {expert.manifest_key!r} entry")
    return dict(manifest[expert.manifest_key]), str(path)


def random_foundation_expert(expert: FoundationExpert, parity_dir: Path, quick: bool, seed: int = 0):
    """An :class:`~enecg.experts.expert.Expert` of the published architecture with seeded random weights.

    The revision names the seed, so the feature cache keys it like any other expert version."""
    from enecg.experts.expert import Expert
    from enecg.experts.family import get_family
    from enecg.experts.spec import bundled_spec

    spec = bundled_spec(expert.spec)
    family = get_family(spec.family)
    config, _ = foundation_config(expert, parity_dir, quick)
    if not quick:
        config.update(spec.config)  # what load_expert does on top of a checkpoint's config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.build(config)
    return Expert(
        spec=spec,
        family=family,
        model=model,
        config=config,
        embedding_dim=int(family.embedding_dim(config)),
        revision=f"random-init-seed-{seed}",
        source=f"random:{expert.spec}",
    )


def light_spec(entry: dict[str, Any], quick: bool, *, pretrain_steps: int) -> dict[str, Any]:
    """The ``create:`` mapping of one light expert (width, embedding size and pretraining budget filled in)."""
    create = {
        "width_multiplier": 0.25 if quick else 0.5,
        "embedding_dim": 16 if quick else 64,
        "pretrain_steps": pretrain_steps,
        "pretrain_lr": 3e-3,
        **entry["create"],
    }
    if not pretrain_steps:
        create.pop("pretrain_task", None)
    return create


# ---------------------------------------------------------------------------------------------------------------
# Machine, data, helpers


def machine_info() -> dict[str, Any]:
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_total_gb"] = round(int(line.split()[1]) / 2**20, 1)
    return info


def prepare_dataset(data_dir: Path, kfold: int | None) -> Path:
    """The PTB-XL sample at 100 Hz with the three tasks (hold-out parts, or k-fold parts), built once and reused."""
    from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

    ptbxl = data_dir / "ptbxl500"
    if not (ptbxl / "ptbxl_database.csv").is_file():
        raise FileNotFoundError(f"{ptbxl}: PTB-XL sample not found (set ENECG_DATA_DIR or --data-dir)")
    name = "ptbxl500-100hz" + (f"-kfold{kfold}" if kfold else "")
    out = Path(tempfile.gettempdir()) / "enecg-bench" / name
    prepare_ptbxl(ptbxl, out, PtbxlOptions(rate=100, tasks=TASKS, kfold=kfold))
    return out


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    from enecg.utils.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _reset_accelerate() -> None:
    # Accelerate keeps process-wide state; each train() call here is a separate run.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def _base_recipe(dataset_dir: Path, out_dir: Path, **sections: Any) -> dict[str, Any]:
    """The light recipe's model and optimisation (recipes/ptbxl_light_ensemble.yaml), without trackers,
    checkpoints on epoch ends only and no bootstrap; ``sections`` update it."""
    recipe: dict[str, Any] = {
        "data": {"path": str(dataset_dir)},
        "experts": [],
        "tasks": [{"name": "superclass"}, {"name": "sex"}, {"name": "age", "regression_loss": "huber"}],
        "model": {
            "heads": {"hidden_sizes": [128, 128], "dropout": 0.1},
            "lora": {"on_heads": True, "r": 8, "alpha": 16},
            "gate": {"input": "signal", "hidden_sizes": [64]},
            "strategy": {"name": "joint"},  # one phase: epoch times compare like with like
        },
        "optim": {
            "seed": 42,
            "epochs": 12,
            "batch_size": 32,
            "lr": 3e-3,
            "lr_scheduler": "cosine",
            "warmup_steps": 5,
            "early_stopping_patience": 5,
        },
        "evaluation": {"bootstrap_resamples": 0},
        "output": {
            "dir": str(out_dir),
            "resume": "never",
            "checkpoint_every_steps": None,
            "keep_checkpoints": 1,
            "save_model": False,
        },
        "tracking": {"log_with": []},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


# ---------------------------------------------------------------------------------------------------------------
# 1. Feature cache vs recomputing the experts


class EpochTimer(TrainerCallback):
    """Trainer callback timing each epoch's training loop and its end (validation, selection, checkpoint)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {"train": [], "validation": []}
        self._start = 0.0

    def on_epoch_begin(self, loop: Any) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, loop: Any) -> None:
        now = time.perf_counter()
        self.times["train"].append(now - self._start)
        self._start = now

    def on_evaluate(self, loop: Any, logs: dict[str, Any]) -> None:
        if logs.get("epoch", 0) > 0:  # not the optional epoch-0 validation
            self.times["validation"].append(time.perf_counter() - self._start)

    def on_phase_begin(self, loop: Any) -> None: ...

    def on_phase_end(self, loop: Any) -> None: ...

    def on_micro_batch_end(self, loop: Any) -> None: ...

    def on_step_end(self, loop: Any) -> None: ...

    def on_checkpoint(self, loop: Any, path: Path) -> None: ...


@contextlib.contextmanager
def timed_feature_tables() -> Iterator[list[float]]:
    """Time each feature table the trainer builds (wraps the trainer module's reference for the duration)."""
    from enecg.training import trainer

    times: list[float] = []
    build_table = trainer.build_feature_table

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return build_table(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    trainer.build_feature_table = wrapper
    try:
        yield times
    finally:
        trainer.build_feature_table = build_table


def _train_timed(recipe_dict: dict[str, Any], expert_loader: Callable[..., Any] | None) -> dict[str, Any]:
    from enecg.training.recipe import parse_recipe_dict
    from enecg.training.trainer import train

    _reset_accelerate()
    recipe = parse_recipe_dict(recipe_dict)
    timer = EpochTimer()
    with timed_feature_tables() as tables:
        start = time.perf_counter()
        result = train(recipe, expert_loader=expert_loader, callbacks=[timer]).run
        total = time.perf_counter() - start
    times = {**timer.times, "feature_tables": tables}
    epochs = [a + b for a, b in zip(times["train"], times["validation"])]
    return {
        "epoch_s": epochs,
        "epoch_train_s": times["train"],
        "epoch_validation_s": times["validation"],
        "epoch_s_median": float(np.median(epochs)),
        "epoch_train_s_median": float(np.median(times["train"])),
        "feature_table_s": times["feature_tables"],
        "feature_cache_build_s": float(sum(times["feature_tables"])),
        "train_call_s": total,
        "global_step": result.global_step,
        "validation_mean_headline": _finite(result.validation.get("mean_headline")),
    }


def bench_feature_cache(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from enecg.data.build import load_dataset_dir
    from enecg.experts.expert import load_expert
    from enecg.training.light_experts import create_light_expert
    from enecg.training.recipe import LightExpertSpec

    dataset_dir = prepare_dataset(args.data_dir, None)
    dataset, meta = load_dataset_dir(dataset_dir)
    out: dict[str, Any] = {}

    # In-house light experts (the light recipe's two), created once, outside the timed runs; weights do not
    # change the time, so they are not pretrained.
    light_sources = {}
    for index, entry in enumerate(LIGHT_EXPERTS[:2]):
        spec = LightExpertSpec(**light_spec(entry, args.quick, pretrain_steps=0))
        light_sources[entry["name"]] = create_light_expert(
            spec,
            work / "cache_experts" / entry["name"],
            name=entry["name"],
            train_part=None,
            tasks=meta.tasks,
            seed=index,
        )
    foundation = {e.name: e for e in FOUNDATION_EXPERTS}

    def foundation_loader(source: Any, **_: Any) -> Any:
        return random_foundation_expert(foundation[str(source)], args.parity_dir, args.quick)

    cases = {
        "light": {
            "experts": [{"name": n, "source": str(p)} for n, p in light_sources.items()],
            "loader": load_expert,
            "max_records": QUICK_RECORDS if args.quick else None,
            "batch_size": 8 if args.quick else 32,
            "epochs": args.cache_epochs,
            "description": "the light recipe's SimpleNet + AttiaNet (in-house CNNs, 100 Hz, 10 s)",
        },
        "foundation": {
            # The loader maps these names to random-weight full-size models.
            "experts": [{"name": e.name, "source": e.name} for e in FOUNDATION_EXPERTS],
            "loader": foundation_loader,
            "max_records": 8 if args.quick else args.cache_fm_records,
            "batch_size": 8,
            "epochs": args.cache_fm_epochs,
            "description": "ECGFounder 12-lead (Net1D, 500 Hz x 10 s) + HuBERT-ECG small (100 Hz x 5 s), "
            "full-size published architectures with random weights",
        },
    }
    for name in args.cache_sets:
        case = cases[name]
        LOG.info("feature cache: %s", name)
        runs = {}
        for mode, setting in (("cached", "on"), ("recomputed", "off")):
            recipe = _base_recipe(
                dataset_dir,
                work / f"cache_{name}_{mode}",
                experts=case["experts"],
                data={
                    "max_records": case["max_records"],
                    "feature_cache": setting,
                    "cache_dir": str(work / f"cache_{name}_{mode}" / "features"),  # fresh: build is timed
                },
                optim={
                    "epochs": case["epochs"],
                    "batch_size": case["batch_size"],
                    "eval_batch_size": case["batch_size"],
                    "early_stopping_patience": None,
                },
            )
            runs[mode] = _train_timed(recipe, case["loader"])
        cached, recomputed = runs["cached"], runs["recomputed"]
        saved_per_epoch = recomputed["epoch_s_median"] - cached["epoch_s_median"]
        n = {
            part: min(len(dataset[part]), case["max_records"] or len(dataset[part]))
            for part in ("train", "validation", "test")
        }
        out[name] = {
            "description": case["description"],
            "records": n,
            "epochs": case["epochs"],
            "batch_size": case["batch_size"],
            "cached": cached,
            "recomputed": recomputed,
            "ratio_epoch": recomputed["epoch_s_median"] / cached["epoch_s_median"],
            "ratio_epoch_train_only": recomputed["epoch_train_s_median"] / cached["epoch_train_s_median"],
            # Epochs after which the one-off embedding pass (train + validation + test) has paid for itself.
            "break_even_epochs": (cached["feature_cache_build_s"] / saved_per_epoch)
            if saved_per_epoch > 0
            else None,
            "validation_mean_headline_abs_diff": (
                abs(cached["validation_mean_headline"] - recomputed["validation_mean_headline"])
                if cached["validation_mean_headline"] is not None
                and recomputed["validation_mean_headline"] is not None
                else None
            ),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. + 3. Peak memory per mode (fresh subprocesses) and trainable parameters


def _rss_mb(field_name: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return None


def _max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: ``VmHWM``) so it measures only what follows; False when the
    kernel offers no reset (then the lifetime ``ru_maxrss`` is the peak, imports included)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _import_everything() -> None:
    # Every module a mode may touch is imported before the baseline, so no mode pays for imports in its peak
    # (importing transformers alone passes through a few hundred MB more than it keeps).
    import enecg.ensemble.model
    import enecg.experts.families.hubert_ecg
    import enecg.experts.families.light
    import enecg.experts.families.net1d
    import enecg.training.light_experts  # noqa: F401


def _synthetic_records(n: int, seed: int) -> list[Any]:
    """Random 12-lead, 10-s, 100-Hz records with age and sex: memory and time do not depend on the values."""
    from enecg.leads import STANDARD_12_LEADS
    from enecg.record import ECGRecord

    rng = np.random.default_rng(seed)
    return [
        ECGRecord(
            signal=(0.2 * rng.standard_normal((12, 1000))).astype(np.float32),
            fs=100.0,
            leads=tuple(STANDARD_12_LEADS),
            record_id=f"synthetic-{i}",
            patient_id=f"p{i}",
            metadata={"age": float(rng.integers(20, 90)), "sex": float(rng.integers(0, 2))},
        )
        for i in range(n)
    ]


def _memory_experts(expert_set: str, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    if expert_set == "foundation":
        parity = Path(settings["parity_dir"])
        return {
            e.name: random_foundation_expert(e, parity, settings["quick"], seed=i)
            for i, e in enumerate(FOUNDATION_EXPERTS)
        }
    from enecg.experts.expert import load_expert
    from enecg.training.light_experts import create_light_expert
    from enecg.training.recipe import LightExpertSpec

    experts = {}
    for index, entry in enumerate(LIGHT_EXPERTS):
        spec = LightExpertSpec(**light_spec(entry, settings["quick"], pretrain_steps=0))
        folder = create_light_expert(
            spec, work / entry["name"], name=entry["name"], train_part=None, tasks=[], seed=index
        )
        experts[entry["name"]] = load_expert(folder)
    return experts


def memory_child(settings: dict[str, Any]) -> dict[str, Any]:
    """One mode in a fresh process: build the ensemble, train ``steps`` steps on one batch, report RSS."""
    from enecg.ensemble.config import (
        EnsembleConfig,
        ExpertRef,
        GateSettings,
        HeadSettings,
        LoraSettings,
        TaskConfig,
    )
    from enecg.ensemble.inputs import EnsembleInputBuilder
    from enecg.ensemble.model import Ensemble

    torch.set_num_threads(settings["threads"])
    _import_everything()
    rss_imports = _rss_mb("VmRSS")
    lifetime_peak_at_imports = _max_rss_mb()
    reset = _reset_peak_rss()
    mode, batch_size = settings["mode"], settings["batch_size"]
    with tempfile.TemporaryDirectory(prefix="enecg-bench-memory-") as tmp:
        experts = _memory_experts(settings["expert_set"], settings, Path(tmp))
        tasks = [
            TaskConfig(name="superclass", type="multilabel", label_names=list(SUPERCLASSES)),
            TaskConfig(name="sex", type="binary", label_names=["female"]),
            TaskConfig(name="age", type="regression", target_mean=60.0, target_std=17.0),
        ]
        config = EnsembleConfig(
            experts=[
                ExpertRef(name=n, hub_id=f"bench/{n}", embedding_dim=int(e.embedding_dim))
                for n, e in experts.items()
            ],
            tasks=tasks,
            heads=HeadSettings(hidden_sizes=[128, 128], dropout=0.1),
            lora=LoraSettings(on_heads=True, r=8, alpha=16),
            gate=GateSettings(input="signal", hidden_sizes=[64]),
            seed=0,
        )
        ensemble = Ensemble(config, experts)
        parameters = ensemble.trainable_parameters()
        if mode == "full_finetune":
            for name in ensemble.expert_names:
                ensemble.branch(name).expert.unfreeze(parameters=True)
        ensemble.train()
        if mode == "full_finetune":
            for name in ensemble.expert_names:  # the Ensemble keeps frozen experts in eval mode; these train
                ensemble.branch(name).expert.train()
        trainable = [p for p in ensemble.parameters() if p.requires_grad]
        rss_model = _rss_mb("VmRSS")

        records = _synthetic_records(batch_size, seed=1)
        batch = EnsembleInputBuilder.for_ensemble(ensemble)(records)
        rng = np.random.default_rng(2)
        labels = {
            "superclass": torch.from_numpy(rng.integers(0, 2, (batch_size, 5)).astype(np.float32)),
            "sex": torch.from_numpy(rng.integers(0, 2, batch_size).astype(np.float32)),
            "age": torch.from_numpy(rng.uniform(20, 90, batch_size).astype(np.float32)),
        }
        inputs, from_embeddings = batch.expert_inputs, False
        if mode == "ensemble_cached":
            with torch.no_grad():
                inputs = ensemble.embed(batch.expert_inputs, batch.demographics, batch.window_masks)
            from_embeddings = True
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        step_s = []
        for _ in range(settings["steps"]):
            start = time.perf_counter()
            output = ensemble(
                inputs,
                batch.gate_input,
                batch.demographics,
                from_embeddings=from_embeddings,
                window_masks=None if from_embeddings else batch.window_masks,
            )
            loss, _ = ensemble.compute_loss(output, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - start)
    lifetime_peak = _max_rss_mb()
    # After a reset, VmHWM is the peak since the baseline; without one, the lifetime peak (imports included).
    peak = (_rss_mb("VmHWM") if reset else None) or lifetime_peak
    return {
        "mode": mode,
        "expert_set": settings["expert_set"],
        "batch_size": batch_size,
        "steps": settings["steps"],
        "threads": settings["threads"],
        "rss_after_imports_mb": rss_imports,
        "rss_after_model_mb": rss_model,
        "peak_rss_mb": peak,
        "peak_above_imports_mb": peak - rss_imports if rss_imports is not None else None,
        "peak_method": "VmHWM after a reset at the baseline" if reset else "ru_maxrss (lifetime)",
        "ru_maxrss_lifetime_mb": lifetime_peak,
        "ru_maxrss_at_imports_mb": lifetime_peak_at_imports,
        "step_s": step_s,
        "trainable_in_this_mode": sum(p.numel() for p in trainable),
        "parameters": parameters,
        "experts": {n: sum(p.numel() for p in e.parameters()) for n, e in experts.items()},
        "input_shapes": {n: list(x.shape) for n, x in batch.expert_inputs.items()},
    }


def _run_child(settings: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]), "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit code {done.returncode}: {' | '.join(tail)}"}


def bench_memory(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    memory: dict[str, Any] = {}
    fractions: dict[str, Any] = {}
    for expert_set in args.memory_sets:
        batch = args.memory_batch_fm if expert_set == "foundation" else args.memory_batch_light
        modes = {}
        for mode in args.memory_modes:
            LOG.info("memory: %s / %s (batch %d)", expert_set, mode, batch)
            settings = {
                "mode": mode,
                "expert_set": expert_set,
                "batch_size": batch,
                "steps": args.memory_steps,
                "threads": args.threads,
                "quick": args.quick,
                "parity_dir": str(args.parity_dir),
            }
            modes[mode] = _run_child(settings, timeout_s=args.child_timeout)
        ok = {m: r for m, r in modes.items() if "error" not in r}
        entry: dict[str, Any] = {"batch_size": batch, "steps": args.memory_steps, "modes": modes}
        if "full_finetune" in ok and "ensemble" in ok:
            full, ens = ok["full_finetune"], ok["ensemble"]
            entry["ratio_full_finetune_to_ensemble"] = {
                "peak_rss": full["peak_rss_mb"] / ens["peak_rss_mb"],
                "peak_above_imports": _ratio(full["peak_above_imports_mb"], ens["peak_above_imports_mb"]),
            }
            if "ensemble_cached" in ok:
                cached = ok["ensemble_cached"]
                entry["ratio_full_finetune_to_ensemble_cached"] = {
                    "peak_rss": full["peak_rss_mb"] / cached["peak_rss_mb"],
                    "peak_above_imports": _ratio(
                        full["peak_above_imports_mb"], cached["peak_above_imports_mb"]
                    ),
                }
        memory[expert_set] = entry
        reference = ok.get("ensemble") or ok.get("ensemble_cached")
        if reference is not None:
            counts = reference["parameters"]
            fractions[expert_set] = {
                "experts": reference["experts"],
                "total": counts["total"],
                "trainable": counts["trainable"],
                "fraction": counts["trainable"] / counts["total"],
                "breakdown": {
                    k: counts[k] for k in ("heads", "lora", "gate", "projections", "task_weighting")
                },
                # Everything trains in full fine-tuning (the experts plus the same heads and gate).
                "full_finetune_trainable": (ok.get("full_finetune") or {}).get("trainable_in_this_mode"),
            }
    return memory, fractions


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------------------------------------------
# 4. Ensemble quality over folds x seeds (bench/ensemble_quality.py)


# ---------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Result JSON (written atomically).")
    parser.add_argument(
        "--quick", action="store_true", help="Tiny sizes: checks the pipeline and the schema."
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {', '.join(SECTIONS)}."
    )
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="Shared data (ptbxl500/).")
    parser.add_argument("--parity-dir", type=Path, default=default_parity_dir(), help="Parity manifests.")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="Scratch folder (default: a new temp dir)."
    )
    parser.add_argument("--keep-work", action="store_true", help="Keep the scratch folder.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--cache-sets", default="light,foundation", help="Expert sets timed with/without cache."
    )
    parser.add_argument(
        "--cache-epochs", type=int, default=3, help="Epochs per light-expert cache timing run."
    )
    parser.add_argument(
        "--cache-fm-epochs", type=int, default=2, help="Epochs per foundation-model cache timing run."
    )
    parser.add_argument(
        "--cache-fm-records",
        type=int,
        default=32,
        help="Records per part for the foundation-model cache runs.",
    )
    parser.add_argument("--memory-sets", default="foundation,light", help="Expert sets for the memory modes.")
    parser.add_argument(
        "--memory-modes", default=",".join(MEMORY_MODES), help=f"Subset of {', '.join(MEMORY_MODES)}."
    )
    parser.add_argument("--memory-batch-fm", type=int, default=4, help="Batch of the foundation-model modes.")
    parser.add_argument("--memory-batch-light", type=int, default=32, help="Batch of the light-expert modes.")
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        help="Training steps per memory mode (the 2nd step holds activations, gradients and AdamW state).",
    )
    parser.add_argument("--child-timeout", type=float, default=300.0, help="Seconds per memory subprocess.")
    parser.add_argument("--folds", default="0,1,2,3,4", help="Ensemble section: k-fold runs (of 5).")
    parser.add_argument("--seeds", default="0,1,2", help="Ensemble section: training seeds per fold.")
    parser.add_argument(
        "--variants",
        default=",".join(ensemble_quality.VARIANTS),
        help=f"Ensemble section: subset of {', '.join(ensemble_quality.VARIANTS)}.",
    )
    parser.add_argument(
        "--pool",
        choices=("none", "cinc"),
        default="none",
        help="Ensemble section: 'cinc' adds the CinC sample (superclasses via SNOMED CT) to every training part.",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=200, help="Ensemble section: paired bootstrap resamples per run."
    )
    parser.add_argument(
        "--figure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ensemble section: write the figure next to the JSON (--out with .png).",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return args
    args.sections = _choices(args.sections, SECTIONS, "--sections")
    args.cache_sets = _choices(args.cache_sets, ("light", "foundation"), "--cache-sets")
    args.memory_sets = _choices(args.memory_sets, ("foundation", "light"), "--memory-sets")
    args.memory_modes = _choices(args.memory_modes, MEMORY_MODES, "--memory-modes")
    args.folds = [int(f) for f in args.folds.split(",") if f.strip()]
    args.seeds = [int(f) for f in args.seeds.split(",") if f.strip()]
    args.variants = _choices(args.variants, tuple(ensemble_quality.VARIANTS), "--variants")
    if args.quick:
        args.cache_epochs = args.cache_fm_epochs = 1
        args.memory_steps = 1
        args.memory_batch_fm = 2
        args.memory_batch_light = 4
        args.folds = args.folds[:1]
        args.seeds = args.seeds[:1]
        args.bootstrap = min(args.bootstrap, 20)
    return args


def _choices(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{flag}: unknown {unknown or text!r}; choose from {list(allowed)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        result = memory_child(json.loads(args.memory_child))
        print(CHILD_MARKER + json.dumps(result, default=_json_default), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("enecg", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Every MoE run saves its model next to local expert folders; the portability warning is expected here.
    logging.getLogger("enecg.ensemble.serialization").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="enecg-bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "training",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("memory_child", "out", "work_dir", "keep_work")
        },
        "skipped": {},
    }
    try:
        if "feature_cache" in args.sections:
            t0 = time.perf_counter()
            document["feature_cache"] = bench_feature_cache(args, work)
            document["feature_cache_section_s"] = time.perf_counter() - t0
        if "memory" in args.sections:
            t0 = time.perf_counter()
            document["memory"], document["trainable_parameters"] = bench_memory(args)
            document["memory_section_s"] = time.perf_counter() - t0
        if "ensemble" in args.sections:
            t0 = time.perf_counter()
            key = "ensemble" if args.pool == "none" else f"ensemble_pool_{args.pool}"
            document[key] = ensemble_quality.bench_ensemble(args, work / "ensemble")
            document[f"{key}_section_s"] = time.perf_counter() - t0
    finally:
        if not args.keep_work and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    document["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    document["total_s"] = time.perf_counter() - started
    if args.out.is_file() and not args.quick:
        # Sections not run this time keep their previous results (each records its own settings and machine).
        previous = json.loads(args.out.read_text())
        previous_sections = {k: v for k, v in previous.items() if k not in document and k != "runs_of"}
        document = {**previous_sections, **document}
    write_json_atomic(args.out, document)
    LOG.info("wrote %s (%.0f s)", args.out, document["total_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
