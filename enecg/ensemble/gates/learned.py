"""``gate.input: global``: learned weights shared by every record (the router is a bias only).

A weighted average whose weights are fitted, e.g. on out-of-fold predictions (the ``staged`` training strategy).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from enecg.ensemble.gates.base import Gate, GateOutput
from enecg.ensemble.registries import register_gate


@register_gate
class GlobalGate(Gate):
    """One learned weight vector per group (``router_bias``), the same for every record."""

    name = "global"
    reads = None

    def build(self) -> None:
        self.router_bias = nn.Parameter(torch.zeros(self.num_groups * self.num_experts))
        if not self.settings.init_uniform or self.settings.top_k is not None:
            nn.init.normal_(self.router_bias, std=0.02)

    def weights(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        available: Tensor | None = None,
        inputs: Tensor | list[Tensor] | None = None,
    ) -> GateOutput:
        shape = (batch_size, self.num_groups, self.num_experts)
        logits = self.router_bias.to(device).reshape(1, self.num_groups, self.num_experts).expand(shape)
        return self.route(logits, available=available)

    def global_weights(
        self, batch_size: int, device: torch.device | str | None = None, available: Tensor | None = None
    ) -> GateOutput:
        """The learned weights for ``batch_size`` records (renormalised over ``available``)."""
        return self.weights(batch_size, device, available)
