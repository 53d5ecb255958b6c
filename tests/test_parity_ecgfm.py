"""Parity of the native ECG-FM (fairseq-signals wav2vec2_cmsc) port with the official model, on every variant.

Every subfolder of ``<parity>/ecgfm`` holding a ``fixture_meta.json`` is a variant (``tiny_a`` here; held-out
variants with other sizes and the other weight-norm key naming use the same layout). Each is loaded from its own
files (fairseq ``.pt`` with ``cfg``, and/or ``model.safetensors`` + ``cfg.json``). Full-size manifests
(``keys_full_*.json``) are checked on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import parity_dir
from safetensors.torch import save_file

from enecg.experts.families.ecg_fm import CFG_JSON, SAFETENSORS_FILE, normalise_weight_norm_keys
from enecg.experts.family import get_family
from enecg.experts.weights import WeightsError, load_state_dict_strict, read_weights

FIXTURE_DIR = parity_dir() / "ecgfm"
ATOL = 1e-4
LEGACY = {
    ".parametrizations.weight.original0": ".weight_g",
    ".parametrizations.weight.original1": ".weight_v",
}


def _variants() -> list[Any]:
    folders = sorted(p for p in FIXTURE_DIR.glob("*") if (p / "fixture_meta.json").is_file())
    if not folders:
        return [
            pytest.param(None, marks=pytest.mark.skip(reason=f"no ECG-FM parity fixtures in {FIXTURE_DIR}"))
        ]
    return [pytest.param(p, id=p.name) for p in folders]


def _manifests() -> list[Any]:
    files = sorted(FIXTURE_DIR.glob("keys_full_*.json"))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no ECG-FM manifests in {FIXTURE_DIR}"))]
    return [pytest.param(p, id=p.stem) for p in files]


def _weight_files(folder: Path) -> list[Path]:
    """Every checkpoint a variant ships: fairseq ``.pt`` files and the safetensors + cfg.json copy."""
    files = sorted(folder.glob("*.pt"))
    if (folder / SAFETENSORS_FILE).is_file() and (folder / CFG_JSON).is_file():
        files.append(folder / SAFETENSORS_FILE)
    return files


def _to_legacy(key: str) -> str:
    for current, legacy in LEGACY.items():
        if key.endswith(current):
            return key[: -len(current)] + legacy
    return key


def _canonical_keys(keys: list[list[Any]]) -> list[list[Any]]:
    """Manifest key list with weight-norm names in the spelling build() uses (order kept)."""
    names = list(normalise_weight_norm_keys({k: torch.empty(0) for k, _, _ in keys}))
    return [[name, shape, dtype] for name, (_, shape, dtype) in zip(names, keys)]


def _key_list(model: torch.nn.Module) -> list[list[Any]]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def _load(weights: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    family = get_family("ecg_fm")
    state_dict, config = family.read_checkpoint(weights)
    model = family.build(config)
    load_state_dict_strict(model, state_dict, source=str(weights))
    return model.eval(), state_dict, config


def _assert_matches_expected(folder: Path, model: torch.nn.Module, source: str) -> None:
    family = get_family("ecg_fm")
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        # Both the pretrained model and the classifier expose the official extract_features call.
        res = model.extract_features(source=x, padding_mask=None, mask=False)
        ours = {"encoder_out": res["x"], "local_features": res["features"], "pooled": family.embed(model, x)}
    expected_files = sorted(folder.glob("expected_*.npy"))
    assert expected_files, f"{folder}: no expected outputs"
    for path in expected_files:
        name = path.stem.removeprefix("expected_")
        assert name in ours, f"{path.name}: no known output of the official forward is called {name!r}"
        expected = np.load(path)
        got = ours[name].numpy()
        assert got.shape == expected.shape, f"{source} {path.name}: shape {got.shape} vs {expected.shape}"
        assert np.allclose(got, expected, rtol=0, atol=ATOL), (
            f"{source} {path.name}: max |diff| {np.abs(got - expected).max():.3g}"
        )


@pytest.fixture(scope="module")
def family():
    return get_family("ecg_fm")


@pytest.mark.parametrize("folder", _variants())
def test_outputs_match_official_for_every_shipped_file(folder: Path, family) -> None:
    files = _weight_files(folder)
    assert files, f"{folder}: no checkpoint"
    assert family.detect(folder) in files
    for weights in files:
        model, _, config = _load(weights)
        _assert_matches_expected(folder, model, weights.name)
        official = family.official_forward(model, torch.from_numpy(np.load(folder / "input.npy")))
        assert official["x"].shape[-1] == config["encoder_embed_dim"] and official["padding_mask"] is None
        x = torch.from_numpy(np.load(folder / "input.npy"))
        with torch.no_grad():
            assert family.embed(model, x).shape == (x.shape[0], family.embedding_dim(config))


@pytest.mark.parametrize("folder", _variants())
def test_keys_match_official_modulo_weight_norm_spelling(folder: Path, family) -> None:
    meta = json.loads((folder / "fixture_meta.json").read_text())
    for weights in _weight_files(folder):
        model, state_dict, _ = _load(weights)
        assert _key_list(model) == _canonical_keys(meta["keys"]), weights.name
        assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
        assert set(state_dict) == set(model.state_dict())


@pytest.mark.parametrize("folder", _variants())
def test_state_dict_round_trip_is_bit_identical(folder: Path, family, tmp_path: Path) -> None:
    weights = _weight_files(folder)[0]
    model, original, config = _load(weights)
    save_file(model.state_dict(), str(tmp_path / SAFETENSORS_FILE))
    (tmp_path / CFG_JSON).write_text(json.dumps({"model": config}))
    reloaded, _, _ = _load(tmp_path / SAFETENSORS_FILE)
    assert set(reloaded.state_dict()) == set(original)
    for key, value in reloaded.state_dict().items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


@pytest.mark.parametrize("folder", _variants())
def test_other_weight_norm_spelling_loads(folder: Path, family, tmp_path: Path) -> None:
    """Rewrite the variant's checkpoints with the *other* weight-norm naming; both formats must still match."""
    weights = _weight_files(folder)[0]
    raw = read_weights(weights)
    state_dict = raw["model"] if weights.suffix == ".pt" else raw
    uses_legacy = any(k.endswith((".weight_g", ".weight_v")) for k in state_dict)
    if uses_legacy:
        converted = normalise_weight_norm_keys(state_dict)
    else:
        converted = {_to_legacy(k): v for k, v in state_dict.items()}
    assert set(converted) != set(state_dict), "the variant has no weight-normalised parameters to rename"
    cfg = raw["cfg"] if weights.suffix == ".pt" else json.loads((folder / CFG_JSON).read_text())
    torch.save({"args": None, "cfg": cfg, "model": converted, "extra_state": {}}, tmp_path / "checkpoint.pt")
    save_file(converted, str(tmp_path / SAFETENSORS_FILE))
    (tmp_path / CFG_JSON).write_text(json.dumps(cfg))
    for converted_weights in (tmp_path / "checkpoint.pt", tmp_path / SAFETENSORS_FILE):
        model, _, _ = _load(converted_weights)
        _assert_matches_expected(folder, model, f"converted {converted_weights.name}")


