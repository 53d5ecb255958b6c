"""Adding a task type is one registered class: a toy Poisson "count" type written here alone is configured by
name, trains through the ensemble's loss, combines experts, and is evaluated (as a regression), with no change
anywhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_ensemble_model import BATCH, GATE_LENGTH, LEADS, LENGTH, WINDOWS, make_experts
from torch import Tensor

from enecg.ensemble import Ensemble, EnsembleConfig
from enecg.ensemble.config import TaskConfig
from enecg.ensemble.tasks import TASK_TYPES, Task, build_task, register_task_type
from enecg.evaluation.metrics import BootstrapConfig
from enecg.evaluation.task_eval import evaluate_task


class CountTask(Task):
    """Toy type: a count per record (e.g. ectopic beats), Poisson likelihood on a log-rate logit; the mixture of
    experts is a weighted geometric mean of their rates (weighted sum of log-rates)."""

    type_name = "count"
    scalar = True
    evaluated_as = "regression"
    headline_metrics = ("mae", "rmse", "r2")
    higher_is_better = False
    card_pipeline = ("time-series-regression", "count regression")

    def check_labels(self, values: Tensor) -> None:
        if bool((values < 0).any()):
            raise ValueError(f"task {self.name!r}: counts must be >= 0")

    def entry_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.poisson_nll_loss(logits, labels, log_input=True, full=False, reduction="none")

    def predict(self, logits: Tensor) -> Tensor:
        return logits.float().exp()


@pytest.fixture
def count_type():
    register_task_type(CountTask)
    yield CountTask
    TASK_TYPES.unregister("count")


def config(task_type: str = "count") -> EnsembleConfig:
    return EnsembleConfig.from_dict(
        {
            "experts": [
                {"name": f"e{i}", "hub_id": f"org/e{i}", "revision": "a" * 40, "embedding_dim": d}
                for i, d in enumerate((8, 12))
            ],
            "tasks": [{"name": "ectopics", "type": task_type}],
            "heads": {"hidden_sizes": [16]},
            "gate": {"contract": {"fs": 100.0, "leads": ["II"], "length": GATE_LENGTH}, "input": "global"},
            "lora": {"on_heads": False},
        }
    )


def test_a_registered_task_type_trains_in_the_ensemble(count_type) -> None:
    cfg = config()
    assert cfg.tasks[0].num_outputs == 1
    model = Ensemble(cfg, make_experts(cfg))
    assert isinstance(model.task_list[0], count_type)
    torch.manual_seed(0)
    inputs = {n: torch.randn(BATCH, WINDOWS, LEADS, LENGTH) for n in model.expert_names}
    counts = torch.tensor([0.0, 1.0, 2.0, 5.0, 3.0, float("nan"), 4.0, 1.0])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(30):
        out = model(inputs)
        total, _ = model.compute_loss(out, {"ectopics": counts})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    assert losses[-1] < losses[0] * 0.8
    out = model(inputs)
    assert (out.predictions["ectopics"] > 0).all()  # rates, through the type's predict
    # Mixed as the type says (weighted log-rates): the combined logit lies between the experts' logits.
    expert = out.expert_logits["ectopics"]
    combined = out.logits["ectopics"]
    assert ((combined >= expert.min(1).values - 1e-5) & (combined <= expert.max(1).values + 1e-5)).all()


def test_a_registered_task_type_is_evaluated_by_its_form(count_type) -> None:
    rng = np.random.default_rng(0)
    truth = rng.poisson(3.0, 60).astype(float)
    result = evaluate_task("count", ["ectopics"], truth, truth + 0.5, bootstrap=BootstrapConfig(n_resamples=20))
    assert result["type"] == "count" and result["evaluated_as"] == "regression"
    assert result["metrics"]["mae"] == pytest.approx(0.5)


def test_a_registered_task_type_checks_its_labels(count_type) -> None:
    task = build_task(TaskConfig(name="ectopics", type="count"))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        task.loss(torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]))


def test_an_unknown_task_type_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"type must be one of \['binary', 'multiclass', 'multilabel', 'regression'\]"):
        config("count")


def test_a_second_class_under_a_registered_name_is_refused() -> None:
    class Other(CountTask):
        type_name = "binary"

    with pytest.raises(ValueError, match="a task type named 'binary' is already registered"):
        register_task_type(Other)
