"""The mixture-of-experts gate: per-record weights over the experts (this project's own module; peft has none).

Inputs (``GateSettings.input``):

* ``signal``: an MLP on a raw-signal summary prepared with the gate's own
  :class:`~enecg.contract.InputContract` (default lead II, 10 s at 100 Hz). Routing is known *before* any expert
  runs, so with sparse top-k routing only the routed experts are run on each record.
* ``embeddings``: an MLP on the experts' embeddings (each layer-normalised without affine parameters, so that
  no FM dominates by scale, then concatenated; detached by default). Every expert must run first.
* ``global``: learned weights (one vector per group) shared by every record: the router is a bias only. A
  weighted average whose weights are fitted, e.g. on out-of-fold predictions (the ``staged`` training strategy).
* ``uniform``: equal weights, no parameters (a plain average ensemble).

Every dense router starts at the uniform mixture by default (``init_uniform``: zero output layer), and
``routing_penalty`` shrinks the record-dependent part of the router logits (``W h``, centred over experts) toward
the per-group weights (the output layer's bias): routing learned from a few hundred records rarely generalises,
so how much of it to keep is a setting, reported by the ``gate/routing`` auxiliary term.

Outputs: weights ``(B, G, E)`` with ``G = 1`` (one vector shared by every task) or ``G = n_tasks`` (per task).
Dense routing is a softmax; sparse routing keeps the ``top_k`` largest router logits and renormalises the softmax
over them (optionally with learned Gaussian noise on the logits during training, Shazeer et al. 2017).
Auxiliary terms (always reported, weighted into the loss by the ensemble): the Switch-Transformer load-balance loss
(Fedus et al. 2021) and the router entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enecg.ensemble.config import GateSettings
from enecg.ensemble.heads import make_activation

LOAD_BALANCE = "gate/load_balance"
ENTROPY = "gate/entropy"
ROUTING = "gate/routing"


@dataclass
class GateOutput:
    """Routing of one batch.

    Attributes:
        weights: ``(B, G, E)`` mixture weights; each row sums to 1, zero for experts not routed to.
        log_weights: ``(B, G, E)`` their logs, ``-inf`` where not routed (use these, not ``weights.log()``).
        probs: ``(B, G, E)`` the router's full softmax before top-k selection.
        routed: ``(B, G, E)`` bool, True where an expert is used for that record (all True when dense).
        aux_losses: ``{LOAD_BALANCE, ENTROPY, ROUTING}`` (unweighted); empty for the uniform gate.
    """

    weights: Tensor
    log_weights: Tensor
    probs: Tensor
    routed: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


def load_balance_loss(probs: Tensor, routed: Tensor | None = None) -> Tensor:
    """Switch-style balance loss ``E * sum_e f_e * P_e`` for router probabilities ``probs`` ``(B, E)``.

    ``P_e`` is the mean router probability of expert ``e`` and ``f_e`` the fraction of routing slots dispatched
    to it (``routed``, ``(B, E)`` bool, for top-k); for dense routing ``f_e = P_e``, which makes the loss
    ``E * sum_e P_e^2``. Both forms equal 1 when routing is uniform (their minimum for dense routing) and ``E``
    when every record goes to one expert.
    """
    num_experts = probs.shape[-1]
    importance = probs.float().mean(dim=0)
    if routed is None:
        fraction = importance
    else:
        dispatch = routed.float()
        fraction = dispatch.mean(dim=0) / dispatch.sum(dim=-1).mean().clamp(min=1.0)
    return num_experts * (fraction * importance).sum()


def router_entropy(log_probs: Tensor) -> Tensor:
    """Mean over records of the entropy of the router distribution (``log_probs`` ``(..., E)``; ``-inf`` for
    experts excluded from a record count 0, with a zero gradient rather than NaN)."""
    probs = log_probs.exp()
    return -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(dim=-1).mean()


def _mlp(
    in_features: int, hidden_sizes: list[int], activation: str, dropout: float
) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [nn.Linear(in_features, size), make_activation(activation), nn.Dropout(dropout)]
        in_features = size
    return nn.Sequential(*layers), in_features


class Gate(nn.Module):
    """Router over ``num_experts`` experts for ``num_groups`` weight vectors (1 shared, or one per task).

    Args:
        settings: gate configuration.
        num_experts: E.
        num_groups: G (1, or the number of tasks with ``per_task``).
        embedding_dims: the experts' embedding sizes (required for ``input='embeddings'``).

    The router's output layer ``router`` (``global``: the parameter ``router_bias``) starts at zero with
    ``settings.init_uniform``.
    """

    def __init__(
        self,
        settings: GateSettings,
        num_experts: int,
        num_groups: int = 1,
        embedding_dims: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.input_kind = settings.input
        self.in_features = 0
        if settings.input == "uniform":
            return
        if settings.input == "global":
            self.router_bias = nn.Parameter(torch.zeros(num_groups * num_experts))
            if not settings.init_uniform or settings.top_k is not None:
                nn.init.normal_(self.router_bias, std=0.02)
            return
        if settings.input == "signal":
            self.in_features = settings.signal_features
        else:
            if not embedding_dims or len(embedding_dims) != num_experts:
                raise ValueError(
                    f"an embedding gate needs {num_experts} embedding sizes, got {embedding_dims}"
                )
            self.embedding_dims = list(embedding_dims)
            self.in_features = sum(embedding_dims)
        self.trunk, width = _mlp(
            self.in_features, settings.hidden_sizes, settings.activation, settings.dropout
        )
        self.router = nn.Linear(width, num_groups * num_experts)
        # Sparse routing keeps its random start: at all-equal logits top-k would send every record to the same
        # first k experts, and the others would never get a gradient.
        if settings.init_uniform and settings.top_k is None:
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
        self.noise = nn.Linear(width, num_groups * num_experts) if settings.noisy_top_k else None

    def extra_repr(self) -> str:
        return (
            f"input={self.input_kind}, in_features={self.in_features}, experts={self.num_experts}, "
            f"groups={self.num_groups}, top_k={self.settings.top_k}"
        )

    # -- router logits -------------------------------------------------------------------------------------------

    def _features(self, inputs: Tensor | list[Tensor]) -> Tensor:
        """``(B, W, F)`` router features: W windows for a signal gate, W = 1 for an embedding gate."""
        if self.input_kind == "signal":
            if not isinstance(inputs, Tensor):
                raise TypeError("a signal gate takes one tensor of gate-contract windows")
            batch = inputs.shape[0]
            if inputs.numel() == 0 or inputs[0].numel() % self.in_features:
                raise ValueError(
                    f"gate input of shape {tuple(inputs.shape)} does not hold windows of {self.in_features} "
                    f"samples (leads x length of the gate contract)"
                )
            return inputs.reshape(batch, -1, self.in_features).float()
        if isinstance(inputs, Tensor) or len(inputs) != self.num_experts:
            raise TypeError(f"an embedding gate takes a list of {self.num_experts} (B, D_e) embeddings")
        parts = []
        for emb, dim in zip(inputs, self.embedding_dims):
            if emb.dim() != 2 or emb.shape[1] != dim:
                raise ValueError(f"embedding gate: expected (B, {dim}), got {tuple(emb.shape)}")
            emb = emb.detach() if self.settings.detach_embeddings else emb
            parts.append(F.layer_norm(emb.float(), (dim,)))
        return torch.cat(parts, dim=-1).unsqueeze(1)

    def router_logits(self, inputs: Tensor | list[Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        """Clean router logits ``(B, G, E)`` (averaged over windows), the noise scale (or None), and the
        record-dependent part of the logits (without the output bias, centred over experts)."""
        hidden = self.trunk(self._features(inputs))
        shape = (hidden.shape[0], self.num_groups, self.num_experts)
        record_part = F.linear(hidden, self.router.weight).mean(dim=1).reshape(shape)
        logits = record_part + self.router.bias.reshape(1, self.num_groups, self.num_experts)
        noise_std = None
        if self.noise is not None:
            noise_std = F.softplus(self.noise(hidden).mean(dim=1)).reshape(shape)
        return logits, noise_std, record_part - record_part.mean(dim=-1, keepdim=True)

    # -- routing -------------------------------------------------------------------------------------------------

    def route(
        self,
        logits: Tensor,
        noise_std: Tensor | None = None,
        record_part: Tensor | None = None,
        available: Tensor | None = None,
    ) -> GateOutput:
        """Turn router logits ``(B, G, E)`` into weights (dense softmax or renormalised top-k).

        ``available`` ``(B, E)`` bool: experts that can read each record. The others get weight 0 and are never
        routed to (their logits are -inf before the softmax / top-k), so the weights renormalise over the
        experts that can; top-k then picks among those."""
        logits = logits.float()
        if noise_std is not None and self.training:
            logits = logits + torch.randn_like(logits) * noise_std
        allowed = _allowed(available, logits)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        top_k = self.settings.top_k
        if top_k is None or top_k >= self.num_experts:
            routed = torch.ones_like(logits, dtype=torch.bool) if allowed is None else allowed.clone()
            log_weights, weights = log_probs, probs
            dispatch = None
        else:
            chosen = logits.topk(top_k, dim=-1).indices
            routed = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, chosen, True)
            if allowed is not None:
                routed = routed & allowed  # fewer than k experts can read the record
            log_weights = F.log_softmax(logits.masked_fill(~routed, float("-inf")), dim=-1)
            weights = log_weights.exp()
            dispatch = routed
        balance = torch.stack(
            [
                load_balance_loss(probs[:, g], None if dispatch is None else dispatch[:, g])
                for g in range(self.num_groups)
            ]
        ).mean()
        aux = {LOAD_BALANCE: balance, ENTROPY: router_entropy(log_probs)}
        if record_part is not None:
            aux[ROUTING] = record_part.float().pow(2).sum(dim=-1).mean()
        return GateOutput(
            weights=weights, log_weights=log_weights, probs=probs, routed=routed, aux_losses=aux
        )

    def global_weights(
        self, batch_size: int, device: torch.device | str | None = None, available: Tensor | None = None
    ) -> GateOutput:
        """The 'global' gate: the same learned weights for every record (renormalised over ``available``)."""
        shape = (batch_size, self.num_groups, self.num_experts)
        logits = self.router_bias.to(device).reshape(1, self.num_groups, self.num_experts).expand(shape)
        return self.route(logits, available=available)

    def uniform(
        self, batch_size: int, device: torch.device | str | None = None, available: Tensor | None = None
    ) -> GateOutput:
        """Equal weights for every record (the 'uniform' gate), over the ``available`` experts of each."""
        shape = (batch_size, self.num_groups, self.num_experts)
        routed = torch.ones(shape, dtype=torch.bool, device=device)
        allowed = _allowed(available, routed)
        if allowed is not None:
            routed = allowed.clone()
        weights = routed.float() / routed.sum(dim=-1, keepdim=True).clamp(min=1)
        return GateOutput(weights=weights, log_weights=weights.log(), probs=weights, routed=routed)

    def forward(self, inputs: Tensor | list[Tensor], available: Tensor | None = None) -> GateOutput:
        """Route a batch: ``inputs`` are gate-contract windows (``(B, [W,] leads, length)``, any layout whose
        per-record size is a multiple of leads x length; windows are averaged in logit space) for a signal gate,
        or the list of the experts' embeddings for an embedding gate (zeros for records an expert cannot read).
        ``available`` ``(B, E)``: see :meth:`route`."""
        if self.input_kind in ("uniform", "global"):
            raise RuntimeError(
                f"the {self.input_kind} gate reads no input: call Gate.{'uniform' if self.input_kind == 'uniform' else 'global_weights'}(batch_size)"
            )
        return self.route(*self.router_logits(inputs), available=available)


def _allowed(available: Tensor | None, like: Tensor) -> Tensor | None:
    """``available`` ``(B, E)`` broadcast to ``like`` ``(B, G, E)`` (None when every expert can read every record)."""
    if available is None:
        return None
    available = available.to(device=like.device, dtype=torch.bool)
    if available.shape != (like.shape[0], like.shape[-1]):
        raise ValueError(f"available must be (B, E) = {(like.shape[0], like.shape[-1])}, got {tuple(available.shape)}")
    if bool(available.all()):
        return None
    if not bool(available.any(dim=-1).all()):
        raise ValueError("every record needs at least one expert that can read it (an `available` row is all False)")
    return available.unsqueeze(1).expand(like.shape)
