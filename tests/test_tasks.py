"""Task losses (masking of missing labels), predictions and the combination of experts' outputs."""

from __future__ import annotations

import math

import pytest
import torch

from enecg.data.schema import TaskInfo
from enecg.ensemble.config import TaskConfig
from enecg.ensemble.tasks import Task, build_task

NAN = float("nan")


def make_task(kind: str, **kwargs) -> Task:
    names = {"multilabel": ["a", "b", "c"], "multiclass": ["x", "y", "z", "w"]}.get(kind, [])
    return build_task(TaskConfig(name=f"t_{kind}", type=kind, label_names=names, **kwargs))


def random_batch(task: Task, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch,) if task.is_scalar else (batch, task.num_outputs)
    logits = torch.randn(shape, generator=generator)
    if task.type == "multilabel":
        labels = torch.randint(0, 2, shape, generator=generator).float()
    elif task.type == "binary":
        labels = torch.randint(0, 2, (batch,), generator=generator).float()
    elif task.type == "multiclass":
        labels = torch.randint(0, task.num_outputs, (batch,), generator=generator).float()
    else:
        labels = 50 + 20 * torch.randn(batch, generator=generator)
    return logits, labels


ALL_TYPES = ["multilabel", "binary", "multiclass", "regression"]


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_nan_rows_give_the_same_loss_as_dropping_them(kind):
    task = make_task(kind, **({"target_mean": 50.0, "target_std": 20.0} if kind == "regression" else {}))
    gen = torch.Generator().manual_seed(0)
    logits, labels = random_batch(task, 10, gen)
    missing = torch.tensor([1, 4, 5, 9])
    keep = torch.tensor([i for i in range(10) if i not in missing.tolist()])
    with_nan = labels.clone()
    with_nan[missing] = NAN
    loss_nan, count_nan = task.loss(logits, with_nan)
    loss_dropped, count_dropped = task.loss(logits[keep], labels[keep])
    assert torch.isfinite(loss_nan)
    torch.testing.assert_close(loss_nan, loss_dropped)
    assert count_nan == count_dropped > 0


def test_multilabel_masks_single_entries():
    task = make_task("multilabel")
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]])
    labels = torch.tensor([[1.0, NAN, 0.0], [NAN, NAN, 1.0]])
    loss, count = task.loss(logits, labels)
    valid = ~torch.isnan(labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[valid], labels[valid])
    torch.testing.assert_close(loss, expected)
    assert count == 3


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_all_missing_gives_zero_loss_and_finite_zero_gradients(kind):
    task = make_task(kind)
    gen = torch.Generator().manual_seed(1)
    logits, labels = random_batch(task, 6, gen)
    logits.requires_grad_(True)
    loss, count = task.loss(logits, torch.full_like(labels, NAN))
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_partially_missing_gradients_are_finite_and_zero_on_missing_rows():
    task = make_task("multiclass")
    logits = torch.randn(4, 4, requires_grad=True)
    labels = torch.tensor([0.0, NAN, 3.0, NAN])
    task.loss(logits, labels)[0].backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2]] != 0).any()


def test_regression_is_trained_on_normalised_targets_and_predicts_raw_units():
    task = make_task("regression", target_mean=60.0, target_std=15.0)
    ages = torch.tensor([30.0, 60.0, 90.0])
    perfect = (ages - 60.0) / 15.0
    assert task.loss(perfect, ages)[0].item() == pytest.approx(0.0)
    torch.testing.assert_close(task.predict(perfect), ages)
    # One normalised unit off everywhere: MSE = 1 (i.e. 15 years), not 225.
    assert task.loss(perfect + 1.0, ages)[0].item() == pytest.approx(1.0)


def test_huber_is_smaller_than_mse_for_large_errors():
    mse = make_task("regression", target_mean=0.0, target_std=1.0)
    huber = make_task("regression", target_mean=0.0, target_std=1.0, regression_loss="huber", huber_delta=1.0)
    pred, target = torch.tensor([0.0]), torch.tensor([10.0])
    assert mse.loss(pred, target)[0].item() == pytest.approx(100.0)
    assert huber.loss(pred, target)[0].item() == pytest.approx(9.5)


def test_predict_spaces():
    multiclass, binary, multilabel = make_task("multiclass"), make_task("binary"), make_task("multilabel")
    probs = multiclass.predict(torch.randn(5, 4))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    p = binary.predict(torch.tensor([-20.0, 0.0, 20.0]))
    assert p.shape == (3,) and p[1] == 0.5 and 0 <= p.min() and p.max() <= 1
    assert multilabel.predict(torch.zeros(2, 3)).shape == (2, 3)


def test_binary_accepts_column_labels_and_rejects_wrong_shapes():
    task = make_task("binary")
    logits = torch.randn(4)
    a = task.loss(logits, torch.tensor([[1.0], [0.0], [NAN], [1.0]]))[0]
    b = task.loss(logits, torch.tensor([1.0, 0.0, NAN, 1.0]))[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"t_multilabel.*shape"):
        make_task("multilabel").loss(torch.randn(4, 3), torch.zeros(4, 2))


