"""``enecg evaluate`` (clinical evaluation + HTML report) and ``enecg predict`` (per-record predictions, explained).

enecg evaluate MODEL --data DIR [--split test] [--out DIR] [--operating-point max_f1|sensitivity:0.9]
               [--bootstrap N] [--cross-data DIR [--cross-data DIR ...] --label-map ptbxl-cinc] [--json]
enecg predict RECORD.hea [RECORD ...] --model MODEL [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from enecg.evaluation.cross_dataset import LABEL_MAPS
from enecg.evaluation.metrics import OperatingPoint


def parse_operating_point(text: str) -> OperatingPoint:
    """``max_f1`` or ``sensitivity:<target in (0, 1]>``."""
    method, _, value = text.partition(":")
    if method == "max_f1" and not value:
        return OperatingPoint("max_f1")
    if method == "sensitivity" and value:
        try:
            target = float(value)
        except ValueError:
            target = float("nan")
        if 0.0 < target <= 1.0:
            return OperatingPoint("sensitivity", target)
    raise argparse.ArgumentTypeError(
        f"operating point {text!r}: expected 'max_f1' or 'sensitivity:T' with 0 < T <= 1 (e.g. sensitivity:0.9)"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="Revision (branch, tag, commit) of a Hub model.")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="Hugging Face Hub cache holding the model's experts (default: HF_HUB_CACHE / ~/.cache/huggingface).",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="Load the model and its experts from the cache only, never contacting the Hub (like HF_HUB_OFFLINE=1).",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Records per forward pass (default 32).")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)."
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="Evaluate a trained ensemble on a prepared dataset; write report.json + report.html.",
        description=(
            "Per task and label: AUROC, AUPRC, F1, sensitivity, specificity, PPV, NPV at an operating point chosen "
            "on the validation split, with patient-level bootstrap 95%% CIs; macro/micro aggregates; MAE/RMSE/R² "
            "for regression; calibration (ECE, temperature fitted on validation). Each expert alone and a uniform "
            "average of the experts are evaluated the same way. The report has ROC/PR and calibration curves, the "
            "gate's weights and 12-lead renderings of example records."
        ),
    )
    evaluate.add_argument("model", metavar="MODEL", help="Saved ensemble folder or Hub ID (ORG/NAME).")
    evaluate.add_argument("--data", required=True, help="Prepared dataset folder (`enecg data prepare`).")
    evaluate.add_argument("--split", default="test", help="Part to evaluate (default test).")
    evaluate.add_argument(
        "--val-split",
        default="validation",
        help="Part where thresholds and the temperature are fitted (default validation; 'none': 0.5 thresholds).",
    )
    evaluate.add_argument("--out", default=None, help="Report folder (default ./evaluation-<split>).")
    evaluate.add_argument(
        "--operating-point",
        type=parse_operating_point,
        default=OperatingPoint(),
        metavar="max_f1|sensitivity:T",
        help="How thresholds are chosen on validation: max F1 (default), or the highest threshold reaching "
        "sensitivity T.",
    )
    evaluate.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="Patient-level bootstrap resamples for the CIs (default 1000; 0: none).",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="Bootstrap seed (default 0).")
    evaluate.add_argument(
        "--examples",
        type=int,
        default=4,
        metavar="N",
        help="Test records rendered as 12-lead ECGs with their predictions (default 4).",
    )
    evaluate.add_argument(
        "--cross-data",
        action="append",
        default=[],
        metavar="DIR",
        help="Another prepared dataset to evaluate on through --label-map (repeatable).",
    )
    evaluate.add_argument(
        "--label-map",
        choices=LABEL_MAPS,
        default="ptbxl-cinc",
        help="How labels of the two sources correspond (default ptbxl-cinc: PTB-XL SCP "
        "statements <-> SNOMED CT; identity: same label names).",
    )
    evaluate.add_argument(
        "--cross-split",
        default=None,
        help="Part of the --cross-data datasets to use, or 'all' (default: all their records).",
    )
    evaluate.add_argument("--title", default=None, help="Report title.")
    evaluate.add_argument(
        "--train-split",
        action="append",
        default=None,
        metavar="PART",
        help="Part(s) the model was trained on, where the linear-probe and stacker baselines are fitted "
        "(repeatable; default train; 'none': leave those baselines out).",
    )
    evaluate.add_argument(
        "--feature-cache",
        default=None,
        metavar="DIR",
        help="Feature cache of the experts' embeddings (e.g. the training run's) for the probe baselines.",
    )
    evaluate.add_argument(
        "--json", action="store_true", help="Print the evaluation JSON instead of a summary."
    )
    _add_model_options(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    predict = subparsers.add_parser(
        "predict",
        help="Predict every task for ECG records, with each expert's prediction and the gate's weights.",
        description="Read WFDB/CinC records (.hea + .dat/.mat) or SPH .h5 records and print the ensemble's "
        "predictions, explained; a record that cannot be read or predicted gets one error line, the others are "
        "still predicted (exit status 2 when any failed).",
    )
    predict.add_argument(
        "records", nargs="+", metavar="RECORD", help="Record header (.hea) or path without suffix."
    )
    predict.add_argument("--model", required=True, help="Saved ensemble folder or Hub ID (ORG/NAME).")
    predict.add_argument(
        "--json",
        action="store_true",
        help="Print a JSON list: per record its real leads, what each expert saw, and per task the prediction, "
        "each expert's and the gate weights.",
    )
    predict.add_argument(
        "--lead-alias",
        action="append",
        default=None,
        metavar="FROM=TO",
        help="Let a record lead serve as another, e.g. MLII=II for a Holter's modified lead II (repeatable; "
        "off by default: MLII is not lead II).",
    )
    predict.add_argument(
        "--anomaly-model",
        metavar="MODEL",
        help="A generative model (enecg generate train; folder or Hub ID): add each record's anomaly score, its "
        "reconstruction error (diffusion: denoising error; beat: minus the log-likelihood under the normal "
        "records' PCA; higher = less like the normal ECGs the model learned).",
    )
    _add_model_options(predict)
    predict.set_defaults(func=run_predict)


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    from enecg.ensemble.serialization import load_pretrained

    ensemble = load_pretrained(
        args.model,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=True if args.offline else None,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ensemble.to(device)


def run_evaluate(args: argparse.Namespace) -> int:
    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.evaluation.report import headline
    from enecg.evaluation.runner import evaluate_ensemble

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    out = Path(args.out or f"evaluation-{args.split}")
    ensemble = _load_model(args)
    evaluation = evaluate_ensemble(
        ensemble,
        args.data,
        split=args.split,
        val_split=None if args.val_split.lower() == "none" else args.val_split,
        operating_point=args.operating_point,
        bootstrap=BootstrapConfig(n_resamples=args.bootstrap, seed=args.seed),
        n_examples=args.examples,
        out_dir=out,
        batch_size=args.batch_size,
        cross_data=args.cross_data,
        label_map=args.label_map,
        cross_split=args.cross_split,
        title=args.title,
        train_splits=_train_splits(args.train_split),
        feature_cache=args.feature_cache,
    )
    if args.json:
        json.dump(evaluation, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    print(
        f"{evaluation['dataset']} / {evaluation['split']}: {evaluation['n_records']} records, "
        f"{evaluation['n_patients']} patients"
    )
    for line in comparison_lines(evaluation):
        print(line)
    for source, per_task in evaluation["cross_dataset"].items():
        for task, result in per_task.items():
            metric, value, ci = headline(result)
            print(f"  {source} / {task}: {metric} {_number(value)}{_interval(ci)}")
    print(f"report: {out / 'report.html'} (data: {out / 'report.json'})")
    return 0


def _train_splits(values: list[str] | None) -> list[str] | None:
    if not values:
        return ["train"]
    return None if [v.lower() for v in values] == ["none"] else values


def comparison_lines(evaluation: dict[str, Any]) -> list[str]:
    """Per task: the ensemble against its baselines, and its paired difference to each (the lines `enecg
    evaluate` and the quickstart print)."""
    from enecg.evaluation.report import headline

    lines = []
    chosen = (evaluation.get("baseline_details") or {}).get("best_single_expert") or {}
    for task, result in evaluation["tasks"].items():
        metric, value, ci = headline(result)
        lines.append(f"  {task}: {metric} ensemble {_number(value)}{_interval(ci)}")
        for name, per_task in (evaluation.get("baselines") or {}).items():
            if task not in per_task:
                continue
            label = f"{name} ({chosen[task]})" if task in chosen and name.startswith("best single") else name
            line = f"    {label:<40} {_number(headline(per_task[task])[1])}"
            paired = (evaluation.get("paired") or {}).get(task, {}).get(name)
            if paired:
                verdict = {"a": "ensemble better", "b": "baseline better"}.get(paired["better"], "no clear difference")
                line += f"   ensemble - this {paired['difference']:+.3f}{_interval(paired['ci'])} ({verdict})"
            lines.append(line)
    return lines


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None or ci[0] != ci[0] or ci[1] != ci[1]:  # None or NaN
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _predict_each(
    ensemble: Any, paths: list[str], batch_size: int, lead_aliases: dict[str, str] | None = None
) -> list[tuple[str, Any, str | None]]:
    """``(path, prediction or None, error line or None)`` per record, in order: a bad record costs only itself.

    Records are read one by one (a :class:`~enecg.record.RecordError` is that record's error) and predicted in
    batches; when a batch refuses a record (``ValueError``), the records are predicted one at a time so that
    only the refused ones fail.
    """
    from enecg.ensemble.prediction import predict_records
    from enecg.io import read_record
    from enecg.record import RecordError

    outcome: dict[int, tuple[Any, str | None]] = {}
    loaded: list[tuple[int, Any]] = []
    for i, path in enumerate(paths):
        try:
            record = read_record(path)
            loaded.append((i, record.with_lead_aliases(lead_aliases) if lead_aliases else record))
        except RecordError as exc:
            outcome[i] = (None, str(exc))
    try:
        predictions = predict_records(ensemble, [r for _, r in loaded], batch_size=batch_size) if loaded else []
        outcome.update({i: (p, None) for (i, _), p in zip(loaded, predictions)})
    except ValueError:
        for i, record in loaded:
            try:
                outcome[i] = (predict_records(ensemble, [record], batch_size=1)[0], None)
            except ValueError as exc:
                text = str(exc).replace("\n", " ")
                outcome[i] = (None, text if isinstance(exc, RecordError) else f"{paths[i]}: {text}")
    return [(path, *outcome[i]) for i, path in enumerate(paths)]


def run_predict(args: argparse.Namespace) -> int:
    """Predict each record; a record that cannot be read or predicted gets one error line (stderr) and the others
    are still predicted and printed. Exit status 2 when any record failed."""
    from enecg.leads import parse_lead_aliases

    try:
        aliases = parse_lead_aliases(args.lead_alias)
    except ValueError as exc:
        print(f"enecg: error: {exc}", file=sys.stderr)
        return 2
    ensemble = _load_model(args)
    outcomes = _predict_each(ensemble, list(args.records), args.batch_size, aliases)
    anomaly = anomaly_scores(args.anomaly_model, outcomes, aliases) if args.anomaly_model else {}
    failed = [(path, error) for path, _, error in outcomes if error is not None]
    for _, error in failed:
        print(f"enecg: error: {error}", file=sys.stderr)
    if failed:
        print(
            f"enecg: {len(failed)} of {len(outcomes)} records failed; the others were predicted", file=sys.stderr
        )
    if args.json:
        json.dump(
            [
                (result.to_dict() | ({"anomaly_score": anomaly[path]} if path in anomaly else {}))
                if error is None
                else {"path": str(path), "error": error}
                for path, result, error in outcomes
            ],
            sys.stdout,
            indent=2,
        )
        print()
        return 2 if failed else 0
    for path, result, error in outcomes:
        if error is not None:
            print(f"{path}: ERROR {error}")
            continue
        print(f"{result.record_id} ({path}): leads {', '.join(result.leads)}")
        if path in anomaly:
            print(f"  anomaly score: {anomaly[path]:.4f}")
        for expert, seen in result.inputs.items():
            if seen.refused:
                print(f"  {expert}: not used, cannot read this record ({seen.refused})")
            elif seen.zero_filled_leads:
                print(f"  {expert}: zero-filled missing leads {', '.join(seen.zero_filled_leads)}")
        for name, task in result.tasks.items():
            print(
                f"  {name}: {_describe_value(task.prediction)}"
                + (
                    f"  -> positive: {', '.join(task.positive_labels) or 'none'}"
                    if task.positive_labels is not None
                    else ""
                )
                + (f"  -> {task.predicted_label}" if task.predicted_label else "")
            )
            for expert, weight in task.gate_weights.items():
                seen = result.inputs.get(expert)
                value = (
                    "not used (cannot read this record)"
                    if seen is not None and seen.refused
                    else _describe_value(task.experts.get(expert))
                )
                print(f"    {expert} (gate {weight:.2f}): {value}")
    return 2 if failed else 0


def anomaly_scores(
    model_source: str, outcomes: list[tuple[str, Any, str | None]], lead_aliases: dict[str, str] | None = None
) -> dict[str, float]:
    """Path -> anomaly score (:func:`enecg.generative.anomaly.score_anomaly`) of every predicted record."""
    from enecg.generative.base import load_generative
    from enecg.io import read_record

    paths = [path for path, _, error in outcomes if error is None]
    records = [read_record(path) for path in paths]
    if lead_aliases:
        records = [record.with_lead_aliases(lead_aliases) for record in records]
    scores = load_generative(model_source).anomaly_scores(records) if records else []
    return {path: float(score) for path, score in zip(paths, scores)}


def _describe_value(value: Any, top: int = 4) -> str:
    """The most probable labels of a prediction (or the regression value)."""
    if value is None:
        return "not run (sparse routing)"
    if isinstance(value, dict):
        ranked = sorted(value.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{label} {p:.2f}" for label, p in ranked)
    return f"{value:.2f}"
