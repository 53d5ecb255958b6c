"""Mantis (paris-noah/Mantis-8M, paris-noah/MantisPlus, paris-noah/MantisV2) as a native expert family.

The published checkpoints are ``PyTorchModelHubMixin`` folders written by the official ``mantis-tsfm`` package
(``mantis.architecture``): ``config.json`` (the constructor keyword arguments) and ``model.safetensors``. Two
architectures share one token generator:

* **V1** (``MantisV1``, legacy class ``Mantis8M``; checkpoints Mantis-8M and MantisPlus): 32 patches; per patch a
  token from (a) a Conv1d over the window standardised per series, (b) the same over its first difference,
  both layer-normed and averaged within the patch, (c) multi-scale encodings of the raw patch mean and std;
  then a pre-norm ViT encoder (sinusoidal positions, CLS token *first*, GELU MLP, LayerNorm).
* **V2** (``MantisV2``; checkpoint MantisV2): a fixed conv kernel (41) instead of one derived from the patch
  width, and a Toto-style encoder: RMSNorm, rotary (xPos-scaled) attention, SwiGLU MLP, CLS token *last*.

Input of the network: ``(B, 1, L)`` float32, one univariate series per row, ``L`` a multiple of
``num_patches`` (V1 is pretrained at ``seq_len`` = 512, V2 at 512 too). Output: the CLS token of the last layer
(``output_token='cls_token'``, ``return_transf_layer=-1``: the published configs), optionally the mean of the
other tokens or both concatenated, optionally after the contrastive pretraining projector ``prj``.

Channels: the official ``MantisTrainer.transform`` sends each channel through the network on its own and
concatenates the per-channel embeddings channel-major, giving ``(B, C * D)``. :meth:`MantisFamily.embed` does the
same; the enecg-only config key ``num_channels`` (set by the adapter specs, 12 for 12-lead ECG) fixes ``C`` so the
embedding size is known before any input is seen.

Output options: the official V1/V2 ``from_pretrained`` is an *instance* method that copies ``output_token``,
``return_transf_layer`` and ``pre_training`` from the instance it is called on, not from config.json. Here they come
from the config (config.json, then the spec's ``config`` overrides), so a spec sets them explicitly; the published
files and the official defaults agree (CLS token of the last layer, no projector).

Legacy key names: ``Mantis8M`` (and checkpoints saved by it) call the transformer unit ``vit_unit``; the official
``MantisV1`` renames it to ``transf_unit`` in a load hook. :meth:`MantisFamily.read_checkpoint` maps the alias the
same way, so either layout loads strictly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from enecg.experts.family import ExpertFamily, register_family
from enecg.experts.weights import (
    WeightsError,
    detect_config_folder,
    read_state_dict_with_config,
)

WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
VERSIONS = ("v1", "v2")
OUTPUT_TOKENS = ("cls_token", "mean_token", "combined")
# The official default of ``scalar_scales=None``: the scales of the multi-scale scalar encoders.
DEFAULT_SCALAR_SCALES = (1e-4, 1e-3, 1e-2, 1e-1, 1, 1e1, 1e2, 1e3, 1e4)
LEGACY_PREFIX, PREFIX = "vit_unit.", "transf_unit."
# Flags of an unreleased architecture variant found in MantisPlus's config.json. The official 1.1.0 classes do not
# take them (from_pretrained drops unknown keys), so only their "off" value describes the network it builds.
_INERT_FLAGS = ("no_diff_operator", "no_scalars", "patch_length_oriented")
# Numerical constants of the official modules (not in any config).
TS_SCALER_EPS = 1e-5
SCALAR_LN_EPS = 1e-15
RMSNORM_EPS = 1e-8
XPOS_SCALE_BASE = 512
ROPE_THETA = 10000.0


@dataclass
class MantisConfig:
    """The architecture fields of a Mantis ``config.json`` (the official constructor's keyword arguments). Other
    keys (``device``, ...) do not change the network and are ignored."""

    version: str = field(
        default="v1",
        metadata={
            "help": "'v1' (MantisV1 / Mantis8M: Mantis-8M, MantisPlus) or 'v2' (MantisV2). Config key "
            "'mantis_version'; inferred when absent (kernel_size set and no seq_len -> v2)."
        },
    )
    seq_len: int = field(
        default=512, metadata={"help": "V1: pretraining length; the conv kernel is derived from it."}
    )
    hidden_dim: int = field(default=256, metadata={"help": "Token width = per-channel embedding size."})
    num_patches: int = field(default=32, metadata={"help": "Tokens per series; L must be a multiple."})
    kernel_size: int | None = field(
        default=None, metadata={"help": "V2: conv kernel (41 published); V1 derives it from seq_len."}
    )
    scalar_scales: list[float] | None = field(
        default=None, metadata={"help": "Scales of the multi-scale mean/std encoders (None: 1e-4..1e4)."}
    )
    hidden_dim_scalar_enc: int = field(default=32, metadata={"help": "Width of the scalar encoders."})
    epsilon_scalar_enc: float = field(default=1.1, metadata={"help": "Offset inside the scale-weight log."})
    transf_depth: int = field(default=6, metadata={"help": "Transformer layers."})
    transf_num_heads: int = field(default=8, metadata={"help": "Attention heads."})
    transf_mlp_dim: int = field(default=512, metadata={"help": "MLP hidden width."})
    transf_dim_head: int | None = field(
        default=128, metadata={"help": "Per-head width (V1 default 128, V2 32; V2 None = hidden/heads)."}
    )
    transf_dropout: float = field(default=0.1, metadata={"help": "Dropout (training only)."})
    pre_training: bool = field(
        default=False, metadata={"help": "Apply the contrastive projector `prj` to the output."}
    )
    return_transf_layer: int = field(
        default=-1, metadata={"help": "Output after this layer (0-based); -1 = the last layer."}
    )
    output_token: str = field(
        default="cls_token", metadata={"help": "'cls_token', 'mean_token' or 'combined' (both, CLS first)."}
    )
    num_channels: int = field(
        default=1,
        metadata={"help": "enecg: channels embedded independently and concatenated (12 for 12-lead ECG)."},
    )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MantisConfig:
        """Parse a published ``config.json`` (plus enecg keys ``mantis_version`` and ``num_channels``)."""
        for flag in _INERT_FLAGS:
            if config.get(flag):
                raise ValueError(f"Mantis config: {flag}=true is not an architecture of the official package")
        version = config.get("mantis_version")
        if version is None:
            version = "v2" if config.get("kernel_size") is not None and "seq_len" not in config else "v1"
        if version not in VERSIONS:
            raise ValueError(f"Mantis config: mantis_version {version!r} not one of {VERSIONS}")
        known = {f.name for f in fields(cls)} - {"version"}
        values = {k: v for k, v in config.items() if k in known}
        if version == "v2":
            # The V2 constructor's own defaults differ from V1's (kernel 41, head width 32).
            values.setdefault("kernel_size", 41)
            values.setdefault("transf_dim_head", 32)
        result = cls(version=version, **values)
        result._check()
        return result

    def _check(self) -> None:
        if self.output_token not in OUTPUT_TOKENS:
            raise ValueError(f"Mantis config: output_token {self.output_token!r} not one of {OUTPUT_TOKENS}")
        if self.version == "v1" and self.seq_len % self.num_patches:
            raise ValueError(f"Mantis config: seq_len {self.seq_len} is not a multiple of {self.num_patches}")
        if self.version == "v2":
            if self.hidden_dim % self.transf_num_heads:
                raise ValueError("Mantis config: hidden_dim must be divisible by transf_num_heads")
            if self.head_dim < self.rotary_dim:
                raise ValueError(
                    f"Mantis config: V2 rotates hidden_dim/heads = {self.rotary_dim} features per head, "
                    f"more than transf_dim_head {self.head_dim}"
                )
            if self.pre_training and self.output_token == "combined":
                raise ValueError("Mantis config: V2's projector takes hidden_dim, not the combined output")
        if self.num_channels < 1:
            raise ValueError(f"Mantis config: num_channels must be >= 1, got {self.num_channels}")

    @property
    def conv_kernel(self) -> int:
        if self.version == "v2":
            return int(self.kernel_size)  # type: ignore[arg-type]
        window = self.seq_len // self.num_patches
        return window + 1 if window % 2 == 0 else window  # V1: an odd kernel at least one patch wide

    @property
    def head_dim(self) -> int:
        return (
            self.transf_dim_head
            if self.transf_dim_head is not None
            else self.hidden_dim // self.transf_num_heads
        )

    @property
    def rotary_dim(self) -> int:
        """V2 builds its rotary embedding for hidden_dim // heads features, whatever the head width."""
        return self.hidden_dim // self.transf_num_heads

    @property
    def output_dim(self) -> int:
        """Per-channel embedding size."""
        return 2 * self.hidden_dim if self.output_token == "combined" else self.hidden_dim

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mantis_version"] = data.pop("version")
        return data


# ---------------------------------------------------------------------- token generator (shared by V1 and V2)


class ConvTokens(nn.Module):
    """Conv1d (1 -> hidden, 'same' padding for odd kernels), output transposed to (B, L, hidden)."""

    def __init__(self, kernel_size: int, hidden_dim: int):
        super().__init__()
        self.conv = nn.Conv1d(1, hidden_dim, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).transpose(1, 2)


class ScalarEncoder(nn.Module):
    """One scale ``k`` of the multi-scale encoder: LayerNorm(x * w + k * b)."""

    def __init__(self, k: float, width: int):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.rand(1, width))
        self.b = nn.Parameter(torch.rand(1, width))
        self.layer_norm = nn.LayerNorm(width, eps=SCALAR_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x * self.w + self.k * self.b)


