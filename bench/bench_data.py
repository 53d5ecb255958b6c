"""Data-layer benchmark: PTB-XL ingest throughput (enecg reader and builder vs a plain ``wfdb.rdrecord`` loop),
QRS detector cost for the heart-rate target (gqrs vs xqrs), and the per-record cost of ``apply_contract``.

All ratios are measured in the same run on the same records. Usage:

    python bench/bench_data.py [--root ../shared/data/ptbxl500] [--rate 100] [--out bench/results/data.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import wfdb
from wfdb import processing

from enecg.data.build import build_dataset
from enecg.data.ptbxl import PtbxlOptions, plan_ptbxl
from enecg.io import read_record
from enecg.utils.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` runs (the machine is shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_ingest(root: Path, rate: int, workers: int) -> dict:
    database = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    column = "filename_lr" if rate == 100 else "filename_hr"
    paths = [str(root / name) for name in database[column]]
    n = len(paths)
    for path in paths[:5]:  # warm the page cache and imports for both readers alike
        wfdb.rdrecord(path)
        read_record(path)
    t_wfdb = _timed(lambda: [wfdb.rdrecord(p) for p in paths], repeats=2)
    t_reader = _timed(lambda: [read_record(p) for p in paths], repeats=2)
    plan = plan_ptbxl(root, PtbxlOptions(rate=rate))
    with tempfile.TemporaryDirectory(prefix="enecg-bench-") as tmp:
        out = Path(tmp) / "ds"
        t_build = _timed(lambda: build_dataset(plan, out, workers=workers, force=True))
        t_reuse = _timed(lambda: build_dataset(plan, out, workers=workers))
    return {
        "records": n,
        "rate_hz": rate,
        "workers": workers,
        "wfdb_rdrecord_loop_records_per_s": n / t_wfdb,
        "enecg_read_record_loop_records_per_s": n / t_reader,
        "enecg_build_records_per_s": n / t_build,
        "enecg_build_seconds": t_build,
        "enecg_reuse_cached_seconds": t_reuse,
        "ratio_read_record_vs_wfdb": t_wfdb / t_reader,
        "ratio_build_vs_wfdb_loop": t_wfdb / t_build,
        "note": "build = read + labels + Arrow write + save_to_disk, with `workers` processes; the wfdb loop only "
        "reads (one process).",
    }


def bench_qrs(root: Path, n_records: int) -> dict:
    database = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id").head(n_records)
    results: dict = {}
    rates: dict[str, dict[int, np.ndarray]] = {"gqrs": {}, "xqrs": {}}

    def heart_rate(beats: np.ndarray, fs: int) -> float:
        return 60.0 * fs / float(np.median(np.diff(beats))) if len(beats) >= 3 else np.nan

    for rate, column in ((100, "filename_lr"), (500, "filename_hr")):
        leads = [read_record(root / name).signal[1].astype(np.float64) for name in database[column]]
        found: dict[str, list] = {}
        timings = {}
        for name, detect in (
            ("gqrs", lambda s, fs: processing.gqrs_detect(sig=s, fs=fs)),
            ("xqrs", lambda s, fs: processing.xqrs_detect(sig=s, fs=fs, verbose=False)),
        ):
            start = time.perf_counter()
            found[name] = [detect(s, rate) for s in leads]
            timings[name] = time.perf_counter() - start
            rates[name][rate] = np.array([heart_rate(b, rate) for b in found[name]])
        results[f"{rate}hz"] = {
            "records": len(leads),
            "gqrs_ms_per_record": 1e3 * timings["gqrs"] / len(leads),
            "xqrs_ms_per_record": 1e3 * timings["xqrs"] / len(leads),
        }
    # Same recordings at both rates: a detector should give the same heart rate from either.
    for name, by_rate in rates.items():
        diff = np.abs(by_rate[100] - by_rate[500])
        results[f"{name}_hr_100_vs_500hz"] = {
            "median_abs_diff_bpm": float(np.nanmedian(diff)),
            "records_diff_over_5bpm": int((diff > 5).sum()),
        }
    return results


def bench_contract(root: Path, n_records: int) -> dict:
    try:
        from enecg.contract import InputContract, apply_contract
    except ImportError as exc:
        return {"skipped": f"enecg.contract not importable: {exc}"}
    database = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id").head(n_records)
    records = [read_record(root / name) for name in database["filename_hr"]]
    contracts = {
        "resample500to100_bandpass_zscore": InputContract(
            fs=100, length=1000, bandpass=(0.5, 40.0), scaling="zscore_lead"
        ),
        "keep_rate_crop_2500_minmax": InputContract(length=2500, scaling="minmax_lead"),
        "resample500to100_5s_concat_leads": InputContract(
            fs=100, length=500, layout="concat_leads", long_records="segments"
        ),
    }
    results = {}
    for name, contract in contracts.items():
        try:
            apply_contract(records[0], contract)
        except NotImplementedError:
            return {"skipped": "apply_contract not implemented yet"}
        seconds = _timed(lambda c=contract: [apply_contract(r, c) for r in records], repeats=2)
        results[name] = {"records": len(records), "ms_per_record": 1e3 * seconds / len(records)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=str(REPO.parent / "shared" / "data" / "ptbxl500"), help="PTB-XL folder."
    )
    parser.add_argument("--rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--qrs-records", type=int, default=50)
    parser.add_argument("--contract-records", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # wfdb + pandas deprecation noise
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.root)
    if not (root / "ptbxl_database.csv").is_file():
        print(f"bench_data: PTB-XL sample not found at {root}; nothing measured", file=sys.stderr)
        return 1
    report = {
        "benchmark": "data",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "wfdb": wfdb.__version__},
        "ingest": bench_ingest(root, args.rate, args.workers),
        "qrs_detection": bench_qrs(root, args.qrs_records),
        "apply_contract": bench_contract(root, args.contract_records),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
