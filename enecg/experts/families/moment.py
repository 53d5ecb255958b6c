"""MOMENT (AutonLab/MOMENT-1-{small,base,large}) as a native expert family.

The published checkpoints are ``PyTorchModelHubMixin`` folders written by the official ``MOMENTPipeline``:
``config.json`` (the MOMENT config dict, with the T5 hyper-parameters under ``t5_config``) and ``model.safetensors``
(the reconstruction-task model, so it includes the pretraining head ``head.linear``). This module rebuilds the same
network natively: RevIN instance normalisation under the input mask -> non-overlapping patches -> patch embedding
(linear value embedding, learned mask embedding, sinusoidal positions) -> a transformers ``T5Stack`` encoder built
from ``t5_config`` (``transformer_backbone`` is only a label: nothing is downloaded) -> reconstruction head.

Input: ``x_enc`` ``(B, C, seq_len)`` float32, optional ``input_mask`` ``(B, seq_len)`` with 1 = observed (shorter
series are left-padded with 0 in the mask). Channels are encoded independently (channel-independence); the
official embedding is the mean over channels, then the mean over fully observed patches.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from enecg.experts.family import ExpertFamily, register_family
from enecg.experts.weights import (
    WeightsError,
    detect_config_folder,
    read_state_dict_with_config,
)

MODEL_NAME = "MOMENT"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")

# The official pretraining mask generator is built as ``Masking(mask_ratio=...)``, i.e. with Masking's default
# patch length of 8 whatever ``config.patch_len`` is; reproduced so reconstruction matches the official output.
PRETRAIN_MASK_PATCH_LEN = 8
# Length of the stored sinusoidal position table (``patch_embedding.position_embedding.pe``: (1, 5000, d_model)).
MAX_POSITIONS = 5000
REVIN_EPS = 1e-5


@dataclass
class MomentConfig:
    """The architecture fields of a MOMENT ``config.json`` (after merging ``model_kwargs``, as the official code
    does). Other keys (``model_name``, ``device``, ``transformer_backbone``, freezing flags...) do not change the
    network and are ignored."""

    t5_config: dict[str, Any] = field(
        metadata={"help": "T5 hyper-parameters of the encoder (a T5Config dict)."}
    )
    seq_len: int = field(
        default=512, metadata={"help": "Input length in samples the model was pretrained on."}
    )
    patch_len: int = field(default=8, metadata={"help": "Samples per patch (one token per patch)."})
    patch_stride_len: int = field(default=8, metadata={"help": "Patch stride; must equal patch_len."})
    d_model: int | None = field(default=None, metadata={"help": "Token width; None = t5_config['d_model']."})
    transformer_type: str = field(
        default="encoder_only", metadata={"help": "Only 'encoder_only' is published."}
    )
    task_name: str = field(default="reconstruction", metadata={"help": "Task the checkpoint was saved for."})
    revin_affine: bool = field(
        default=False, metadata={"help": "Learnable RevIN affine (absent in releases)."}
    )
    add_positional_embedding: bool = field(default=True, metadata={"help": "Add the sinusoidal table."})
    value_embedding_bias: bool = field(default=False, metadata={"help": "Bias in the patch value embedding."})
    patch_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on patch embeddings (training only)."}
    )
    head_dropout: float = field(default=0.1, metadata={"help": "Dropout before the head (training only)."})
    mask_ratio: float = field(
        default=0.0, metadata={"help": "Pretraining patch-mask ratio in reconstruction."}
    )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MomentConfig:
        merged = {**config, **(config.get("model_kwargs") or {})}
        if "t5_config" not in merged:
            raise ValueError("MOMENT config lacks 't5_config' (the published config.json always has it)")
        known = {f.name for f in fields(cls)}
        result = cls(**{k: v for k, v in merged.items() if k in known})
        t5_width = int(result.t5_config["d_model"])
        if result.d_model is None:
            result.d_model = t5_width
        elif int(result.d_model) != t5_width:
            raise ValueError(f"MOMENT config: d_model {result.d_model} != t5_config d_model {t5_width}")
        if result.transformer_type != "encoder_only":
            raise ValueError(
                f"MOMENT config: transformer_type {result.transformer_type!r} unsupported (encoder_only)"
            )
        if result.patch_stride_len != result.patch_len:
            # The official masks are cut with stride = patch_len, so other strides cannot run there either.
            raise ValueError(
                f"MOMENT config: patch_stride_len {result.patch_stride_len} != patch_len {result.patch_len}"
            )
        return result


def patch_observed(mask: torch.Tensor, patch_len: int) -> torch.Tensor:
    """``(B, L)`` sample mask -> ``(B, L // patch_len)`` long: 1 where every sample of the patch is observed."""
    return (mask.unfold(-1, patch_len, patch_len).sum(dim=-1) == patch_len).long()


class RevIN(nn.Module):
    """Reversible instance normalisation over time, per (record, channel), using only observed samples.

    Stateless (returns the statistics) rather than storing them on the module as the official code does, so a
    shared model is safe to call from several places. Population std (no Bessel correction) + eps, as official.
    """

    def __init__(self, affine: bool = False, eps: float = REVIN_EPS):
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:  # num_features=1 in MOMENT: one scalar pair shared by all channels
            self.affine_weight = nn.Parameter(torch.ones(1, 1, 1))
            self.affine_bias = nn.Parameter(torch.zeros(1, 1, 1))

    def normalize(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, C, L), ``mask`` (B, L) -> (normalised x, mean (B, C, 1), std (B, C, 1))."""
        observed = mask.unsqueeze(1).expand_as(x).bool()
        masked = torch.where(observed, x, torch.full_like(x, float("nan")))
        mean = torch.nanmean(masked, dim=-1, keepdim=True)
        std = torch.nanmean((masked - mean).square(), dim=-1, keepdim=True).sqrt() + self.eps
        out = (x - mean) / std
        if self.affine:
            out = out * self.affine_weight + self.affine_bias
        return out, mean.detach(), std.detach()

    def denormalize(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        if self.affine:
            x = (x - self.affine_bias) / (self.affine_weight + self.eps * self.eps)
        return x * std + mean


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine table stored as the persistent buffer ``pe`` (1, MAX_POSITIONS, d_model)."""

    def __init__(self, d_model: int, max_len: int = MAX_POSITIONS):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model)
        )
        pe = torch.zeros(max_len, d_model, dtype=torch.float32)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, n_patches: int) -> torch.Tensor:
        return self.pe[:, :n_patches]


