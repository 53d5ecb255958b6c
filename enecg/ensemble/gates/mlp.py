"""Gates whose router is an MLP on per-record features (the ``signal`` and ``embeddings`` kinds build on it).

Every dense router starts at the uniform mixture by default (``init_uniform``: zero output layer), and
``routing_penalty`` shrinks the record-dependent part of the router logits (``W h``, centred over experts) toward
the per-group weights (the output layer's bias): routing learned from a few hundred records rarely generalises,
so how much of it to keep is a setting, reported by the ``gate/routing`` auxiliary term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enecg.ensemble.gates.base import Gate, GateOutput
from enecg.ensemble.heads import make_activation


class MLPGate(Gate):
    """An MLP router (``trunk`` + output layer ``router``, optional ``noise`` layer) on :meth:`features`.

    Subclasses implement :meth:`feature_size` and :meth:`features`; the router logits are averaged over the
    feature rows of a record (e.g. the windows of a signal gate) in logit space.
    """

    def build(self) -> None:
        settings, num_groups, num_experts = self.settings, self.num_groups, self.num_experts
        self.in_features = self.feature_size()
        layers: list[nn.Module] = []
        width = self.in_features
        for size in settings.hidden_sizes:
            layers += [nn.Linear(width, size), make_activation(settings.activation), nn.Dropout(settings.dropout)]
            width = size
        self.trunk = nn.Sequential(*layers)
        self.router = nn.Linear(width, num_groups * num_experts)
        # Sparse routing keeps its random start: at all-equal logits top-k would send every record to the same
        # first k experts, and the others would never get a gradient.
        if settings.init_uniform and settings.top_k is None:
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
        self.noise = nn.Linear(width, num_groups * num_experts) if settings.noisy_top_k else None

    def feature_size(self) -> int:
        """F, the size of one feature row."""
        raise NotImplementedError

    def features(self, inputs: Tensor | list[Tensor]) -> Tensor:
        """``(B, W, F)`` router features (W rows per record, averaged in logit space)."""
        raise NotImplementedError

    def router_logits(self, inputs: Tensor | list[Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        """Clean router logits ``(B, G, E)`` (averaged over feature rows), the noise scale (or None), and the
        record-dependent part of the logits (without the output bias, centred over experts)."""
        hidden = self.trunk(self.features(inputs))
        shape = (hidden.shape[0], self.num_groups, self.num_experts)
        record_part = F.linear(hidden, self.router.weight).mean(dim=1).reshape(shape)
        logits = record_part + self.router.bias.reshape(1, self.num_groups, self.num_experts)
        noise_std = None
        if self.noise is not None:
            noise_std = F.softplus(self.noise(hidden).mean(dim=1)).reshape(shape)
        return logits, noise_std, record_part - record_part.mean(dim=-1, keepdim=True)

    def weights(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        available: Tensor | None = None,
        inputs: Tensor | list[Tensor] | None = None,
    ) -> GateOutput:
        if inputs is None:
            raise ValueError(f"the {self.name} gate needs its input ({self.reads})")
        return self.route(*self.router_logits(inputs), available=available)
