"""Parity of the native MOMENT family with the official ``MOMENTPipeline`` (fixtures made with the official code).

Every variant folder under ``<parity>/moment`` (any subfolder with ``fixture_meta.json``) is loaded from its own
files only (``read_checkpoint`` -> ``build`` -> strict load) and every ``expected_*.npy`` is compared at
atol=1e-4, rtol=0 (``*_masked`` files use ``input_mask.npy``). Full-size manifests are checked key-for-key on the
meta device.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import parity_dir
from torch import nn

from enecg.experts.family import get_family
from enecg.experts.weights import load_state_dict_strict

FAMILY_DIR = parity_dir() / "moment"
VARIANTS = sorted(p.parent.name for p in FAMILY_DIR.glob("*/fixture_meta.json"))
MANIFESTS = sorted(p.name for p in FAMILY_DIR.glob("keys_full_*.json"))
ATOL = 1e-4
MASKED_SUFFIX = "_masked"

# expected_<name>[_masked].npy -> the official call that produced it (model, x_enc, input_mask or None).
CALLS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "embedding_mean": lambda model, x, mask: model.embed(x, input_mask=mask, reduction="mean"),
    "embedding_none": lambda model, x, mask: model.embed(x, input_mask=mask, reduction="none"),
    "reconstruction": lambda model, x, mask: model.reconstruct(x, input_mask=mask),
}


def _or_skip(items: list[str], what: str) -> list:
    return items or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"no MOMENT {what} under {FAMILY_DIR}"))
    ]


@functools.cache
def _loaded(variant: str) -> tuple[nn.Module, dict, dict[str, torch.Tensor]]:
    """Model built and strictly loaded from the variant folder's files alone, plus its checkpoint."""
    family = get_family("moment")
    folder = FAMILY_DIR / variant
    state_dict, config = family.read_checkpoint(folder / "model.safetensors")
    assert config is not None, "config.json next to model.safetensors must be read"
    model = family.build(config)
    report = load_state_dict_strict(model, state_dict, source=str(folder))
    assert report == {"dropped": [], "missing": []}
    return model.eval(), config, state_dict


def _input(variant: str, name: str = "input.npy") -> torch.Tensor:
    return torch.from_numpy(np.load(FAMILY_DIR / variant / name))


