"""On-disk cache of frozen experts' embeddings: each expert runs once per record, not once per epoch.

Frozen experts (no LoRA on their own layers) map a record to the same embedding in every epoch, and running a
foundation model is by far the most expensive part of training heads and a gate. The cache stores each expert's
pooled embedding ``(D,)`` per record; training then runs the ensemble with ``from_embeddings=True``.

**Keys.** A cache *entry* is one expert as it embeds: ``(expert id, revision, contract digest, family, pooling,
embedding size, dtype)`` hashed into the entry's folder name. The revision is the Hub commit sha, or for a local
folder the SHA-256 of its weights file, so retrained weights never reuse stale features; the contract digest
(:meth:`enecg.contract.InputContract.digest`) covers every preprocessing choice. Inside an entry, records are
keyed by ``record_id#<hash of the signal, rate and leads>``, so a dataset rebuilt at another rate (same record
ids) does not hit embeddings of the other signal. Anything that changes the key is a miss: invalidation is
by construction, nothing is ever overwritten.

**Layout.** ``<cache>/<expert>-<key digest>/manifest.json`` (the key in clear) + per shard
``shard-<hash>.safetensors`` (tensor ``embeddings``, float32 ``(n, D)``) and ``shard-<hash>.records.json`` (its
record keys). Both are written to temporary files and renamed, the record list last: it commits the shard, so
concurrent runs (or a run killed mid-write) never leave a half-written shard visible, and no shared file is ever
rewritten (adding a shard costs the same at 800k records as at 500; no lock, so any shared filesystem works).

**Processes.** :func:`fill_feature_cache` runs on every process: the records are cut into consecutive chunks
of ``batch_size`` rows and chunk ``c`` belongs to process ``c % num_processes``, so each process embeds its own
share (the split depends only on row order, not on what is cached, so every process agrees on it without talking).
Each process writes its shards atomically beside the others' (see Layout). A killed run leaves every flushed
shard committed; the next run embeds only what is missing. Because a record's batch is the same chunk whatever the number of
processes, a cache filled by N processes holds the same bits as one filled by one process (same device and
threads). After a barrier, every process reads the whole table with :func:`build_feature_table`.

**Workers.** Within a process, ``num_workers`` ``DataLoader`` workers read the records and apply the experts'
contracts (:class:`ChunkInputs`, scipy filters and resampling) for the next chunks while the process runs the
forwards of the current one, so a fast device does not wait on preprocessing. The chunks, their order and each
expert's batch are the same as with 0 workers, and so is every stored bit.

**Precision.** Experts run in fp32 by default; ``dtype=torch.bfloat16`` runs them under bf16 autocast and stores
the result in a separate entry (the key's ``dtype``), never mixed with fp32 embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from enecg.data.rows import label_arrays, rows_to_records
from enecg.data.schema import TaskInfo
from enecg.ensemble.inference import device_of
from enecg.ensemble.inputs import EnsembleBatch, EnsembleInputBuilder
from enecg.record import ECGRecord, demographics_array
from enecg.utils.files import write_text_atomic
from enecg.utils.loaders import loader_options

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
SHARD_LIST_SUFFIX = ".records.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_weights_digests: dict[tuple[str, int, int], str] = {}


# ----------------------------------------------------------------------------------------------------- keys


def record_key(record: ECGRecord) -> str:
    """``record_id#<16 hex>``: the id plus a hash of the signal content, rate and lead names."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(record.signal, dtype=np.float32).tobytes())
    digest.update(f"|{float(record.fs)!r}|{','.join(record.leads)}".encode())
    return f"{record.record_id}#{digest.hexdigest()[:16]}"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _weights_digests:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _weights_digests[memo] = digest.hexdigest()
    return _weights_digests[memo]


