"""``enecg data``: ``prepare {ptbxl,cinc,sph,wfdb,synthetic}`` builds a dataset folder, ``describe`` summarises one,
``download ptbxl`` fetches PTB-XL from PhysioNet."""

from __future__ import annotations

import argparse
import json

from enecg.data.cinc import CINC_TASKS, CLASS_PRESETS, CincOptions, prepare_cinc
from enecg.data.describe import describe_dataset, format_description
from enecg.data.ptbxl import PTBXL_TASKS, PtbxlOptions, prepare_ptbxl
from enecg.data.sph import SPH_TASKS, SphOptions, prepare_sph
from enecg.data.synthetic import SYNTHETIC_TASKS, SyntheticOptions, prepare_synthetic
from enecg.data.wfdb_folder import WFDB_TASKS, WfdbFolderOptions, prepare_wfdb_folder


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _folds(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="Folder of the source records (and tables).")
    parser.add_argument("--out", required=True, help="Dataset folder to write (replaced atomically).")
    parser.add_argument(
        "--hr-target",
        action="store_true",
        help="Add a heart_rate regression target (wfdb gqrs QRS detector).",
    )
    parser.add_argument("--workers", type=int, default=2, help="Reader processes (default 2; 1: no pool).")
    parser.add_argument(
        "--force", action="store_true", help="Rebuild even when inputs and options are unchanged."
    )


