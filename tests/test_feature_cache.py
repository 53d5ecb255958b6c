"""Feature cache: frozen experts run once per record (not per epoch), cached embeddings equal recomputed ones,
any change of expert revision / weights / contract / record content is a miss, and LoRA on experts disables it."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from enecg.contract import InputContract
from enecg.data.rows import rows_to_records
from enecg.ensemble.config import EnsembleConfig, ExpertRef, GateSettings, HeadSettings, TaskConfig
from enecg.ensemble.feature_cache import (
    MANIFEST_FILE,
    CacheKey,
    FeatureCache,
    build_feature_table,
    expert_cache_key,
    record_key,
)
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.ensemble.model import Ensemble
from enecg.experts.expert import load_expert
from enecg.experts.inhouse import WEIGHTS_FILE, save_inhouse_expert
from enecg.training.data import RecordBatches
from enecg.training.light_experts import create_light_expert
from enecg.training.recipe import LightExpertSpec, parse_recipe_dict
from enecg.training.trainer import train

TASKS = ("superclass", "sex", "age")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny heads on 2 shared cores: OpenMP threading costs more than it gains (and tests run side by side).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset_dir(ptbxl_training_dataset: Path) -> Path:
    return ptbxl_training_dataset


@pytest.fixture(scope="module")
def expert_dirs(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small randomly initialised light experts (no learning is asserted here)."""
    from enecg.data.build import load_dataset_dir

    dataset, meta = load_dataset_dir(dataset_dir)
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for index, architecture in enumerate(("SimpleNet", "AttiaNet")):
        spec = LightExpertSpec(architecture=architecture, width_multiplier=0.25, embedding_dim=16)
        name = architecture.lower()
        out[name] = create_light_expert(
            spec, root / name, name=name, train_part=dataset["train"], tasks=meta.tasks, seed=index
        )
    return out


class CountingLoader:
    """Loads experts and counts the records each one embeds (forward hook on the expert module)."""

    def __init__(self) -> None:
        self.records: collections.Counter[str] = collections.Counter()

    def __call__(self, source: Any, **kwargs: Any) -> torch.nn.Module:
        expert = load_expert(source, **kwargs)
        key = Path(str(source)).name

        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self.records[key] += output.shape[0]

        expert.register_forward_hook(hook)
        return expert


