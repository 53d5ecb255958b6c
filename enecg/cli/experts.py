"""``enecg experts``: list the bundled adapter specs, and check that an expert resolves, loads and runs.

enecg experts list [--json]
enecg experts check NAME [--json] [--revision R] [--spec SPEC] [--cache-dir DIR] [--local-files-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from enecg.experts.expert import load_expert
from enecg.experts.spec import bundled_specs, contract_summary
from enecg.leads import STANDARD_12_LEADS
from enecg.record import ECGRecord

# Synthetic-record defaults for contracts that leave the rate / length to the record.
_DEFAULT_FS = 500.0
_DEFAULT_SECONDS = 10.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experts", help="List bundled expert specs; check that an expert loads and runs."
    )
    sub = parser.add_subparsers(dest="experts_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])

    list_parser = sub.add_parser(
        "list", help="Bundled adapter specs: name, Hub ID, family, size, licence, contract."
    )
    list_parser.add_argument("--json", action="store_true", help="Machine-readable output.")
    list_parser.set_defaults(func=run_list)

    check = sub.add_parser(
        "check",
        help="Resolve and load an expert, report its key check, and embed one synthetic record.",
        description="NAME: a bundled spec name, a Hub ID ORG/NAME[@REV], hf-hub:ORG/NAME[@REV], local-dir:PATH, a "
        "folder or a spec file.",
    )
    check.add_argument("name", metavar="NAME")
    check.add_argument("--json", action="store_true", help="Machine-readable output.")
    check.add_argument("--revision", default=None, help="Hub branch, tag or commit sha.")
    check.add_argument("--spec", default=None, help="Spec to apply (bundled name or .yaml/.json file).")
    check.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE).")
    check.add_argument(
        "--local-files-only", action="store_true", default=None, help="Use the Hub cache only (no network)."
    )
    check.set_defaults(func=run_check)


def spec_rows() -> list[dict[str, Any]]:
    """One summary row per bundled spec (the data behind ``enecg experts list``)."""
    return [
        {
            "name": spec.name,
            "hub_id": spec.hub_id,
            "weights_file": spec.weights_file,
            "family": spec.family,
            "embedding_dim": spec.embedding_dim,
            "license": spec.license,
            "contract": contract_summary(spec.contract),
            "description": spec.description,
        }
        for spec in bundled_specs().values()
    ]


def run_list(args: argparse.Namespace) -> int:
    rows = spec_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = [
        ("name", "NAME"),
        ("hub_id", "HUB ID"),
        ("family", "FAMILY"),
        ("embedding_dim", "DIM"),
        ("license", "LICENCE"),
        ("contract", "CONTRACT"),
    ]
    table = [[str(row[key] if row[key] is not None else "-") for key, _ in columns] for row in rows]
    widths = [max(len(title), *(len(r[i]) for r in table)) for i, (_, title) in enumerate(columns)]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip())
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def synthetic_record(contract: Any, seed: int = 0) -> ECGRecord:
    """A random-walk-free synthetic record matching the contract's rate, leads and length (twice the length for
    ``segments`` contracts, so that segmentation and aggregation run too)."""
    fs = float(contract.fs or _DEFAULT_FS)
    leads = tuple(contract.leads or STANDARD_12_LEADS)
    n = int(contract.length or round(_DEFAULT_SECONDS * fs))
    if contract.long_records == "segments":
        n *= 2
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    beats = np.sin(2 * np.pi * 1.2 * t)[None, :] * rng.uniform(0.2, 1.0, size=(len(leads), 1))
    signal = beats + 0.05 * rng.standard_normal((len(leads), n))
    return ECGRecord(signal=signal.astype(np.float32), fs=fs, leads=leads, record_id="synthetic")


def run_check(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    expert = load_expert(
        args.name,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
        spec=args.spec,
    )
    load_s = time.perf_counter() - started
    record = synthetic_record(expert.contract)
    batch = expert.prepare_batch([record])
    started = time.perf_counter()
    embedding = expert.embed([record])
    forward_s = time.perf_counter() - started
    finite = bool(torch.isfinite(embedding).all())
    report = expert.describe()
    report.update(
        {
            "key_check": "ok (strict)"
            + (
                f", {len(expert.key_report['dropped'])} expected drop(s)"
                if expert.key_report["dropped"]
                else ""
            )
            + (
                f", {len(expert.key_report['missing'])} expected missing"
                if expert.key_report["missing"]
                else ""
            ),
            "synthetic_record": {"fs": record.fs, "leads": len(record.leads), "samples": record.n_samples},
            "prepared_shape": list(batch.windows.shape),
            "embedding_shape": list(embedding.shape),
            "embedding_finite": finite,
            "load_seconds": round(load_s, 3),
            "forward_seconds": round(forward_s, 3),
        }
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key in (
            "name",
            "family",
            "hub_id",
            "revision",
            "source",
            "license",
            "num_parameters",
            "embedding_dim",
            "contract_summary",
            "key_check",
            "prepared_shape",
            "embedding_shape",
            "embedding_finite",
            "load_seconds",
            "forward_seconds",
        ):
            print(f"{key:18s} {report[key]}")
    if not finite or tuple(embedding.shape) != (1, expert.embedding_dim):
        print(
            f"enecg: error: {expert.name}: the synthetic forward gave shape {tuple(embedding.shape)}, finite="
            f"{finite}",
            file=sys.stderr,
        )
        return 1
    return 0
