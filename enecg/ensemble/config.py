"""Configuration of an enecg ensemble: experts, tasks, heads, LoRA, gate and task weighting.

:class:`EnsembleConfig` is a plain dataclass tree that round-trips through JSON (``to_dict`` / ``from_dict``,
unknown keys are errors at every level) and is saved next to the weights as ``config.json``. Everything the
model needs to be rebuilt is here, including the exact revision of every expert, so a shared ensemble re-loads
the same expert weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar, Literal

from enecg.contract import InputContract
from enecg.data.schema import TaskInfo
from enecg.ensemble.registries import GATES, TASK_TYPES
from enecg.utils.config import ConfigMixin, decode
from enecg.utils.files import write_text_atomic

CONFIG_FILE = "config.json"
# Major version of the saved-ensemble layout (config.json + model.safetensors + adapters/). Bump it when a saved
# folder can no longer be read correctly by older code; readers refuse newer versions.
FORMAT_VERSION = 1

RegressionLoss = Literal["mse", "huber"]
Activation = Literal["relu", "gelu", "silu", "tanh"]
Combine = Literal["predictions", "embeddings"]
MixSpace = Literal["probabilities", "logits"]
TaskWeighting = Literal["static", "uncertainty"]

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
# Names become nn.ModuleDict keys and parts of peft target patterns: no dots/slashes, and no tuner prefix
# (peft treats modules named ``lora_*`` as its own).
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _enecg_version() -> str:
    try:
        return version("enecg")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must be a non-empty string of letters, digits, '_' or '-'")
    if name.startswith("lora_"):
        raise ValueError(f"{kind} name {name!r} must not start with 'lora_' (peft reserves that prefix)")


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")


def check_format_version(found: Any, written_by: Any = None) -> None:
    """Refuse a saved layout this enecg cannot read (checked before any other key, whose meaning may differ)."""
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise ValueError(f"format_version must be a positive integer, got {found!r}")
    if found > FORMAT_VERSION:
        who = f" (written by enecg {written_by})" if written_by else ""
        raise ValueError(
            f"saved with ensemble format version {found}{who}, but this enecg ({_enecg_version()}) reads "
            f"format versions up to {FORMAT_VERSION}: upgrade enecg"
        )


@dataclass
class ExpertRef(ConfigMixin):
    """One expert of the ensemble: which published model, at which exact revision, with which adapter spec."""

    config_name: ClassVar[str] = "experts[]"

    name: str = field(
        metadata={"help": "Short key of the expert in the ensemble (module name), e.g. 'ecg_fm'."}
    )
    hub_id: str = field(metadata={"help": "Hub ID (or local path) the expert's weights come from."})
    embedding_dim: int = field(metadata={"help": "Size D of the expert's pooled embedding (B, D)."})
    revision: str | None = field(
        default=None,
        metadata={"help": "Resolved revision (commit sha) of hub_id, so a reload gets the same weights."},
    )
    spec: str | dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Adapter spec: the name of a bundled spec or the spec mapping itself."},
    )
    lora_target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Module names (peft suffix semantics) of the expert's own layers that get LoRA when "
            "lora.on_experts is true (from the spec / family defaults)."
        },
    )
    weights_sha256: str | None = field(
        default=None,
        metadata={
            "help": "SHA-256 of the expert's weights file when the ensemble was saved: a reload refuses "
            "other weights (a moved branch, a changed local folder)."
        },
    )

    def __post_init__(self) -> None:
        _check_name("expert", self.name)
        if not isinstance(self.hub_id, str) or not self.hub_id:
            raise ValueError(f"expert {self.name!r}: hub_id must be a non-empty string")
        if not isinstance(self.embedding_dim, int) or self.embedding_dim <= 0:
            raise ValueError(
                f"expert {self.name!r}: embedding_dim must be a positive int, got {self.embedding_dim!r}"
            )
        self.lora_target_modules = list(self.lora_target_modules)
        if self.weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(self.weights_sha256)):
            raise ValueError(
                f"expert {self.name!r}: weights_sha256 must be 64 lower-case hex digits, got {self.weights_sha256!r}"
            )


@dataclass
class TaskConfig(ConfigMixin):
    """One prediction task. Labels arrive as in the dataset schema (NaN = missing)."""

    config_name: ClassVar[str] = "tasks[]"

    name: str = field(metadata={"help": "Task name = label column name in the dataset."})
    # str, not a Literal: any registered task type (enecg.ensemble.registries.TASK_TYPES) is valid.
    type: str = field(
        metadata={"help": "multilabel | multiclass | binary | regression, or any registered task type"}
    )
    label_names: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Label names: one per output for multilabel/multiclass; at most one for binary/regression."
        },
    )
    loss_weight: float = field(default=1.0, metadata={"help": "Static weight of this task's loss."})
    target_mean: float | None = field(
        default=None,
        metadata={"help": "Regression: targets are normalised as (y - mean) / std before the loss."},
    )
    target_std: float | None = field(
        default=None, metadata={"help": "Regression: normalisation scale (> 0)."}
    )
    regression_loss: RegressionLoss = field(
        default="mse", metadata={"help": "Regression loss on normalised targets: 'mse' or 'huber'."}
    )
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold (in normalised units)."})

    def __post_init__(self) -> None:
        _check_name("task", self.name)
        if self.type not in TASK_TYPES:
            raise ValueError(
                f"task {self.name!r}: type must be one of {TASK_TYPES.names()}, got {self.type!r}"
            )
        self.label_names = [str(n) for n in self.label_names]
        if not self.loss_weight >= 0:
            raise ValueError(f"task {self.name!r}: loss_weight must be >= 0, got {self.loss_weight!r}")
        if (self.target_mean is None) != (self.target_std is None):
            raise ValueError(f"task {self.name!r}: set both target_mean and target_std, or neither")
        if self.target_std is not None and not self.target_std > 0:
            raise ValueError(f"task {self.name!r}: target_std must be > 0, got {self.target_std!r}")
        _check_choice(f"task {self.name!r}: regression_loss", self.regression_loss, ("mse", "huber"))
        if not self.huber_delta > 0:
            raise ValueError(f"task {self.name!r}: huber_delta must be > 0")
        TASK_TYPES.get(self.type).check_config(self)  # label counts and settings this type needs

    @property
    def num_outputs(self) -> int:
        """Width of the head's output layer (1 for scalar types: binary, regression)."""
        return TASK_TYPES.get(self.type).outputs_for(len(self.label_names))

    @classmethod
    def from_task_info(cls, info: TaskInfo, **overrides: Any) -> TaskConfig:
        """Build from a dataset's :class:`~enecg.data.schema.TaskInfo` (``overrides``: loss_weight, target_mean...).

        A binary task whose dataset names both classes (``[negative, positive]``, e.g. PTB-XL sex ``[male, female]``
        for 0/1) keeps the positive name: the head predicts the probability of label 1."""
        names = list(info.names)
        if info.type == "binary" and len(names) == 2:
            names = names[1:]
        return cls(name=info.name, type=info.type, label_names=names, **overrides)


