"""ECG-FM (wanglab/ecg-fm): native port of fairseq-signals' wav2vec 2.0 "ECG transformer".

Architecture (re-implemented from fairseq-signals, no fairseq import):

    source (B, leads, samples)
      -> conv feature extractor: [Conv1d(k, stride, no bias) + (GroupNorm on layer 0 | LayerNorm each) + GELU] * n
      -> LayerNorm over channels = "features" -> post_extract_proj (Linear) when conv dim != encoder dim
      -> x + conv_pos(x): weight-normalised grouped Conv1d (dim=2) + SamePad + GELU
      -> encoder: [LayerNorm if post-LN] -> layers (self-attention q/k/v/out_proj, FFN fc1/fc2, GELU)
         -> [LayerNorm if pre-LN]
      -> "x" (B, frames, D); embedding = x.sum(1) / (x != 0).sum(1) (the ECG-FM quickstart pooling)

Supported checkpoints (``cfg['model']['_name']``):

* ``wav2vec2_cmsc`` (``mimic_iv_ecg_physionet_pretrained.pt``): the encoder plus the pretraining-only modules
  (``mask_emb``, ``quantizer``, ``project_q``, ``final_proj``) kept as parameters so the file loads strictly; only
  the ``features_only=True, mask=False`` path is ported (masking, quantisation and the contrastive head are not).
* ``ecg_transformer`` (the bare encoder) and ``ecg_transformer_classifier`` (``mimic_iv_ecg_finetuned.pt``: the
  encoder under ``encoder.`` plus a ``proj`` Linear head on the pooled output).
* ``quantize_input=True`` and ``target_glu`` on the pretraining model, and source padding masks, are not supported
  (clear errors); none is used by the published models.

Files: a fairseq checkpoint (``.pt``: ``cfg`` as a plain nested dict + ``model`` state dict, read with
``weights_only=True``), or ``model.safetensors`` with a ``cfg.json`` beside it (the full cfg or its ``model``
section). Weight-norm parameters are accepted under both spellings (legacy ``weight_g``/``weight_v`` and
``parametrizations.weight.original0``/``original1``) and mapped to the latter, which :meth:`EcgFmFamily.build`
produces.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from enecg.experts.family import ExpertFamily, register_family
from enecg.experts.weights import WeightsError, read_weights

PRETRAINED_MODEL = "wav2vec2_cmsc"
ENCODER_MODEL = "ecg_transformer"
CLASSIFIER_MODEL = "ecg_transformer_classifier"
SUPPORTED_MODELS = (PRETRAINED_MODEL, ENCODER_MODEL, CLASSIFIER_MODEL)

CFG_JSON = "cfg.json"
SAFETENSORS_FILE = "model.safetensors"

# Legacy torch.nn.utils.weight_norm names -> torch.nn.utils.parametrizations.weight_norm names.
_WEIGHT_NORM_ALIASES = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class EcgFmConfig:
    """The architecture fields of a fairseq-signals model cfg (defaults = fairseq-signals defaults).

    Training-only fields of the cfg (masking spans, negatives, data paths, ...) are ignored."""

    name: str = field(
        default=PRETRAINED_MODEL, metadata={"help": "cfg '_name': " + ", ".join(SUPPORTED_MODELS)}
    )
    extractor_mode: str = field(
        default="default",
        metadata={"help": "'default' (GroupNorm in conv 0) or 'layer_norm' (LayerNorm in each)."},
    )
    conv_feature_layers: str = field(
        default="[(256, 2, 2)] * 4",
        metadata={"help": "Python-literal list of (dim, kernel, stride) conv layers."},
    )
    in_d: int = field(default=12, metadata={"help": "Input leads."})
    conv_bias: bool = field(default=False, metadata={"help": "Bias in the feature-extractor convolutions."})
    feature_grad_mult: float = field(
        default=1.0, metadata={"help": "Gradient scale into the feature extractor (0: no gradient)."}
    )
    encoder_layers: int = field(default=12, metadata={"help": "Transformer layers."})
    encoder_embed_dim: int = field(default=768, metadata={"help": "Transformer width D (= embedding size)."})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "FFN hidden size."})
    encoder_attention_heads: int = field(default=12, metadata={"help": "Attention heads."})
    layer_norm_first: bool = field(default=False, metadata={"help": "Pre-LN layers (False: post-LN)."})
    dropout: float = field(default=0.1, metadata={"help": "Transformer dropout (training only)."})
    attention_dropout: float = field(default=0.1, metadata={"help": "Attention-probability dropout."})
    activation_dropout: float = field(default=0.0, metadata={"help": "Dropout after the FFN activation."})
    encoder_layerdrop: float = field(default=0.0, metadata={"help": "LayerDrop probability (training only)."})
    dropout_input: float = field(default=0.0, metadata={"help": "Dropout on the projected conv features."})
    dropout_features: float = field(default=0.0, metadata={"help": "Dropout on the returned local features."})
    conv_pos: int = field(default=128, metadata={"help": "Kernel of the convolutional positional embedding."})
    conv_pos_groups: int = field(
        default=16, metadata={"help": "Groups of the convolutional positional embedding."}
    )
    apply_mask: bool | None = field(
        default=None,
        metadata={"help": "Whether the model owns `mask_emb` (None: decided by the checkpoint)."},
    )
    quantize_targets: bool = field(
        default=False, metadata={"help": "Pretraining: Gumbel quantizer on targets."}
    )
    quantize_input: bool = field(
        default=False, metadata={"help": "Pretraining: quantized inputs (unsupported)."}
    )
    target_glu: bool = field(default=False, metadata={"help": "Pretraining: GLU on targets."})
    latent_vars: int = field(default=320, metadata={"help": "Codebook entries per group."})
    latent_groups: int = field(default=2, metadata={"help": "Codebook groups."})
    latent_dim: int = field(default=0, metadata={"help": "Codebook vector size (0: final_dim)."})
    final_dim: int = field(
        default=0, metadata={"help": "Contrastive projection size (0: encoder_embed_dim)."}
    )
    num_labels: int | None = field(default=None, metadata={"help": "Classifier outputs (classifier only)."})
    final_dropout: float = field(default=0.0, metadata={"help": "Classifier dropout before pooling."})

    def __post_init__(self) -> None:
        if self.name not in SUPPORTED_MODELS:
            raise ValueError(
                f"ECG-FM config: model '_name' {self.name!r} is not supported; known: {SUPPORTED_MODELS}"
            )
        if self.extractor_mode not in ("default", "layer_norm"):
            raise ValueError(
                f"ECG-FM config: extractor_mode {self.extractor_mode!r} is not 'default'/'layer_norm'"
            )
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"ECG-FM config: encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"{self.encoder_attention_heads} heads"
            )
        if self.name == CLASSIFIER_MODEL and not self.num_labels:
            raise ValueError("ECG-FM config: ecg_transformer_classifier needs num_labels")
        self.conv_layers()  # validates the string

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> EcgFmConfig:
        """Accept a fairseq cfg ``model`` section, or a full cfg (with ``model``) as stored in checkpoints."""
        if isinstance(config.get("model"), Mapping) and "encoder_embed_dim" not in config:
            config = config["model"]
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        values = {k: v for k, v in config.items() if k in known}
        if config.get("_name") is not None:
            values["name"] = config["_name"]
        elif config.get("name") is not None:
            values["name"] = config["name"]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fairseq spelling (``_name``) so the dict round-trips through :meth:`from_dict`."""
        data = dataclasses.asdict(self)
        data["_name"] = data.pop("name")
        return data

    def conv_layers(self) -> list[tuple[int, int, int]]:
        """``conv_feature_layers`` parsed safely (fairseq ``eval``s it; here only literals, ``+`` and ``*``)."""
        try:
            value = _eval_literal_expression(ast.parse(self.conv_feature_layers, mode="eval").body)
            layers = [tuple(int(v) for v in layer) for layer in value]
        except (SyntaxError, ValueError, TypeError) as exc:
            raise ValueError(
                f"ECG-FM config: conv_feature_layers {self.conv_feature_layers!r} is not a list of "
                f"(dim, kernel, stride): {exc}"
            ) from None
        if not layers or any(len(layer) != 3 for layer in layers):
            raise ValueError(
                f"ECG-FM config: conv_feature_layers {self.conv_feature_layers!r} is not (dim, k, s)*"
            )
        return layers  # type: ignore[return-value]

    @property
    def conv_dim(self) -> int:
        return self.conv_layers()[-1][0]

    @property
    def has_mask_emb(self) -> bool:
        # Older fairseq-signals always created mask_emb for wav2vec2 models; newer ones only with apply_mask.
        return self.apply_mask if self.apply_mask is not None else self.name == PRETRAINED_MODEL