def _assert_close(name: str, ours: torch.Tensor, expected: np.ndarray) -> None:
    ours = ours.detach().numpy()
    assert ours.shape == expected.shape, f"{name}: shape {ours.shape} vs expected {expected.shape}"
    diff = float(np.abs(ours - expected).max())
    assert np.allclose(ours, expected, rtol=0, atol=ATOL), f"{name}: max |diff| {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_every_expected_output_matches(variant: str) -> None:
    model, _, _ = _loaded(variant)
    assert not model.training
    x = _input(variant)
    expected_files = sorted((FAMILY_DIR / variant).glob("expected_*.npy"))
    assert expected_files, f"{variant}: no expected_*.npy"
    for path in expected_files:
        name = path.stem.removeprefix("expected_")
        masked = name.endswith(MASKED_SUFFIX)
        call = CALLS.get(name.removesuffix(MASKED_SUFFIX))
        assert call is not None, f"{path.name}: no known call produces it (known: {sorted(CALLS)})"
        mask = _input(variant, "input_mask.npy") if masked else None
        with torch.no_grad():
            ours = call(model, x, mask)
        _assert_close(f"{variant}/{path.name}", ours, np.load(path))


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_expert_embed_is_the_official_embedding_call(variant: str) -> None:
    model, config, _ = _loaded(variant)
    family = get_family("moment")
    x = _input(variant)
    with torch.no_grad():
        pooled = family.embed(model, x)
        assert torch.equal(pooled, family.official_forward(model, x))
        assert torch.equal(pooled, model(x))
    assert pooled.shape == (x.shape[0], family.embedding_dim(config))
    expected = FAMILY_DIR / variant / "expected_embedding_mean.npy"
    if expected.is_file():
        _assert_close(f"{variant}/embed", pooled, np.load(expected))
    with pytest.raises(ValueError, match="MOMENT expects"):
        family.embed(model, x[..., :-1])
    with pytest.raises(ValueError, match="MOMENT expects"):
        family.embed(model, x[:, 0])


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_positional_table_is_recomputed_exactly(variant: str) -> None:
    """The stored ``pe`` buffer equals the sinusoidal table a fresh build computes (no silent formula drift)."""
    _, config, state_dict = _loaded(variant)
    fresh = get_family("moment").build(config).state_dict()
    key = "patch_embedding.position_embedding.pe"
    torch.testing.assert_close(fresh[key], state_dict[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_pretrain_mask_keeps_observed_patches(variant: str) -> None:
    """mask_ratio 0 (published) keeps exactly the fully observed patches; mask_ratio > 0 keeps
    ceil(observed * (1 - ratio)) of them and never a padded one."""
    from enecg.experts.families.moment import PRETRAIN_MASK_PATCH_LEN, patch_observed

    model, config, _ = _loaded(variant)
    x = _input(variant)
    input_mask = torch.ones(x.shape[0], x.shape[-1])
    input_mask[:, : 2 * PRETRAIN_MASK_PATCH_LEN] = 0
    input_mask[0, 2 * PRETRAIN_MASK_PATCH_LEN] = 0  # a partly observed patch counts as unobserved
    observed = patch_observed(input_mask, PRETRAIN_MASK_PATCH_LEN)
    mask = model.pretrain_mask(x, input_mask)
    assert torch.equal(patch_observed(mask, PRETRAIN_MASK_PATCH_LEN), observed)

    ratio = 0.5
    masking = get_family("moment").build({**config, "mask_ratio": ratio})
    torch.manual_seed(0)
    kept = patch_observed(masking.pretrain_mask(x, input_mask), PRETRAIN_MASK_PATCH_LEN)
    assert torch.equal(kept.sum(dim=1), torch.ceil(observed.sum(dim=1) * (1 - ratio)).long())
    assert not bool((kept * (1 - observed)).any())


@pytest.mark.parametrize("variant", _or_skip(VARIANTS, "parity variants"))
def test_detect_and_read_checkpoint(variant: str, tmp_path: Path) -> None:
    family = get_family("moment")
    folder = FAMILY_DIR / variant
    assert family.detect(folder) == folder / "model.safetensors"
    _, config = family.read_checkpoint(folder)  # a folder works as well as the file
    assert config == json.loads((folder / "config.json").read_text())
    assert family.detect(tmp_path) is None
    for other in sorted(parity_dir().glob("hubert_ecg/*/fixture_meta.json"))[:1]:
        assert family.detect(other.parent) is None
    # Without model_name, t5_config + patch_len identify the layout.
    unnamed = {k: v for k, v in config.items() if k != "model_name"}
    (tmp_path / "config.json").write_text(json.dumps(unnamed))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert family.detect(tmp_path) == tmp_path / "model.safetensors"


@pytest.mark.parametrize("manifest", _or_skip(MANIFESTS, "full-size manifests"))
def test_full_size_state_dict_matches_manifest(manifest: str) -> None:
    """The published configurations build to exactly the official keys, shapes and dtypes (meta device: no
    memory is allocated for the 35M-341M parameters)."""
    spec = json.loads((FAMILY_DIR / manifest).read_text())
    family = get_family("moment")
    with torch.device("meta"):
        model = family.build(spec["config"])
    ours = [
        [key, list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in model.state_dict().items()
    ]
    assert ours == spec["keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    assert sum(t.numel() for t in model.state_dict().values()) == spec["num_state_dict_elements_incl_buffers"]
    assert family.embedding_dim(spec["config"]) == spec["config"]["t5_config"]["d_model"]
    # LoRA targets name Linear layers, and cover every attention/FFN linear of the T5 blocks.
    targets = family.lora_target_modules(spec["config"])
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(targets) <= linear_names
    block_linears = [n for n, m in model.encoder.block.named_modules() if isinstance(m, nn.Linear)]
    assert block_linears and all(n.rsplit(".", 1)[-1] in targets for n in block_linears)
