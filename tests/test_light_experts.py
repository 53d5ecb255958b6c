"""The light CNN expert family (AttiaNet, DeepResidualCNN, ParallelCNN, ParallelCNNew, SimpleNet) and in-house
expert folders (save / strict load)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from enecg.contract import InputContract
from enecg.experts.families.light import (
    ARCHITECTURES,
    DemographicsEncoder,
    LightCNNConfig,
    ParallelCNN,
    ParallelCNNew,
    build_light_model,
    count_parameters,
)
from enecg.experts.family import get_family
from enecg.experts.inhouse import (
    CONFIG_FILE,
    EXPERT_SPEC_FILE,
    METRICS_FILE,
    SPEC_FIELDS,
    WEIGHTS_FILE,
    load_inhouse_expert_module,
    save_inhouse_expert,
)
from enecg.experts.weights import WeightsError

LEADS_12 = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
CONTRACT = InputContract(fs=100.0, leads=LEADS_12, length=1000)
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
TRAIN_STEPS = 4
N_RECORDS = 16
PROPOSED = ("AttiaNet", "ParallelCNN", "ParallelCNNew", "SimpleNet")


def _config(architecture: str, **overrides) -> dict:
    return LightCNNConfig(architecture, **overrides).to_dict()


def _demographics(batch: int) -> torch.Tensor:
    age = torch.linspace(20.0, 90.0, batch)
    sex = (torch.arange(batch) % 2).float()
    return torch.stack([age, sex], dim=1)


@pytest.fixture(scope="module")
def ptbxl_batch(ptbxl_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real PTB-XL records at 100 Hz: signals (N, 12, 1000) in mV, superclass multi-hot (N, 5), (age, sex)."""
    import wfdb

    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv", index_col="ecg_id").head(N_RECORDS)
    statements = pd.read_csv(ptbxl_dir / "scp_statements.csv", index_col=0)
    signals, labels = [], []
    for ecg_id, row in database.iterrows():
        record = wfdb.rdrecord(str(ptbxl_dir / row["filename_lr"]))
        assert record.fs == 100 and record.p_signal.shape == (1000, 12), ecg_id
        signals.append(record.p_signal.T.astype(np.float32))
        codes = ast.literal_eval(row["scp_codes"])
        classes = {statements.loc[c, "diagnostic_class"] for c in codes if c in statements.index}
        labels.append([float(name in classes) for name in SUPERCLASSES])
    demographics = torch.tensor(database[["age", "sex"]].to_numpy(dtype=np.float32))
    return torch.from_numpy(np.stack(signals)), torch.tensor(labels), demographics


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("leads", [12, 1])
def test_builds_and_forward_shapes(architecture: str, leads: int) -> None:
    family = get_family("light")
    config = _config(architecture, in_leads=leads, n_outputs=7, embedding_dim=96)
    model = family.build(config).eval()
    x = torch.randn(3, leads, 1000)
    with torch.no_grad():
        logits = model(x)
        embedding = family.embed(model, x)
    assert logits.shape == (3, 7)
    assert embedding.shape == (3, family.embedding_dim(config)) == (3, 96)
    assert torch.isfinite(logits).all() and torch.isfinite(embedding).all()


def test_parameter_counts_are_small() -> None:
    counts = {name: count_parameters(build_light_model(_config(name))) for name in ARCHITECTURES}
    print("parameters (12 leads x 1000):", counts)
    for name in PROPOSED:
        assert counts[name] < 500_000, (name, counts[name])
    # DeepResidualCNN is the heavy baseline (the CinC 2021 winner at its original width 256).
    assert 5_000_000 < counts["DeepResidualCNN"] < 7_000_000
    assert all(counts["DeepResidualCNN"] > counts[name] for name in PROPOSED)
    assert count_parameters(build_light_model(_config("DeepResidualCNN", width_multiplier=0.5))) < 2_000_000
    assert (
        count_parameters(build_light_model(_config("SimpleNet", width_multiplier=2.0))) > counts["SimpleNet"]
    )


