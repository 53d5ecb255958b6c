"""The bundled adapter specs (``adapters/*.yaml``) and the Spec schema.

Every bundled spec must parse, name a registered family, carry a licence, and declare the input contract the
model's own preprocessing uses (the table in docs/foundation-models.md). Embedding sizes are checked against the
families on the published configurations recorded in the parity manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import parity_dir
from test_expert_loading import MANTIS_8M_CONFIG, MANTIS_V2_CONFIG
from test_parity_mantis import MANTISPLUS_CONFIG_JSON
from torch import nn

from enecg.contract import InputContract
from enecg.experts.family import family_names, get_family
from enecg.experts.spec import (
    SPEC_FILENAME,
    Spec,
    SpecError,
    bundled_spec,
    bundled_spec_dir,
    bundled_specs,
    contract_summary,
    default_spec_for_hub_id,
    specs_for_hub_id,
)
from enecg.leads import STANDARD_12_LEADS

SPEC_FILES = sorted(bundled_spec_dir().glob("*.yaml"))
KNOWN_LICENSES = {"mit", "apache-2.0", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "bsd-3-clause"}
EXPECTED_SPECS = {
    "hubert-ecg-small": (
        "Edoardo-BS/hubert-ecg-small",
        "model.safetensors",
        "hubert_ecg",
        512,
        "cc-by-nc-4.0",
    ),
    "hubert-ecg-base": ("Edoardo-BS/hubert-ecg-base", "model.safetensors", "hubert_ecg", 768, "cc-by-nc-4.0"),
    "hubert-ecg-large": (
        "Edoardo-BS/hubert-ecg-large",
        "model.safetensors",
        "hubert_ecg",
        960,
        "cc-by-nc-4.0",
    ),
    "ecgfounder-12lead": ("PKUDigitalHealth/ECGFounder", "12_lead_ECGFounder.pth", "net1d", 1024, "mit"),
    "ecgfounder-1lead": ("PKUDigitalHealth/ECGFounder", "1_lead_ECGFounder.pth", "net1d", 1024, "mit"),
    "ecg-fm-pretrained": ("wanglab/ecg-fm", "mimic_iv_ecg_physionet_pretrained.pt", "ecg_fm", 768, "mit"),
    "ecg-fm-finetuned": ("wanglab/ecg-fm", "mimic_iv_ecg_finetuned.pt", "ecg_fm", 768, "mit"),
    "moment-1-small": ("AutonLab/MOMENT-1-small", "model.safetensors", "moment", 512, "mit"),
    "moment-1-base": ("AutonLab/MOMENT-1-base", "model.safetensors", "moment", 768, "mit"),
    "moment-1-large": ("AutonLab/MOMENT-1-large", "model.safetensors", "moment", 1024, "mit"),
    "mantis-8m": ("paris-noah/Mantis-8M", "model.safetensors", "mantis", 3072, "mit"),
    "mantisplus": ("paris-noah/MantisPlus", "model.safetensors", "mantis", 3072, "mit"),
    "mantisv2": ("paris-noah/MantisV2", "model.safetensors", "mantis", 3072, "mit"),
}


def test_every_published_model_has_a_spec() -> None:
    specs = bundled_specs()
    assert set(EXPECTED_SPECS) <= set(specs)
    for name, (hub_id, weights_file, family, dim, license_id) in EXPECTED_SPECS.items():
        spec = specs[name]
        assert (spec.hub_id, spec.weights_file, spec.family, spec.embedding_dim, spec.license) == (
            hub_id,
            weights_file,
            family,
            dim,
            license_id,
        ), name


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_bundled_spec_file_is_valid(path: Path) -> None:
    spec = Spec.from_yaml(path)
    assert spec.name == path.stem and spec.name == spec.name.lower()
    assert spec.hub_id and spec.weights_file and spec.embedding_dim
    assert spec.license in KNOWN_LICENSES
    assert spec.pooling and spec.description and spec.reference.startswith("https://")
    assert isinstance(spec.contract, InputContract)
    assert (
        spec.contract.fs and spec.contract.leads and spec.contract.length
    )  # a published model fixes all three
    assert spec.family in family_names(), f"{path.name}: family {spec.family!r} is not registered"
    assert Spec.from_dict(spec.to_dict(), source="round trip") == spec
    assert yaml.safe_load(yaml.safe_dump(spec.to_dict())) == spec.to_dict()
    assert contract_summary(spec.contract)


def test_each_repo_with_several_models_has_one_default() -> None:
    by_repo: dict[str, list[Spec]] = {}
    for spec in bundled_specs().values():
        by_repo.setdefault(spec.hub_id.lower(), []).append(spec)
    for hub_id, specs in by_repo.items():
        if len(specs) > 1:
            assert sum(s.default_for_repo for s in specs) == 1, hub_id
    assert default_spec_for_hub_id("PKUDigitalHealth/ECGFounder").name == "ecgfounder-12lead"
    assert (
        default_spec_for_hub_id("wanglab/ECG-FM").name == "ecg-fm-pretrained"
    )  # repo ids are case-insensitive
    assert default_spec_for_hub_id("someone/else") is None
    assert {s.name for s in specs_for_hub_id("wanglab/ecg-fm")} == {"ecg-fm-pretrained", "ecg-fm-finetuned"}


# ---------------------------------------------------------------------- contracts vs docs/foundation-models.md


def test_hubert_ecg_contract() -> None:
    for size in ("small", "base", "large"):
        c = bundled_spec(f"hubert-ecg-{size}").contract
        assert (c.fs, c.leads, c.length, c.layout) == (100.0, STANDARD_12_LEADS, 500, "concat_leads")
        assert (c.bandpass, c.bandpass_design, c.scaling) == ((0.05, 47.0), "fir", "minmax_lead")
        assert c.notch is None and c.baseline == "none"


def test_ecgfounder_contract() -> None:
    for name, leads in (("ecgfounder-12lead", STANDARD_12_LEADS), ("ecgfounder-1lead", ("I",))):
        spec = bundled_spec(name)
        c = spec.contract
        assert (c.fs, c.leads, c.length, c.layout) == (500.0, leads, 5000, "leads_time")
        assert (c.notch, c.bandpass, c.bandpass_design, c.bandpass_order) == (50.0, (0.67, 40.0), "butter", 4)
        assert (c.baseline, c.scaling) == ("median", "zscore_record")
        assert spec.config["in_channels"] == len(leads)


def test_ecg_fm_contract() -> None:
    for name in ("ecg-fm-pretrained", "ecg-fm-finetuned"):
        c = bundled_spec(name).contract
        assert (c.fs, c.leads, c.length) == (500.0, STANDARD_12_LEADS, 2500)
        assert (c.long_records, c.aggregation, c.zero_constant_leads, c.scaling) == (
            "segments",
            "mean",
            True,
            "zscore_lead",
        )
        assert c.bandpass is None and c.notch is None


def test_moment_contract() -> None:
    for size in ("small", "base", "large"):
        c = bundled_spec(f"moment-1-{size}").contract
        assert (c.fs, c.leads, c.length, c.layout, c.scaling) == (
            100.0,
            STANDARD_12_LEADS,
            512,
            "leads_time",
            "none",
        )


def test_mantis_contract_and_published_configs() -> None:
    """512 samples at 100 Hz per lead, no scaling; 12 per-lead 256-d CLS vectors concatenated. The configs are the
    published config.json files (MantisPlus's verbatim, with its inert extra keys; the others as the official
    save_pretrained writes them), read the way the specs read them (config_from checkpoint + num_channels)."""
    published = {
        "mantis-8m": MANTIS_8M_CONFIG,
        "mantisplus": MANTISPLUS_CONFIG_JSON,
        "mantisv2": MANTIS_V2_CONFIG,
    }
    family = get_family("mantis")
    for name, config in published.items():
        spec = bundled_spec(name)
        c = spec.contract
        assert (c.fs, c.leads, c.length, c.layout, c.scaling, c.long_records) == (
            100.0,
            STANDARD_12_LEADS,
            512,
            "leads_time",
            "none",
            "segments",
        )
        assert spec.config_from == "checkpoint" and dict(spec.config) == {"num_channels": 12}
        assert family.embedding_dim({**config, **spec.config}) == spec.embedding_dim == 12 * 256
        with torch.device("meta"):
            model = family.build({**config, **spec.config})
        assert model.config.version == ("v2" if name == "mantisv2" else "v1")
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params == (4188672 if name == "mantisv2" else 8103936)  # the official counts
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for target in spec.lora_target_modules or family.lora_target_modules(dict(config)):
            assert any(n.endswith("." + target) for n in names), f"{name}: {target!r}"


# ---------------------------------------------------------------------- sizes and LoRA targets vs the families


def _manifest(*parts: str) -> dict:
    path = parity_dir().joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"parity manifest {path} not found")
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("spec_name", "manifest", "key"),
    [
        ("hubert-ecg-small", ("hubert_ecg", "keys_full_small.json"), "config"),
        ("hubert-ecg-base", ("hubert_ecg", "keys_full_base.json"), "config"),
        ("hubert-ecg-large", ("hubert_ecg", "keys_full_large.json"), "config"),
        ("moment-1-small", ("moment", "keys_full_small.json"), "config"),
        ("moment-1-base", ("moment", "keys_full_base.json"), "config"),
        ("moment-1-large", ("moment", "keys_full_large.json"), "config"),
        ("ecg-fm-pretrained", ("ecgfm", "keys_full_pretrained.json"), "model_cfg_full"),
        ("ecg-fm-finetuned", ("ecgfm", "keys_full_finetuned_17labels.json"), "model_cfg_full"),
        ("ecgfounder-12lead", ("ecgfounder", "keys_full_12lead.json"), "constructor_kwargs"),
        ("ecgfounder-1lead", ("ecgfounder", "keys_full_1lead.json"), "constructor_kwargs"),
    ],
)
def test_embedding_dim_matches_the_family_on_the_published_config(
    spec_name: str, manifest: tuple, key: str
) -> None:
    spec = bundled_spec(spec_name)
    config = _manifest(*manifest)[key]
    if spec.config_from == "inline":
        # The inline constructor must be the published one (the manifest's), verbose flag aside.
        assert dict(spec.config) == {k: v for k, v in config.items() if k != "verbose"}
        config = dict(spec.config)
    assert get_family(spec.family).embedding_dim(config) == spec.embedding_dim


@pytest.mark.parametrize(
    ("family", "fixture"),
    [("hubert_ecg", "hubert_ecg"), ("ecg_fm", "ecgfm"), ("moment", "moment"), ("net1d", "ecgfounder")],
)
def test_lora_targets_name_modules_of_the_family(family: str, fixture: str) -> None:
    """Every spec's LoRA targets (or the family default) match Linear/Conv modules of a small model of the same
    architecture (the tiny parity config: same module names as the published sizes)."""
    tiny = parity_dir() / fixture / "tiny_a"
    if not tiny.is_dir():
        pytest.skip(f"parity fixture {tiny} not found")
    impl = get_family(family)
    if family == "net1d":
        meta = json.loads((tiny / "fixture_meta.json").read_text())
        config = {
            k: v for k, v in (meta.get("constructor_kwargs") or meta["config"]).items() if k != "verbose"
        }
    else:
        _, config = impl.read_checkpoint(
            tiny / ("checkpoint.pt" if family == "ecg_fm" else "model.safetensors")
        )
    model = impl.build(config)
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv1d))]
    for spec in bundled_specs().values():
        if spec.family != family:
            continue
        targets = spec.lora_target_modules or tuple(impl.lora_target_modules(config))
        assert targets, spec.name
        for target in targets:
            assert any(n == target or n.endswith("." + target) for n in names), f"{spec.name}: {target!r}"


# ---------------------------------------------------------------------- schema validation


def _valid() -> dict:
    return bundled_spec("hubert-ecg-small").to_dict()


def _write(tmp_path: Path, data: dict | str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"hub_idd": "x/y"}, "unknown spec key(s) ['hub_idd']"),
        ({"license": None}, "missing required spec key(s) ['license']"),
        ({"family": ""}, "missing required spec key(s) ['family']"),
        ({"hub_id": "not a repo"}, "hub_id 'not a repo'"),
        ({"embedding_dim": -3}, "embedding_dim must be a positive integer"),
        ({"extra_files": "config.json"}, "extra_files must be a list"),
        ({"weights_file": "../../etc/passwd"}, "must be a relative path inside the repo"),
        ({"config_from": "config.yaml"}, "config_from 'config.yaml'"),
        ({"config_from": "inline", "config": {}}, "no config is given"),
        ({"default_for_repo": "yes"}, "default_for_repo must be true or false"),
        ({"contract": {"fs": 100, "scaling": "zscore"}}, "invalid contract"),
        ({"contract": {"fs": 100, "sampling_rate": 100}}, "invalid contract"),
        ({"contract": {"fs": 100, "bandpass": [0.5, 60]}}, "invalid contract"),
        ({"contract": {"fs": 100, "layout": "concat_leads"}}, "concat_leads needs explicit leads and length"),
    ],
)
def test_invalid_spec_is_one_line_naming_the_file(tmp_path: Path, change: dict, expected: str) -> None:
    data = _valid()
    data.update(change)
    path = _write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and expected in message, message


def test_unreadable_spec_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        Spec.from_yaml(tmp_path / "absent.yaml")
    bad_yaml = _write(tmp_path, "name: [unclosed\n")
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(bad_yaml)
    assert str(info.value).startswith(f"{bad_yaml}: not valid YAML") and "\n" not in str(info.value)
    not_mapping = _write(tmp_path, "- a\n- b\n", name="list.yaml")
    with pytest.raises(SpecError, match="must be a mapping"):
        Spec.from_yaml(not_mapping)
    with pytest.raises(SpecError, match=r"\.yaml, \.yml or \.json"):
        Spec.from_file(tmp_path / "spec.txt")


def test_json_spec_round_trip_and_inhouse_layout(tmp_path: Path) -> None:
    spec = bundled_spec("ecg-fm-pretrained")
    path = tmp_path / SPEC_FILENAME
    spec.save_json(path)
    assert Spec.from_json(path) == spec
    # The fields an in-house expert folder writes (enecg.experts.inhouse) form a valid spec on their own.
    inhouse = {
        "name": "light-test",
        "family": "light",
        "weights_file": "model.safetensors",
        "config": {"architecture": "SimpleNet"},
        "contract": {"fs": 100.0, "leads": list(STANDARD_12_LEADS), "length": 1000},
        "pooling": "family",
        "embedding_dim": 64,
        "license": "apache-2.0",
        "lora_target_modules": ["conv"],
        "expected_unexpected_keys": [],
        "description": "In-house light expert.",
    }
    parsed = Spec.from_dict(inhouse, source="enecg_expert.json")
    assert parsed.hub_id is None and parsed.config_from == "inline" and parsed.revision == "main"


def test_replace_validates() -> None:
    spec = bundled_spec("moment-1-small")
    assert spec.replace(embedding_dim=7).embedding_dim == 7
    with pytest.raises(SpecError, match="unknown spec key"):
        spec.replace(nonsense=1)