def _recipe(dataset_dir: Path, expert_dirs: dict[str, Path], out: Path, cache: Path, **overrides: Any):
    data = {
        "data": {"path": str(dataset_dir), "cache_dir": str(cache)},
        "experts": [{"name": n, "source": str(p)} for n, p in expert_dirs.items()],
        "tasks": [{"name": t} for t in TASKS],
        "model": {"heads": {"hidden_sizes": [32]}, "gate": {"hidden_sizes": [16]}},
        "optim": {"epochs": 2, "batch_size": 64, "eval_batch_size": 128},
        "evaluation": {"bootstrap_resamples": 0},
        "output": {"dir": str(out), "checkpoint_every_steps": None, "save_model": False},
        "tracking": {"log_with": []},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return parse_recipe_dict(data)


def _ensemble(expert_dirs: dict[str, Path], experts: dict[str, torch.nn.Module] | None = None) -> Ensemble:
    experts = experts or {name: load_expert(path) for name, path in expert_dirs.items()}
    config = EnsembleConfig(
        experts=[
            ExpertRef(name=n, hub_id=str(expert_dirs[n]), embedding_dim=e.embedding_dim)
            for n, e in experts.items()
        ],
        tasks=[
            TaskConfig(name="superclass", type="multilabel", label_names=["NORM", "MI", "STTC", "CD", "HYP"]),
            TaskConfig(name="sex", type="binary", label_names=["female"]),
            TaskConfig(name="age", type="regression", target_mean=60.0, target_std=17.0),
        ],
        heads=HeadSettings(hidden_sizes=[16]),
        gate=GateSettings(hidden_sizes=[8]),
    )
    return Ensemble(config, experts)


def test_second_epoch_and_second_run_do_not_run_the_experts(
    dataset_dir: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    counter = CountingLoader()
    first = train(_recipe(dataset_dir, expert_dirs, tmp_path / "run1", cache), expert_loader=counter).run
    n_records = 353 + 81 + 66  # train + validation + test parts of the sample
    # Two epochs over 353 training records, validation each epoch, a final evaluation: yet every expert embedded
    # each record exactly once.
    assert dict(counter.records) == {name: n_records for name in expert_dirs}
    assert first.epochs_completed == 2 and first.feature_cache["enabled"]
    assert sum(first.feature_cache["computed"]["train"].values()) == 2 * 353

    counter.records.clear()
    second = train(_recipe(dataset_dir, expert_dirs, tmp_path / "run2", cache), expert_loader=counter).run
    assert sum(counter.records.values()) == 0  # everything came from the cache
    assert second.feature_cache["reused"]["validation"] == {name: 81 for name in expert_dirs}
    # Same cache, same seed: the same model.
    assert second.validation == first.validation

    # Layout: one entry per expert with a manifest keyed like the expert and a record list per shard (which
    # commits it), every shard committed, no temporary files left.
    entries = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(entries) == len(expert_dirs)
    for entry in entries:
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
        assert manifest["key"]["contract_digest"] and manifest["key"]["revision"].startswith("sha256:")
        lists = [json.loads(p.read_text()) for p in entry.glob("shard-*.records.json")]
        assert sum(len(s["records"]) for s in lists) == n_records
        assert {s["file"] for s in lists} == {p.name for p in entry.glob("shard-*.safetensors")}
        assert not list(entry.glob("*.tmp"))


def test_cached_embeddings_equal_recomputed_and_feed_the_same_predictions(
    dataset_dir: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from enecg.data.build import load_dataset_dir

    dataset, meta = load_dataset_dir(dataset_dir)
    part = dataset["validation"]
    ensemble = _ensemble(expert_dirs).eval()
    cache = FeatureCache(tmp_path / "cache")
    table = build_feature_table(ensemble, part, meta.tasks, cache, batch_size=32)
    assert table.computed == {name: len(part) for name in expert_dirs}

    again = build_feature_table(ensemble, part, meta.tasks, FeatureCache(tmp_path / "cache"), batch_size=50)
    assert again.computed == {name: 0 for name in expert_dirs}
    for name in expert_dirs:
        assert torch.equal(again.embeddings[name], table.embeddings[name])  # read back bit for bit

    records, _ = rows_to_records(part.with_format("numpy")[:])
    recomputed = ensemble.embed(EnsembleInputBuilder.for_ensemble(ensemble)(records).expert_inputs)
    for name in expert_dirs:
        # Different batch composition: equal up to float32 rounding of the convolutions.
        torch.testing.assert_close(table.embeddings[name], recomputed[name], rtol=1e-5, atol=1e-6)

    # A cached batch matches a batch prepared from the records, and predicts the same.
    indices = list(range(0, len(part), 3))
    cached = table(indices)
    live = RecordBatches(part, EnsembleInputBuilder.for_ensemble(ensemble), meta.tasks)(indices)
    assert torch.equal(cached["gate_input"], live["gate_input"])
    torch.testing.assert_close(cached["demographics"], live["demographics"], equal_nan=True)
    for task in TASKS:
        torch.testing.assert_close(cached["labels"][task], live["labels"][task], equal_nan=True)
    with torch.no_grad():
        from_cache = ensemble(
            cached["expert_inputs"], cached["gate_input"], cached["demographics"], from_embeddings=True
        )
        from_windows = ensemble(live["expert_inputs"], live["gate_input"], live["demographics"])
    for task in TASKS:
        torch.testing.assert_close(
            from_cache.predictions[task], from_windows.predictions[task], rtol=1e-5, atol=1e-5
        )


def test_key_changes_invalidate(dataset_dir: Path, expert_dirs: dict[str, Path], tmp_path: Path) -> None:
    from enecg.data.build import load_dataset_dir

    source = expert_dirs["simplenet"]
    expert = load_expert(source)
    key = expert_cache_key(expert)

    # Revision: a Hub commit replaces the weights hash, and two commits differ.
    expert.revision = "a" * 40
    assert expert_cache_key(expert).revision == "a" * 40
    other = load_expert(source)
    other.revision = "b" * 40
    assert expert_cache_key(expert).digest() != expert_cache_key(other).digest() != key.digest()

    # Retrained weights in the same local folder layout: the weights hash changes.
    spec = json.loads((source / "enecg_expert.json").read_text())
    module = load_expert(source).model
    state = {k: v.clone() for k, v in module.state_dict().items()}
    first = next(k for k in state if k.endswith("weight"))
    state[first] += 0.01
    module.load_state_dict(state)
    changed = save_inhouse_expert(
        module,
        family="light",
        config=spec["config"],
        contract=spec["contract"],
        folder=tmp_path / "retrained",
        name="simplenet",
    )
    assert expert_cache_key(load_expert(changed)).revision != key.revision
    # Same weights, another contract (scaling): a different contract digest and a cache miss.
    contract = InputContract.from_dict({**spec["contract"], "scaling": "none"})
    rescaled = save_inhouse_expert(
        load_expert(source).model,
        family="light",
        config=spec["config"],
        contract=contract,
        folder=tmp_path / "rescaled",
        name="simplenet",
    )
    rescaled_key = expert_cache_key(load_expert(rescaled))
    assert rescaled_key.revision == key.revision and rescaled_key.contract_digest != key.contract_digest
    assert load_file(str(rescaled / WEIGHTS_FILE)).keys() == load_file(str(source / WEIGHTS_FILE)).keys()

    dataset, meta = load_dataset_dir(dataset_dir)
    part = dataset["test"].select(range(12))
    cache = FeatureCache(tmp_path / "cache")
    base = _ensemble(expert_dirs)
    assert build_feature_table(base, part, meta.tasks, cache).computed == {"simplenet": 12, "attianet": 12}
    swapped = _ensemble(
        expert_dirs, {"simplenet": load_expert(rescaled), "attianet": load_expert(expert_dirs["attianet"])}
    )
    table = build_feature_table(swapped, part, meta.tasks, cache)
    assert table.computed == {"simplenet": 12, "attianet": 0}  # only the changed expert re-runs
    assert len([p for p in cache.root.iterdir() if p.name.startswith("simplenet-")]) == 2

    # Record content: same id, different signal -> a different record key.
    records, _ = rows_to_records(part.with_format("numpy")[:1])
    record = records[0]
    altered = type(record)(
        signal=record.signal + 1e-3,
        fs=record.fs,
        leads=record.leads,
        record_id=record.record_id,
        patient_id=record.patient_id,
        metadata=record.metadata,
    )
    assert record_key(record).split("#")[0] == record_key(altered).split("#")[0]
    assert record_key(record) != record_key(altered)


def test_corrupt_or_mismatched_entries_are_clear_errors(expert_dirs: dict[str, Path], tmp_path: Path) -> None:
    expert = load_expert(expert_dirs["attianet"])
    entry = FeatureCache(tmp_path).entry_for(expert, "attianet")
    entry.add(["r1#x", "r2#y"], torch.ones(2, expert.embedding_dim))
    assert torch.equal(FeatureCache(tmp_path).entry_for(expert, "attianet").get(["r2#y"]), torch.ones(1, 16))
    with pytest.raises(ValueError, match=r"embeddings of shape \(2, 3\)"):
        entry.add(["a", "b"], torch.ones(2, 3))
    shard = next(entry.directory.glob("shard-*.safetensors"))
    save_file({"embeddings": torch.ones(2, 5)}, str(shard))
    with pytest.raises(ValueError, match="expected \\(n, 16\\)"):
        FeatureCache(tmp_path).entry_for(expert, "attianet").get(["r1#x"])
    (entry.directory / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt feature-cache manifest"):
        FeatureCache(tmp_path).entry_for(expert, "attianet").get(["r1#x"])


def test_lora_on_experts_disables_the_cache(
    dataset_dir: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    counter = CountingLoader()
    recipe = _recipe(
        dataset_dir,
        expert_dirs,
        tmp_path / "run",
        tmp_path / "cache",
        model__lora={"on_experts": True, "r": 2},
        optim__max_steps=2,
        optim__batch_size=8,
        data__max_records=16,
    )
    result = train(recipe, expert_loader=counter).run
    assert result.feature_cache == {"enabled": False}
    assert not (tmp_path / "cache").exists()
    # The experts ran on every training batch (2 steps x 8 records), on validation at the epoch's end (16) and on
    # validation and test in the final evaluation (16 + 16).
    assert dict(counter.records) == {name: 2 * 8 + 16 + 16 + 16 for name in expert_dirs}

    with pytest.raises(ValueError, match="cannot be cached"):
        train(
            _recipe(
                dataset_dir,
                expert_dirs,
                tmp_path / "run_on",
                tmp_path / "cache",
                model__lora={"on_experts": True},
                data__feature_cache="on",
                data__max_records=16,
            )
        )


def test_shards_commit_by_their_record_list_and_older_manifests_still_read(tmp_path: Path) -> None:
    """A shard counts once its record list exists (a shard file alone, as a kill between the two writes leaves
    it, is ignored and rewritten later); entries written by older versions, with shards listed in
    manifest.json, still read."""
    key = CacheKey(expert="org/e", revision="a" * 40, contract_digest="d", embedding_dim=3)
    entry = FeatureCache(tmp_path).entry(key, "e")
    entry.add(["r1", "r2"], torch.arange(6.0).reshape(2, 3), origin="process 0 of 1")
    (entry.directory / "shard-orphan.safetensors").write_bytes(b"half a shard")  # no record list: not committed
    fresh = FeatureCache(tmp_path).entry(key, "e")
    assert len(fresh) == 2 and "r1" in fresh
    torch.testing.assert_close(fresh.get(["r2"]), torch.tensor([[3.0, 4.0, 5.0]]))
    # The older layout: the same shard listed in manifest.json, no record list beside it.
    (lists,) = entry.directory.glob("shard-*.records.json")
    shard = json.loads(lists.read_text())
    lists.unlink()
    manifest = json.loads((entry.directory / MANIFEST_FILE).read_text())
    manifest["shards"] = [shard]
    (entry.directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    old = FeatureCache(tmp_path).entry(key, "e")
    assert len(old) == 2
    torch.testing.assert_close(old.get(["r1", "r2"]), torch.arange(6.0).reshape(2, 3))
