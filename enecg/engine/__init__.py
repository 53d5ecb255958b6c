"""The training engine under training, pretraining and generative: :class:`Trainer` (the one training loop),
:class:`TrainerCallback` (its hooks), selection policies (:mod:`enecg.engine.selection`) and checkpoint folders
(:mod:`enecg.engine.checkpoint`)."""

from enecg.engine.callbacks import TrainerCallback
from enecg.engine.selection import BestState, Selection
from enecg.engine.trainer import DataWait, Trainer, TrainerArguments, TrainerState

__all__ = ["BestState", "DataWait", "Selection", "Trainer", "TrainerArguments", "TrainerCallback", "TrainerState"]
