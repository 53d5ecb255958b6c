"""The mixture-of-experts gate: per-record weights over the experts (this project's own module; peft has none).

Kinds (``GateSettings.input``), one registered class each (:data:`~enecg.ensemble.registries.GATES`):

* ``signal`` (:mod:`.signal`): an MLP on the raw signal prepared with the gate's own contract; routing is known
  before any expert runs, so sparse top-k routing runs only the routed experts.
* ``embeddings`` (:mod:`.embeddings`): an MLP on the experts' embeddings; every expert runs first.
* ``global`` (:mod:`.learned`): learned weights shared by every record.
* ``uniform`` (:mod:`.uniform`): equal weights, no parameters (a plain average).

A new kind is one :class:`~enecg.ensemble.gates.base.Gate` subclass with ``name``, ``reads`` and ``weights``,
decorated with :func:`~enecg.ensemble.registries.register_gate` (see ``tests/test_gate.py``). Routing, the top-k
rule and the auxiliary terms are in :mod:`.base`.
"""

from __future__ import annotations

from enecg.ensemble.config import GateSettings
from enecg.ensemble.gates.base import (
    ENTROPY,
    LOAD_BALANCE,
    ROUTING,
    Gate,
    GateOutput,
    load_balance_loss,
    router_entropy,
    uniform_weights,
)
from enecg.ensemble.gates.embeddings import EmbeddingGate
from enecg.ensemble.gates.learned import GlobalGate
from enecg.ensemble.gates.mlp import MLPGate
from enecg.ensemble.gates.signal import SignalGate
from enecg.ensemble.gates.uniform import UniformGate
from enecg.ensemble.registries import GATES, register_gate


def build_gate(
    settings: GateSettings,
    num_experts: int,
    num_groups: int = 1,
    embedding_dims: list[int] | None = None,
) -> Gate:
    """The gate of kind ``settings.input`` (any registered kind) for ``num_experts`` experts."""
    return GATES.get(settings.input)(settings, num_experts, num_groups, embedding_dims)


__all__ = [
    "ENTROPY",
    "GATES",
    "LOAD_BALANCE",
    "ROUTING",
    "EmbeddingGate",
    "Gate",
    "GateOutput",
    "GlobalGate",
    "MLPGate",
    "SignalGate",
    "UniformGate",
    "build_gate",
    "load_balance_loss",
    "register_gate",
    "router_entropy",
    "uniform_weights",
]
