"""Parity of the native HuBERT-ECG family with the official model (fixtures made with the official code).

Every variant folder under ``<parity>/hubert_ecg`` (any subfolder with ``fixture_meta.json``) is loaded from its own
files only (``read_checkpoint`` -> ``build`` -> strict load) and every ``expected_*.npy`` is compared at
atol=1e-4, rtol=0. Full-size manifests are checked key-for-key on the meta device.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import parity_dir
from safetensors.torch import load_file, save_file
from torch import nn

from enecg.experts.family import get_family
from enecg.experts.weights import WeightsError, load_state_dict_strict

FAMILY_DIR = parity_dir() / "hubert_ecg"
VARIANTS = sorted(p.parent.name for p in FAMILY_DIR.glob("*/fixture_meta.json"))
MANIFESTS = sorted(p.name for p in FAMILY_DIR.glob("keys_full_*.json"))
ATOL = 1e-4
POS_CONV = "encoder.pos_conv_embed.conv."


def _or_skip(items: list[str], what: str) -> list:
    return items or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"no HuBERT-ECG {what} under {FAMILY_DIR}"))
    ]


@functools.cache
def _loaded(variant: str) -> tuple[nn.Module, dict, torch.Tensor]:
    """Model built and strictly loaded from the variant folder's files alone, plus its input."""
    family = get_family("hubert_ecg")
    folder = FAMILY_DIR / variant
    state_dict, config = family.read_checkpoint(folder / "model.safetensors")
    assert config is not None, "config.json next to model.safetensors must be read"
    model = family.build(config)
    report = load_state_dict_strict(model, state_dict, source=str(folder))
    assert report == {"dropped": [], "missing": []}
    model.eval()
    x = torch.from_numpy(np.load(folder / "input.npy"))
    return model, config, x


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every quantity a fixture may store, named as in ``expected_<name>.npy``."""
    family = get_family("hubert_ecg")
    with torch.no_grad():
        hidden = family.official_forward(model, x).last_hidden_state
        outputs = {"last_hidden_state": hidden, "mean_pooled": family.embed(model, x)}
        for i, logits in enumerate(model.logits(hidden)):
            outputs[f"pretrain_logits_{i}"] = logits
    return outputs


def _assert_close(name: str, ours: torch.Tensor | np.ndarray, expected: np.ndarray) -> None:
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == expected.shape, f"{name}: shape {ours.shape} vs expected {expected.shape}"
    diff = float(np.abs(ours - expected).max())
    assert np.allclose(ours, expected, rtol=0, atol=ATOL), f"{name}: max |diff| {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_every_expected_output_matches(variant: str) -> None:
    model, config, x = _loaded(variant)
    assert not model.training
    outputs = _outputs(model, x)
    expected_files = sorted((FAMILY_DIR / variant).glob("expected_*.npy"))
    assert expected_files, f"{variant}: no expected_*.npy"
    for path in expected_files:
        name = path.stem.removeprefix("expected_")
        assert name in outputs, f"{path.name}: no known call produces {name!r} (known: {sorted(outputs)})"
        _assert_close(f"{variant}/{path.name}", outputs[name], np.load(path))
    # One pretraining head per ensemble member, sized by the checkpoint's own vocab_sizes.
    logits = [outputs[f"pretrain_logits_{i}"] for i in range(config["ensemble_length"])]
    assert [t.shape[-1] for t in logits] == list(config["vocab_sizes"])


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_intermediates_match(variant: str) -> None:
    """Block-level activations (debugging aid shipped with the fixture) match too."""
    path = FAMILY_DIR / variant / "expected_intermediates.safetensors"
    if not path.is_file():
        pytest.skip(f"{variant}: no expected_intermediates.safetensors")
    model, _, x = _loaded(variant)
    expected = load_file(str(path))
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in expected:
        layer = re.fullmatch(r"encoder_layer_(\d+)", name)
        module = model.encoder.layers[int(layer.group(1))] if layer else getattr(model, name)

        def hook(_module, _inputs, output, name=name):
            captured[name] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_hook(hook))
    try:
        _outputs(model, x)
    finally:
        for handle in handles:
            handle.remove()
    for name, tensor in expected.items():
        _assert_close(f"{variant}/intermediates/{name}", captured[name], tensor.numpy())


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_eval_mode_is_deterministic_and_train_mode_is_not(variant: str) -> None:
    """eval() must switch off LayerDrop, dropout and SpecAugment masking (all active in this config in train)."""
    model, _, x = _loaded(variant)
    family = get_family("hubert_ecg")
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        np.random.seed(seed)  # SpecAugment draws its spans with numpy
        with torch.no_grad():
            runs.append(family.embed(model, x))
    assert torch.equal(runs[0], runs[1])
    if model.config.hidden_dropout > 0 or model.config.layerdrop > 0:
        try:
            model.train()
            torch.manual_seed(0)
            with torch.no_grad():
                train_run = family.embed(model, x)
        finally:
            model.eval()
        assert not torch.allclose(train_run, runs[0])


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_embed_accepts_leads_by_time_windows(variant: str) -> None:
    model, config, x = _loaded(variant)
    family = get_family("hubert_ecg")
    leads = math.gcd(x.shape[1], 12)
    with torch.no_grad():
        flat = family.embed(model, x)
        by_lead = family.embed(model, x.reshape(x.shape[0], leads, -1))
    assert flat.shape == (x.shape[0], family.embedding_dim(config))
    assert torch.equal(flat, by_lead)
    with pytest.raises(ValueError, match="HuBERT-ECG expects"):
        family.embed(model, x.reshape(1, 1, 1, -1))


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_legacy_weight_norm_names_load(variant: str, tmp_path: Path) -> None:
    """A file with ``weight_g``/``weight_v`` (old torch weight_norm) loads to the same model."""
    folder = FAMILY_DIR / variant
    state_dict = load_file(str(folder / "model.safetensors"))
    legacy = {
        key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): tensor
        for key, tensor in state_dict.items()
    }
    assert POS_CONV + "weight_g" in legacy and POS_CONV + "weight_v" in legacy
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(folder / "config.json", tmp_path / "config.json")

    family = get_family("hubert_ecg")
    loaded, config = family.read_checkpoint(tmp_path / "model.safetensors")
    assert set(loaded) == set(state_dict)
    model = family.build(config)
    load_state_dict_strict(model, loaded, source=str(tmp_path))
    model.eval()
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        hidden = family.official_forward(model, x).last_hidden_state
    _assert_close("legacy/last_hidden_state", hidden, np.load(folder / "expected_last_hidden_state.npy"))

    # Both spellings in one file is ambiguous: refused, naming the file.
    both = {**state_dict, **{k: v.clone() for k, v in legacy.items()}}
    save_file(both, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="alias"):
        family.read_checkpoint(tmp_path)


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_auto_classes_load_published_folder_natively(variant: str) -> None:
    """config.json has model_type hubert_ecg + auto_map: the Auto classes use the native classes (no remote code,
    no prompt) and give the same outputs."""
    from transformers import AutoConfig, AutoModel

    from enecg.experts.families.hubert_ecg import HuBERTECG, HuBERTECGConfig, register_auto_classes

    folder = FAMILY_DIR / variant
    register_auto_classes()  # idempotent: a second registration is harmless
    config = AutoConfig.from_pretrained(str(folder))
    assert type(config) is HuBERTECGConfig
    assert config.vocab_sizes == json.loads((folder / "config.json").read_text())["vocab_sizes"]
    model = AutoModel.from_pretrained(str(folder))
    assert type(model) is HuBERTECG
    model.eval()
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        hidden = model(input_values=x).last_hidden_state
    _assert_close("auto/last_hidden_state", hidden, np.load(folder / "expected_last_hidden_state.npy"))


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_detect_and_config_requirements(variant: str, tmp_path: Path) -> None:
    family = get_family("hubert_ecg")
    folder = FAMILY_DIR / variant
    assert family.detect(folder) == folder / "model.safetensors"
    assert family.detect(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert family.detect(tmp_path) is None
    for other in sorted(parity_dir().glob("moment/*/fixture_meta.json"))[:1]:
        assert family.detect(other.parent) is None
    config = json.loads((folder / "config.json").read_text())
    config.pop("vocab_sizes")
    with pytest.raises(ValueError, match="vocab_sizes"):
        family.build(config)


@pytest.mark.parametrize("manifest", _or_skip(MANIFESTS, "full-size manifests"))
def test_full_size_state_dict_matches_manifest(manifest: str) -> None:
    """The published configurations build to exactly the official keys, shapes and dtypes (meta device: no
    memory is allocated for the 30M-188M parameters)."""
    spec = json.loads((FAMILY_DIR / manifest).read_text())
    family = get_family("hubert_ecg")
    with torch.device("meta"):
        model = family.build(spec["config"])
    ours = [
        [key, list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in model.state_dict().items()
    ]
    assert ours == spec["keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    assert sum(t.numel() for t in model.state_dict().values()) == spec["num_state_dict_elements_incl_buffers"]
    assert family.embedding_dim(spec["config"]) == spec["config"]["hidden_size"]
    # Every LoRA target names Linear layers of the encoder, and covers all attention/FFN linears.
    targets = family.lora_target_modules(spec["config"])
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(targets) <= linear_names
    for name, module in model.encoder.layers.named_modules():
        if isinstance(module, nn.Linear):
            assert name.rsplit(".", 1)[-1] in targets, name
