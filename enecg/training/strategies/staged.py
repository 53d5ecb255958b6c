"""``staged``: stacking done right — every expert's heads first, then the gate on out-of-fold predictions.

Phases (folders under the run folder):

1. ``stage1``: every expert's heads (and LoRA) train on **that expert's own loss**, all experts at once, without
   the gate; each expert is a selection group with its own validation score, best epoch and early stopping, its
   own gradient clipping and its own dropout stream, and its heads start from a seed of their own — so each
   expert's heads end exactly where training that expert alone would (``tests/test_strategies.py``).
2. ``oof_0`` ... ``oof_{K-1}``: the training part is cut into K patient-disjoint folds; for each fold the heads
   are re-initialised, trained like stage 1 on the other K-1 folds, and predict the held-out fold. Every training
   record thus gets each expert's prediction from heads that never saw it (``oof/``: folds and logits).
3. ``gate``: heads frozen at stage 1's result; the gate is fitted on the out-of-fold logits (the mixture's loss),
   selected on validation — where the real, full-data heads predict — starting from the uniform mixture, which
   stays the answer when nothing beats it on validation (epoch 0 is a candidate).
4. ``finetune`` (``finetune_epochs > 0``): everything trains jointly at ``optim.lr x finetune_lr_scale``; epoch 0
   (the stage-2 model) is a candidate, so the result is kept only if validation improves.

Why: trained jointly, heads only see the mixture's loss and co-adapt with a gate that routes confidently but not
well (issue: "the ensemble must beat its members"); a gate fitted on predictions the heads made on their own
training records would learn to trust overfitted experts.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from enecg.data.splits import row_folds
from enecg.ensemble.model import Ensemble, EnsembleOutput
from enecg.training.loop import (
    Phase,
    PhaseResult,
    RunContext,
    SelectionGroup,
    collect_expert_logits,
    run_phase,
)
from enecg.training.strategies.base import StrategyResult, TrainingStrategy, register_strategy
from enecg.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

OOF_DIR = "oof"
OOF_LOGITS_FILE = "oof_logits.safetensors"
OOF_FOLDS_FILE = "folds.json"


def own_loss(ensemble: Ensemble, output: EnsembleOutput, labels: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """The sum over experts of each expert's own loss (independent: no parameter is shared)."""
    losses, parts = ensemble.expert_losses(output, labels)
    return torch.stack(list(losses.values())).sum(), parts