@pytest.mark.parametrize("leads", [12, 1])
@pytest.mark.parametrize("use_demographics", [False, True])
def test_parallel_cnnew_symmetric_init(leads: int, use_demographics: bool) -> None:
    config = LightCNNConfig("ParallelCNNew", in_leads=leads, use_demographics=use_demographics)
    torch.manual_seed(0)
    model = build_light_model(config)
    assert isinstance(model, ParallelCNNew)
    pairs = list(model.branch_conv_pairs())
    assert len(pairs) == len(ParallelCNN.KERNELS)
    for temporal, spatial in pairs:
        assert temporal.weight.shape[2] == 1 and spatial.weight.shape[3] == 1
        assert torch.equal(spatial.weight, temporal.weight.transpose(2, 3))
        assert spatial.weight.data_ptr() != temporal.weight.data_ptr()  # copies, not tied: they may diverge
    half = model.pooled_dim // 2
    weight = model.projection[0].weight
    assert weight.shape[1] == 2 * half + (config.demographics_hidden if use_demographics else 0)
    assert torch.equal(weight[:, :half], weight[:, half : 2 * half])
    # Control: the plain ParallelCNN draws its branches independently.
    plain = build_light_model(
        LightCNNConfig("ParallelCNN", in_leads=leads, use_demographics=use_demographics)
    )
    assert not any(torch.equal(s.weight, t.weight.transpose(2, 3)) for t, s in plain.branch_conv_pairs())
    assert not torch.equal(
        plain.projection[0].weight[:, :half], plain.projection[0].weight[:, half : 2 * half]
    )


def test_input_and_demographics_are_checked() -> None:
    model = build_light_model(_config("SimpleNet"))
    with pytest.raises(ValueError, match=r"expects input \(batch, 12, 1000\)"):
        model(torch.randn(2, 12, 5000))
    with pytest.raises(ValueError, match="without use_demographics"):
        model(torch.randn(2, 12, 1000), _demographics(2))
    fused = build_light_model(_config("SimpleNet", use_demographics=True))
    with pytest.raises(ValueError, match="pass demographics"):
        fused(torch.randn(2, 12, 1000))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        fused(torch.randn(2, 12, 1000), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown light architecture"):
        LightCNNConfig("ResNet1000")
    with pytest.raises(ValueError, match="unknown key"):
        LightCNNConfig.from_dict({"architecture": "SimpleNet", "depth": 3})


def test_demographics_encoding_and_fusion_change_output() -> None:
    encoded = DemographicsEncoder.encode(
        torch.tensor([[50.0, 1.0], [float("nan"), float("nan")], [300.0, 0.0]])
    )
    assert torch.equal(
        encoded, torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    )
    torch.manual_seed(0)
    family = get_family("light")
    for architecture in sorted(ARCHITECTURES):
        width = 0.25 if architecture == "DeepResidualCNN" else 1.0  # keeps the test fast
        model = build_light_model(_config(architecture, use_demographics=True, width_multiplier=width)).eval()
        x = torch.randn(2, 12, 1000)
        with torch.no_grad():
            young_male = family.embed(model, x, torch.tensor([[25.0, 0.0], [25.0, 0.0]]))
            old_female = family.embed(model, x, torch.tensor([[80.0, 1.0], [80.0, 1.0]]))
            unknown = model(x, torch.full((2, 2), float("nan")))
        assert not torch.allclose(young_male, old_female), architecture
        assert torch.isfinite(unknown).all(), architecture
    assert family.uses_demographics(_config("SimpleNet", use_demographics=True))
    assert not family.uses_demographics(_config("SimpleNet"))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_trains_on_real_ptbxl_batch(architecture: str, ptbxl_batch) -> None:
    signals, labels, _ = ptbxl_batch
    # DeepResidualCNN at half width (128 channels) keeps this test fast; the shape tests cover full width.
    width = 0.5 if architecture == "DeepResidualCNN" else 1.0
    torch.manual_seed(0)
    model = build_light_model(
        _config(architecture, n_outputs=labels.shape[1], width_multiplier=width)
    ).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(TRAIN_STEPS + 1):
        torch.manual_seed(123)  # the same dropout masks at every step, so the losses are comparable
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(signals), labels)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()  # (the last step's update is not measured)
    assert losses[-1] < 0.9 * losses[0], (architecture, losses)


