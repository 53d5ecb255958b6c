"""Expert resolution and loading: Hub IDs against an offline Hub cache, local folders, in-house folders, the
one-line errors (wrong revision, missing file, malicious pickle, missing key), and the Expert module's behaviour
(freezing, contract application, window aggregation).

A test-only family (``enecg_test_toy``) keeps most tests independent of the real families; tests over the real
families (HuBERT-ECG, ECG-FM, Net1D, light) use the parity fixtures and skip when a family or fixture is absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import parity_dir
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from torch import nn

from enecg.contract import InputContract
from enecg.experts import (
    SPEC_FILENAME,
    Expert,
    ExpertLoadError,
    Spec,
    bundled_spec,
    load_expert,
    resolve_expert,
)
from enecg.experts.family import ExpertFamily, family_names, get_family, register_family
from enecg.experts.weights import WeightsError, read_weights
from enecg.leads import STANDARD_12_LEADS
from enecg.record import ECGRecord, RecordError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
MIMIC_LEAD_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


# ---------------------------------------------------------------------- a test-only family


class ToyNet(nn.Module):
    """Time-mean per lead -> Linear -> Dropout (the dropout makes train/eval mode observable)."""

    def __init__(self, leads: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(leads, dim)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(x.mean(dim=-1)))


@register_family
class ToyFamily(ExpertFamily):
    name = "enecg_test_toy"
    embed_calls: ClassVar[list[tuple[int, ...]]] = []

    def build(self, config: dict[str, Any]) -> nn.Module:
        return ToyNet(int(config["leads"]), int(config["dim"]))

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        obj = read_weights(path)
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        config_path = Path(path).with_name("toy_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        return dict(obj), config

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ToyFamily.embed_calls.append(tuple(x.shape))
        return model(x)

    def embedding_dim(self, config: dict[str, Any]) -> int:
        return int(config["dim"])

    def lora_target_modules(self, config: dict[str, Any]) -> list[str]:
        return ["proj"]


TOY_CONFIG = {"leads": 2, "dim": 4}


def toy_spec(**changes: Any) -> Spec:
    data: dict[str, Any] = {
        "name": "toy",
        "family": "enecg_test_toy",
        "hub_id": "enecg-test/toy",
        "weights_file": "model.safetensors",
        "license": "mit",
        "config": dict(TOY_CONFIG),
        "embedding_dim": 4,
        "contract": {"fs": 100, "leads": ["I", "II"], "length": 200, "long_records": "segments"},
    }
    data.update(changes)
    return Spec.from_dict(data, source="toy spec")


def toy_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in ToyNet(2, 4).state_dict().items()}


def write_toy_folder(folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict if state_dict is not None else toy_state_dict(), str(folder / "model.safetensors"))
    return folder


def make_hub_repo(
    cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT, ref: str = "main"
) -> Path:
    """Lay out ``repo_id`` as huggingface_hub caches it: refs/<ref> = commit (no newline), snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, offline Hub cache (patched in huggingface_hub.constants, read at call time)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def toy_repo(tmp_path: Path, hub_cache: Path) -> Path:
    folder = write_toy_folder(tmp_path / "toy-src")
    return make_hub_repo(hub_cache, "enecg-test/toy", {"model.safetensors": folder / "model.safetensors"})


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


def requires_family(name: str) -> None:
    if name not in family_names():
        pytest.skip(f"expert family {name!r} not available")


def fixture_dir(*parts: str) -> Path:
    path = parity_dir().joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"parity fixture {path} not found")
    return path


def synthetic_record(leads: tuple[str, ...], fs: float, seconds: float, seed: int = 0) -> ECGRecord:
    rng = np.random.default_rng(seed)
    n = round(fs * seconds)
    t = np.arange(n) / fs
    signal = np.sin(2 * np.pi * 1.1 * t)[None] * rng.uniform(0.3, 1.5, (len(leads), 1))
    signal = signal + 0.1 * rng.standard_normal((len(leads), n))
    return ECGRecord(signal=signal, fs=fs, leads=leads, record_id=f"synthetic-{seed}")


# ---------------------------------------------------------------------- Hub IDs, offline cache


def test_load_by_hub_id_records_the_snapshot_commit(toy_repo: Path) -> None:
    expert = load_expert("enecg-test/toy", spec=toy_spec())
    assert isinstance(expert, Expert)
    assert expert.hub_id == "enecg-test/toy"
    assert expert.revision == COMMIT
    assert expert.source == f"hf-hub:enecg-test/toy@{COMMIT}"
    assert expert.weights_path == toy_repo / "model.safetensors"
    reference = toy_state_dict()
    for key, value in expert.model.state_dict().items():
        torch.testing.assert_close(value, reference[key])