def _add_random_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="Seed of the patient-level split (default 0).")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="Fraction of patients in validation.")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="Fraction of patients in test.")
    parser.add_argument(
        "--kfold", type=int, help="k-fold parts fold_0..fold_{k-1} instead of train/validation/test."
    )
    parser.add_argument("--limit", type=int, help="Only the first N records (sorted by path).")


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="Prepare and inspect ECG datasets.", description=__doc__)
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 0)

    prepare = commands.add_parser(
        "prepare",
        help="Build a dataset folder from a source.",
        description="Build a dataset folder from a source.",
    )
    sources = prepare.add_subparsers(dest="source", metavar="SOURCE")
    prepare.set_defaults(func=lambda args: prepare.print_help() or 0)

    ptbxl = sources.add_parser(
        "ptbxl",
        help="PTB-XL (ptbxl_database.csv + scp_statements.csv + records).",
        description="Build a PTB-XL dataset: diagnostic superclasses/subclasses, rhythm, form, age, sex; "
        "splits from strat_fold.",
    )
    _add_common(ptbxl)
    ptbxl.add_argument(
        "--rate", type=int, choices=(100, 500), default=100, help="Sampling rate (default 100)."
    )
    ptbxl.add_argument(
        "--min-likelihood",
        type=float,
        default=0.0,
        help="Diagnostic statements count when likelihood >= this (default 0: all, the benchmark convention).",
    )
    ptbxl.add_argument(
        "--tasks", type=_tasks, default=PTBXL_TASKS, help=f"Comma list of {','.join(PTBXL_TASKS)}."
    )
    ptbxl.add_argument(
        "--kfold", type=int, help="k-fold parts from groups of strat folds (5: {1,2},{3,4},...)."
    )
    ptbxl.add_argument(
        "--val-folds", type=_folds, default=(9,), help="strat folds of validation (default 9)."
    )
    ptbxl.add_argument("--test-folds", type=_folds, default=(10,), help="strat folds of test (default 10).")
    ptbxl.set_defaults(func=_prepare_ptbxl)

    cinc = sources.add_parser(
        "cinc",
        help="PhysioNet/CinC Challenge .hea + .mat records (Dx SNOMED CT labels).",
        description="Build a CinC Challenge dataset: Dx classes, age, sex; seeded patient-level split.",
    )
    _add_common(cinc)
    _add_random_split(cinc)
    cinc.add_argument(
        "--classes",
        default="cinc2021",
        help=f"Class preset ({', '.join(CLASS_PRESETS)}) or comma list of [NAME=]CODE[|CODE] (default cinc2021).",
    )
    cinc.add_argument(
        "--tasks", type=_tasks, default=CINC_TASKS, help=f"Comma list of {','.join(CINC_TASKS)}."
    )
    cinc.add_argument("--ptbxl-root", help="PTB-XL folder: drop HR* records that copy its records.")
    cinc.set_defaults(func=_prepare_cinc)

    sph = sources.add_parser(
        "sph",
        help="Shandong Provincial Hospital (SPH) release: records/*.h5 + metadata.csv (AHA statements).",
        description="Build an SPH dataset: primary AHA/ACC/HRS statements from metadata.csv, age, sex; seeded "
        "split by Patient_ID.",
    )
    _add_common(sph)
    _add_random_split(sph)
    sph.add_argument(
        "--classes", default=None, help="Comma list of primary AHA codes (default: all in metadata.csv)."
    )
    sph.add_argument("--tasks", type=_tasks, default=SPH_TASKS, help=f"Comma list of {','.join(SPH_TASKS)}.")
    sph.set_defaults(func=_prepare_sph)

    wfdb = sources.add_parser(
        "wfdb",
        help="Any folder of WFDB records (no labels needed).",
        description="Build a dataset from a folder of WFDB records of any lead set, length and rate.",
    )
    _add_common(wfdb)
    _add_random_split(wfdb)
    wfdb.add_argument(
        "--tasks", type=_tasks, default=(), help=f"Comma list of {','.join(WFDB_TASKS)} (default none)."
    )
    wfdb.add_argument(
        "--labels",
        help="CSV of labels: record, [source], one 0/1 column per '<task>:<label>' (enecg generate sample "
        "writes one as labels.csv).",
    )
    wfdb.set_defaults(func=_prepare_wfdb)

    synthetic = sources.add_parser(
        "synthetic",
        help="A labelled SYNTHETIC 12-lead set simulated with ECGSYN (neurokit2); no input data.",
        description="Simulate a labelled synthetic 12-lead dataset (ECGSYN via neurokit2): rhythm, morphology, "
        "heart rate, age, sex and noise labels drawn from documented distributions (enecg.data.synthetic); "
        "for running enecg without real data. Seeded and reproducible; patient-level split.",
    )
    synthetic.add_argument("--out", required=True, help="Dataset folder to write (replaced atomically).")
    synthetic.add_argument(
        "--n-records",
        type=int,
        default=SyntheticOptions.n_records,
        help="Number of records (default %(default)s).",
    )
    synthetic.add_argument(
        "--seed", type=int, default=0, help="Seed of patients, signals, noise and split (default 0)."
    )
    synthetic.add_argument(
        "--rate",
        type=int,
        default=SyntheticOptions.rate,
        help="Sampling rate in Hz, >= 100 (default %(default)s).",
    )
    synthetic.add_argument(
        "--seconds",
        type=float,
        default=SyntheticOptions.seconds,
        help="Record duration (default %(default)s s).",
    )
    synthetic.add_argument(
        "--tasks", type=_tasks, default=SYNTHETIC_TASKS, help=f"Comma list of {','.join(SYNTHETIC_TASKS)}."
    )
    synthetic.add_argument(
        "--noisy-fraction",
        type=float,
        default=SyntheticOptions.noisy_fraction,
        help="Fraction of records with baseline wander/EMG/powerline noise (default %(default)s).",
    )
    synthetic.add_argument(
        "--val-fraction", type=float, default=0.1, help="Fraction of patients in validation."
    )
    synthetic.add_argument("--test-fraction", type=float, default=0.1, help="Fraction of patients in test.")
    synthetic.add_argument(
        "--kfold", type=int, help="k-fold parts fold_0..fold_{k-1} instead of train/validation/test."
    )
    synthetic.add_argument(
        "--workers", type=int, default=2, help="Simulation processes (default 2; 1: no pool)."
    )
    synthetic.add_argument(
        "--force", action="store_true", help="Rebuild even when the options are unchanged."
    )
    synthetic.set_defaults(func=_prepare_synthetic)

    describe = commands.add_parser(
        "describe",
        help="Summarise a dataset folder.",
        description="Record count, per-split counts, per-label counts, lead sets and sampling rates of a dataset.",
    )
    describe.add_argument("path", help="Dataset folder (written by `enecg data prepare`).")
    describe.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    describe.set_defaults(func=_describe)

    download = commands.add_parser(
        "download",
        help="Download a public dataset from PhysioNet (needs network).",
        description="Download PTB-XL (tables + records) with wfdb; re-running resumes and skips complete files.",
    )
    download.add_argument("dataset", choices=["ptbxl"], help="Dataset to download.")
    download.add_argument("--out", required=True, help="Folder to download into (PhysioNet's layout).")
    download.add_argument("--rate", type=int, choices=[100, 500], action="append",
                          help="Sampling rate(s) to fetch (repeatable; default 100).")
    download.add_argument("--ecg-ids", default=None,
                          help="Only these ecg_ids, e.g. '1-500' or '1,2,3' (default: all).")
    download.set_defaults(func=_download)


