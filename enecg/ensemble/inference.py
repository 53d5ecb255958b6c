"""The one inference loop over records: evaluation (``enecg evaluate``), prediction (``enecg predict``) and the
efficiency measurements all run an ensemble through here.

Records are prepared in batches with each expert's (and the gate's) contract by
:class:`~enecg.ensemble.inputs.EnsembleInputBuilder`, moved to the ensemble's device and run in eval mode without
gradients; the model's mode is restored afterwards, also on error. Training-time evaluation reads prepared
loaders (cached embeddings, several processes) and shares :func:`evaluating`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from enecg.ensemble.inputs import EnsembleBatch, EnsembleInputBuilder
from enecg.ensemble.model import Ensemble, EnsembleOutput
from enecg.record import ECGRecord


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside; the model's previous mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def run_batch(ensemble: Ensemble, batch: EnsembleBatch) -> EnsembleOutput:
    """The ensemble on one prepared batch (expert inputs, gate input, demographics, lead and length masks)."""
    return ensemble(batch.expert_inputs, batch.gate_input, batch.demographics, **batch.masks())


def run_records(
    ensemble: Ensemble,
    chunks: Iterable[Sequence[ECGRecord]],
    *,
    builder: EnsembleInputBuilder | None = None,
) -> Iterator[tuple[Sequence[ECGRecord], EnsembleBatch, EnsembleOutput]]:
    """Run ``ensemble`` (eval mode, no gradients) over ``chunks`` of records; yields each chunk with its prepared
    batch (which says what each expert could read) and the ensemble's output."""
    builder = builder or EnsembleInputBuilder.for_ensemble(ensemble)
    device = device_of(ensemble)
    with evaluating(ensemble):
        for chunk in chunks:
            batch = builder(list(chunk)).to(device)
            yield chunk, batch, run_batch(ensemble, batch)


def in_batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive slices of ``batch_size`` (>= 1)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
