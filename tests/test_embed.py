"""``enecg embed``: every process embeds its own share into the feature cache; the merged cache equals a
single-process one bit for bit; an interrupted fill resumes without recomputing what it flushed; the exported
table loads with plain ``datasets.load_from_disk`` and matches ``Expert.embed``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from test_serialization import EXPERTS, write_expert

from enecg.data.build import load_dataset_dir
from enecg.data.rows import rows_to_records
from enecg.ensemble.feature_cache import FeatureCache, fill_feature_cache, record_key
from enecg.ensemble.heads import ExpertBranch
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.experts import load_expert
from enecg.training.embed import EmbedConfig, embed_dataset

REPO = Path(__file__).resolve().parents[1]
GLOO_CONFIG = REPO / "recipes" / "accelerate_configs" / "cpu_ddp_gloo.yaml"
RECORDS = 24  # of the validation part
BATCH = 4


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed-experts")
    return {name: write_expert(root / name, name, seed).resolve() for seed, name in enumerate(EXPERTS)}


def config(dataset: Path, experts: dict[str, Path], tmp: Path, **overrides) -> EmbedConfig:
    settings = {
        "out": str(tmp / "table"),
        "cache_dir": str(tmp / "cache"),
        "splits": ["validation"],
        "max_records": RECORDS,
        "batch_size": BATCH,
        "progress": False,
        **overrides,
    }
    return EmbedConfig(
        dataset=str(dataset), experts=[f"{name}={folder}" for name, folder in experts.items()], **settings
    )


def shard_lists(entry: Path) -> list[dict]:
    """The committed shards of a cache entry folder: their files, record keys and origins."""
    return [json.loads(p.read_text()) for p in sorted(entry.glob("shard-*.records.json"))]


def cached(cache_dir: Path, dtype: str = "float32") -> dict[str, dict[str, torch.Tensor]]:
    """expert name -> record key -> embedding, read straight from the committed shards."""
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for manifest_path in sorted(cache_dir.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        if manifest["key"]["dtype"] != dtype:
            continue
        name = manifest_path.parent.name.rsplit("-", 1)[0]
        vectors = out.setdefault(name, {})
        for shard in shard_lists(manifest_path.parent):
            tensor = load_file(str(manifest_path.parent / shard["file"]))["embeddings"]
            vectors.update(dict(zip(shard["records"], tensor)))
    return out


def assert_same_table(a: datasets.Dataset, b: datasets.Dataset) -> None:
    assert a.column_names == b.column_names and len(a) == len(b)
    for column in a.column_names:
        if isinstance(a[0][column], str):
            assert a[column] == b[column], column
        else:  # numbers and vectors; NaN (a missing label) equals NaN
            np.testing.assert_array_equal(np.asarray(a[column], float), np.asarray(b[column], float), column)


def test_export_loads_with_datasets_and_matches_expert_embed(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = config(ptbxl_training_dataset, expert_dirs, tmp_path)
    first = embed_dataset(cfg)
    assert first.computed == {"validation": {name: RECORDS for name in EXPERTS}}
    table = datasets.load_from_disk(str(tmp_path / "table"))
    assert len(table) == RECORDS
    assert {"record_id", "patient_id", "split", "superclass", *EXPERTS} <= set(table.column_names)
    parts, _ = load_dataset_dir(ptbxl_training_dataset)
    records, _ = rows_to_records(parts["validation"].with_format("numpy")[:RECORDS])
    assert table["record_id"] == [r.record_id for r in records]
    for name, folder in expert_dirs.items():
        expected = load_expert(str(folder)).embed(records)
        torch.testing.assert_close(torch.tensor(np.array(table[name]), dtype=torch.float32), expected, rtol=1e-5, atol=1e-6)
    # A second run finds everything cached and rewrites the same table in one step.
    second = embed_dataset(cfg)
    assert second.computed == {"validation": {name: 0 for name in EXPERTS}}
    again = datasets.load_from_disk(str(tmp_path / "table"))
    assert_same_table(again, table)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bf16_is_a_separate_cache_entry(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    one = {"e0": expert_dirs["e0"]}
    embed_dataset(config(ptbxl_training_dataset, one, tmp_path, out=None, max_records=8))
    fp32 = cached(tmp_path / "cache")
    result = embed_dataset(config(ptbxl_training_dataset, one, tmp_path, out=None, max_records=8, dtype="bfloat16"))
    assert result.computed == {"validation": {"e0": 8}}  # not served from the fp32 entry
    bf16 = cached(tmp_path / "cache", "bfloat16")
    still = cached(tmp_path / "cache")["e0"]  # the fp32 entry is untouched
    assert still.keys() == fp32["e0"].keys() and all(torch.equal(still[k], fp32["e0"][k]) for k in still)
    assert bf16["e0"].keys() == fp32["e0"].keys()
    a = torch.stack(list(fp32["e0"].values()))
    b = torch.stack([bf16["e0"][k] for k in fp32["e0"]])
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.05, atol=0.05)


class Interrupted(Exception):
    pass


def test_an_interrupted_fill_resumes_without_recomputing(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    parts, _ = load_dataset_dir(ptbxl_training_dataset)
    part = parts["validation"]
    experts = {name: load_expert(str(folder)) for name, folder in expert_dirs.items()}
    branches = {name: ExpertBranch(e, str(expert_dirs[name])) for name, e in experts.items()}
    builders = {n: EnsembleInputBuilder({n: e.contract}, refuse_unreadable=False) for n, e in experts.items()}
    cache = FeatureCache(tmp_path / "cache")
    done = []

    def stop_after_three_chunks(n: int) -> None:
        done.append(n)
        if len(done) == 3:
            raise Interrupted  # as if killed after the third chunk's shards were written

    with pytest.raises(Interrupted):
        fill_feature_cache(
            branches, builders, part, cache, batch_size=BATCH, shard_records=BATCH, max_records=RECORDS,
            progress=stop_after_three_chunks,
        )
    before = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*.safetensors")}
    assert len(before) == 3 * len(EXPERTS)
    resumed = fill_feature_cache(
        branches, builders, part, cache, batch_size=BATCH, shard_records=BATCH, max_records=RECORDS
    )
    assert resumed.computed == {name: RECORDS - 3 * BATCH for name in EXPERTS}
    assert resumed.reused == {name: 3 * BATCH for name in EXPERTS}
    after = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*.safetensors")}
    assert {k: after[k] for k in before} == before  # finished shards were not rewritten
    records, _ = rows_to_records(part.with_format("numpy")[:RECORDS])
    assert set(cached(tmp_path / "cache")["e0"]) == {record_key(r) for r in records}


# Fills the cache as `enecg embed` does and SIGKILLs itself (no cleanup, no flush, no atexit) after two chunks.
KILLED_DRIVER = """
import os, signal, sys
from enecg.training import embed
from enecg.training.embed import EmbedConfig, embed_dataset
fill = embed.fill_feature_cache
def fill_then_die(*args, **kwargs):
    done = []
    def progress(n):
        done.append(n)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return fill(*args, **{**kwargs, "progress": progress})