@pytest.mark.parametrize("bad", [4.0, -1.0, 1.5])
def test_multiclass_labels_must_be_class_indices(bad):
    task = make_task("multiclass")
    with pytest.raises(ValueError, match="class indices"):
        task.loss(torch.randn(2, 4), torch.tensor([0.0, bad]))


# -- combining experts ---------------------------------------------------------------------------------------------


def mixture_inputs(task: Task, gen: torch.Generator, top_k: bool):
    batch, experts = 5, 3
    shape = (batch, experts) if task.is_scalar else (batch, experts, task.num_outputs)
    logits = torch.randn(shape, generator=gen) * 3
    raw = torch.randn(batch, experts, generator=gen)
    if top_k:  # expert 1 never routed: weight 0, log-weight -inf, placeholder logits
        raw[:, 1] = float("-inf")
        logits[:, 1] = 0.0
    log_w = torch.log_softmax(raw, dim=-1)
    return logits, log_w.exp(), log_w


@pytest.mark.parametrize("kind", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("top_k", [False, True])
def test_probability_mixing_gives_logits_of_the_mixture(kind, top_k):
    task = make_task(kind)
    logits, weights, log_weights = mixture_inputs(task, torch.Generator().manual_seed(2), top_k)
    logits.requires_grad_(True)
    combined = task.combine(logits, weights, log_weights, "probabilities")
    if kind == "multiclass":
        expected = (weights[..., None] * torch.softmax(logits, -1)).sum(1)
    else:
        w = weights if task.is_scalar else weights[..., None]
        expected = (w * torch.sigmoid(logits)).sum(1)
    torch.testing.assert_close(task.predict(combined), expected.detach())
    task.loss(combined, torch.zeros(combined.shape[0]) if kind != "multilabel" else torch.ones(5, 3))[
        0
    ].backward()
    assert torch.isfinite(logits.grad).all()
    if top_k:
        assert (logits.grad[:, 1] == 0).all()


def test_logit_mixing_and_regression_are_weighted_sums():
    gen = torch.Generator().manual_seed(3)
    for kind, mix in (("multilabel", "logits"), ("regression", "probabilities"), ("regression", "logits")):
        task = make_task(kind)
        logits, weights, log_weights = mixture_inputs(task, gen, top_k=False)
        w = weights if task.is_scalar else weights[..., None]
        torch.testing.assert_close(task.combine(logits, weights, log_weights, mix), (w * logits).sum(1))


def test_probability_mixing_is_stable_for_confident_experts():
    task = make_task("binary")
    logits = torch.tensor([[60.0, 80.0]])
    weights = torch.tensor([[0.5, 0.5]])
    combined = task.combine(logits, weights, weights.log(), "probabilities")
    assert torch.isfinite(combined).all() and combined.item() > 55


# -- task config -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a.b", "type": "binary"}, "name"),
        ({"name": "lora_x", "type": "binary"}, "lora_"),
        ({"name": "t", "type": "ordinal"}, "type"),
        ({"name": "t", "type": "multiclass", "label_names": ["one"]}, "at least 2"),
        ({"name": "t", "type": "regression", "target_mean": 1.0}, "both"),
        ({"name": "t", "type": "regression", "target_mean": 1.0, "target_std": 0.0}, "target_std"),
        ({"name": "t", "type": "binary", "target_mean": 1.0, "target_std": 2.0}, "regression tasks only"),
    ],
)
def test_task_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)


def test_task_config_from_dataset_task_info():
    info = TaskInfo(name="superdiagnostic", type="multilabel", names=["NORM", "MI", "STTC", "CD", "HYP"])
    config = TaskConfig.from_task_info(info, loss_weight=2.0)
    assert config.num_outputs == 5 and config.loss_weight == 2.0
    assert build_task(config).predict(torch.zeros(1, 5)).tolist() == [[0.5] * 5]
    assert math.isclose(build_task(TaskConfig(name="age", type="regression")).std, 1.0)


def test_task_config_from_dataset_binary_with_both_class_names() -> None:
    from enecg.data.schema import TaskInfo
    from enecg.ensemble.config import TaskConfig

    sex = TaskConfig.from_task_info(TaskInfo(name="sex", type="binary", names=["male", "female"]))
    assert sex.label_names == ["female"] and sex.num_outputs == 1
    flag = TaskConfig.from_task_info(TaskInfo(name="noisy", type="binary", names=["noisy"]))
    assert flag.label_names == ["noisy"]
    diag = TaskConfig.from_task_info(TaskInfo(name="d", type="multilabel", names=["A", "B"]), loss_weight=2.0)
    assert diag.label_names == ["A", "B"] and diag.loss_weight == 2.0
