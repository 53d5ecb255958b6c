"""A loaded expert: a published model behind its input contract, producing one embedding per record.

:func:`load_expert` resolves a name (see :mod:`enecg.experts.resolve`), reads the weights with the family's
``read_checkpoint`` (safetensors directly, pickles only with ``weights_only=True``), builds the native module and
loads it strictly (only the spec's expected drops are tolerated). The :class:`Expert` module then owns the whole
path from records to vectors: :meth:`Expert.prepare` applies the contract (resampling, lead order read from each
record, filters, windows, scaling), :meth:`Expert.forward` embeds every window and aggregates the windows of a
record as the contract says (ECG-FM's 5-s segments are averaged; HuBERT-ECG's leads arrive concatenated).

Experts are frozen by default: no gradients, and eval mode kept even when a parent module calls ``.train()``
(dropout/LayerDrop in a frozen feature extractor would only add noise). :meth:`Expert.unfreeze` lifts both, for
LoRA on the expert's own layers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from enecg.contract import InputContract, apply_contract_records
from enecg.experts.family import ExpertFamily, get_family
from enecg.experts.resolve import ExpertLoadError, ResolvedExpert, resolve_expert
from enecg.experts.spec import CONFIG_FROM_CHECKPOINT, CONFIG_INLINE, Spec, contract_summary
from enecg.experts.weights import WeightsError, load_state_dict_strict
from enecg.record import ECGRecord, demographics_array


@dataclass
class PreparedBatch:
    """Records prepared for one expert.

    Attributes:
        windows: float32 ``(B, n_windows, leads, length)`` (``(B, n_windows, leads*length)`` for ``concat_leads``);
            records with fewer windows than the longest are padded with all-zero windows.
        window_mask: bool ``(B, n_windows)``: False for padding windows (excluded from aggregation).
        lead_mask: bool ``(B, leads)``: False where a contract lead was missing from the record and zero-filled.
        valid_samples: int ``(B, n_windows)``: real samples per lead in each window (end padding of short
            records excluded).
    """

    windows: torch.Tensor
    window_mask: torch.Tensor
    lead_mask: torch.Tensor
    valid_samples: torch.Tensor | None = None


class Expert(nn.Module):
    """A frozen published model + its input contract. ``forward((B, n_windows, ...)) -> (B, embedding_dim)``.

    Attributes:
        name: spec name (e.g. ``'hubert-ecg-small'``).
        hub_id: Hub repo the weights came from (None for a local folder).
        revision: resolved commit sha (None for a local folder).
        spec: the adapter spec used; ``contract``: its input contract.
        family: the :class:`ExpertFamily` (stateless) that built ``model``.
        model: the native module; ``config``: the config it was built from.
        embedding_dim: size D of the embedding.
        key_report: ``{"dropped": [...], "missing": [...]}`` keys tolerated by the spec when loading.
        source: ``'hf-hub:ORG/NAME@sha'`` or ``'local-dir:PATH'``; ``weights_path``: the local weights file.
    """

    def __init__(
        self,
        *,
        spec: Spec,
        family: ExpertFamily,
        model: nn.Module,
        config: dict[str, Any],
        embedding_dim: int,
        hub_id: str | None = None,
        revision: str | None = None,
        source: str = "",
        weights_path: Path | None = None,
        key_report: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.family = family
        self.config = config
        self.embedding_dim = int(embedding_dim)
        self.hub_id = hub_id
        self.revision = revision
        self.source = source
        self.weights_path = weights_path
        self.key_report = key_report or {"dropped": [], "missing": []}
        self.frozen = True
        self.freeze()

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def contract(self) -> InputContract:
        return self.spec.contract

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def lora_target_modules(self) -> list[str]:
        """peft ``target_modules`` for LoRA on the expert's own layers: the spec's, else the family default."""
        if self.spec.lora_target_modules is not None:
            return list(self.spec.lora_target_modules)
        return list(self.family.lora_target_modules(self.config))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (identity, provenance, size, contract, key check)."""
        return {
            "name": self.name,
            "family": self.spec.family,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "source": self.source,
            "weights_file": self.spec.weights_file,
            "license": self.spec.license,
            "embedding_dim": self.embedding_dim,
            "pooling": self.spec.pooling,
            "num_parameters": self.num_parameters,
            "frozen": self.frozen,
            "contract": self.contract.to_dict(),
            "contract_summary": contract_summary(self.contract),
            "contract_digest": self.contract.digest(),
            "lora_target_modules": self.lora_target_modules,
            "keys": {
                "dropped": list(self.key_report.get("dropped", [])),
                "missing": list(self.key_report.get("missing", [])),
            },
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, family={self.spec.family!r}, dim={self.embedding_dim}, frozen={self.frozen}"
        )

    # ------------------------------------------------------------------ freezing

    def freeze(self) -> Expert:
        """No gradients for the model's parameters, eval mode kept through ``.train()``, forward under no_grad."""
        self.frozen = True
        self.model.requires_grad_(False)
        self.model.eval()
        return self

    def unfreeze(self, *, parameters: bool = True) -> Expert:
        """Let ``.train()`` reach the model and gradients flow through it (for LoRA on expert layers).

        Args:
            parameters: also set ``requires_grad=True`` on the base parameters. Pass False when peft will inject
                trainable adapters and the base weights must stay fixed.
        """
        self.frozen = False
        if parameters:
            self.model.requires_grad_(True)
        self.model.train(self.training)
        return self

    def train(self, mode: bool = True) -> Expert:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen expert is a fixed feature extractor: no dropout / LayerDrop, ever
        return self

    def _grad_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    # ------------------------------------------------------------------ data path

    def prepare(self, records: ECGRecord | Sequence[ECGRecord]) -> torch.Tensor:
        """Apply the contract to each record -> windows ``(B, n_windows, ...)`` (see :meth:`prepare_batch`)."""
        return self.prepare_batch(records).windows

    def prepare_batch(self, records: ECGRecord | Sequence[ECGRecord]) -> PreparedBatch:
        """Apply the contract to each record (lead order read from the record) and stack the windows.

        Records yielding different numbers of windows (``segments`` contracts, different durations) are padded
        with zero windows, marked False in ``window_mask``."""
        if isinstance(records, ECGRecord):
            records = [records]
        if not records:
            raise ValueError(f"{self.name}: prepare() needs at least one record")
        stacked = apply_contract_records(records, self.contract)
        return PreparedBatch(
            windows=torch.from_numpy(stacked.windows),
            window_mask=torch.from_numpy(stacked.window_mask),
            lead_mask=torch.from_numpy(stacked.lead_mask),
            valid_samples=torch.from_numpy(stacked.valid_samples),
        )

    @property
    def uses_demographics(self) -> bool:
        """Whether the expert fuses (age, sex) into its embedding (in-house light CNNs built with demographics)."""
        check = getattr(self.family, "uses_demographics", None)
        return bool(check(self.config)) if check is not None else False

    def forward(
        self,
        windows: torch.Tensor,
        window_mask: torch.Tensor | None = None,
        demographics: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
        valid_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed prepared windows ``(B, n_windows, ...)`` -> ``(B, embedding_dim)``.

        Every window goes through ``family.embed`` in one batch of ``B * n_windows``; the windows of a record are
        then combined with the contract's aggregation (mean or max), skipping windows where ``window_mask`` is
        False. ``demographics`` ``(B, 2)`` = (age years, sex 0/1, NaN unknown) reach experts that fuse them; other
        experts ignore them. ``lead_mask`` ``(B, leads)`` (False: zero-filled missing lead) and ``valid_samples``
        ``(B, n_windows)`` (real samples per lead) reach families that can keep missing leads / end padding out
        of their computation (:attr:`~enecg.experts.family.ExpertFamily.masks_missing_leads`, ``masks_padding``);
        other families see the zero-filled, zero-padded windows as the contract made them. A frozen expert runs
        under ``torch.no_grad()``."""
        if windows.ndim < 3:
            raise ValueError(
                f"{self.name}: forward expects prepared windows (B, n_windows, ...), got shape {tuple(windows.shape)}"
                " (use embed() for records)"
            )
        batch, n_windows = windows.shape[:2]
        reference = next(self.model.parameters(), None)
        if reference is not None:
            windows = windows.to(device=reference.device, dtype=reference.dtype)
        extra: dict[str, torch.Tensor] = {}
        if self.uses_demographics:
            if demographics is None:
                raise ValueError(f"{self.name}: this expert fuses age/sex: pass demographics (B, 2) (NaN = unknown)")
            # Every window of a record carries that record's demographics.
            demographics = demographics.to(windows.device, windows.dtype)
            extra["demographics"] = demographics.repeat_interleave(n_windows, dim=0)
        flat_windows = windows.reshape(batch * n_windows, *windows.shape[2:])
        extra.update(self._mask_arguments(flat_windows, n_windows, lead_mask, valid_samples))
        if "valid_samples" in extra and self.contract.layout == "concat_leads":
            # Hand the family whole leads, so it can cut each lead's padding (lead after lead is C order).
            flat_windows = flat_windows.reshape(batch * n_windows, -1, self.contract.length)
        with self._grad_context():
            flat = self.family.embed(self.model, flat_windows, **extra)
            if flat.shape != (batch * n_windows, self.embedding_dim):
                raise RuntimeError(
                    f"{self.name}: family {self.spec.family!r} embed returned shape {tuple(flat.shape)}, expected "
                    f"({batch * n_windows}, {self.embedding_dim})"
                )
            per_window = flat.reshape(batch, n_windows, self.embedding_dim)
            return _aggregate(per_window, window_mask, self.contract.aggregation)

    def _mask_arguments(
        self,
        flat_windows: torch.Tensor,
        n_windows: int,
        lead_mask: torch.Tensor | None,
        valid_samples: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Per-window ``lead_mask`` / ``valid_samples`` for a family that uses them, only when something is
        actually missing or padded (full records take the family's plain, official path)."""
        out: dict[str, torch.Tensor] = {}
        device = flat_windows.device
        if lead_mask is not None and self.family.masks_missing_leads and not bool(lead_mask.all()):
            out["lead_mask"] = lead_mask.to(device=device, dtype=torch.bool).repeat_interleave(n_windows, dim=0)
        length = self.contract.length
        if (
            valid_samples is not None
            and self.family.masks_padding
            and length is not None
            and bool((valid_samples < length).any())
        ):
            out["valid_samples"] = valid_samples.to(device=device, dtype=torch.long).reshape(-1)
        return out

    def embed(self, inputs: ECGRecord | Sequence[ECGRecord] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings ``(B, D)`` of records (contract applied) or of already prepared windows, under no_grad."""
        with torch.no_grad():
            if isinstance(inputs, (torch.Tensor, np.ndarray)):
                return self.forward(torch.as_tensor(inputs))
            records = [inputs] if isinstance(inputs, ECGRecord) else list(inputs)
            batch = self.prepare_batch(records)
            demographics = None
            if self.uses_demographics:
                demographics = torch.from_numpy(demographics_array(records))
            return self.forward(
                batch.windows, batch.window_mask, demographics, batch.lead_mask, batch.valid_samples
            )

    def official_forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """The official model's raw forward on model-layout input (for parity tests), via the family."""
        with self._grad_context():
            return self.family.official_forward(self.model, x, **kwargs)

    def named_lora_targets(self) -> Iterator[str]:
        """Module names in ``model`` matched by :attr:`lora_target_modules` (suffix match, as peft does)."""
        targets = self.lora_target_modules
        for name, _ in self.model.named_modules():
            if any(name == t or name.endswith("." + t) for t in targets):
                yield name


def _aggregate(per_window: torch.Tensor, window_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if window_mask is None:
        return per_window.mean(dim=1) if how == "mean" else per_window.amax(dim=1)
    mask = window_mask.to(device=per_window.device, dtype=torch.bool)
    if mask.shape != per_window.shape[:2]:
        raise ValueError(
            f"window_mask shape {tuple(mask.shape)} does not match windows {tuple(per_window.shape[:2])}"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every record needs at least one real window (window_mask row all False)")
    if how == "mean":
        weights = mask.to(per_window.dtype).unsqueeze(-1)
        return (per_window * weights).sum(dim=1) / weights.sum(dim=1)
    return per_window.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


# ---------------------------------------------------------------------- loading


def load_expert(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    spec: Spec | str | Path | None = None,
) -> Expert:
    """Load a frozen expert by spec name, Hub ID, ``hf-hub:``/``local-dir:`` name or folder.

    See :func:`enecg.experts.resolve.resolve_expert` for names and Hub options. Errors are one line each:
    :class:`ExpertLoadError` (revision / file / repo not found, offline cache miss, bad config) or
    :class:`~enecg.experts.weights.WeightsError` (unsafe pickle, missing/unexpected keys, shape mismatch), both
    naming the repo or file."""
    resolved = resolve_expert(
        name_or_path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        spec=spec,
    )
    return build_expert(resolved)


def build_expert(resolved: ResolvedExpert) -> Expert:
    """Read, build and strictly load the model for already resolved files."""
    spec = resolved.spec
    try:
        family = get_family(spec.family)
    except KeyError as exc:
        raise ExpertLoadError(f"spec {spec.name!r}: {exc.args[0]}") from None
    state_dict, file_config = family.read_checkpoint(resolved.weights_path)
    config = _model_config(resolved, file_config)
    try:
        model = family.build(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ExpertLoadError(
            f"{resolved.weights_path}: cannot build family {spec.family!r} from the config "
            f"({spec.config_from}): {_first_line(exc)}"
        ) from exc
    report = load_state_dict_strict(
        model,
        state_dict,
        source=str(resolved.weights_path),
        expected_unexpected=spec.expected_unexpected_keys,
        expected_missing=spec.expected_missing_keys,
    )
    dim = int(family.embedding_dim(config))
    if spec.embedding_dim is not None and spec.embedding_dim != dim:
        raise WeightsError(
            f"{resolved.weights_path}: spec {spec.name!r} says embedding_dim {spec.embedding_dim} but the "
            f"checkpoint's config gives {dim}"
        )
    return Expert(
        spec=spec,
        family=family,
        model=model,
        config=config,
        embedding_dim=dim,
        hub_id=resolved.hub_id,
        revision=resolved.revision,
        source=resolved.source,
        weights_path=resolved.weights_path,
        key_report=report,
    )


def _model_config(resolved: ResolvedExpert, file_config: dict[str, Any] | None) -> dict[str, Any]:
    """The constructor config the spec asks for: inline, from the checkpoint, or from a repo JSON file; the
    spec's ``config`` entries override the latter two (shallow)."""
    spec = resolved.spec
    if spec.config_from == CONFIG_INLINE:
        return dict(spec.config)
    if spec.config_from == CONFIG_FROM_CHECKPOINT:
        if file_config is None:
            raise ExpertLoadError(
                f"{resolved.weights_path}: spec {spec.name!r} reads the config from the checkpoint, but the "
                f"{spec.family!r} family found none in it"
            )
        base = dict(file_config)
    else:
        path = resolved.files.get(spec.config_from) or resolved.folder / spec.config_from
        try:
            base = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ExpertLoadError(
                f"{path}: config file {spec.config_from!r} named by spec {spec.name!r} not found"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ExpertLoadError(f"{path}: not a readable JSON config ({_first_line(exc)})") from None
        if not isinstance(base, dict):
            raise ExpertLoadError(f"{path}: config must be a JSON object")
    base.update(spec.config)
    return base


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
