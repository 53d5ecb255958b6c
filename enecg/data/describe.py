"""Summaries of a prepared dataset folder (``enecg data describe``): counts per part, per label, leads, rates."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from enecg.data.build import load_dataset_dir


def _label_counts(values: np.ndarray, task_type: str, names: list[str]) -> dict[str, Any]:
    if task_type == "multilabel":
        values = values.reshape(len(values), len(names)) if len(values) else np.zeros((0, len(names)))
        labelled = ~np.isnan(values).all(axis=1)
        return {
            "labelled": int(labelled.sum()),
            "missing": int((~labelled).sum()),
            "positives": {name: int(np.nansum(values[:, i])) for i, name in enumerate(names)},
        }
    known = values[~np.isnan(values)]
    out: dict[str, Any] = {"labelled": int(known.size), "missing": int(values.size - known.size)}
    if task_type == "binary":
        out["positives"] = {names[-1] if names else "1": int((known == 1).sum())}
        out["negatives"] = int((known == 0).sum())
    elif task_type == "multiclass":
        out["classes"] = {name: int((known == i).sum()) for i, name in enumerate(names)}
    elif known.size:
        out.update(
            mean=float(known.mean()), std=float(known.std()), min=float(known.min()), max=float(known.max())
        )
    return out


def describe_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """Record count, per-part counts, per-task label counts, lead sets, sampling rates, durations, skipped."""
    dataset_dict, meta = load_dataset_dir(path)
    leads: Counter[str] = Counter()
    rates: Counter[float] = Counter()
    durations: list[float] = []
    columns: dict[str, list[np.ndarray]] = {task.name: [] for task in meta.tasks}
    for part in dataset_dict.values():
        # Only small columns are materialised; sample counts come from Arrow list lengths, not from the signals.
        for lead_names in part["leads"]:
            leads[" ".join(lead_names)] += 1
        fs = np.asarray(part["fs"], dtype=np.float64)
        rates.update(fs.tolist())
        if len(part):
            signal = part.data.column("signal")
            n_samples = pc.list_value_length(pc.list_element(signal, 0)).to_numpy(zero_copy_only=False)
            durations.extend((n_samples / fs).tolist())
        for task in meta.tasks:
            values = part.select_columns([task.name]).with_format("numpy")[task.name]
            columns[task.name].append(np.asarray(values, dtype=np.float32))
    labels = {}
    for task in meta.tasks:
        stacked = [v for v in columns[task.name] if len(v)]
        values = np.concatenate(stacked) if stacked else np.zeros(0, dtype=np.float32)
        labels[task.name] = {"type": task.type, **_label_counts(values, task.type, task.names)}
        if task.unit:
            labels[task.name]["unit"] = task.unit
    return {
        "path": str(Path(path).absolute()),
        "source": meta.source,
        "records": sum(meta.splits.values()),
        "splits": dict(meta.splits),
        "skipped": len(meta.skipped),
        "dropped": len(meta.dropped),
        "labels": labels,
        "lead_sets": dict(leads.most_common()),
        "sampling_rates": {f"{rate:g}": n for rate, n in sorted(rates.items())},
        "duration_s": (
            {"min": min(durations), "max": max(durations), "mean": float(np.mean(durations))}
            if durations
            else {}
        ),
    }


def format_description(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`describe_dataset`'s result."""
    lines = [
        f"{info['path']} ({info['source']}): {info['records']} records"
        f" ({info['skipped']} skipped, {info['dropped']} dropped)",
        "splits: " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()),
        "sampling rates (Hz): " + ", ".join(f"{k}: {v}" for k, v in info["sampling_rates"].items()),
        "lead sets: " + "; ".join(f"[{k}]: {v}" for k, v in info["lead_sets"].items()),
    ]
    if info["duration_s"]:
        d = info["duration_s"]
        lines.append(f"duration (s): min {d['min']:.1f}, mean {d['mean']:.1f}, max {d['max']:.1f}")
    for name, stats in info["labels"].items():
        head = f"{name} ({stats['type']}): {stats['labelled']} labelled, {stats['missing']} missing"
        if "positives" in stats:
            head += "; " + ", ".join(f"{k} {v}" for k, v in stats["positives"].items())
        if "classes" in stats:
            head += "; " + ", ".join(f"{k} {v}" for k, v in stats["classes"].items())
        if "mean" in stats:
            unit = f" {stats['unit']}" if stats.get("unit") else ""
            head += f"; mean {stats['mean']:.1f}{unit} (min {stats['min']:.1f}, max {stats['max']:.1f})"
        lines.append(head)
    return "\n".join(lines)
