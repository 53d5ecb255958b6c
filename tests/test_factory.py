"""``enecg.create_ensemble``: experts by folder / name / module and tasks as dicts or dataset infos, in one call;
the result equals an ensemble configured by hand, saves and reloads."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_serialization import EXPERTS, TASKS, write_expert

import enecg
from enecg.data.schema import TaskInfo
from enecg.ensemble import Ensemble, EnsembleConfig
from enecg.ensemble.factory import expert_ref
from enecg.ensemble.serialization import resolved_config
from enecg.experts import load_expert


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {name: write_expert(tmp_path / name, name, seed).resolve() for seed, name in enumerate(EXPERTS)}


def test_create_ensemble_equals_the_hand_built_one(folders: dict[str, Path], tmp_path: Path) -> None:
    model = enecg.create_ensemble(
        [str(folder) for folder in folders.values()],  # names derived from the folders: e0, e1
        tasks=TASKS,
        gate={"hidden_sizes": [16], "top_k": 1},
        heads={"hidden_sizes": [32]},
        seed=3,
    )
    assert model.expert_names == list(EXPERTS)
    loaded = {name: load_expert(str(folder)) for name, folder in folders.items()}
    by_hand = Ensemble(
        EnsembleConfig.from_dict(
            {
                "experts": [asdict(expert_ref(n, e, hub_id=str(folders[n]))) for n, e in loaded.items()],
                "tasks": TASKS,
                "gate": {"hidden_sizes": [16], "top_k": 1},
                "heads": {"hidden_sizes": [32]},
                "seed": 3,
            }
        ),
        loaded,
    )
    assert model.config.to_dict() == by_hand.config.to_dict()
    for (name, a), (_, b) in zip(model.trainable_state_dict().items(), by_hand.trainable_state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # The refs record where each expert came from, so the saved model reloads it.
    assert [r.hub_id for r in model.config.experts] == [str(f) for f in folders.values()]
    model.save_pretrained(tmp_path / "saved")
    reloaded = Ensemble.from_pretrained(tmp_path / "saved")
    assert reloaded.config.to_dict() == resolved_config(model).to_dict()  # + each expert's weights hash
    for (name, a), (_, b) in zip(reloaded.trainable_state_dict().items(), model.trainable_state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_named_experts_modules_and_dataset_tasks(folders: dict[str, Path]) -> None:
    module = load_expert(str(folders["e1"]))
    infos = [TaskInfo(name="sex", type="binary", names=["male", "female"])]
    model = enecg.create_ensemble({"first": folders["e0"], "second": module}, tasks=infos)
    assert model.expert_names == ["first", "second"]
    assert model.config.experts[1].hub_id == str(folders["e1"])  # the folder the module was loaded from
    assert model.config.tasks[0].label_names == ["female"]  # a dataset's binary task keeps its positive name


def test_bad_requests_are_one_line(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="would both be named 'e0'"):
        enecg.create_ensemble([folders["e0"], folders["e0"]], tasks=TASKS)
    with pytest.raises(TypeError, match="not a single expert"):
        enecg.create_ensemble(str(folders["e0"]), tasks=TASKS)
    with pytest.raises(ValueError, match=r"gate\.input must be one of"):
        enecg.create_ensemble([folders["e0"]], tasks=TASKS, gate={"input": "telepathy"})
