"""The enecg ensemble: frozen experts, per-expert heads with LoRA (peft), an MoE gate, multi-task losses."""

from enecg.ensemble.config import (
    CONFIG_FILE,
    FORMAT_VERSION,
    EnsembleConfig,
    ExpertRef,
    GateSettings,
    HeadSettings,
    LoraSettings,
    TaskConfig,
)
from enecg.ensemble.factory import create_ensemble, expert_ref
from enecg.ensemble.gates import (
    Gate,
    GateOutput,
    build_gate,
    load_balance_loss,
    register_gate,
    router_entropy,
)
from enecg.ensemble.heads import ExpertBranch, TaskHead
from enecg.ensemble.lora import adapter_state_dict, check_lora_targets, save_adapter, wrap_branch
from enecg.ensemble.model import Ensemble, EnsembleOutput
from enecg.ensemble.prediction import RecordPrediction, TaskPrediction, compare_predictions, predict_records
from enecg.ensemble.serialization import EnsembleLoadError, load_pretrained, save_pretrained
from enecg.ensemble.tasks import Task, build_task, register_task_type

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "Ensemble",
    "EnsembleConfig",
    "EnsembleLoadError",
    "EnsembleOutput",
    "ExpertBranch",
    "ExpertRef",
    "Gate",
    "GateOutput",
    "GateSettings",
    "HeadSettings",
    "LoraSettings",
    "RecordPrediction",
    "Task",
    "TaskConfig",
    "TaskHead",
    "TaskPrediction",
    "adapter_state_dict",
    "build_gate",
    "build_task",
    "check_lora_targets",
    "compare_predictions",
    "create_ensemble",
    "expert_ref",
    "load_balance_loss",
    "load_pretrained",
    "predict_records",
    "register_gate",
    "register_task_type",
    "router_entropy",
    "save_adapter",
    "save_pretrained",
    "wrap_branch",
]
