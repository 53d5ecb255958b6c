"""Input-contract cost against each FM family's own forward, in the same run and on the same batch (issue 11).

For each family (HuBERT-ECG small, ECGFounder 12-lead, ECG-FM pretrained, MOMENT-1 small, Mantis-8M), its
bundled adapter contract is applied with :func:`enecg.contract.apply_contract_records` to real PTB-XL records
(the 500 Hz source files, and the 100 Hz files), with the fast kernels and with the scipy reference
(``implementation="reference"``), and the model, built full-size from its published config with random weights
(``bench_experts.CASES`` / ``load_config``; speed does not depend on weight values), embeds the prepared batch
(``family.embed(model, x)`` in eval mode under ``torch.no_grad()``, fp32 CPU; a record that the contract cuts
into several windows counts all of them, as the ensemble runs them). Contract and forward repeats are
interleaved; medians are reported, per record. Usage:

    python bench/bench_contract.py [--batch-sizes 4,32] [--threads 1,2] [--repeats 3] [--quick]
                                   [--out bench/results/contract.json]

``--quick`` uses tiny model configs, batch 2, one repeat and one thread: a schema check whose numbers mean
nothing. Target (issue 11): fast contract / forward <= 0.10 for every family.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_experts import CASES, default_parity_dir, load_config

from enecg.contract import FAST_TOLERANCE, apply_contract_records
from enecg.experts.family import get_family
from enecg.experts.spec import bundled_spec
from enecg.io import read_record
from enecg.utils.files import write_text_atomic

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("hubert-ecg-small", "ecgfounder-12lead", "ecg-fm-pretrained", "moment-1-small", "mantis-8m")
RATES = {500: "filename_hr", 100: "filename_lr"}
TARGET_RATIO = 0.10


def read_ptbxl(root: Path, count: int) -> dict[int, list]:
    """The first ``count`` PTB-XL records at each source rate."""
    table = pd.read_csv(root / "ptbxl_database.csv")
    return {
        rate: [read_record(root / path) for path in table[column][:count]] for rate, column in RATES.items()
    }


def timed(call: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def measure(case: Any, records: dict[int, list], batch: int, repeats: int) -> dict[str, Any]:
    """Interleaved repeats of fast contract, reference contract (each rate) and forward on one batch."""
    contract = bundled_spec(case.name).contract
    family = get_family(case.family)
    samples: dict[str, list[float]] = {"forward": []}
    diffs: dict[int, float] = {}
    windows_per_record = 1
    for rate in records:
        samples[f"fast_{rate}"], samples[f"reference_{rate}"] = [], []
    x = None
    for repeat in range(repeats + 1):  # repeat 0 is the warm-up, not kept
        for rate, recs in records.items():
            fast_s, fast = timed(lambda recs=recs: apply_contract_records(recs[:batch], contract))
            ref_s, ref = timed(
                lambda recs=recs: apply_contract_records(recs[:batch], contract, implementation="reference")
            )
            if repeat:
                samples[f"fast_{rate}"].append(fast_s / batch)
                samples[f"reference_{rate}"].append(ref_s / batch)
            diffs[rate] = float(np.abs(fast.windows - ref.windows).max())
            if rate == 500:
                windows_per_record = fast.windows.shape[1]
                x = torch.from_numpy(fast.windows).reshape(-1, *fast.windows.shape[2:])
        with torch.no_grad():
            forward_s, _ = timed(lambda x=x: family.embed(case.model, x))
        if repeat:
            samples["forward"].append(forward_s / batch)
    med = {name: statistics.median(values) for name, values in samples.items()}
    out: dict[str, Any] = {
        "batch": batch,
        "windows_per_record": windows_per_record,
        "forward_ms_per_record": 1e3 * med["forward"],
        "per_rate": {},
    }
    for rate in records:
        fast_ms, ref_ms = 1e3 * med[f"fast_{rate}"], 1e3 * med[f"reference_{rate}"]
        out["per_rate"][str(rate)] = {
            "contract_fast_ms_per_record": fast_ms,
            "contract_reference_ms_per_record": ref_ms,
            "speedup": ref_ms / fast_ms,
            "ratio_fast_to_forward": fast_ms / out["forward_ms_per_record"],
            "ratio_reference_to_forward": ref_ms / out["forward_ms_per_record"],
            "max_abs_diff": diffs[rate],
            "meets_target": fast_ms / out["forward_ms_per_record"] <= TARGET_RATIO,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="4,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ptbxl500")
    parser.add_argument("--parity-dir", type=Path, default=default_parity_dir())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "contract.json")
    args = parser.parse_args(argv)
    batches = [2] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    threads = [1] if args.quick else [int(t) for t in args.threads.split(",")]
    repeats = 1 if args.quick else args.repeats
    records = read_ptbxl(args.data, max(batches))
    results: list[dict[str, Any]] = []
    # Threads outermost and the JSON rewritten after every row: a long run on a busy machine that is stopped
    # still leaves every finished measurement (the 1-thread ones first).
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for case in (c for c in CASES if c.name in FAMILIES):
            config, source, _ = load_config(case, args.parity_dir, args.quick)
            model = get_family(case.family).build(config).eval()
            for batch in batches:
                row = measure(_WithModel(case, model), records, batch, repeats)
                row.update(family=case.name, threads=n_threads, config=source)
                results.append(row)
                print(
                    f"{case.name:18s} threads={n_threads} B={batch:2d} forward {row['forward_ms_per_record']:7.1f}"
                    " ms/rec | "
                    + " | ".join(
                        f"{rate} Hz fast {r['contract_fast_ms_per_record']:.2f} ref "
                        f"{r['contract_reference_ms_per_record']:.2f} ms ratio {r['ratio_fast_to_forward']:.3f} "
                        f"diff {r['max_abs_diff']:.1e}"
                        for rate, r in row["per_rate"].items()
                    ),
                    flush=True,
                )
                _write(args, batches, threads, repeats, results)
            del model
    print(f"wrote {args.out}")


def _write(
    args: argparse.Namespace,
    batches: list[int],
    threads: list[int],
    repeats: int,
    results: list[dict[str, Any]],
) -> None:
    report = {
        "protocol": {
            "families": list(FAMILIES),
            "records": f"first {max(batches)} PTB-XL records of ptbxl_database.csv, source files at 500 and 100 Hz",
            "batch_sizes": batches,
            "threads": threads,
            "repeats": repeats,
            "statistic": "median over interleaved repeats (after one warm-up), per record",
            "forward": "family.embed(model, x) on the fast contract's 500 Hz windows, fp32, eval, no_grad",
            "target_ratio": TARGET_RATIO,
            "tolerance": FAST_TOLERANCE,
            "quick": args.quick,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
    }
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")


class _WithModel:
    """A bench_experts case with its built model attached."""

    def __init__(self, case: Any, model: torch.nn.Module) -> None:
        self.name, self.family, self.model = case.name, case.family, model


if __name__ == "__main__":
    main()
