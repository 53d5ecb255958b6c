"""Generative ECG benchmark on the PTB-XL sample (issue 13 targets), one JSON: ``bench/results/generative.json``
(``--kind beat``: the beat-template model, ``bench/results/generative_beat.json``).

Per evaluated fold group (PTB-XL-500 at 100 Hz, ``kfold=5`` groups of ``strat_fold``; the test fold is never
read by training or sampling):

1. train a label-conditional diffusion model (:mod:`enecg.generative`; ``--kind beat``: fit the beat-template
   model, :mod:`enecg.generative.beat`) on the other four fold groups, conditioned on the diagnostic superclasses
   and age/sex;
2. ``evaluate_samples``: Fréchet distance of a frozen expert's embeddings, synthetic vs real test, and the
   real-vs-real floor; heart rate and QRS width (xqrs R peaks) and spectra; TSTR vs TRTR macro AUROC of
   logistic probes on the embeddings; the rare label(s) (``--augment``, default HYP) refitted with synthetic
   records added;
3. ``evaluate_anomaly``: the model's anomaly score (diffusion: denoising error; beat: minus the log-likelihood
   under the NORM records' probabilistic PCA) as NORM vs abnormal AUROC on the test fold.

Targets checked (``targets`` in the JSON, each with ``met``): TSTR >= 0.9 x TRTR; anomaly AUROC >= 0.75;
Fréchet ratio <= 2; the augmented label's AUROC gain, pooled over the fold groups, with a paired patient-level
bootstrap CI above 0. Model options (``--prediction-type``, ``--beta-schedule``, ``--ema-decay``,
``--guidance-scale``, ``--anomaly-*``) make the ablations in bench/README.md one flag each.

The expert is an in-house light SimpleNet with **random weights** (no pretrained ECG foundation model is
available offline here): its embeddings are generic random convolutional features, stated in the JSON.

Usage (repository root)::

    python bench/bench_generative.py --folds 0,1,2,3,4  # the reported CPU run: ~15 min on one core
    python bench/bench_generative.py --folds 0,1,2,3,4 --steps 5000 --length 1000   # GPU-sized
    python bench/bench_generative.py --quick            # pipeline check only
    python bench/bench_generative.py --kind beat --folds 0,1,2,3,4 --augment HYP,CD,MI,STTC   # beat model
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
from enecg.generative.base import load_generative  # noqa: E402
from enecg.generative.beat import BeatConfig, train_beat  # noqa: E402
from enecg.generative.evaluate import (  # noqa: E402
    SampleEvaluationConfig,
    augmentation_gain,
    evaluate_samples,
)
from enecg.utils.files import write_text_atomic  # noqa: E402

K = 5
# Noise-level sets of the anomaly-score variants recorded beside the reported score.
ANOMALY_LEVELS = ((0.1, 0.2, 0.3), (0.02, 0.05, 0.1), (0.05, 0.1, 0.2, 0.3, 0.4, 0.5))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kind", default="diffusion", choices=("diffusion", "beat"), help="Generative model kind to benchmark."
    )
    parser.add_argument("--components", type=int, default=24, help="beat: PCA dimensions of the median beats.")
    parser.add_argument(
        "--mixture-components", type=int, default=8, help="beat: Gaussian-mixture components of the residual."
    )
    parser.add_argument("--anomaly-components", type=int, default=32, help="beat: PCA dimensions (NORM).")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "ptbxl500")
    parser.add_argument("--folds", default="4", help="Test fold groups (0-4), comma-separated.")
    parser.add_argument("--steps", type=int, default=1000, help="Training steps per model.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--length", type=int, default=512, help="Samples per record at 100 Hz.")
    parser.add_argument("--channels", default="32,64,128", help="UNet block_out_channels.")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps.")
    parser.add_argument(
        "--prediction-type", default="v_prediction", help="Network target: epsilon or v_prediction."
    )
    parser.add_argument("--beta-schedule", default="linear", help="linear or squaredcos_cap_v2.")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0: none).")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="Classifier-free guidance.")
    parser.add_argument(
        "--extra-guidance",
        default="",
        help="Further guidance scales evaluated on the same model (comma list; ablation only).",
    )
    parser.add_argument(
        "--anomaly-levels", default="0.1,0.2,0.3", help="Noise levels of the reported anomaly score."
    )
    parser.add_argument(
        "--anomaly-contrast",
        action="store_true",
        help="Reported anomaly score: NORM-conditioned minus unconditioned error.",
    )
    parser.add_argument(
        "--n-synthetic",
        type=int,
        default=120,
        help="Synthetic records for FD / TSTR (0: as many as labelled real training records).",
    )
    parser.add_argument(
        "--augment", default="HYP", help="Rare labels for the augmentation probe (comma list)."
    )
    parser.add_argument("--augment-n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: pipeline and JSON check only.")
    parser.add_argument(
        "--work", type=Path, help="Keep models and evaluations in this folder (default: a temporary one)."
    )
    parser.add_argument(
        "--out", type=Path, help="Result JSON (default bench/results/generative.json, generative_beat.json for beat)."
    )
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


def fit_beat(args: argparse.Namespace, data: Path, train_parts: tuple[str, ...], folder: Path) -> dict[str, Any]:
    """Fit the beat-template model; its training summary."""
    train_beat(
        BeatConfig(
            data=str(data),
            task="superclass",
            output_dir=str(folder),
            parts=train_parts,
            components=args.components,
            mixture_components=args.mixture_components,
            anomaly_components=args.anomaly_components,
            overwrite=True,
        )
    )
    metrics = json.loads((folder / "metrics.json").read_text())
    keep = ("records", "records_used", "skipped_no_beats", "anomaly_records", "pca_explained_variance_ratio")
    return {k: metrics[k] for k in keep}


def run_fold(args: argparse.Namespace, data: Path, expert: Path, fold: int, work: Path) -> dict[str, Any]:
    if args.kind == "beat":
        return run_beat_fold(args, data, expert, fold, work)
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
        prediction_type=args.prediction_type,
        beta_schedule=args.beta_schedule,
        ema_decay=args.ema_decay,
        log_every=max(1, args.steps // 10),
        overwrite=True,
    )
    folder = train_diffusion(config)
    train_s = time.time() - started
    metrics = json.loads((folder / "metrics.json").read_text())

    def evaluate(guidance: float) -> dict[str, Any]:
        return evaluate_samples(
            SampleEvaluationConfig(
                model=str(folder),
                data=str(data),
                expert=str(expert),
                out=str(work / f"eval_{fold}_g{guidance:g}"),
                train_parts=train_parts,
                test_part=test,
                n_synthetic=args.n_synthetic or None,
                augment_labels=tuple(x for x in args.augment.split(",") if x),
                augment_n=args.augment_n,
                guidance_scale=guidance,
            )
        )

    evaluation = evaluate(args.guidance_scale)
    extra_guidance = {
        f"{g:g}": {k: v for k, v in evaluate(g).items() if k in ("summary", "augmentation")}
        for g in _floats(args.extra_guidance)
    }
    model = load_diffusion(folder)

    def anomaly_auroc(levels: tuple[float, ...], contrast: bool, resamples: int) -> dict[str, Any]:
        return evaluate_anomaly(
            model,
            data,
            part=test,
            bootstrap=BootstrapConfig(n_resamples=resamples),
            noise_levels=levels,
            contrast=contrast,
        )

    anomaly = anomaly_auroc(tuple(_floats(args.anomaly_levels)), args.anomaly_contrast, 200)
    # Other anomaly scores of the same model (cheap: no sampling), for choosing the score; AUROC only.
    anomaly_variants = {
        f"levels={','.join(f'{x:g}' for x in levels)} contrast={contrast}": anomaly_auroc(
            levels, contrast, 0
        )["auroc"]
        for levels in ANOMALY_LEVELS
        for contrast in (False, True)
    }
    return {
        "test_part": test,
        "train_parts": list(train_parts),
        "training": {k: metrics[k] for k in ("steps", "records", "parameters", "first_loss", "final_loss")}
        | {"loss_curve": metrics["loss_curve"], "seconds": round(train_s, 1)},
        "samples": {
            k: evaluation[k]
            for k in ("summary", "sizes", "heart_rate", "qrs_width_ms", "tstr", "trtr", "augmentation")
        },
        "spectra_mean_abs_log10_difference": evaluation["spectra_mean_abs_log10_difference"],
        "anomaly": anomaly,
        "anomaly_variants": anomaly_variants,
        "extra_guidance": extra_guidance,
        "seconds": round(time.time() - started, 1),
    }


def run_beat_fold(args: argparse.Namespace, data: Path, expert: Path, fold: int, work: Path) -> dict[str, Any]:
    """One fold group with the beat-template model (same measures as the diffusion path)."""
    test = f"fold_{fold}"
    train_parts = tuple(f"fold_{k}" for k in range(K) if k != fold)
    started = time.time()
    folder = work / f"beat_{fold}"
    training = fit_beat(args, data, train_parts, folder) | {"seconds": round(time.time() - started, 1)}
    evaluation = evaluate_samples(
        SampleEvaluationConfig(
            model=str(folder),
            data=str(data),
            expert=str(expert),
            out=str(work / f"eval_beat_{fold}"),
            train_parts=train_parts,
            test_part=test,
            n_synthetic=args.n_synthetic or None,
            augment_labels=tuple(x for x in args.augment.split(",") if x),
            augment_n=args.augment_n,
            guidance_scale=args.guidance_scale,
        )
    )
    anomaly = evaluate_anomaly(
        load_generative(folder), data, part=test, bootstrap=BootstrapConfig(n_resamples=200)
    )
    return {
        "test_part": test,
        "train_parts": list(train_parts),
        "training": training,
        "samples": {
            k: evaluation[k]
            for k in ("summary", "sizes", "heart_rate", "qrs_width_ms", "tstr", "trtr", "augmentation")
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
    # The gain of each augmented label, pooled over the fold groups with a paired patient-level bootstrap CI.
    labels = sorted({label for f in folds for label in f["samples"]["augmentation"]})
    gains = {
        label: augmentation_gain(
            [f["samples"]["augmentation"][label]["paired_scores"] for f in folds],
            BootstrapConfig(n_resamples=1000),
        )
        for label in labels
    }
    return {
        "tstr_over_trtr": {"value": ratio, "target": ">= 0.9", "met": ratio >= 0.9},
        "anomaly_auroc": {"value": anomaly, "target": ">= 0.75", "met": anomaly >= 0.75},
        "frechet_ratio": {"value": frechet, "target": "<= 2", "met": frechet <= 2.0},
        "augmentation_gain_auroc": {
            label: {
                "value": gain["gain"],
                "ci95": gain["ci"],
                "per_fold_group": gain["per_evaluation"],
                "test_records": gain["records"],
                "test_positives": gain["positives"],
                "target": "> 0 with the paired 95% CI above 0",
                "met": gain["ci"][0] > 0,
            }
            for label, gain in gains.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        name = "generative_beat.json" if args.kind == "beat" else "generative.json"
        args.out = REPO / "bench" / "results" / name
    if args.quick:
        args.steps, args.length, args.channels, args.n_synthetic, args.augment_n = 3, 128, "8,16", 16, 4
        args.sample_steps = 2
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="enecg-bench-gen-") as tmp:
        work = args.work or Path(tmp)
        data = work / "ptbxl500-100hz-k5"
        prepare_ptbxl(
            args.data_dir, data, PtbxlOptions(rate=100, tasks=("superclass",), kfold=K), workers=args.threads
        )
        expert = random_expert(work / "expert")
        folds = [run_fold(args, data, expert, int(f), work) for f in args.folds.split(",")]
    goals = targets(folds)
    for fold in folds:  # the per-record probe scores served the pooled CI; the JSON keeps the figures only
        for entry in fold["samples"]["augmentation"].values():
            entry.pop("paired_scores", None)
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "configuration": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "expert": "in-house light SimpleNet (width 0.5, 64-d), RANDOM weights; contract 100 Hz, 1000 samples",
        "folds": folds,
        "targets": goals,
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2, default=str))
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