def _report(meta) -> None:
    parts = ", ".join(f"{k} {v}" for k, v in meta.splits.items())
    print(
        f"{sum(meta.splits.values())} records ({parts}); {len(meta.skipped)} skipped, {len(meta.dropped)} dropped"
    )


def _prepare_ptbxl(args: argparse.Namespace) -> int:
    options = PtbxlOptions(
        rate=args.rate,
        min_likelihood=args.min_likelihood,
        tasks=args.tasks,
        kfold=args.kfold,
        validation_folds=args.val_folds,
        test_folds=args.test_folds,
        hr_target=args.hr_target,
    )
    _, meta = prepare_ptbxl(args.root, args.out, options, workers=args.workers, force=args.force)
    _report(meta)
    return 0


def _prepare_cinc(args: argparse.Namespace) -> int:
    options = CincOptions(
        seed=args.seed,
        validation_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        kfold=args.kfold,
        classes=args.classes,
        tasks=args.tasks,
        ptbxl_root=args.ptbxl_root,
        hr_target=args.hr_target,
        limit=args.limit,
    )
    _, meta = prepare_cinc(args.root, args.out, options, workers=args.workers, force=args.force)
    _report(meta)
    return 0


def _prepare_sph(args: argparse.Namespace) -> int:
    options = SphOptions(
        seed=args.seed,
        validation_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        kfold=args.kfold,
        classes=args.classes,
        tasks=args.tasks,
        hr_target=args.hr_target,
        limit=args.limit,
    )
    _, meta = prepare_sph(args.root, args.out, options, workers=args.workers, force=args.force)
    _report(meta)
    return 0


def _prepare_wfdb(args: argparse.Namespace) -> int:
    options = WfdbFolderOptions(
        seed=args.seed,
        validation_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        kfold=args.kfold,
        tasks=args.tasks,
        hr_target=args.hr_target,
        limit=args.limit,
        labels=args.labels,
    )
    _, meta = prepare_wfdb_folder(args.root, args.out, options, workers=args.workers, force=args.force)
    _report(meta)
    return 0


def _prepare_synthetic(args: argparse.Namespace) -> int:
    options = SyntheticOptions(
        seed=args.seed,
        validation_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        kfold=args.kfold,
        n_records=args.n_records,
        rate=args.rate,
        seconds=args.seconds,
        tasks=args.tasks,
        noisy_fraction=args.noisy_fraction,
    )
    _, meta = prepare_synthetic(args.out, options, workers=args.workers, force=args.force)
    _report(meta)
    return 0


def _download(args: argparse.Namespace) -> int:
    from enecg.data.download import download_ptbxl

    ids = None
    if args.ecg_ids:
        ids = []
        for part in args.ecg_ids.split(","):
            low, _, high = part.partition("-")
            ids.extend(range(int(low), int(high or low) + 1))
    root = download_ptbxl(args.out, rates=args.rate or [100], ecg_ids=ids)
    print(f"PTB-XL downloaded into {root}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    info = describe_dataset(args.path)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
