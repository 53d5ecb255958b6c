"""Recipe augmentation (``data.synthetic``): generated records for the training part only.

:func:`materialize_synthetic` samples ``per_label`` records per label from the model, writes them as WFDB + labels
CSV under ``<output.dir>/synthetic/records``, prepares that folder as a dataset (every record lands in its
training part: they are marked synthetic) and returns the recipe with that dataset added to ``data.extra_train``
(pooled into every run's training part, never validation or test) and ``data.synthetic`` cleared.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from enecg.data.wfdb_folder import WfdbFolderOptions, prepare_wfdb_folder
from enecg.generative.base import load_generative
from enecg.generative.sampling import LABELS_FILE, sample_to_folder

logger = logging.getLogger(__name__)


def materialize_synthetic(recipe: Any) -> Any:
    """The recipe with its synthetic records generated and pooled (see the module docstring); a recipe without
    ``data.synthetic`` is returned as is."""
    section = recipe.data.synthetic
    if section is None:
        return recipe
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would sample into the same folder
        raise ValueError(
            "data.synthetic: run `enecg train` in one process, or pool pre-generated records with "
            "data.extra_train (enecg generate sample + enecg data prepare wfdb --labels)"
        )
    model = load_generative(section.model)  # any registered kind
    for label in section.per_label:  # every label is checked before any sampling
        model.label_vector([label])
    root = Path(recipe.output.dir) / "synthetic"
    records = root / "records"
    shutil.rmtree(records, ignore_errors=True)  # regenerated from (model, per_label, seed): never stale
    for k, (label, n) in enumerate(section.per_label.items()):
        logger.info("data.synthetic: sampling %d %s records from %s", n, label, section.model)
        sample_to_folder(
            model,
            [label],
            n,
            records,
            model_name=section.model,
            seed=section.seed + k,
            steps=section.steps,
            guidance_scale=section.guidance_scale,
        )
    # No validation/test fractions: synthetic records go to the training part anyway.
    options = WfdbFolderOptions(labels=str(records / LABELS_FILE), validation_fraction=0.0, test_fraction=0.0)
    prepare_wfdb_folder(records, root / "dataset", options, workers=1, force=True)
    data = dataclasses.replace(
        recipe.data, synthetic=None, extra_train=[*recipe.data.extra_train, str(root / "dataset")]
    )
    return dataclasses.replace(recipe, data=data)
