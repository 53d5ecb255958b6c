"""Training a label-conditional ECG diffusion model: :class:`GenerativeConfig` and :func:`train_diffusion`.

Only training parts are read: a config naming ``validation`` or ``test`` is refused, and rows already marked
synthetic (``source`` ``synthetic:...``) are left out, so a model never learns from generated records. Training
runs on the engine's :class:`~enecg.engine.Trainer` under ``accelerate`` (one process, or several with
``accelerate launch``); :class:`LossCurve` records the loss curve; the model is saved Hub-ready on
the main process (:func:`~enecg.generative.model.save_diffusion`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from enecg.contract import InputContract, apply_contract_array
from enecg.data.build import load_dataset_dir
from enecg.data.schema import EVALUATION_PARTS, TaskInfo, is_synthetic
from enecg.engine import Trainer, TrainerArguments, TrainerCallback
from enecg.generative.model import DiffusionSpec, ECGDiffusion, save_diffusion
from enecg.utils.config import ConfigMixin, load_config

logger = logging.getLogger(__name__)
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class GenerativeConfig(ConfigMixin):
    """A training run (``recipes/generate_ptbxl.yaml`` documents each key).

    Read through :mod:`enecg.utils.config` (``from_dict``, :meth:`from_yaml`): unknown keys and wrong types are
    errors naming the source and the key; ``to_dict`` writes lists (``metrics.json``'s ``generative_config``)."""

    config_name: ClassVar[str] = "generative config"

    data: str = field(metadata={"help": "A prepared enecg dataset folder (enecg data prepare ...)."})
    task: str = field(metadata={"help": "Label set to condition on (a multilabel or multiclass task)."})
    output_dir: str = field(metadata={"help": "Folder the Hub-ready model is written to."})
    parts: tuple[str, ...] = field(
        default=("train",), metadata={"help": "Training parts to read; validation/test are refused."}
    )
    fs: float | None = field(
        default=None, metadata={"help": "Rate of generated records in Hz (null: the data's own rate)."}
    )
    leads: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Leads to generate (null: the leads of the data's first record)."}
    )
    length: int = field(default=1000, metadata={"help": "Samples per generated record at `fs`."})
    use_age_sex: bool = field(default=True, metadata={"help": "Condition on age and sex as well."})
    block_out_channels: tuple[int, ...] = field(
        default=(32, 64, 128), metadata={"help": "UNet channels per level (multiples of 8)."}
    )
    condition_hidden: int = field(default=64, metadata={"help": "Hidden width of the condition MLP."})
    train_timesteps: int = field(default=1000, metadata={"help": "DDPM noise levels."})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps when sampling (saved as default)."})
    prediction_type: str = field(
        default="epsilon", metadata={"help": "Network target: epsilon (noise) or v_prediction (velocity)."}
    )
    beta_schedule: str = field(
        default="linear", metadata={"help": "Noise schedule: linear or squaredcos_cap_v2 (cosine)."}
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Save an exponential moving average of the weights with at most this decay (0: the raw "
            "weights). Warmed up (diffusers EMAModel, power 3/4), so short runs average over fewer steps."
        },
    )
    condition_dropout: float = field(
        default=0.1,
        metadata={"help": "Fraction of examples trained unconditioned (classifier-free guidance)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Records per optimisation step (per process)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_steps: int = field(default=500, metadata={"help": "Optimisation steps."})
    max_records: int | None = field(
        default=None, metadata={"help": "Use only the first N records; null: all."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, batches and noise."})
    log_every: int = field(default=20, metadata={"help": "Steps between loss logs (and loss-curve points)."})
    mixed_precision: str = field(default="no", metadata={"help": f"One of {MIXED_PRECISION}."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a model already in output_dir."})

    def __post_init__(self) -> None:
        self.parts = tuple(self.parts)
        self.block_out_channels = tuple(self.block_out_channels)
        if self.leads is not None:
            self.leads = tuple(self.leads)
        refused = [p for p in self.parts if p in EVALUATION_PARTS]
        if refused:
            raise ValueError(f"parts {refused}: a generative model trains on training parts only")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: one of {MIXED_PRECISION}")
        if self.max_steps < 1 or self.batch_size < 1 or self.length < 8:
            raise ValueError("max_steps and batch_size must be >= 1 and length >= 8")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay {self.ema_decay}: must be in [0, 1)")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout {self.condition_dropout}: must be in [0, 1)")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> GenerativeConfig:
        """Read a recipe file with ``--key=value`` overrides (:func:`enecg.utils.config.load_config`)."""
        return load_config(path, cls, overrides)


@dataclass
class TrainingArrays:
    """The training part in memory: scaled signals and conditions (small datasets; PTB-XL-500 is ~24 MB)."""

    signals: np.ndarray  # float32 (N, leads, length), mV
    labels: np.ndarray  # float32 (N, K), NaN rows = unlabelled
    age: np.ndarray
    sex: np.ndarray


def label_matrix(values: list[Any], task: TaskInfo) -> np.ndarray:
    """A task column -> ``(N, K)`` multi-hot (a multiclass index becomes one-hot; missing -> NaN row)."""
    k = len(task.names)
    if task.type == "multilabel":
        return np.asarray(values, dtype=np.float32).reshape(len(values), k)
    out = np.full((len(values), k), np.nan, dtype=np.float32)
    for i, value in enumerate(values):
        if value is not None and not math.isnan(float(value)):
            out[i] = 0.0
            out[i, int(value)] = 1.0
    return out


def read_training_rows(
    data: str, parts: tuple[str, ...], task_name: str, max_records: int | None = None
) -> tuple[list[dict[str, Any]], TaskInfo, Any]:
    """The real rows (synthetic ones left out) of a dataset's training ``parts`` (the first ``max_records``), the
    task and the dataset metadata; a missing part or no real record is a one-line ValueError."""
    loaded, meta = load_dataset_dir(data)
    missing = [p for p in parts if p not in loaded]
    if missing:
        raise ValueError(f"{data}: no part(s) {missing}; parts: {sorted(loaded)}")
    task = meta.task(task_name)
    rows = [row for part in parts for row in loaded[part] if not is_synthetic(row["source"])]
    rows = rows[:max_records] if max_records else rows
    if not rows:
        raise ValueError(f"{data}: no real records in parts {list(parts)}")
    return rows, task, meta


def rows_to_arrays(rows: list[dict[str, Any]], task: TaskInfo, contract: InputContract) -> TrainingArrays:
    """Rows -> signals through ``contract`` (first window, mV), multi-hot labels, ages and sexes (NaN: unknown)."""
    signals = np.stack(
        [
            apply_contract_array(
                np.asarray(r["signal"], np.float32), r["fs"], r["leads"], contract, source=r["record_id"]
            ).windows[0]
            for r in rows
        ]
    )
    return TrainingArrays(
        signals=signals,
        labels=label_matrix([r[task.name] for r in rows], task),
        age=np.asarray([np.nan if r["age"] is None else r["age"] for r in rows], np.float32),
        sex=np.asarray([np.nan if r["sex"] is None else r["sex"] for r in rows], np.float32),
    )


def load_training_arrays(config: GenerativeConfig) -> tuple[TrainingArrays, DiffusionSpec]:
    """Read the training parts (synthetic rows left out) and derive the model spec from them."""
    rows, task, meta = read_training_rows(config.data, config.parts, config.task, config.max_records)
    leads = list(config.leads or rows[0]["leads"])
    fs = float(config.fs or rows[0]["fs"])
    spec = DiffusionSpec(
        task=task.name,
        task_type=task.type,
        label_names=list(task.names),
        leads=leads,
        fs=fs,
        length=config.length,
        use_age_sex=config.use_age_sex,
        block_out_channels=list(config.block_out_channels),
        condition_hidden=config.condition_hidden,
        train_timesteps=config.train_timesteps,
        sample_steps=config.sample_steps,
        prediction_type=config.prediction_type,
        beta_schedule=config.beta_schedule,
        source=f"{meta.source} ({Path(config.data).name}, parts {list(config.parts)})",
    )
    arrays = rows_to_arrays(rows, task, spec.contract())
    signals = arrays.signals
    # One global amplitude keeps the leads' relative sizes; robust to a few saturated records.
    spec.signal_scale = float(np.percentile(np.abs(signals), 99) / 2.5) or 1.0
    return arrays, spec


def train_diffusion(config: GenerativeConfig) -> Path:
    """Train and save; returns the model folder. ``metrics.json`` holds the loss curve and the config."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(config.output_dir)
    if (out / "config.json").is_file() and not config.overwrite:
        raise ValueError(f"{out}: already holds a model; set overwrite: true or choose another output_dir")
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    arrays, spec = load_training_arrays(config)
    model = ECGDiffusion(spec)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(arrays.signals / spec.signal_scale).float(),
        torch.from_numpy(arrays.labels),
        torch.from_numpy(arrays.age),
        torch.from_numpy(arrays.sex),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) > config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    drop_generator = torch.Generator().manual_seed(config.seed + 1)

    def compute_loss(
        model: torch.nn.Module, batch: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        signals, labels, age, sex = batch
        core: ECGDiffusion = trainer.unwrapped  # type: ignore[assignment]
        # Unlabelled rows and a random fraction train the unconditioned branch.
        drop = torch.rand(signals.shape[0], generator=drop_generator) < config.condition_dropout
        drop = (drop.to(labels.device) | labels.isnan().all(dim=1)).to(signals.device)
        condition = core.condition(labels, signals.shape[0], age, sex, drop)
        with accelerator.autocast():
            return core.loss(signals, condition), {}

    curve = LossCurve(config.log_every, config.max_steps)
    average = MovingAverage(config.ema_decay)
    trainer = Trainer(
        model,
        optimizer,
        loader,
        compute_loss,
        TrainerArguments(max_steps=config.max_steps),
        accelerator=accelerator,
        callbacks=[average, curve],
    )
    started = time.time()
    step = trainer.train().global_step
    core: ECGDiffusion = trainer.unwrapped  # type: ignore[assignment]
    ema = average.ema
    metrics = {
        "steps": step,
        "records": len(dataset),
        "label_counts": {
            name: int(np.nansum(arrays.labels[:, i])) for i, name in enumerate(spec.label_names)
        },
        "parameters": int(sum(p.numel() for p in core.parameters())),
        "first_loss": curve.points[0]["loss"],
        "final_loss": curve.points[-1]["loss"],
        "loss_curve": curve.points,
        "seconds": round(time.time() - started, 1),
        "generative_config": config.to_dict(),
    }
    accelerator.wait_for_everyone()
    if ema is not None:  # the averaged weights are the model that is saved (and sampled)
        ema.copy_to(core.parameters())
    if accelerator.is_main_process:
        save_diffusion(core.eval(), out, metrics)
    return out


class LossCurve(TrainerCallback):
    """The loss curve of ``metrics.json``: every ``log_every`` steps (and at the last), the mean over the window's
    steps of each step's loss averaged over processes."""

    def __init__(self, log_every: int, max_steps: int) -> None:
        self.log_every, self.max_steps = log_every, max_steps
        self.points: list[dict[str, float]] = []
        self._window: list[float] = []

    def on_step_end(self, loop: Any) -> None:
        step = loop.state.global_step
        self._window.append(float(loop.accelerator.gather(loop.last_loss[None]).mean()))
        if step % self.log_every == 0 or step == self.max_steps:
            self.points.append({"step": step, "loss": float(np.mean(self._window))})
            logger.info("step %d loss %.4f", step, self.points[-1]["loss"])
            self._window = []


class MovingAverage(TrainerCallback):
    """An exponential moving average of the weights, updated after every optimizer step (``ema`` stays None when
    ``decay`` is 0); the averaged weights are the model that is saved and sampled."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema: Any = None

    def on_train_begin(self, loop: Any) -> None:
        self.ema = _moving_average(loop.unwrapped, self.decay)

    def on_step_end(self, loop: Any) -> None:
        if self.ema is not None:
            self.ema.step(loop.unwrapped.parameters())


def _moving_average(model: ECGDiffusion, decay: float) -> Any:
    """diffusers' EMA of ``model``'s weights (None when ``decay`` is 0). The warm-up (decay ``1 - (1 + step)^-3/4``
    up to ``decay``) keeps the average from being dominated by the random initial weights in short runs."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=True, power=0.75)
