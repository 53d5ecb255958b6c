"""Generative ECG models (enecg.generative): training, Hub round trip, sampling, synthetic-row guards, anomaly
scores, evaluation. Models are tiny (seconds on one CPU thread)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enecg.generative import GenerativeConfig, load_diffusion, train_diffusion

TINY = {"block_out_channels": (16, 32, 32), "condition_channels": 4, "sample_steps": 4, "length": 256}


def tiny_config(data: Path, out: Path, **changes: object) -> GenerativeConfig:
    values: dict[str, object] = {
        "data": str(data),
        "task": "superclass",
        "output_dir": str(out),
        "batch_size": 8,
        "max_steps": 40,
        "log_every": 10,
        "learning_rate": 2e-3,
        "max_records": 96,
        **TINY,
    }
    values.update(changes)
    return GenerativeConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(ptbxl_training_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch as _torch

    _torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("gen") / "model"
    return train_diffusion(tiny_config(ptbxl_training_dataset, out))


def test_training_loss_decreases_and_the_folder_is_hub_ready(trained: Path) -> None:
    assert {"model.safetensors", "config.json", "README.md", "metrics.json"} <= {
        p.name for p in trained.iterdir()
    }
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["records"] == 96
    assert metrics["final_loss"] < metrics["first_loss"]
    config = json.loads((trained / "config.json").read_text())
    assert config["label_names"] == ["NORM", "MI", "STTC", "CD", "HYP"] and len(config["leads"]) == 12
    assert "synthetic" in (trained / "README.md").read_text()


def test_training_refuses_validation_and_test_parts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="training parts only"):
        tiny_config(tmp_path, tmp_path / "m", parts=("train", "test"))


def test_saved_model_reloads_by_hub_id_and_samples_identically_under_a_seed(
    trained: Path, tmp_path: Path
) -> None:
    import huggingface_hub

    from enecg.testing.endpoint import use_endpoint
    from enecg.testing.local_hub import LocalHub

    local = load_diffusion(trained)
    first = local.sample(["HYP"], 2, seed=7)
    assert first.shape == (2, 12, 256) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, local.sample(["HYP"], 2, seed=7))
    assert not np.array_equal(first, local.sample(["HYP"], 2, seed=8))
    repo_id = "enecg-test/ecg-diffusion"
    with LocalHub(tmp_path / "hub") as hub, use_endpoint(hub.url):
        huggingface_hub.create_repo(repo_id)
        huggingface_hub.upload_folder(folder_path=str(trained), repo_id=repo_id)
        remote = load_diffusion(repo_id)
    np.testing.assert_array_equal(remote.sample(["HYP"], 2, seed=7), first)


def test_unknown_label_and_zero_n_are_one_line_errors(trained: Path) -> None:
    model = load_diffusion(trained)
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['XYZ'\].*known: \['NORM'"):
        model.sample(["XYZ"], 1)
    with pytest.raises(ValueError, match="at least 1"):
        model.sample(["HYP"], 0)


def test_condition_vector_drops_labels_and_flags_it() -> None:
    from enecg.generative import DiffusionSpec, ECGDiffusion

    spec = DiffusionSpec(
        task="t",
        task_type="multiclass",
        label_names=["A", "B"],
        leads=["I"],
        fs=100.0,
        length=64,
        block_out_channels=[16, 32, 32],
    )
    model = ECGDiffusion(spec)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cond = model.condition(
        labels,
        2,
        torch.tensor([50.0, float("nan")]),
        torch.tensor([1.0, 0.0]),
        drop=torch.tensor([False, True]),
    )
    assert cond[0].tolist() == [1.0, 0.0, 0.0, 0.5, 1.0, 0.0, 0.0]
    assert cond[1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
