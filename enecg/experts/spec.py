"""Adapter specs: one file per published model, naming everything needed to load it and feed it correctly.

A spec says *which* weights to load (Hub ID, file in the repo, default revision), *how* to build the module
(family + constructor config, inline or read from the checkpoint / a JSON file in the repo), *how* to feed it (the
:class:`~enecg.contract.InputContract`), what it outputs (pooling, embedding size), under which licence, which
layers LoRA adapts by default, and which checkpoint keys are expected to be dropped when loading strictly.

Bundled specs live in ``adapters/*.yaml`` (installed as the package ``enecg.adapters``). An in-house expert repo
carries its own spec as :data:`SPEC_FILENAME` (``enecg_expert.json``, same schema). Adding a new published model of
a known family is one spec file.

Schema (keys; anything else is an error naming the file)::

    name: hubert-ecg-small             # lower-case id, unique among bundled specs
    description: ...                   # optional, one line
    family: hubert_ecg                 # a registered ExpertFamily
    hub_id: Edoardo-BS/hubert-ecg-small
    revision: main                     # default revision (branch, tag or commit sha)
    weights_file: model.safetensors    # file inside the repo
    extra_files: [config.json]         # other files to fetch with it
    default_for_repo: false            # the spec used when several share a Hub ID and the ID alone is given
    config_from: config.json           # inline | checkpoint | <a .json file in the repo>
    config: {}                         # inline config, or shallow overrides on top of config_from
    contract: {...}              # InputContract.from_dict
    pooling: mean                      # how the family pools to one vector (documentation; the family does it)
    embedding_dim: 512                 # checked against the family's embedding_dim(config) at load
    license: cc-by-nc-4.0              # SPDX-like id
    lora_target_modules: [...]         # optional: default peft target_modules (else the family's default)
    expected_unexpected_keys: [...]    # glob patterns of checkpoint keys the built module does not have
    expected_missing_keys: [...]       # glob patterns of module keys the checkpoint does not have
    reference: https://...             # optional: paper / model card
    notes: ...                         # optional: provenance and caveats
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from enecg.contract import InputContract
from enecg.utils.files import write_text_atomic

SPEC_FILENAME = "enecg_expert.json"
"""The spec an in-house expert repo / folder carries next to its weights (same schema as the YAML specs)."""

CONFIG_INLINE = "inline"
CONFIG_FROM_CHECKPOINT = "checkpoint"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """An invalid adapter spec. The message names the spec file (or source) and the problem on one line."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


