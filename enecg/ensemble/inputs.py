"""Records -> what :class:`~enecg.ensemble.model.Ensemble` consumes.

Every expert has its own input contract (rate, leads, window length, filters, scaling) and the signal gate has
another. :class:`EnsembleInputBuilder` applies all of them to the *same* records, so every expert (and the gate)
sees the same batch — EnECG's released code zipped independently shuffled loaders and mixed records up. Training
collates, the feature cache, prediction and evaluation all go through this one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from enecg.contract import InputContract, apply_contract_records
from enecg.data.rows import demographics_array
from enecg.record import ECGRecord


@dataclass
class EnsembleBatch:
    """One batch of records prepared for every expert and the gate.

    Attributes:
        expert_inputs: expert name -> windows ``(B, n_windows, ...)`` prepared with that expert's contract.
        window_masks: expert name -> bool ``(B, n_windows)``; False for padding windows.
        gate_input: windows for a signal gate (its contract), else None.
        demographics: ``(B, 2)`` (age years, sex 0/1), NaN where unknown.
        record_ids: ids of the records, in batch order.
    """

    expert_inputs: dict[str, Tensor]
    window_masks: dict[str, Tensor]
    gate_input: Tensor | None
    demographics: Tensor
    record_ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> EnsembleBatch:
        return EnsembleBatch(
            expert_inputs={k: v.to(device) for k, v in self.expert_inputs.items()},
            window_masks={k: v.to(device) for k, v in self.window_masks.items()},
            gate_input=None if self.gate_input is None else self.gate_input.to(device),
            demographics=self.demographics.to(device),
            record_ids=list(self.record_ids),
        )


class EnsembleInputBuilder:
    """Applies each expert's contract (and the gate's) to a list of records.

    Args:
        contracts: expert name -> its input contract.
        gate_contract: the signal gate's contract, or None when the gate does not read the signal.
    """

    def __init__(
        self, contracts: Mapping[str, InputContract], gate_contract: InputContract | None = None
    ) -> None:
        self.contracts = dict(contracts)
        self.gate_contract = gate_contract

    @classmethod
    def for_ensemble(cls, ensemble: torch.nn.Module) -> EnsembleInputBuilder:
        """The builder matching an :class:`~enecg.ensemble.model.Ensemble`'s experts and gate."""
        contracts = {}
        for name in ensemble.expert_names:
            expert = ensemble.branch(name).expert
            contract = getattr(expert, "contract", None)
            if contract is None:
                raise ValueError(f"expert {name!r} has no input contract (attribute `contract`)")
            contracts[name] = contract
        gate = ensemble.config.gate
        return cls(contracts, gate.input_contract() if gate.input == "signal" else None)

    def __call__(self, records: Sequence[ECGRecord]) -> EnsembleBatch:
        records = list(records)
        if not records:
            raise ValueError("an ensemble batch needs at least one record")
        expert_inputs, window_masks = {}, {}
        for name, contract in self.contracts.items():
            stacked = apply_contract_records(records, contract)
            expert_inputs[name] = torch.from_numpy(stacked.windows)
            window_masks[name] = torch.from_numpy(stacked.window_mask)
        gate_input = None
        if self.gate_contract is not None:
            gate_windows = apply_contract_records(records, self.gate_contract).windows
            # The gate summarises one window per record: the first one.
            gate_input = torch.from_numpy(np.ascontiguousarray(gate_windows[:, 0]))
        return EnsembleBatch(
            expert_inputs=expert_inputs,
            window_masks=window_masks,
            gate_input=gate_input,
            demographics=torch.from_numpy(demographics_array(records)),
            record_ids=[r.record_id for r in records],
        )