@dataclass(frozen=True)
class CacheKey:
    """What determines an expert's embeddings (one cache entry per distinct key)."""

    expert: str = field(metadata={"help": "Hub ID or local source of the expert."})
    revision: str = field(
        metadata={"help": "Hub commit sha, or 'sha256:<weights file hash>' for local files."}
    )
    contract_digest: str = field(metadata={"help": "InputContract.digest() of the expert's input contract."})
    family: str = field(default="", metadata={"help": "Expert family (architecture code)."})
    pooling: str = field(default="", metadata={"help": "How the family pools to one vector."})
    embedding_dim: int = field(default=0, metadata={"help": "Size D of the embedding."})
    dtype: str = field(default="float32", metadata={"help": "Precision the expert ran in."})
    format: int = field(default=CACHE_FORMAT, metadata={"help": "Cache layout version."})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def expert_cache_key(expert: nn.Module, dtype: torch.dtype = torch.float32) -> CacheKey:
    """The cache key of a loaded :class:`~enecg.experts.expert.Expert` (its identity, revision and contract) run
    in ``dtype``."""
    contract = getattr(expert, "contract", None)
    if contract is None:
        raise ValueError(f"{type(expert).__name__} has no input contract: its embeddings cannot be cached")
    revision = getattr(expert, "revision", None)
    if not revision:
        weights = getattr(expert, "weights_path", None)
        if weights is None or not Path(weights).is_file():
            raise ValueError(
                f"expert {getattr(expert, 'name', '?')!r} has neither a revision nor a weights file to hash"
            )
        revision = f"sha256:{file_digest(weights)}"
    spec = getattr(expert, "spec", None)
    source = getattr(expert, "hub_id", None) or getattr(expert, "source", None) or getattr(expert, "name", "")
    return CacheKey(
        expert=str(source),
        revision=str(revision),
        contract_digest=contract.digest(),
        family=str(getattr(spec, "family", "")),
        pooling=str(getattr(spec, "pooling", "")),
        embedding_dim=int(getattr(expert, "embedding_dim", 0)),
        dtype=dtype_name(dtype),
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``'float32'`` (the name stored in cache keys)."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------- entries


class CacheEntry:
    """One expert's cached embeddings (see the module docstring for the layout)."""

    def __init__(self, directory: Path, key: CacheKey) -> None:
        self.directory = directory
        self.key = key
        self._index: dict[str, tuple[str, int]] | None = None
        self._shards: dict[str, Tensor] = {}

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    def read_manifest(self) -> dict[str, Any]:
        """The entry's key and every committed shard: those listed in ``manifest.json`` (caches written before
        shard lists existed) and those with a shard list beside them (``shard-<hash>.json``)."""
        path = self.manifest_path
        manifest: dict[str, Any] = {"key": asdict(self.key), "shards": []}
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: corrupt feature-cache manifest ({exc})") from None
            if manifest.get("key") != asdict(self.key):
                raise ValueError(f"{path}: manifest key {manifest.get('key')} does not match {asdict(self.key)}")
        listed = {shard["file"] for shard in manifest["shards"]}
        for side in sorted(self.directory.glob(f"shard-*{SHARD_LIST_SUFFIX}")):
            try:
                shard = json.loads(side.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{side}: corrupt shard list ({exc})") from None
            if shard["file"] not in listed:
                manifest["shards"].append(shard)
        return manifest

    def _load_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            index = {}
            for shard in self.read_manifest()["shards"]:
                for row, key in enumerate(shard["records"]):
                    index[key] = (shard["file"], row)
            self._index = index
        return self._index

    def __contains__(self, record: str) -> bool:
        return record in self._load_index()

    def __len__(self) -> int:
        return len(self._load_index())

    def get(self, records: Sequence[str]) -> Tensor:
        """Embeddings ``(len(records), D)`` of cached records (KeyError for a missing one)."""
        index = self._load_index()
        out = torch.empty(len(records), self.key.embedding_dim, dtype=torch.float32)
        for i, record in enumerate(records):
            file, row = index[record]
            out[i] = self._shard(file)[row]
        return out

    def _shard(self, file: str) -> Tensor:
        if file not in self._shards:
            path = self.directory / file
            try:
                tensor = load_file(str(path))["embeddings"]
            except FileNotFoundError:
                raise ValueError(f"{path}: shard listed in {MANIFEST_FILE} is missing") from None
            if tensor.ndim != 2 or tensor.shape[1] != self.key.embedding_dim:
                raise ValueError(
                    f"{path}: embeddings of shape {tuple(tensor.shape)}, expected (n, {self.key.embedding_dim})"
                )
            self._shards[file] = tensor
        return self._shards[file]

    def add(self, records: Sequence[str], embeddings: Tensor, origin: str | None = None) -> None:
        """Store new embeddings (one shard) and list it in the manifest, atomically; ``origin`` (e.g.
        ``"process 1 of 2"``) is recorded with the shard."""
        if len(records) == 0:
            return
        embeddings = embeddings.detach().to(torch.float32).cpu().contiguous()
        if embeddings.shape != (len(records), self.key.embedding_dim):
            raise ValueError(
                f"embeddings of shape {tuple(embeddings.shape)} for {len(records)} records, "
                f"expected ({len(records)}, {self.key.embedding_dim})"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        name = "shard-" + hashlib.sha256("\n".join(records).encode()).hexdigest()[:16] + ".safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeddings": embeddings}, tmp, metadata={"format": str(CACHE_FORMAT)})
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if not self.manifest_path.is_file():
            # The entry's key in clear; every writer writes the same text, so a race is harmless.
            manifest = {"key": asdict(self.key), "shards": []}
            write_text_atomic(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        # The shard's record list, written (atomically) after the shard itself, commits it: readers list the
        # shards that have one. No shared file is rewritten, so writers never wait for each other and the cost
        # of adding a shard does not grow with the cache.
        shard: dict[str, Any] = {"file": name, "records": list(records)}
        if origin is not None:
            shard["origin"] = origin
        write_text_atomic(self.directory / f"{name.removesuffix('.safetensors')}{SHARD_LIST_SUFFIX}", json.dumps(shard))
        self._index = None
        self._shards[name] = embeddings


class FeatureCache:
    """A folder of :class:`CacheEntry` s, one per expert key."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def entry(self, key: CacheKey, name: str = "expert") -> CacheEntry:
        safe = _SAFE.sub("_", name).strip("_")[:40] or "expert"
        return CacheEntry(self.root / f"{safe}-{key.digest()}", key)

    def entry_for(
        self, expert: nn.Module, name: str | None = None, dtype: torch.dtype = torch.float32
    ) -> CacheEntry:
        return self.entry(expert_cache_key(expert, dtype), name or str(getattr(expert, "name", "expert")))


# --------------------------------------------------------------------------------------------------- tables


@dataclass
class FeatureTable:
    """Everything a part needs to train from cached embeddings, in row order; also the collate function.

    Attributes:
        embeddings: expert name -> ``(N, D)`` float32.
        gate_input: ``(N, ...)`` signal-gate windows (recomputed with the gate's cheap contract), or None.
        demographics: ``(N, 2)`` (age, sex), NaN = unknown.
        labels: task -> ``(N,)`` / ``(N, K)``, NaN = missing.
        record_ids / patient_ids: per row.
        computed / reused: expert name -> records embedded now / read from the cache.
    """

    embeddings: dict[str, Tensor]
    gate_input: Tensor | None
    demographics: Tensor
    labels: dict[str, Tensor]
    record_ids: list[str]
    patient_ids: list[str]
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.record_ids)

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        batch: dict[str, Any] = {
            "index": rows,
            "expert_inputs": {k: v.index_select(0, rows) for k, v in self.embeddings.items()},
            "demographics": self.demographics.index_select(0, rows),
            "labels": {k: v.index_select(0, rows) for k, v in self.labels.items()},
        }
        if self.gate_input is not None:
            batch["gate_input"] = self.gate_input.index_select(0, rows)
        return batch


RECORD_COLUMNS = ("record_id", "patient_id", "signal", "fs", "leads", "age", "sex", "source", "split")


def embed_records(
    branch: nn.Module,
    builder: EnsembleInputBuilder,
    name: str,
    records: Sequence[ECGRecord],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(len(records), D)`` float32 embeddings of one expert branch (eval mode, no gradients); NaN rows for
    records its contract refuses (training and evaluation from the cache then route them to other experts)."""
    return embed_prepared(branch, name, builder(list(records)), device, dtype)


def embed_prepared(
    branch: nn.Module,
    name: str,
    prepared: EnsembleBatch,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`embed_records` on a batch already prepared with the expert's contract (e.g. in a DataLoader
    worker)."""
    prepared = prepared.to(device, non_blocking=device.type == "cuda")
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        embedded = (
            branch.embed(
                prepared.expert_inputs[name],
                prepared.demographics,
                prepared.window_masks[name],
                prepared.lead_masks[name],
                prepared.valid_samples[name],
            )
            .float()
            .cpu()
        )
    unreadable = ~prepared.available[:, 0].cpu()
    if bool(unreadable.any()):
        embedded[unreadable] = float("nan")
    return embedded


class ChunkInputs(torch.utils.data.Dataset):
    """This process's chunks of a part, each prepared (contract applied) for every expert that lacks some of its
    records: what :func:`fill_feature_cache` feeds its experts, so ``DataLoader`` workers can prepare the next
    chunks while the main process runs the forwards.

    Item ``i`` (chunk ``starts[i] // batch_size``) is ``{"keys": record keys, "missing": expert -> positions
    of the records its cache entry lacked when the chunk was prepared, "inputs": expert -> EnsembleBatch of
    those records}``. The batch is exactly what ``builder([records[j] for j in missing])`` gives in the main
    process, so the embeddings do not depend on where it was prepared. Picklable (memory-mapped Arrow rows,
    contracts, cache entries read from their folder), so any multiprocessing start method works.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        starts: Sequence[int],
        stop: int,
        batch_size: int,
        builders: dict[str, EnsembleInputBuilder],
        entries: dict[str, CacheEntry],
    ) -> None:
        self.rows, self.starts, self.stop, self.batch_size = rows, list(starts), stop, batch_size
        self.builders, self.entries = builders, entries

    def __len__(self) -> int:
        return len(self.starts)

    def records(self, index: int) -> list[ECGRecord]:
        start = self.starts[index]
        return rows_to_records(self.rows[start : min(start + self.batch_size, self.stop)])[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        records = self.records(index)
        keys = [record_key(r) for r in records]
        missing = {
            name: [j for j, key in enumerate(keys) if key not in entry]
            for name, entry in self.entries.items()
        }
        return {"keys": keys, "missing": missing, "inputs": self.prepare(records, missing)}

    def prepare(
        self, records: Sequence[ECGRecord], missing: dict[str, list[int]]
    ) -> dict[str, EnsembleBatch]:
        """Each expert's contract on its missing records (experts missing none are left out)."""
        return {
            name: self.builders[name]([records[j] for j in positions])
            for name, positions in missing.items()
            if positions
        }


def _as_is(item: Any) -> Any:
    """``collate_fn`` of a loader whose dataset items are whole batches already (module level: picklable)."""
    return item


@dataclass
class FillResult:
    """What :func:`fill_feature_cache` did on this process: records embedded now and found cached, per expert."""

    computed: dict[str, int]
    reused: dict[str, int]
    records: int


def computed_over_processes(
    filled: dict[str, FillResult], device: torch.device | str | None = None
) -> dict[str, dict[str, int]]:
    """``{part: {expert: records embedded now}}`` summed over every process (each fill counts only its own
    share); a single process returns its own counts. Every process must call it (a collective)."""
    from accelerate.utils import reduce

    flat = [(part, name) for part, result in filled.items() for name in result.computed]
    local = torch.tensor([float(filled[part].computed[name]) for part, name in flat], device=device)
    total = reduce(local, "sum").cpu().tolist() if flat else []
    out: dict[str, dict[str, int]] = {part: {} for part in filled}
    for (part, name), value in zip(flat, total):
        out[part][name] = round(value)
    return out


def fill_feature_cache(
    branches: dict[str, nn.Module],
    builders: dict[str, EnsembleInputBuilder],
    part: datasets.Dataset,
    cache: FeatureCache,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    batch_size: int = 64,
    shard_records: int = 1024,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    max_records: int | None = None,
    progress: Callable[[int], None] | None = None,
    num_workers: int = 0,
) -> FillResult:
    """Embed this process's share of ``part`` with every expert branch and store what the cache lacks.

    Args:
        branches: expert name -> module with ``embed(windows, demographics, window_mask, lead_mask,
            valid_samples)`` (an :class:`~enecg.ensemble.heads.ExpertBranch`), its ``expert`` giving the key.
        builders: expert name -> the input builder of that expert's contract alone (``refuse_unreadable=False``).
        process_index, num_processes: this process's place (``accelerator.process_index`` / ``num_processes``);
            chunk ``c`` of ``batch_size`` consecutive rows is embedded by process ``c % num_processes``.
        shard_records: new embeddings are flushed as one shard per expert every this many records (and at the
            end), so an interrupted run keeps what it flushed.
        dtype: float32, or bfloat16 (autocast; a separate cache entry).
        max_records: only the first rows of ``part``.
        progress: called with the number of records of each chunk this process finished.
        num_workers: ``DataLoader`` workers that read the records and apply the contracts (this process keeps
            only the forwards); the cache holds the same bits as with 0 (the chunks, their order and each
            expert's batch are the same).
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} outside [0, {num_processes})")
    device = device or torch.device("cpu")
    entries = {
        name: cache.entry_for(branch.expert, name, dtype) for name, branch in branches.items()
    }
    columns = [c for c in RECORD_COLUMNS if c in part.column_names]
    rows_view = part.select_columns(columns).with_format("numpy")
    n = len(part) if max_records is None else min(len(part), max_records)
    computed = {name: 0 for name in branches}
    reused = {name: 0 for name in branches}
    pending: dict[str, tuple[list[str], list[Tensor]]] = {name: ([], []) for name in branches}

    def flush(name: str) -> None:
        keys, parts = pending[name]
        if keys:
            entries[name].add(keys, torch.cat(parts), origin=f"process {process_index} of {num_processes}")
            pending[name] = ([], [])

    # Chunk c belongs to process c % num_processes (see the module docstring).
    starts = [start for c, start in enumerate(range(0, n, batch_size)) if c % num_processes == process_index]
    chunks = ChunkInputs(rows_view, starts, n, batch_size, builders, entries)
    loader = DataLoader(chunks, batch_size=None, collate_fn=_as_is, **loader_options(num_workers, device))
    mine = 0
    for index, chunk in enumerate(loader):
        keys: list[str] = chunk["keys"]
        inputs: dict[str, EnsembleBatch] = chunk["inputs"]
        # Decided again here, where the shards are written: a record cached since a worker prepared the chunk
        # (a repeated record key flushed meanwhile, another run filling the same cache) is not embedded twice.
        missing = {name: [i for i, key in enumerate(keys) if key not in entries[name]] for name in branches}
        stale = {
            name: positions
            for name, positions in missing.items()
            if positions and positions != chunk["missing"][name]
        }
        if stale:
            inputs = {**inputs, **chunks.prepare(chunks.records(index), stale)}
        for name, branch in branches.items():
            reused[name] += len(keys) - len(missing[name])
            if not missing[name]:
                continue
            embedded = embed_prepared(branch, name, inputs[name], device, dtype)
            pending[name][0].extend(keys[i] for i in missing[name])
            pending[name][1].append(embedded)
            computed[name] += len(missing[name])
            if len(pending[name][0]) >= shard_records:
                flush(name)
        mine += len(keys)
        if progress is not None:
            progress(len(keys))
    for name in branches:
        flush(name)
    return FillResult(computed=computed, reused=reused, records=mine)


def fill_for_ensemble(ensemble: nn.Module, part: datasets.Dataset, cache: FeatureCache, **kwargs: Any) -> FillResult:
    """:func:`fill_feature_cache` with every expert of ``ensemble`` (eval mode, restored afterwards)."""
    full = EnsembleInputBuilder.for_ensemble(ensemble)
    builders = {
        name: EnsembleInputBuilder({name: c}, refuse_unreadable=False) for name, c in full.contracts.items()
    }
    branches = {name: ensemble.branch(name) for name in ensemble.expert_names}
    was_training = ensemble.training
    ensemble.eval()
    try:
        return fill_feature_cache(branches, builders, part, cache, device=device_of(ensemble), **kwargs)
    finally:
        ensemble.train(was_training)


def build_feature_table(
    ensemble: nn.Module,
    part: datasets.Dataset,
    tasks: Sequence[TaskInfo],
    cache: FeatureCache | None,
    *,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> FeatureTable:
    """Embed every record of ``part`` with every expert of ``ensemble``, reading and filling ``cache``.

    One pass over the records: per batch, record keys, demographics, labels and the gate's input are taken, and
    each expert embeds only the records its cache entry lacks. New embeddings are stored as one shard per expert.
    Experts run in fp32 and eval mode under ``no_grad`` (the cache must not depend on the run's precision).
    With ``cache=None`` every record is embedded (nothing is written).
    """
    full = EnsembleInputBuilder.for_ensemble(ensemble)
    expert_builders = {
        name: EnsembleInputBuilder({name: c}, refuse_unreadable=False) for name, c in full.contracts.items()
    }
    gate_builder = EnsembleInputBuilder({}, full.gate_contract) if full.gate_contract is not None else None
    names = list(ensemble.expert_names)
    entries = (
        {name: cache.entry_for(ensemble.branch(name).expert, name) for name in names}
        if cache is not None
        else {}
    )
    columns = list(
        dict.fromkeys(c for c in (*RECORD_COLUMNS, *(t.name for t in tasks)) if c in part.column_names)
    )
    rows_view = part.select_columns(columns).with_format("numpy")

    n = len(part)
    keys: list[str] = []
    record_ids: list[str] = []
    patient_ids: list[str] = []
    demographics, gate_inputs = [], []
    label_parts: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    new_keys: dict[str, list[str]] = {name: [] for name in names}
    new_embeddings: dict[str, list[Tensor]] = {name: [] for name in names}
    fresh: dict[str, dict[str, Tensor]] = {name: {} for name in names}
    was_training = ensemble.training
    ensemble.eval()
    try:
        for start in range(0, n, batch_size):
            records, rows = rows_to_records(rows_view[start : start + batch_size])
            batch_keys = [record_key(r) for r in records]
            keys += batch_keys
            record_ids += [r.record_id for r in records]
            patient_ids += [r.patient_id for r in records]
            demographics.append(_demographics(records))
            for task, values in label_arrays(rows, tasks).items():
                label_parts[task].append(values)
            if gate_builder is not None:
                gate_inputs.append(gate_builder(records).gate_input)
            for name in names:
                entry = entries.get(name)
                missing = [i for i, k in enumerate(batch_keys) if entry is None or k not in entry]
                missing = [i for i in missing if batch_keys[i] not in fresh[name]]
                if not missing:
                    continue
                embedded = embed_records(
                    ensemble.branch(name),
                    expert_builders[name],
                    name,
                    [records[i] for i in missing],
                    device_of(ensemble),
                )
                for row, i in enumerate(missing):
                    fresh[name][batch_keys[i]] = embedded[row]
                new_keys[name] += [batch_keys[i] for i in missing]
                new_embeddings[name].append(embedded)
            if progress is not None:
                progress(len(records))
    finally:
        ensemble.train(was_training)

    embeddings, computed, reused = {}, {}, {}
    for name in names:
        computed[name] = len(new_keys[name])
        reused[name] = n - computed[name]
        entry = entries.get(name)
        if entry is not None and new_keys[name]:
            entry.add(new_keys[name], torch.cat(new_embeddings[name]))
        if entry is not None:
            embeddings[name] = entry.get(keys)
        else:
            embeddings[name] = torch.stack([fresh[name][k] for k in keys])
    if cache is not None:
        logger.info("feature cache %s: computed %s, reused %s", cache.root, computed, reused)
    return FeatureTable(
        embeddings=embeddings,
        gate_input=torch.cat(gate_inputs) if gate_inputs else None,
        demographics=torch.cat(demographics),
        labels={task: torch.from_numpy(np.concatenate(parts)) for task, parts in label_parts.items()},
        record_ids=record_ids,
        patient_ids=patient_ids,
        computed=computed,
        reused=reused,
    )


def _demographics(records: Sequence[ECGRecord]) -> Tensor:
    return torch.from_numpy(demographics_array(records))
