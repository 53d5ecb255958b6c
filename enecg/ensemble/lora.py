"""LoRA with peft, one adapter per expert branch.

Each :class:`~enecg.ensemble.heads.ExpertBranch` (an expert + its heads or projection) is wrapped on its own with
``peft.get_peft_model`` and its own ``LoraConfig``; ``name_or_path`` (the expert's Hub ID) and the expert's
resolved revision are set before wrapping, so the branch's adapter saves in peft's standard format
(``adapter_config.json`` with ``base_model_name_or_path``/``revision`` + ``adapter_model.safetensors``) and a peft
user can load one expert's adapter with ``PeftModel.from_pretrained(branch, folder)``.

Heads are trained in every mode (the released EnECG code let peft freeze them at random initialisation):

* head layers that get LoRA (``lora.on_heads``: the first ``head_layers`` Linear layers, as in the paper) keep
  their base weights trainable too: peft freezes them, this module unfreezes them, and they are saved in the
  adapter file under peft's own key names (``...base_layer.weight``), which peft's loader restores;
* every other head module with parameters (norm, remaining layers, projection) is listed in peft's
  ``modules_to_save`` (as leaf modules: peft rejects containers) and trained fully.

LoRA on the experts' own layers (``lora.on_experts``) targets ``ExpertRef.lora_target_modules`` with peft's
suffix semantics, confined to the expert. Targets that peft wraps but torch bypasses are refused with a clear
error instead of silently training nothing: ``nn.MultiheadAttention.out_proj`` (its weight is read directly) and
anything inside ``nn.TransformerEncoderLayer`` (its eval fast path ignores LoRA wrappers).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import Tensor, nn

from enecg.ensemble.config import ExpertRef, LoraSettings
from enecg.ensemble.heads import ExpertBranch

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def head_lora_targets(branch: ExpertBranch, head_layers: int) -> list[str]:
    """Names (relative to the branch) of the head layers that get LoRA: the first ``head_layers`` of each head."""
    names = []
    for task, head in branch.heads.items():
        names += [f"heads.{task}.{layer}" for layer in head.linear_layer_names()[:head_layers]]
    return names


def expert_lora_targets(branch: ExpertBranch, target_modules: list[str]) -> list[str]:
    """Names (relative to the branch) of the expert's modules matching ``target_modules`` (peft semantics: a
    module whose dotted name equals a target or ends with ``.target``), confined to ``expert.``."""
    alternatives = "|".join(re.escape(t) for t in target_modules)
    pattern = re.compile(rf"expert\.(?:.*\.)?(?:{alternatives})")
    return [name for name, _ in branch.named_modules() if pattern.fullmatch(name)]


def check_lora_targets(model: nn.Module, names: list[str], where: str) -> None:
    """Refuse LoRA targets whose update torch would silently skip (see the module docstring)."""
    modules = dict(model.named_modules())
    for name in names:
        parts = name.split(".")
        parent_name = ".".join(parts[:-1])
        if parts[-1] == "out_proj" and isinstance(modules.get(parent_name), nn.MultiheadAttention):
            raise ValueError(
                f"{where}: LoRA target {name!r} is nn.MultiheadAttention.out_proj, whose weight the attention reads "
                f"directly, so LoRA there never changes the output; target the attention module "
                f"{parent_name!r} itself or the expert's own Linear layers"
            )
        for depth in range(len(parts) + 1):
            ancestor = ".".join(parts[:depth])
            if isinstance(modules.get(ancestor), nn.TransformerEncoderLayer):
                raise ValueError(
                    f"{where}: LoRA target {name!r} is inside torch.nn.TransformerEncoderLayer {ancestor!r}, whose "
                    f"eval-mode fast path reads the base weights directly and silently ignores LoRA; target the "
                    f"expert's own Linear layers instead"
                )


def _trainable_head_modules(branch: ExpertBranch, lora_targets: set[str]) -> list[str]:
    """Leaf modules with parameters under ``heads``/``branch_projection`` that are not LoRA targets."""
    names = []
    for name, module in branch.named_modules():
        if not (
            name.startswith("heads.") or name == "branch_projection" or name.startswith("branch_projection.")
        ):
            continue
        has_own_parameters = any(True for _ in module.parameters(recurse=False))
        if has_own_parameters and name not in lora_targets:
            names.append(name)
    return names


def wrap_branch(branch: ExpertBranch, ref: ExpertRef, settings: LoraSettings) -> nn.Module:
    """Apply the configured LoRA to ``branch``; returns a ``PeftModel`` (or ``branch`` itself without LoRA).

    The branch's expert must be frozen already; peft injects LoRA layers into it in place.
    """
    if not settings.enabled:
        return branch
    where = f"expert {ref.name!r}"
    if any(name.startswith("lora_") or ".lora_" in name for name, _ in branch.expert.named_modules()):
        raise ValueError(
            f"{where}: the expert module already carries LoRA layers (used by another ensemble?); "
            f"pass a freshly loaded expert"
        )
    head_targets = head_lora_targets(branch, settings.head_layers) if settings.on_heads else []
    expert_targets: list[str] = []
    if settings.on_experts:
        expert_targets = expert_lora_targets(branch, ref.lora_target_modules)
        if not expert_targets:
            raise ValueError(
                f"{where}: lora_target_modules {ref.lora_target_modules} match no module of the expert"
            )
        check_lora_targets(branch, expert_targets, where)
    to_save = _trainable_head_modules(branch, set(head_targets))
    targets = head_targets + expert_targets
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # An exact-name pattern: peft's list form matches suffixes, which could reach into the expert.
        target_modules="|".join(re.escape(t) for t in targets),
        modules_to_save=to_save or None,
        bias="none",
    )
    model = get_peft_model(branch, config, revision=ref.revision)
    base = model.get_base_model()
    # Heads stay trainable: unfreeze the base weights of LoRA-adapted head layers (peft froze them).
    for name in head_targets:
        for parameter in base.get_submodule(name).base_layer.parameters():
            parameter.requires_grad_(True)
    wrapped = {name for name, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    if wrapped != set(to_save):
        raise RuntimeError(
            f"{where}: peft wrapped {sorted(wrapped)} for modules_to_save, expected {sorted(to_save)}"
        )
    _check_heads_trainable(base, where)
    return model


def _check_heads_trainable(branch: nn.Module, where: str) -> None:
    frozen = [
        name
        for name, p in branch.named_parameters()
        if (name.startswith("heads.") or name.startswith("branch_projection"))
        and not p.requires_grad
        and ".original_module." not in name
    ]
    if frozen:
        raise RuntimeError(f"{where}: head parameters left frozen after applying LoRA: {frozen[:5]}")


def unwrap_branch(module: nn.Module) -> ExpertBranch:
    """The :class:`ExpertBranch` inside a (possibly peft-wrapped) branch."""
    branch = module.get_base_model() if isinstance(module, PeftModel) else module
    if not isinstance(branch, ExpertBranch):
        raise TypeError(f"expected an ExpertBranch, got {type(branch).__name__}")
    return branch


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Every trainable weight of one branch, detached.

    For a peft-wrapped branch the keys are peft's adapter keys (as in ``adapter_model.safetensors``: LoRA weights,
    ``modules_to_save`` weights, and the trainable base weights of LoRA-adapted head layers); for a branch without
    LoRA they are the branch's own parameter names.
    """
    if not isinstance(module, PeftModel):
        return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    # save_embedding_layers=False: no embedding layer is ever adapted here, and "auto" asks the Hub whether the
    # base model has a config.json (a network call per save).
    raw = get_peft_model_state_dict(module, save_embedding_layers=False)
    state = {k: v.detach() for k, v in raw.items()}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and ".lora_" not in name and ".modules_to_save." not in name:
            state[name] = parameter.detach()
    trainable = sum(1 for p in module.parameters() if p.requires_grad)
    if len(state) != trainable:  # every trainable tensor must be saved exactly once
        raise RuntimeError(f"adapter state has {len(state)} tensors for {trainable} trainable parameters")
    return state


def save_adapter(module: nn.Module, directory: str | os.PathLike) -> Path:
    """Write one branch's adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Files are written to a temporary folder next to ``directory`` and moved into place one by one.
    """
    if not isinstance(module, PeftModel):
        raise ValueError(
            "this ensemble uses no LoRA, so there is no peft adapter to save (its heads are part of "
            "the ensemble's own weights)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(module.peft_config[module.active_adapter])
    config.inference_mode = True
    tensors = {k: v.contiguous().clone().cpu() for k, v in adapter_state_dict(module).items()}
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".adapter-"))
    try:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
