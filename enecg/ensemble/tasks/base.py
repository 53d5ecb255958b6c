"""Task semantics: losses with missing labels masked, predictions, and how experts' outputs are combined.

A task type is one :class:`Task` subclass registered by name (``tasks[].type``) with
:func:`~enecg.ensemble.registries.register_task_type`; the built-in ones are ``multilabel``, ``binary``,
``multiclass`` and ``regression`` (one module each). A type declares:

* the shape of its labels and outputs (:attr:`Task.scalar`, :meth:`Task.outputs_for`, :meth:`Task.check_config`);
* its loss on the entries that are labelled (:meth:`Task.entry_loss`; the masking of NaN labels is shared);
* its predictions (:meth:`Task.predict`) and how experts' logits are mixed (:meth:`Task.combine`);
* how it is evaluated (:attr:`Task.evaluated_as`: the form of its predictions, one of ``multilabel`` /
  ``binary`` (probabilities per label), ``multiclass`` (a class distribution) or ``regression`` (values) — the
  evaluation's metrics, baselines and report are written per form) and its headline metrics for model selection.

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

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from enecg.ensemble.config import MixSpace, TaskConfig

EvaluatedAs = Literal["multilabel", "binary", "multiclass", "regression"]


class Task:
    """Loss, prediction and combination rules of one :class:`~enecg.ensemble.config.TaskConfig` (base class of
    the registered task types; build one with :func:`~enecg.ensemble.tasks.build_task`)."""

    type_name: ClassVar[str]
    """The registered name (``tasks[].type``); instances' ``name`` is the task's own name."""
    scalar: ClassVar[bool] = False
    """Outputs ``(B,)`` (one logit per record) rather than ``(B, K)``."""
    evaluated_as: ClassVar[EvaluatedAs]
    headline_metrics: ClassVar[tuple[str, ...]]
    """Validation metrics logged for model selection (``<task>/<metric>``); the first is the headline."""
    higher_is_better: ClassVar[bool] = True
    uncertainty_scale: ClassVar[float] = 1.0
    """Factor of ``exp(-log_var) * loss`` in uncertainty weighting (Kendall et al. 2018: 1 for a classification
    likelihood, 1/2 for a Gaussian one)."""
    normalised_targets: ClassVar[bool] = False
    """Targets are normalised by ``target_mean`` / ``target_std`` (regression-like types)."""
    card_pipeline: ClassVar[tuple[str, str]] = ("time-series-classification", "classification")
    """(Hub pipeline tag, words for the model card) of this kind of task."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.name = config.name
        self.type = config.type
        self.num_outputs = config.num_outputs
        self.is_scalar = self.scalar
        self.mean = 0.0 if config.target_mean is None else float(config.target_mean)
        self.std = 1.0 if config.target_std is None else float(config.target_std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.type}, outputs={self.num_outputs})"

    # -- configuration (class level: used while the config is validated) ----------------------------------------

    @classmethod
    def outputs_for(cls, num_labels: int) -> int:
        """Width of the head's output layer for ``num_labels`` label names."""
        return 1 if cls.scalar else num_labels

    @classmethod
    def check_config(cls, config: TaskConfig) -> None:
        """Refuse a config this type cannot use (one line naming the task); label counts, normalisation."""
        n = len(config.label_names)
        if cls.scalar and n > 1:
            raise ValueError(f"task {config.name!r}: {config.type} has one output; got {n} label_names")
        if config.target_mean is not None and not cls.normalised_targets:
            raise ValueError(f"task {config.name!r}: target normalisation applies to regression tasks only")

    # -- targets -------------------------------------------------------------------------------------------------

    def normalise_target(self, y: Tensor) -> Tensor:
        """Raw regression targets -> the normalised space the head predicts in."""
        return (y - self.mean) / self.std

    def denormalise(self, y: Tensor) -> Tensor:
        return y * self.std + self.mean

    def _labels(self, labels: Tensor, batch: int) -> Tensor:
        labels = torch.as_tensor(labels).float()
        if self.is_scalar or self.evaluated_as == "multiclass":
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
        self.check_labels(labels[valid])
        per_entry = self.entry_loss(logits, filled)
        weights = valid.to(per_entry.dtype)
        count = weights.sum()
        return (per_entry * weights).sum() / count.clamp(min=1.0), count

    def check_labels(self, values: Tensor) -> None:
        """Refuse label values this type cannot learn from (``values``: the labelled entries)."""

    def entry_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss per label entry (same shape as ``labels``; missing entries hold 0 and are masked afterwards)."""
        raise NotImplementedError

    # -- predictions ---------------------------------------------------------------------------------------------

    def predict(self, logits: Tensor) -> Tensor:
        """Logits -> what the task reports (probabilities, class probabilities, raw-unit values...)."""
        raise NotImplementedError

    def combine(self, expert_logits: Tensor, weights: Tensor, log_weights: Tensor, mix: MixSpace) -> Tensor:
        """Combine per-expert logits ``(B, E[, K])`` with gate weights ``(B, E)`` into logits ``(B[, K])``.

        ``log_weights`` must be the gate's log-weights (``-inf`` for experts not routed to): taking ``log`` of
        zero weights here would give NaN gradients. Entries of ``expert_logits`` for unrouted experts may hold any
        finite placeholder; they get zero weight and zero gradient. The base rule is the weighted sum of logits;
        types with a probability mixture override :meth:`mix_probabilities`.
        """
        expert_logits = expert_logits.float()
        weights, log_weights = weights.float(), log_weights.float()
        if not self.is_scalar:  # broadcast the weights over the K outputs
            weights, log_weights = weights.unsqueeze(-1), log_weights.unsqueeze(-1)
        if mix == "logits":
            return (weights * expert_logits).sum(dim=1)
        return self.mix_probabilities(expert_logits, weights, log_weights)

    def mix_probabilities(self, expert_logits: Tensor, weights: Tensor, log_weights: Tensor) -> Tensor:
        """The ``mix="probabilities"`` rule (weights already broadcast to ``expert_logits``); by default the
        weighted sum of logits (right for types whose prediction is a linear map of the logit)."""
        return (weights * expert_logits).sum(dim=1)
