"""Create in-house light CNN experts for a recipe (``experts[].create``), trained on the run's training parts.

The light architectures (:mod:`enecg.experts.families.light`) are small enough to pretrain on a CPU in seconds to
minutes. A recipe entry with ``create:`` names the folder (``source``) where the expert lives; when that folder
holds no expert yet, it is built here: a light model initialised from the run's seed, optionally trained for
``pretrain_steps`` supervised steps on one task of the *training parts only* (so the expert never saw the
validation or test records), then saved with :func:`enecg.experts.inhouse.save_inhouse_expert` and loaded like
any other expert. An existing folder is reused as is (delete it to rebuild).

The supervised loop is public and reused by standalone recipes (``enecg efficiency``, ``enecg transfer``):
:class:`SupervisedRows` (one task's labelled rows of a part, contract applied), :func:`train_supervised` (AdamW
steps on random batches on the engine's :class:`~enecg.engine.Trainer`, optional validation with the best
weights restored), :func:`fit_light_model` (the same
by epochs with a :class:`SupervisedSettings` budget), :func:`predict_supervised` and :func:`validation_loss`, plus
the recipe sections :class:`SupervisedDataSection` and :class:`LightInputSection`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from enecg.contract import InputContract, apply_contract_records
from enecg.data.rows import label_arrays, rows_to_records
from enecg.data.schema import DatasetMeta, TaskInfo
from enecg.engine.trainer import Trainer, TrainerArguments, iterate_forever
from enecg.ensemble.config import TaskConfig
from enecg.ensemble.tasks import Task, build_task, task_type
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import EXPERT_SPEC_FILE, save_inhouse_expert
from enecg.leads import STANDARD_12_LEADS
from enecg.record import demographics_array
from enecg.training.data import load_training_dataset, select_part
from enecg.training.recipe import DataSection, LightExpertSpec

logger = logging.getLogger(__name__)


def light_contract(spec: LightExpertSpec) -> InputContract:
    """The input contract of a created light expert."""
    return InputContract(fs=spec.fs, leads=tuple(spec.leads), length=spec.input_length, scaling=spec.scaling)


def expert_exists(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete in-house expert (its spec file is written last)."""
    return (Path(folder) / EXPERT_SPEC_FILE).is_file()