class PatchEmbedding(nn.Module):
    """Patches (B, C, N, patch_len) -> tokens (B, C, N, d_model); unobserved patches get ``mask_embedding``."""

    def __init__(self, config: MomentConfig):
        super().__init__()
        self.patch_len = config.patch_len
        self.mask_embedding = nn.Parameter(torch.zeros(config.d_model))
        self.value_embedding = nn.Linear(config.patch_len, config.d_model, bias=config.value_embedding_bias)
        self.position_embedding = (
            SinusoidalPositions(config.d_model) if config.add_positional_embedding else None
        )
        self.dropout = nn.Dropout(config.patch_dropout)

    def forward(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = patch_observed(mask, self.patch_len)[:, None, :, None].to(patches.dtype)  # (B, 1, N, 1)
        tokens = keep * self.value_embedding(patches) + (1 - keep) * self.mask_embedding
        if self.position_embedding is not None:
            tokens = tokens + self.position_embedding(tokens.shape[2])
        return self.dropout(tokens)


class PretrainHead(nn.Module):
    """Reconstruction head: each token back to its patch's samples, (B, C, N, d) -> (B, C, N * patch_len)."""

    def __init__(self, config: MomentConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.head_dropout)
        self.linear = nn.Linear(config.d_model, config.patch_len)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(tokens)).flatten(start_dim=2, end_dim=3)


def build_t5_encoder(t5_config: dict[str, Any]) -> T5Stack:
    """The encoder stack of ``T5EncoderModel`` (keys ``block.*``, ``embed_tokens``, ``final_layer_norm``).

    ``embed_tokens`` is stored in the published files although MOMENT feeds ``inputs_embeds``; it is kept so they
    load strictly. Only block 0 owns the relative-attention bias (shared by all blocks), as in T5.
    """
    config = T5Config.from_dict(dict(t5_config))
    config.is_decoder = False
    config.use_cache = False
    config.is_encoder_decoder = False
    # transformers 4.x takes the token embedding as an argument (and leaves it None otherwise); 5.x builds it.
    if "embed_tokens" in inspect.signature(T5Stack.__init__).parameters:
        return T5Stack(config, nn.Embedding(config.vocab_size, config.d_model))
    return T5Stack(config)


