"""Data loading around the accelerator: the measured data-wait share of a training step, loader settings
(workers, pinned memory, persistent workers, prefetch) and the feature-cache fill with its contracts applied in
DataLoader workers (``enecg embed --num-workers``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from accelerate import Accelerator
from test_embed import BATCH, EXPERTS, RECORDS, cached, shard_lists
from test_embed import config as embed_config
from test_feature_cache import _recipe
from test_serialization import write_expert

from enecg.cli.embed import add_arguments, config_from
from enecg.data.build import load_dataset_dir
from enecg.ensemble.feature_cache import FeatureCache, FeatureTable, fill_feature_cache
from enecg.ensemble.heads import ExpertBranch
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.experts import load_expert
from enecg.training.embed import embed_dataset
from enecg.training.loop import PhaseLoop, TrainerCallback
from enecg.training.trainer import train
from enecg.utils.loaders import loader_options

TRAIN_RECORDS = 353  # the training part of the PTB-XL sample
SLEEP = 0.05  # seconds a slow collate sleeps per batch


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loading-experts")
    return {name: write_expert(root / name, name, seed).resolve() for seed, name in enumerate(EXPERTS)}


class WaitLog(TrainerCallback):
    """What the loop reports right after each training micro-batch is fetched."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def on_micro_batch_begin(self, loop: PhaseLoop) -> None:
        self.waits.append(loop.last_data_wait)


def _train(recipe: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[float], list[dict[str, Any]]]:
    """Train, returning the result, the waits seen by a callback and every dict sent to the trackers."""
    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append(dict(values)))
    callback = WaitLog()
    result = train(recipe, callbacks=[callback])
    return result, callback.waits, logged


