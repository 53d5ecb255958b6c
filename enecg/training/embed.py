"""Embed a prepared dataset with frozen experts, on every process, and export the embeddings as a table.

``enecg embed DATASET --experts A B ... --out DIR`` (or ``accelerate launch -m enecg.embed ...`` on several
processes, GPUs or machines) fills the feature cache the trainer reads (:mod:`enecg.ensemble.feature_cache`):
every process embeds its own chunks of records, writes its shards atomically and merges them into the manifest, and
an interrupted run resumes where it stopped. The main process then writes a ``datasets`` table to ``DIR``
(``datasets.load_from_disk``): ``record_id``, ``patient_id``, ``split``, the dataset's label columns and one
``float32`` column per expert (NaN rows for records an expert's contract refuses), for users who want linear
probes or their own heads. With ``--num-workers N`` each process's DataLoader workers read the records and apply
the contracts while the process runs the forwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from enecg.data.build import load_dataset_dir
from enecg.data.rows import rows_to_records
from enecg.ensemble.factory import expert_name
from enecg.ensemble.feature_cache import (
    RECORD_COLUMNS,
    FeatureCache,
    FillResult,
    computed_over_processes,
    fill_feature_cache,
    record_key,
)
from enecg.ensemble.heads import ExpertBranch
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.experts.expert import load_expert

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    """``$ENECG_CACHE/features``, else ``~/.cache/enecg/features`` (shared by every dataset and run)."""
    return Path(os.environ.get("ENECG_CACHE", Path.home() / ".cache" / "enecg")) / "features"


@dataclass
class EmbedConfig:
    """What ``enecg embed`` does."""

    dataset: str = field(metadata={"help": "Prepared dataset folder (enecg data prepare ...)."})
    experts: list[str] = field(
        metadata={"help": "Experts: bundled spec names, Hub IDs or local folders (NAME=SOURCE to name one)."}
    )
    out: str | None = field(
        default=None,
        metadata={"help": "Folder for the exported table (datasets.load_from_disk); none: only fill the cache."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Feature cache folder; default $ENECG_CACHE/features or ~/.cache/enecg/features."}
    )
    splits: list[str] | None = field(default=None, metadata={"help": "Dataset parts to embed; default all."})
    max_records: int | None = field(default=None, metadata={"help": "Only the first N records of each part."})
    batch_size: int = field(default=64, metadata={"help": "Records per forward pass (and per chunk of work)."})
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "Precision the experts run in (bf16: a separate cache entry)."}
    )
    shard_records: int = field(
        default=1024, metadata={"help": "Records per cache shard (an interrupted run keeps every flushed shard)."}
    )
    num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader workers per process reading records and applying the contracts while the process "
            "runs the forwards (the cache holds the same bits as with 0)."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision for experts given by name."})
    hub_cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder."})
    local_files_only: bool = field(default=False, metadata={"help": "Never reach the Hub (offline cache only)."})
    progress: bool = field(default=True, metadata={"help": "Progress bar (records/s, ETA) on the main process."})

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("enecg embed needs at least one expert")
        if self.batch_size < 1 or self.shard_records < 1:
            raise ValueError("batch_size and shard_records must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {self.max_records}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass
class EmbedResult:
    """Per part: records embedded now and found cached, per expert (summed over processes); the export folder."""

    computed: dict[str, dict[str, int]]
    reused: dict[str, dict[str, int]]
    seconds: float
    out: Path | None = None
    cache_dir: Path | None = None
    num_processes: int = 1
    main_process: bool = True


def embed_dataset(config: EmbedConfig, state: Any | None = None) -> EmbedResult:
    """Fill the feature cache with every expert of ``config`` on this process's share of the records; the main
    process then exports the table. ``state``: an ``accelerate.PartialState`` (created when None)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState (unlike Accelerator) does not read the launcher's CPU flag itself: without it, processes
    # launched for CPU would each start as a lone rank 0.
    state = state or PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    started = time.perf_counter()
    parts, _ = load_dataset_dir(config.dataset)
    wanted = config.splits or list(parts)
    unknown = [s for s in wanted if s not in parts]
    if unknown:
        raise ValueError(f"{config.dataset}: no part(s) {unknown}; it has {list(parts)}")
    cache = FeatureCache(config.cache_dir or default_cache_dir())
    dtype = DTYPES[config.dtype]
    branches, builders = _load(config, state.device)
    filled: dict[str, FillResult] = {}
    for split in wanted:
        part = parts[split]
        bar = _progress_bar(config, state, split, _part_size(part, config))
        filled[split] = fill_feature_cache(
            branches,
            builders,
            part,
            cache,
            process_index=state.process_index,
            num_processes=state.num_processes,
            batch_size=config.batch_size,
            shard_records=config.shard_records,
            dtype=dtype,
            device=state.device,
            max_records=config.max_records,
            progress=bar.update if bar is not None else None,
            num_workers=config.num_workers,
        )
        if bar is not None:
            bar.close()
    computed = computed_over_processes(filled, state.device)
    state.wait_for_everyone()
    reused = {
        split: {name: _part_size(parts[split], config) - count for name, count in per.items()}
        for split, per in computed.items()
    }
    if config.out is not None and state.is_main_process:
        export_table(config, parts, cache, branches, wanted)
    state.wait_for_everyone()
    seconds = time.perf_counter() - started
    if state.is_main_process:
        logger.info("embedded %s in %.1f s (computed %s, reused %s)", wanted, seconds, computed, reused)
    return EmbedResult(
        computed,
        reused,
        seconds,
        Path(config.out) if config.out else None,
        cache.root,
        state.num_processes,
        state.is_main_process,
    )