def create_light_expert(
    spec: LightExpertSpec,
    folder: str | Path,
    *,
    name: str,
    train_part: datasets.Dataset,
    tasks: list[TaskInfo],
    seed: int,
) -> Path:
    """Build (and optionally pretrain) a light expert and save it into ``folder``; returns the folder."""
    task = None
    if spec.pretrain_task:
        matches = [t for t in tasks if t.name == spec.pretrain_task]
        if not matches:
            raise ValueError(
                f"expert {name!r}: create.pretrain_task {spec.pretrain_task!r} is not a task of the dataset "
                f"({[t.name for t in tasks]})"
            )
        task = matches[0]
    n_outputs = task_outputs(task) if task is not None else 1
    config = LightCNNConfig(
        architecture=spec.architecture,
        in_leads=len(spec.leads),
        input_length=spec.input_length,
        fs=spec.fs,
        width_multiplier=spec.width_multiplier,
        embedding_dim=spec.embedding_dim,
        n_outputs=n_outputs,
        use_demographics=spec.use_demographics,
    )
    contract = light_contract(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_light_model(config)
        metrics: dict[str, Any] = {"pretrain_steps": spec.pretrain_steps, "pretrain_task": spec.pretrain_task}
        if task is not None and spec.pretrain_steps > 0:
            metrics["final_loss"] = _pretrain(model, spec, contract, train_part, task, seed)
    model.eval()
    folder = Path(folder)
    save_inhouse_expert(
        model,
        family="light",
        config=config,
        contract=contract,
        folder=folder,
        name=name,
        metrics=metrics,
        description=(
            f"In-house {spec.architecture} expert created by an enecg recipe"
            + (
                f", pretrained for {spec.pretrain_steps} steps on {spec.pretrain_task!r} (training parts only)."
                if metrics.get("final_loss") is not None
                else " (random initialisation)."
            )
        ),
    )
    logger.info("created light expert %r in %s (%s)", name, folder, metrics)
    return folder


def _pretrain(
    model: torch.nn.Module,
    spec: LightExpertSpec,
    contract: InputContract,
    part: datasets.Dataset,
    task: TaskInfo,
    seed: int,
) -> float:
    """Supervised steps with the model's own classifier; returns the last loss."""
    rows = SupervisedRows(part, contract, task)
    result = train_supervised(
        model,
        rows,
        steps=spec.pretrain_steps,
        batch_size=spec.pretrain_batch_size,
        lr=spec.pretrain_lr,
        seed=seed,
    )
    return result.final_loss


# ------------------------------------------------------------------------------ reusable supervised training


@dataclass
class SupervisedSettings:
    """Budget and optimiser of a standalone supervised training of a light model (recipe section)."""

    epochs: int = field(default=5, metadata={"help": "Passes over the labelled training records."})
    batch_size: int = field(default=32, metadata={"help": "Records per optimizer step."})
    lr: float = field(default=3e-3, metadata={"help": "Learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (null: none)."})
    select_on_validation: bool = field(
        default=True,
        metadata={"help": "Keep the weights of the epoch with the lowest validation loss (else the last)."},
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class SupervisedResult:
    """What :func:`train_supervised` did."""

    final_loss: float
    steps: int
    best_step: int | None = None
    best_validation_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    target_mean: float = 0.0
    target_std: float = 1.0


class SupervisedRows:
    """The labelled rows of one dataset part for one task, served as ``(windows, demographics, labels)``.

    Windows are the contract-prepared first window of each record ``(B, leads, length)``. With ``preload`` the
    contract is applied once to every labelled row (fast epochs on small parts; memory ``N x leads x length``
    floats), otherwise per batch (any dataset size).
    """

    def __init__(
        self, part: datasets.Dataset, contract: InputContract, task: TaskInfo, *, preload: bool = False
    ) -> None:
        self.view = part.with_format("numpy")
        self.contract, self.task = contract, task
        self.labelled = _labelled_rows(np.asarray(self.view[task.name], dtype=np.float32), task)
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if preload and self.labelled.size:
            self._cache = self._prepare(self.labelled)

    def __len__(self) -> int:
        return int(self.labelled.size)

    def patient_ids(self) -> list[str]:
        """Patient id of each labelled row, in order (bootstrap groups)."""
        ids = self.view["patient_id"]
        return [str(ids[i]) for i in self.labelled]

    def regression_stats(self) -> tuple[float, float]:
        values = np.asarray(self.view[self.task.name], dtype=np.float64)[self.labelled]
        return float(values.mean()), float(values.std() or 1.0)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows``: positions in the part (a subset of :attr:`labelled`, sorted)."""
        if self._cache is None:
            return self._prepare(rows)
        positions = torch.from_numpy(np.searchsorted(self.labelled, rows))
        return tuple(t.index_select(0, positions) for t in self._cache)  # type: ignore[return-value]

    def _prepare(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        records, row_dicts = rows_to_records(self.view[rows.tolist()])
        windows = torch.from_numpy(apply_contract_records(records, self.contract).windows[:, 0])
        demographics = torch.from_numpy(demographics_array(records))
        labels = torch.from_numpy(label_arrays(row_dicts, [self.task])[self.task.name])
        return windows, demographics, labels


def _forward(model: torch.nn.Module, windows: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
    # A light model built with demographics needs them; one built without refuses them.
    uses = bool(getattr(getattr(model, "config", None), "use_demographics", False))
    return model(windows, demographics) if uses else model(windows)


def train_supervised(
    model: torch.nn.Module,
    rows: SupervisedRows,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = None,
    validation: SupervisedRows | None = None,
    eval_every: int | None = None,
) -> SupervisedResult:
    """Train ``model`` (its own classifier) on ``rows`` for ``steps`` AdamW steps; returns what happened.

    Each step draws ``batch_size`` labelled rows without replacement from a ``numpy`` generator seeded with
    ``seed`` (the caller seeds torch for initialisation and dropout). With ``validation``, the validation loss is
    computed every ``eval_every`` steps (and at the end) and the weights of the lowest one are restored at the
    end. Regression targets are standardised with the training rows' mean and std (returned). The model is left
    in eval mode.
    """
    task = rows.task
    if len(rows) == 0:
        raise ValueError(f"task {task.name!r} has no labelled training records")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    generator = np.random.default_rng(seed)
    mean, std = rows.regression_stats() if task_type(task.type).normalised_targets else (0.0, 1.0)

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = generator.choice(rows.labelled, size=min(batch_size, len(rows)), replace=False)
        return rows.batch(np.sort(chosen))

    def compute_loss(
        model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        windows, demographics, labels = batch
        return _loss(_forward(model, windows, demographics), labels, task, mean, std), {}

    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay),
        iterate_forever(draw),
        compute_loss,
        TrainerArguments(
            max_steps=steps,
            max_grad_norm=max_grad_norm,
            eval_every=eval_every or None,
            metric_for_best="validation_loss" if validation is not None else None,
        ),
        evaluate=(
            functools.partial(
                _validation_metrics, rows=validation, mean=mean, std=std, batch_size=max(batch_size, 64)
            )
            if validation is not None
            else None
        ),
    )
    state = trainer.train()
    model.eval()
    return SupervisedResult(
        final_loss=float(trainer.last_loss) if trainer.last_loss is not None else float("nan"),
        steps=steps,
        best_step=state.best_step,
        best_validation_loss=state.best_metric,
        history=state.eval_history,
        target_mean=mean,
        target_std=std,
    )


@torch.no_grad()
def _outputs(
    model: torch.nn.Module, rows: SupervisedRows, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for start in range(0, len(rows), batch_size):
            windows, demographics, batch_labels = rows.batch(rows.labelled[start : start + batch_size])
            logits.append(_forward(model, windows, demographics))
            labels.append(batch_labels)
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def _validation_metrics(
    model: torch.nn.Module, *, rows: SupervisedRows, mean: float, std: float, batch_size: int
) -> dict[str, float]:
    return {"validation_loss": validation_loss(model, rows, mean=mean, std=std, batch_size=batch_size)}


def validation_loss(
    model: torch.nn.Module, rows: SupervisedRows, *, mean: float = 0.0, std: float = 1.0, batch_size: int = 64
) -> float:
    """The task loss of ``model`` over every labelled row of ``rows`` (eval mode)."""
    logits, labels = _outputs(model, rows, batch_size)
    return float(_loss(logits, labels, rows.task, mean, std))


def predict_supervised(
    model: torch.nn.Module,
    rows: SupervisedRows,
    *,
    batch_size: int = 64,
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, labels)`` over the labelled rows, in :attr:`SupervisedRows.labelled` order.

    Predictions are what :func:`enecg.evaluation.task_eval.evaluate_task` takes: probabilities (sigmoid for
    multi-label/binary, softmax for multi-class) or regression values in the target's unit.
    """
    logits, labels = _outputs(model, rows, batch_size)
    rules = _task(rows.task, target_mean, target_std)
    predictions = rules.predict(_task_logits(rules, logits))
    return predictions.numpy().astype(np.float64), labels.numpy().astype(np.float64)


def _labelled_rows(labels: np.ndarray, task: TaskInfo) -> np.ndarray:
    if labels.ndim == 2:
        return np.flatnonzero(~np.isnan(labels).all(axis=1))
    return np.flatnonzero(~np.isnan(labels))


def _task(info: TaskInfo, mean: float = 0.0, std: float = 1.0) -> Task:
    """The registered task type of ``info``, normalising targets by ``mean`` / ``std`` where the type does."""
    normalised = task_type(info.type).normalised_targets
    extra = {"target_mean": mean, "target_std": std} if normalised else {}
    return build_task(TaskConfig.from_task_info(info, **extra))


def _task_logits(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """A light model's ``(B, outputs)`` logits in the task's shape (``(B,)`` for one-output types)."""
    return logits.reshape(len(logits)) if task.is_scalar else logits


def _loss(
    logits: torch.Tensor, labels: torch.Tensor, task: TaskInfo, mean: float, std: float
) -> torch.Tensor:
    # The ensemble's own task loss (NaN labels masked), so a light expert learns what its heads will.
    rules = _task(task, mean, std)
    return rules.loss(_task_logits(rules, logits), labels)[0]


# --------------------------------------------------------------------- recipe sections of standalone training


@dataclass
class SupervisedDataSection:
    """A prepared dataset (built from a PTB-XL folder when missing) and the parts a light model uses."""

    path: str = field(metadata={"help": "Folder of a prepared enecg dataset (enecg_dataset.json + Arrow)."})
    prepare_from: str | None = field(
        default=None, metadata={"help": "PTB-XL folder: build the dataset into `path` when it is missing."}
    )
    rate: int = field(default=100, metadata={"help": "prepare_from: PTB-XL sampling rate (100 or 500)."})
    task: str = field(default="superclass", metadata={"help": "Classification task (label column) trained."})
    train_parts: list[str] = field(default_factory=lambda: ["train"], metadata={"help": "Parts trained on."})
    validation_part: str = field(
        default="validation", metadata={"help": "Part for model selection and thresholds."}
    )
    test_part: str = field(default="test", metadata={"help": "Part evaluated once, at the end."})
    max_records: int | None = field(
        default=None, metadata={"help": "Use only the first N records of each part (quick runs, tests)."}
    )

    def __post_init__(self) -> None:
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("data.max_records must be >= 1 or null")
        if self.test_part in [*self.train_parts, self.validation_part]:
            raise ValueError(f"data.test_part {self.test_part!r} is also trained on or used for selection")


@dataclass
class LightInputSection:
    """Input contract and size shared by the light models of a standalone training recipe."""

    width_multiplier: float = field(default=1.0, metadata={"help": "Scales every layer's channel count."})
    embedding_dim: int = field(default=128, metadata={"help": "Size of the models' embedding."})
    fs: float = field(default=100.0, metadata={"help": "Sampling rate of the input contract (Hz)."})
    input_length: int = field(default=1000, metadata={"help": "Samples per input window."})
    leads: list[str] = field(
        default_factory=lambda: list(STANDARD_12_LEADS), metadata={"help": "Input leads, in order."}
    )
    scaling: str = field(
        default="zscore_lead", metadata={"help": "Contract scaling (none | zscore_lead | ...)."}
    )

    def contract(self) -> InputContract:
        return InputContract(
            fs=self.fs, leads=tuple(self.leads), length=self.input_length, scaling=self.scaling
        )

    def light_config(self, architecture: str, n_outputs: int, use_demographics: bool) -> LightCNNConfig:
        return LightCNNConfig(
            architecture=architecture,
            in_leads=len(self.leads),
            input_length=self.input_length,
            fs=self.fs,
            width_multiplier=self.width_multiplier,
            embedding_dim=self.embedding_dim,
            n_outputs=n_outputs,
            use_demographics=use_demographics,
        )


@dataclass
class SupervisedParts:
    """The train / validation / test rows of one task, contract applied (see :func:`load_supervised_parts`)."""

    task: TaskInfo
    train: SupervisedRows
    validation: SupervisedRows
    test: SupervisedRows | None
    dataset_path: str

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test) if self.test is not None else 0,
        }


def task_outputs(task: TaskInfo) -> int:
    """Logits a standalone classifier needs for ``task``."""
    return task_type(task.type).outputs_for(len(task.names))


def select_parts(
    dataset: datasets.DatasetDict,
    meta: DatasetMeta,
    *,
    task_name: str,
    train_parts: list[str],
    validation_part: str,
    test_part: str | None,
    contract: InputContract,
    max_records: int | None,
    where: str,
) -> SupervisedParts:
    """The labelled rows of ``task_name`` in the given parts (checked against the dataset), preloaded."""
    tasks = {t.name: t for t in meta.tasks}
    if task_name not in tasks:
        raise ValueError(f"{where}: task {task_name!r} is not in the dataset (it has {sorted(tasks)})")
    task = tasks[task_name]
    wanted = [*train_parts, validation_part, *([test_part] if test_part else [])]
    missing = sorted(set(wanted) - set(dataset))
    if missing:
        raise ValueError(f"{where}: the dataset has no parts {missing} (it has {sorted(dataset)})")

    def rows(parts: list[str]) -> SupervisedRows:
        return SupervisedRows(select_part(dataset, parts, max_records), contract, task, preload=True)

    return SupervisedParts(
        task=task,
        train=rows(train_parts),
        validation=rows([validation_part]),
        test=rows([test_part]) if test_part else None,
        dataset_path=where,
    )


def load_supervised_parts(section: SupervisedDataSection, contract: InputContract) -> SupervisedParts:
    """Load (or build from PTB-XL) the dataset of ``section`` and serve its parts for ``section.task``."""
    data = DataSection(path=section.path, prepare_from=section.prepare_from, rate=section.rate)
    dataset, meta = load_training_dataset(data)
    return select_parts(
        dataset,
        meta,
        task_name=section.task,
        train_parts=list(section.train_parts),
        validation_part=section.validation_part,
        test_part=section.test_part,
        contract=contract,
        max_records=section.max_records,
        where=section.path,
    )


def steps_for_epochs(n_rows: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """``(total steps, steps per epoch)`` for ``epochs`` passes over ``n_rows`` in batches of ``batch_size``."""
    per_epoch = max(1, math.ceil(n_rows / batch_size))
    return per_epoch * epochs, per_epoch


def fit_light_model(
    model: torch.nn.Module, parts: SupervisedParts, settings: SupervisedSettings, seed: int
) -> SupervisedResult:
    """Train ``model`` on ``parts.train`` for ``settings.epochs`` (validation loss each epoch, best kept)."""
    steps, per_epoch = steps_for_epochs(len(parts.train), settings.batch_size, settings.epochs)
    return train_supervised(
        model,
        parts.train,
        steps=steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=seed,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        validation=parts.validation if settings.select_on_validation else None,
        eval_every=per_epoch,
    )