class MultiScaleScalarEncoder(nn.Module):
    """Encodes a scalar (B, P, 1) at several scales and mixes them with weights ~ |1 / log(|x| / scale + eps)|,
    so the scales near the value's magnitude dominate (Lin et al., 2023, arXiv:2310.07402)."""

    def __init__(self, scales: Sequence[float], width: int, epsilon: float):
        super().__init__()
        # torch.tensor(list) as official: the stored buffer's dtype follows the list's element types.
        self.register_buffer("scales", torch.tensor(list(scales)))
        self.epsilon = epsilon
        self.encoders = nn.ModuleList([ScalarEncoder(k, width) for k in scales])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.abs(
            1 / torch.log(torch.matmul(torch.abs(x), 1 / self.scales.reshape(1, -1)) + self.epsilon)
        )
        alpha = (alpha / alpha.sum(dim=-1, keepdim=True)).unsqueeze(-1)  # (B, P, S, 1)
        encoded = torch.stack([encoder(x) for encoder in self.encoders], dim=-2)  # (B, P, S, width)
        return (encoded * alpha).sum(dim=-2)


class LinearEncoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.layer_norm = nn.LayerNorm(out_dim, eps=SCALAR_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.linear(x))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-series z-score over time, Bessel-corrected std + eps (the official ``ts_scaler``)."""
    return (x - x.mean(dim=2, keepdim=True)) / (x.std(dim=2, keepdim=True) + TS_SCALER_EPS)


class TokenGenerator(nn.Module):
    """(B, 1, L) -> (B, num_patches, hidden): conv tokens of the first difference and of the series, plus
    multi-scale encodings of each patch's raw mean and std, projected to the token width."""

    def __init__(self, config: MantisConfig):
        super().__init__()
        self.num_patches = config.num_patches
        scales = DEFAULT_SCALAR_SCALES if config.scalar_scales is None else config.scalar_scales
        # Index 0 sees the first difference, index 1 the series itself (the official order).
        self.convs = nn.ModuleList([ConvTokens(config.conv_kernel, config.hidden_dim) for _ in range(2)])
        self.layer_norms = nn.ModuleList([nn.LayerNorm(config.hidden_dim, eps=1e-5) for _ in range(2)])
        # Index 0 encodes the patch means, index 1 the patch stds.
        self.scalar_encoders = nn.ModuleList(
            [
                MultiScaleScalarEncoder(scales, config.hidden_dim_scalar_enc, config.epsilon_scalar_enc)
                for _ in range(2)
            ]
        )
        self.linear_encoder = LinearEncoder(
            2 * config.hidden_dim_scalar_enc + 2 * config.hidden_dim, config.hidden_dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        patches = x.reshape(batch, self.num_patches, -1)
        # The official code computes the statistics and the difference without gradient.
        with torch.no_grad():
            stats = [patches.mean(dim=-1, keepdim=True), patches.std(dim=-1, keepdim=True)]
            diff = F.pad(torch.diff(x, n=1, dim=2), (0, 1))  # zero-padded at the end to keep length L
        scalar_tokens = [encoder(s) for encoder, s in zip(self.scalar_encoders, stats, strict=True)]
        series_tokens = []
        for conv, norm, series in zip(self.convs, self.layer_norms, (diff, x), strict=True):
            tokens = norm(conv(standardise(series)))  # (B, L, hidden)
            series_tokens.append(tokens.reshape(batch, self.num_patches, -1, tokens.shape[-1]).mean(dim=2))
        return self.linear_encoder(torch.cat([*series_tokens, *scalar_tokens], dim=-1))


def pool_tokens(cls_token: torch.Tensor, others: torch.Tensor, output_token: str) -> torch.Tensor:
    if output_token == "cls_token":
        return cls_token
    mean_token = others.mean(dim=1)
    if output_token == "mean_token":
        return mean_token
    return torch.cat([cls_token, mean_token], dim=1)


# ---------------------------------------------------------------------- V1 encoder (ViT)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ViTAttention(nn.Module):
    """Bias-free fused qkv, softmax(q k^T / sqrt(dim_head)) v; no output projection only when one head spans
    the whole width (as official)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = (
            nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        q, k, v = (
            t.reshape(batch, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        attn = self.dropout(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, n, -1)
        return self.to_out(out)


class ViTFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViTEncoder(nn.Module):
    def __init__(self, config: MantisConfig):
        super().__init__()
        dim, drop = config.hidden_dim, config.transf_dropout
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        PreNorm(dim, ViTAttention(dim, config.transf_num_heads, config.head_dim, drop)),
                        PreNorm(dim, ViTFeedForward(dim, config.transf_mlp_dim, drop)),
                    ]
                )
                for _ in range(config.transf_depth)
            ]
        )

    def forward(self, x: torch.Tensor, return_layer: int = -1) -> torch.Tensor:
        for index, (attention, feed_forward) in enumerate(self.layers):
            x = attention(x) + x
            x = feed_forward(x) + x
            if index == return_layer:
                break
        return x


class SinusoidalTable(nn.Module):
    """Persistent buffer ``pe`` (max_len, 1, dim) as official (stored in the checkpoint, so it is loaded)."""

    def __init__(self, dim: int, max_len: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(max_len, 1, dim)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, n, dim) -> x + pe[:n] (batch-first here; the table is sequence-first as stored)."""
        return self.dropout(x + self.pe[: x.shape[1], 0].unsqueeze(0))


class V1TransformerUnit(nn.Module):
    def __init__(self, config: MantisConfig):
        super().__init__()
        self.pos_encoder = SinusoidalTable(config.hidden_dim, config.num_patches + 1, config.transf_dropout)
        self.cls_token = nn.Parameter(torch.randn(config.hidden_dim))
        self.transformer = ViTEncoder(config)

    def forward(self, tokens: torch.Tensor, output_token: str, return_layer: int) -> torch.Tensor:
        cls = self.cls_token.expand(tokens.shape[0], 1, -1)
        hidden = self.transformer(
            self.pos_encoder(torch.cat([cls, tokens], dim=1)), return_layer=return_layer
        )
        return pool_tokens(hidden[:, 0], hidden[:, 1:], output_token)  # CLS first in V1


# ---------------------------------------------------------------------- V2 encoder (RMSNorm, xPos RoPE, SwiGLU)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMSNORM_EPS):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.scale


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Adjacent feature pairs (a, b) -> (-b, a)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(start_dim=-2)


def xpos_rotary(n: int, rot_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Angles (n, rot_dim) and xPos scales (n, rot_dim) of the official ``TimeAwareRotaryEmbedding``.

    Angles repeat each frequency for its feature pair ([f0, f0, f1, f1, ...]) while the scales are laid out as two
    concatenated halves ([s0, s1, ..., s0, s1, ...]); reproduced as is, since the weights were trained with it."""
    inv_freq = 1.0 / (
        ROPE_THETA ** (torch.arange(0, rot_dim, 2, device=device)[: rot_dim // 2].float() / rot_dim)
    )
    positions = torch.arange(n, dtype=dtype, device=device)
    angles = (positions[:, None].to(inv_freq.dtype) * inv_freq[None]).repeat_interleave(2, dim=-1)
    base = (torch.arange(0, rot_dim, 2, device=device) + 0.4 * rot_dim) / (1.4 * rot_dim)
    power = (positions - positions.max(-1).values // 2) / XPOS_SCALE_BASE
    scale = base ** power[:, None]
    return angles, torch.cat((scale, scale), dim=-1).to(dtype)


def apply_rotary(t: torch.Tensor, angles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rot_dim`` features of ``t`` (..., n, head_dim); the rest pass through."""
    rot_dim = angles.shape[-1]
    head, tail = t[..., :rot_dim], t[..., rot_dim:]
    rotated = (head * angles.cos() * scale) + (_rotate_pairs(head) * angles.sin() * scale)
    return torch.cat((rotated, tail), dim=-1).type(t.dtype)


class RotaryAttention(nn.Module):
    def __init__(self, config: MantisConfig):
        super().__init__()
        self.num_heads = config.transf_num_heads
        self.head_dim = config.head_dim
        self.rot_dim = config.rotary_dim
        self.dropout = config.transf_dropout
        # wQKV / wO: the official parameter names, kept so published files load.
        self.wQKV = nn.Linear(config.hidden_dim, 3 * self.head_dim * self.num_heads)
        self.wO = nn.Linear(self.head_dim * self.num_heads, config.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        # The fused projection is laid out (qkv, head_dim, heads) with the head index fastest.
        qkv = self.wQKV(x).reshape(batch, n, 3, self.head_dim, self.num_heads).permute(2, 0, 4, 1, 3)
        q, k, v = qkv.unbind(dim=0)  # (B, heads, n, head_dim)
        angles, scale = xpos_rotary(n, self.rot_dim, q.dtype, q.device)
        q = apply_rotary(q, angles, scale)
        k = apply_rotary(k, angles, scale**-1)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), dropout_p=dropout
        )
        return self.wO(out.transpose(1, 2).reshape(batch, n, -1))


class SwiGLU(nn.Module):
    """silu(first half) * second half (the gate comes first, as official)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class V2Layer(nn.Module):
    def __init__(self, config: MantisConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_dim)
        self.norm2 = RMSNorm(config.hidden_dim)
        self.attention = RotaryAttention(config)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_dim, 2 * config.transf_mlp_dim),
            SwiGLU(),
            nn.Linear(config.transf_mlp_dim, config.hidden_dim),
            nn.Dropout(config.transf_dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class V2Encoder(nn.Module):
    def __init__(self, config: MantisConfig):
        super().__init__()
        self.layers = nn.ModuleList([V2Layer(config) for _ in range(config.transf_depth)])

    def forward(self, x: torch.Tensor, return_layer: int = -1) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index == return_layer:
                break
        return x


class V2TransformerUnit(nn.Module):
    def __init__(self, config: MantisConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(config.hidden_dim))
        self.transformer = V2Encoder(config)

    def forward(self, tokens: torch.Tensor, output_token: str, return_layer: int) -> torch.Tensor:
        cls = self.cls_token.expand(tokens.shape[0], 1, -1)
        hidden = self.transformer(torch.cat([tokens, cls], dim=1), return_layer=return_layer)
        return pool_tokens(hidden[:, -1], hidden[:, :-1], output_token)  # CLS last in V2


# ---------------------------------------------------------------------- the model


class MantisModel(nn.Module):
    """Native Mantis V1/V2, state-dict compatible with the official ``MantisV1`` / ``MantisV2``."""

    def __init__(self, config: MantisConfig):
        super().__init__()
        self.config = config
        self.tokgen_unit = TokenGenerator(config)
        self.transf_unit: nn.Module = (
            V1TransformerUnit(config) if config.version == "v1" else V2TransformerUnit(config)
        )
        # The pretraining projector is in every published file; V1 sizes it to the output, V2 to hidden_dim.
        width = config.output_dim if config.version == "v1" else config.hidden_dim
        self.prj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Official network forward: ``(B, 1, L)`` -> ``(B, D)`` with D = :attr:`MantisConfig.output_dim`."""
        if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] % self.config.num_patches:
            raise ValueError(
                f"Mantis network expects (B, 1, L) with L a multiple of {self.config.num_patches}, "
                f"got shape {tuple(x.shape)}"
            )
        out = self.transf_unit(
            self.tokgen_unit(x),
            output_token=self.config.output_token,
            return_layer=self.config.return_transf_layer,
        )
        return self.prj(out) if self.config.pre_training else out

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Official ``MantisTrainer.transform``: ``(B, C, L)`` -> ``(B, C * D)``, each channel embedded on its own,
        concatenated channel-major."""
        batch, channels, length = x.shape
        per_channel = self(x.reshape(batch * channels, 1, length))
        return per_channel.reshape(batch, channels * per_channel.shape[-1])


def rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vit_unit.*`` (``Mantis8M`` naming) -> ``transf_unit.*``, as the official ``MantisV1`` load hook does."""
    return {
        (PREFIX + key.removeprefix(LEGACY_PREFIX) if key.startswith(LEGACY_PREFIX) else key): value
        for key, value in state_dict.items()
    }