def test_hub_prefix_revision_in_name_and_spec_file(toy_repo: Path, tmp_path: Path) -> None:
    by_prefix = load_expert("hf-hub:enecg-test/toy@main", spec=toy_spec())
    assert by_prefix.revision == COMMIT
    by_commit = load_expert("enecg-test/toy", revision=COMMIT, spec=toy_spec())
    assert by_commit.revision == COMMIT
    spec_file = tmp_path / "toy.yaml"
    spec_file.write_text(json.dumps(toy_spec().to_dict()))  # JSON is valid YAML
    by_spec_file = load_expert(spec_file)
    assert (by_spec_file.hub_id, by_spec_file.revision, by_spec_file.name) == (
        "enecg-test/toy",
        COMMIT,
        "toy",
    )
    with pytest.raises(ExpertLoadError, match="conflicts"):
        load_expert("enecg-test/toy@main", revision=COMMIT, spec=toy_spec())


def test_second_revision_of_a_repo_loads_its_own_files(
    toy_repo: Path, hub_cache: Path, tmp_path: Path
) -> None:
    other = write_toy_folder(tmp_path / "toy-v2", toy_state_dict(seed=1))
    make_hub_repo(
        hub_cache,
        "enecg-test/toy",
        {"model.safetensors": other / "model.safetensors"},
        commit=OTHER_COMMIT,
        ref="v2",
    )
    main = load_expert("enecg-test/toy", spec=toy_spec())
    v2 = load_expert("enecg-test/toy", revision="v2", spec=toy_spec())
    assert (main.revision, v2.revision) == (COMMIT, OTHER_COMMIT)
    assert not torch.equal(main.model.proj.weight, v2.model.proj.weight)
    torch.testing.assert_close(v2.model.proj.weight, toy_state_dict(seed=1)["proj.weight"])


def test_hub_repo_carrying_its_own_spec(hub_cache: Path, tmp_path: Path) -> None:
    folder = write_toy_folder(tmp_path / "inhouse")
    toy_spec(name="toy-inhouse", hub_id=None).save_json(folder / SPEC_FILENAME)
    make_hub_repo(
        hub_cache,
        "enecg-test/inhouse",
        {"model.safetensors": folder / "model.safetensors", SPEC_FILENAME: folder / SPEC_FILENAME},
    )
    resolved = resolve_expert("enecg-test/inhouse")
    assert resolved.spec_origin == "repo"
    expert = load_expert("enecg-test/inhouse")
    assert (expert.name, expert.hub_id, expert.revision) == ("toy-inhouse", "enecg-test/inhouse", COMMIT)


def test_wrong_revision_offline_is_one_line_naming_repo_and_revision(toy_repo: Path) -> None:
    with pytest.raises(ExpertLoadError) as info:
        load_expert("enecg-test/toy", revision="no-such-branch", spec=toy_spec())
    message = one_line(info.value)
    assert "enecg-test/toy" in message and "'no-such-branch'" in message


def test_missing_file_in_snapshot_is_one_line_naming_the_file(toy_repo: Path) -> None:
    with pytest.raises(ExpertLoadError) as info:
        load_expert("enecg-test/toy", spec=toy_spec(weights_file="weights/absent.safetensors"))
    message = one_line(info.value)
    assert "'weights/absent.safetensors'" in message and "enecg-test/toy" in message


def test_repo_not_in_cache_offline(hub_cache: Path) -> None:
    with pytest.raises(ExpertLoadError) as info:
        load_expert("enecg-test/never-downloaded", spec=toy_spec())
    message = one_line(info.value)
    assert "enecg-test/never-downloaded" in message and "offline" in message


def _hub_error(cls: type[Exception], message: str) -> Exception:
    """A Hub HTTP error as huggingface_hub raises it, with a 404 response of whichever HTTP library it uses."""
    import importlib

    import huggingface_hub.errors as hub_errors

    response_cls = hub_errors.Response
    http_library = importlib.import_module(response_cls.__module__.split(".")[0])
    try:  # httpx-style: Response(status, request=...)
        response = response_cls(
            404, request=http_library.Request("HEAD", "https://huggingface.co/enecg-test/toy")
        )
    except TypeError:  # requests-style: Response() with attributes
        response = response_cls()
        response.status_code = 404
    return cls(message, response=response)


