"""What a reduced-lead or short record does to each foundation-model family: refused, zero-filled or masked,
and how far its embedding moves from the embedding of the same record with all 12 leads.

Each family runs at its *full-size published config* (the parity manifests, as in ``bench_experts.py``) with
random weights, behind its bundled adapter spec's contract (``adapters/*.yaml``: ``min_leads``, ``missing_leads``,
``short_records``). Real PTB-XL records (500 Hz, from the shared sample) are cut into:

* ``full``: the 12-lead 10-s record (the reference);
* ``holter_2lead``: leads II and V5 resampled to 360 Hz (a MIT-BIH-like MLII + V5 pair, with the user's
  ``MLII=II`` alias already applied);
* ``single_lead_I``: lead I alone (a wearable);
* ``short_4s``: all 12 leads, the first 4 s (shorter than every 5-s window).

For each family and variant the outcome is ``refused`` (with the contract's reason) or ``read``; for read
variants, the cosine similarity of the embedding to the full record's (mean ± sd over the records), and, where the
family masks missing leads or padding, the same similarity *without* the mask (zero-filled / zero-padded input as
the contract makes it), so the mask's effect is measured side by side. Random weights: the figures say how far
the architecture moves the representation, not how well a trained model tolerates the loss (no published weights
are reachable here). Usage:

    python bench/bench_reduced_leads.py [--records 8] [--quick] [--out bench/results/reduced_leads.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import signal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_experts import CASES, load_config  # noqa: E402

from enecg.contract import ContractRefusal  # noqa: E402
from enecg.experts.expert import Expert  # noqa: E402
from enecg.experts.family import get_family  # noqa: E402
from enecg.experts.spec import bundled_spec  # noqa: E402
from enecg.io import read_record  # noqa: E402
from enecg.record import ECGRecord  # noqa: E402
from enecg.utils.files import write_text_atomic  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "reduced_leads.json"
LOG = logging.getLogger("bench_reduced_leads")
# One published model per family (the smallest size of each).
MODELS = (
    "hubert-ecg-small",
    "ecgfounder-12lead",
    "ecgfounder-1lead",
    "ecg-fm-pretrained",
    "moment-1-small",
    "mantis-8m",
)
ONE_LEAD_MANIFEST = ("ecgfounder/keys_full_1lead.json", "constructor_kwargs")


def variants(record: ECGRecord) -> dict[str, ECGRecord]:
    """The reduced versions of one 12-lead record (see the module docstring)."""

    def keep(leads: list[str], fs: float | None = None, seconds: float | None = None) -> ECGRecord:
        x = record.signal[[record.leads.index(lead) for lead in leads]]
        rate = record.fs
        if fs is not None and fs != record.fs:
            x = signal.resample_poly(x, 18, 25, axis=-1).astype(np.float32)  # 500 -> 360 Hz
            rate = fs
        if seconds is not None:
            x = x[:, : int(seconds * rate)]
        return ECGRecord(x, rate, tuple(leads), record.record_id, record.patient_id, dict(record.metadata))

    return {
        "full": record,
        "holter_2lead": keep(["II", "V5"], fs=360.0),
        "single_lead_I": keep(["I"]),
        "short_4s": keep(list(record.leads), seconds=4.0),
    }


def build(name: str, parity_dir: Path, quick: bool) -> Expert:
    """The published spec's family at full size (random weights), behind the spec's contract."""
    spec = bundled_spec(name)
    family = get_family(spec.family)
    if name == "ecgfounder-1lead":
        manifest, key = ONE_LEAD_MANIFEST
        if quick:
            config = {**next(c for c in CASES if c.family == "net1d").quick_config, "in_channels": 1}
        else:
            config = json.loads((parity_dir / manifest).read_text())[key]
    else:
        case = next(c for c in CASES if c.name == name)
        config, _, _ = load_config(case, parity_dir, quick)
    torch.manual_seed(0)
    model = family.build(config).eval()
    dim = family.embedding_dim(config)
    return Expert(
        spec=spec.replace(embedding_dim=dim), family=family, model=model, config=config, embedding_dim=dim
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def unmasked_embedding(expert: Expert, record: ECGRecord) -> torch.Tensor:
    """The embedding of the contract's zero-filled / zero-padded windows with no mask (what a family without
    masks computes)."""
    batch = expert.prepare_batch([record])
    with torch.no_grad():
        return expert.forward(batch.windows, batch.window_mask)


def bench_model(expert: Expert, records: list[ECGRecord]) -> dict[str, Any]:
    family = expert.family
    masks = {"missing_leads": bool(family.masks_missing_leads), "padding": bool(family.masks_padding)}
    per_variant: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for record in records:
        parts = variants(record)
        reference = expert.embed(parts["full"])
        for variant, reduced in parts.items():
            if variant == "full":
                continue
            row = per_variant.setdefault(variant, {"cosine": [], "cosine_unmasked": [], "refusals": []})
            try:
                embedding = expert.embed(reduced)
            except ContractRefusal as refusal:
                row["refusals"].append(refusal.problem)
                continue
            row["cosine"].append(_cosine(embedding, reference))
            uses_mask = (variant == "short_4s" and masks["padding"]) or (
                variant != "short_4s" and masks["missing_leads"]
            )
            if uses_mask:
                row["cosine_unmasked"].append(_cosine(unmasked_embedding(expert, reduced), reference))
    out: dict[str, Any] = {
        "family": expert.spec.family,
        "contract_leads": len(expert.contract.leads or ()),
        "min_leads": expert.contract.min_leads,
        "missing_leads": expert.contract.missing_leads,
        "masks": masks,
        "seconds": round(time.perf_counter() - start, 2),
        "variants": {},
    }
    for variant, row in per_variant.items():
        if row["refusals"]:
            out["variants"][variant] = {"outcome": "refused", "reason": row["refusals"][0]}
            continue
        entry: dict[str, Any] = {
            "outcome": "masked" if row["cosine_unmasked"] else "zero-filled/padded",
            "cosine_to_full": _summary(row["cosine"]),
        }
        if row["cosine_unmasked"]:
            entry["cosine_to_full_without_mask"] = _summary(row["cosine_unmasked"])
        out["variants"][variant] = entry
    return out


def _summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(array.mean()), 4), "sd": round(float(array.std()), 4), "n": int(array.size)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=8, help="PTB-XL records (500 Hz) to average over.")
    parser.add_argument("--models", default=",".join(MODELS), help="Comma list of bundled spec names.")
    parser.add_argument("--quick", action="store_true", help="Tiny configs: checks the pipeline only.")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data")),
    )
    parser.add_argument("--parity-dir", type=Path, default=REPO.parent / "shared" / "fixtures" / "parity")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    folder = args.data_dir / "ptbxl500" / "records500" / "00000"
    headers = sorted(folder.glob("*_hr.hea"))[: args.records]
    if not headers:
        raise SystemExit(f"{folder}: no PTB-XL 500 Hz records (set --data-dir)")
    records = [read_record(h.with_suffix("")) for h in headers]
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        LOG.info("%s ...", name)
        results[name] = bench_model(build(name, args.parity_dir, args.quick), records)
        LOG.info("%s: %s", name, json.dumps(results[name]["variants"]))
    payload = {
        "schema_version": 1,
        "what": "cosine similarity of a reduced record's embedding to the full 12-lead record's, per FM family "
        "at full size with random weights, behind each bundled adapter spec's contract",
        "caveat": "random weights (no published weights reachable here): figures show how far each architecture "
        "moves the representation, not how well trained weights tolerate the loss",
        "quick": args.quick,
        "records": [r.record_id for r in records],
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "models": results,
    }
    write_text_atomic(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