def test_demographics_path_gets_gradients_on_real_batch(ptbxl_batch) -> None:
    signals, labels, demographics = ptbxl_batch
    assert not torch.isnan(demographics).all()
    torch.manual_seed(0)
    model = build_light_model(_config("SimpleNet", n_outputs=labels.shape[1], use_demographics=True)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(signals, demographics), labels)
        loss.backward()
        grad = model.demographics.mlp[0].weight.grad
        assert grad is not None and grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_save_load_round_trip_is_bit_identical(architecture: str, tmp_path: Path) -> None:
    use_demographics = architecture in ("ParallelCNNew", "AttiaNet")
    width = 0.5 if architecture == "DeepResidualCNN" else 1.0  # keeps the test fast
    config = _config(architecture, use_demographics=use_demographics, width_multiplier=width)
    torch.manual_seed(1)
    model = build_light_model(config)
    # Move BatchNorm running statistics away from their defaults so they are really saved and restored.
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 12, 1000), _demographics(4) if use_demographics else None)
    model.eval()
    folder = save_inhouse_expert(
        model,
        family="light",
        config=LightCNNConfig.from_dict(config),
        contract=CONTRACT,
        folder=tmp_path / "expert",
        name=f"enecg-{architecture.lower()}-ptbxl",
        metrics={"macro_auroc": 0.5},
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CONFIG_FILE, EXPERT_SPEC_FILE, METRICS_FILE, WEIGHTS_FILE]
    )
    spec = json.loads((folder / EXPERT_SPEC_FILE).read_text())
    assert tuple(sorted(spec)) == tuple(sorted(SPEC_FIELDS))
    assert spec["family"] == "light" and spec["weights_file"] == WEIGHTS_FILE and spec["config"] == config
    assert spec["contract"] == CONTRACT.to_dict() and spec["embedding_dim"] == 128
    assert spec["lora_target_modules"] == get_family("light").lora_target_modules(config)
    assert spec["expected_unexpected_keys"] == [] and spec["license"] == "apache-2.0"
    saved_config = json.loads((folder / CONFIG_FILE).read_text())
    assert saved_config["enecg_family"] == "light" and saved_config["config"] == config
    assert "enecg_version" in saved_config

    loaded, loaded_spec = load_inhouse_expert_module(folder)
    assert loaded_spec == spec and not loaded.training
    x = torch.randn(3, 12, 1000)
    demographics = _demographics(3) if use_demographics else None
    with torch.no_grad():
        assert torch.equal(model(x, demographics), loaded(x, demographics))
        assert torch.equal(model.features(x, demographics), loaded.features(x, demographics))

    family = get_family("light")
    assert family.detect(folder) == folder / WEIGHTS_FILE
    state_dict, read_config = family.read_checkpoint(folder / WEIGHTS_FILE)
    assert read_config == config and set(state_dict) == set(model.state_dict())


def test_strict_load_rejects_tampered_files(tmp_path: Path) -> None:
    model = build_light_model(_config("SimpleNet"))
    folder = save_inhouse_expert(
        model, family="light", config=_config("SimpleNet"), contract=CONTRACT, folder=tmp_path / "e", name="e"
    )
    weights = load_file(str(folder / WEIGHTS_FILE))
    removed = sorted(weights)[0]
    del weights[removed]
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=rf"missing key.*{removed}"):
        load_inhouse_expert_module(folder)

    spec = json.loads((folder / EXPERT_SPEC_FILE).read_text())
    (folder / EXPERT_SPEC_FILE).write_text(json.dumps({**spec, "weights_file": "../elsewhere.safetensors"}))
    with pytest.raises(ValueError, match="plain file name"):
        load_inhouse_expert_module(folder)
    (folder / EXPERT_SPEC_FILE).write_text(json.dumps({**spec, "config": _config("AttiaNet")}))
    with pytest.raises(ValueError, match="disagree"):
        load_inhouse_expert_module(folder)