def _eval_literal_expression(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        items = [_eval_literal_expression(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Add):
        left, right = _eval_literal_expression(node.left), _eval_literal_expression(node.right)
        return left * right if isinstance(node.op, ast.Mult) else left + right
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


# ---------------------------------------------------------------------------------------------------------------
# Modules


def _gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float()).type_as(x)


class _GradMultiply(torch.autograd.Function):
    """Identity forward, scaled gradient backward (fairseq's GradMultiply for the feature extractor)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 (fairseq), for half-precision safety."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type_as(x)


class Fp32ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, T)`` tensor, in float32.

    Registered as index 1 of a 3-slot Sequential to keep the official ``conv_layers.i.2.1.*`` key names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.transpose(-2, -1).float(), self.normalized_shape, weight, bias, self.eps)
        return y.type_as(x).transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """Strided convolutions over the raw leads. Keys: ``conv_layers.{i}.0`` conv, ``.2`` norm (official)."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList()
        in_dim = config.in_d
        for i, (dim, kernel, stride) in enumerate(config.conv_layers()):
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=config.conv_bias)
            if config.extractor_mode == "layer_norm":
                norm: nn.Module = nn.Sequential(nn.Identity(), Fp32ChannelLayerNorm(dim), nn.Identity())
                block = nn.Sequential(conv, nn.Dropout(0.0), norm, nn.GELU())
            elif i == 0:
                block = nn.Sequential(conv, nn.Dropout(0.0), Fp32GroupNorm(dim, dim), nn.GELU())
            else:
                block = nn.Sequential(conv, nn.Dropout(0.0), nn.GELU())
            self.conv_layers.append(block)
            in_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, T) single-lead input, as fairseq accepts
            x = x.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x


