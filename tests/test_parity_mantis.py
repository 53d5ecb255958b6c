"""Live parity of the native Mantis family with the official ``mantis-tsfm`` package.

The official package pins pandas<3 / numpy<3 / einops<0.9, so it lives in its own virtual environment: its Python
is ``$ENECG_MANTIS_PYTHON`` (default ``.venv-mantis/bin/python`` in the repository, which ``.ci/run`` creates via
``scripts/mantis_venv.sh``). The tests skip, saying why, when that Python cannot import ``mantis``.

Once per session the official side (``tests/mantis_official.py``, a subprocess in that environment) builds models
at configurations drawn here from seeded random generators (small random widths, depths, heads, patch counts,
kernels, output tokens, layer cuts) plus the three published configurations with random weights, saves each with
``save_pretrained`` (the published layout ``from_pretrained`` reads) and records its outputs for fixed inputs.
Every folder is then loaded here strictly from its files alone and compared: state-dict keys, shapes and dtypes
exactly and in order, outputs at atol 1e-4 (rtol 0).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from enecg.experts.family import get_family
from enecg.experts.weights import WeightsError, load_state_dict_strict

ATOL = 1e-4
N_DRAWN = 8  # drawn configurations per architecture class
# Fixed by default (reproducible CI); ENECG_MANTIS_PARITY_SEED draws a different set of configurations.
SEED = int(os.environ.get("ENECG_MANTIS_PARITY_SEED", "20260314"))
OFFICIAL_SCRIPT = Path(__file__).with_name("mantis_official.py")

# The published configurations (config.json of each Hub repo, architecture keys only).
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "published_mantis_8m": ("Mantis8M", {}),  # legacy class: keys under vit_unit.*
    "published_mantisplus": ("MantisV1", {}),
    "published_mantisv2": ("MantisV2", {}),
}


# paris-noah/MantisPlus's config.json verbatim: keys of an unreleased variant that the official MantisV1 ignores.
MANTISPLUS_CONFIG_JSON = {
    "device": "cpu",
    "epsilon_scalar_enc": 1.1,
    "hidden_dim": 256,
    "hidden_dim_scalar_enc": 32,
    "kernel_size": None,
    "no_diff_operator": False,
    "no_scalars": False,
    "num_patches": 32,
    "output": "cls_token",
    "patch_length_oriented": False,
    "pre_training": False,
    "return_transf_layer": -1,
    "scalar_scales": None,
    "seq_len": 512,
    "transf_depth": 6,
    "transf_dim_head": 128,
    "transf_dropout": 0.1,
    "transf_mlp_dim": 512,
    "transf_num_heads": 8,
}


def mantis_python() -> Path:
    return Path(os.environ.get("ENECG_MANTIS_PYTHON", REPO_ROOT / ".venv-mantis" / "bin" / "python"))


def _official_available(python: Path) -> str | None:
    """None when ``python`` imports the official package, else the reason it cannot."""
    if not python.is_file():
        return f"no official Mantis environment at {python} (set ENECG_MANTIS_PYTHON or run scripts/mantis_venv.sh)"
    probe = subprocess.run(
        [str(python), "-c", "import mantis.architecture, mantis.trainer"], capture_output=True, text=True
    )
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import the official mantis package: {last}"
    return None


def _drawn_v1(rng: random.Random, index: int) -> dict[str, Any]:
    heads = rng.choice([1, 2, 4])
    hidden = rng.choice([8, 16, 24, 32])
    num_patches = rng.choice([4, 8, 16])
    return {
        "seq_len": num_patches * rng.choice([3, 4, 6, 8]),  # odd and even patch widths (kernel = width (+1))
        "hidden_dim": hidden,
        "num_patches": num_patches,
        "hidden_dim_scalar_enc": rng.choice([4, 8, 12]),
        "epsilon_scalar_enc": rng.choice([1.1, 1.5]),
        "scalar_scales": rng.choice([None, [0.01, 1.0, 100.0], [0.1, 1.0, 10.0, 1000.0]]),
        "transf_depth": rng.randint(1, 3),
        "transf_num_heads": heads,
        "transf_mlp_dim": rng.choice([16, 32, 48]),
        # heads == 1 and dim_head == hidden drops the output projection: drawn on purpose sometimes.
        "transf_dim_head": hidden if heads == 1 and index % 2 else rng.choice([4, 8, 16]),
        "output_token": rng.choice(["cls_token", "mean_token", "combined"]),
        "return_transf_layer": rng.choice([-1, 0]),
        "pre_training": rng.random() < 0.3,
    }


def _drawn_v2(rng: random.Random) -> dict[str, Any]:
    heads = rng.choice([1, 2, 4])
    hidden = heads * rng.choice([4, 6, 8])  # rotary width hidden/heads: even
    output_token = rng.choice(["cls_token", "mean_token", "combined"])
    return {
        "hidden_dim": hidden,
        "num_patches": rng.choice([4, 8, 16]),
        "kernel_size": rng.choice([3, 5, 9, 41]),
        "hidden_dim_scalar_enc": rng.choice([4, 8]),
        "scalar_scales": rng.choice([None, [0.01, 1.0, 100.0]]),
        "transf_depth": rng.randint(1, 3),
        "transf_num_heads": heads,
        "transf_mlp_dim": rng.choice([8, 16, 32]),
        # Head width >= the rotary width; wider heads leave their tail features unrotated.
        "transf_dim_head": hidden // heads + rng.choice([0, 0, 2, 4]),
        "output_token": output_token,
        "return_transf_layer": rng.choice([-1, 0]),
        "pre_training": output_token != "combined" and rng.random() < 0.3,
    }


def draw_jobs(seed: int = SEED) -> list[dict[str, Any]]:
    """The official builds: drawn configurations of every class plus the published ones."""
    rng = random.Random(seed)
    jobs = []
    for name, (cls, kwargs) in PUBLISHED.items():
        jobs.append({"name": name, "cls": cls, "kwargs": kwargs, "length": 512, "batch": 2, "channels": 3})
    jobs[1]["config_json"] = MANTISPLUS_CONFIG_JSON
    for index in range(N_DRAWN):
        v1 = _drawn_v1(rng, index)
        jobs.append({"name": f"drawn_v1_{index}", "cls": "MantisV1", "kwargs": v1, "length": v1["seq_len"]})
        legacy = {
            k: v for k, v in _drawn_v1(rng, index).items() if k not in ("output_token", "return_transf_layer")
        }  # Mantis8M has neither option
        jobs.append(
            {"name": f"drawn_8m_{index}", "cls": "Mantis8M", "kwargs": legacy, "length": legacy["seq_len"]}
        )
        v2 = _drawn_v2(rng)
        length = v2["num_patches"] * rng.choice([2, 4, 6])  # V2 takes any multiple of num_patches
        jobs.append({"name": f"drawn_v2_{index}", "cls": "MantisV2", "kwargs": v2, "length": length})
    for job in jobs:
        job.setdefault("batch", rng.randint(1, 3))
        job.setdefault("channels", rng.randint(1, 3))
        job["seed"] = rng.randrange(2**31)
        # The V1/V2 instance from_pretrained takes these from the instance, not the file: pass the same.
        job["runtime"] = {
            k: job["kwargs"][k]
            for k in ("output_token", "return_transf_layer", "pre_training")
            if k in job["kwargs"]
        }
    return jobs


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    python = mantis_python()
    reason = _official_available(python)
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("mantis-official")
    jobs = draw_jobs()
    (out / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [str(python), str(OFFICIAL_SCRIPT), str(out / "jobs.json"), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, f"official Mantis script failed:\n{done.stderr[-3000:]}"
    return out, jobs


def _load(folder: Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    family = get_family("mantis")
    state_dict, config = family.read_checkpoint(folder / "model.safetensors")
    assert config is not None
    model = family.build(config)
    report = load_state_dict_strict(model, state_dict, source=str(folder))
    assert report == {"dropped": [], "missing": []}
    return model.eval(), config, state_dict


def _close(name: str, ours: torch.Tensor, expected: np.ndarray) -> float:
    ours_np = ours.detach().numpy()
    assert ours_np.shape == expected.shape, f"{name}: shape {ours_np.shape} vs {expected.shape}"
    diff = float(np.abs(ours_np - expected).max())
    assert diff <= ATOL, f"{name}: max |diff| {diff:.3g} > {ATOL}"
    return diff


def test_every_official_build_loads_strictly_and_matches(
    official_dir: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, jobs = official_dir
    family = get_family("mantis")
    worst = 0.0
    assert len(jobs) == len(PUBLISHED) + 3 * N_DRAWN
    for job in jobs:
        folder = out / job["name"]
        model, config, _ = _load(folder)
        # Keys, shapes and dtypes exactly, in order (legacy vit_unit names compared after the official rename).
        official_keys = json.loads((folder / "keys.json").read_text())
        official_keys = [[k.replace("vit_unit.", "transf_unit.", 1), s, d] for k, s, d in official_keys]
        ours = [
            [k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()
        ]
        assert ours == official_keys, f"{job['name']}: state-dict keys differ"
        x = torch.from_numpy(np.load(folder / "input.npy"))
        with torch.no_grad():
            worst = max(
                worst,
                _close(f"{job['name']}/network", model(x[:, :1]), np.load(folder / "expected_network.npy")),
            )
            transform = family.official_forward(model, x, task="transform")
            worst = max(
                worst,
                _close(f"{job['name']}/transform", transform, np.load(folder / "expected_transform.npy")),
            )
            if model.config.version == "v2" or x.shape[-1] == model.config.seq_len:
                # The expert path: embed() with the spec's channel count is the trainer's transform.
                spec_config = {**config, "num_channels": x.shape[1]}
                embedder = family.build(spec_config)
                embedder.load_state_dict(model.state_dict())
                pooled = family.embed(embedder.eval(), x)
                assert torch.equal(pooled, transform)
                assert pooled.shape[1] == family.embedding_dim(spec_config)
    print(f"mantis parity: {len(jobs)} official builds, worst max |diff| {worst:.3g}")


def test_published_layout_is_detected_and_legacy_keys_are_renamed(
    official_dir: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out, _ = official_dir
    family = get_family("mantis")
    legacy = out / "published_mantis_8m"
    raw_keys = [k for k, _, _ in json.loads((legacy / "keys.json").read_text())]
    assert any(k.startswith("vit_unit.") for k in raw_keys)  # the legacy class really writes the old names
    for name in PUBLISHED:
        assert family.detect(out / name) == out / name / "model.safetensors"
    assert json.loads((out / "published_mantisplus" / "config.json").read_text()) == MANTISPLUS_CONFIG_JSON
    state_dict, _ = family.read_checkpoint(legacy)
    assert not any(k.startswith("vit_unit.") for k in state_dict)
    assert family.detect(tmp_path) is None


def test_published_configurations_have_the_published_sizes(
    official_dir: tuple[Path, list[dict[str, Any]]],
) -> None:
    """Mantis-8M / MantisPlus: 8.1M parameters, V2: 4.19M (the official docstring's count); D = 256 per channel."""
    out, _ = official_dir
    sizes = {}
    for name in PUBLISHED:
        model, config, _ = _load(out / name)
        sizes[name] = sum(p.numel() for p in model.parameters())
        assert get_family("mantis").embedding_dim({**config, "num_channels": 12}) == 12 * 256
    assert sizes == {
        "published_mantis_8m": 8103936,
        "published_mantisplus": 8103936,
        "published_mantisv2": 4188672,
    }


def test_strict_loading_names_missing_and_unexpected_keys(
    official_dir: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, _ = official_dir
    family = get_family("mantis")
    state_dict, config = family.read_checkpoint(out / "published_mantisv2")
    model = family.build(config)
    broken = dict(state_dict)
    broken.pop("prj.1.bias")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        WeightsError, match=r"missing key\(s\) \[prj.1.bias\].*unexpected key\(s\) \[extra.weight\]"
    ):
        load_state_dict_strict(model, broken, source="mantisv2")
    # A V1 file into a V2 network (or the reverse) is a key mismatch, never a silent partial load.
    v1_state, _ = family.read_checkpoint(out / "published_mantisplus")
    with pytest.raises(WeightsError, match="checkpoint does not match"):
        load_state_dict_strict(model, v1_state, source="mantisplus")


def test_config_parsing_without_the_official_package() -> None:
    """Version inference and the refusals need no official environment."""
    from enecg.experts.families.mantis import MantisConfig

    assert MantisConfig.from_dict({"seq_len": 512, "kernel_size": None}).version == "v1"
    v2 = MantisConfig.from_dict({"kernel_size": 41, "hidden_dim": 256})
    assert (v2.version, v2.transf_dim_head) == ("v2", 32)
    assert MantisConfig.from_dict({"mantis_version": "v2"}).kernel_size == 41
    assert MantisConfig.from_dict({"seq_len": 512, "output_token": "combined"}).output_dim == 512
    for bad in ({"no_scalars": True}, {"output_token": "max"}, {"seq_len": 500}, {"mantis_version": "v3"}):
        with pytest.raises(ValueError, match="Mantis config"):
            MantisConfig.from_dict(bad)
    family = get_family("mantis")
    model = family.build(
        {"seq_len": 64, "num_patches": 8, "hidden_dim": 16, "transf_depth": 1, "num_channels": 2}
    )
    with pytest.raises(ValueError, match="Mantis expects"):
        family.embed(model, torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="Mantis expects"):
        family.embed(model, torch.zeros(1, 2, 32))
    assert family.embed(model, torch.randn(2, 2, 64)).shape == (2, 32)
