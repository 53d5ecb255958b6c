"""save_pretrained / from_pretrained on local folders, record-level prediction, and what loading refuses.

Experts are in-house light CNNs saved as local folders (so they have no Hub identity: their path and weights hash
are recorded); the Hub round trip is in test_hub_roundtrip.py. Ensembles are trained two steps on real PTB-XL
records so heads, LoRA and gate differ from their initial values.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from enecg.contract import InputContract
from enecg.data.ptbxl import SUPERCLASSES
from enecg.ensemble import (
    FORMAT_VERSION,
    Ensemble,
    EnsembleConfig,
    EnsembleLoadError,
    ExpertRef,
    predict_records,
    serialization,
)
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.experts import load_expert
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import save_inhouse_expert
from enecg.hub import save_ensemble
from enecg.hub.cards import extract_python_snippet
from enecg.io import read_record
from enecg.leads import STANDARD_12_LEADS

CONTRACT = InputContract(fs=100.0, leads=STANDARD_12_LEADS, length=1000, scaling="zscore_lead")
EXPERTS = {"e0": ("SimpleNet", True), "e1": ("ParallelCNN", False)}
N_RECORDS = 8
TASKS = [
    {"name": "superclass", "type": "multilabel", "label_names": list(SUPERCLASSES)},
    {"name": "sex", "type": "multiclass", "label_names": ["male", "female"]},
    {"name": "age", "type": "regression", "target_mean": 60.0, "target_std": 17.0},
]
VARIANTS = {
    # The paper's setting: signal gate, LoRA on the heads; plus learned task weights.
    "signal-gate": {"lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}, "task_weighting": "uncertainty"},
    # Sparse top-1 routing on embeddings, one weight vector per task, LoRA on the heads and the experts' layers.
    "sparse-lora-experts": {
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "on_experts": True},
        "gate": {"input": "embeddings", "top_k": 1, "per_task": True, "hidden_sizes": [16]},
    },
    # No LoRA (no peft adapters), embeddings combined into shared heads.
    "no-lora-shared-heads": {
        "lora": {"on_heads": False},
        "gate": {"combine": "embeddings", "projection_dim": 16, "hidden_sizes": [16]},
    },
}


def ptbxl_sample(root: Path, n: int) -> tuple[list, dict[str, torch.Tensor]]:
    """The first ``n`` PTB-XL records (100 Hz) with age/sex metadata, and labels for TASKS."""
    table = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    statements = pd.read_csv(root / "scp_statements.csv", index_col=0)
    superclass_of = statements[statements["diagnostic"] == 1]["diagnostic_class"].dropna().to_dict()
    records, superclass = [], []
    for _, row in table.head(n).iterrows():
        record = read_record(root / row["filename_lr"])
        record.metadata.update(age=float(row["age"]), sex=float(row["sex"]))
        records.append(record)
        present = {superclass_of[c] for c in ast.literal_eval(row["scp_codes"]) if c in superclass_of}
        superclass.append([float(c in present) for c in SUPERCLASSES] if present else [np.nan] * 5)
    head = table.head(n)
    return records, {
        "superclass": torch.tensor(superclass, dtype=torch.float32),
        "sex": torch.tensor(head["sex"].to_numpy(), dtype=torch.float32),
        "age": torch.tensor(head["age"].to_numpy(), dtype=torch.float32),
    }


def write_expert(folder: Path, name: str, seed: int) -> Path:
    architecture, demographics = EXPERTS[name]
    torch.manual_seed(seed)
    config = LightCNNConfig(
        architecture=architecture, width_multiplier=0.25, embedding_dim=16, use_demographics=demographics
    )
    return save_inhouse_expert(
        build_light_model(config), family="light", config=config, contract=CONTRACT, folder=folder, name=name
    )


@pytest.fixture(scope="module")
def sample(ptbxl_dir: Path) -> tuple[list, dict[str, torch.Tensor]]:
    return ptbxl_sample(ptbxl_dir, N_RECORDS)


@pytest.fixture
def expert_dirs(tmp_path: Path) -> dict[str, Path]:
    return {
        name: write_expert(tmp_path / "experts" / name, name, seed).resolve()
        for seed, name in enumerate(EXPERTS)
    }


def build_trained(expert_dirs: dict[str, Path], sample, variant: str = "signal-gate") -> Ensemble:
    experts = {name: load_expert(str(folder)) for name, folder in expert_dirs.items()}
    config = EnsembleConfig.from_dict(
        {
            "experts": [
                {
                    "name": name,
                    "hub_id": str(expert_dirs[name]),
                    "embedding_dim": expert.embedding_dim,
                    "lora_target_modules": expert.lora_target_modules,
                }
                for name, expert in experts.items()
            ],
            "tasks": TASKS,
            "heads": {"hidden_sizes": [32, 32]},
            "gate": {"hidden_sizes": [16]},
            "seed": 3,
            **VARIANTS[variant],
        }
    )
    model = Ensemble(config, experts)
    records, labels = sample
    batch = EnsembleInputBuilder.for_ensemble(model)(records)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        out = model(
            batch.expert_inputs, batch.gate_input, batch.demographics, window_masks=batch.window_masks
        )
        model.compute_loss(out, labels)[0].backward()
        optimizer.step()
    return model.eval()


def outputs(model: Ensemble, records: list) -> dict[str, torch.Tensor]:
    batch = EnsembleInputBuilder.for_ensemble(model)(records)
    with torch.no_grad():
        out = model(
            batch.expert_inputs, batch.gate_input, batch.demographics, window_masks=batch.window_masks
        )
    flat = {}
    for task in out.predictions:
        flat |= {f"pred/{task}": out.predictions[task], f"expert/{task}": out.expert_predictions[task]}
        flat[f"gate/{task}"] = out.gate_weights[task]
    return flat


def assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    # equal_nan: experts a sparse gate skipped have NaN predictions, in the same places.
    differing = [k for k in expected if not torch.equal(got[k].isnan(), expected[k].isnan())]
    differing += [k for k in expected if not torch.equal(got[k].nan_to_num(), expected[k].nan_to_num())]
    assert not differing, f"outputs differ after reloading: {sorted(set(differing))}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_and_reload_is_bit_identical(variant: str, expert_dirs, sample, tmp_path: Path) -> None:
    model = build_trained(expert_dirs, sample, variant)
    records = sample[0]
    expected = outputs(model, records)
    folder = model.save_pretrained(tmp_path / "model")

    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    adapters = {
        f"adapters/{n}/{f}" for n in EXPERTS for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    with_lora = variant != "no-lora-shared-heads"
    # The ensemble saves itself (weights, config, adapters); cards are the hub layer's (save_ensemble below).
    assert files == {"config.json", "model.safetensors"} | (adapters if with_lora else set())

    # model.safetensors: exactly the trainable tensors; nothing of the frozen experts.
    weights = load_file(folder / "model.safetensors")
    lora_on_experts = variant == "sparse-lora-experts"
    # With LoRA on the experts, they train in train mode: their BatchNorm statistics move and are saved too.
    stats = {
        k for k in weights if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert bool(stats) == lora_on_experts
    assert stats == set(serialization.expert_running_stats(model))
    assert weights.keys() - stats == model.trainable_state_dict().keys()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert not weights.keys() & frozen
    own = weights.keys() - stats
    assert not [k for k in own if ".expert." in k and ".lora_" not in k]
    assert any(".expert." in k for k in own) == lora_on_experts  # LoRA weights on the experts' layers

    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["enecg_version"]
    for ref in config["experts"]:
        weights_file = expert_dirs[ref["name"]] / "model.safetensors"
        assert ref["weights_sha256"] == serialization.weights_sha256(weights_file)
        assert ref["hub_id"] == str(expert_dirs[ref["name"]]) and ref["revision"] is None
        assert ref["spec"]["contract"] == CONTRACT.to_dict() and ref["spec"]["family"] == "light"
    assert [t["label_names"] for t in config["tasks"]] == [t.get("label_names", []) for t in TASKS]
    if with_lora:
        adapter_config = json.loads((folder / "adapters/e1/adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(expert_dirs["e1"])
        assert adapter_config["revision"] is None

    loaded = Ensemble.from_pretrained(folder)
    assert not loaded.training
    assert_identical(outputs(loaded, records), expected)
    assert [r.to_dict() for r in loaded.predict_records(records)] == [
        r.to_dict() for r in model.predict_records(records)
    ]
    # Saved through the hub layer, the folder gets a card that parses and whose example loads this folder.
    assert save_ensemble(model, folder) == folder
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "enecg"
    assert 'Ensemble.from_pretrained("model")' in extract_python_snippet(card)


def test_predict_records_explains_each_record(expert_dirs, sample, ptbxl_dir: Path) -> None:
    model = build_trained(expert_dirs, sample, "sparse-lora-experts")
    model.decision_thresholds = {"superclass": {"NORM": 0.5, "MI": 0.2}}
    paths = [ptbxl_dir / "records100/00000/00001_lr", ptbxl_dir / "records100/00000/00002_lr.hea"]
    results = predict_records(model, [*sample[0][:6], *paths], batch_size=3)
    assert [r.record_id for r in results] == [r.record_id for r in sample[0][:6]] + ["00001_lr", "00002_lr"]
    for result in results:
        data = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # plain JSON, no NaN
        assert set(data["tasks"]) == {"superclass", "sex", "age"}
        for name, task in result.tasks.items():
            assert set(task.gate_weights) == set(EXPERTS)
            assert math.isclose(sum(task.gate_weights.values()), 1.0, abs_tol=1e-6)
            # Top-1 routing: the one routed expert has weight 1 and a prediction, the other None.
            routed = [e for e, p in task.experts.items() if p is not None]
            assert len(routed) == 1 and task.gate_weights[routed[0]] == pytest.approx(1.0)
            assert task.experts[routed[0]] == pytest.approx(task.prediction, rel=1e-5, abs=1e-6)
            if name == "superclass":
                assert set(task.prediction) == set(SUPERCLASSES)
                assert task.thresholds == {"NORM": 0.5, "MI": 0.2}
                expected_positive = [
                    label for label in ("NORM", "MI") if task.prediction[label] >= task.thresholds[label]
                ]
                assert task.positive_labels == expected_positive
            elif name == "sex":
                assert task.predicted_label == max(task.prediction, key=task.prediction.get)
                assert math.isclose(sum(task.prediction.values()), 1.0, rel_tol=1e-5)
                assert task.thresholds is None and task.positive_labels is None
            else:
                assert isinstance(task.prediction, float) and 0 < task.prediction < 200
    # One record alone (another batch shape: float sums may round differently) gives the same predictions.
    single = model.predict_record(paths[0])
    assert single.keys() == results[6].predictions().keys()
    for task, value in results[6].predictions().items():
        assert single[task] == pytest.approx(value, rel=1e-5, abs=1e-6)
    with pytest.raises(
        ValueError, match="task 'age' is regression; thresholds apply to binary and multilabel"
    ):
        predict_records(model, sample[0][:1], thresholds={"age": {"age": 0.5}})
    with pytest.raises(ValueError, match=r"task 'superclass' has no labels \['AFIB'\]"):
        predict_records(model, sample[0][:1], thresholds={"superclass": {"AFIB": 0.5}})


def test_thresholds_are_saved_and_validated(expert_dirs, sample, tmp_path: Path) -> None:
    model = build_trained(expert_dirs, sample)
    model.decision_thresholds = {"superclass": {"NORM": 0.42}}
    folder = model.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "thresholds.json").read_text()) == {"superclass": {"NORM": 0.42}}
    assert Ensemble.from_pretrained(folder).decision_thresholds == {"superclass": {"NORM": 0.42}}
    model.decision_thresholds = {"superclass": {"NORM": 1.5}}
    with pytest.raises(ValueError, match=r"superclass/NORM = 1.5 is not in \[0, 1\]"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_changed_or_moved_local_experts(expert_dirs, sample, tmp_path: Path) -> None:
    model = build_trained(expert_dirs, sample)
    records = sample[0][:4]
    expected = outputs(model, records)
    folder = model.save_pretrained(tmp_path / "model")

    # The expert folder moved (another machine): a clear error, then an override that finds it.
    moved = tmp_path / "elsewhere" / "e0"
    shutil.move(expert_dirs["e0"], moved)
    with pytest.raises(EnsembleLoadError) as excinfo:
        Ensemble.from_pretrained(folder)
    message = str(excinfo.value)
    assert message.startswith(f"{folder}: expert 'e0' ({expert_dirs['e0']}): ") and "\n" not in message
    assert "saved from a local folder: pass expert_overrides={'e0': PATH_OR_HUB_ID}" in message
    loaded = Ensemble.from_pretrained(folder, expert_overrides={"e0": moved})
    assert_identical(outputs(loaded, records), expected)
    assert loaded.config.expert("e0").hub_id == str(moved.resolve())

    # Same place, other weights: refused, naming the expert and both hashes.
    recorded = json.loads((folder / "config.json").read_text())["experts"][1]["weights_sha256"]
    write_expert(expert_dirs["e1"], "e1", seed=42)
    with pytest.raises(EnsembleLoadError) as excinfo:
        Ensemble.from_pretrained(folder, expert_overrides={"e0": moved})
    message = str(excinfo.value)
    assert f"expert 'e1' (local-dir:{expert_dirs['e1'].resolve()}) has other weights" in message
    assert f"recorded sha256 {recorded[:16]}…, found " in message and "\n" not in message
    # An override pointing at a different model is checked the same way.
    with pytest.raises(EnsembleLoadError, match=r"expert 'e0' .* has other weights"):
        Ensemble.from_pretrained(
            folder, expert_overrides={"e0": write_expert(tmp_path / "other", "e0", seed=7)}
        )
    with pytest.raises(EnsembleLoadError, match=r"expert_overrides names unknown experts \['e9'\]"):
        Ensemble.from_pretrained(folder, expert_overrides={"e9": moved})


def test_incompatible_or_incomplete_folders_are_refused(expert_dirs, sample, tmp_path: Path) -> None:
    model = build_trained(expert_dirs, sample)
    folder = model.save_pretrained(tmp_path / "model")
    config_text = (folder / "config.json").read_text()

    newer = json.loads(config_text) | {"format_version": FORMAT_VERSION + 1, "a_future_key": 1}
    (folder / "config.json").write_text(json.dumps(newer))
    with pytest.raises(
        EnsembleLoadError, match=f"saved with ensemble format version {FORMAT_VERSION + 1} .*upgrade enecg"
    ):
        Ensemble.from_pretrained(folder)
    with pytest.raises(ValueError, match="upgrade enecg"):
        EnsembleConfig.load(folder)
    (folder / "config.json").write_text(config_text)

    state = load_file(folder / "model.safetensors")
    key = next(iter(state))
    save_file({k: v for k, v in state.items() if k != key}, str(folder / "model.safetensors"))
    with pytest.raises(EnsembleLoadError, match=f"model.safetensors: missing keys \\['{key}'\\]"):
        Ensemble.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EnsembleLoadError, match=r"model\.safetensors: not a readable safetensors file"):
        Ensemble.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(EnsembleLoadError, match=r"no model\.safetensors"):
        Ensemble.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(EnsembleLoadError, match=r"not a saved ensemble \(no config.json"):
        Ensemble.from_pretrained(folder)
    with pytest.raises(EnsembleLoadError, match="only applies to Hub repos"):
        Ensemble.from_pretrained(tmp_path, revision="main")
    with pytest.raises(EnsembleLoadError, match="neither a folder nor a Hub repo id"):
        Ensemble.from_pretrained(tmp_path / "missing")


def test_saving_is_atomic(expert_dirs, sample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_trained(expert_dirs, sample)
    records = sample[0][:4]
    before = outputs(model, records)
    model.decision_thresholds = {"superclass": {"NORM": 0.5}}
    folder = model.save_pretrained(tmp_path / "model")
    (folder / "plots").mkdir()
    (folder / "plots" / "roc.png").write_bytes(b"png")  # written by evaluation next to the model

    with torch.no_grad():  # "another epoch"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    after = outputs(model, records)

    # A failure while writing the new files: the old save is untouched and still loads.
    def failing_save_file(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(serialization, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(folder)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    assert_identical(outputs(Ensemble.from_pretrained(folder), records), before)

    # Saving over it replaces the folder as a whole: new weights; the old model's thresholds, plots and card
    # data (card_context.json, which `enecg push` would publish) are gone.
    (folder / "card_context.json").write_text('{"evaluations": "of the previous run"}')
    model.decision_thresholds = {}
    model.save_pretrained(folder)
    # (the old card too: a card describing the previous weights must not survive them)
    assert sorted(p.name for p in folder.iterdir()) == ["adapters", "config.json", "model.safetensors"]
    reloaded = Ensemble.from_pretrained(folder)
    assert_identical(outputs(reloaded, records), after)
    assert reloaded.decision_thresholds == {}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_killed_during_the_final_moves(
    expert_dirs, sample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that dies while moving folders leaves the old model loadable; the next save cleans up."""
    model = build_trained(expert_dirs, sample)
    records = sample[0][:4]
    folder = model.save_pretrained(tmp_path / "model")
    before = outputs(model, records)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    after = outputs(model, records)

    # 1. The atomic swap fails (e.g. killed): the old model stays, the staging folder is removed.
    def failing_exchange(a: Path, b: Path) -> bool:
        raise OSError("killed")

    monkeypatch.setattr(serialization, "_exchange", failing_exchange)
    with pytest.raises(OSError, match="killed"):
        model.save_pretrained(folder)
    assert_identical(outputs(Ensemble.from_pretrained(folder), records), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # 2. Without an atomic swap: the second rename (new folder into place) fails -> the old one is put back.
    monkeypatch.setattr(serialization, "_exchange", lambda a, b: False)
    real_rename = serialization._rename

    def rename_failing_into_place(src, dst):
        if Path(src).name.startswith(".model.saving-"):
            raise OSError("killed between the moves")
        return real_rename(src, dst)

    monkeypatch.setattr(serialization, "_rename", rename_failing_into_place)
    with pytest.raises(OSError, match="killed between the moves"):
        model.save_pretrained(folder)
    assert_identical(outputs(Ensemble.from_pretrained(folder), records), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(serialization, "_rename", real_rename)

    # 3. A real kill between the two renames (no chance to put the old one back): the old save waits in
    # .model.old-*, a staging folder is left; the next save restores/cleans and replaces the model.
    real_rename(folder, tmp_path / ".model.old-deadbeef")
    (tmp_path / ".model.saving-abc123").mkdir()
    model.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts", "model"]
    assert_identical(outputs(Ensemble.from_pretrained(folder), records), after)

    # The swap path (where the filesystem has it) also leaves nothing behind.
    monkeypatch.undo()
    model.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts", "model"]
    assert_identical(outputs(Ensemble.from_pretrained(folder), records), after)


def test_a_folder_that_is_not_a_model_is_not_replaced(expert_dirs, sample, tmp_path: Path) -> None:
    model = build_trained(expert_dirs, sample)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved ensemble"):
        model.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert (model.save_pretrained(tmp_path / "empty") / "config.json").is_file()


def test_frozen_trainable_parts_are_refused(expert_dirs, sample, tmp_path: Path) -> None:
    model = build_trained(expert_dirs, sample)
    model.gate.requires_grad_(False)  # e.g. a phase that trains heads only
    with pytest.raises(
        ValueError, match=r"parameters outside the experts are frozen and would not be saved: \['gate"
    ):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_expert_refs_record_what_was_loaded(expert_dirs, sample) -> None:
    model = build_trained(expert_dirs, sample)
    config = serialization.resolved_config(model)
    assert all(isinstance(ref, ExpertRef) and ref.weights_sha256 for ref in config.experts)
    assert model.config.experts[0].weights_sha256 is None  # the live config is not modified
    with pytest.raises(ValueError, match="weights_sha256 must be 64 lower-case hex digits"):
        ExpertRef(name="x", hub_id="org/x", embedding_dim=4, weights_sha256="abc")
