"""``binary``: one yes/no label (e.g. sex); the head predicts the probability of label 1."""

from __future__ import annotations

from enecg.ensemble.registries import register_task_type
from enecg.ensemble.tasks.multilabel import SigmoidTask


@register_task_type
class BinaryTask(SigmoidTask):
    type_name = "binary"
    scalar = True
    evaluated_as = "binary"
    headline_metrics = ("auroc", "auprc")
    card_pipeline = ("time-series-classification", "binary classification")
