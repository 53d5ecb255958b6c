"""Generative ECG benchmark on the PTB-XL sample (issue 13 targets), one JSON: ``bench/results/generative.json``.

Per evaluated fold group (PTB-XL-500 at 100 Hz, ``kfold=5`` groups of ``strat_fold``; the test fold is never
read by training or sampling):

1. train a label-conditional diffusion model (:mod:`enecg.generative`) on the other four fold groups, conditioned
   on the diagnostic superclasses and age/sex;
2. ``evaluate_samples``: Fréchet distance of a frozen expert's embeddings, synthetic vs real test, and the
   real-vs-real floor; heart rate (xqrs) and spectra; TSTR vs TRTR macro AUROC of logistic probes on the
   embeddings; the rare label(s) (``--augment``, default HYP) refitted with synthetic records added;
3. ``evaluate_anomaly``: the denoising-error score as NORM vs abnormal AUROC on the test fold.

Targets checked (``targets`` in the JSON, each with ``met``): TSTR >= 0.9 x TRTR; anomaly AUROC >= 0.75;
Fréchet ratio <= 2; augmentation delta > 0.

The expert is an in-house light SimpleNet with **random weights** (no pretrained ECG foundation model is
available offline here): its embeddings are generic random convolutional features, stated in the JSON.

Usage (repository root)::

    python bench/bench_generative.py                    # small CPU run (one fold group), ~10 min on 2 cores
    python bench/bench_generative.py --folds 0,1,2,3,4 --steps 3000 --length 1000 --channels 32,64,128   # GPU
    python bench/bench_generative.py --quick            # pipeline check only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enecg.contract import InputContract  # noqa: E402
from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl  # noqa: E402
from enecg.evaluation.metrics import BootstrapConfig  # noqa: E402
from enecg.experts.families.light import LightCNNConfig, build_light_model  # noqa: E402
from enecg.experts.inhouse import save_inhouse_expert  # noqa: E402
from enecg.generative import GenerativeConfig, load_diffusion, train_diffusion  # noqa: E402
from enecg.generative.anomaly import evaluate_anomaly  # noqa: E402
from enecg.generative.evaluate import SampleEvaluationConfig, evaluate_samples  # noqa: E402
from enecg.utils.files import write_text_atomic  # noqa: E402

K = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "ptbxl500")
    parser.add_argument("--folds", default="4", help="Test fold groups (0-4), comma-separated.")
    parser.add_argument("--steps", type=int, default=300, help="Training steps per model.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--length", type=int, default=512, help="Samples per record at 100 Hz.")
    parser.add_argument("--channels", default="16,32,64", help="UNet block_out_channels.")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps.")
    parser.add_argument("--n-synthetic", type=int, default=120, help="Synthetic records for FD / TSTR.")
    parser.add_argument(
        "--augment", default="HYP", help="Rare labels for the augmentation probe (comma list)."
    )
    parser.add_argument("--augment-n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: pipeline and JSON check only.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generative.json")
    return parser.parse_args(argv)


def random_expert(folder: Path) -> Path:
    config = LightCNNConfig(architecture="SimpleNet", width_multiplier=0.5, embedding_dim=64)
    torch.manual_seed(0)
    contract = InputContract(fs=100.0, length=1000, scaling="zscore_lead")
    return save_inhouse_expert(
        build_light_model(config),
        family="light",
        config=config,
        contract=contract,
        folder=folder,
        name="random",
    )


def run_fold(args: argparse.Namespace, data: Path, expert: Path, fold: int, work: Path) -> dict[str, Any]:
    test = f"fold_{fold}"
    train_parts = tuple(f"fold_{k}" for k in range(K) if k != fold)
    started = time.time()
    config = GenerativeConfig(
        data=str(data),
        task="superclass",
        output_dir=str(work / f"model_{fold}"),
        parts=train_parts,
        length=args.length,
        block_out_channels=tuple(int(c) for c in args.channels.split(",")),
        sample_steps=args.sample_steps,
        batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        log_every=max(1, args.steps // 10),
        overwrite=True,
    )
    folder = train_diffusion(config)
    train_s = time.time() - started
    metrics = json.loads((folder / "metrics.json").read_text())
    evaluation = evaluate_samples(
        SampleEvaluationConfig(
            model=str(folder),
            data=str(data),
            expert=str(expert),
            out=str(work / f"eval_{fold}"),
            train_parts=train_parts,
            test_part=test,
            n_synthetic=args.n_synthetic,
            augment_labels=tuple(x for x in args.augment.split(",") if x),
            augment_n=args.augment_n,
        )
    )
    anomaly = evaluate_anomaly(
        load_diffusion(folder), data, part=test, bootstrap=BootstrapConfig(n_resamples=200)
    )
    return {
        "test_part": test,
        "train_parts": list(train_parts),
        "training": {k: metrics[k] for k in ("steps", "records", "parameters", "first_loss", "final_loss")}
        | {"loss_curve": metrics["loss_curve"], "seconds": round(train_s, 1)},
        "samples": {
            k: evaluation[k] for k in ("summary", "sizes", "heart_rate", "tstr", "trtr", "augmentation")
        },
        "spectra_mean_abs_log10_difference": evaluation["spectra_mean_abs_log10_difference"],
        "anomaly": anomaly,
        "seconds": round(time.time() - started, 1),
    }


def targets(folds: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(values: list[float]) -> float:
        finite = [v for v in values if v is not None and not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    ratio = mean([f["samples"]["summary"]["tstr_over_trtr"] for f in folds])
    anomaly = mean([f["anomaly"]["auroc"] for f in folds])
    frechet = mean([f["samples"]["summary"]["frechet_ratio"] for f in folds])
    deltas = [d["delta"] for f in folds for d in f["samples"]["augmentation"].values()]
    delta = mean(deltas)
    return {
        "tstr_over_trtr": {"value": ratio, "target": ">= 0.9", "met": ratio >= 0.9},
        "anomaly_auroc": {"value": anomaly, "target": ">= 0.75", "met": anomaly >= 0.75},
        "frechet_ratio": {"value": frechet, "target": "<= 2", "met": frechet <= 2.0},
        "augmentation_delta_auroc": {
            "value": delta,
            "target": "> 0 (paired CI not computed: one fold group, one seed)",
            "met": delta > 0,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.length, args.channels, args.n_synthetic, args.augment_n = 3, 128, "8,16", 16, 4
        args.sample_steps = 2
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="enecg-bench-gen-") as tmp:
        work = Path(tmp)
        data = work / "ptbxl500-100hz-k5"
        prepare_ptbxl(args.data_dir, data, PtbxlOptions(rate=100, tasks=("superclass",), kfold=K), workers=2)
        expert = random_expert(work / "expert")
        folds = [run_fold(args, data, expert, int(f), work) for f in args.folds.split(",")]
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "configuration": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "expert": "in-house light SimpleNet (width 0.5, 64-d), RANDOM weights; contract 100 Hz, 1000 samples",
        "folds": folds,
        "targets": targets(folds),
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2, default=str))
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
