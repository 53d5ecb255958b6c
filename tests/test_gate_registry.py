"""Adding a gate kind is one registered class: a toy gate written here alone is configured by name, built by the
ensemble, routes records, trains and refuses bad settings, with no change anywhere else."""

from __future__ import annotations

import pytest
import torch
from test_ensemble_model import BATCH, GATE_LENGTH, LEADS, LENGTH, WINDOWS, make_experts
from torch import Tensor, nn

from enecg.ensemble import Ensemble, EnsembleConfig
from enecg.ensemble.gates import GATES, Gate, GateOutput, register_gate


class NormGate(Gate):
    """Toy kind: reads the experts' embeddings and weights each expert by a learned scale of its embedding's
    norm (one parameter per expert)."""

    name = "toy_norm"
    reads = "embeddings"

    def build(self) -> None:
        self.scale = nn.Parameter(torch.ones(self.num_experts))

    @classmethod
    def check_settings(cls, settings) -> None:
        super().check_settings(settings)
        if settings.per_task:
            raise ValueError("gate.input='toy_norm' has one weight vector: per_task does not apply")

    def weights(self, batch_size, device=None, available=None, inputs=None) -> GateOutput:
        norms = torch.stack([emb.float().norm(dim=-1) for emb in inputs], dim=-1)  # (B, E)
        logits = (norms * self.scale).unsqueeze(1).expand(batch_size, self.num_groups, self.num_experts)
        return self.route(logits, available=available)


@pytest.fixture
def toy_gate():
    register_gate(NormGate)
    yield NormGate
    GATES.unregister(NormGate.name)


def config_with(gate: dict) -> EnsembleConfig:
    return EnsembleConfig.from_dict(
        {
            "experts": [
                {"name": f"e{i}", "hub_id": f"org/e{i}", "revision": "a" * 40, "embedding_dim": d}
                for i, d in enumerate((8, 12))
            ],
            "tasks": [{"name": "dx", "type": "multilabel", "label_names": ["NORM", "MI"]}],
            "heads": {"hidden_sizes": [16]},
            "gate": {"contract": {"fs": 100.0, "leads": ["II"], "length": GATE_LENGTH}, **gate},
            "lora": {"on_heads": False},
        }
    )


def test_a_registered_gate_is_built_configured_and_trained(toy_gate) -> None:
    config = config_with({"input": "toy_norm"})
    model = Ensemble(config, make_experts(config))
    assert isinstance(model.gate, toy_gate)
    torch.manual_seed(0)
    inputs = {n: torch.randn(BATCH, WINDOWS, LEADS, LENGTH) for n in model.expert_names}
    out = model(inputs)
    weights = out.gate_weights["dx"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH))
    # The weights are the toy rule's: softmax over the experts' embedding norms (scale 1 at the start).
    with torch.no_grad():
        norms = torch.stack(
            [model.branch(n).embed(inputs[n]).norm(dim=-1) for n in model.expert_names], dim=-1
        )
    torch.testing.assert_close(weights, norms.softmax(-1), rtol=1e-5, atol=1e-6)
    # Its parameter trains through the ensemble's loss.
    loss = out.logits["dx"].sigmoid().mean()
    loss.backward()
    assert model.gate.scale.grad is not None and torch.isfinite(model.gate.scale.grad).all()
    # It is saved and reloaded like any gate.
    assert "gate.scale" in model.trainable_state_dict()


def test_a_registered_gate_checks_its_settings(toy_gate) -> None:
    with pytest.raises(ValueError, match="per_task does not apply"):
        config_with({"input": "toy_norm", "per_task": True})


def test_an_unknown_gate_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"gate.input must be one of \['embeddings', 'global', 'signal', 'uniform'\]"):
        config_with({"input": "toy_norm"})


def test_builtin_kinds_are_registered_classes() -> None:
    assert GATES.names() == ["embeddings", "global", "signal", "uniform"]
    assert {GATES.get(n).reads for n in GATES.names()} == {"signal", "embeddings", None}
    assert all(issubclass(GATES.get(n), Gate) for n in GATES.names())
    uniform = GATES.get("uniform")(config_with({"input": "uniform"}).gate, 2).weights(3)
    assert isinstance(uniform, GateOutput) and isinstance(uniform.weights, Tensor)
    torch.testing.assert_close(uniform.weights, torch.full((3, 1, 2), 0.5))
