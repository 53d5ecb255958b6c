"""Parity of the native Net1D (ECGFounder) port with the official model, on every fixture variant.

Every subfolder of ``<parity>/ecgfounder`` holding a ``fixture_meta.json`` is a variant (``tiny_a`` here; held-out
variants with other widths/depths/kernels/strides/leads use the same layout). Each is built from its own declared
config, the official constructor kwargs in ``fixture_meta.json`` -> ``constructor_kwargs`` (as the fixture README
says): ``stride``, ``use_bn`` and ``use_do`` leave no trace in the weights, so only a declared config can give
them. The config inferred from the checkpoint's tensor shapes is checked against the declared one for everything
else. Full-size manifests (``keys_full_*.json``) are checked on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import parity_dir

from enecg.experts import load_expert
from enecg.experts.families.net1d import NON_INFERABLE, Net1DConfig, infer_net1d_config
from enecg.experts.family import get_family
from enecg.experts.spec import Spec
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


def _declared(folder: Path) -> dict[str, Any]:
    """The variant's official constructor kwargs (without the ones that only change what forward returns)."""
    kwargs = _meta(folder)["constructor_kwargs"]
    return {k: v for k, v in kwargs.items() if k not in ("verbose", "return_features")}


def _load(folder: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """The variant built from its declared config, its checkpoint loaded strictly."""
    family = get_family("net1d")
    weights = family.detect(folder)
    assert weights is not None, f"{folder}: published Net1D layout not detected"
    state_dict, _ = family.read_checkpoint(weights)
    config = Net1DConfig.from_dict(_declared(folder)).to_dict()
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
    model, state_dict, config = _load(folder)
    meta = _meta(folder)
    official = _declared(folder)
    # What the shapes tell must agree with the declaration; what they cannot tell comes from it (as a spec's
    # `config:` entries override the checkpoint's inferred config).
    inferred = infer_net1d_config(state_dict, folder).to_dict()
    inferred.update({k: official[k] for k in NON_INFERABLE if k in official})
    # ratio / groups_width only matter through int(filters * ratio) and filters // groups_width: compare those.
    assert _architecture(inferred) == _architecture(official) == _architecture(config)
    assert _key_list(model) == meta["keys"]
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]


@pytest.mark.parametrize("folder", _variants())
def test_state_dict_round_trip_is_bit_identical(folder: Path, family, tmp_path: Path) -> None:
    model, original, _ = _load(folder)
    # Unused BatchNorm state must survive: the fixture randomised it, so zeros/ones would show a silent drop.
    assert any(k.endswith("running_mean") and original[k].abs().sum() > 0 for k in original)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "checkpoint.pth")
    (tmp_path / "fixture_meta.json").write_text((folder / "fixture_meta.json").read_text())  # the declared config
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
    inferred.update({k: config[k] for k in NON_INFERABLE})  # what a spec's `config:` would set
    assert list(state_dict) == list(original)
    assert _architecture(inferred) == _architecture(config)


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


def test_non_default_stride_is_set_in_the_spec(family, tmp_path: Path) -> None:
    """stride leaves no trace in the weights: a stride-4 model loads right only with `config: {stride: 4}`."""
    config = {
        "in_channels": 2,
        "base_filters": 8,
        "filter_list": [8, 16],
        "m_blocks_list": [1, 2],
        "kernel_size": 5,
        "stride": 4,
        "groups_width": 4,
        "n_classes": 3,
    }
    torch.manual_seed(0)
    reference = family.build(config).eval()
    folder = tmp_path / "net1d-stride4"
    folder.mkdir()
    torch.save({"state_dict": reference.state_dict()}, folder / "model.pth")
    x = torch.randn(2, 2, 400)
    with torch.no_grad():
        expected = family.embed(reference, x)

    def spec(overrides: dict[str, Any]) -> Spec:
        return Spec.from_dict(
            {
                "name": "net1d-stride4",
                "family": "net1d",
                "hub_id": "enecg-test/net1d-stride4",
                "weights_file": "model.pth",
                "license": "mit",
                "config_from": "checkpoint",
                "config": overrides,
                "embedding_dim": 16,
                "contract": {"fs": 100, "leads": ["I", "II"], "length": 400},
            },
            source="stride test spec",
        )

    expert = load_expert(folder, spec=spec({"stride": 4}))
    assert expert.config["stride"] == 4
    with torch.no_grad():
        assert torch.equal(family.embed(expert.model, x), expected)
    # Without it the shapes alone give the published stride 2: same weights, other outputs.
    assumed = load_expert(folder, spec=spec({}))
    assert assumed.config["stride"] == 2
    with torch.no_grad():
        assert not torch.allclose(family.embed(assumed.model, x), expected)