def export_table(
    config: EmbedConfig,
    parts: datasets.DatasetDict,
    cache: FeatureCache,
    branches: dict[str, ExpertBranch],
    splits: list[str],
) -> Path:
    """Write the embeddings of ``splits`` (all cached) as one ``datasets`` table to ``config.out``, replacing an
    older export in one step (the table is built in a sibling folder and renamed)."""
    dtype = DTYPES[config.dtype]
    entries = {name: cache.entry_for(branch.expert, name, dtype) for name, branch in branches.items()}
    first = parts[splits[0]]
    label_columns = [c for c in first.column_names if c not in RECORD_COLUMNS]
    features = datasets.Features(
        {
            "record_id": datasets.Value("string"),
            "patient_id": datasets.Value("string"),
            "split": datasets.Value("string"),
            **{c: first.features[c] for c in label_columns},
            **{
                name: datasets.Sequence(datasets.Value("float32"), length=int(branch.expert.embedding_dim))
                for name, branch in branches.items()
            },
        }
    )

    def rows() -> Iterator[dict[str, Any]]:
        for split in splits:
            part = parts[split]
            n = _part_size(part, config)
            view = part.select_columns([c for c in (*RECORD_COLUMNS, *label_columns) if c in part.column_names])
            view = view.with_format("numpy")
            for start in range(0, n, config.batch_size):
                records, table_rows = rows_to_records(view[start : min(start + config.batch_size, n)])
                keys = [record_key(r) for r in records]
                vectors = {name: entry.get(keys).numpy() for name, entry in entries.items()}
                for i, (record, row) in enumerate(zip(records, table_rows)):
                    yield {
                        "record_id": record.record_id,
                        "patient_id": record.patient_id,
                        "split": split,
                        **{c: _plain(row[c]) for c in label_columns},
                        **{name: vectors[name][i] for name in entries},
                    }

    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.embedding-"))
    try:
        table = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(staging / "build"))
        table.save_to_disk(str(staging / "table"))
        del table
        _replace_folder(staging / "table", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _load(config: EmbedConfig, device: torch.device) -> tuple[dict[str, ExpertBranch], dict[str, EnsembleInputBuilder]]:
    branches: dict[str, ExpertBranch] = {}
    builders: dict[str, EnsembleInputBuilder] = {}
    for item in config.experts:
        name, sep, source = item.partition("=")
        if not sep:
            name, source = expert_name(item), item
        if name in branches:
            raise ValueError(f"two experts named {name!r}: name them with NAME=SOURCE")
        expert = load_expert(
            source,
            revision=config.revision,
            cache_dir=config.hub_cache_dir,
            local_files_only=config.local_files_only or None,
        ).to(device)
        expert.eval()
        branches[name] = ExpertBranch(expert, str(getattr(expert, "hub_id", None) or source))
        builders[name] = EnsembleInputBuilder({name: expert.contract}, refuse_unreadable=False)
    return branches, builders


def _progress_bar(config: EmbedConfig, state: Any, split: str, n: int) -> Any:
    if not (config.progress and state.is_main_process):
        return None
    chunks = -(-n // config.batch_size)
    mine = sum(
        min(config.batch_size, n - c * config.batch_size)
        for c in range(chunks)
        if c % state.num_processes == state.process_index
    )
    suffix = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
    return tqdm(total=mine, desc=f"embed {split}{suffix}", unit="rec", dynamic_ncols=True)


def _part_size(part: datasets.Dataset, config: EmbedConfig) -> int:
    return len(part) if config.max_records is None else min(len(part), config.max_records)


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value.item() if isinstance(value, np.generic) else value


def _replace_folder(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` in one rename; an existing export is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    if not (target / "dataset_info.json").is_file() and not (target / "state.json").is_file():
        raise ValueError(f"{target}: exists and is not an enecg embedding export; not replacing it")
    aside = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
