"""How a :class:`~enecg.engine.trainer.Trainer`'s evaluations select the weights a run ends with: :class:`Selection`.

The engine calls a selection policy after every evaluation (:meth:`Selection.update`), when it writes or reads a
checkpoint (:meth:`Selection.save`, :meth:`Selection.load`) and once at the end (:meth:`Selection.finish`); the
run stops early when :attr:`Selection.stopped` (read from the trainer's state) says so. :class:`BestState`, the
default, keeps the weights of the best evaluation on one metric in memory and stops after a patience; the
ensemble's phases plug in a per-group policy (each expert's branch selected and early-stopped on its own).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

logger = logging.getLogger(__name__)

BEST_STATE_FILE = "best_state.safetensors"


class Selection:
    """A selection policy: does nothing by default (the run ends with its last weights and never stops early)."""

    def update(self, trainer: Any, metrics: Mapping[str, Any], logs: dict[str, Any]) -> None:
        """After an evaluation (``metrics``: what ``evaluate`` returned; ``logs``: what the trackers get)."""

    def save(self, trainer: Any, folder: Path) -> None:
        """Write the policy's part of a checkpoint into ``folder`` (main process, before it is renamed)."""

    def load(self, trainer: Any, folder: Path) -> None:
        """Read the policy's part of the checkpoint ``folder`` (every process, when a run resumes)."""

    def finish(self, trainer: Any) -> None:
        """Load the selected weights into the model (after the last step)."""


class BestState(Selection):
    """The weights of the best evaluation on ``metric_for_best`` (a copy in memory, kept in checkpoints as
    ``best_state.safetensors``); early stopping after ``patience`` evaluations without improvement."""

    def __init__(self, metric_for_best: str | None, greater_is_better: bool, patience: int | None) -> None:
        self.metric, self.greater_is_better, self.patience = metric_for_best, greater_is_better, patience
        self.best_state: dict[str, Tensor] | None = None

    def update(self, trainer: Any, metrics: Mapping[str, Any], logs: dict[str, Any]) -> None:
        if self.metric is None:
            return
        if self.metric not in metrics:
            raise ValueError(f"trainer: metric_for_best {self.metric!r} not in {sorted(metrics)}")
        state = trainer.state
        value = metrics[self.metric]
        best = state.best_metric
        if best is None or (value > best if self.greater_is_better else value < best):
            state.best_metric, state.best_step, state.bad_evaluations = value, state.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
        else:
            state.bad_evaluations += 1
            if self.patience is not None and state.bad_evaluations >= self.patience:
                state.stopped_early = True
                logger.info("early stopping at step %d (best step %s)", state.global_step, state.best_step)

    def save(self, trainer: Any, folder: Path) -> None:
        if self.best_state is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.best_state.items()},
                str(folder / BEST_STATE_FILE),
            )

    def load(self, trainer: Any, folder: Path) -> None:
        best = folder / BEST_STATE_FILE
        self.best_state = load_file(str(best)) if best.is_file() else None

    def finish(self, trainer: Any) -> None:
        if self.best_state is not None:
            trainer.unwrapped.load_state_dict(self.best_state)


__all__ = ["BEST_STATE_FILE", "BestState", "Selection"]