@dataclass
class HeadSettings(ConfigMixin):
    """The per-expert task heads (the paper: a new MLP in -> 256 -> 256 -> out per expert)."""

    config_name: ClassVar[str] = "heads"

    hidden_sizes: list[int] = field(
        default_factory=lambda: [256, 256], metadata={"help": "Hidden layer widths."}
    )
    activation: Activation = field(default="relu", metadata={"help": "relu | gelu | silu | tanh"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout after each hidden activation."})
    input_norm: Literal["layernorm", "none"] = field(
        default="layernorm",
        metadata={
            "help": "LayerNorm on the embedding before the head: FMs' embeddings differ in scale by orders of "
            "magnitude (the paper has none)."
        },
    )
    expert_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an auxiliary loss on each expert's own predictions (records routed to it), "
            "so every head learns even where the gate gives it little weight."
        },
    )

    def __post_init__(self) -> None:
        self.hidden_sizes = [int(h) for h in self.hidden_sizes]
        if any(h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"heads.hidden_sizes must be positive, got {self.hidden_sizes}")
        _check_choice("heads.activation", self.activation, ACTIVATIONS)
        _check_choice("heads.input_norm", self.input_norm, ("layernorm", "none"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"heads.dropout must be in [0, 1), got {self.dropout}")
        if not self.expert_loss_weight >= 0:
            raise ValueError("heads.expert_loss_weight must be >= 0")


@dataclass
class LoraSettings(ConfigMixin):
    """LoRA (peft) on the heads and/or on the experts' own layers.

    Heads are trained in every mode: their base weights always stay trainable (the released EnECG code froze them
    at random initialisation). With ``on_heads`` the first ``head_layers`` Linear layers of each head also get a
    LoRA update (the paper's setting); with ``on_experts`` the experts' ``lora_target_modules`` get LoRA while their
    own weights stay frozen.
    """

    config_name: ClassVar[str] = "lora"

    on_heads: bool = field(
        default=True, metadata={"help": "LoRA on the first `head_layers` layers of each head."}
    )
    head_layers: int = field(default=2, metadata={"help": "How many leading head Linear layers get LoRA."})
    on_experts: bool = field(
        default=False, metadata={"help": "LoRA on the experts' own layers (ExpertRef.lora_target_modules)."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch input."})

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"lora.r and lora.alpha must be > 0, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.head_layers < 1:
            raise ValueError(f"lora.head_layers must be >= 1, got {self.head_layers}")

    @property
    def enabled(self) -> bool:
        return self.on_heads or self.on_experts


def _default_gate_contract() -> dict[str, Any]:
    # A cheap raw-signal summary: lead II, 10 s at 100 Hz. (The paper feeds 5000 raw lead-II samples at 500 Hz;
    # routing needs rhythm and morphology at a coarse scale, not 500 Hz detail.)
    return InputContract(
        fs=100.0, leads=("II",), length=1000, bandpass=(0.5, 40.0), scaling="zscore_lead"
    ).to_dict()


@dataclass
class GateSettings(ConfigMixin):
    """The mixture-of-experts gate (this project's own module: peft has no router)."""

    config_name: ClassVar[str] = "gate"

    # str, not a Literal: any registered gate kind (enecg.ensemble.registries.GATES) is valid.
    input: str = field(
        default="signal",
        metadata={
            "help": "'signal': an MLP on a raw-signal summary prepared with `contract` (the paper: raw lead "
            "II); 'embeddings': an MLP on the experts' (layer-normalised, concatenated) embeddings; "
            "'global': learned weights (per task with per_task) that are the same for every record; "
            "'uniform': fixed equal weights (a plain average ensemble)."
        },
    )
    contract: dict[str, Any] = field(
        default_factory=_default_gate_contract,
        metadata={"help": "InputContract of the signal gate's input (needs `leads` and `length`)."},
    )
    hidden_sizes: list[int] = field(
        default_factory=lambda: [256], metadata={"help": "Gate MLP hidden widths."}
    )
    activation: Activation = field(default="relu", metadata={"help": "relu | gelu | silu | tanh"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout in the gate MLP."})
    detach_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Embedding gate: stop gradients from the router into the experts (matters with LoRA on "
            "experts: the router should not reshape the features it routes on)."
        },
    )
    per_task: bool = field(default=False, metadata={"help": "One weight vector per task (else one shared)."})
    init_uniform: bool = field(
        default=True,
        metadata={
            "help": "Dense routing: start the router's output layer at zero, so every record starts at the "
            "uniform mixture (the plain average) and moves away from it only as far as the data supports "
            "(top-k routers keep a random start: equal logits would route every record alike)."
        },
    )
    routing_penalty: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the mean squared record-dependent router logit (centred over experts): shrinks "
            "per-record routing toward the learned per-task weights (the router's bias). Routing learned from "
            "a few hundred records rarely generalises; this is how much of it to keep."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Sparse routing: renormalised softmax over the k largest router logits; None: dense."
        },
    )
    noisy_top_k: bool = field(
        default=False,
        metadata={"help": "Training only: add learned Gaussian noise to router logits (Shazeer 2017)."},
    )
    load_balance_weight: float = field(
        default=0.0, metadata={"help": "Weight of the Switch-style load-balance loss E * sum_e f_e * P_e."}
    )
    entropy_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the mean router entropy: > 0 favours confident routing, < 0 spreads it."
        },
    )
    combine: Combine = field(
        default="predictions",
        metadata={
            "help": "'predictions': weight the experts' per-task predictions (the paper); 'embeddings': "
            "weight per-expert projections of the embeddings and apply one shared head per task."
        },
    )
    projection_dim: int = field(
        default=256, metadata={"help": "combine='embeddings': width of the projections."}
    )
    mix: MixSpace = field(
        default="probabilities",
        metadata={
            "help": "combine='predictions', classification: mix the experts' probabilities (a proper "
            "mixture distribution; the paper mixes predictions) or their logits."
        },
    )

    def __post_init__(self) -> None:
        if self.input not in GATES:
            raise ValueError(f"gate.input must be one of {GATES.names()}, got {self.input!r}")
        _check_choice("gate.activation", self.activation, ACTIVATIONS)
        _check_choice("gate.combine", self.combine, ("predictions", "embeddings"))
        _check_choice("gate.mix", self.mix, ("probabilities", "logits"))
        self.hidden_sizes = [int(h) for h in self.hidden_sizes]
        if any(h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"gate.hidden_sizes must be positive, got {self.hidden_sizes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"gate.dropout must be in [0, 1), got {self.dropout}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"gate.top_k must be >= 1 or null, got {self.top_k}")
        if not self.routing_penalty >= 0:
            raise ValueError(f"gate.routing_penalty must be >= 0, got {self.routing_penalty!r}")
        if self.noisy_top_k and self.top_k is None:
            raise ValueError("gate.noisy_top_k needs gate.top_k")
        if self.projection_dim <= 0:
            raise ValueError("gate.projection_dim must be > 0")
        if self.load_balance_weight < 0:
            raise ValueError("gate.load_balance_weight must be >= 0")
        GATES.get(self.input).check_settings(self)  # what this kind of gate needs of the other settings

    def input_contract(self) -> InputContract:
        """The signal gate's :class:`~enecg.contract.InputContract`."""
        return InputContract.from_dict(self.contract)

    @property
    def signal_features(self) -> int:
        """Input size of the signal gate: leads x length of one window."""
        contract = self.input_contract()
        return len(contract.leads or ()) * int(contract.length or 0)


