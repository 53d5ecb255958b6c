"""``regression``: one value (e.g. age), predicted in normalised target space; MSE or Huber loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from enecg.ensemble.registries import register_task_type
from enecg.ensemble.tasks.base import Task


@register_task_type
class RegressionTask(Task):
    type_name = "regression"
    scalar = True
    evaluated_as = "regression"
    headline_metrics = ("mae", "rmse", "r2")
    higher_is_better = False
    uncertainty_scale = 0.5  # Gaussian likelihood: 1 / (2 sigma^2)
    normalised_targets = True
    card_pipeline = ("time-series-regression", "regression")

    def entry_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        target = self.normalise_target(labels)
        if self.config.regression_loss == "huber":
            return F.huber_loss(logits, target, reduction="none", delta=self.config.huber_delta)
        return F.mse_loss(logits, target, reduction="none")

    def predict(self, logits: Tensor) -> Tensor:
        return self.denormalise(logits.float())
