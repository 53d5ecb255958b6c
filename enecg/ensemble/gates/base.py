"""What every gate shares: the routing of router logits into mixture weights, and its auxiliary terms.

A gate kind is one :class:`Gate` subclass registered by name (``gate.input`` in a config) with
:func:`~enecg.ensemble.registries.register_gate`. It declares what it reads (:attr:`Gate.reads`): ``"signal"``
(windows prepared with the gate's own contract, before any expert runs: sparse routing then runs only the routed
experts), ``"embeddings"`` (the experts' embeddings: every expert runs first) or ``None`` (nothing: weights that
do not depend on the record). The ensemble supplies that input and calls :meth:`Gate.weights`; nothing else
changes when a kind is added.

Outputs: weights ``(B, G, E)`` with ``G = 1`` (one vector shared by every task) or ``G = n_tasks`` (per task).
Dense routing is a softmax; sparse routing keeps the ``top_k`` largest router logits and renormalises the softmax
over them (optionally with learned Gaussian noise on the logits during training, Shazeer et al. 2017).
Auxiliary terms (always reported, weighted into the loss by the ensemble): the Switch-Transformer load-balance loss
(Fedus et al. 2021), the router entropy, and the size of the record-dependent routing (``routing_penalty``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from enecg.ensemble.config import GateSettings

LOAD_BALANCE = "gate/load_balance"
ENTROPY = "gate/entropy"
ROUTING = "gate/routing"

GateReads = Literal["signal", "embeddings"] | None


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


def uniform_weights(
    batch_size: int,
    num_groups: int,
    num_experts: int,
    device: torch.device | str | None = None,
    available: Tensor | None = None,
) -> GateOutput:
    """Equal weights over the ``available`` experts of each record (a plain average; no parameters)."""
    shape = (batch_size, num_groups, num_experts)
    routed = torch.ones(shape, dtype=torch.bool, device=device)
    allowed = allowed_experts(available, routed)
    if allowed is not None:
        routed = allowed.clone()
    weights = routed.float() / routed.sum(dim=-1, keepdim=True).clamp(min=1)
    return GateOutput(weights=weights, log_weights=weights.log(), probs=weights, routed=routed)


def allowed_experts(available: Tensor | None, like: Tensor) -> Tensor | None:
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


class Gate(nn.Module):
    """Base class of the gate kinds: per-record weights over ``num_experts`` experts for ``num_groups`` weight
    vectors (1 shared, or one per task).

    Subclasses set :attr:`name` and :attr:`reads`, create their parameters in :meth:`build` and implement
    :meth:`weights`; :meth:`route` turns router logits into weights the same way for all of them.

    Args:
        settings: the ``gate`` section of the ensemble config.
        num_experts: E.
        num_groups: G (1, or the number of tasks with ``per_task``).
        embedding_dims: the experts' embedding sizes (used by gates that read embeddings).
    """

    name: ClassVar[str]
    reads: ClassVar[GateReads] = None
    has_router: ClassVar[bool] = True
    """False for a gate without router logits (``top_k`` / ``noisy_top_k`` do not apply)."""

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
        self.embedding_dims = list(embedding_dims or [])
        self.in_features = 0
        self.build()

    def build(self) -> None:
        """Create the kind's parameters (called by ``__init__`` once the sizes are set)."""

    @property
    def input_kind(self) -> str:
        """The registered name (``gate.input``)."""
        return self.name

    @classmethod
    def check_settings(cls, settings: GateSettings) -> None:
        """Refuse settings this kind cannot use (one clear line); called when the config is built."""
        if not cls.has_router and (settings.top_k is not None or settings.noisy_top_k):
            raise ValueError(f"gate.input={cls.name!r} has no router: top_k / noisy_top_k do not apply")

    def extra_repr(self) -> str:
        return (
            f"input={self.name}, in_features={self.in_features}, experts={self.num_experts}, "
            f"groups={self.num_groups}, top_k={self.settings.top_k}"
        )

    def weights(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        available: Tensor | None = None,
        inputs: Tensor | list[Tensor] | None = None,
    ) -> GateOutput:
        """Route a batch of ``batch_size`` records; ``inputs`` is what :attr:`reads` names (None for a gate that
        reads nothing); ``available`` ``(B, E)``: see :meth:`route`."""
        raise NotImplementedError

    def forward(self, inputs: Tensor | list[Tensor], available: Tensor | None = None) -> GateOutput:
        """Route a batch from its gate input (signal windows or the experts' embeddings)."""
        if self.reads is None:
            raise RuntimeError(f"the {self.name} gate reads no input: call {type(self).__name__}.weights(batch_size)")
        batch = inputs.shape[0] if isinstance(inputs, Tensor) else (inputs[0].shape[0] if inputs else 0)
        return self.weights(batch, available=available, inputs=inputs)

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
        allowed = allowed_experts(available, logits)
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
