"""A compact summary of an evaluation (:func:`enecg.evaluation.runner.evaluate_ensemble`): per task, the
ensemble's headline metric with its CI against a constant predictor
(:func:`enecg.evaluation.baselines.constant_predictor_headlines`) and against each of its baselines (the uniform
average, the best single expert chosen on validation, the stacker) with the paired difference and its CI, as
plain data (:func:`compare_with_constant`) and as the text lines a command prints (:func:`comparison_lines`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from enecg.evaluation.report import headline

_VERDICTS = {True: "ensemble better", False: "baseline better", None: "no clear difference"}


def compare_with_constant(evaluation: Mapping[str, Any], constant: Mapping[str, Any]) -> dict[str, Any]:
    """Per task: the ensemble's headline metric with its CI, the constant predictor's and whether it is better
    (higher AUROC, lower MAE; None where a metric is undefined), and the ensemble against its baselines: the
    uniform average, the best single expert chosen on validation and the stacker, each with the paired difference
    and its CI."""
    chosen = (evaluation.get("baseline_details") or {}).get("best_single_expert") or {}
    out = {}
    for name, result in evaluation["tasks"].items():
        metric, value, ci = headline(result)
        base = constant.get(name, {}).get("value")
        beats = None
        if value is not None and base is not None:
            beats = bool(value < base) if metric == "MAE" else bool(value > base)
        baselines = {}
        for baseline, paired in (evaluation.get("paired") or {}).get(name, {}).items():
            baselines[baseline] = {
                "value": paired["b"],
                "difference": paired["difference"],
                "difference_ci": paired["ci"],
                "ensemble_better": {"a": True, "b": False}.get(paired["better"]),
            }
            if baseline.startswith("best single") and name in chosen:
                baselines[baseline]["expert"] = chosen[name]
        out[name] = {
            "metric": metric,
            "value": value,
            "ci": list(ci) if ci else None,
            "constant": base,
            "beats_constant": beats,
            "baselines": baselines,
        }
    return out


def comparison_lines(rows: Mapping[str, Any]) -> list[str]:
    """The rows of :func:`compare_with_constant` as text: one line per task (ensemble, CI, constant, verdict),
    then one per baseline (its value and the paired difference ensemble - baseline with its CI)."""
    lines = []
    for task, row in rows.items():
        ci = row.get("ci")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
        verdict = {True: "better", False: "NOT better", None: "n/a"}[row["beats_constant"]]
        lines.append(
            f"    {task:<12} {row['metric']} ensemble {_number(row['value'])}{interval}  constant "
            f"{_number(row['constant'])} -> {verdict}"
        )
        for name, base in row.get("baselines", {}).items():
            label = f"{name} ({base['expert']})" if base.get("expert") else name
            d, dci = base["difference"], base.get("difference_ci") or [None, None]
            paired = f"{d:+.3f}" + (f" [{dci[0]:+.3f}, {dci[1]:+.3f}]" if None not in dci else "")
            mark = _VERDICTS[base["ensemble_better"]]
            lines.append(f"      vs {label:<44} {_number(base['value'])}   ensemble - this {paired} ({mark})")
    return lines


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


__all__ = ["compare_with_constant", "comparison_lines"]