@dataclass
class EnsembleConfig(ConfigMixin):
    """Everything needed to rebuild an ensemble (saved as ``config.json``)."""

    config_name: ClassVar[str] = "ensemble config"

    experts: list[ExpertRef] = field(metadata={"help": "The experts, in gate order."})
    tasks: list[TaskConfig] = field(metadata={"help": "The tasks trained jointly."})
    heads: HeadSettings = field(default_factory=HeadSettings, metadata={"help": "Per-expert head settings."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings."})
    gate: GateSettings = field(default_factory=GateSettings, metadata={"help": "Gate settings."})
    task_weighting: TaskWeighting = field(
        default="static",
        metadata={
            "help": "'static': sum of loss_weight * loss; 'uncertainty': learned homoscedastic-uncertainty "
            "weights (Kendall et al. 2018) on top of loss_weight."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the heads', gate's and LoRA's initialisation."})
    enecg_version: str = field(
        default_factory=_enecg_version, metadata={"help": "enecg version that wrote this."}
    )
    format_version: int = field(
        default=FORMAT_VERSION,
        metadata={"help": "Major version of the saved layout; enecg refuses folders of a newer one."},
    )

    def __post_init__(self) -> None:
        self.experts = [e if isinstance(e, ExpertRef) else ExpertRef.from_dict(e) for e in self.experts]
        self.tasks = [t if isinstance(t, TaskConfig) else TaskConfig.from_dict(t) for t in self.tasks]
        if isinstance(self.heads, dict):
            self.heads = HeadSettings.from_dict(self.heads)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings.from_dict(self.lora)
        if isinstance(self.gate, dict):
            self.gate = GateSettings.from_dict(self.gate)
        if not self.experts:
            raise ValueError("an ensemble needs at least one expert")
        if not self.tasks:
            raise ValueError("an ensemble needs at least one task")
        for kind, names in (("expert", self.expert_names), ("task", self.task_names)):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names {duplicates}")
        _check_choice("task_weighting", self.task_weighting, ("static", "uncertainty"))
        if self.gate.top_k is not None and self.gate.top_k > len(self.experts):
            raise ValueError(
                f"gate.top_k={self.gate.top_k} exceeds the number of experts ({len(self.experts)})"
            )
        if self.gate.combine == "embeddings" and self.lora.on_heads:
            raise ValueError(
                "lora.on_heads adds LoRA to per-expert heads, but gate.combine='embeddings' uses shared heads "
                "(trained fully): set lora.on_heads=false"
            )
        if self.lora.on_experts:
            missing = [e.name for e in self.experts if not e.lora_target_modules]
            if missing:
                raise ValueError(f"lora.on_experts is set but experts {missing} have no lora_target_modules")

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def expert(self, name: str) -> ExpertRef:
        for ref in self.experts:
            if ref.name == name:
                return ref
        raise KeyError(f"no expert {name!r}; experts: {self.expert_names}")

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; tasks: {self.task_names}")

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> EnsembleConfig:
        """Build from a mapping; unknown keys are errors at every level, a newer ``format_version`` too."""
        if isinstance(data, dict):
            check_format_version(data.get("format_version", FORMAT_VERSION), data.get("enecg_version"))
        return decode(cls, data, source or cls.config_name)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EnsembleConfig:
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write :data:`CONFIG_FILE` into ``directory`` atomically; returns its path."""
        path = Path(directory) / CONFIG_FILE
        write_text_atomic(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EnsembleConfig:
        """Read a ``config.json`` (or a folder holding one); errors name the file."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no ensemble config file") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
