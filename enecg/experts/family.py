"""The interface every expert family (architecture) implements, and the family registry.

A *family* is native PyTorch code for one published architecture (Net1D, HuBERT-ECG, ECG-FM, MOMENT, the light
CNNs). An *adapter spec* (``adapters/*.yaml``) names a concrete published model of a family: Hub ID, file, config,
input contract. Adding a new FM of a known family is one spec file; adding a family is one module that subclasses
:class:`ExpertFamily` and decorates it with :func:`register_family`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from enecg.utils.registry import Registry


class ExpertFamily(ABC):
    """One architecture family. Stateless: methods take the config / module they work on."""

    name: ClassVar[str]
    #: ``embed`` takes ``lead_mask`` ``(B, leads)`` bool (False: a zero-filled missing lead) and keeps missing
    #: leads out of the model's computation (channel-independent models pool over the real leads only).
    masks_missing_leads: ClassVar[bool] = False
    #: ``embed`` takes ``valid_samples`` ``(B,)`` int (real samples per lead; the rest is end padding) and keeps
    #: padding out of normalisation, attention and pooling.
    masks_padding: ClassVar[bool] = False

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """Build the native module from the published config. Its ``state_dict()`` keys, shapes and dtypes must
        equal the official model's (the parity manifests check this), so published files load strictly."""

    @abstractmethod
    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Read a published weights file into ``(state_dict, config_found_in_file_or_None)``.

        Must use :func:`enecg.experts.weights.read_weights` (safetensors, or pickles strictly with
        ``weights_only=True``). Key aliases (e.g. legacy weight-norm ``weight_g``/``weight_v``) are mapped to the
        names ``build()`` produces here."""

    @abstractmethod
    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)`` of contract-prepared windows ``x`` (``(B, leads, length)`` or
        ``(B, leads*length)`` for ``concat_leads`` contracts), exactly as the official code pools.

        Families that set :attr:`masks_missing_leads` / :attr:`masks_padding` also take the keyword arguments
        ``lead_mask`` / ``valid_samples`` (None: everything is real)."""

    @abstractmethod
    def embedding_dim(self, config: dict[str, Any]) -> int:
        """Size D of :meth:`embed`'s output for this config."""

    def detect(self, folder: Path) -> Path | None:
        """If ``folder`` holds this family's *published* layout (e.g. ``config.json`` with ``model_type:
        hubert_ecg`` + ``model.safetensors``), return the weights file to load; else None. Lets a local folder or
        Hub snapshot load from its files alone, with no spec."""
        return None

    def official_forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
        """The official model's raw forward (for parity tests); by default ``model(x, **kwargs)``."""
        return model(x, **kwargs)

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        """Default peft ``target_modules`` when LoRA adapts the expert's own layers (spec may override)."""
        return []


FAMILIES: Registry[type[ExpertFamily]] = Registry("expert family", builtins="enecg.experts.families")
register_family = FAMILIES.register
"""Class decorator: make an :class:`ExpertFamily` available by its ``name`` (a spec's ``family:``)."""


def get_family(name: str) -> ExpertFamily:
    """Instantiate the registered family ``name`` (the built-in families are imported first)."""
    return FAMILIES.get(name)()


def family_names() -> list[str]:
    return FAMILIES.names()
