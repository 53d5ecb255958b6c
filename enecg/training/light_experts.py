"""Create in-house light CNN experts for a recipe (``experts[].create``), trained on the run's training parts.

The light architectures (:mod:`enecg.experts.families.light`) are small enough to pretrain on a CPU in seconds to
minutes. A recipe entry with ``create:`` names the folder (``source``) where the expert lives; when that folder
holds no expert yet, it is built here: a light model initialised from the run's seed, optionally trained for
``pretrain_steps`` supervised steps on one task of the *training parts only* (so the expert never saw the
validation or test records), then saved with :func:`enecg.experts.inhouse.save_inhouse_expert` and loaded like
any other expert. An existing folder is reused as is (delete it to rebuild).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.nn import functional as F

from enecg.contract import InputContract, apply_contract_records
from enecg.data.rows import label_arrays
from enecg.data.schema import TaskInfo
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import EXPERT_SPEC_FILE, save_inhouse_expert
from enecg.training.data import rows_to_records
from enecg.training.recipe import LightExpertSpec

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
    n_outputs = len(task.names) if task is not None and task.type in ("multilabel", "multiclass") else 1
    config = LightCNNConfig(
        architecture=spec.architecture,
        in_leads=len(spec.leads),
        input_length=spec.input_length,
        fs=spec.fs,
        width_multiplier=spec.width_multiplier,
        embedding_dim=spec.embedding_dim,
        n_outputs=n_outputs,
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
    view = part.with_format("numpy")
    labelled = _labelled_rows(np.asarray(view[task.name], dtype=np.float32), task)
    if labelled.size == 0:
        raise ValueError(f"pretraining task {task.name!r} has no labelled training records")
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr)
    generator = np.random.default_rng(seed)
    mean, std = 0.0, 1.0
    if task.type == "regression":
        values = np.asarray(view[task.name], dtype=np.float64)[labelled]
        mean, std = float(values.mean()), float(values.std() or 1.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(spec.pretrain_steps):
        rows_idx = generator.choice(
            labelled, size=min(spec.pretrain_batch_size, labelled.size), replace=False
        )
        records, rows = rows_to_records(view[sorted(rows_idx.tolist())])
        windows = torch.from_numpy(apply_contract_records(records, contract).windows[:, 0])
        labels = torch.from_numpy(label_arrays(rows, [task])[task.name])
        logits = model(windows)
        loss = _loss(logits, labels, task, mean, std)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _labelled_rows(labels: np.ndarray, task: TaskInfo) -> np.ndarray:
    if labels.ndim == 2:
        return np.flatnonzero(~np.isnan(labels).all(axis=1))
    return np.flatnonzero(~np.isnan(labels))


def _loss(
    logits: torch.Tensor, labels: torch.Tensor, task: TaskInfo, mean: float, std: float
) -> torch.Tensor:
    if task.type == "multiclass":
        keep = ~torch.isnan(labels)
        return F.cross_entropy(logits[keep], labels[keep].long())
    if task.type == "regression":
        target = (labels - mean) / std
        keep = ~torch.isnan(target)
        return F.mse_loss(logits.squeeze(-1)[keep], target[keep])
    target = labels.reshape(logits.shape)
    keep = ~torch.isnan(target)
    return F.binary_cross_entropy_with_logits(logits[keep], target[keep])
