"""enecg: ensembles of pretrained ECG foundation models.

Frozen experts loaded by Hub ID, per-expert task heads adapted with LoRA, a mixture-of-experts gate, multi-task
training with Accelerate, and sharing on the Hugging Face Hub.

Top-level names are imported lazily so that ``import enecg`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from enecg.utils.version import __version__

_LAZY: dict[str, str] = {
    "ECGRecord": "enecg.record",
    "RecordError": "enecg.record",
    "InputContract": "enecg.contract",
    "apply_contract": "enecg.contract",
    "read_record": "enecg.io",
    "load_expert": "enecg.experts",
    "Ensemble": "enecg.ensemble",
    "EnsembleConfig": "enecg.ensemble",
    "create_ensemble": "enecg.ensemble.factory",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'enecg' has no attribute {name!r}")