class _SamePad(nn.Module):
    """Drop the extra frame an even kernel with ``padding = k // 2`` adds."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class ConvPositionalEncoding(nn.Module):
    """Relative positional signal: weight-normalised (over dims 0-1, per kernel tap) grouped Conv1d + GELU."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        conv = nn.Conv1d(
            dim, dim, config.conv_pos, padding=config.conv_pos // 2, groups=config.conv_pos_groups
        )
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (config.conv_pos * dim)))
        nn.init.zeros_(conv.bias)
        self.pos_conv = nn.Sequential(
            weight_norm(conv, name="weight", dim=2), _SamePad(config.conv_pos), nn.GELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D) -> positional term (B, T, D)."""
        return self.pos_conv(x.transpose(1, 2)).transpose(1, 2)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with explicit ``q/k/v/out_proj`` Linears (official names; LoRA-friendly)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        # Official registration order (k, v, q, out) keeps state_dict() in the published key order.
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, frames, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # scale = head_dim ** -0.5
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, dim))


class TransformerLayer(nn.Module):
    """fairseq wav2vec 2.0 encoder layer (post-LN by default, pre-LN with ``layer_norm_first``)."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.layer_norm_first = config.layer_norm_first
        self.self_attn = MultiHeadSelfAttention(dim, config.encoder_attention_heads, config.attention_dropout)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.activation_dropout)
        self.dropout3 = nn.Dropout(config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.fc2(self.dropout2(_gelu_fp32(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(self.self_attn_layer_norm(x)))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout1(self.self_attn(x)))
        return self.final_layer_norm(x + self._ffn(x))


class TransformerEncoder(nn.Module):
    """Stack of layers; the extra LayerNorm sits before the layers (post-LN) or after them (pre-LN)."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__()
        self.layer_norm_first = config.layer_norm_first
        self.dropout = nn.Dropout(config.dropout)
        self.layerdrop = config.encoder_layerdrop
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.encoder_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm_first else x


class ECGTransformer(nn.Module):
    """The ECG-FM encoder (fairseq-signals ``ECGTransformerModel``): raw leads -> frame representations."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__()
        self.config = config
        if config.has_mask_emb:  # registered first: the official state_dict lists it first
            self.mask_emb = nn.Parameter(torch.empty(config.encoder_embed_dim).uniform_())
        self.encoder = TransformerEncoder(config)
        self.feature_extractor = ConvFeatureExtractor(config)
        conv_dim = config.conv_dim
        self.post_extract_proj = (
            nn.Linear(conv_dim, config.encoder_embed_dim) if conv_dim != config.encoder_embed_dim else None
        )
        self.conv_pos = ConvPositionalEncoding(config)
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.dropout_features = nn.Dropout(config.dropout_features)

    def _conv_features(self, source: torch.Tensor) -> torch.Tensor:
        scale = self.config.feature_grad_mult
        if scale <= 0:
            with torch.no_grad():
                return self.feature_extractor(source)
        features = self.feature_extractor(source)
        return _GradMultiply.apply(features, scale) if scale != 1.0 else features

    def extract_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, mask: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """``{"x": encoder output (B, T, D), "padding_mask": None, "features": LayerNorm(conv) (B, T, C)}``."""
        if mask:
            raise NotImplementedError(
                "ECG-FM port: wav2vec2 time masking (mask=True) is pretraining-only; pass mask=False"
            )
        if padding_mask is not None and bool(padding_mask.any()):
            raise NotImplementedError(
                "ECG-FM port: source padding masks are not supported (use fixed-length windows)"
            )
        features = self.layer_norm(self._conv_features(source).transpose(1, 2))
        local_features = self.dropout_features(features)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        x = self.dropout_input(features)
        x = x + self.conv_pos(x)
        x = self.encoder(x)
        return {"x": x, "padding_mask": None, "features": local_features}

    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, mask: bool = False, **_: Any
    ) -> dict[str, torch.Tensor | None]:
        return self.extract_features(source, padding_mask, mask=mask)


class GumbelQuantizerWeights(nn.Module):
    """Parameters of fairseq's ``GumbelVectorQuantizer`` (pretraining only: stored, never run here)."""

    def __init__(self, in_dim: int, num_vars: int, groups: int, vq_dim: int) -> None:
        super().__init__()
        if vq_dim % groups:
            raise ValueError(
                f"ECG-FM config: codebook size {vq_dim} is not divisible by {groups} latent groups"
            )
        self.vars = nn.Parameter(torch.empty(1, groups * num_vars, vq_dim // groups).uniform_())
        self.weight_proj = nn.Linear(in_dim, groups * num_vars)


class Wav2Vec2CMSC(ECGTransformer):
    """fairseq-signals ``Wav2Vec2CMSCModel`` (the published pretrained ECG-FM): the encoder plus the pretraining
    modules, which are kept so the checkpoint loads strictly but are not used by the ported forward."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__(config)
        if config.quantize_input:
            raise ValueError("ECG-FM config: quantize_input=True is not supported by this port")
        final_dim = config.final_dim if config.final_dim > 0 else config.encoder_embed_dim
        if config.quantize_targets:
            vq_dim = config.latent_dim if config.latent_dim > 0 else final_dim
            self.quantizer = GumbelQuantizerWeights(
                config.conv_dim, config.latent_vars, config.latent_groups, vq_dim
            )
            self.project_q = nn.Linear(vq_dim, final_dim)
        else:
            self.project_q = nn.Linear(config.conv_dim, final_dim)
        if config.target_glu:
            self.target_glu = nn.Sequential(nn.Linear(final_dim, final_dim * 2), nn.GLU())
        self.final_proj = nn.Linear(config.encoder_embed_dim, final_dim)

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: bool = False,
        features_only: bool = True,
        **_: Any,
    ) -> dict[str, torch.Tensor | None]:
        """Only the feature path: ``model(source=x, padding_mask=None, mask=False, features_only=True)``.

        Unlike fairseq (default ``mask=True``), masking is off by default: it is a pretraining operation."""
        if not features_only:
            raise NotImplementedError(
                "ECG-FM port: the contrastive pretraining forward is not ported; use features_only"
            )
        return self.extract_features(source, padding_mask, mask=mask)


class ECGTransformerClassifier(nn.Module):
    """fairseq-signals ``ECGTransformerClassificationModel`` (``mimic_iv_ecg_finetuned.pt``): encoder + ``proj``."""

    def __init__(self, config: EcgFmConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ECGTransformer(config)
        self.final_dropout = nn.Dropout(config.final_dropout)
        self.proj = nn.Linear(config.encoder_embed_dim, int(config.num_labels or 0))

    def extract_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, mask: bool = False
    ) -> dict[str, torch.Tensor | None]:
        return self.encoder.extract_features(source, padding_mask, mask=mask)

    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, **_: Any
    ) -> dict[str, Any]:
        """``{"out": logits (B, num_labels), "encoder_out": (B, T, D), "padding_mask": None}``."""
        encoder_out = self.extract_features(source, padding_mask)["x"]
        pooled = masked_mean_pool(self.final_dropout(encoder_out))
        return {"encoder_out": encoder_out, "padding_mask": None, "out": self.proj(pooled)}


def masked_mean_pool(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(1) / (x != 0).sum(1)``: the official ECG-FM pooling (mean over non-zero frames, per channel)."""
    return x.sum(dim=1) / (x != 0).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def normalise_weight_norm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy ``*.weight_g``/``*.weight_v`` to ``*.parametrizations.weight.original0/1`` (same tensors)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for legacy, current in _WEIGHT_NORM_ALIASES.items():
            if key.endswith(legacy):
                key = key[: -len(legacy)] + current
                break
        renamed[key] = value
    return renamed


def _model_cfg(cfg: Any, source: Path) -> dict[str, Any]:
    if not isinstance(cfg, Mapping):
        raise WeightsError(f"{source}: the fairseq 'cfg' is not a mapping ({type(cfg).__name__})")
    model_cfg = cfg["model"] if isinstance(cfg.get("model"), Mapping) else cfg
    name = model_cfg.get("_name")
    if name not in SUPPORTED_MODELS:
        raise WeightsError(
            f"{source}: model '_name' {name!r} is not supported; known: {list(SUPPORTED_MODELS)}"
        )
    return dict(model_cfg)


def _read_cfg_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable JSON cfg ({exc})") from exc


def _fairseq_checkpoint(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, Mapping) or "model" not in obj:
        raise WeightsError(f"{path}: not a fairseq checkpoint (expected a dict with 'cfg' and 'model')")
    if obj.get("cfg") is None:
        raise WeightsError(
            f"{path}: checkpoint has no 'cfg' (argparse-era 'args' checkpoints are not supported)"
        )
    state_dict = obj["model"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise WeightsError(f"{path}: the checkpoint's 'model' entry is not a state dict of tensors")
    return dict(state_dict), _model_cfg(obj["cfg"], path)


def _reconcile_mask_emb(config: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    # A cfg without `apply_mask` (older fairseq-signals) leaves mask_emb's existence to the weights themselves.
    if config.get("apply_mask") is None:
        prefix = "encoder." if config.get("_name") == CLASSIFIER_MODEL else ""
        config = {**config, "apply_mask": f"{prefix}mask_emb" in state_dict}
    return config


def _peek_pt_model_name(path: Path) -> str | None:
    """The cfg model name of a fairseq ``.pt`` (memory-mapped, weights-only), or None if it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, or unsafe: not a checkpoint this family reads
        return None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("cfg"), Mapping) or "model" not in obj:
        return None
    model_cfg = obj["cfg"].get("model")
    return model_cfg.get("_name") if isinstance(model_cfg, Mapping) else None


@register_family
class EcgFmFamily(ExpertFamily):
    """ECG-FM (fairseq-signals wav2vec2_cmsc / ecg_transformer_classifier). Embedding: pooled encoder output (D)."""

    name = "ecg_fm"

    def build(self, config: dict[str, Any]) -> nn.Module:
        cfg = EcgFmConfig.from_dict(config)
        if cfg.name == PRETRAINED_MODEL:
            return Wav2Vec2CMSC(cfg)
        if cfg.name == CLASSIFIER_MODEL:
            return ECGTransformerClassifier(cfg)
        return ECGTransformer(cfg)

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """fairseq ``.pt`` (``cfg['model']`` + ``model``) or ``*.safetensors`` + ``cfg.json`` in the same folder."""
        path = Path(path)
        if path.suffix == ".safetensors":
            cfg_path = path.parent / CFG_JSON
            if not cfg_path.is_file():
                raise WeightsError(f"{path}: ECG-FM safetensors weights need a {CFG_JSON} beside them")
            state_dict, config = read_weights(path), _model_cfg(_read_cfg_json(cfg_path), cfg_path)
        else:
            state_dict, config = _fairseq_checkpoint(read_weights(path), path)
        state_dict = normalise_weight_norm_keys(state_dict)
        return state_dict, _reconcile_mask_emb(config, state_dict)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"ECG-FM expects (batch, leads, samples), got shape {tuple(x.shape)}")
        return masked_mean_pool(model.extract_features(source=x, padding_mask=None, mask=False)["x"])

    def embedding_dim(self, config: dict[str, Any]) -> int:
        return EcgFmConfig.from_dict(config).encoder_embed_dim

    def detect(self, folder: Path) -> Path | None:
        """``model.safetensors`` + ``cfg.json`` naming a supported model, else exactly one fairseq ``*.pt`` whose
        cfg names one. Several such ``.pt`` files (the Hub repo ships pretrained and finetuned) are ambiguous: a
        :class:`WeightsError` asks to name the file."""
        folder = Path(folder)
        safetensors, cfg_path = folder / SAFETENSORS_FILE, folder / CFG_JSON
        if safetensors.is_file() and cfg_path.is_file():
            cfg = _read_cfg_json(cfg_path)
            model_cfg = cfg.get("model") if isinstance(cfg.get("model"), Mapping) else cfg
            if isinstance(model_cfg, Mapping) and model_cfg.get("_name") in SUPPORTED_MODELS:
                return safetensors
        candidates = [
            p
            for p in sorted(folder.glob("*.pt"))
            if p.is_file() and _peek_pt_model_name(p) in SUPPORTED_MODELS
        ]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise WeightsError(
                f"{folder}: several ECG-FM checkpoints ({names}); name the weights file to load"
            )
        return candidates[0] if candidates else None

    def official_forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
        """``model(source=x, padding_mask=None, mask=False, features_only=True)`` (classifier: its own forward)."""
        if isinstance(model, ECGTransformerClassifier):
            return model(source=x, padding_mask=None)
        return model.extract_features(source=x, padding_mask=None, mask=False)

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        """Attention projections and FFN Linears of every transformer layer (explicit Linears, so LoRA applies)."""
        return ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