class MomentModel(nn.Module):
    """Native MOMENT (state-dict compatible with ``MOMENTPipeline`` in the reconstruction task)."""

    def __init__(self, config: MomentConfig):
        super().__init__()
        self.config = config
        self.normalizer = RevIN(affine=config.revin_affine)
        self.patch_embedding = PatchEmbedding(config)
        self.encoder = build_t5_encoder(config.t5_config)
        self.head = PretrainHead(config)

    def _encode(
        self, x_enc: torch.Tensor, input_mask: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised ``x_enc`` (B, C, L) -> encoder output (B, C, N, d). ``token_mask`` (B, L) selects which
        patches get the mask embedding; padding (``input_mask``) is excluded from attention."""
        batch, channels, _ = x_enc.shape
        patches = x_enc.unfold(-1, self.config.patch_len, self.config.patch_stride_len)
        tokens = self.patch_embedding(patches, mask=token_mask)
        n_patches = tokens.shape[2]
        tokens = tokens.reshape(batch * channels, n_patches, self.config.d_model)  # channel-independent
        attention_mask = patch_observed(input_mask, self.config.patch_len).repeat_interleave(channels, dim=0)
        hidden = self.encoder(inputs_embeds=tokens, attention_mask=attention_mask).last_hidden_state
        return hidden.reshape(batch, channels, n_patches, self.config.d_model)

    @staticmethod
    def _default_mask(x_enc: torch.Tensor, input_mask: torch.Tensor | None) -> torch.Tensor:
        if input_mask is None:
            return torch.ones(x_enc.shape[0], x_enc.shape[-1], dtype=x_enc.dtype, device=x_enc.device)
        return input_mask.to(device=x_enc.device, dtype=x_enc.dtype)

    def embed(
        self,
        x_enc: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        reduction: str = "mean",
        channel_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Official ``embed``: ``reduction="mean"`` -> (B, d) (mean over channels, then over fully observed
        patches); ``"none"`` -> (B, C, N, d).

        ``channel_mask`` (B, C) bool (enecg's addition; None = all real) restricts the channel mean to the real
        channels. Channels are encoded independently, so the result equals the official embedding of the real
        channels alone."""
        input_mask = self._default_mask(x_enc, input_mask)
        normalised, _, _ = self.normalizer.normalize(x_enc, input_mask)
        normalised = torch.nan_to_num(normalised, nan=0.0, posinf=0.0, neginf=0.0)
        hidden = self._encode(normalised, input_mask, token_mask=input_mask)
        if reduction == "none":
            return hidden
        if reduction != "mean":
            raise ValueError(f"MOMENT embed: reduction {reduction!r} not supported ('mean' or 'none')")
        if channel_mask is None:
            per_patch = hidden.mean(dim=1)  # (B, N, d)
        else:
            weights = channel_mask.to(device=hidden.device, dtype=hidden.dtype)[:, :, None, None]
            if bool((weights.sum(dim=1) == 0).any()):
                raise ValueError("MOMENT embed: every record needs at least one real channel (channel_mask)")
            per_patch = (weights * hidden).sum(dim=1) / weights.sum(dim=1)
        observed = patch_observed(input_mask, self.config.patch_len).unsqueeze(-1).to(per_patch.dtype)
        return (observed * per_patch).sum(dim=1) / observed.sum(dim=1)

    def pretrain_mask(self, x_enc: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """The official pretraining mask (B, L): keep ``ceil(observed * (1 - mask_ratio))`` random observed
        patches of PRETRAIN_MASK_PATCH_LEN samples. With ``mask_ratio == 0`` it equals the observed patches."""
        length = x_enc.shape[-1]
        if length % PRETRAIN_MASK_PATCH_LEN:
            raise ValueError(
                f"MOMENT reconstruction needs a length divisible by {PRETRAIN_MASK_PATCH_LEN}, got {length}"
            )
        observed = patch_observed(input_mask, PRETRAIN_MASK_PATCH_LEN)
        if self.config.mask_ratio > 0:
            n_keep = torch.ceil(observed.sum(dim=-1, keepdim=True) * (1 - self.config.mask_ratio)).long()
            noise = torch.rand(observed.shape, device=x_enc.device)
            # Padding gets the largest noise, so it sorts last and is never kept.
            noise = torch.where(observed == 1, noise, torch.ones_like(noise))
            rank = noise.argsort(dim=1).argsort(dim=1)
            observed = (rank < n_keep).long()
        return observed.repeat_interleave(PRETRAIN_MASK_PATCH_LEN, dim=-1).to(x_enc.dtype)

    def reconstruct(
        self, x_enc: torch.Tensor, input_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Official reconstruction task forward: (B, C, L) -> RevIN-denormalised reconstruction (B, C, L).
        ``mask`` (B, L; 1 = shown to the model) defaults to the pretraining mask."""
        input_mask = self._default_mask(x_enc, input_mask)
        if mask is None:
            mask = self.pretrain_mask(x_enc, input_mask)
        mask = mask.to(device=x_enc.device, dtype=x_enc.dtype)
        normalised, mean, std = self.normalizer.normalize(x_enc, mask * input_mask)
        normalised = torch.nan_to_num(normalised, nan=0.0, posinf=0.0, neginf=0.0)
        hidden = self._encode(normalised, input_mask, token_mask=mask)
        return self.normalizer.denormalize(self.head(hidden), mean, std)

    def forward(self, x_enc: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embedding (B, d_model), the official ``task_name='embedding'`` call."""
        return self.embed(x_enc, input_mask=input_mask, reduction="mean")


def is_moment_config(config: dict[str, Any]) -> bool:
    return config.get("model_name") == MODEL_NAME or ("t5_config" in config and "patch_len" in config)


@register_family
class MomentFamily(ExpertFamily):
    """MOMENT: RevIN + patches + T5 encoder; embedding = channel mean, then observed-patch mean."""

    name = "moment"
    masks_missing_leads = True
    masks_padding = True

    def build(self, config: dict[str, Any]) -> MomentModel:
        return MomentModel(MomentConfig.from_dict(config)).eval()

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Read ``model.safetensors`` (or a folder holding it) and the sibling ``config.json`` (None if absent)."""
        state_dict, config, path = read_state_dict_with_config(path, WEIGHTS_FILES)
        config_path = path.with_name("config.json")
        if config is not None and not is_moment_config(config):
            raise WeightsError(
                f"{config_path}: not a MOMENT config (no model_name 'MOMENT' nor t5_config+patch_len)"
            )
        return state_dict, config

    def detect(self, folder: Path) -> Path | None:
        return detect_config_folder(folder, is_moment_config, WEIGHTS_FILES)

    def embed(
        self,
        model: nn.Module,
        x: torch.Tensor,
        lead_mask: torch.Tensor | None = None,
        valid_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, C, seq_len)`` windows -> ``(B, d_model)``, as ``MOMENTPipeline(task_name='embedding')(x_enc=x)``.

        ``valid_samples`` (B,) becomes the official ``input_mask`` (the end padding of a short record is
        unobserved: out of RevIN statistics, attention and the patch mean); ``lead_mask`` (B, C) keeps zero-filled
        leads out of the channel mean."""
        seq_len = model.config.seq_len
        if x.ndim != 3 or x.shape[-1] != seq_len:
            raise ValueError(
                f"MOMENT expects (B, channels, {seq_len}) windows, got shape {tuple(x.shape)} "
                "(use a leads_time contract of that length; shorter series are padded with an input mask)"
            )
        input_mask = None
        if valid_samples is not None:
            positions = torch.arange(seq_len, device=x.device)
            input_mask = (positions[None, :] < valid_samples.to(x.device)[:, None]).to(x.dtype)
        return model.embed(x, input_mask=input_mask, reduction="mean", channel_mask=lead_mask)

    def embedding_dim(self, config: dict[str, Any]) -> int:
        return int(MomentConfig.from_dict(config).d_model)

    def official_forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``task="embedding"`` (default; ``reduction`` "mean"/"none") or ``task="reconstruction"``; optional
        ``input_mask`` (B, L) and, for reconstruction, ``mask``."""
        task = kwargs.pop("task", "embedding")
        if task == "embedding":
            return model.embed(x, **kwargs)
        if task == "reconstruction":
            return model.reconstruct(x, **kwargs)
        raise ValueError(f"MOMENT official_forward: unknown task {task!r} ('embedding' or 'reconstruction')")

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        t5 = MomentConfig.from_dict(config).t5_config
        gated = str(t5.get("feed_forward_proj", "relu")).startswith("gated-")
        feed_forward = ["wi_0", "wi_1", "wo"] if gated else ["wi", "wo"]
        return ["q", "k", "v", "o", *feed_forward]
