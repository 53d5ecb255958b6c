"""The enecg ensemble: frozen experts, per-expert heads with LoRA (peft), an MoE gate, multi-task losses."""

from enecg.ensemble.config import (
    CONFIG_FILE,
    EnsembleConfig,
    ExpertRef,
    GateSettings,
    HeadSettings,
    LoraSettings,
    TaskConfig,
)
from enecg.ensemble.gate import Gate, GateOutput, load_balance_loss, router_entropy
from enecg.ensemble.heads import ExpertBranch, TaskHead
from enecg.ensemble.lora import adapter_state_dict, check_lora_targets, save_adapter, wrap_branch
from enecg.ensemble.model import Ensemble, EnsembleOutput
from enecg.ensemble.tasks import Task

__all__ = [
    "CONFIG_FILE",
    "Ensemble",
    "EnsembleConfig",
    "EnsembleOutput",
    "ExpertBranch",
    "ExpertRef",
    "Gate",
    "GateOutput",
    "GateSettings",
    "HeadSettings",
    "LoraSettings",
    "Task",
    "TaskConfig",
    "TaskHead",
    "adapter_state_dict",
    "check_lora_targets",
    "load_balance_loss",
    "router_entropy",
    "save_adapter",
    "wrap_branch",
]
