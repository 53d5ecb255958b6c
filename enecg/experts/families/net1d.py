"""ECGFounder (PKUDigitalHealth/ECGFounder): native port of the ``Net1D`` RegNet-like 1-D CNN.

Architecture (from the official ``net1d.py``, re-implemented here): a SAME-padded strided first convolution + Swish,
then stages of bottleneck blocks ``conv1x1 -> grouped convK (stride on the first block of a stage) -> conv1x1``
with Swish before each convolution, squeeze-and-excitation, and a residual path that is max-pooled and zero-padded
in channels where shapes change. ``dense`` maps the time-averaged last stage ("deep features") to the label logits.

State-dict compatibility: the module and parameter names equal the official ones, including the BatchNorm modules
(``first_bn``, ``bn1``..``bn3``) that are constructed but unused when ``use_bn=False`` (as in the published
checkpoints): a strict load still needs their weights and running statistics, and a round trip must keep them.

Checkpoint format: ``torch.save({'state_dict': sd, ...})`` (``.pth``); other top-level entries (optimizer, epoch)
are ignored and a ``module.`` prefix (DataParallel saves) is stripped. The published files carry no config, so
:meth:`Net1DFamily.read_checkpoint` infers it from the tensor shapes. Two constructor arguments leave no trace in
the weights and take the published values: ``stride=2`` (per-stage downsampling) and ``use_bn=use_do=False``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from enecg.experts.family import ExpertFamily, register_family
from enecg.experts.weights import WeightsError, read_weights

# Official constructor arguments that do not change the architecture (accepted and ignored).
_NON_ARCHITECTURAL_KWARGS = frozenset({"verbose", "return_features"})
_DATA_PARALLEL_PREFIX = "module."
_BLOCK_KEY = re.compile(r"^stage_list\.(\d+)\.block_list\.(\d+)\.")
_SIGNATURE_KEYS = ("first_conv.conv.weight", "stage_list.0.block_list.0.conv1.conv.weight")
NON_INFERABLE: tuple[str, ...] = ("stride", "use_bn", "use_do")
"""Constructor arguments the weights do not determine: :func:`infer_net1d_config` gives the published values
(2, False, False); an adapter spec with ``config_from: checkpoint`` sets others in ``config:`` (``{stride: 4}``),
which overrides the inferred config."""


@dataclass(frozen=True)
class Net1DConfig:
    """Constructor arguments of the official ``Net1D`` (defaults = the published ECGFounder 12-lead model)."""

    in_channels: int = field(default=12, metadata={"help": "Input leads (12 or 1 for the published models)."})
    base_filters: int = field(default=64, metadata={"help": "Output channels of the first convolution."})
    ratio: float = field(default=1, metadata={"help": "Bottleneck width = int(stage filters * ratio)."})
    filter_list: tuple[int, ...] = field(
        default=(64, 160, 160, 400, 400, 1024, 1024), metadata={"help": "Output channels of each stage."}
    )
    m_blocks_list: tuple[int, ...] = field(
        default=(2, 2, 2, 3, 3, 4, 4), metadata={"help": "Number of blocks in each stage."}
    )
    kernel_size: int = field(
        default=16, metadata={"help": "Kernel of the first and of the grouped convolutions."}
    )
    stride: int = field(default=2, metadata={"help": "Downsampling of the first block of each stage."})
    groups_width: int = field(
        default=16, metadata={"help": "Channels per group: groups = stage filters // groups_width."}
    )
    n_classes: int = field(default=150, metadata={"help": "Outputs of the `dense` head."})
    use_bn: bool = field(
        default=False, metadata={"help": "Apply the BatchNorm layers (False when published)."}
    )
    use_do: bool = field(default=False, metadata={"help": "Apply dropout (False when published)."})

    def __post_init__(self) -> None:
        if len(self.filter_list) != len(self.m_blocks_list) or not self.filter_list:
            raise ValueError(
                f"Net1D config: filter_list {list(self.filter_list)} and m_blocks_list {list(self.m_blocks_list)} "
                "must be non-empty and of equal length"
            )
        for filters in self.filter_list:
            if filters // self.groups_width < 1 or int(filters * self.ratio) % (filters // self.groups_width):
                raise ValueError(
                    f"Net1D config: {filters} filters with groups_width {self.groups_width} and ratio {self.ratio} "
                    "do not give a valid grouped convolution"
                )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Net1DConfig:
        """Validate a config mapping (the official constructor kwargs); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known - _NON_ARCHITECTURAL_KWARGS)
        if unknown:
            raise ValueError(f"Net1D config: unknown key(s) {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in config.items() if k in known}
        for key in ("filter_list", "m_blocks_list"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, not tuples) of the constructor arguments."""
        data = dataclasses.asdict(self)
        data["filter_list"] = list(self.filter_list)
        data["m_blocks_list"] = list(self.m_blocks_list)
        return data


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class SamePadConv1d(nn.Module):
    """Conv1d with TensorFlow-style SAME padding: output length ``ceil(length / stride)``, extra pad on the right."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        out_length = (length + self.stride - 1) // self.stride
        pad = max(0, (out_length - 1) * self.stride + self.kernel_size - length)
        return self.conv(F.pad(x, (pad // 2, pad - pad // 2)))


class SamePadMaxPool1d(nn.Module):
    """MaxPool1d (stride = kernel) after zero padding by ``kernel - 1`` (as the official code: zeros, not -inf)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = max(0, self.kernel_size - 1)
        return F.max_pool1d(F.pad(x, (pad // 2, pad - pad // 2)), self.kernel_size)


class Net1DBlock(nn.Module):
    """Bottleneck block ``(BN) Swish conv1 -> (BN) Swish convK -> (BN) Swish conv1 -> SE`` + shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        ratio: float,
        kernel_size: int,
        stride: int,
        groups: int,
        downsample: bool,
        is_first_block: bool,
        use_bn: bool,
        use_do: bool,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.downsample = downsample
        self.is_first_block = is_first_block
        self.use_bn = use_bn
        self.use_do = use_do
        middle = int(out_channels * ratio)
        stride = stride if downsample else 1
        # Registration order = official order, so state_dict() lists keys in the published order.
        self.bn1 = nn.BatchNorm1d(in_channels)
        self.do1 = nn.Dropout(p=0.5)
        self.conv1 = SamePadConv1d(in_channels, middle, kernel_size=1, stride=1)
        self.bn2 = nn.BatchNorm1d(middle)
        self.do2 = nn.Dropout(p=0.5)
        self.conv2 = SamePadConv1d(middle, middle, kernel_size=kernel_size, stride=stride, groups=groups)
        self.bn3 = nn.BatchNorm1d(middle)
        self.do3 = nn.Dropout(p=0.5)
        self.conv3 = SamePadConv1d(middle, out_channels, kernel_size=1, stride=1)
        self.se_fc1 = nn.Linear(out_channels, out_channels // 2)
        self.se_fc2 = nn.Linear(out_channels // 2, out_channels)
        self.max_pool = SamePadMaxPool1d(stride) if downsample else None

    def _pre(self, x: torch.Tensor, bn: nn.BatchNorm1d, dropout: nn.Dropout) -> torch.Tensor:
        if self.use_bn:
            x = bn(x)
        x = _swish(x)
        return dropout(x) if self.use_do else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.is_first_block else self._pre(x, self.bn1, self.do1)
        out = self.conv1(out)
        out = self.conv2(self._pre(out, self.bn2, self.do2))
        out = self.conv3(self._pre(out, self.bn3, self.do3))

        excitation = torch.sigmoid(self.se_fc2(_swish(self.se_fc1(out.mean(-1)))))
        out = out * excitation.unsqueeze(-1)

        identity = self.max_pool(x) if self.max_pool is not None else x
        if self.out_channels != self.in_channels:
            # Zero channels split around the identity (more on the high side), as the official code.
            extra = self.out_channels - self.in_channels
            identity = F.pad(identity, (0, 0, extra // 2, extra - extra // 2))
        return out + identity


class Net1DStage(nn.Module):
    """``m_blocks`` blocks; the first one changes channels and downsamples."""

    def __init__(
        self, in_channels: int, out_channels: int, i_stage: int, m_blocks: int, config: Net1DConfig
    ) -> None:
        super().__init__()
        self.block_list = nn.ModuleList(
            Net1DBlock(
                in_channels if i_block == 0 else out_channels,
                out_channels,
                ratio=config.ratio,
                kernel_size=config.kernel_size,
                stride=config.stride,
                groups=out_channels // config.groups_width,
                downsample=i_block == 0,
                is_first_block=i_stage == 0 and i_block == 0,
                use_bn=config.use_bn,
                use_do=config.use_do,
            )
            for i_block in range(m_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


class Net1D(nn.Module):
    """Native ECGFounder Net1D. Input ``(B, leads, samples)``; ``forward`` returns logits ``(B, n_classes)``."""

    def __init__(self, config: Net1DConfig) -> None:
        super().__init__()
        self.config = config
        self.first_conv = SamePadConv1d(config.in_channels, config.base_filters, config.kernel_size, stride=2)
        self.first_bn = nn.BatchNorm1d(config.base_filters)
        self.stage_list = nn.ModuleList()
        in_channels = config.base_filters
        for i_stage, (filters, m_blocks) in enumerate(zip(config.filter_list, config.m_blocks_list)):
            self.stage_list.append(Net1DStage(in_channels, filters, i_stage, m_blocks, config))
            in_channels = filters
        self.dense = nn.Linear(in_channels, config.n_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features: the last stage averaged over time, ``(B, filter_list[-1])`` (the input of ``dense``)."""
        out = self.first_conv(x)
        if self.config.use_bn:
            out = self.first_bn(out)
        out = _swish(out)
        for stage in self.stage_list:
            out = stage(out)
        return out.mean(-1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        """Logits, or ``(logits, deep_features)`` with ``return_features`` (the official tuple)."""
        features = self.forward_features(x)
        logits = self.dense(features)
        return (logits, features) if return_features else logits


# ---------------------------------------------------------------------------------------------------------------
# Reading published checkpoints


def _strip_data_parallel_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state_dict):
        return {k[len(_DATA_PARALLEL_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if "state_dict" in obj:
        state_dict = obj["state_dict"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj  # a bare state dict (e.g. a safetensors conversion)
    else:
        raise WeightsError(f"{path}: no 'state_dict' entry (top-level keys: {sorted(map(str, obj))[:10]})")
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise WeightsError(f"{path}: 'state_dict' is not a mapping of tensors")
    return _strip_data_parallel_prefix(state_dict)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state_dict:
        raise WeightsError(f"{path}: not a Net1D checkpoint: missing {key!r}")
    return tuple(state_dict[key].shape)


def infer_net1d_config(state_dict: Mapping[str, torch.Tensor], path: Path) -> Net1DConfig:
    """Recover the ``Net1D`` constructor arguments from the tensor shapes of a state dict.

    ``stride`` (per-stage downsampling) and ``use_bn``/``use_do`` (:data:`NON_INFERABLE`) leave no trace in the
    weights; they take the published values (2, False, False). A variant with other values is loaded with a spec
    that sets them (``config_from: checkpoint`` + ``config: {stride: 4}``: the spec's entries override these).
    """
    base_filters, in_channels, kernel_size = _shape(state_dict, "first_conv.conv.weight", path)
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    n_stages = len(blocks)
    if n_stages == 0 or sorted(blocks) != list(range(n_stages)):
        raise WeightsError(f"{path}: not a Net1D checkpoint: stages {sorted(blocks)} are not 0..n-1")
    m_blocks_list, filter_list, middles, groups = [], [], [], []
    for i_stage in range(n_stages):
        if sorted(blocks[i_stage]) != list(range(len(blocks[i_stage]))):
            raise WeightsError(f"{path}: stage {i_stage} has non-contiguous blocks {sorted(blocks[i_stage])}")
        m_blocks_list.append(len(blocks[i_stage]))
        prefix = f"stage_list.{i_stage}.block_list.0."
        filter_list.append(_shape(state_dict, prefix + "conv3.conv.weight", path)[0])
        middle, per_group, stage_kernel = _shape(state_dict, prefix + "conv2.conv.weight", path)
        if stage_kernel != kernel_size:
            raise WeightsError(
                f"{path}: stage {i_stage} kernel {stage_kernel} differs from the first conv's {kernel_size}"
            )
        middles.append(middle)
        groups.append(middle // per_group)

    ratio: float = middles[0] / filter_list[0]
    if ratio.is_integer():
        ratio = int(ratio)
    if any(int(f * ratio) != m for f, m in zip(filter_list, middles)):
        raise WeightsError(
            f"{path}: bottleneck widths {middles} are not one ratio of the filters {filter_list}"
        )
    groups_width = _infer_groups_width(filter_list, groups, preferred=filter_list[0] // groups[0])
    if groups_width is None:
        raise WeightsError(
            f"{path}: no groups_width gives the grouped-conv groups {groups} for filters {filter_list}"
        )
    n_classes, dense_in = _shape(state_dict, "dense.weight", path)
    if dense_in != filter_list[-1]:
        raise WeightsError(
            f"{path}: dense takes {dense_in} features but the last stage has {filter_list[-1]}"
        )
    # stride, use_bn and use_do (NON_INFERABLE) leave no trace in the tensors: the published values here; a spec
    # sets others in its `config:` (merged over this inferred config, e.g. `config: {stride: 4}`).
    return Net1DConfig(
        in_channels=in_channels,
        base_filters=base_filters,
        ratio=ratio,
        filter_list=tuple(filter_list),
        m_blocks_list=tuple(m_blocks_list),
        kernel_size=kernel_size,
        stride=2,
        groups_width=groups_width,
        n_classes=n_classes,
        use_bn=False,
        use_do=False,
    )


def _infer_groups_width(filter_list: list[int], groups: list[int], preferred: int) -> int | None:
    """A width w with ``filters // w == groups`` for every stage (the official rule), preferring ``preferred``."""

    def fits(width: int) -> bool:
        return width > 0 and all(f // width == g for f, g in zip(filter_list, groups))

    if fits(preferred):
        return preferred
    return next((w for w in range(1, max(filter_list) + 1) if fits(w)), None)


def _peek_is_net1d(path: Path) -> bool:
    """Cheap check of a ``.pth``: memory-mapped, weights-only load; True if it holds a Net1D state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) pickles cannot be memory-mapped; unsafe ones are refused: not ours
        try:
            obj = read_weights(path)
        except WeightsError:
            return False
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return False
    keys = _strip_data_parallel_prefix(obj["state_dict"]).keys()
    return all(k in keys for k in _SIGNATURE_KEYS)


@register_family
class Net1DFamily(ExpertFamily):
    """ECGFounder's Net1D. Embedding: the last stage averaged over time (``filter_list[-1]``, 1024 published)."""

    name = "net1d"

    def build(self, config: dict[str, Any]) -> nn.Module:
        return Net1D(Net1DConfig.from_dict(config))

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """``.pth`` with a ``state_dict`` entry (or a bare state dict / safetensors) -> (state dict, inferred config)."""
        path = Path(path)
        state_dict = _extract_state_dict(read_weights(path), path)
        return state_dict, infer_net1d_config(state_dict, path).to_dict()

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"Net1D expects (batch, leads, samples), got shape {tuple(x.shape)}")
        return model.forward_features(x)

    def embedding_dim(self, config: dict[str, Any]) -> int:
        return Net1DConfig.from_dict(config).filter_list[-1]

    def detect(self, folder: Path) -> Path | None:
        """A folder holding exactly one ``*.pth`` with a Net1D ``state_dict`` (the published layout).

        Several such files (the Hub repo ships ``12_lead_ECGFounder.pth`` and ``1_lead_ECGFounder.pth``) are
        ambiguous: a :class:`WeightsError` asks to name the file."""
        folder = Path(folder)
        candidates = [p for p in sorted(folder.glob("*.pth")) if p.is_file() and _peek_is_net1d(p)]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise WeightsError(
                f"{folder}: several Net1D checkpoints ({names}); name the weights file to load"
            )
        return candidates[0] if candidates else None

    def official_forward(self, model: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
        """``Net1D(..., return_features=True)(x)``: ``(logits, deep_features)``."""
        return model(x, return_features=True)

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        """The pointwise (1x1, ungrouped) convolutions of every block: most of the mixing capacity, and a plain
        ``nn.Conv1d`` peft wraps without group constraints."""
        return ["conv1.conv", "conv3.conv"]
