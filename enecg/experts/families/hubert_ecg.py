"""HuBERT-ECG (Edoardo-BS/hubert-ecg-{small,base,large}) as a native expert family.

The published model is a transformers ``HubertModel`` subclass with the pretraining heads ``final_proj`` (one
Linear per ensemble member) and ``label_embedding`` (one codebook Embedding per member). The Hub folders ship
``config.json`` with ``model_type: hubert_ecg`` and an ``auto_map`` pointing at remote code; registering the native
classes below with the Auto classes makes that folder load with no remote code and no interactive prompt.

Input: ``(B, leads*L)`` float32, a ``(leads, L)`` window flattened lead-major (lead 0 first), exactly like the
official dataset (``ecg.reshape(-1)``). Embedding: mean of ``last_hidden_state`` over frames (the pooling of the
official ``HuBERTForECGClassification`` when no attention mask is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, HubertConfig, HubertModel
from transformers.modeling_outputs import BaseModelOutput

from enecg.experts.family import ExpertFamily, register_family
from enecg.experts.weights import WeightsError, read_json_config, read_state_dict_with_config

MODEL_TYPE = "hubert_ecg"
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")

# Cosine-similarity temperature of the official pretraining logits (HuBERT's kappa = 0.1).
PRETRAIN_LOGIT_TEMPERATURE = 0.1

# Weight-norm naming: torch >= 2.1 (parametrizations API, what transformers writes today) vs the legacy
# ``torch.nn.utils.weight_norm`` names found in older files. Same tensors, same shapes: g (1, 1, K), v (H, H/g, K).
_POS_CONV = "encoder.pos_conv_embed.conv."
LEGACY_WEIGHT_NORM_ALIASES = {
    _POS_CONV + "weight_g": _POS_CONV + "parametrizations.weight.original0",
    _POS_CONV + "weight_v": _POS_CONV + "parametrizations.weight.original1",
}

# Config keys that describe the file, not the architecture (PreTrainedConfig.from_dict handles them itself when
# loading through the Auto classes; here the dict is passed to the constructor).
_NON_ARCHITECTURE_KEYS = ("model_type", "transformers_version", "_name_or_path")


class HuBERTECGConfig(HubertConfig):
    """``HubertConfig`` plus the pretraining-head sizes of HuBERT-ECG.

    A plain ``__init__`` (rather than new dataclass fields) keeps the class valid under transformers 4.x and 5.x.
    """

    model_type = MODEL_TYPE

    def __init__(self, ensemble_length: int = 1, vocab_sizes: list[int] | int | None = None, **kwargs: Any):
        # transformers 5 renamed torch_dtype -> dtype; accept the published spelling without a deprecation warning.
        if _TRANSFORMERS_MAJOR >= 5 and "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        super().__init__(**kwargs)
        if vocab_sizes is None:
            vocab_sizes = [100]  # the official class's default; published configs always set it
        self.ensemble_length = int(ensemble_length)
        self.vocab_sizes = (
            [int(v) for v in vocab_sizes] if isinstance(vocab_sizes, list | tuple) else [int(vocab_sizes)]
        )


class HuBERTECG(HubertModel):
    """HuBERT encoder + the HuBERT-ECG pretraining heads (state-dict compatible with the published files)."""

    config_class = HuBERTECGConfig

    def __init__(self, config: HuBERTECGConfig):
        if config.ensemble_length < 1 or config.ensemble_length != len(config.vocab_sizes):
            raise ValueError(
                f"HuBERT-ECG config: ensemble_length {config.ensemble_length} must be >= 1 and equal "
                f"len(vocab_sizes) {len(config.vocab_sizes)}"
            )
        super().__init__(config)
        # Projection of each frame into the space of ensemble member i's codebook, and the codebooks themselves.
        self.final_proj = nn.ModuleList(
            nn.Linear(config.hidden_size, config.classifier_proj_size) for _ in range(config.ensemble_length)
        )
        self.label_embedding = nn.ModuleList(
            nn.Embedding(vocab_size, config.classifier_proj_size) for vocab_size in config.vocab_sizes
        )

    def logits(self, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
        """Pretraining logits, one ``(B, T, vocab_sizes[i])`` tensor per ensemble member: cosine similarity of
        ``final_proj[i](h)`` with every codebook row, divided by the temperature 0.1."""
        outputs = []
        for projection, codebook in zip(self.final_proj, self.label_embedding):
            projected = projection(last_hidden_state)
            similarity = torch.cosine_similarity(
                projected.unsqueeze(2), codebook.weight.unsqueeze(0).unsqueeze(0), dim=-1
            )
            outputs.append(similarity / PRETRAIN_LOGIT_TEMPERATURE)
        return outputs


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel`` resolve ``model_type: hubert_ecg`` to the native classes.

    Idempotent. A registered local class means transformers never runs the ``auto_map`` remote code nor prompts
    for it; a *different* class already registered under the name is an error rather than silently replaced.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        existing = CONFIG_MAPPING[MODEL_TYPE]
        if existing is not HuBERTECGConfig:
            raise ValueError(
                f"model_type {MODEL_TYPE!r} is already registered to {existing.__module__}.{existing.__name__}"
            )
    else:
        AutoConfig.register(MODEL_TYPE, HuBERTECGConfig)
    AutoModel.register(HuBERTECGConfig, HuBERTECG, exist_ok=True)


register_auto_classes()


def _is_hubert_ecg_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return read_json_config(path).get("model_type") == MODEL_TYPE
    except WeightsError:
        return False


@register_family
class HubertECGFamily(ExpertFamily):
    """HuBERT-ECG: ``HubertModel`` + pretraining heads; embedding = frame-mean of the last hidden state."""

    name = "hubert_ecg"
    masks_padding = True

    def build(self, config: dict[str, Any]) -> HuBERTECG:
        """Build from a published ``config.json`` dict. ``ensemble_length`` and ``vocab_sizes`` must come from the
        checkpoint's own config (they fix the head shapes and are not the same for every published size)."""
        missing = [key for key in ("ensemble_length", "vocab_sizes") if key not in config]
        if missing:
            raise ValueError(
                f"HuBERT-ECG config lacks {missing}: take them from the checkpoint's config.json"
            )
        kwargs = {k: v for k, v in config.items() if k not in _NON_ARCHITECTURE_KEYS}
        model = HuBERTECG(HuBERTECGConfig(**kwargs))
        return model.eval()

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Read ``model.safetensors`` (or a folder holding it) and the sibling ``config.json`` (None if absent).
        Legacy weight-norm keys ``...conv.weight_g``/``weight_v`` are renamed to the parametrization names."""
        state_dict, config, path = read_state_dict_with_config(path, WEIGHTS_FILES)
        state_dict = self.normalize_keys(state_dict, source=str(path))
        config_path = path.with_name("config.json")
        if config is not None and config.get("model_type") != MODEL_TYPE:
            raise WeightsError(
                f"{config_path}: model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}"
            )
        return state_dict, config

    @staticmethod
    def normalize_keys(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Map legacy weight-norm names to the names ``build()`` produces; a file with both spellings is refused."""
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            new_key = LEGACY_WEIGHT_NORM_ALIASES.get(key, key)
            if new_key in renamed:
                raise WeightsError(f"{source}: holds both {key!r} and its alias {new_key!r}")
            renamed[new_key] = tensor
        return renamed

    def detect(self, folder: Path) -> Path | None:
        folder = Path(folder)
        if not _is_hubert_ecg_config(folder / "config.json"):
            return None
        for name in WEIGHTS_FILES:
            if (folder / name).is_file():
                return folder / name
        return None

    def embed(
        self, model: nn.Module, x: torch.Tensor, valid_samples: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, leads*L)`` or ``(B, leads, L)`` -> ``(B, hidden_size)``: frame-mean of ``last_hidden_state``.

        ``valid_samples`` (B,), with ``(B, leads, L)`` input: real samples per lead. A record with ``n < L`` runs
        as the official code runs a short record: its leads' ``n`` real samples concatenated lead after lead,
        with no padding at all (the feature extractor's GroupNorm normalises over the whole sequence, so padding
        could not be masked out of it; an attention mask alone would leave it there). Records of equal ``n``
        run together."""
        if valid_samples is None:
            return self.official_forward(model, _flatten_lead_major(x)).last_hidden_state.mean(dim=1)
        if x.ndim != 3:
            raise ValueError(f"HuBERT-ECG: valid_samples needs (B, leads, L) input, got shape {tuple(x.shape)}")
        valid = valid_samples.to("cpu").long()
        out = x.new_empty(x.shape[0], int(model.config.hidden_size))
        for n in torch.unique(valid).tolist():
            rows = torch.nonzero(valid == n).flatten().to(x.device)
            part = x.index_select(0, rows)[..., : int(n)]
            pooled = self.official_forward(model, _flatten_lead_major(part)).last_hidden_state.mean(dim=1)
            out[rows] = pooled.to(out.dtype)
        return out

    def embedding_dim(self, config: dict[str, Any]) -> int:
        return int(config["hidden_size"])

    def official_forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> BaseModelOutput:
        """The official call ``model(input_values=x, attention_mask=None, return_dict=True)``; pretraining logits
        are ``model.logits(out.last_hidden_state)``."""
        kwargs.setdefault("attention_mask", None)
        kwargs.setdefault("return_dict", True)
        return model(input_values=_flatten_lead_major(x), **kwargs)

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        # Attention projections and both FFN linears of every encoder layer (names unique to the encoder).
        return ["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"]


def _flatten_lead_major(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        return x.reshape(x.shape[0], -1)  # (B, leads, L) -> lead 0 first, as the official dataset does
    if x.ndim != 2:
        raise ValueError(
            f"HuBERT-ECG expects (B, leads*L) or (B, leads, L) input, got shape {tuple(x.shape)}"
        )
    return x