embed.fill_feature_cache = fill_then_die
dataset, cache, *experts = sys.argv[1:]
embed_dataset(EmbedConfig(dataset=dataset, experts=experts, cache_dir=cache, splits=["validation"],
                          max_records=%d, batch_size=%d, shard_records=%d))
"""


def test_a_killed_embed_resumes_where_it_stopped(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A real SIGKILL in the middle of `enecg embed`: the next run embeds only the records of unfinished chunks
    and ends with the same cache as an uninterrupted run."""
    experts = [f"{name}={folder}" for name, folder in expert_dirs.items()]
    driver = KILLED_DRIVER % (RECORDS, BATCH, BATCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", driver, str(ptbxl_training_dataset), "cache", *experts],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(cached(tmp_path / "cache")["e0"]) == 2 * BATCH  # the two finished chunks' shards survived
    resumed = embed_dataset(config(ptbxl_training_dataset, expert_dirs, tmp_path, out=None))
    assert resumed.computed == {"validation": {name: RECORDS - 2 * BATCH for name in EXPERTS}}
    embed_dataset(config(ptbxl_training_dataset, expert_dirs, tmp_path / "fresh", out=None))
    a, b = cached(tmp_path / "cache"), cached(tmp_path / "fresh" / "cache")
    for name in EXPERTS:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])


