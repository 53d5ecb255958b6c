"""``multilabel``: K independent yes/no labels (e.g. PTB-XL diagnostic superclasses); sigmoid per label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from enecg.ensemble.config import TaskConfig
from enecg.ensemble.registries import register_task_type
from enecg.ensemble.tasks.base import Task


class SigmoidTask(Task):
    """Labels in {0, 1} per output, binary cross-entropy, sigmoid probabilities, mixtures of Bernoullis."""

    def entry_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")

    def predict(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits.float())

    def mix_probabilities(self, expert_logits: Tensor, weights: Tensor, log_weights: Tensor) -> Tensor:
        # logit of sum_e w_e sigmoid(z_e), in log space: log p - log (1 - p).
        log_p = torch.logsumexp(log_weights + F.logsigmoid(expert_logits), dim=1)
        log_not_p = torch.logsumexp(log_weights + F.logsigmoid(-expert_logits), dim=1)
        return log_p - log_not_p


@register_task_type
class MultilabelTask(SigmoidTask):
    type_name = "multilabel"
    evaluated_as = "multilabel"
    headline_metrics = ("macro_auroc", "macro_auprc")
    card_pipeline = ("time-series-classification", "multi-label classification")

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        super().check_config(config)
        if not config.label_names:
            raise ValueError(f"task {config.name!r}: multilabel needs at least 1 label name")
