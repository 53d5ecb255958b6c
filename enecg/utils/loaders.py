"""``torch.utils.data.DataLoader`` settings shared by training, evaluation and the feature-cache fill.

Workers prepare batches (read records, apply the experts' contracts) while the main process runs the models;
:func:`loader_options` turns the few choices a user makes (workers, keep them alive, batches in flight) into the
keyword arguments torch accepts, and pins host memory when batches go to a CUDA device (faster, asynchronous
host-to-device copies). On CPU the defaults give exactly a plain ``DataLoader(num_workers=0)``.
"""

from __future__ import annotations

from typing import Any

import torch


def loader_options(
    num_workers: int,
    device: torch.device | str | None = None,
    *,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``DataLoader``: ``num_workers``, ``pin_memory`` (only for a CUDA ``device``), and
    ``persistent_workers`` / ``prefetch_factor`` only where workers exist (torch refuses them without workers, so
    a recipe that sets them still runs with ``num_workers: 0``)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if prefetch_factor is not None and prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    options: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": device is not None and torch.device(device).type == "cuda",
    }
    if num_workers > 0:
        options["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            options["prefetch_factor"] = prefetch_factor
    return options
