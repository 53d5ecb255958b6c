"""Records -> what :class:`~enecg.ensemble.model.Ensemble` consumes.

Every expert has its own input contract (rate, leads, window length, filters, scaling) and the signal gate has
another. :class:`EnsembleInputBuilder` applies all of them to the *same* records, so every expert (and the gate)
sees the same batch — EnECG's released code zipped independently shuffled loaders and mixed records up. Training
collates, the feature cache, prediction and evaluation all go through this one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from enecg.contract import InputContract, apply_contract_records
from enecg.ensemble.registries import GATES
from enecg.leads import canonical_lead_name
from enecg.record import ECGRecord, RecordError, demographics_array


@dataclass
class EnsembleBatch:
    """One batch of records prepared for every expert and the gate.

    Attributes:
        expert_inputs: expert name -> windows ``(B, n_windows, ...)`` prepared with that expert's contract.
        window_masks: expert name -> bool ``(B, n_windows)``; False for padding windows.
        gate_input: windows for a signal gate (its contract), else None.
        demographics: ``(B, 2)`` (age years, sex 0/1), NaN where unknown.
        record_ids: ids of the records, in batch order.
        lead_masks: expert name -> bool ``(B, leads)``; False where the record lacks a contract lead (zero-filled).
        valid_samples: expert name -> int ``(B, n_windows)``; real samples per lead in each window.
        available: bool ``(B, E)`` in the builder's expert order; False where an expert's contract refused the
            record (too few leads, a required lead missing, too short): the gate routes it to the others.
        refusals: expert name -> per record the reason it refused the record (None where it did not).
        record_leads: per record, the leads it really has (canonical names, in its own order).
    """

    expert_inputs: dict[str, Tensor]
    window_masks: dict[str, Tensor]
    gate_input: Tensor | None
    demographics: Tensor
    record_ids: list[str] = field(default_factory=list)
    lead_masks: dict[str, Tensor] = field(default_factory=dict)
    valid_samples: dict[str, Tensor] = field(default_factory=dict)
    available: Tensor | None = None
    refusals: dict[str, list[str | None]] = field(default_factory=dict)
    record_leads: list[list[str]] = field(default_factory=list)

    def masks(self) -> dict[str, Any]:
        """The keyword arguments :meth:`Ensemble.forward` / ``embed`` take from this batch (window, lead and
        padding masks and expert availability)."""
        return {
            "window_masks": self.window_masks,
            "lead_masks": self.lead_masks or None,
            "valid_samples": self.valid_samples or None,
            "available": self.available,
        }

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EnsembleBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> EnsembleBatch:
        """The batch in page-locked host memory (``DataLoader(pin_memory=True)`` calls this on what workers
        return), so copies to a CUDA device can run asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, move: Callable[[Tensor], Tensor]) -> EnsembleBatch:
        return EnsembleBatch(
            expert_inputs={k: move(v) for k, v in self.expert_inputs.items()},
            window_masks={k: move(v) for k, v in self.window_masks.items()},
            gate_input=None if self.gate_input is None else move(self.gate_input),
            demographics=move(self.demographics),
            record_ids=list(self.record_ids),
            lead_masks={k: move(v) for k, v in self.lead_masks.items()},
            valid_samples={k: move(v) for k, v in self.valid_samples.items()},
            available=None if self.available is None else move(self.available),
            refusals={k: list(v) for k, v in self.refusals.items()},
            record_leads=[list(leads) for leads in self.record_leads],
        )


class EnsembleInputBuilder:
    """Applies each expert's contract (and the gate's) to a list of records.

    Args:
        contracts: expert name -> its input contract.
        gate_contract: the signal gate's contract, or None when the gate does not read the signal.
        refuse_unreadable: raise :class:`~enecg.record.RecordError` for a record that no expert can read
            (default). False: only mark it in ``available`` (the feature cache embeds expert by expert).
    """

    def __init__(
        self,
        contracts: Mapping[str, InputContract],
        gate_contract: InputContract | None = None,
        *,
        refuse_unreadable: bool = True,
    ) -> None:
        self.contracts = dict(contracts)
        self.gate_contract = gate_contract
        self.refuse_unreadable = refuse_unreadable

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
        return cls(contracts, gate.input_contract() if GATES.get(gate.input).reads == "signal" else None)

    def __call__(self, records: Sequence[ECGRecord]) -> EnsembleBatch:
        records = list(records)
        if not records:
            raise ValueError("an ensemble batch needs at least one record")
        expert_inputs, window_masks, lead_masks, valid_samples, refusals = {}, {}, {}, {}, {}
        available = np.ones((len(records), len(self.contracts)), dtype=bool)
        for e, (name, contract) in enumerate(self.contracts.items()):
            stacked = apply_contract_records(records, contract, on_refusal="mark")
            expert_inputs[name] = torch.from_numpy(stacked.windows)
            window_masks[name] = torch.from_numpy(stacked.window_mask)
            lead_masks[name] = torch.from_numpy(stacked.lead_mask)
            valid_samples[name] = torch.from_numpy(stacked.valid_samples)
            available[:, e] = stacked.available
            refusals[name] = list(stacked.refusals)
        unreadable = ~available.any(axis=1) if self.contracts and self.refuse_unreadable else []
        for i in np.nonzero(unreadable)[0]:
            # No expert can read this record: refuse it, naming the file and every expert's reason.
            reasons = "; ".join(f"{name}: {refusals[name][i]}" for name in self.contracts)
            raise RecordError(records[i].source, f"no expert of the ensemble can read this record ({reasons})")
        gate_input = None
        if self.gate_contract is not None:
            # A record the gate's contract cannot read (e.g. no lead II) gives the gate zeros; experts still decide
            # what they can read through `available`.
            gate_windows = apply_contract_records(records, self.gate_contract, on_refusal="mark").windows
            # The gate summarises one window per record: the first one.
            gate_input = torch.from_numpy(np.ascontiguousarray(gate_windows[:, 0]))
        return EnsembleBatch(
            expert_inputs=expert_inputs,
            window_masks=window_masks,
            gate_input=gate_input,
            demographics=torch.from_numpy(demographics_array(records)),
            record_ids=[r.record_id for r in records],
            lead_masks=lead_masks,
            valid_samples=valid_samples,
            available=torch.from_numpy(available),
            refusals=refusals,
            record_leads=[[canonical_lead_name(str(lead)) for lead in r.leads] for r in records],
        )
