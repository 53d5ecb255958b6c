"""Parity of the native Net1D (ECGFounder) port with the official model, on every fixture variant.

Every subfolder of ``<parity>/ecgfounder`` holding a ``fixture_meta.json`` is a variant (``tiny_a`` here; held-out
variants with other widths/depths/kernels/leads use the same layout). Each is loaded from its files alone: the
config is inferred from the checkpoint's tensor shapes, never read from ``fixture_meta.json`` (used only to
cross-check). Full-size manifests (``keys_full_*.json``) are checked on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import parity_dir

from enecg.experts.families.net1d import Net1DConfig, infer_net1d_config
from enecg.experts.family import get_family
from enecg.experts.weights import WeightsError, load_state_dict_strict

FIXTURE_DIR = parity_dir() / "ecgfounder"
ATOL = 1e-4


def _variants() -> list[Any]:
    folders = sorted(p for p in FIXTURE_DIR.glob("*") if (p / "fixture_meta.json").is_file())
    if not folders:
        return [
            pytest.param(
                None, marks=pytest.mark.skip(reason=f"no ECGFounder parity fixtures in {FIXTURE_DIR}")
            )
        ]
    return [pytest.param(p, id=p.name) for p in folders]


def _manifests() -> list[Any]:
    files = sorted(FIXTURE_DIR.glob("keys_full_*.json"))
    if not files:
        return [
            pytest.param(None, marks=pytest.mark.skip(reason=f"no ECGFounder manifests in {FIXTURE_DIR}"))
        ]
    return [pytest.param(p, id=p.stem) for p in files]


def _meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "fixture_meta.json").read_text())


def _key_list(model: torch.nn.Module) -> list[list[Any]]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """A Net1D config reduced to what determines the module (equivalent ratio/groups_width values collapse)."""
    reduced = {k: v for k, v in config.items() if k not in ("ratio", "groups_width")}
    reduced["bottleneck_widths"] = [int(f * config["ratio"]) for f in config["filter_list"]]
    reduced["groups"] = [f // config["groups_width"] for f in config["filter_list"]]
    return reduced


def _load(folder: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    family = get_family("net1d")
    weights = family.detect(folder)
    assert weights is not None, f"{folder}: published Net1D layout not detected"
    state_dict, config = family.read_checkpoint(weights)
    model = family.build(config)
    load_state_dict_strict(model, state_dict, source=str(weights))
    return model.eval(), state_dict, config


@pytest.fixture(scope="module")
def family():
    return get_family("net1d")


@pytest.mark.parametrize("folder", _variants())
def test_outputs_match_official(folder: Path, family) -> None:
    model, _, config = _load(folder)
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        logits, features = family.official_forward(model, x)
        embedding = family.embed(model, x)
    ours = {"logits": logits, "features": features}
    expected_files = sorted(folder.glob("expected_*.npy"))
    assert expected_files, f"{folder}: no expected outputs"
    for path in expected_files:
        name = path.stem.removeprefix("expected_")
        assert name in ours, f"{path.name}: no known output of the official forward is called {name!r}"
        expected = np.load(path)
        assert ours[name].shape == expected.shape, f"{path.name}: shape {tuple(ours[name].shape)}"
        assert np.allclose(ours[name].numpy(), expected, rtol=0, atol=ATOL), (
            f"{path.name}: max |diff| {np.abs(ours[name].numpy() - expected).max():.3g}"
        )
    assert torch.equal(embedding, features)
    assert embedding.shape[1] == family.embedding_dim(config)


@pytest.mark.parametrize("folder", _variants())
def test_inferred_config_and_keys_match_official(folder: Path, family) -> None:
    model, _, config = _load(folder)
    meta = _meta(folder)
    official = {
        k: v for k, v in meta["constructor_kwargs"].items() if k not in ("verbose", "return_features")
    }
    # ratio / groups_width only matter through int(filters * ratio) and filters // groups_width: compare those.
    assert _architecture(config) == _architecture(official)
    assert _key_list(model) == meta["keys"]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]


@pytest.mark.parametrize("folder", _variants())
def test_state_dict_round_trip_is_bit_identical(folder: Path, family, tmp_path: Path) -> None:
    model, original, _ = _load(folder)
    # Unused BatchNorm state must survive: the fixture randomised it, so zeros/ones would show a silent drop.
    assert any(k.endswith("running_mean") and original[k].abs().sum() > 0 for k in original)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "checkpoint.pth")
    reloaded, state_dict, _ = _load(tmp_path)
    assert list(state_dict) == list(original)
    for key, value in reloaded.state_dict().items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


@pytest.mark.parametrize("folder", _variants())
def test_data_parallel_prefix_and_extra_entries_are_accepted(folder: Path, family, tmp_path: Path) -> None:
    _, original, config = _load(folder)
    wrapped = {"module." + k: v for k, v in original.items()}
    torch.save(
        {"state_dict": wrapped, "epoch": 3, "optimizer": {"state": {}, "lr": 1e-3}}, tmp_path / "ckpt.pth"
    )
    state_dict, inferred = family.read_checkpoint(tmp_path / "ckpt.pth")
    assert list(state_dict) == list(original) and inferred == config


def test_detect_ignores_other_pickles_and_refuses_ambiguity(family, tmp_path: Path) -> None:
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pth")
    assert family.detect(tmp_path) is None
    model = family.build(
        {
            "in_channels": 1,
            "base_filters": 8,
            "filter_list": [8],
            "m_blocks_list": [1],
            "kernel_size": 3,
            "groups_width": 4,
            "n_classes": 2,
        }
    )
    torch.save({"state_dict": model.state_dict()}, tmp_path / "1_lead.pth")
    assert family.detect(tmp_path) == tmp_path / "1_lead.pth"
    torch.save({"state_dict": model.state_dict()}, tmp_path / "12_lead.pth")
    with pytest.raises(WeightsError, match="several Net1D checkpoints"):
        family.detect(tmp_path)


def test_not_a_net1d_checkpoint_is_a_clear_error(family, tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(WeightsError, match=r"x\.pth: not a Net1D checkpoint"):
        family.read_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(WeightsError, match="no 'state_dict' entry"):
        family.read_checkpoint(path)


@pytest.mark.parametrize("manifest_path", _manifests())
def test_full_size_architecture_matches_manifest(manifest_path: Path, family) -> None:
    manifest = json.loads(manifest_path.read_text())
    kwargs = {
        k: v for k, v in manifest["constructor_kwargs"].items() if k not in ("verbose", "return_features")
    }
    with torch.device("meta"):
        model = family.build(kwargs)
    assert _key_list(model) == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert family.embedding_dim(kwargs) == kwargs["filter_list"][-1]
    # Config inference from shapes alone recovers the published constructor.
    assert infer_net1d_config(model.state_dict(), manifest_path).to_dict() == kwargs


@pytest.mark.parametrize("folder", _variants())
def test_lora_on_default_targets_changes_eval_output(folder: Path, family) -> None:
    peft = pytest.importorskip("peft")
    model, _, config = _load(folder)
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        before = family.embed(model, x)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=family.lora_target_modules(config))
    ).eval()
    with torch.no_grad():
        assert torch.equal(family.embed(lora.base_model.model, x), before)  # B = 0 at init: no change yet
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
        after = family.embed(lora.base_model.model, x)
    assert not torch.allclose(after, before, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        {
            "in_channels": 1,
            "base_filters": 8,
            "filter_list": [8, 16],
            "m_blocks_list": [1, 3],
            "kernel_size": 5,
            "groups_width": 4,
            "n_classes": 3,
        },
        {
            "in_channels": 12,
            "base_filters": 16,
            "ratio": 0.5,
            "filter_list": [16, 32, 48],
            "m_blocks_list": [2, 1, 1],
            "kernel_size": 7,
            "groups_width": 4,
            "n_classes": 5,
        },
        # groups_width that does not divide every stage: several widths are equivalent; the module must be equal.
        {
            "in_channels": 2,
            "base_filters": 20,
            "filter_list": [20, 30],
            "m_blocks_list": [1, 2],
            "kernel_size": 4,
            "groups_width": 8,
            "n_classes": 2,
        },
    ],
    ids=["1lead-odd-kernel", "half-ratio", "non-dividing-groups"],
)
def test_config_inference_recovers_other_architectures(
    config: dict[str, Any], family, tmp_path: Path
) -> None:
    with torch.device("meta"):
        reference = family.build(config)
    state_dict = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state_dict}, tmp_path / "net.pth")
    _, inferred = family.read_checkpoint(tmp_path / "net.pth")
    full = {**Net1DConfig().to_dict(), **config}
    assert _architecture(inferred) == _architecture(full)
    with torch.device("meta"):
        assert _key_list(family.build(inferred)) == _key_list(reference)
