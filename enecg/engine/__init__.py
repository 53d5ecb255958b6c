"""The generic training engine under training, pretraining and generative: :class:`Trainer` (the step loop),
:class:`TrainerCallback` (its hooks) and checkpoint folders (:mod:`enecg.engine.checkpoint`)."""

from enecg.engine.callbacks import TrainerCallback
from enecg.engine.trainer import Trainer, TrainerArguments, TrainerState

__all__ = ["Trainer", "TrainerArguments", "TrainerCallback", "TrainerState"]
