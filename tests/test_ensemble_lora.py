"""LoRA via peft: heads train in every mode, LoRA changes eval outputs, unsafe targets are refused, parameter
counts, and per-expert adapters that plain peft loads."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn

from enecg.ensemble import Ensemble, EnsembleConfig, ExpertBranch, TaskHead

LEADS, LENGTH, GATE_LENGTH, BATCH, HIDDEN, RANK = 2, 40, 50, 8, 16, 4
SHA = "0123456789abcdef0123456789abcdef01234567"
MODES = {
    "none": {"on_heads": False, "on_experts": False},
    "heads": {"on_heads": True, "on_experts": False},
    "experts": {"on_heads": False, "on_experts": True},
    "heads+experts": {"on_heads": True, "on_experts": True},
}


class TinyConvExpert(nn.Module):
    """Stand-in expert: ``(B, W, leads, length) -> (B, D)`` with its own Linear ``proj`` (a LoRA target)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding_dim = dim
        self.conv = nn.Conv1d(LEADS, 6, 5)
        self.proj = nn.Linear(6, dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b, w = windows.shape[:2]
        h = self.conv(windows.reshape(b * w, LEADS, -1)).relu().mean(-1).reshape(b, w, -1).mean(1)
        return self.proj(h)


class TransformerExpert(nn.Module):
    """Stand-in expert built on torch's nn.TransformerEncoderLayer (eval fast path) plus its own Linears."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding_dim = dim
        self.inp = nn.Linear(LEADS, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.proj = nn.Linear(16, dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b, w = windows.shape[:2]
        x = self.inp(windows.reshape(b * w, LEADS, -1).transpose(1, 2))
        return self.proj(self.layer(x).mean(1).reshape(b, w, -1).mean(1))


DIMS = {"e0": 8, "e1": 12}


def make_config(mode: str = "heads", targets: list[str] | None = None, **overrides) -> EnsembleConfig:
    return EnsembleConfig.from_dict(
        {
            "experts": [
                {
                    "name": name,
                    "hub_id": f"org/{name}",
                    "revision": SHA,
                    "embedding_dim": dim,
                    "lora_target_modules": targets or ["proj"],
                }
                for name, dim in DIMS.items()
            ],
            "tasks": [
                {"name": "dx", "type": "multilabel", "label_names": ["a", "b", "c"]},
                {"name": "age", "type": "regression", "target_mean": 60.0, "target_std": 15.0},
            ],
            "heads": {"hidden_sizes": [HIDDEN, HIDDEN]},
            "gate": {"contract": {"fs": 100.0, "leads": ["II"], "length": GATE_LENGTH}, "hidden_sizes": [16]},
            "lora": {"r": RANK, "alpha": 8.0, "dropout": 0.0, **MODES[mode]},
            **overrides,
        }
    )


def make_experts(kind: type[nn.Module] = TinyConvExpert, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {name: kind(dim) for name, dim in DIMS.items()}


def make_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(BATCH, 2, LEADS, LENGTH, generator=gen) for name in DIMS}
    gate_input = torch.randn(BATCH, 1, GATE_LENGTH, generator=gen)
    labels = {
        "dx": torch.randint(0, 2, (BATCH, 3), generator=gen).float(),
        "age": 60 + 15 * torch.randn(BATCH, generator=gen),
    }
    return inputs, gate_input, labels


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a head layer's forward actually uses, whatever peft wrapped it in."""
    if isinstance(layer, LoraLayer):
        return layer.base_layer.weight
    if isinstance(layer, ModulesToSaveWrapper):
        return layer.modules_to_save[layer.active_adapter].weight
    return layer.weight


def head_layers(model: Ensemble) -> dict[str, nn.Module]:
    out = {}
    for expert in model.expert_names:
        for task, head in model.branch(expert).heads.items():
            for name in head.linear_layer_names():
                out[f"{expert}.{task}.{name}"] = head.get_submodule(name)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_heads_train_in_every_lora_mode(mode):
    config = make_config(mode)
    experts = make_experts()
    expert_before = {n: {k: v.clone() for k, v in e.state_dict().items()} for n, e in experts.items()}
    model = Ensemble(config, experts).train()
    layers = head_layers(model)
    assert len(layers) == 2 * 2 * 3  # experts x tasks x (hidden.0, hidden.1, out)
    before = {name: effective_weight(layer).detach().clone() for name, layer in layers.items()}
    assert all(effective_weight(layer).requires_grad for layer in layers.values())
    inputs, gate_input, labels = make_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.compute_loss(model(inputs, gate_input), labels)[0].backward()
        optimizer.step()
    unchanged = [name for name, layer in layers.items() if torch.equal(effective_weight(layer), before[name])]
    assert not unchanged, f"head layers never trained in mode {mode}: {unchanged}"
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert bool(lora_b) == (mode != "none")
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA trained too (B starts at zero)
    # The experts' own weights never change (LoRA is additive, in separate tensors).
    for name, expert in experts.items():
        base = {k.replace(".base_layer", ""): v for k, v in expert.state_dict().items() if ".lora_" not in k}
        for key, value in expert_before[name].items():
            torch.testing.assert_close(base[key], value)


def _head_params(dim: int, outputs: int) -> int:
    return 2 * dim + (dim * HIDDEN + HIDDEN) + (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * outputs + outputs)


@pytest.mark.parametrize("mode", list(MODES))
def test_trainable_parameter_counts_per_mode(mode):
    model = Ensemble(make_config(mode), make_experts())
    heads = sum(_head_params(d, 3) + _head_params(d, 1) for d in DIMS.values())
    head_lora = sum(2 * (RANK * (d + HIDDEN) + RANK * (HIDDEN + HIDDEN)) for d in DIMS.values())
    expert_lora = sum(RANK * (6 + d) for d in DIMS.values())  # on each expert's proj: Linear(6, D)
    gate = (GATE_LENGTH * 16 + 16) + (16 * 2 + 2)
    lora = (head_lora if "heads" in mode else 0) + (expert_lora if "experts" in mode else 0)
    summary = model.trainable_parameters()
    assert summary["heads"] == heads
    assert summary["lora"] == lora
    assert summary["gate"] == gate
    assert summary["trainable"] == heads + lora + gate
    assert summary["total"] == summary["trainable"] + summary["frozen"]
    per_expert_heads = {n: _head_params(d, 3) + _head_params(d, 1) for n, d in DIMS.items()}
    assert summary["expert:e0"] + summary["expert:e1"] == heads + lora
    assert summary["expert:e0"] >= per_expert_heads["e0"]


@pytest.mark.parametrize("mode", ["heads", "experts", "heads+experts"])
@pytest.mark.parametrize("expert_kind", [TinyConvExpert, TransformerExpert])
def test_non_zero_lora_changes_eval_outputs(mode, expert_kind):
    model = Ensemble(make_config(mode), make_experts(expert_kind)).eval()
    inputs, gate_input, _ = make_batch()
    with torch.no_grad():
        before = model(inputs, gate_input)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
        after = model(inputs, gate_input)
    assert not model.training
    for task in before.logits:
        assert not torch.allclose(before.logits[task], after.logits[task]), task
    if "experts" in mode:  # the experts' own output moved, not only the heads
        embeddings = model.embed(inputs)
        fresh = make_experts(expert_kind)["e0"].eval()
        assert not torch.allclose(embeddings["e0"], fresh(inputs["e0"]))


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["linear1"], "inside torch.nn.TransformerEncoderLayer 'expert.layer'"),
        (["self_attn"], "TransformerEncoderLayer"),
        (["out_proj"], "nn.MultiheadAttention.out_proj"),
        (["no_such_layer"], "match no module"),
    ],
)
def test_lora_targets_that_torch_would_silently_skip_are_refused(targets, message):
    with pytest.raises(ValueError, match=message):
        Ensemble(make_config("experts", targets=targets), make_experts(TransformerExpert))


