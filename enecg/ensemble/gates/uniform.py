"""``gate.input: uniform``: equal weights, no parameters (a plain average ensemble)."""

from __future__ import annotations

import torch
from torch import Tensor

from enecg.ensemble.gates.base import Gate, GateOutput, uniform_weights
from enecg.ensemble.registries import register_gate


@register_gate
class UniformGate(Gate):
    """Equal weights over the experts that can read each record."""

    name = "uniform"
    reads = None
    has_router = False

    def weights(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        available: Tensor | None = None,
        inputs: Tensor | list[Tensor] | None = None,
    ) -> GateOutput:
        return uniform_weights(batch_size, self.num_groups, self.num_experts, device, available)

    def uniform(
        self, batch_size: int, device: torch.device | str | None = None, available: Tensor | None = None
    ) -> GateOutput:
        """Equal weights for ``batch_size`` records, over the ``available`` experts of each."""
        return self.weights(batch_size, device, available)
