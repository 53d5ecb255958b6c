"""The hooks of every enecg training loop: :class:`TrainerCallback` (the shape of ``transformers.TrainerCallback``).

One base class serves the engine's :class:`~enecg.engine.trainer.Trainer` (pretraining, light experts, the
diffusion model) and the ensemble's phases (:class:`enecg.training.loop.PhaseLoop`, a Trainer; its module
re-exports this class). A hook receives the running loop: ``loop.state`` (``epoch``, ``global_step``,
``micro_step``), ``loop.accelerator`` and ``loop.model``. Every method does nothing by default, so a callback overrides only what
it needs (the resume tests stop a run from ``on_micro_batch_end``; the benchmarks time epochs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainerCallback:
    """Hooks into a training loop; every method does nothing by default."""

    def on_train_begin(self, loop: Any) -> None:
        """Before the first step of a run (also when it resumes)."""

    def on_train_end(self, loop: Any) -> None:
        """After the last step (the best weights, if any were selected, are loaded)."""

    def on_phase_begin(self, loop: Any) -> None:
        """A phase of an ensemble run begins; a phase is one training run, so this calls :meth:`on_train_begin`."""
        self.on_train_begin(loop)

    def on_phase_end(self, loop: Any) -> None:
        """A phase of an ensemble run ended (best weights loaded); calls :meth:`on_train_end`."""
        self.on_train_end(loop)

    def on_epoch_begin(self, loop: Any) -> None:
        """Before the first batch of a pass over the training data."""

    def on_epoch_end(self, loop: Any) -> None:
        """After training an epoch (before its evaluation with ``eval_strategy: epoch``, e.g. a phase's validation)."""

    def on_micro_batch_begin(self, loop: Any) -> None:
        """Right after a training micro-batch was fetched, before its forward (``loop.last_data_wait``: seconds
        spent waiting for it)."""

    def on_micro_batch_end(self, loop: Any) -> None:
        """After every micro-batch (gradient accumulation: several per optimizer step)."""

    def on_step_end(self, loop: Any) -> None:
        """After every optimizer step."""

    def on_log(self, loop: Any, logs: dict[str, Any]) -> None:
        """After the training logs of a window of steps were reduced over processes (``logs``)."""

    def on_evaluate(self, loop: Any, logs: dict[str, Any]) -> None:
        """After an evaluation and the best-state selection (``logs``: what goes to the trackers)."""

    def on_checkpoint(self, loop: Any, path: Path) -> None:
        """After a complete checkpoint was written (``path``)."""


__all__ = ["TrainerCallback"]