def test_save_refuses_a_config_that_does_not_rebuild_the_model(tmp_path: Path) -> None:
    model = build_light_model(_config("SimpleNet"))
    with pytest.raises(ValueError, match="builds a different module"):
        save_inhouse_expert(
            model,
            family="light",
            config=_config("SimpleNet", in_leads=1),
            contract=CONTRACT,
            folder=tmp_path,
            name="x",
        )
    assert not (tmp_path / EXPERT_SPEC_FILE).exists()


def test_detect_ignores_other_folders(tmp_path: Path) -> None:
    family = get_family("light")
    assert family.detect(tmp_path) is None
    spec = {field: None for field in SPEC_FIELDS} | {
        "family": "net1d",
        "weights_file": WEIGHTS_FILE,
        "config": {},
    }
    (tmp_path / EXPERT_SPEC_FILE).write_text(json.dumps(spec))
    assert family.detect(tmp_path) is None


@pytest.mark.parametrize("architecture", ["DeepResidualCNN", "ParallelCNNew", "SimpleNet"])
def test_lora_targets_adapt_the_embedding(architecture: str) -> None:
    from peft import LoraConfig, get_peft_model

    family = get_family("light")
    config = _config(architecture, width_multiplier=0.25)
    targets = family.lora_target_modules(config)
    torch.manual_seed(0)
    model = family.build(config).eval()
    names = dict(model.named_modules())
    assert targets and all(
        isinstance(names[t], (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) for t in targets
    )
    assert not any(t.startswith(("classifier", "attention")) for t in targets)
    x = torch.randn(2, 12, 1000)
    with torch.no_grad():
        base = family.embed(model, x)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        adapted = family.embed(peft_model.base_model.model, x)
    assert not torch.allclose(base, adapted)


def test_expert_wrapper_passes_demographics(tmp_path) -> None:
    """A light expert built with demographics, loaded through the generic loader, fuses age/sex from records."""
    import numpy as np

    from enecg.contract import InputContract
    from enecg.experts import load_expert
    from enecg.experts.families.light import LightCNNConfig, build_light_model
    from enecg.experts.inhouse import save_inhouse_expert
    from enecg.leads import STANDARD_12_LEADS
    from enecg.record import ECGRecord

    config = LightCNNConfig(architecture="SimpleNet", use_demographics=True)
    model = build_light_model(config)
    contract = InputContract(fs=100.0, leads=STANDARD_12_LEADS, length=1000, scaling="zscore_lead")
    save_inhouse_expert(model, family="light", config=config.to_dict(), contract=contract, folder=tmp_path / "e",
                        name="demo")
    expert = load_expert(str(tmp_path / "e"))
    assert expert.uses_demographics
    signal = np.random.default_rng(0).normal(size=(12, 1000)).astype(np.float32)
    young = ECGRecord(signal, 100.0, STANDARD_12_LEADS, "r", metadata={"age": 20.0, "sex": 0.0})
    old = ECGRecord(signal, 100.0, STANDARD_12_LEADS, "r", metadata={"age": 80.0, "sex": 1.0})
    unknown = ECGRecord(signal, 100.0, STANDARD_12_LEADS, "r", metadata={})
    e_young, e_old, e_unknown = expert.embed([young]), expert.embed([old]), expert.embed([unknown])
    assert not torch.allclose(e_young, e_old)
    assert torch.isfinite(e_unknown).all()
    with pytest.raises(ValueError, match="pass demographics"):
        expert(expert.prepare(young))
