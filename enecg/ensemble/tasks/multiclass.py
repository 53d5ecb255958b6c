"""``multiclass``: one of K classes (e.g. the rhythm); softmax, cross-entropy, mixtures of categoricals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from enecg.ensemble.config import TaskConfig
from enecg.ensemble.registries import register_task_type
from enecg.ensemble.tasks.base import Task


@register_task_type
class MulticlassTask(Task):
    type_name = "multiclass"
    evaluated_as = "multiclass"
    headline_metrics = ("macro_auroc", "accuracy")
    card_pipeline = ("time-series-classification", "multi-class classification")

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        super().check_config(config)
        if len(config.label_names) < 2:
            raise ValueError(
                f"task {config.name!r}: multiclass needs at least 2 label_names, got {len(config.label_names)}"
            )

    def check_labels(self, values: Tensor) -> None:
        if values.numel() == 0:
            return
        bad = (values != values.round()) | (values < 0) | (values >= self.num_outputs)
        if bool(bad.any()):
            raise ValueError(
                f"task {self.name!r}: multiclass labels must be class indices in [0, {self.num_outputs}) or NaN; "
                f"got {values[bad][:5].tolist()}"
            )

    def entry_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels.long(), reduction="none")

    def predict(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def mix_probabilities(self, expert_logits: Tensor, weights: Tensor, log_weights: Tensor) -> Tensor:
        # log of sum_e w_e softmax(z_e): logits of the mixture (softmax of them gives it back exactly).
        return torch.logsumexp(log_weights + F.log_softmax(expert_logits, dim=-1), dim=1)
