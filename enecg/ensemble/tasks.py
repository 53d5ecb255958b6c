"""Task semantics: losses with missing labels masked, predictions, and how experts' outputs are combined.

Shapes: *scalar* tasks (binary, regression) have logits ``(B,)``; multilabel / multiclass have ``(B, K)``.
Labels follow the dataset schema (:mod:`enecg.data.schema`): float tensors with NaN where a label is missing
(multiclass labels are class indices stored as floats; regression labels are raw, un-normalised targets).

Combining experts (``combine``), when the gate weights the experts' *predictions*:

* ``mix="probabilities"`` (default): the ensemble's predictive distribution is the mixture
  ``p = sum_e w_e p_e`` of the experts' distributions (what the paper's "weighted predictions" means for a
  classifier). It is returned as logits of that mixture, computed in log space with ``logsumexp`` (stable, and
  exact: ``sigmoid``/``softmax`` of the returned logits gives ``p``), so the usual BCE / cross-entropy on the
  combined logits is the mixture's exact log-likelihood.
* ``mix="logits"``: a weighted sum of the experts' logits (a product-of-experts-like geometric pooling); sharper,
  but the combined probability is not an average of the experts' probabilities.

Regression predictions are always averaged (in normalised target space, which is a linear map of the raw one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from enecg.ensemble.config import MixSpace, TaskConfig


class Task:
    """Loss, prediction and combination rules of one :class:`~enecg.ensemble.config.TaskConfig`."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.name = config.name
        self.type = config.type
        self.num_outputs = config.num_outputs
        self.is_scalar = config.type in ("binary", "regression")
        self.mean = 0.0 if config.target_mean is None else float(config.target_mean)
        self.std = 1.0 if config.target_std is None else float(config.target_std)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.type}, outputs={self.num_outputs})"

    # -- targets -------------------------------------------------------------------------------------------------

    def normalise_target(self, y: Tensor) -> Tensor:
        """Raw regression targets -> the normalised space the head predicts in."""
        return (y - self.mean) / self.std

    def denormalise(self, y: Tensor) -> Tensor:
        return y * self.std + self.mean

    def _labels(self, labels: Tensor, batch: int) -> Tensor:
        labels = torch.as_tensor(labels).float()
        if self.is_scalar or self.type == "multiclass":
            if labels.dim() == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            expected = (batch,)
        else:
            expected = (batch, self.num_outputs)
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"task {self.name!r} ({self.type}): labels have shape {tuple(labels.shape)}, expected {expected}"
            )
        return labels

    # -- loss ----------------------------------------------------------------------------------------------------

    def loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss over the labelled entries, and the number of labelled entries.

        NaN labels are excluded (per element for multilabel, per row otherwise). When nothing is labelled the loss
        is an exact zero that is still connected to ``logits`` (finite zero gradients; every parameter stays in the
        graph, which distributed training needs).
        """
        logits = logits.float()
        labels = self._labels(labels, logits.shape[0]).to(logits.device)
        valid = ~torch.isnan(labels)
        filled = torch.where(valid, labels, torch.zeros_like(labels))  # NaN never enters the loss graph
        if self.type in ("multilabel", "binary"):
            per_entry = F.binary_cross_entropy_with_logits(logits, filled, reduction="none")
        elif self.type == "multiclass":
            self._check_class_indices(labels[valid])
            per_entry = F.cross_entropy(logits, filled.long(), reduction="none")
        else:
            target = self.normalise_target(filled)
            if self.config.regression_loss == "huber":
                per_entry = F.huber_loss(logits, target, reduction="none", delta=self.config.huber_delta)
            else:
                per_entry = F.mse_loss(logits, target, reduction="none")
        weights = valid.to(per_entry.dtype)
        count = weights.sum()
        return (per_entry * weights).sum() / count.clamp(min=1.0), count

    def _check_class_indices(self, values: Tensor) -> None:
        if values.numel() == 0:
            return
        bad = (values != values.round()) | (values < 0) | (values >= self.num_outputs)
        if bool(bad.any()):
            raise ValueError(
                f"task {self.name!r}: multiclass labels must be class indices in [0, {self.num_outputs}) or NaN; "
                f"got {values[bad][:5].tolist()}"
            )

    # -- predictions ---------------------------------------------------------------------------------------------

    def predict(self, logits: Tensor) -> Tensor:
        """Logits -> probabilities (multilabel/binary), class probabilities (multiclass), raw-unit values (regression)."""
        logits = logits.float()
        if self.type in ("multilabel", "binary"):
            return torch.sigmoid(logits)
        if self.type == "multiclass":
            return torch.softmax(logits, dim=-1)
        return self.denormalise(logits)

    def combine(self, expert_logits: Tensor, weights: Tensor, log_weights: Tensor, mix: MixSpace) -> Tensor:
        """Combine per-expert logits ``(B, E[, K])`` with gate weights ``(B, E)`` into logits ``(B[, K])``.

        ``log_weights`` must be the gate's log-weights (``-inf`` for experts not routed to): taking ``log`` of
        zero weights here would give NaN gradients. Entries of ``expert_logits`` for unrouted experts may hold any
        finite placeholder; they get zero weight and zero gradient.
        """
        expert_logits = expert_logits.float()
        weights, log_weights = weights.float(), log_weights.float()
        if not self.is_scalar:  # broadcast the weights over the K outputs
            weights, log_weights = weights.unsqueeze(-1), log_weights.unsqueeze(-1)
        if self.type == "regression" or mix == "logits":
            return (weights * expert_logits).sum(dim=1)
        if self.type == "multiclass":
            return torch.logsumexp(log_weights + F.log_softmax(expert_logits, dim=-1), dim=1)
        log_p = torch.logsumexp(log_weights + F.logsigmoid(expert_logits), dim=1)
        log_not_p = torch.logsumexp(log_weights + F.logsigmoid(-expert_logits), dim=1)
        return log_p - log_not_p
