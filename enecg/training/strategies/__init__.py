"""Training strategies (``model.strategy.name``): registered classes, see :mod:`.base`.

* ``joint`` (:mod:`.joint`): everything on the gated mixture's loss.
* ``staged`` (:mod:`.staged`): each expert's heads on their own loss, then the gate on out-of-fold predictions.
"""

from enecg.training.strategies.base import (
    StrategyResult,
    TrainingStrategy,
    get_strategy,
    register_strategy,
    strategy_names,
)
from enecg.training.strategies.joint import JointStrategy
from enecg.training.strategies.staged import StagedStrategy

__all__ = [
    "JointStrategy",
    "StagedStrategy",
    "StrategyResult",
    "TrainingStrategy",
    "get_strategy",
    "register_strategy",
    "strategy_names",
]