def test_a_slow_loader_shows_as_a_large_data_wait_share_a_fast_one_as_small(
    ptbxl_training_dataset: Path,
    expert_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    single_torch_thread: None,
) -> None:
    cache = tmp_path / "cache"
    settings = {"optim__epochs": 1, "optim__batch_size": 32, "tracking__log_every_steps": 1}
    steps = -(-TRAIN_RECORDS // 32)

    fast, fast_waits, fast_logs = _train(
        _recipe(ptbxl_training_dataset, expert_dirs, tmp_path / "fast", cache, **settings), monkeypatch
    )
    share = fast.run.data_wait["data_wait_share"]
    assert fast.run.feature_cache["enabled"]
    assert fast.run.data_wait["micro_batches"] == len(fast_waits) == steps
    assert 0 <= share < 0.5  # batches are tensor slices of the cached table
    shares = [entry["time/data_wait_share"] for entry in fast_logs if "time/data_wait_share" in entry]
    assert len(shares) == steps and all(0 <= s <= 1 for s in shares)
    assert all(
        entry["time/data_wait_s"] <= entry["time/step_s"] for entry in fast_logs if "time/step_s" in entry
    )
    # The run's totals are in the result files: per phase in metrics.json, over runs in summary.json.
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert metrics["strategy"]["phases"]["joint"]["data_wait"]["micro_batches"] == steps
    summary = json.loads((tmp_path / "fast" / "summary.json").read_text())
    assert summary["data_wait"] == pytest.approx(fast.run.data_wait)

    # The same training with a collate that sleeps per batch (same cache: no expert runs).
    original = FeatureTable.__call__

    def sleepy(self: FeatureTable, indices: Any) -> dict[str, Any]:
        time.sleep(SLEEP)
        return original(self, indices)

    monkeypatch.setattr(FeatureTable, "__call__", sleepy)
    slow, slow_waits, slow_logs = _train(
        _recipe(ptbxl_training_dataset, expert_dirs, tmp_path / "slow", cache, **settings), monkeypatch
    )
    assert slow.run.data_wait["micro_batches"] == len(slow_waits) == steps
    # Accelerate's loader fetches one batch ahead (its first step waits for two, its last for none): the sum is
    # what counts.
    assert sum(slow_waits) == pytest.approx(slow.run.data_wait["data_wait_seconds"])
    assert slow.run.data_wait["data_wait_share"] > 0.5
    assert slow.run.data_wait["data_wait_share"] > share
    assert slow.run.data_wait["data_wait_seconds"] >= steps * SLEEP
    logged = [entry["time/data_wait_share"] for entry in slow_logs if "time/data_wait_share" in entry]
    assert len(logged) == steps and sum(logged) / steps > 0.5


def test_workers_and_their_settings_train_the_same_model(
    ptbxl_training_dataset: Path,
    expert_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    single_torch_thread: None,
) -> None:
    """Uncached training with 2 persistent workers (prefetch 1) reads the same batches in the same order as the
    main process alone: the same model, and every step is measured."""
    settings = {
        "data__feature_cache": "off",
        "data__max_records": 48,
        "optim__epochs": 2,
        "optim__batch_size": 16,
        "optim__eval_batch_size": 32,
    }
    runs = {}
    for workers in (0, 2):
        recipe = _recipe(
            ptbxl_training_dataset,
            expert_dirs,
            tmp_path / f"w{workers}",
            tmp_path / "cache",
            **settings,
            data__num_workers=workers,
            data__persistent_workers=workers > 0,
            data__prefetch_factor=1 if workers else None,
        )
        runs[workers], waits, _ = _train(recipe, monkeypatch)
        assert not runs[workers].run.feature_cache["enabled"]
        assert runs[workers].run.data_wait["micro_batches"] == len(waits) == 2 * 3
    assert runs[2].run.validation == runs[0].run.validation
    assert runs[2].run.test == runs[0].run.test


def test_loader_options() -> None:
    assert loader_options(0, "cpu") == {"num_workers": 0, "pin_memory": False}
    # Settings torch refuses without workers are left out, so a recipe with them still runs on 0 workers.
    assert loader_options(0, None, persistent_workers=True, prefetch_factor=4) == {
        "num_workers": 0,
        "pin_memory": False,
    }
    assert loader_options(2, torch.device("cuda", 0), persistent_workers=True, prefetch_factor=4) == {
        "num_workers": 2,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    with pytest.raises(ValueError, match="prefetch_factor"):
        loader_options(2, "cpu", prefetch_factor=0)


def test_embed_in_workers_stores_the_same_bits_as_in_the_main_process(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for workers in (0, 2):
        result = embed_dataset(
            embed_config(
                ptbxl_training_dataset, expert_dirs, tmp_path / f"w{workers}", out=None, num_workers=workers
            )
        )
        assert result.computed == {"validation": {name: RECORDS for name in EXPERTS}}
    a, b = cached(tmp_path / "w0" / "cache"), cached(tmp_path / "w2" / "cache")
    assert set(a) == set(b) == set(EXPERTS)
    for name in EXPERTS:
        assert a[name].keys() == b[name].keys() and len(a[name]) == RECORDS
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])
    # The same shards too: same record lists, hence the same file names.
    for entry in (tmp_path / "w0" / "cache").iterdir():
        assert shard_lists(entry) == shard_lists(tmp_path / "w2" / "cache" / entry.name)

    # Resuming with workers embeds only what is missing and ends with the same cache.
    embed_dataset(
        embed_config(
            ptbxl_training_dataset, expert_dirs, tmp_path / "resume", out=None, max_records=3 * BATCH
        )
    )
    resumed = embed_dataset(
        embed_config(ptbxl_training_dataset, expert_dirs, tmp_path / "resume", out=None, num_workers=2)
    )
    assert resumed.computed == {"validation": {name: RECORDS - 3 * BATCH for name in EXPERTS}}
    c = cached(tmp_path / "resume" / "cache")
    for name in EXPERTS:
        assert c[name].keys() == a[name].keys()
        assert all(torch.equal(a[name][k], c[name][k]) for k in a[name])


def test_records_cached_after_a_worker_prepared_them_are_not_embedded_again(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A part listing every record twice, flushed chunk by chunk: workers prepare the repeats before the first
    copies are cached, and the main process still embeds each record once, as with 0 workers."""
    parts, _ = load_dataset_dir(ptbxl_training_dataset)
    once = parts["validation"].select(range(2 * BATCH))
    twice = datasets.concatenate_datasets([once, once])
    experts = {name: load_expert(str(folder)) for name, folder in expert_dirs.items()}
    branches = {name: ExpertBranch(e, str(expert_dirs[name])) for name, e in experts.items()}
    builders = {n: EnsembleInputBuilder({n: e.contract}, refuse_unreadable=False) for n, e in experts.items()}
    results = {}
    for workers in (0, 2):
        cache = FeatureCache(tmp_path / f"w{workers}")
        results[workers] = fill_feature_cache(
            branches, builders, twice, cache, batch_size=BATCH, shard_records=BATCH, num_workers=workers
        )
    assert results[2] == results[0]
    assert results[0].computed == {name: 2 * BATCH for name in EXPERTS}
    assert results[0].reused == {name: 2 * BATCH for name in EXPERTS}
    a, b = cached(tmp_path / "w0"), cached(tmp_path / "w2")
    assert all(torch.equal(a[n][k], b[n][k]) for n in EXPERTS for k in a[n])


def test_embed_cli_takes_num_workers(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--experts", "a", "--num-workers", "3"])
    assert config_from(args).num_workers == 3
    assert config_from(parser.parse_args([str(tmp_path), "--experts", "a"])).num_workers == 0
    with pytest.raises(ValueError, match="num_workers"):
        config_from(parser.parse_args([str(tmp_path), "--experts", "a", "--num-workers", "-1"]))