def architecture_of(state_dict: dict[str, torch.Tensor]) -> str:
    """'v2' when the transformer has V2 parameter names, else 'v1'."""
    return "v2" if any(key.endswith(".attention.wQKV.weight") for key in state_dict) else "v1"


def is_mantis_config(config: dict[str, Any]) -> bool:
    """The published configs carry no model name; their key set is distinctive (a token generator's scalar
    encoder plus the transformer shape)."""
    return "mantis_version" in config or {
        "hidden_dim_scalar_enc",
        "epsilon_scalar_enc",
        "transf_depth",
    } <= set(config)


@register_family
class MantisFamily(ExpertFamily):
    """Mantis V1/V2: per-channel CLS embeddings (published configs), concatenated over channels."""

    name = "mantis"

    def build(self, config: dict[str, Any]) -> MantisModel:
        return MantisModel(MantisConfig.from_dict(config)).eval()

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Read ``model.safetensors`` (or a folder holding it) and the sibling ``config.json`` (None if absent);
        legacy ``vit_unit.*`` keys are renamed to ``transf_unit.*``."""
        state_dict, config, path = read_state_dict_with_config(path, WEIGHTS_FILES)
        if config is not None and not is_mantis_config(config):
            raise WeightsError(f"{path.with_name('config.json')}: not a Mantis config")
        state_dict = rename_legacy_keys(state_dict)
        if config is not None and "mantis_version" not in config:
            # The weights say which architecture they are (V2's RMSNorm scales vs V1's stored position table);
            # more reliable than guessing from config keys, which differ between package versions.
            config = {**config, "mantis_version": architecture_of(state_dict)}
        return state_dict, config

    def detect(self, folder: Path) -> Path | None:
        return detect_config_folder(folder, is_mantis_config, WEIGHTS_FILES)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B, num_channels, L)`` windows -> ``(B, num_channels * D)`` as ``MantisTrainer.transform``. V1 takes
        exactly its ``seq_len``; V2 any multiple of ``num_patches``."""
        config: MantisConfig = model.config
        length_ok = (
            x.shape[-1] == config.seq_len if config.version == "v1" else x.shape[-1] % config.num_patches == 0
        )
        if x.ndim != 3 or x.shape[1] != config.num_channels or not length_ok or x.shape[-1] == 0:
            wanted = config.seq_len if config.version == "v1" else f"k*{config.num_patches}"
            raise ValueError(
                f"Mantis expects (B, {config.num_channels}, {wanted}) windows, got shape {tuple(x.shape)} "
                "(use a leads_time contract with that many leads and that length)"
            )
        return model.transform(x)

    def embedding_dim(self, config: dict[str, Any]) -> int:
        parsed = MantisConfig.from_dict(config)
        return parsed.num_channels * parsed.output_dim

    def official_forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``task="network"`` (default): the network on ``(B, 1, L)``; ``task="transform"``: the trainer's
        per-channel concatenation on ``(B, C, L)``."""
        task = kwargs.pop("task", "network")
        if kwargs:
            raise TypeError(f"Mantis official_forward: unexpected arguments {sorted(kwargs)}")
        if task == "network":
            return model(x)
        if task == "transform":
            return model.transform(x)
        raise ValueError(f"Mantis official_forward: unknown task {task!r} ('network' or 'transform')")

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        if MantisConfig.from_dict(config).version == "v1":
            return ["to_qkv", "to_out.0", "net.0", "net.3"]
        return ["wQKV", "wO", "mlp.0", "mlp.2"]
