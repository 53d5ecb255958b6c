"""The Ensemble with small stand-in experts: shapes, routing, cached embeddings, losses, config, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from enecg.ensemble import Ensemble, EnsembleConfig
from enecg.ensemble.config import CONFIG_FILE

NAN = float("nan")
BATCH, WINDOWS, LEADS, LENGTH, GATE_LENGTH = 8, 2, 2, 40, 50


class TinyConvExpert(nn.Module):
    """Stand-in expert: conv net over contract windows ``(B, W, leads, length) -> (B, D)``; counts what it sees."""

    def __init__(self, name: str, dim: int = 8) -> None:
        super().__init__()
        self.name, self.hub_id, self.revision, self.contract = name, f"org/{name}", "a" * 40, None
        self.embedding_dim = dim
        self.conv = nn.Conv1d(LEADS, 6, 5)
        self.drop = nn.Dropout(0.5)  # must be inactive: frozen experts always run in eval mode
        self.proj = nn.Linear(6, dim)
        self.calls, self.records_seen = 0, 0

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.records_seen += windows.shape[0]
        b, w = windows.shape[:2]
        h = self.conv(windows.reshape(b * w, LEADS, -1)).relu().mean(-1).reshape(b, w, -1).mean(1)
        return self.proj(self.drop(h))


class DemographicsExpert(TinyConvExpert):
    """Stand-in for the in-house light CNNs, which also take (age, sex)."""

    def __init__(self, name: str, dim: int = 8) -> None:
        super().__init__(name, dim)
        self.demo = nn.Linear(2, dim)
        self.last_demographics = None

    def forward(self, windows: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        self.last_demographics = demographics
        out = super().forward(windows)
        return out if demographics is None else out + self.demo(demographics)


TASKS = [
    {"name": "dx", "type": "multilabel", "label_names": ["NORM", "MI", "STTC"]},
    {"name": "sex", "type": "binary", "label_names": ["female"]},
    {"name": "age", "type": "regression", "target_mean": 60.0, "target_std": 15.0},
    {"name": "rhythm", "type": "multiclass", "label_names": ["SR", "AF", "STACH", "SBRAD"]},
]


def make_config(n_experts: int = 3, dims: tuple[int, ...] = (8, 12, 6), **overrides) -> EnsembleConfig:
    gate = {"contract": {"fs": 100.0, "leads": ["II"], "length": GATE_LENGTH}, "hidden_sizes": [16]}
    gate.update(overrides.pop("gate", {}))
    data = {
        "experts": [
            {"name": f"e{i}", "hub_id": f"org/e{i}", "revision": "a" * 40, "embedding_dim": dims[i]}
            for i in range(n_experts)
        ],
        "tasks": TASKS,
        "heads": {"hidden_sizes": [16, 16]},
        "gate": gate,
        "lora": {"on_heads": False},
    }
    data.update(overrides)
    return EnsembleConfig.from_dict(data)


def make_experts(config: EnsembleConfig, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {ref.name: TinyConvExpert(ref.name, ref.embedding_dim) for ref in config.experts}


def make_batch(config: EnsembleConfig, seed: int = 0, batch: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    inputs = {ref.name: torch.randn(batch, WINDOWS, LEADS, LENGTH, generator=gen) for ref in config.experts}
    gate_input = torch.randn(batch, 1, 1, GATE_LENGTH, generator=gen)
    labels = {
        "dx": torch.randint(0, 2, (batch, 3), generator=gen).float(),
        "sex": torch.randint(0, 2, (batch,), generator=gen).float(),
        "age": 60 + 15 * torch.randn(batch, generator=gen),
        "rhythm": torch.randint(0, 4, (batch,), generator=gen).float(),
    }
    return inputs, gate_input, labels


# -- shapes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gate",
    [{}, {"per_task": True}, {"top_k": 2}, {"input": "embeddings"}, {"input": "uniform"}, {"mix": "logits"}],
    ids=["dense", "per_task", "top2", "embedding_gate", "uniform", "logit_mix"],
)
def test_all_four_task_types_in_one_model(gate):
    config = make_config(gate=gate)
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, _ = make_batch(config)
    out = model(inputs, gate_input)
    expected = {"dx": (BATCH, 3), "sex": (BATCH,), "age": (BATCH,), "rhythm": (BATCH, 4)}
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == expected
    assert {k: tuple(v.shape) for k, v in out.predictions.items()} == expected
    for task, shape in expected.items():
        assert out.expert_logits[task].shape == (shape[0], 3, *shape[1:])
        assert out.expert_predictions[task].shape == (shape[0], 3, *shape[1:])
        assert out.gate_weights[task].shape == (BATCH, 3)
        torch.testing.assert_close(out.gate_weights[task].sum(-1), torch.ones(BATCH))
    assert ((out.predictions["dx"] >= 0) & (out.predictions["dx"] <= 1)).all()
    torch.testing.assert_close(out.predictions["rhythm"].sum(-1), torch.ones(BATCH))
    assert out.predictions["age"].abs().mean() > 10  # raw units (years), not normalised
    assert out.routed.shape == (BATCH, 3)


def test_combined_prediction_is_the_gate_weighted_mixture_of_expert_predictions():
    config = make_config()
    model = Ensemble(config, make_experts(config)).eval()
    inputs, gate_input, _ = make_batch(config)
    out = model(inputs, gate_input)
    for task in ("dx", "sex", "rhythm", "age"):
        w = out.gate_weights[task]
        per_expert = out.expert_predictions[task]
        w = w if per_expert.dim() == 2 else w[..., None]
        torch.testing.assert_close(out.predictions[task], (w * per_expert).sum(1))


def test_embedding_combination_uses_projections_and_shared_heads():
    config = make_config(gate={"combine": "embeddings", "projection_dim": 10, "top_k": 2})
    model = Ensemble(config, make_experts(config))
    for name in model.expert_names:
        assert model.branch(name).branch_projection.out_features == 10 and len(model.branch(name).heads) == 0
    assert set(model.shared_heads) == {"dx", "sex", "age", "rhythm"}
    inputs, gate_input, labels = make_batch(config)
    out = model(inputs, gate_input)
    assert out.logits["rhythm"].shape == (BATCH, 4) and out.expert_logits["rhythm"].shape == (BATCH, 3, 4)
    total, _ = model.compute_loss(out, labels)
    total.backward()
    assert all(model.branch(n).branch_projection.weight.grad is not None for n in model.expert_names)


def test_demographics_reach_experts_that_accept_them():
    config = make_config(n_experts=2)
    experts = {"e0": DemographicsExpert("e0", 8), "e1": TinyConvExpert("e1", 12)}
    model = Ensemble(config, experts)
    inputs, gate_input, _ = make_batch(config)
    demographics = torch.tensor([[60.0, 1.0]]).repeat(BATCH, 1)
    a = model(inputs, gate_input, demographics).logits["sex"]
    assert experts["e0"].last_demographics is demographics
    b = model(inputs, gate_input).logits["sex"]
    assert not torch.allclose(a, b)


# -- routing -------------------------------------------------------------------------------------------------------


def test_top1_signal_gate_runs_only_the_routed_experts():
    config = make_config(gate={"top_k": 1})
    experts = make_experts(config)
    model = Ensemble(config, experts).eval()
    inputs, gate_input, _ = make_batch(config, batch=16)
    routing = model.gate(gate_input)
    chosen = routing.routed[:, 0].float().argmax(-1)
    assert len(set(chosen.tolist())) >= 2, "the test needs records routed to different experts"
    with torch.no_grad():
        out = model(inputs, gate_input)
    for e, name in enumerate(model.expert_names):
        n_routed = int((chosen == e).sum())
        assert experts[name].records_seen == n_routed
        assert experts[name].calls == (1 if n_routed else 0)
    assert sum(x.records_seen for x in experts.values()) == 16
    # Each record's prediction is its one routed expert's prediction; the other experts' are NaN.
    rows = torch.arange(16)
    for task in ("dx", "age", "rhythm"):
        torch.testing.assert_close(out.predictions[task], out.expert_predictions[task][rows, chosen])
        assert torch.isnan(out.expert_predictions[task][~out.routed]).all()


def test_top1_training_step_has_finite_gradients_and_trains_the_router():
    config = make_config(gate={"top_k": 1, "load_balance_weight": 0.01})
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, labels = make_batch(config, batch=16)
    total, parts = model.compute_loss(model(inputs, gate_input), labels)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.gate.router.weight.grad.abs().sum() > 0
    assert "gate/load_balance" in parts


# -- cached embeddings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gate",
    [{}, {"top_k": 1}, {"input": "embeddings", "top_k": 2}, {"combine": "embeddings", "per_task": True}],
    ids=["dense", "top1", "embedding_gate_top2", "combine_embeddings"],
)
def test_from_embeddings_equals_the_full_path(gate):
    config = make_config(gate=gate, heads={"hidden_sizes": [16, 16], "dropout": 0.3})
    model = Ensemble(config, make_experts(config)).eval()
    inputs, gate_input, _ = make_batch(config)
    with torch.no_grad():
        full = model(inputs, gate_input)
        cached = model(model.embed(inputs), gate_input, from_embeddings=True)
    for task in full.logits:
        torch.testing.assert_close(cached.logits[task], full.logits[task])
        torch.testing.assert_close(
            cached.expert_predictions[task], full.expert_predictions[task], equal_nan=True
        )
        torch.testing.assert_close(cached.gate_weights[task], full.gate_weights[task])


def test_frozen_experts_stay_in_eval_mode_and_unchanged_while_training():
    config = make_config()
    experts = make_experts(config)
    model = Ensemble(config, experts)
    assert model.supports_cached_embeddings
    before = {n: {k: v.clone() for k, v in e.state_dict().items()} for n, e in experts.items()}
    model.train()
    assert model.training and not any(e.training for e in experts.values())
    inputs, gate_input, labels = make_batch(config)
    cached = model.embed(inputs)
    torch.testing.assert_close(model.embed(inputs)["e0"], cached["e0"])  # no active expert dropout
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.compute_loss(model(inputs, gate_input), labels)[0].backward()
        optimizer.step()
    for name, expert in experts.items():
        assert all(not p.requires_grad for p in expert.parameters())
        for key, value in expert.state_dict().items():
            torch.testing.assert_close(value, before[name][key])


# -- losses --------------------------------------------------------------------------------------------------------


def test_nan_labels_give_the_same_task_losses_as_dropping_those_records():
    config = make_config()
    model = Ensemble(config, make_experts(config)).eval()
    inputs, gate_input, labels = make_batch(config)
    drop = torch.tensor([1, 5])
    keep = torch.tensor([i for i in range(BATCH) if i not in drop.tolist()])
    masked = {k: v.clone() for k, v in labels.items()}
    for value in masked.values():
        value[drop] = NAN
    _, parts_masked = model.compute_loss(model(inputs, gate_input), masked)
    subset = model({k: v[keep] for k, v in inputs.items()}, gate_input[keep])
    _, parts_subset = model.compute_loss(subset, {k: v[keep] for k, v in labels.items()})
    for task in ("dx", "sex", "age", "rhythm"):
        torch.testing.assert_close(parts_masked[task], parts_subset[task])


@pytest.mark.parametrize("weighting", ["static", "uncertainty"])
def test_a_task_without_any_label_adds_zero_and_keeps_gradients_finite(weighting):
    config = make_config(task_weighting=weighting)
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, labels = make_batch(config)
    labels["age"] = torch.full((BATCH,), NAN)
    out = model(inputs, gate_input)
    total, parts = model.compute_loss(out, labels)
    assert parts["age"].item() == 0.0
    without_age = sum(config.task(t).loss_weight * parts[t] for t in ("dx", "sex", "rhythm"))
    if weighting == "static":
        torch.testing.assert_close(total.detach(), without_age)
    total.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    if weighting == "uncertainty":
        assert model.task_log_vars.grad[config.task_names.index("age")] == 0


def test_static_weights_and_gate_aux_terms_enter_the_total():
    config = make_config(gate={"load_balance_weight": 0.5, "entropy_weight": 0.25})
    config.tasks[0].loss_weight = 3.0
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, labels = make_batch(config)
    total, parts = model.compute_loss(model(inputs, gate_input), labels)
    expected = 3.0 * parts["dx"] + parts["sex"] + parts["age"] + parts["rhythm"]
    expected = expected + 0.5 * parts["gate/load_balance"] + 0.25 * parts["gate/entropy"]
    torch.testing.assert_close(total.detach(), expected)


@pytest.mark.parametrize("gate", [{"input": "uniform"}, {"top_k": 1}], ids=["all_routed", "top1"])
def test_expert_loss_averages_each_experts_own_loss_on_its_routed_records(gate):
    config = make_config(gate=gate, heads={"hidden_sizes": [16], "expert_loss_weight": 1.0})
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, labels = make_batch(config, batch=16)
    out = model(inputs, gate_input)
    total, parts = model.compute_loss(out, labels)
    assert torch.isfinite(total)
    for task in config.task_names:
        own = [
            model.tasks[task].loss(
                out.expert_logits[task][out.routed[:, e], e], labels[task][out.routed[:, e]]
            )[0]
            for e in range(3)
            if out.routed[:, e].any()
        ]
        torch.testing.assert_close(parts[f"expert/{task}"], torch.stack(own).mean().detach())


def test_uncertainty_weighting_learns_the_kendall_optimum():
    # With fixed task losses L, exp(-s) * L + s/2 is minimal at s = log(2L) (classification) and
    # 0.5 * exp(-s) * L + s/2 at s = log(L) (regression): the learned weights must get there.
    config = make_config(task_weighting="uncertainty")
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, labels = make_batch(config)
    with torch.no_grad():
        out = model(inputs, gate_input)
    out.task_log_vars = model.task_log_vars
    optimizer = torch.optim.SGD([model.task_log_vars], lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        total, parts = model.compute_loss(out, labels)
        total.backward()
        optimizer.step()
    for t_index, task in enumerate(config.tasks):
        loss = parts[task.name].item()
        target = torch.log(torch.tensor(loss if task.type == "regression" else 2 * loss)).item()
        assert model.task_log_vars[t_index].item() == pytest.approx(target, abs=0.05), task.name


def test_compute_loss_requires_every_task_label():
    config = make_config()
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, labels = make_batch(config)
    del labels["age"]
    with pytest.raises(KeyError, match="age"):
        model.compute_loss(model(inputs, gate_input), labels)


# -- construction, inputs, determinism -----------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    config = make_config()
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, _ = make_batch(config)
    with pytest.raises(ValueError, match="gate_input"):
        model(inputs)
    with pytest.raises(ValueError, match="expected"):
        model({"e0": inputs["e0"]}, gate_input)
    embeddings = model.embed(inputs)
    embeddings["e1"] = embeddings["e1"][:, :5]
    with pytest.raises(ValueError, match=r"e1.*expected \(B, 12\)"):
        model(embeddings, gate_input, from_embeddings=True)
    with pytest.raises(ValueError, match="embedding_dim"):
        Ensemble(
            config,
            {"e0": TinyConvExpert("e0", 8), "e1": TinyConvExpert("e1", 8), "e2": TinyConvExpert("e2", 6)},
        )
    with pytest.raises(ValueError, match="do not match"):
        Ensemble(config, {"e0": TinyConvExpert("e0", 8)})
    wrong_revision = make_experts(config)
    wrong_revision["e2"].revision = "b" * 40
    with pytest.raises(ValueError, match="revision"):
        Ensemble(config, wrong_revision)


def test_construction_is_deterministic_under_the_config_seed():
    config = make_config(task_weighting="uncertainty")
    torch.manual_seed(123)
    a = Ensemble(config, make_experts(config))
    torch.manual_seed(456)
    b = Ensemble(config, make_experts(config))
    state_a, state_b = a.trainable_state_dict(), b.trainable_state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key])
    config.seed = 1
    c = Ensemble(config, make_experts(config))
    assert not torch.equal(c.head("e0", "dx").out.weight, a.head("e0", "dx").out.weight)


def test_trainable_state_dict_round_trip_is_strict():
    config = make_config()
    trained = Ensemble(config, make_experts(config))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    state = trained.trainable_state_dict()
    assert not any(k.startswith("branches.e0.expert.") for k in state)  # frozen experts come from the Hub
    fresh = Ensemble(EnsembleConfig.from_dict(config.to_dict() | {"seed": 7}), make_experts(config))
    fresh.load_trainable_state_dict(state)
    inputs, gate_input, _ = make_batch(config)
    torch.testing.assert_close(
        fresh.predict(inputs, gate_input)["dx"], trained.predict(inputs, gate_input)["dx"]
    )
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if "gate" not in k})
    with pytest.raises(ValueError, match="shape"):
        fresh.load_trainable_state_dict(state | {"gate.router.bias": torch.zeros(99)})


def test_predict_restores_training_mode():
    config = make_config()
    model = Ensemble(config, make_experts(config)).train()
    inputs, gate_input, _ = make_batch(config)
    predictions = model.predict(inputs, gate_input)
    assert model.training and set(predictions) == set(config.task_names)


# -- config --------------------------------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    config = make_config(
        gate={"top_k": 2, "per_task": True, "noisy_top_k": True},
        lora={"on_heads": True, "on_experts": False, "r": 4},
        task_weighting="uncertainty",
    )
    config.experts[0].spec = {"family": "net1d", "contract": {"fs": 500.0}}
    text = json.dumps(config.to_dict())
    assert EnsembleConfig.from_dict(json.loads(text)) == config
    path = config.save(tmp_path)
    assert path.name == CONFIG_FILE
    assert EnsembleConfig.load(tmp_path) == config
    assert json.loads(path.read_text())["enecg_version"] == config.enecg_version


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(unknown=1), "ensemble config: unknown key 'unknown'"),
        (lambda d: d["gate"].update(topk=1), "unknown key 'gate.topk'; known keys of gate"),
        (lambda d: d["experts"][0].update(sha="x"), "unknown key 'experts.0.sha'"),
        (lambda d: d["gate"]["contract"].update(rate=1), "unknown input-contract keys"),
        (lambda d: d["gate"].update(top_k=4), "exceeds the number of experts"),
        (lambda d: d["experts"].append(dict(d["experts"][0])), "duplicate expert names"),
        (lambda d: d["gate"].update(combine="embeddings") or d["lora"].update(on_heads=True), "on_heads"),
        (lambda d: d["lora"].update(on_experts=True), "no lora_target_modules"),
    ],
)
def test_config_rejects_unknown_keys_and_inconsistent_settings(mutate, message):
    data = make_config().to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        EnsembleConfig.from_dict(data)


def test_config_load_names_the_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"experts": [], "tasks": TASKS}))
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}.*at least one expert"):
        EnsembleConfig.load(tmp_path)


# -- padded windows ------------------------------------------------------------------------------------------------


class MaskedWindowsExpert(TinyConvExpert):
    """Stand-in for enecg's Expert: averages only real windows (``window_mask`` False = padding)."""

    def forward(self, windows: torch.Tensor, window_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.records_seen += windows.shape[0]
        b, w = windows.shape[:2]
        h = self.conv(windows.reshape(b * w, LEADS, -1)).relu().mean(-1).reshape(b, w, -1)
        weights = torch.ones(b, w) if window_mask is None else window_mask.float()
        h = (h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return self.proj(h)


def test_window_masks_reach_experts_and_follow_routing():
    config = make_config(n_experts=2, gate={"top_k": 1})
    experts = {"e0": MaskedWindowsExpert("e0", 8), "e1": MaskedWindowsExpert("e1", 12)}
    model = Ensemble(config, experts).eval()
    inputs, gate_input, _ = make_batch(config, batch=16)
    # Records 0-7 have one real window; their second window is padding (garbage here, zeros in practice).
    mask = torch.ones(16, WINDOWS, dtype=torch.bool)
    mask[:8, 1] = False
    masks = {"e0": mask, "e1": mask}
    with torch.no_grad():
        masked = model(inputs, gate_input, window_masks=masks)
        one_window = model({k: v[:, :1] for k, v in inputs.items()}, gate_input)
        unmasked = model(inputs, gate_input)
        cached = model(model.embed(inputs, window_masks=masks), gate_input, from_embeddings=True)
    torch.testing.assert_close(masked.logits["dx"][:8], one_window.logits["dx"][:8])
    torch.testing.assert_close(masked.logits["dx"][8:], unmasked.logits["dx"][8:])
    assert not torch.allclose(masked.logits["dx"][:8], unmasked.logits["dx"][:8])
    torch.testing.assert_close(cached.logits["dx"], masked.logits["dx"])


def test_padding_windows_are_refused_for_an_expert_without_window_mask():
    config = make_config(n_experts=2)
    model = Ensemble(config, make_experts(config))
    inputs, gate_input, _ = make_batch(config)
    mask = torch.ones(BATCH, WINDOWS, dtype=torch.bool)
    model(inputs, gate_input, window_masks={"e0": mask})  # no padding: fine
    mask[0, 1] = False
    with pytest.raises(ValueError, match="takes no window_mask"):
        model(inputs, gate_input, window_masks={"e0": mask})


def test_compare_predictions_reports_the_largest_difference() -> None:
    from types import SimpleNamespace

    from enecg.ensemble import compare_predictions

    def prediction(record_id: str, p: float) -> SimpleNamespace:
        return SimpleNamespace(to_dict=lambda: {"record_id": record_id, "tasks": {"t": {"p": [p, 1.0]}}})

    same = compare_predictions([prediction("a", 0.25)], [prediction("a", 0.25)])
    assert same == {"records": ["a"], "identical": True, "max_abs_difference": 0.0}
    other = compare_predictions([prediction("a", 0.25)], [prediction("a", 0.5)])
    assert other["identical"] is False and other["max_abs_difference"] == 0.25
