"""Training strategies: how an ensemble's heads, LoRA and gate are trained, as a sequence of phases.

A strategy is one class registered by name (``model.strategy.name`` in a recipe), in the style of peft's
``register_peft_method`` and timm's ``register_model``: adding one is a new class with
:func:`register_strategy`, nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from enecg.ensemble.model import Ensemble
from enecg.training.loop import PhaseResult, RunContext
from enecg.training.recipe import StrategySettings
from enecg.utils.registry import Registry


@dataclass
class StrategyResult:
    """Every phase a strategy ran (in order) and which one produced the model it leaves in the ensemble."""

    phases: dict[str, PhaseResult]
    final: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def final_phase(self) -> PhaseResult:
        return self.phases[self.final]

    def summary(self) -> dict[str, Any]:
        return {
            "final_phase": self.final,
            "phases": {name: result.summary() for name, result in self.phases.items()},
            **self.notes,
        }


class TrainingStrategy(ABC):
    """Base class of the training strategies.

    Args:
        settings: the recipe's ``model.strategy`` section.
    """

    name: ClassVar[str]

    def __init__(self, settings: StrategySettings) -> None:
        self.settings = settings

    def check(self, ensemble: Ensemble) -> None:  # noqa: B027 (optional hook)
        """Refuse an ensemble this strategy cannot train, before any work (one clear line)."""

    @abstractmethod
    def fit(self, ctx: RunContext) -> StrategyResult:
        """Train ``ctx.ensemble`` in place; leave it with the weights to evaluate and save."""


STRATEGIES: Registry[type[TrainingStrategy]] = Registry(
    "training strategy", builtins="enecg.training.strategies"
)
register_strategy = STRATEGIES.register
"""Class decorator: make a :class:`TrainingStrategy` available as ``model.strategy.name: <cls.name>``."""


def get_strategy(settings: StrategySettings) -> TrainingStrategy:
    """The strategy named in ``settings``, built with them."""
    if settings.name not in STRATEGIES:
        raise ValueError(
            f"model.strategy.name {settings.name!r} is not a training strategy; known: {STRATEGIES.names()}"
        )
    return STRATEGIES.get(settings.name)(settings)


def strategy_names() -> list[str]:
    return STRATEGIES.names()