@pytest.mark.parametrize(
    ("error_name", "expected"),
    [
        ("RevisionNotFoundError", "revision 'v7' not found on the Hub"),
        ("RemoteEntryNotFoundError", "file 'model.safetensors' not found in the repository"),
        ("GatedRepoError", "gated repository"),
        ("RepositoryNotFoundError", "repository not found"),
    ],
)
def test_online_hub_errors_become_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error_name: str, expected: str
) -> None:
    """The real Hub's exceptions (simulated: no network here) map to one line naming repo, revision or file."""
    import huggingface_hub.errors as hub_errors

    error = _hub_error(
        getattr(hub_errors, error_name), "404 Client Error. Entry Not Found for url: https://..."
    )

    def fake_download(*args: Any, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(ExpertLoadError) as info:
        load_expert("enecg-test/toy", revision="v7", spec=toy_spec(), cache_dir=tmp_path)
    message = one_line(info.value)
    assert expected in message and "enecg-test/toy" in message


def test_hub_options_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """revision/token/cache_dir pass through; HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE come from
    huggingface_hub.constants when the call happens (patched here after import)."""
    calls: list[dict[str, Any]] = []
    source = write_toy_folder(tmp_path / "src")

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return str(make_hub_repo(tmp_path / "fake", repo_id, {filename: source / filename}) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "patched-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    expert = load_expert("enecg-test/toy", revision="v3", token="hf_secret", spec=toy_spec())
    assert expert.revision == COMMIT
    (call,) = calls
    assert call["repo_id"] == "enecg-test/toy" and call["filename"] == "model.safetensors"
    assert call["revision"] == "v3" and call["token"] == "hf_secret"
    assert call["endpoint"] == "https://hub.example.org"
    assert call["cache_dir"] == str(tmp_path / "patched-cache")
    assert call["local_files_only"] is False

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    load_expert("enecg-test/toy", spec=toy_spec(), cache_dir=tmp_path / "explicit")
    assert calls[-1]["local_files_only"] is True and calls[-1]["cache_dir"] == str(tmp_path / "explicit")
    assert calls[-1]["revision"] == "main"  # the spec's default revision


# ---------------------------------------------------------------------- local folders


def test_local_folder_and_prefix(tmp_path: Path) -> None:
    folder = write_toy_folder(tmp_path / "toy-local")
    for name in (folder, str(folder), f"local-dir:{folder}"):
        expert = load_expert(name, spec=toy_spec())
        assert expert.revision is None and expert.hub_id is None
        assert expert.source == f"local-dir:{folder.resolve()}"
    with pytest.raises(ExpertLoadError, match="only applies to Hub repos"):
        load_expert(folder, revision="main", spec=toy_spec())


def test_local_folder_with_own_spec_file(tmp_path: Path) -> None:
    folder = write_toy_folder(tmp_path / "toy-own")
    toy_spec(name="toy-own", hub_id=None).save_json(folder / SPEC_FILENAME)
    expert = load_expert(folder)
    assert expert.name == "toy-own" and resolve_expert(folder).spec_origin == "repo"


def test_unknown_name_and_unrecognised_folder(tmp_path: Path) -> None:
    with pytest.raises(ExpertLoadError) as info:
        load_expert("definitely not a model")
    assert "bundled spec" in one_line(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExpertLoadError) as info:
        load_expert(empty)
    assert str(empty) in one_line(info.value) and SPEC_FILENAME in str(info.value)


def test_missing_local_file_names_the_file(tmp_path: Path) -> None:
    folder = write_toy_folder(tmp_path / "toy-missing")
    with pytest.raises(ExpertLoadError) as info:
        load_expert(folder, spec=toy_spec(weights_file="other.safetensors"))
    assert "'other.safetensors'" in one_line(info.value)


def test_config_from_checkpoint_and_overrides(tmp_path: Path) -> None:
    folder = write_toy_folder(tmp_path / "toy-cfg")
    (folder / "toy_config.json").write_text(json.dumps({"leads": 2, "dim": 4}))
    expert = load_expert(folder, spec=toy_spec(config_from="checkpoint", config={}))
    assert expert.config == {"leads": 2, "dim": 4}
    with pytest.raises(ExpertLoadError, match="found none"):
        load_expert(
            write_toy_folder(tmp_path / "toy-nocfg"), spec=toy_spec(config_from="checkpoint", config={})
        )
    # A spec's config_from JSON file + overrides.
    (folder / "arch.json").write_text(json.dumps({"leads": 2, "dim": 99}))
    expert = load_expert(folder, spec=toy_spec(config_from="arch.json", config={"dim": 4}))
    assert expert.config == {"leads": 2, "dim": 4}


# ---------------------------------------------------------------------- weights errors


class _ArbitraryObject:
    """A custom class: unpickling it needs arbitrary code, which weights_only refuses."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os_system", "custom_class"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, payload: str) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    evil = _RunsACommand(marker) if payload == "os_system" else _ArbitraryObject()
    torch.save({"state_dict": {"proj.weight": evil}}, folder / "model.pth")
    assert not marker.exists()
    with pytest.raises(WeightsError) as info:
        load_expert(folder, spec=toy_spec(weights_file="model.pth"))
    message = one_line(info.value)
    assert str(folder / "model.pth") in message and "refused" in message
    assert not marker.exists(), "the pickle's payload was executed"


def test_missing_key_names_key_and_file(tmp_path: Path) -> None:
    state = toy_state_dict()
    del state["proj.bias"]
    folder = write_toy_folder(tmp_path / "toy-nokey", state)
    with pytest.raises(WeightsError) as info:
        load_expert(folder, spec=toy_spec())
    message = one_line(info.value)
    assert "proj.bias" in message and str(folder / "model.safetensors") in message


def test_expected_drops_are_tolerated_and_reported(tmp_path: Path) -> None:
    state = toy_state_dict()
    state["head.weight"] = torch.zeros(3, 4)
    folder = write_toy_folder(tmp_path / "toy-head", state)
    with pytest.raises(WeightsError, match=r"head\.weight"):
        load_expert(folder, spec=toy_spec())
    expert = load_expert(folder, spec=toy_spec(expected_unexpected_keys=["head.*"]))
    assert expert.key_report["dropped"] == ["head.weight"]
    assert expert.describe()["keys"]["dropped"] == ["head.weight"]


def test_unknown_family_and_wrong_embedding_dim(tmp_path: Path) -> None:
    folder = write_toy_folder(tmp_path / "toy-fam")
    with pytest.raises(ExpertLoadError) as info:
        load_expert(folder, spec=toy_spec(family="no_such_family"))
    assert "no_such_family" in one_line(info.value)
    with pytest.raises(WeightsError) as info:
        load_expert(folder, spec=toy_spec(embedding_dim=5))
    assert "embedding_dim 5" in one_line(info.value)


# ---------------------------------------------------------------------- the Expert module


@pytest.fixture
def toy_expert(tmp_path: Path) -> Expert:
    return load_expert(write_toy_folder(tmp_path / "toy-expert"), spec=toy_spec())


def test_expert_is_frozen_and_stays_in_eval_mode(toy_expert: Expert) -> None:
    assert all(not p.requires_grad for p in toy_expert.parameters())
    parent = nn.ModuleDict({"expert": toy_expert, "head": nn.Linear(4, 1)})
    parent.train()
    assert parent["head"].training and toy_expert.training and not toy_expert.model.training
    x = torch.randn(3, 2, 2, 200)
    first, second = toy_expert(x), toy_expert(x)
    torch.testing.assert_close(first, second)  # no dropout
    assert not first.requires_grad

    toy_expert.unfreeze()
    parent.train()
    assert toy_expert.model.training and all(p.requires_grad for p in toy_expert.model.parameters())
    out = toy_expert(x)
    assert out.requires_grad
    toy_expert.unfreeze(parameters=False)
    toy_expert.freeze()
    parent.train()
    assert not toy_expert.model.training and not any(p.requires_grad for p in toy_expert.parameters())


def test_forward_aggregates_windows_with_mask(toy_expert: Expert) -> None:
    x = torch.randn(2, 3, 2, 200)
    per_window = toy_expert.model(x.reshape(6, 2, 200)).reshape(2, 3, 4)
    torch.testing.assert_close(toy_expert(x), per_window.mean(dim=1))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = torch.stack([per_window[0, :2].mean(0), per_window[1, 0]])
    torch.testing.assert_close(toy_expert(x, mask), expected)
    max_expert = load_expert(
        toy_expert.weights_path.parent,
        spec=toy_spec(contract={**toy_spec().contract.to_dict(), "aggregation": "max"}),
    )
    torch.testing.assert_close(
        max_expert(x, mask), torch.stack([per_window[0, :2].amax(0), per_window[1, 0]])
    )
    with pytest.raises(ValueError, match="prepared windows"):
        toy_expert(torch.randn(2, 200))


def test_prepare_pads_segment_counts_and_embed_accepts_records(toy_expert: Expert) -> None:
    short = synthetic_record(("I", "II"), fs=500.0, seconds=2.0, seed=1)  # 200 samples at 100 Hz: 1 window
    long = synthetic_record(("I", "II"), fs=500.0, seconds=6.5, seed=2)  # 650 samples: 3 windows
    batch = toy_expert.prepare_batch([short, long])
    assert tuple(batch.windows.shape) == (2, 3, 2, 200)
    assert batch.window_mask.tolist() == [[True, False, False], [True, True, True]]
    assert batch.lead_mask.tolist() == [[True, True], [True, True]]
    ToyFamily.embed_calls.clear()
    out = toy_expert.embed([short, long])
    assert ToyFamily.embed_calls == [(6, 2, 200)]
    assert tuple(out.shape) == (2, 4) and not out.requires_grad
    torch.testing.assert_close(out[0], toy_expert.embed(short)[0])
    torch.testing.assert_close(toy_expert.prepare(long), batch.windows[1:])


def test_lead_order_is_read_from_the_record(tmp_path: Path) -> None:
    spec = toy_spec(
        config={"leads": 12, "dim": 4},
        contract={"fs": 100, "leads": list(STANDARD_12_LEADS), "length": 200},
    )
    torch.manual_seed(0)
    folder = write_toy_folder(
        tmp_path / "toy12", {k: v.clone() for k, v in ToyNet(12, 4).state_dict().items()}
    )
    expert = load_expert(folder, spec=spec)
    standard = synthetic_record(STANDARD_12_LEADS, fs=100.0, seconds=2.0, seed=3)
    order = [STANDARD_12_LEADS.index(name) for name in MIMIC_LEAD_ORDER]
    mimic = ECGRecord(signal=standard.signal[order], fs=100.0, leads=MIMIC_LEAD_ORDER, record_id="mimic")
    torch.testing.assert_close(expert.prepare(mimic), expert.prepare(standard))
    naive = ECGRecord(signal=standard.signal[order], fs=100.0, leads=STANDARD_12_LEADS, record_id="naive")
    assert not torch.equal(expert.prepare(naive), expert.prepare(standard))


def test_describe_and_parameters(toy_expert: Expert) -> None:
    info = toy_expert.describe()
    assert info["name"] == "toy" and info["family"] == "enecg_test_toy" and info["embedding_dim"] == 4
    assert info["num_parameters"] == toy_expert.num_parameters == 2 * 4 + 4
    assert info["contract"] == toy_expert.contract.to_dict()
    assert info["contract_digest"] == toy_expert.contract.digest()
    assert toy_expert.lora_target_modules == ["proj"]
    assert list(toy_expert.named_lora_targets()) == ["proj"]
    assert json.dumps(info)  # JSON-ready
    override = load_expert(toy_expert.weights_path.parent, spec=toy_spec(lora_target_modules=["drop"]))
    assert override.lora_target_modules == ["drop"]


# ---------------------------------------------------------------------- real families (parity fixtures)


def spy_on_embed(expert: Expert) -> list[tuple[int, ...]]:
    """Record the input shape of every ``family.embed`` call the expert makes (on this family instance)."""
    seen: list[tuple[int, ...]] = []
    original = expert.family.embed

    def recording_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return original(model, x)

    expert.family.embed = recording_embed  # type: ignore[method-assign]
    return seen


def hubert_tiny_spec() -> Spec:
    """The bundled HuBERT-ECG contract and key expectations, pointed at a fake repo holding the tiny fixture."""
    return bundled_spec("hubert-ecg-small").replace(
        name="hubert-ecg-tiny", hub_id="enecg-test/hubert-ecg-tiny", embedding_dim=32
    )


def test_hubert_ecg_by_hub_id_offline(hub_cache: Path) -> None:
    requires_family("hubert_ecg")
    tiny = fixture_dir("hubert_ecg", "tiny_a")
    make_hub_repo(
        hub_cache,
        "enecg-test/hubert-ecg-tiny",
        {"config.json": tiny / "config.json", "model.safetensors": tiny / "model.safetensors"},
    )
    expert = load_expert("enecg-test/hubert-ecg-tiny", spec=hubert_tiny_spec())
    assert (expert.revision, expert.hub_id, expert.embedding_dim) == (
        COMMIT,
        "enecg-test/hubert-ecg-tiny",
        32,
    )
    assert expert.key_report == {"dropped": [], "missing": []}

    # Contract: 12 leads x 500 samples at 100 Hz concatenated -> the family sees (B, 6000).
    record = synthetic_record(STANDARD_12_LEADS, fs=500.0, seconds=10.0)
    prepared = expert.prepare([record, record])
    assert tuple(prepared.shape) == (2, 1, 6000)
    seen = spy_on_embed(expert)
    out = expert.embed([record, record])
    assert seen == [(2, 6000)] and tuple(out.shape) == (2, 32)

    # Wiring check against the official pooled output of the fixture input (not tuned: atol from the README).
    x = torch.from_numpy(np.load(tiny / "input.npy")).float()
    expected = np.load(tiny / "expected_mean_pooled.npy")
    np.testing.assert_allclose(expert(x.reshape(x.shape[0], 1, -1)).numpy(), expected, rtol=0, atol=1e-4)


def test_hubert_ecg_folder_is_detected_without_spec(tmp_path: Path) -> None:
    requires_family("hubert_ecg")
    tiny = fixture_dir("hubert_ecg", "tiny_a")
    folder = tmp_path / "my-hubert"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, folder / name)
    resolved = resolve_expert(folder)
    assert resolved.spec_origin == "detected" and resolved.spec.family == "hubert_ecg"
    assert resolved.spec.contract == bundled_spec("hubert-ecg-small").contract
    expert = load_expert(folder)
    assert expert.embedding_dim == 32 and expert.revision is None and expert.name == "my-hubert"


def test_ecg_fm_runs_two_segments_per_10s_record(tmp_path: Path) -> None:
    requires_family("ecg_fm")
    tiny = fixture_dir("ecgfm", "tiny_a")
    spec = bundled_spec("ecg-fm-pretrained").replace(
        name="ecg-fm-tiny", weights_file="checkpoint.pt", embedding_dim=32
    )
    expert = load_expert(tiny, spec=spec)
    records = [synthetic_record(MIMIC_LEAD_ORDER, fs=500.0, seconds=10.0, seed=s) for s in (4, 5, 6)]
    original = expert.family.embed
    seen = spy_on_embed(expert)
    out = expert.embed(records)
    assert seen == [(3 * 2, 12, 2500)]  # two 5-s windows per record
    windows = expert.prepare(records)
    per_window = original(expert.model, windows.reshape(6, 12, 2500)).reshape(3, 2, 32)
    torch.testing.assert_close(out, per_window.mean(dim=1))

    # MIMIC order (aVF before aVL) is read from the record: same embedding as the standard order.
    order = [MIMIC_LEAD_ORDER.index(name) for name in STANDARD_12_LEADS]
    standard = ECGRecord(signal=records[0].signal[order], fs=500.0, leads=STANDARD_12_LEADS, record_id="std")
    torch.testing.assert_close(expert.embed(standard), out[:1])


def ecgfounder_tiny_spec() -> Spec:
    meta = json.loads((fixture_dir("ecgfounder", "tiny_a") / "fixture_meta.json").read_text())
    kwargs = meta.get("constructor_kwargs") or meta["config"]
    config = {k: v for k, v in kwargs.items() if k != "verbose"}
    return bundled_spec("ecgfounder-12lead").replace(
        name="ecgfounder-tiny",
        weights_file="checkpoint.pth",
        config=config,
        embedding_dim=config["filter_list"][-1],
    )


def test_ecgfounder_missing_key_and_malicious_pickle(tmp_path: Path) -> None:
    requires_family("net1d")
    tiny = fixture_dir("ecgfounder", "tiny_a")
    spec = ecgfounder_tiny_spec()
    expert = load_expert(tiny, spec=spec)
    assert expert.embedding_dim == spec.embedding_dim

    state = torch.load(tiny / "checkpoint.pth", map_location="cpu", weights_only=True)["state_dict"]
    removed = "dense.bias"
    del state[removed]
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save({"state_dict": state}, broken / "checkpoint.pth")
    with pytest.raises(WeightsError) as info:
        load_expert(broken, spec=spec)
    message = one_line(info.value)
    assert removed in message and str(broken / "checkpoint.pth") in message

    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"first_conv.conv.weight": _RunsACommand(marker)}}, evil / "checkpoint.pth")
    with pytest.raises(WeightsError) as info:
        load_expert(evil, spec=spec)
    assert str(evil / "checkpoint.pth") in one_line(info.value)
    assert not marker.exists()


def test_inhouse_light_expert_folder(tmp_path: Path) -> None:
    requires_family("light")
    inhouse = pytest.importorskip("enecg.experts.inhouse")
    light = pytest.importorskip("enecg.experts.families.light")
    config = light.LightCNNConfig("SimpleNet").to_dict()
    model = light.build_light_model(config)
    contract = InputContract(fs=100.0, leads=STANDARD_12_LEADS, length=1000)
    folder = inhouse.save_inhouse_expert(
        model,
        family="light",
        config=config,
        contract=contract,
        folder=tmp_path / "light-expert",
        name="light-test",
    )
    expert = load_expert(folder)
    assert expert.name == "light-test" and expert.spec.family == "light" and expert.contract == contract
    for key, value in model.state_dict().items():
        torch.testing.assert_close(expert.model.state_dict()[key], value)
    out = expert.embed(synthetic_record(STANDARD_12_LEADS, fs=500.0, seconds=10.0))
    assert tuple(out.shape) == (1, expert.embedding_dim)


def test_inhouse_expert_of_a_published_family(tmp_path: Path) -> None:
    """A HuBERT-ECG saved as an in-house expert (e.g. after fine-tuning) loads from its folder: the family does not
    take the in-house config.json for a published one."""
    requires_family("hubert_ecg")
    inhouse = pytest.importorskip("enecg.experts.inhouse")
    config = json.loads((fixture_dir("hubert_ecg", "tiny_a") / "config.json").read_text())
    torch.manual_seed(0)
    model = get_family("hubert_ecg").build(config)
    contract = InputContract(fs=100.0, leads=STANDARD_12_LEADS, length=500, layout="concat_leads")
    folder = inhouse.save_inhouse_expert(
        model, family="hubert_ecg", config=config, contract=contract, folder=tmp_path / "tuned", name="tuned"
    )
    expert = load_expert(folder)
    assert expert.spec.family == "hubert_ecg" and expert.contract == contract
    for key, value in model.state_dict().items():
        torch.testing.assert_close(expert.model.state_dict()[key], value)
    assert tuple(expert.embed(synthetic_record(STANDARD_12_LEADS, fs=100.0, seconds=5.0)).shape) == (
        1,
        expert.embedding_dim,
    )


def test_bad_record_in_a_batch_is_named(toy_expert: Expert) -> None:
    good = [synthetic_record(("I", "II"), fs=100.0, seconds=2.0, seed=s) for s in range(3)]
    signal = good[1].signal.copy()
    signal[0, 5] = np.nan
    bad = ECGRecord(
        signal=signal, fs=100.0, leads=("I", "II"), record_id="b", metadata={"path": "/data/b.hea"}
    )
    with pytest.raises(RecordError) as info:
        toy_expert.prepare([good[0], bad, good[2]])
    assert one_line(info.value).startswith("/data/b.hea: ")


def test_bundled_spec_name_and_hub_id_resolve_to_the_published_files(hub_cache: Path) -> None:
    """A spec name or a bare Hub ID picks the bundled spec (its repo, file and revision); offline without a cached
    copy that is one line naming the repo. A cached file that is not the published model fails strictly."""
    with pytest.raises(ExpertLoadError) as info:
        load_expert("hubert-ecg-small")
    assert one_line(info.value).startswith("Edoardo-BS/hubert-ecg-small: not in the local Hub cache")

    requires_family("net1d")
    tiny = fixture_dir("ecgfounder", "tiny_a")
    make_hub_repo(
        hub_cache, "PKUDigitalHealth/ECGFounder", {"12_lead_ECGFounder.pth": tiny / "checkpoint.pth"}
    )
    resolved = resolve_expert("PKUDigitalHealth/ECGFounder")
    assert resolved.spec.name == "ecgfounder-12lead" and resolved.spec_origin == "bundled"
    assert resolved.revision == COMMIT and resolved.weights_path.name == "12_lead_ECGFounder.pth"
    # The tiny checkpoint is not the published 30.8M-parameter Net1D: strict loading names the file and the keys.
    with pytest.raises(WeightsError) as info:
        load_expert("ecgfounder-12lead")
    message = one_line(info.value)
    assert "12_lead_ECGFounder.pth" in message and "shape mismatch" in message
    with pytest.raises(ExpertLoadError) as info:
        load_expert("ecgfounder-1lead")  # same repo and commit, but its file is not cached
    assert "'1_lead_ECGFounder.pth'" in one_line(info.value)


# ---------------------------------------------------------------------- Mantis by Hub ID (published layout)

# config.json exactly as the official mantis-tsfm 1.1.0 save_pretrained writes it for the published classes
# (Mantis8M: the legacy class behind paris-noah/Mantis-8M; MantisV2), checked in tests/test_parity_mantis.py.
MANTIS_8M_CONFIG = {
    "device": "cpu",
    "epsilon_scalar_enc": 1.1,
    "hidden_dim": 256,
    "hidden_dim_scalar_enc": 32,
    "num_patches": 32,
    "pre_training": False,
    "scalar_scales": None,
    "seq_len": 512,
    "transf_depth": 6,
    "transf_dim_head": 128,
    "transf_dropout": 0.1,
    "transf_mlp_dim": 512,
    "transf_num_heads": 8,
}
MANTIS_V2_CONFIG = {
    "device": "cpu",
    "epsilon_scalar_enc": 1.1,
    "hidden_dim": 256,
    "hidden_dim_scalar_enc": 32,
    "kernel_size": 41,
    "num_patches": 32,
    "output_token": "cls_token",
    "pre_training": False,
    "return_transf_layer": -1,
    "scalar_scales": None,
    "transf_depth": 6,
    "transf_dim_head": 32,
    "transf_dropout": 0.1,
    "transf_mlp_dim": 512,
    "transf_num_heads": 8,
}


def write_mantis_folder(folder: Path, config: dict[str, Any], *, legacy_keys: bool, seed: int = 0) -> Path:
    """A published-layout Mantis folder (config.json + model.safetensors) with random weights; ``legacy_keys``
    writes the transformer under ``vit_unit.*`` as the legacy Mantis8M class does."""
    from enecg.experts.family import get_family

    torch.manual_seed(seed)
    state = get_family("mantis").build(config).state_dict()
    if legacy_keys:
        state = {k.replace("transf_unit.", "vit_unit.", 1): v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.mark.parametrize(
    ("hub_id", "spec_name", "config", "legacy_keys", "version"),
    [
        ("paris-noah/Mantis-8M", "mantis-8m", MANTIS_8M_CONFIG, True, "v1"),
        ("paris-noah/MantisV2", "mantisv2", MANTIS_V2_CONFIG, False, "v2"),
    ],
)
def test_mantis_by_hub_id_offline(
    hub_cache: Path,
    tmp_path: Path,
    hub_id: str,
    spec_name: str,
    config: dict[str, Any],
    legacy_keys: bool,
    version: str,
) -> None:
    requires_family("mantis")
    source = write_mantis_folder(tmp_path / "src", config, legacy_keys=legacy_keys)
    snapshot = make_hub_repo(
        hub_cache,
        hub_id,
        {"config.json": source / "config.json", "model.safetensors": source / "model.safetensors"},
    )
    expert = load_expert(hub_id)
    assert (expert.name, expert.hub_id, expert.revision) == (spec_name, hub_id, COMMIT)
    assert expert.weights_path == snapshot / "model.safetensors"
    assert expert.key_report == {"dropped": [], "missing": []}
    assert expert.model.config.version == version and expert.embedding_dim == 12 * 256
    assert all(not p.requires_grad for p in expert.parameters()) and not expert.model.training
    # Every published tensor arrived (legacy vit_unit.* names included).
    written = read_weights(source / "model.safetensors")
    loaded = expert.model.state_dict()
    for key, value in written.items():
        torch.testing.assert_close(loaded[key.replace("vit_unit.", "transf_unit.", 1)], value, rtol=0, atol=0)

    # Contract: a 10-s 500-Hz record -> 100 Hz, ONE 512-sample window of 12 leads, embedded lead by lead.
    record = synthetic_record(STANDARD_12_LEADS, fs=500.0, seconds=10.0)
    seen = spy_on_embed(expert)
    out = expert.embed([record, record])
    assert seen == [(2, 12, 512)] and tuple(out.shape) == (2, 3072)
    window = expert.prepare([record])[:, 0]  # (1, 12, 512)
    with torch.no_grad():
        per_lead = [expert.model(window[:, [lead]]) for lead in range(12)]
    torch.testing.assert_close(out[:1], torch.cat(per_lead, dim=1), rtol=0, atol=1e-5)


def test_mantis_missing_key_is_one_line_naming_key_and_file(hub_cache: Path, tmp_path: Path) -> None:
    requires_family("mantis")
    source = write_mantis_folder(tmp_path / "src", MANTIS_V2_CONFIG, legacy_keys=False)
    state = read_weights(source / "model.safetensors")
    removed = "transf_unit.cls_token"
    del state[removed]
    save_file(state, str(source / "model.safetensors"))
    make_hub_repo(
        hub_cache,
        "paris-noah/MantisV2",
        {"config.json": source / "config.json", "model.safetensors": source / "model.safetensors"},
    )
    with pytest.raises(WeightsError) as info:
        load_expert("paris-noah/MantisV2")
    message = one_line(info.value)
    assert removed in message and "model.safetensors" in message


def test_mantis_folder_is_detected_without_spec(tmp_path: Path) -> None:
    """A local published-layout folder loads from its files alone; the architecture comes from the files (here V2),
    not from the bundled spec whose contract it borrows."""
    requires_family("mantis")
    folder = write_mantis_folder(tmp_path / "my-mantis", MANTIS_V2_CONFIG, legacy_keys=False)
    resolved = resolve_expert(folder)
    assert resolved.spec_origin == "detected" and resolved.spec.family == "mantis"
    assert resolved.spec.contract == bundled_spec("mantisv2").contract
    expert = load_expert(folder)
    assert expert.model.config.version == "v2" and expert.embedding_dim == 3072 and expert.name == "my-mantis"