@pytest.mark.parametrize("folder", _variants())
def test_classifier_wrapper_reuses_the_encoder(folder: Path, family) -> None:
    """``ecg_transformer_classifier``: encoder weights under ``encoder.`` + ``proj`` on the pooled output."""
    _, state_dict, config = _load(_weight_files(folder)[0])
    classifier_config = {
        **config,
        "_name": "ecg_transformer_classifier",
        "num_labels": 3,
        "apply_mask": False,
    }
    classifier = family.build(classifier_config).eval()
    pretraining_only = ("mask_emb", "quantizer.", "project_q.", "final_proj.", "target_glu.")
    encoder_sd = {"encoder." + k: v for k, v in state_dict.items() if not k.startswith(pretraining_only)}
    torch.manual_seed(0)
    head = {"proj.weight": torch.randn(3, config["encoder_embed_dim"]), "proj.bias": torch.randn(3)}
    load_state_dict_strict(classifier, {**encoder_sd, **head}, source="classifier")
    _assert_matches_expected(folder, classifier, "classifier")
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        out = family.official_forward(classifier, x)["out"]
        pooled = family.embed(classifier, x)
    assert torch.allclose(out, pooled @ head["proj.weight"].T + head["proj.bias"], atol=1e-5)


@pytest.mark.parametrize("manifest_path", _manifests())
def test_full_size_architecture_matches_manifest(manifest_path: Path, family) -> None:
    manifest = json.loads(manifest_path.read_text())
    config = manifest["model_cfg_full"]
    with torch.device("meta"):
        model = family.build(config)
    assert _key_list(model) == _canonical_keys(manifest["keys"])
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert family.embedding_dim(config) == config["encoder_embed_dim"]
    # The legacy spelling the published file most likely uses maps onto the same module keys.
    for current, legacy in manifest.get("legacy_key_aliases", {}).items():
        assert next(iter(normalise_weight_norm_keys({legacy: torch.empty(0)}))) == current


@pytest.mark.parametrize("folder", _variants())
def test_lora_on_default_targets_changes_eval_output(folder: Path, family) -> None:
    peft = pytest.importorskip("peft")
    model, _, config = _load(_weight_files(folder)[0])
    x = torch.from_numpy(np.load(folder / "input.npy"))
    with torch.no_grad():
        before = family.embed(model, x)
    targets = family.lora_target_modules(config)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets)).eval()
    wrapped = {name.rsplit(".", 1)[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
        after = family.embed(lora.base_model.model, x)
    assert not torch.allclose(after, before, atol=1e-6)


def test_unsupported_or_malformed_checkpoints_are_clear_errors(family, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"args": None, "cfg": None, "model": {}}, path)
    with pytest.raises(WeightsError, match=r"ckpt\.pt: checkpoint has no 'cfg'"):
        family.read_checkpoint(path)
    torch.save({"cfg": {"model": {"_name": "hubert"}}, "model": {}}, path)
    with pytest.raises(WeightsError, match=r"ckpt\.pt: model '_name' 'hubert' is not supported"):
        family.read_checkpoint(path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"need a cfg\.json"):
        family.read_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="conv_feature_layers"):
        family.build({"_name": "wav2vec2_cmsc", "conv_feature_layers": "__import__('os')"})


def test_detect_prefers_safetensors_and_refuses_ambiguous_pt(family, tmp_path: Path) -> None:
    cfg = {"model": {"_name": "wav2vec2_cmsc"}}
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    assert family.detect(tmp_path) is None
    torch.save({"cfg": cfg, "model": {}}, tmp_path / "pretrained.pt")
    assert family.detect(tmp_path) == tmp_path / "pretrained.pt"
    torch.save(
        {"cfg": {"model": {"_name": "ecg_transformer_classifier"}}, "model": {}}, tmp_path / "finetuned.pt"
    )
    with pytest.raises(WeightsError, match="several ECG-FM checkpoints"):
        family.detect(tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / SAFETENSORS_FILE))
    (tmp_path / CFG_JSON).write_text(json.dumps(cfg))
    assert family.detect(tmp_path) == tmp_path / SAFETENSORS_FILE
