"""Mantis through the whole product: a published-layout checkpoint pushed to the loopback Hub loads by its Hub ID
(``paris-noah/Mantis-8M``) through the real ``huggingface_hub`` client, and an ensemble mixing it with an in-house
light CNN trains (staged strategy) from the feature cache, within CI time. Random weights in the published
configuration and layout (legacy key names): the published weights cannot be downloaded here (the architecture is checked against the official
package in ``tests/test_parity_mantis.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_expert_loading import MANTIS_8M_CONFIG, write_mantis_folder

from enecg.experts.expert import load_expert
from enecg.hub.upload import push_folder
from enecg.testing.endpoint import use_endpoint
from enecg.testing.local_hub import LocalHub
from enecg.training.recipe import LightExpertSpec, parse_recipe_dict
from enecg.training.trainer import train

pytestmark = pytest.mark.usefixtures("single_torch_thread", "fresh_accelerate_state")
REPO_ID = "paris-noah/Mantis-8M"


def test_mantis_loads_by_hub_id_and_trains_in_an_ensemble(ptbxl_training_dataset: Path, tmp_path: Path) -> None:
    from enecg.data.build import load_dataset_dir
    from enecg.training.light_experts import create_light_expert

    folder = write_mantis_folder(tmp_path / "mantis", MANTIS_8M_CONFIG, legacy_keys=True)
    _, meta = load_dataset_dir(ptbxl_training_dataset)
    light = create_light_expert(
        LightExpertSpec(architecture="SimpleNet", width_multiplier=0.25, embedding_dim=16),
        tmp_path / "simplenet",
        name="simplenet",
        train_part=None,
        tasks=meta.tasks,
        seed=0,
    )
    with LocalHub(tmp_path / "hub") as hub, use_endpoint(hub.url):
        pushed = push_folder(folder, REPO_ID)
        assert pushed is not None
        expert = load_expert(REPO_ID, cache_dir=tmp_path / "cache")
        assert (expert.hub_id, expert.revision, expert.name) == (REPO_ID, pushed.commit_sha, "mantis-8m")
        assert expert.embedding_dim == 12 * 256
        recipe = parse_recipe_dict(
            {
                "data": {"path": str(ptbxl_training_dataset), "max_records": 40, "cache_dir": str(tmp_path / "fc")},
                "experts": [
                    {"name": "mantis", "source": REPO_ID, "revision": pushed.commit_sha},
                    {"name": "simplenet", "source": str(light)},
                ],
                "tasks": [{"name": "superclass"}, {"name": "sex"}, {"name": "age"}],
                "model": {
                    "heads": {"hidden_sizes": [16]},
                    "gate": {"input": "embeddings", "hidden_sizes": [8], "per_task": True},
                    "strategy": {"name": "staged", "oof_folds": 2},
                },
                "optim": {"epochs": 2, "batch_size": 16, "seed": 0},
                "evaluation": {"bootstrap_resamples": 0, "report": False},
                "output": {"dir": str(tmp_path / "run"), "checkpoint_every_steps": None},
                "tracking": {"log_with": []},
            }
        )
        run = train(recipe).run
    assert run.feature_cache["enabled"] and run.feature_cache["computed"]["train"]["mantis"] == 40
    assert run.strategy["final_phase"] == "gate"
    assert set(run.strategy["phases"]["stage1"]["groups"]) >= {"mantis/superclass", "simplenet/age"}
    assert 0.0 <= run.test["superclass/macro_auroc"] <= 1.0 and torch.isfinite(torch.tensor(run.test["age/mae"]))
    # The saved ensemble records the expert by its Hub ID at the pushed commit.
    import json

    config = json.loads((Path(run.model_dir) / "config.json").read_text())
    recorded = {e["name"]: (e["hub_id"], e["revision"]) for e in config["experts"]}
    assert recorded["mantis"] == (REPO_ID, pushed.commit_sha)
