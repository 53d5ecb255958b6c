"""Task heads and the per-expert branch (a frozen expert + its own heads).

An :class:`ExpertBranch` is the unit that gets its own peft adapter (:mod:`enecg.ensemble.lora`): it holds the
expert (``expert``), one :class:`TaskHead` per task (``heads``, a ``ModuleDict`` keyed by task name) when experts'
predictions are combined, or a projection (``branch_projection``) when embeddings are combined. Its ``forward``
runs the branch on its own, so a peft user who loads one expert's adapter onto a branch gets that expert's
predictions without the rest of the ensemble.
"""

from __future__ import annotations

import inspect
import itertools

from torch import Tensor, nn

from enecg.ensemble.config import HeadSettings

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class TaskHead(nn.Module):
    """MLP head ``[LayerNorm] -> (Linear -> act -> dropout) x len(hidden_sizes) -> Linear``.

    Linear layers are named ``hidden.0``, ``hidden.1``, ..., ``out`` (stable names for peft targets).
    """

    def __init__(self, in_features: int, out_features: int, settings: HeadSettings) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features) if settings.input_norm == "layernorm" else nn.Identity()
        sizes = [in_features, *settings.hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(sizes[-1], out_features)
        self.act = make_activation(settings.activation)
        self.drop = nn.Dropout(settings.dropout)

    def linear_layer_names(self) -> list[str]:
        """Names (relative to this head) of its Linear layers, input to output."""
        return [f"hidden.{i}" for i in range(len(self.hidden))] + ["out"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        for layer in self.hidden:
            x = self.drop(self.act(layer(x)))
        return self.out(x)


def accepts_argument(expert: nn.Module, name: str) -> bool:
    """Whether ``expert.forward`` takes an argument called ``name`` (``demographics``, ``window_mask``)."""
    try:
        return name in inspect.signature(expert.forward).parameters
    except (TypeError, ValueError):
        return False


class ExpertBranch(nn.Module):
    """One expert and its trainable parts.

    Args:
        expert: the (frozen) expert; ``forward(windows) -> (B, D)``, optionally taking ``window_mask=(B, W)``
            (False for padding windows) and ``demographics=(B, 2)``.
        hub_id: recorded as ``name_or_path``, which peft copies into ``adapter_config.json``
            (``base_model_name_or_path``).
        heads: task name -> head (combine='predictions'); empty when embeddings are combined.
        projection: ``(B, D) -> (B, P)`` (combine='embeddings'), else None.
        squeeze_tasks: tasks whose single output is returned as ``(B,)`` (binary, regression).
    """

    def __init__(
        self,
        expert: nn.Module,
        hub_id: str,
        heads: dict[str, TaskHead] | None = None,
        projection: nn.Module | None = None,
        squeeze_tasks: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.expert = expert
        self.heads = nn.ModuleDict(heads or {})
        # Named so that peft's suffix matching of `modules_to_save` cannot hit an expert's own
        # `feature_projection` / `projection` modules.
        self.branch_projection = projection
        self.squeeze_tasks = tuple(squeeze_tasks)
        self.accepts_demographics = accepts_argument(expert, "demographics")
        self.accepts_window_mask = accepts_argument(expert, "window_mask")
        # peft reads `model.__dict__["name_or_path"]` into the adapter's base_model_name_or_path.
        self.name_or_path = hub_id

    def embed(
        self,
        windows: Tensor,
        demographics: Tensor | None = None,
        window_mask: Tensor | None = None,
        lead_mask: Tensor | None = None,
        valid_samples: Tensor | None = None,
    ) -> Tensor:
        """The expert's pooled embedding ``(B, D)`` of contract-prepared windows.

        ``window_mask`` ``(B, W)`` marks real windows (False: padding of records with fewer windows); an expert
        that cannot take it is refused padded input rather than averaging padding into its embedding.
        ``lead_mask`` ``(B, leads)`` and ``valid_samples`` ``(B, W)`` reach experts that take them (see
        :meth:`enecg.experts.expert.Expert.forward`)."""
        kwargs = {}
        for name, value in (("lead_mask", lead_mask), ("valid_samples", valid_samples)):
            if value is not None and accepts_argument(self.expert, name):
                kwargs[name] = value
        if demographics is not None and self.accepts_demographics:
            kwargs["demographics"] = demographics
        if window_mask is not None:
            if self.accepts_window_mask:
                kwargs["window_mask"] = window_mask
            elif not bool(window_mask.all()):
                raise ValueError(
                    f"expert {self.name_or_path!r} takes no window_mask, but the batch has padding windows"
                )
        return self.expert(windows, **kwargs)

    def head_logits(self, embedding: Tensor) -> dict[str, Tensor]:
        """Per-task logits of this expert's heads: ``(B,)`` for scalar tasks, ``(B, K)`` otherwise."""
        out = {}
        for name, head in self.heads.items():
            logits = head(embedding)
            out[name] = logits.squeeze(-1) if name in self.squeeze_tasks else logits
        return out

    def project(self, embedding: Tensor) -> Tensor:
        if self.branch_projection is None:
            raise RuntimeError("this branch has no projection (gate.combine is 'predictions')")
        return self.branch_projection(embedding)

    def forward(
        self, windows: Tensor, demographics: Tensor | None = None, window_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Run the branch alone: per-task logits, or ``{"projection": (B, P)}`` when embeddings are combined."""
        embedding = self.embed(windows, demographics, window_mask)
        if self.branch_projection is not None:
            return {"projection": self.project(embedding)}
        return self.head_logits(embedding)


def prepare_expert(expert: nn.Module, lora_on_expert: bool) -> None:
    """Freeze ``expert``'s own weights in place, using the expert's own protocol where it has one.

    enecg's :class:`~enecg.experts.expert.Expert` runs under ``no_grad`` while ``frozen``: with LoRA on its layers
    it must be unfrozen without making its base weights trainable (``unfreeze(parameters=False)``), or the LoRA
    weights would never get a gradient.
    """
    if callable(getattr(expert, "freeze", None)):
        expert.freeze()
    expert.requires_grad_(False)
    if lora_on_expert and callable(getattr(expert, "unfreeze", None)):
        expert.unfreeze(parameters=False)


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    """Number of parameter elements (``trainable``: only those with/without ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