def _run(command: list[str], tmp: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_two_processes_fill_the_same_cache_as_one(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    args = [
        str(ptbxl_training_dataset),
        "--experts",
        *(f"{name}={folder}" for name, folder in expert_dirs.items()),
        "--splits",
        "validation",
        "--max-records",
        str(RECORDS),
        "--batch-size",
        str(BATCH),
        "--shard-records",
        str(BATCH),
        "--no-progress",
    ]
    one = _run([sys.executable, "-m", "enecg.embed", *args, "--cache-dir", "one", "--out", "one.table"], tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    two = _run(
        [str(accelerate), "launch", "--config_file", str(GLOO_CONFIG), "-m", "enecg.embed", *args,
         "--cache-dir", "two", "--out", "two.table"],
        tmp_path,
    )
    assert "processes: 1" in one and "processes: 2" in two
    a, b = cached(tmp_path / "one"), cached(tmp_path / "two")
    assert a.keys() == b.keys() == set(EXPERTS)
    for name in EXPERTS:
        assert len(a[name]) == RECORDS and a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)  # bit for bit
    # Both processes wrote shards into each expert's one entry.
    origins = {shard["origin"] for entry in (tmp_path / "two").glob("*-*") for shard in shard_lists(entry)}
    assert origins == {"process 0 of 2", "process 1 of 2"}
    t1, t2 = datasets.load_from_disk(str(tmp_path / "one.table")), datasets.load_from_disk(str(tmp_path / "two.table"))
    assert_same_table(t1, t2)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_machines_fill_the_same_cache_as_one(
    ptbxl_training_dataset: Path, expert_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Multi-node as users launch it: two independent ``accelerate launch --num_machines 2 --machine_rank R``
    launchers (one process each) that meet over TCP (static rendezvous at the main machine's address, here the
    loopback) and write one shared cache folder, as on a shared filesystem. Same bits as one process."""
    args = [str(ptbxl_training_dataset), "--experts", *(f"{n}={f}" for n, f in expert_dirs.items())]
    args += ["--splits", "validation", "--max-records", str(RECORDS), "--batch-size", str(BATCH)]
    args += ["--shard-records", str(BATCH), "--no-progress", "--cache-dir", "nodes", "--out", "nodes.table"]
    one = _run([sys.executable, "-m", "enecg.embed", *args[:-4], "--cache-dir", "one", "--out", "one.table"], tmp_path)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)}
    launchers = [
        subprocess.Popen(
            [accelerate, "launch", "--config_file", str(GLOO_CONFIG), "--num_machines", "2", "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             "-m", "enecg.embed", *args],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (out, err) in zip(launchers, outputs):
        assert launcher.returncode == 0, out[-2000:] + err[-4000:]
    assert "processes: 1" in one and "processes: 2" in outputs[0][0]  # machine 0 reports for the whole run
    a, b = cached(tmp_path / "one"), cached(tmp_path / "nodes")
    assert a.keys() == b.keys() == set(EXPERTS)
    for name in EXPERTS:
        assert a[name].keys() == b[name].keys() and len(a[name]) == RECORDS
        assert all(torch.equal(a[name][key], b[name][key]) for key in a[name]), name
    origins = {shard["origin"] for entry in (tmp_path / "nodes").glob("*-*") for shard in shard_lists(entry)}
    assert origins == {"process 0 of 2", "process 1 of 2"}
    assert_same_table(datasets.load_from_disk(str(tmp_path / "one.table")), datasets.load_from_disk(str(tmp_path / "nodes.table")))