@dataclass(frozen=True)
class Spec:
    """How to load, build and feed one published expert model. See the module docstring for the file schema."""

    name: str = field(
        metadata={"help": "Short lower-case id (e.g. 'hubert-ecg-small'); a load_expert() name."}
    )
    family: str = field(
        metadata={"help": "Registered ExpertFamily name (net1d, hubert_ecg, ecg_fm, moment, mantis, light)."}
    )
    weights_file: str = field(metadata={"help": "Weights file inside the repo / folder."})
    contract: InputContract = field(metadata={"help": "How records must be prepared for this model."})
    license: str = field(
        metadata={"help": "SPDX-like licence id of the weights (e.g. 'mit', 'cc-by-nc-4.0')."}
    )
    hub_id: str | None = field(
        default=None, metadata={"help": "Hugging Face Hub repo 'ORG/NAME' (None: local-only expert)."}
    )
    revision: str = field(default="main", metadata={"help": "Default revision: branch, tag or commit sha."})
    extra_files: tuple[str, ...] = field(
        default=(), metadata={"help": "Other repo files fetched with the weights (e.g. config.json)."}
    )
    default_for_repo: bool = field(
        default=False,
        metadata={"help": "When several specs share hub_id, this one is used when only the Hub ID is given."},
    )
    config_from: str = field(
        default=CONFIG_INLINE,
        metadata={
            "help": "'inline' (use `config`), 'checkpoint' (config stored in the weights file), or a JSON "
            "file in the repo (e.g. 'config.json'); `config` entries then override it (shallow)."
        },
    )
    config: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Constructor config (inline) or overrides on top of config_from."},
    )
    pooling: str = field(
        default="mean", metadata={"help": "How the family pools frames to one vector (documentation)."}
    )
    embedding_dim: int | None = field(
        default=None,
        metadata={"help": "Embedding size D; checked against the family at load (None: not checked)."},
    )
    lora_target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "peft target_modules for LoRA on expert layers (None: family default)."},
    )
    expected_unexpected_keys: tuple[str, ...] = field(
        default=(), metadata={"help": "Glob patterns of checkpoint keys the built module deliberately lacks."}
    )
    expected_missing_keys: tuple[str, ...] = field(
        default=(), metadata={"help": "Glob patterns of module keys the checkpoint deliberately lacks."}
    )
    description: str = field(default="", metadata={"help": "One-line description."})
    reference: str = field(default="", metadata={"help": "Paper or model-card URL."})
    notes: str = field(default="", metadata={"help": "Provenance and caveats."})

    # ------------------------------------------------------------------ construction / serialisation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<spec>") -> Spec:
        """Validate and build a spec; every problem raises :class:`SpecError` naming ``source``."""
        if not isinstance(data, Mapping):
            raise SpecError(source, f"a spec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(source, f"unknown spec key(s) {unknown}; known: {sorted(known)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        absent = [k for k in required if data.get(k) in (None, "")]
        if absent:
            raise SpecError(source, f"missing required spec key(s) {absent}")

        values: dict[str, Any] = {}
        for key in ("name", "family", "weights_file", "license", "revision", "config_from", "pooling"):
            if key in data:
                values[key] = _string(data[key], key, source)
        for key in ("description", "reference", "notes"):
            if data.get(key) is not None:
                values[key] = _string(data[key], key, source, allow_empty=True)
        if data.get("hub_id") is not None:
            values["hub_id"] = _string(data["hub_id"], "hub_id", source)
        for key in ("extra_files", "expected_unexpected_keys", "expected_missing_keys"):
            if data.get(key) is not None:
                values[key] = _string_tuple(data[key], key, source)
        if data.get("lora_target_modules") is not None:
            values["lora_target_modules"] = _string_tuple(
                data["lora_target_modules"], "lora_target_modules", source
            )
        if "default_for_repo" in data:
            if not isinstance(data["default_for_repo"], bool):
                raise SpecError(
                    source, f"default_for_repo must be true or false, got {data['default_for_repo']!r}"
                )
            values["default_for_repo"] = data["default_for_repo"]
        if data.get("embedding_dim") is not None:
            dim = data["embedding_dim"]
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise SpecError(source, f"embedding_dim must be a positive integer, got {dim!r}")
            values["embedding_dim"] = dim
        config = data.get("config") or {}
        if not isinstance(config, Mapping):
            raise SpecError(source, f"config must be a mapping, got {type(config).__name__}")
        values["config"] = dict(config)
        values["contract"] = _contract(data["contract"], source)

        spec = cls(**values)
        spec._check(source)
        return spec

    def _check(self, source: str) -> None:
        if not _NAME_RE.match(self.name):
            raise SpecError(source, f"name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if self.hub_id is not None and not _HUB_ID_RE.match(self.hub_id):
            raise SpecError(source, f"hub_id {self.hub_id!r} is not a Hub repo id of the form 'ORG/NAME'")
        for key, path in [("weights_file", self.weights_file)] + [
            ("extra_files", p) for p in self.extra_files
        ]:
            if Path(path).is_absolute() or ".." in Path(path).parts:
                raise SpecError(source, f"{key} {path!r} must be a relative path inside the repo")
        if self.config_from not in (CONFIG_INLINE, CONFIG_FROM_CHECKPOINT) and not self.config_from.endswith(
            ".json"
        ):
            raise SpecError(
                source,
                f"config_from {self.config_from!r} must be 'inline', 'checkpoint' or a .json file in the repo",
            )
        if self.config_from == CONFIG_INLINE and not self.config:
            raise SpecError(source, "config_from is 'inline' but no config is given")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Spec:
        """Read a YAML spec file (errors name the file)."""
        return cls.from_dict(_read_mapping(Path(path), yaml.safe_load), source=str(path))

    @classmethod
    def from_json(cls, path: str | Path) -> Spec:
        """Read a JSON spec (an in-house repo's ``enecg_expert.json``)."""
        return cls.from_dict(_read_mapping(Path(path), json.loads), source=str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> Spec:
        """Read a ``.yaml``/``.yml`` or ``.json`` spec file."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(path)
        if path.suffix == ".json":
            return cls.from_json(path)
        raise SpecError(str(path), "a spec file must end in .yaml, .yml or .json")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready mapping; ``Spec.from_dict(spec.to_dict()) == spec``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "contract":
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = json.loads(json.dumps(dict(value)))  # deep plain copy
            out[f.name] = value
        return out

    def save_json(self, path: str | Path) -> None:
        """Write the spec as JSON atomically (e.g. ``<repo>/enecg_expert.json``)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def replace(self, **changes: Any) -> Spec:
        """A copy with some fields changed (validated like a file)."""
        data = self.to_dict()
        for key, value in changes.items():
            data[key] = value.to_dict() if isinstance(value, InputContract) else value
        return Spec.from_dict(data, source=f"spec {self.name!r}")

    # ------------------------------------------------------------------ helpers

    @property
    def config_file(self) -> str | None:
        """The repo JSON file the config is read from, if any."""
        return None if self.config_from in (CONFIG_INLINE, CONFIG_FROM_CHECKPOINT) else self.config_from

    @property
    def required_files(self) -> tuple[str, ...]:
        """Every repo file loading needs: weights, extra files and the config file (deduplicated, ordered)."""
        files = [self.weights_file, *self.extra_files]
        if self.config_file:
            files.append(self.config_file)
        return tuple(dict.fromkeys(files))

    def __hash__(self) -> int:  # `config` is a dict; hash by the serialised form
        return hash(json.dumps(self.to_dict(), sort_keys=True))


# ---------------------------------------------------------------------- bundled specs


def bundled_spec_dir() -> Path:
    """Folder holding the bundled ``*.yaml`` specs: the top-level ``adapters/`` beside this source tree when enecg
    runs from a checkout, else the installed ``enecg.adapters`` package."""
    # The checkout's own folder first: an editable install maps enecg.adapters to the checkout it was made from,
    # which is another tree when this one is imported via PYTHONPATH (e.g. a git worktree).
    checkout = Path(__file__).resolve().parents[2] / "adapters"
    if (checkout / "__init__.py").is_file() and any(checkout.glob("*.yaml")):
        return checkout
    try:
        return Path(str(importlib.resources.files("enecg.adapters")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "adapters"


@lru_cache(maxsize=1)
def _bundled_specs_cached(folder: str) -> tuple[Spec, ...]:
    specs: list[Spec] = []
    seen: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        spec = Spec.from_yaml(path)
        if spec.name in seen:
            raise SpecError(str(path), f"spec name {spec.name!r} already used by {seen[spec.name]}")
        seen[spec.name] = str(path)
        specs.append(spec)
    return tuple(specs)


def bundled_specs() -> dict[str, Spec]:
    """All bundled specs by name (sorted)."""
    return {spec.name: spec for spec in _bundled_specs_cached(str(bundled_spec_dir()))}


def bundled_spec(name: str) -> Spec:
    """The bundled spec called ``name``; KeyError listing the known names otherwise."""
    specs = bundled_specs()
    try:
        return specs[name]
    except KeyError:
        raise KeyError(f"no bundled adapter spec {name!r}; known: {sorted(specs)}") from None


def specs_for_hub_id(hub_id: str) -> list[Spec]:
    """Bundled specs whose ``hub_id`` is ``hub_id`` (case-insensitive, as the Hub treats repo ids)."""
    return [
        s for s in bundled_specs().values() if s.hub_id is not None and s.hub_id.lower() == hub_id.lower()
    ]


def default_spec_for_hub_id(hub_id: str) -> Spec | None:
    """The bundled spec to use when only ``hub_id`` is given: the only one, or the one marked
    ``default_for_repo``. None when no bundled spec names the repo; SpecError when the choice is ambiguous."""
    candidates = specs_for_hub_id(hub_id)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    defaults = [s for s in candidates if s.default_for_repo]
    if len(defaults) == 1:
        return defaults[0]
    names = sorted(s.name for s in candidates)
    raise SpecError(hub_id, f"the repo holds several models ({', '.join(names)}); load one by its spec name")


def contract_summary(contract: InputContract) -> str:
    """Short human summary, e.g. ``'500 Hz, 12 leads, 2500 samples, segments(mean), zscore_lead'``."""
    parts = [f"{contract.fs:g} Hz" if contract.fs else "native rate"]
    if contract.leads is None:
        parts.append("record's leads")
    elif len(contract.leads) <= 2:
        parts.append("leads " + ",".join(contract.leads))
    else:
        parts.append(f"{len(contract.leads)} leads")
    if contract.leads is not None and (contract.min_leads or 1) > 1:
        parts.append(f"needs {contract.min_leads}")
    if contract.required_leads:
        parts.append("requires " + ",".join(contract.required_leads))
    if contract.length:
        parts.append(f"{contract.length} samples")
        if contract.long_records == "segments":
            cap = f" x<={contract.max_segments}" if contract.max_segments else ""
            parts.append(f"segments{cap}({contract.aggregation})")
        else:
            parts.append(contract.long_records)
    if contract.layout == "concat_leads":
        parts.append("concat_leads")
    filters = []
    if contract.notch:
        filters.append(f"notch {contract.notch:g}")
    if contract.bandpass:
        filters.append(f"{contract.bandpass_design} {contract.bandpass[0]:g}-{contract.bandpass[1]:g} Hz")
    if contract.baseline != "none":
        filters.append(f"{contract.baseline} baseline")
    parts.extend(filters)
    if contract.zero_constant_leads:
        parts.append("zero_constant_leads")
    parts.append(contract.scaling)
    return ", ".join(parts)


# ---------------------------------------------------------------------- parsing helpers


def _read_mapping(path: Path, loader: Any) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), "spec file not found") from None
    except OSError as exc:
        raise SpecError(str(path), f"cannot read spec file ({exc.strerror or exc})") from None
    try:
        return loader(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = " ".join(str(exc).split())
        raise SpecError(
            str(path), f"not valid {'JSON' if loader is json.loads else 'YAML'}: {first}"
        ) from None


def _string(value: Any, key: str, source: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise SpecError(source, f"{key} must be a non-empty string, got {value!r}")
    return value.strip() if not allow_empty else value


def _string_tuple(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise SpecError(source, f"{key} must be a list of strings, got {value!r}")
    if not all(isinstance(item, str) and item for item in value):
        raise SpecError(source, f"{key} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _contract(value: Any, source: str) -> InputContract:
    if isinstance(value, InputContract):
        return value
    if not isinstance(value, Mapping):
        raise SpecError(source, f"contract must be a mapping, got {type(value).__name__}")
    try:
        contract = InputContract.from_dict(dict(value))
    except (TypeError, ValueError) as exc:  # InputContract validates every field with a one-line message
        raise SpecError(source, f"invalid contract: {exc}") from None
    if contract.layout == "concat_leads" and (contract.leads is None or contract.length is None):
        raise SpecError(source, "invalid contract: layout concat_leads needs explicit leads and length")
    return contract
