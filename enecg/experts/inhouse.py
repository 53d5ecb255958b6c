"""Saving and loading *in-house* experts (models trained by this project, any family) as Hub-ready folders.

A folder (local, or a Hub model repo once uploaded) holds exactly:

- ``model.safetensors``: the module's full ``state_dict`` (safetensors, metadata ``{"format": "pt"}``);
- ``config.json``: ``{"enecg_family": <family>, "config": <the family's build config>, "enecg_version":
  <version>}``;
- ``enecg_expert.json``: the expert's adapter spec, read by the generic expert loader, with the fields
  ``name, family, weights_file, config, contract, pooling, embedding_dim, license, lora_target_modules,
  expected_unexpected_keys, description`` (see :data:`SPEC_FIELDS`);
- ``metrics.json`` (optional): evaluation results passed at save time.

Each file is written atomically and ``enecg_expert.json`` last, so a folder that has it is complete. Loading
is strict: every missing, unexpected or mis-shaped key is an error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from enecg.contract import InputContract
from enecg.experts.family import get_family
from enecg.experts.weights import WeightsError, load_state_dict_strict
from enecg.utils.files import write_text_atomic

EXPERT_SPEC_FILE = "enecg_expert.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
SPEC_FIELDS = (
    "name",
    "family",
    "weights_file",
    "config",
    "contract",
    "pooling",
    "embedding_dim",
    "license",
    "lora_target_modules",
    "expected_unexpected_keys",
    "description",
)
# "family": the family's own ``embed()`` pools (an in-house model defines its embedding itself).
DEFAULT_POOLING = "family"


def enecg_version() -> str:
    try:
        return version("enecg")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"expert config must be a mapping or a dataclass, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config))
    except TypeError as exc:
        raise TypeError(f"expert config is not JSON-serialisable: {exc}") from None


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _save_safetensors_atomic(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_rebuilds(model: nn.Module, rebuilt: nn.Module, family: str) -> None:
    """The saved config must rebuild exactly this module's parameters, or loading would fail later."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    new = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if own != new:
        differing = sorted(set(own) ^ set(new)) or sorted(k for k in own if own[k] != new[k])
        raise ValueError(
            f"family {family!r} builds a different module from this config than the one being saved "
            f"({len(differing)} differing key(s), e.g. {differing[:3]})"
        )


def save_inhouse_expert(
    model: nn.Module,
    *,
    family: str,
    config: Any,
    contract: InputContract | dict[str, Any],
    folder: str | os.PathLike,
    name: str,
    license: str = "apache-2.0",
    metrics: dict[str, Any] | None = None,
    description: str | None = None,
    pooling: str = DEFAULT_POOLING,
) -> Path:
    """Write ``model`` as an in-house expert folder (see the module docstring); returns the folder.

    Args:
        family: registered family name (e.g. ``"light"``); ``get_family(family).build(config)`` must rebuild a
            module with exactly ``model``'s state-dict keys and shapes (checked).
        config: the family's build config (mapping or dataclass), stored inline in the spec and in
            config.json.
        contract: the input contract the model was trained with.
        name: the expert's name (e.g. the Hub repo name).
        metrics: optional evaluation results, written to ``metrics.json``.
        pooling: how the embedding is pooled; ``"family"`` (default) means the family's ``embed()`` decides.
    """
    folder = Path(folder)
    family_impl = get_family(family)
    config = _config_dict(config)
    _check_rebuilds(model, family_impl.build(config), family)
    contract = contract if isinstance(contract, InputContract) else InputContract.from_dict(contract)
    spec = {
        "name": name,
        "family": family,
        "weights_file": WEIGHTS_FILE,
        "config": config,
        "contract": contract.to_dict(),
        "pooling": pooling,
        "embedding_dim": int(family_impl.embedding_dim(config)),
        "license": license,
        "lora_target_modules": list(family_impl.lora_target_modules(config)),
        "expected_unexpected_keys": [],
        "description": description or f"In-house {family} expert {name}.",
    }
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_safetensors_atomic(state_dict, folder / WEIGHTS_FILE)
    write_text_atomic(
        folder / CONFIG_FILE,
        _dump({"enecg_family": family, "config": config, "enecg_version": enecg_version()}),
    )
    if metrics is not None:
        write_text_atomic(folder / METRICS_FILE, _dump(_config_dict(metrics)))
    write_text_atomic(folder / EXPERT_SPEC_FILE, _dump(spec))  # last: its presence marks a complete folder
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_inhouse_spec(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``folder/enecg_expert.json``: exactly :data:`SPEC_FIELDS`, a plain weights file
    name."""
    path = Path(folder) / EXPERT_SPEC_FILE
    spec = _read_json(path)
    missing = [k for k in SPEC_FIELDS if k not in spec]
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if missing or unknown:
        raise ValueError(f"{path}: bad expert spec: missing fields {missing}, unknown fields {unknown}")
    weights_file = spec["weights_file"]
    # The spec may come from a downloaded repo: never let it point outside its folder.
    if (
        not isinstance(weights_file, str)
        or Path(weights_file).name != weights_file
        or weights_file in ("", "..")
    ):
        raise ValueError(
            f"{path}: weights_file must be a plain file name in the folder, got {weights_file!r}"
        )
    if not isinstance(spec["config"], dict) or not isinstance(spec["family"], str):
        raise ValueError(f"{path}: 'family' must be a string and 'config' an object")
    return spec


def read_inhouse_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Read an in-house ``config.json`` -> ``(family, config)``."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data.get("enecg_family"), str) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path}: not an enecg in-house config (needs 'enecg_family' and 'config')")
    return data["enecg_family"], data["config"]


def load_inhouse_expert_module(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Build and strictly load the expert saved in ``folder``; returns ``(module in eval mode, spec)``.

    Raises ``ValueError`` for a malformed or inconsistent folder and
    :class:`~enecg.experts.weights.WeightsError` for weights that do not match the model exactly.
    """
    folder = Path(folder)
    spec = read_inhouse_spec(folder)
    family, config = read_inhouse_config(folder / CONFIG_FILE)
    if family != spec["family"] or config != spec["config"]:
        raise ValueError(
            f"{folder}: {CONFIG_FILE} and {EXPERT_SPEC_FILE} disagree on the family or the config"
        )
    family_impl = get_family(family)
    weights_path = folder / spec["weights_file"]
    state_dict, _ = family_impl.read_checkpoint(weights_path)
    model = family_impl.build(spec["config"])
    load_state_dict_strict(
        model, state_dict, source=str(weights_path), expected_unexpected=spec["expected_unexpected_keys"]
    )
    return model.eval(), spec


__all__ = [
    "CONFIG_FILE",
    "EXPERT_SPEC_FILE",
    "METRICS_FILE",
    "SPEC_FIELDS",
    "WEIGHTS_FILE",
    "WeightsError",
    "load_inhouse_expert_module",
    "read_inhouse_config",
    "read_inhouse_spec",
    "save_inhouse_expert",
]