def test_own_linear_layers_around_a_transformer_layer_are_valid_targets():
    model = Ensemble(make_config("experts", targets=["inp", "proj"]), make_experts(TransformerExpert))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(adapted) == sorted(
        f"branches.{e}.base_model.model.expert.{layer}" for e in DIMS for layer in ("inp", "proj")
    )


def test_an_expert_already_carrying_lora_is_refused():
    experts = make_experts()
    Ensemble(make_config("experts"), experts)
    with pytest.raises(ValueError, match="already carries LoRA"):
        Ensemble(make_config("experts"), experts)


def test_cached_embeddings_are_refused_with_lora_on_experts():
    model = Ensemble(make_config("experts"), make_experts())
    assert not model.supports_cached_embeddings
    _, gate_input, _ = make_batch()
    embeddings = {n: torch.randn(BATCH, d) for n, d in DIMS.items()}
    with pytest.raises(ValueError, match="from_embeddings"):
        model(embeddings, gate_input, from_embeddings=True)


@pytest.mark.parametrize("mode", ["heads", "experts", "heads+experts"])
def test_expert_adapter_loads_with_plain_peft(mode, tmp_path):
    config = make_config(mode)
    model = Ensemble(config, make_experts())
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    folder = model.save_expert_adapter("e1", tmp_path / "e1")
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "org/e1"
    assert adapter_config["revision"] == SHA
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == RANK
    saved = load_file(folder / "adapter_model.safetensors")
    assert saved.keys() == model.adapter_state_dict("e1").keys()
    assert sum(v.numel() for v in saved.values()) == model.trainable_parameters()["expert:e1"]

    # A peft user: the expert re-loaded from its published weights, a branch with fresh heads, the adapter.
    torch.manual_seed(99)
    fresh_heads = {t.name: TaskHead(DIMS["e1"], t.num_outputs, config.heads) for t in config.tasks}
    branch = ExpertBranch(make_experts()["e1"], "org/e1", heads=fresh_heads, squeeze_tasks=("age",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # offline: peft cannot look up the base model's Hub files
        loaded = PeftModel.from_pretrained(branch, folder).eval()
    inputs, _, _ = make_batch()
    with torch.no_grad():
        expected = model.branch("e1")(inputs["e1"])
        got = loaded(inputs["e1"])
    for task in ("dx", "age"):
        torch.testing.assert_close(got[task], expected[task])


def test_without_lora_the_branch_state_is_plain_and_no_peft_adapter_is_written(tmp_path):
    model = Ensemble(make_config("none"), make_experts())
    state = model.adapter_state_dict("e0")
    assert state and all(k.startswith("heads.") for k in state)
    with pytest.raises(ValueError, match="no LoRA"):
        model.save_expert_adapter("e0", tmp_path)
    with pytest.raises(KeyError, match="no expert 'e9'"):
        model.adapter_state_dict("e9")


class NoGradWhenFrozenExpert(TinyConvExpert):
    """Mimics enecg's Expert: runs under no_grad while ``frozen``; ``unfreeze(parameters=False)`` lifts that."""

    def __init__(self, dim: int, has_unfreeze: bool = True) -> None:
        super().__init__(dim)
        self.frozen = False
        self.has_unfreeze = has_unfreeze

    def freeze(self):
        self.frozen = True
        self.requires_grad_(False)
        return self

    def unfreeze(self, *, parameters: bool = True):
        if not self.has_unfreeze:
            raise AssertionError("stand-in without unfreeze support")
        self.frozen = False
        if parameters:
            self.requires_grad_(True)
        return self

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.frozen else torch.enable_grad():
            return super().forward(windows)


def test_experts_are_frozen_and_unfrozen_through_their_own_protocol():
    torch.manual_seed(0)
    frozen_only = {n: NoGradWhenFrozenExpert(d) for n, d in DIMS.items()}
    Ensemble(make_config("heads"), frozen_only)
    assert all(e.frozen for e in frozen_only.values())

    experts = {n: NoGradWhenFrozenExpert(d) for n, d in DIMS.items()}
    model = Ensemble(make_config("experts"), experts).train()
    assert not any(e.frozen for e in experts.values())
    assert not any(p.requires_grad for n, p in experts["e0"].named_parameters() if ".lora_" not in n)
    inputs, gate_input, labels = make_batch()
    model.compute_loss(model(inputs, gate_input), labels)[0].backward()
    lora_grads = [
        p.grad for n, p in model.named_parameters() if ".lora_B." in n and ".expert." in n
    ]  # A gets none while B = 0
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_an_expert_that_blocks_gradients_to_its_lora_is_an_error():
    torch.manual_seed(0)
    experts = {n: NoGradWhenFrozenExpert(d) for n, d in DIMS.items()}
    model = Ensemble(make_config("experts"), experts).train()
    experts["e1"].frozen = True  # e.g. re-frozen behind the ensemble's back
    inputs, gate_input, _ = make_batch()
    with pytest.raises(RuntimeError, match="'e1' returned an embedding without gradient"):
        model(inputs, gate_input)
    with torch.no_grad():  # evaluation is fine
        model.eval()(inputs, gate_input)