def gate_loss(ensemble: Ensemble, output: EnsembleOutput, labels: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """The mixture's loss on given expert logits (the experts' own term is a constant there)."""
    return ensemble.compute_loss(output, labels, include_expert_loss=False)


def _is_branch(name: str) -> bool:
    return name.startswith("branches.")


def selection_groups(ensemble: Ensemble) -> list[SelectionGroup]:
    """Stage 1's selection groups: one per expert and task head (heads are independent models, each kept at its
    own best validation epoch), or one per expert when its branch trains more than heads (LoRA on the expert's
    own layers is shared by its tasks)."""
    trainable = [n for n, p in ensemble.named_parameters() if p.requires_grad]
    groups = []
    for expert in ensemble.expert_names:
        prefix = f"branches.{expert}."
        own = [n for n in trainable if n.startswith(prefix)]
        if own and all(".heads." in n for n in own):
            for task in ensemble.tasks:
                marker = f".heads.{task}."
                groups.append(
                    SelectionGroup(
                        f"{expert}/{task}",
                        match=lambda n, p=prefix, m=marker: n.startswith(p) and m in n,
                        expert=expert,
                        task=task,
                    )
                )
        else:
            groups.append(SelectionGroup(expert, match=lambda n, p=prefix: n.startswith(p), expert=expert))
    return groups


@register_strategy
class StagedStrategy(TrainingStrategy):
    """Heads on their own losses, then a gate fitted on out-of-fold predictions, then optional joint tuning."""

    name = "staged"

    def check(self, ensemble: Ensemble) -> None:
        if ensemble.combine_embeddings:
            raise ValueError(
                "model.strategy.name='staged' trains each expert's own heads: it needs gate.combine='predictions'"
            )
        if ensemble.config.task_weighting == "uncertainty" and self.settings.finetune_epochs == 0:
            logger.warning(
                "task_weighting='uncertainty' has no effect with the staged strategy without stage 3 "
                "(finetune_epochs > 0): stages 1 and 2 weigh the tasks by their static loss_weight"
            )

    def fit(self, ctx: RunContext) -> StrategyResult:
        settings, ensemble = self.settings, ctx.ensemble
        groups = selection_groups(ensemble)
        initial = _snapshot(ensemble, _is_branch)
        phases: dict[str, PhaseResult] = {}

        def heads_phase(name: str, rows: np.ndarray | None) -> Phase:
            return Phase(
                name=name,
                trainable=_is_branch,
                loss=own_loss,
                groups=groups,
                train_rows=rows,
                use_gate=False,
                title=f"{name} {ctx.run.name}".strip(),
            )

        phases["stage1"] = run_phase(ctx, heads_phase("stage1", None))
        stage1 = _snapshot(ensemble, _is_branch)

        folds = row_folds(ctx.patient_ids("train"), settings.oof_folds, ctx.run.seed)
        oof: dict[str, Tensor] = {}
        for k in range(settings.oof_folds):
            _restore(ensemble, initial)
            held_out = np.flatnonzero(folds == k)
            phases[f"oof_{k}"] = run_phase(ctx, heads_phase(f"oof_{k}", np.flatnonzero(folds != k)))
            logits = collect_expert_logits(ctx, "train", held_out)
            index = torch.as_tensor(held_out, dtype=torch.long)
            for task, values in logits.items():
                if task not in oof:
                    oof[task] = torch.full((ctx.n_train, *values.shape[1:]), float("nan"))
                oof[task][index] = values
        _restore(ensemble, stage1)
        self._save_oof(ctx, folds, oof)

        final = "stage1"
        if any(name.startswith("gate.") for name, p in ensemble.named_parameters() if p.requires_grad):
            phases["gate"] = run_phase(
                ctx,
                Phase(
                    name="gate",
                    trainable=lambda name: name.startswith("gate."),
                    loss=gate_loss,
                    expert_logits=oof,
                    epochs=settings.gate_epochs,
                    lr=settings.gate_lr,
                    select_initial=True,
                    title=f"gate {ctx.run.name}".strip(),
                ),
            )
            final = "gate"
        if settings.finetune_epochs > 0:
            phases["finetune"] = run_phase(
                ctx,
                Phase(
                    name="finetune",
                    trainable=lambda name: True,
                    loss=lambda e, o, y: e.compute_loss(o, y),
                    epochs=settings.finetune_epochs,
                    lr=ctx.recipe.optim.lr * settings.finetune_lr_scale,
                    warmup_steps=0,
                    select_initial=True,
                    title=f"finetune {ctx.run.name}".strip(),
                ),
            )
            if phases["finetune"].best_epoch:  # epoch 0 = the stage-2 model: kept when nothing beat it
                final = "finetune"
        notes = {"oof_folds": settings.oof_folds, "oof_fold_sizes": np.bincount(folds).tolist()}
        return StrategyResult(phases=phases, final=final, notes=notes)

    @staticmethod
    def _save_oof(ctx: RunContext, folds: np.ndarray, oof: dict[str, Tensor]) -> None:
        """Out-of-fold folds and logits next to the run (audit trail; the gate phase reads them from memory)."""
        if ctx.accelerator.is_main_process:
            folder = ctx.run_dir / OOF_DIR
            folder.mkdir(parents=True, exist_ok=True)
            table = ctx.collates["train"]
            ids = list(getattr(table, "record_ids", None) or table.part["record_id"])
            write_text_atomic(
                folder / OOF_FOLDS_FILE,
                json.dumps({"record_ids": [str(i) for i in ids], "fold": folds.tolist()}, indent=1),
            )
            tmp = folder / f".{OOF_LOGITS_FILE}.tmp"
            save_file({t: v.contiguous() for t, v in oof.items()}, str(tmp))
            tmp.replace(folder / OOF_LOGITS_FILE)
        ctx.accelerator.wait_for_everyone()


def _snapshot(ensemble: Ensemble, keep) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in ensemble.named_parameters() if p.requires_grad and keep(n)}


def _restore(ensemble: Ensemble, state: dict[str, Tensor]) -> None:
    params = dict(ensemble.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
