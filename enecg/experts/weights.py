"""Reading published weight files safely, and loading them strictly.

Safetensors are read directly. Pickled checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are only ever read with
``torch.load(weights_only=True)``: a file that needs arbitrary objects to unpickle is refused, naming the file.
Official loaders load non-strictly and so hide mismatches; :func:`load_state_dict_strict` reports every missing
or unexpected key instead, allowing only keys a spec explicitly expects to drop.
"""

from __future__ import annotations

import fnmatch
import json
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def _numpy_safe_globals() -> list[Any]:
    """numpy reconstructors that rebuild plain numbers and numeric arrays, nothing else.

    fairseq(-signals) checkpoints such as ECG-FM's store numpy scalars in ``extra_state``/``optimizer_history``;
    ``weights_only=True`` refuses them by default. These globals only rebuild numeric scalars, numeric dtypes and
    numeric arrays; object/void/string dtypes stay refused, so arbitrary objects still cannot be unpickled.
    """
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    allowed: list[Any] = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    refused = {"ObjectDType", "VoidDType", "StringDType", "StrDType", "BytesDType"}
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType") and name not in refused]
    return allowed


class WeightsError(RuntimeError):
    """A weights file that cannot be loaded (unsafe, corrupt, or not matching the model). One-line message."""


def read_weights(path: str | Path) -> Any:
    """Read a weights file: safetensors -> ``dict[str, Tensor]``; pickle -> whatever it holds (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix in PICKLE_SUFFIXES:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path}: refused to unpickle: the checkpoint needs objects beyond tensors and plain containers "
                f"(weights_only=True). Convert it to safetensors with trusted code. Detail: {first}"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise WeightsError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors or a torch pickle)")


def read_json_config(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path`` (a model's ``config.json``); a clear one-line error otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return value


def detect_config_folder(
    folder: str | Path, is_config: Callable[[dict[str, Any]], bool], weights_files: Sequence[str]
) -> Path | None:
    """The weights file of a Hugging Face layout folder (``config.json`` + one of ``weights_files``) whose config
    satisfies ``is_config``; None otherwise (an unreadable config is no match: detection never raises)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    try:
        if not is_config(read_json_config(config_path)):
            return None
    except WeightsError:
        return None
    return next((folder / name for name in weights_files if (folder / name).is_file()), None)


def read_state_dict_with_config(
    path: str | Path, weights_files: Sequence[str] = ("model.safetensors",)
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """The Hugging Face folder layout: a flat state dict (``path`` = the weights file, or a folder holding one of
    ``weights_files``) and the sibling ``config.json`` (None when absent). Returns (state_dict, config, weights
    path)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in weights_files if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path}: no {' or '.join(weights_files)} in the folder")
        path = found[0]
    state_dict = read_weights(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path}: expected a flat state_dict of tensors")
    config_path = path.with_name("config.json")
    config = read_json_config(config_path) if config_path.is_file() else None
    if config is not None and "enecg_family" in config:
        # An in-house expert's own config.json (enecg.experts.inhouse), not the published one: its spec carries
        # the build config inline, so there is no published config to read or check.
        config = None
    return state_dict, config, path


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    expected_unexpected: Iterable[str] = (),
    expected_missing: Iterable[str] = (),
) -> dict[str, list[str]]:
    """Load ``state_dict`` into ``model``; every key mismatch is an error unless it matches an expected pattern.

    Args:
        source: the file the weights came from (named in errors).
        expected_unexpected: glob patterns of checkpoint keys the model deliberately lacks (e.g. ``dense.*``,
            a classification head dropped for feature extraction).
        expected_missing: glob patterns of model keys the checkpoint deliberately lacks.

    Returns ``{"dropped": [...], "missing": [...]}``: the keys tolerated by the patterns, for reporting.
    """
    expected_unexpected = list(expected_unexpected)
    expected_missing = list(expected_missing)
    own = model.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict]
    bad_unexpected = [k for k in unexpected if not _matches(k, expected_unexpected)]
    bad_missing = [k for k in missing if not _matches(k, expected_missing)]
    problems = []
    if bad_missing:
        problems.append(f"{len(bad_missing)} missing key(s) {_preview(bad_missing)}")
    if bad_unexpected:
        problems.append(f"{len(bad_unexpected)} unexpected key(s) {_preview(bad_unexpected)}")
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if shape_errors:
        problems.append(f"{len(shape_errors)} shape mismatch(es) {_preview(shape_errors)}")
    if problems:
        raise WeightsError(f"{source}: checkpoint does not match the model: " + "; ".join(problems))
    kept = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(kept, strict=not missing)
    return {"dropped": sorted(unexpected), "missing": sorted(missing)}


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
