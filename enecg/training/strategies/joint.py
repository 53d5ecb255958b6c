"""``joint``: heads, LoRA and gate train together on the gated mixture's loss (EnECG's own recipe).

Each expert's heads learn only through the mixture (plus ``heads.expert_loss_weight`` times their own loss), so
they co-adapt with the gate: measured on the PTB-XL sample this is weaker than the ``staged`` strategy (see
``bench/README.md``). Kept for comparison and for gates that must be learnt end to end.
"""

from __future__ import annotations

from enecg.training.loop import Phase, RunContext, run_phase
from enecg.training.strategies.base import StrategyResult, TrainingStrategy, register_strategy


@register_strategy
class JointStrategy(TrainingStrategy):
    """One phase: every trainable parameter, the mixture's loss, selection on the recipe's metric."""

    name = "joint"

    def fit(self, ctx: RunContext) -> StrategyResult:
        phase = Phase(
            name="",  # the run folder itself: checkpoints/, best/ (the layout of every joint run so far)
            trainable=lambda name: True,
            loss=lambda ensemble, output, labels: ensemble.compute_loss(output, labels),
            title=f"train {ctx.run.name}".strip(),
        )
        return StrategyResult(phases={"joint": run_phase(ctx, phase)}, final="joint")
