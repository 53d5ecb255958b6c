"""``gate.input: signal``: an MLP on the raw signal, prepared with the gate's own contract.

The input is the record summarised by :attr:`GateSettings.contract` (default lead II, 10 s at 100 Hz), so routing
is known *before* any expert runs: with sparse top-k routing only the routed experts run on each record.
"""

from __future__ import annotations

from torch import Tensor

from enecg.ensemble.config import GateSettings
from enecg.ensemble.gates.mlp import MLPGate
from enecg.ensemble.registries import register_gate


@register_gate
class SignalGate(MLPGate):
    """Router on gate-contract windows ``(B, [W,] leads, length)`` (any layout whose per-record size is a
    multiple of leads x length; windows are averaged in logit space)."""

    name = "signal"
    reads = "signal"

    @classmethod
    def check_settings(cls, settings: GateSettings) -> None:
        super().check_settings(settings)
        contract = settings.input_contract()
        if contract.leads is None or contract.length is None:
            raise ValueError("gate.contract must set `leads` and `length` for a signal gate (fixed input size)")

    def feature_size(self) -> int:
        return self.settings.signal_features

    def features(self, inputs: Tensor | list[Tensor]) -> Tensor:
        if not isinstance(inputs, Tensor):
            raise TypeError("a signal gate takes one tensor of gate-contract windows")
        batch = inputs.shape[0]
        if inputs.numel() == 0 or inputs[0].numel() % self.in_features:
            raise ValueError(
                f"gate input of shape {tuple(inputs.shape)} does not hold windows of {self.in_features} "
                f"samples (leads x length of the gate contract)"
            )
        return inputs.reshape(batch, -1, self.in_features).float()
