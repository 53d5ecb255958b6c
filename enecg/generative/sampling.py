"""Writing generated records: WFDB files + a labels CSV that ``enecg data prepare wfdb --labels`` reads.

Every record is marked synthetic twice: a ``# Synthetic: <model>`` header comment (travels with the files) and
the CSV's ``source`` column ``synthetic:<model>``. The dataset builder sends such records to the training part
only and refuses them anywhere else (:func:`enecg.data.schema.refuse_synthetic`).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from enecg.data.schema import SYNTHETIC_PREFIX
from enecg.data.wfdb_folder import SYNTHETIC_COMMENT
from enecg.generative.model import ECGDiffusion

LABELS_FILE = "labels.csv"


def write_records(
    out: str | os.PathLike,
    signals: np.ndarray,
    *,
    model: ECGDiffusion,
    model_name: str,
    labels: list[str] | None,
    prefix: str,
    age: float | None = None,
    sex: float | None = None,
) -> list[str]:
    """Write ``signals`` ``(n, leads, length)`` (mV) as WFDB records ``<prefix>_<i>`` in ``out`` and append their
    rows to ``out/labels.csv``; returns the record names. Existing records are never overwritten."""
    import wfdb

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    names = [f"{prefix}_{i:05d}" for i in range(len(signals))]
    clash = [n for n in names if (out / f"{n}.hea").exists()]
    if clash:
        raise ValueError(
            f"{out}: records {clash[:2]} already exist; choose another --out, --seed or --prefix"
        )
    comments = [f"{SYNTHETIC_COMMENT}: {model_name}", f"Labels: {','.join(labels or []) or 'unconditioned'}"]
    if age is not None:
        comments.append(f"Age: {age:g}")
    if sex is not None:
        comments.append(f"Sex: {'Female' if sex else 'Male'}")
    for name, signal in zip(names, signals):
        wfdb.wrsamp(
            name,
            fs=spec.fs,
            units=["mV"] * len(spec.leads),
            sig_name=list(spec.leads),
            p_signal=np.asarray(signal, dtype=np.float64).T,
            fmt=["16"] * len(spec.leads),
            comments=comments,
            write_dir=str(out),
        )
    _append_labels(out / LABELS_FILE, names, spec.task, spec.label_names, labels, model_name)
    return names


def _append_labels(
    path: Path, names: list[str], task: str, label_names: list[str], labels: list[str] | None, model_name: str
) -> None:
    header = ["record", "source", *(f"{task}:{label}" for label in label_names)]
    if path.is_file():
        with path.open(newline="") as f:
            existing = next(csv.reader(f), [])
        if existing != header:
            raise ValueError(f"{path}: holds labels of another task ({existing[2:4]}...); use another --out")
    values = [int(label in (labels or [])) for label in label_names]
    # An unconditioned sample has no known label: empty cells read back as NaN (masked out of losses).
    cells = values if labels else [""] * len(label_names)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        for name in names:
            writer.writerow([name, f"{SYNTHETIC_PREFIX}{model_name}", *cells])


def sample_to_folder(
    model: ECGDiffusion,
    labels: list[str] | None,
    n: int,
    out: str | os.PathLike,
    *,
    model_name: str,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    age: float | None = None,
    sex: float | None = None,
) -> list[str]:
    """Generate ``n`` records with ``labels`` (validated first: bad requests fail before any work) and write them."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if labels is not None:
        model.label_vector(labels)
    signals = model.sample(labels, n, seed=seed, steps=steps, guidance_scale=guidance_scale, age=age, sex=sex)
    tag = "+".join(labels) if labels else "uncond"
    prefix = re.sub(r"[^A-Za-z0-9+_-]", "_", f"syn_{tag}_s{seed}")
    return write_records(
        out, signals, model=model, model_name=model_name, labels=labels, prefix=prefix, age=age, sex=sex
    )
