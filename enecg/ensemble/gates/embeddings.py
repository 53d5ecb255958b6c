"""``gate.input: embeddings``: an MLP on the experts' embeddings (every expert runs first).

Each embedding is layer-normalised without affine parameters, so that no FM dominates by scale, then the
embeddings are concatenated; they are detached by default (``detach_embeddings``: with LoRA on the experts the
router should not reshape the features it routes on). A record an expert cannot read gets zeros there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from enecg.ensemble.gates.mlp import MLPGate
from enecg.ensemble.registries import register_gate


@register_gate
class EmbeddingGate(MLPGate):
    """Router on the list of the experts' ``(B, D_e)`` embeddings."""

    name = "embeddings"
    reads = "embeddings"

    def feature_size(self) -> int:
        if len(self.embedding_dims) != self.num_experts:
            raise ValueError(
                f"an embedding gate needs {self.num_experts} embedding sizes, got {self.embedding_dims}"
            )
        return sum(self.embedding_dims)

    def features(self, inputs: Tensor | list[Tensor]) -> Tensor:
        if isinstance(inputs, Tensor) or len(inputs) != self.num_experts:
            raise TypeError(f"an embedding gate takes a list of {self.num_experts} (B, D_e) embeddings")
        parts = []
        for emb, dim in zip(inputs, self.embedding_dims):
            if emb.dim() != 2 or emb.shape[1] != dim:
                raise ValueError(f"embedding gate: expected (B, {dim}), got {tuple(emb.shape)}")
            emb = emb.detach() if self.settings.detach_embeddings else emb
            parts.append(F.layer_norm(emb.float(), (dim,)))
        return torch.cat(parts, dim=-1).unsqueeze(1)
