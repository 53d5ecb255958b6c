"""Light CNN experts: AttiaNet, DeepResidualCNN, ParallelCNN, ParallelCNNew and SimpleNet (family ``light``).

Source: "Efficient Neural Architectures for Real-Time ECG Interpretation on Limited Hardware" (arXiv
2605.09848). The paper describes the five models at a high level only; this module documents, per class, what
comes from the paper or from the cited originals and what is our choice.

**What the paper gives** (abstract-level description):

- *AttiaNet*: a compact baseline "composed of sequential temporal and spatial blocks" (Attia et al., Nat. Med.
  2019, low-EF screening; Attia et al., Circ. Arrhythm. Electrophysiol. 2019, age/sex estimation).
- *DeepResidualCNN*: "the winning architecture of the 2021 PhysioNet/Computing in Cardiology Challenge".
- *ParallelCNN*: "dual temporal and spatial branches for parallel pattern extraction".
- *ParallelCNNew*: ParallelCNN "with symmetric weight initialization for balanced feature learning".
- *SimpleNet*: "a streamlined architecture that jointly processes temporal and spatial dimensions".
- Optional fusion of "low-cost demographic metadata (age and sex)".

**What we chose** (and why), common to all five:

- Input ``(batch, in_leads, input_length)`` float32, e.g. PTB-XL 12 leads x 1000 samples (100 Hz, 10 s). The
  length is checked exactly: a model fed another rate or length gives silently wrong features, so it refuses.
- *Temporal* layers convolve along time only, with weights shared by every lead (``Conv2d`` kernels ``(1, k)``
  on the ECG seen as a one-channel ``leads x time`` image, as in Attia et al.). *Spatial* layers combine
  leads.
- Every backbone ends in a length-agnostic global pooling over time, giving pooled features ``(B, F)``; then
  ``projection = Linear(F [+ demographics], embedding_dim) + ReLU`` is the embedding the ensemble uses
  (:meth:`LightCNN.features`), and ``classifier = Dropout + Linear(embedding_dim, n_outputs)`` gives the
  logits of standalone training (:meth:`LightCNN.forward`).
- Demographics (:class:`DemographicsEncoder`): the caller passes the *raw* values ``(B, 2) = (age in years,
  sex with 0 = male, 1 = female)`` (the PTB-XL coding), NaN where unknown. The model encodes them itself as
  ``[clip(age, 0, 100) / 100, age_missing, sex, sex_missing]`` (missing values become 0 with their flag set to
  1; PTB-XL codes ages over 89 as 300, which the clip maps to 1.0), then a small MLP ``Linear(4, 16) + ReLU``;
  its output is concatenated to the pooled ECG features before the projection. Keeping the encoding inside the
  model means the ensemble never needs to know it. A model built with ``use_demographics`` refuses a call
  without them (pass an all-NaN tensor to say "unknown"); a model built without refuses them rather than
  ignore them.
- Convolutions are initialised with Kaiming-normal (fan-in, ReLU gain), BatchNorm with (1, 0), Linear layers
  with PyTorch's default. Channel counts scale with ``width_multiplier``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from enecg.experts.family import ExpertFamily, register_family
from enecg.experts.inhouse import CONFIG_FILE, EXPERT_SPEC_FILE, read_inhouse_config, read_inhouse_spec
from enecg.experts.weights import WeightsError, read_weights
from enecg.utils.config import ConfigMixin

DEMOGRAPHIC_FEATURES = 4  # age/100, age_missing, sex, sex_missing
AGE_SCALE_YEARS = 100.0


@dataclass
class LightCNNConfig(ConfigMixin):
    """Configuration shared by the five light CNN architectures (stored in ``config.json`` / the expert
    spec)."""

    config_name: ClassVar[str] = "light config"

    architecture: str = field(
        default="SimpleNet",
        metadata={"help": "One of AttiaNet, DeepResidualCNN, ParallelCNN, ParallelCNNew, SimpleNet."},
    )
    in_leads: int = field(default=12, metadata={"help": "Number of input leads (channels), e.g. 12 or 1."})
    input_length: int = field(
        default=1000, metadata={"help": "Samples per input window; inputs of any other length are refused."}
    )
    fs: float = field(
        default=100.0, metadata={"help": "Sampling rate in Hz the model is trained at (recorded)."}
    )
    width_multiplier: float = field(default=1.0, metadata={"help": "Scales every layer's channel count."})
    embedding_dim: int = field(
        default=128, metadata={"help": "Size D of the embedding `features()` returns."}
    )
    n_outputs: int = field(default=5, metadata={"help": "Logits of the standalone classification head."})
    use_demographics: bool = field(
        default=False, metadata={"help": "Fuse (age, sex) into the embedding through a small MLP."}
    )
    demographics_hidden: int = field(default=16, metadata={"help": "Width of the demographics MLP output."})
    dropout: float = field(default=0.5, metadata={"help": "Dropout before the standalone classifier."})

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown light architecture {self.architecture!r}; known: {sorted(ARCHITECTURES)}"
            )
        for name in ("in_leads", "input_length", "embedding_dim", "n_outputs", "demographics_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"light config: {name} must be >= 1, got {getattr(self, name)}")
        if self.width_multiplier <= 0:
            raise ValueError(f"light config: width_multiplier must be > 0, got {self.width_multiplier}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"light config: dropout must be in [0, 1), got {self.dropout}")


def _scaled(channels: int, multiplier: float, multiple: int = 1) -> int:
    """``channels * multiplier`` rounded to a positive multiple of ``multiple``."""
    return max(multiple, round(channels * multiplier / multiple) * multiple)


def _init_weights(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class DemographicsEncoder(nn.Module):
    """Raw ``(age_years, sex)`` with NaN = unknown -> ``(B, hidden)`` features (see the module docstring)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(DEMOGRAPHIC_FEATURES, hidden), nn.ReLU())

    @staticmethod
    def encode(demographics: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` raw values -> ``(B, 4)`` = ``[age/100, age_missing, sex, sex_missing]``, NaN-free."""
        age, sex = demographics[:, 0], demographics[:, 1]
        age_missing, sex_missing = torch.isnan(age), torch.isnan(sex)
        age = torch.where(
            age_missing, torch.zeros_like(age), age.clamp(0.0, AGE_SCALE_YEARS) / AGE_SCALE_YEARS
        )
        sex = torch.where(sex_missing, torch.zeros_like(sex), sex)
        return torch.stack([age, age_missing.to(age.dtype), sex, sex_missing.to(sex.dtype)], dim=1)

    def forward(self, demographics: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encode(demographics))


class LightCNN(nn.Module):
    """Base of the five models: a backbone giving pooled features, optional demographics, projection, head.

    Subclasses build their layers in ``__init__`` (after calling this one with their pooled size) and
    implement :meth:`pooled`.
    """

    architecture: ClassVar[str]

    def __init__(self, config: LightCNNConfig, pooled_dim: int) -> None:
        super().__init__()
        self.config = config
        self.pooled_dim = pooled_dim
        fused = pooled_dim
        self.demographics: DemographicsEncoder | None = None
        if config.use_demographics:
            self.demographics = DemographicsEncoder(config.demographics_hidden)
            fused += config.demographics_hidden
        self.projection = nn.Sequential(nn.Linear(fused, config.embedding_dim), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(config.embedding_dim, config.n_outputs)
        )

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone: ``(B, leads, length)`` -> pooled ECG features ``(B, pooled_dim)``."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor, demographics: torch.Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 3 or x.shape[1] != cfg.in_leads or x.shape[2] != cfg.input_length:
            raise ValueError(
                f"{self.architecture} expects input (batch, {cfg.in_leads}, {cfg.input_length}) "
                f"({cfg.input_length / cfg.fs:g} s at {cfg.fs:g} Hz), got {tuple(x.shape)}"
            )
        if cfg.use_demographics:
            if demographics is None:
                raise ValueError(
                    f"{self.architecture} was built with use_demographics: pass demographics (batch, 2) = "
                    "(age years, sex 0 male / 1 female), NaN where unknown"
                )
            if demographics.shape != (x.shape[0], 2):
                raise ValueError(
                    f"{self.architecture}: demographics must be (batch, 2) = (age, sex), "
                    f"got {tuple(demographics.shape)} for a batch of {x.shape[0]}"
                )
        elif demographics is not None:
            raise ValueError(
                f"{self.architecture} was built without use_demographics; do not pass demographics"
            )

    def features(self, x: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding ``(B, embedding_dim)``: pooled ECG features (+ encoded demographics), projected."""
        self._check_input(x, demographics)
        pooled = self.pooled(x)
        if self.demographics is not None:
            assert demographics is not None  # checked above
            pooled = torch.cat([pooled, self.demographics(demographics.to(pooled.dtype))], dim=1)
        return self.projection(pooled)

    def forward(self, x: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        """Standalone classification logits ``(B, n_outputs)`` (apply sigmoid for multi-label)."""
        return self.classifier(self.features(x, demographics))


class AttiaNet(LightCNN):
    """Compact baseline: sequential temporal blocks, then a spatial block (after Attia et al. 2019).

    From the original (Attia et al., Nat. Med. 2019, 500 Hz x 10 s input): the ECG is a one-channel ``leads x
    time`` image; six temporal blocks ``Conv2d (1, k) + BatchNorm + ReLU + MaxPool (1, p)`` with 16, 16, 32,
    32, 64, 64 filters and kernels 7, 5, 5, 5, 5, 3; then one spatial convolution spanning all leads (kernel
    ``(leads, 1)``, 128 filters); then fully-connected layers.

    Our choices: every pool is 2 (x64 overall; the original pools more because it sees 5000 samples, we keep
    ~15 time steps of a 1000-sample input); global average pooling over time after the spatial block (not a
    flatten, so the size is length-independent) gives 128 features; the fully-connected part is the common
    projection + head.
    """

    architecture = "AttiaNet"
    TEMPORAL_CHANNELS = (16, 16, 32, 32, 64, 64)
    TEMPORAL_KERNELS = (7, 5, 5, 5, 5, 3)
    TEMPORAL_POOLS = (2, 2, 2, 2, 2, 2)
    SPATIAL_CHANNELS = 128

    def __init__(self, config: LightCNNConfig) -> None:
        m = config.width_multiplier
        spatial = _scaled(self.SPATIAL_CHANNELS, m)
        super().__init__(config, spatial)
        blocks: list[nn.Module] = []
        c_in = 1
        for channels, kernel, pool in zip(self.TEMPORAL_CHANNELS, self.TEMPORAL_KERNELS, self.TEMPORAL_POOLS):
            c_out = _scaled(channels, m)
            blocks += [
                nn.Conv2d(c_in, c_out, (1, kernel), padding=(0, kernel // 2), bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d((1, pool)),
            ]
            c_in = c_out
        self.temporal = nn.Sequential(*blocks)
        self.spatial = nn.Sequential(
            nn.Conv2d(c_in, spatial, (config.in_leads, 1), bias=False), nn.BatchNorm2d(spatial), nn.ReLU()
        )
        _init_weights(self)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = self.spatial(self.temporal(x.unsqueeze(1)))  # (B, C, 1, T')
        return h.mean(dim=(2, 3))


class _NejedlyResidualBlock(nn.Module):
    """Two ``Conv1d(k=9)`` + BN + leaky ReLU, the first with stride 2; identity = AvgPool(2) + 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 9, stride=2, padding=4, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 9, padding=4, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        # ceil_mode keeps the identity path as long as the strided conv path (ceil(T/2)) for odd lengths;
        # the original only ever saw 8192 samples, a power of two.
        self.shortcut_pool = nn.AvgPool1d(2, stride=2, ceil_mode=True)
        self.shortcut_conv = nn.Conv1d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)))
        out = F.leaky_relu(self.bn2(self.conv2(out)))
        return out + self.shortcut_conv(self.shortcut_pool(x))


class DeepResidualCNN(LightCNN):
    """The PhysioNet/CinC 2021 winner: Nejedly et al., team ISIBrno-AIMT, "Classification of ECG using
    ensemble of residual CNNs with attention mechanism" (CinC 2021). Not the Han/Prna style.

    From the original: stem ``Conv(k=15, stride 2)`` to 256 channels + BN + leaky ReLU; five residual blocks
    each halving the time axis (two ``Conv(k=9)`` + BN + leaky ReLU, shortcut AvgPool(2) + 1x1 conv); dropout
    0.5; ``nn.MultiheadAttention`` (8 heads, dropout 0.2) over the time steps; global max pooling over time.

    Our choices: ``Conv1d`` instead of the original's ``Conv2d`` with ``(1, k)`` kernels on ``(B, 12, 1, T)``
    (the same computation); the shortcut pool uses ``ceil_mode`` so odd lengths (1000 -> 125 -> 63) work; the
    original's 12-value lead-presence indicator concatenated before its head, and its auxiliary
    "challenge-score" head, are left out (contracts zero-fill missing leads; the embedding is the common
    projection). Channels are rounded to a multiple of 8 (the heads). At width 1.0 this is the heavy baseline
    (about 6.6 M parameters).
    """

    architecture = "DeepResidualCNN"
    CHANNELS = 256
    N_BLOCKS = 5
    HEADS = 8

    def __init__(self, config: LightCNNConfig) -> None:
        channels = _scaled(self.CHANNELS, config.width_multiplier, multiple=self.HEADS)
        super().__init__(config, channels)
        self.stem = nn.Conv1d(config.in_leads, channels, 15, stride=2, padding=7, bias=False)
        self.stem_bn = nn.BatchNorm1d(channels)
        self.blocks = nn.Sequential(*(_NejedlyResidualBlock(channels) for _ in range(self.N_BLOCKS)))
        self.attention_dropout = nn.Dropout(0.5)
        self.attention = nn.MultiheadAttention(channels, self.HEADS, dropout=0.2, batch_first=True)
        _init_weights(self)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.stem_bn(self.stem(x)))
        h = self.attention_dropout(self.blocks(h)).transpose(1, 2)  # (B, T', C)
        h, _ = self.attention(h, h, h, need_weights=False)
        return h.amax(dim=1)


class ParallelCNN(LightCNN):
    """Two branches in parallel on the same input, concatenated: temporal patterns and spatial (inter-lead)
    ones.

    From the paper: "dual temporal and spatial branches for parallel pattern extraction", concatenated.

    Our choices: the two branches are mirror images of each other, with the same depth, channels and kernel
    sizes:

    - temporal branch: four blocks ``Conv2d(kernel (1, k)) + BN + ReLU + MaxPool (1, 2)`` on the
      ``leads x time`` image: each lead is filtered along time with shared weights, leads are never mixed;
    - spatial branch: four blocks ``Conv2d(kernel (k, 1), zero 'same' padding) + BN + ReLU + MaxPool (1, 2)``:
      each time step combines neighbouring leads (standard lead order, so limb leads and V1..V6 are
      neighbours) with no temporal kernel; the time pools only summarise.

    Channels 8, 16, 16, 32 and kernels 7, 5, 5, 3: both branches work at the full ``leads x time`` resolution,
    so they are kept narrow (about 21 M multiply-adds per 12 x 1000 input, below AttiaNet's 37 M). Each branch
    is averaged over time and flattened to ``channels x leads`` (keeping which lead a feature comes from,
    which matters for ECG); the two are concatenated (``2 x 32 x leads`` features) before the common
    projection. With one lead the spatial branch reduces to 1x1 convolutions (only the kernels' centre taps
    see data).
    """

    architecture = "ParallelCNN"
    CHANNELS = (8, 16, 16, 32)
    KERNELS = (7, 5, 5, 3)
    POOLS = (2, 2, 2, 2)

    def __init__(self, config: LightCNNConfig) -> None:
        channels = [_scaled(c, config.width_multiplier) for c in self.CHANNELS]
        super().__init__(config, 2 * channels[-1] * config.in_leads)
        self.temporal = self._branch(channels, temporal=True)
        self.spatial = self._branch(channels, temporal=False)
        _init_weights(self)

    def _branch(self, channels: list[int], *, temporal: bool) -> nn.Sequential:
        blocks: list[nn.Module] = []
        c_in = 1
        for c_out, kernel, pool in zip(channels, self.KERNELS, self.POOLS):
            shape, padding = ((1, kernel), (0, kernel // 2)) if temporal else ((kernel, 1), (kernel // 2, 0))
            blocks += [
                nn.Conv2d(c_in, c_out, shape, padding=padding, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d((1, pool)),
            ]
            c_in = c_out
        return nn.Sequential(*blocks)

    def branch_conv_pairs(self) -> Iterator[tuple[nn.Conv2d, nn.Conv2d]]:
        """Matching ``(temporal, spatial)`` convolutions, block by block."""
        temporal = [m for m in self.temporal if isinstance(m, nn.Conv2d)]
        spatial = [m for m in self.spatial if isinstance(m, nn.Conv2d)]
        return zip(temporal, spatial)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        image = x.unsqueeze(1)  # (B, 1, leads, T)
        temporal = self.temporal(image).mean(dim=3).flatten(1)  # (B, C * leads)
        spatial = self.spatial(image).mean(dim=3).flatten(1)
        return torch.cat([temporal, spatial], dim=1)


class ParallelCNNew(ParallelCNN):
    """ParallelCNN with *symmetric* initialisation of its two branches (same architecture, different init).

    From the paper: "symmetric weight initialization for balanced feature learning", no further detail.

    Our definition of *symmetric*: after the usual random initialisation of the temporal branch,

    1. every spatial convolution kernel is set to the **transpose** of the matching temporal kernel:
       ``spatial[i].weight == temporal[i].weight.transpose(2, 3)`` (a ``(1, k)`` time filter becomes the same
       ``(k, 1)`` filter across leads); BatchNorm parameters are already equal (1, 0);
    2. in the projection, the weight columns reading the spatial half of the concatenated features are a copy
       of the columns reading the temporal half (demographics columns, if any, and the bias are untouched).

    So at step 0 both branches carry the same filter bank and the same norm, the fusion layer weighs them
    equally, and neither branch dominates the concatenated features by the luck of its random draw; training
    then lets them diverge (their inputs and so their gradients differ). ParallelCNN draws the two branches
    independently.
    """

    architecture = "ParallelCNNew"

    def __init__(self, config: LightCNNConfig) -> None:
        super().__init__(config)
        self.symmetrize_()

    @torch.no_grad()
    def symmetrize_(self) -> None:
        """Apply the symmetric initialisation (in place); see the class docstring."""
        for temporal, spatial in self.branch_conv_pairs():
            spatial.weight.copy_(temporal.weight.transpose(2, 3))
        half = self.pooled_dim // 2
        weight = self.projection[0].weight
        weight[:, half : 2 * half] = weight[:, :half]


class SimpleNet(LightCNN):
    """Streamlined 1-D CNN: every convolution mixes leads and time jointly.

    From the paper: "a streamlined architecture that jointly processes temporal and spatial dimensions".

    Our choices: the leads are the input channels of four blocks ``Conv1d(k) + BN + ReLU + MaxPool(2)`` with
    32, 64, 64, 128 channels and kernels 7, 5, 5, 3 (each kernel sees all leads over k samples at once), then
    global average pooling over time (128 features).
    """

    architecture = "SimpleNet"
    CHANNELS = (32, 64, 64, 128)
    KERNELS = (7, 5, 5, 3)
    POOLS = (2, 2, 2, 2)

    def __init__(self, config: LightCNNConfig) -> None:
        channels = [_scaled(c, config.width_multiplier) for c in self.CHANNELS]
        super().__init__(config, channels[-1])
        blocks: list[nn.Module] = []
        c_in = config.in_leads
        for c_out, kernel, pool in zip(channels, self.KERNELS, self.POOLS):
            blocks += [
                nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm1d(c_out),
                nn.ReLU(),
                nn.MaxPool1d(pool),
            ]
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        _init_weights(self)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=2)


ARCHITECTURES: dict[str, type[LightCNN]] = {
    cls.architecture: cls for cls in (AttiaNet, DeepResidualCNN, ParallelCNN, ParallelCNNew, SimpleNet)
}


def build_light_model(config: LightCNNConfig | dict[str, Any]) -> LightCNN:
    """Build one of the five architectures from its config (dataclass or mapping)."""
    if not isinstance(config, LightCNNConfig):
        config = LightCNNConfig.from_dict(config)
    return ARCHITECTURES[config.architecture](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_family
class LightCNNFamily(ExpertFamily):
    """The in-house light CNNs as an expert family. Checkpoints are in-house expert folders
    (:mod:`enecg.experts.inhouse`): ``config.json`` + ``model.safetensors`` + ``enecg_expert.json``."""

    name = "light"

    def build(self, config: dict[str, Any]) -> nn.Module:
        return build_light_model(config)

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Read ``model.safetensors`` and, when present, the model config from the sibling ``config.json``."""
        path = Path(path)
        state_dict = read_weights(path)
        if not isinstance(state_dict, dict):
            raise WeightsError(f"{path}: expected a state dict, found {type(state_dict).__name__}")
        config_path = path.parent / CONFIG_FILE
        if not config_path.is_file():
            return state_dict, None
        family, config = read_inhouse_config(config_path)
        if family != self.name:
            raise WeightsError(f"{config_path}: enecg_family is {family!r}, expected {self.name!r}")
        return state_dict, config

    def embed(
        self, model: nn.Module, x: torch.Tensor, demographics: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The projected embedding ``(B, embedding_dim)``; ``demographics`` = raw ``(B, 2)`` (age years, sex
        0/1, NaN = unknown), required exactly when the model was built with ``use_demographics``."""
        return model.features(x, demographics)

    def embedding_dim(self, config: dict[str, Any]) -> int:
        return LightCNNConfig.from_dict(config).embedding_dim

    def uses_demographics(self, config: dict[str, Any]) -> bool:
        """Whether :meth:`embed` needs the ``demographics`` argument for this config."""
        return LightCNNConfig.from_dict(config).use_demographics

    def detect(self, folder: Path) -> Path | None:
        """An in-house expert folder whose ``enecg_expert.json`` names family ``light`` -> its weights
        file."""
        folder = Path(folder)
        if not (folder / EXPERT_SPEC_FILE).is_file():
            return None
        try:
            spec = read_inhouse_spec(folder)
        except ValueError:
            return None
        if spec["family"] != self.name:
            return None
        return folder / spec["weights_file"]

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        """Full names of the backbone's convolutions and of the projection's Linear.

        Left out: the standalone classifier (not used by ``embed``), the demographics MLP, and
        ``nn.MultiheadAttention``'s internals (its ``out_proj`` weight is read directly, so LoRA there would
        never change the output)."""
        model = build_light_model(config)
        excluded = ("classifier.", "demographics.", "attention.")
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not name.startswith(excluded)
        ]


def describe_light_models(in_leads: int = 12, input_length: int = 1000) -> dict[str, int]:
    """Parameter count of each architecture at default width (for reports and the efficiency benchmark)."""
    return {
        name: count_parameters(
            build_light_model(LightCNNConfig(name, in_leads=in_leads, input_length=input_length))
        )
        for name in ARCHITECTURES
    }
