"""Evaluation report: ``report.json`` (machine-readable) and ``report.html`` (a self-contained page + PNG figures).

The evaluation dictionary rendered here has this shape (every key but ``tasks`` optional)::

    {
      "title": str, "dataset": str, "split": str, "n_records": int, "enecg_version": str,
      "tasks": {task: <enecg.evaluation.task_eval.evaluate_task result>},
      "experts": {expert: {task: <evaluate_task result>}},        # each expert alone
      "baselines": {name: {task: <evaluate_task result>}},        # uniform average, best single, probes, stacker
      "paired": {task: {baseline: {metric, difference, ci, better, ...}}},  # ensemble minus baseline, paired CI
      "baseline_details": {"best_single_expert": {task: expert}, "fitted": {...}},
      "cross_dataset": {name: {task: <evaluate_task result>}},    # same model on another source
      "gate": {"mean_weights": {task: {expert: float}}},
      "lead_coverage": {"lead_sets": {"I, II, ...": n_records}, "unreadable_records": {expert: n}},
      "examples": [{"record_id": str, "leads": [str], "image": relpath, "labels": {task: ...},
                    "predictions": {task: {label: float}}, "gate": {task: {expert: float}},
                    "expert_predictions": {task: {expert: {label: float}}}}],
      "figures": [{"path": relpath, "caption": str, "section": str}],
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jinja2

from enecg.utils.files import write_text_atomic

CAVEAT = (
    "Research software. Predictions are not a diagnosis and have not been validated for clinical use; results on "
    "small samples have wide confidence intervals. A clinician must review every ECG."
)


def headline(result: dict[str, Any]) -> tuple[str, float | None, list[float | None] | None]:
    """The one number summarising a task result: macro AUROC (classification) or MAE (regression), with CI."""
    metrics, ci = result.get("metrics", {}), result.get("ci") or {}
    kind = result.get("evaluated_as", result.get("type"))
    if kind == "regression":
        return "MAE", metrics.get("mae"), ci.get("mae") if isinstance(ci, dict) else None
    if kind == "multiclass":
        return "macro AUROC", metrics.get("macro_auroc"), ci.get("macro_auroc") if isinstance(ci, dict) else None
    return "macro AUROC", metrics.get("macro", {}).get("auroc"), ci.get("macro_auroc") if isinstance(ci, dict) \
        else None


def format_number(value: Any, digits: int = 3) -> str:
    """A metric for a table: fixed decimals for floats, a dash for missing values."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ ev.title or "enecg evaluation" }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
 table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
 th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 figure { display: inline-block; margin: 0.5em; vertical-align: top; }
 figure img { max-width: 560px; border: 1px solid #eee; }
 .ecg img { max-width: 1100px; }
 .caveat { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.6em 1em; }
</style></head>
<body>
<h1>{{ ev.title or "enecg evaluation" }}</h1>
<p>Dataset <b>{{ ev.dataset or "?" }}</b>, split <b>{{ ev.split or "?" }}</b>, {{ ev.n_records or "?" }} records.
 enecg {{ ev.enecg_version or "" }}. Thresholds are chosen on the validation split and applied unchanged here;
 intervals are patient-level bootstrap 95% CIs.</p>
<p class="caveat">{{ caveat }}</p>

<h2>Summary</h2>
<table><tr><th>model</th>{% for t in ev.tasks %}<th>{{ t }}</th>{% endfor %}</tr>
{% for row_name, results in summary_rows %}<tr><td>{{ row_name }}</td>
 {% for t in ev.tasks %}{% set h = results.get(t) %}<td>{% if h %}{{ h[0] }} {{ fmt(h[1]) }} <small>{{ fmt_ci(h[2]) }}</small>{% else %}–{% endif %}</td>{% endfor %}
</tr>{% endfor %}</table>

{% if ev.paired %}<h2>Ensemble vs baselines (paired)</h2>
<p>Ensemble minus baseline on the same records; the 95% CI resamples patients once for both models. A difference
 whose CI excludes 0 is marked. MAE: lower is better, so a negative difference favours the ensemble.
 {% if ev.baseline_details and ev.baseline_details.best_single_expert %}Best single expert chosen on validation:
 {% for t, e in ev.baseline_details.best_single_expert.items() %}{{ t }}: {{ e }}{% if not loop.last %}, {% endif %}{% endfor %}.{% endif %}</p>
<table><tr><th>task</th><th>baseline</th><th>metric</th><th>ensemble</th><th>baseline</th><th>difference</th><th>95% CI</th><th>verdict</th></tr>
{% for t, per in ev.paired.items() %}{% for name, d in per.items() %}<tr><td>{{ t }}</td><td>{{ name }}</td><td>{{ d.metric }}</td>
 <td>{{ fmt(d.a) }}</td><td>{{ fmt(d.b) }}</td><td>{{ "%+.3f"|format(d.difference) if d.difference is not none else "–" }}</td>
 <td>{{ fmt_ci(d.ci) }}</td><td>{% if d.better == "a" %}ensemble better{% elif d.better == "b" %}baseline better{% else %}no clear difference{% endif %}</td></tr>{% endfor %}{% endfor %}</table>
{% endif %}

{% for t, res in ev.tasks.items() %}
<h2>Task: {{ t }} <small>({{ res.type }}, n={{ res.n_records }})</small></h2>
{% if res.evaluated_as|default(res.type) in ("multilabel", "binary") %}
<table><tr><th>label</th><th>n</th><th>prevalence</th><th>AUROC</th><th>AUPRC</th><th>threshold</th><th>sensitivity</th>
<th>specificity</th><th>PPV</th><th>NPV</th><th>F1</th></tr>
{% for name, m in res.metrics.per_label.items() %}<tr><td>{{ name }}</td><td>{{ m.n|int }}</td><td>{{ fmt(m.prevalence) }}</td>
 <td>{{ fmt(m.auroc) }} <small>{{ fmt_ci(res.ci.get(name ~ "/auroc")) }}</small></td><td>{{ fmt(m.auprc) }}</td>
 <td>{{ fmt(m.threshold) }}</td><td>{{ fmt(m.sensitivity) }}</td><td>{{ fmt(m.specificity) }}</td><td>{{ fmt(m.ppv) }}</td>
 <td>{{ fmt(m.npv) }}</td><td>{{ fmt(m.f1) }}</td></tr>{% endfor %}
<tr><td><b>macro</b></td><td></td><td></td><td>{{ fmt(res.metrics.macro.auroc) }} <small>{{ fmt_ci(res.ci.get("macro_auroc")) }}</small></td>
 <td>{{ fmt(res.metrics.macro.auprc) }}</td><td></td><td>{{ fmt(res.metrics.macro.sensitivity) }}</td>
 <td>{{ fmt(res.metrics.macro.specificity) }}</td><td>{{ fmt(res.metrics.macro.ppv) }}</td><td>{{ fmt(res.metrics.macro.npv) }}</td>
 <td>{{ fmt(res.metrics.macro.f1) }}</td></tr>
<tr><td><b>micro</b></td><td></td><td></td><td>{{ fmt(res.metrics.micro.get("auroc")) }}</td><td>{{ fmt(res.metrics.micro.get("auprc")) }}</td>
 <td></td><td></td><td></td><td></td><td></td><td>{{ fmt(res.metrics.micro.get("f1")) }}</td></tr></table>
<p>Operating point: {{ res.operating_point.method }}{% if res.operating_point.method == "sensitivity" %} (target {{ res.operating_point.target_sensitivity }}){% endif %}, fitted on {{ res.operating_point.fitted_on }}.
{% if res.calibration %}Calibration: ECE {{ fmt(res.calibration.ece) }}{% if res.calibration.temperature %}, temperature {{ fmt(res.calibration.temperature) }} (fitted on validation) → ECE {{ fmt(res.calibration.ece_after_temperature) }}{% endif %}.{% endif %}</p>
{% elif res.evaluated_as|default(res.type) == "multiclass" %}
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>
{% for k in ("accuracy", "macro_f1", "macro_auroc") %}<tr><td>{{ k }}</td><td>{{ fmt(res.metrics.get(k)) }}</td><td>{{ fmt_ci(res.ci.get(k)) }}</td></tr>{% endfor %}</table>
{% else %}
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>
{% for k in ("mae", "rmse", "r2") %}<tr><td>{{ k }}</td><td>{{ fmt(res.metrics.get(k)) }}</td><td>{{ fmt_ci(res.ci.get(k)) }}</td></tr>{% endfor %}</table>
{% endif %}
{% for f in figures if f.section == t %}<figure><img src="{{ f.path }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
{% endfor %}

{% if ev.gate %}<h2>Gate</h2>
<p>Mean weight of each expert over the records (± its standard deviation across records: how much the gate routes
 record by record rather than weighting the experts the same everywhere).</p>
<table><tr><th>task</th>{% for e in gate_experts %}<th>{{ e }}</th>{% endfor %}</tr>
{% for t, w in ev.gate.mean_weights.items() %}<tr><td>{{ t }}</td>{% for e in gate_experts %}<td>{{ fmt(w.get(e)) }}{% if ev.gate.std_weights %} <small>± {{ fmt(ev.gate.std_weights.get(t, {}).get(e)) }}</small>{% endif %}</td>{% endfor %}</tr>{% endfor %}</table>
{% for f in figures if f.section == "gate" %}<figure><img src="{{ f.path }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
{% endif %}

{% if ev.cross_dataset %}<h2>Cross-dataset validation</h2>
<table><tr><th>evaluated on</th><th>task</th><th>headline</th></tr>
{% for src, tasks in ev.cross_dataset.items() %}{% for t, res in tasks.items() %}{% set h = headline(res) %}
<tr><td>{{ src }}</td><td>{{ t }}</td><td>{{ h[0] }} {{ fmt(h[1]) }} <small>{{ fmt_ci(h[2]) }}</small></td></tr>{% endfor %}{% endfor %}</table>
{% endif %}

{% if ev.lead_coverage %}<h2>Leads</h2>
<p>The leads the test records really had (a lead an expert's contract needs but a record lacks is zero-filled, or
 the expert cannot read the record and has no say in its prediction).</p>
<table><tr><th>real leads</th><th>records</th></tr>
{% for leads, n in ev.lead_coverage.lead_sets.items() %}<tr><td>{{ leads }}</td><td>{{ n }}</td></tr>{% endfor %}</table>
<table><tr><th>expert</th><th>records it could not read</th></tr>
{% for e, n in ev.lead_coverage.unreadable_records.items() %}<tr><td>{{ e }}</td><td>{{ n }}</td></tr>{% endfor %}</table>
{% endif %}

{% if ev.examples %}<h2>Example records</h2>
{% for ex in ev.examples %}<h3>{{ ex.record_id }}{% if ex.leads %} <small>(leads {{ ex.leads|join(", ") }})</small>{% endif %}</h3>
<figure class="ecg"><img src="{{ ex.image }}" alt="12-lead ECG {{ ex.record_id }}"></figure>
<table><tr><th>task</th><th>label</th><th>ensemble</th>{% for e in gate_experts %}<th>{{ e }}</th>{% endfor %}<th>truth</th></tr>
{% for t, preds in ex.predictions.items() %}{% for label, p in preds.items() %}<tr><td>{{ t }}</td><td>{{ label }}</td><td>{{ fmt(p) }}</td>
 {% for e in gate_experts %}<td>{{ fmt(ex.expert_predictions.get(t, {}).get(e, {}).get(label)) }}</td>{% endfor %}
 <td>{{ fmt(ex.labels.get(t, {}).get(label) if ex.labels.get(t) is mapping else ex.labels.get(t)) }}</td></tr>{% endfor %}{% endfor %}
{% if ex.gate %}<tr><td>gate</td><td>weight</td><td></td>{% for e in gate_experts %}<td>{{ fmt(ex.gate.get(ex.gate|first, {}).get(e)) }}</td>{% endfor %}<td></td></tr>{% endif %}
</table>{% endfor %}{% endif %}

{% for f in figures if f.section not in ev.tasks and f.section != "gate" %}<figure><img src="{{ f.path }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
<script>
 // Lets tests (and curious readers) check that every figure really rendered.
 window.addEventListener("load", () => {
   const imgs = Array.from(document.images);
   document.body.dataset.imagesTotal = imgs.length;
   document.body.dataset.imagesRendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
 });
</script>
</body></html>
"""


def render_html(evaluation: dict[str, Any]) -> str:
    """The report page for ``evaluation`` (image paths stay relative to the report folder)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    template = env.from_string(_TEMPLATE)
    summary_rows: list[tuple[str, dict[str, Any]]] = [
        ("ensemble", {t: headline(r) for t, r in evaluation.get("tasks", {}).items()})
    ]
    for group in ("baselines", "experts"):
        for name, tasks in (evaluation.get(group) or {}).items():
            summary_rows.append((name, {t: headline(r) for t, r in tasks.items()}))
    gate_experts: list[str] = []
    for weights in ((evaluation.get("gate") or {}).get("mean_weights") or {}).values():
        gate_experts.extend(e for e in weights if e not in gate_experts)
    if not gate_experts:
        gate_experts = list(evaluation.get("experts") or {})
    return template.render(
        ev=evaluation,
        caveat=CAVEAT,
        summary_rows=summary_rows,
        figures=evaluation.get("figures", []),
        gate_experts=gate_experts,
        fmt=format_number,
        fmt_ci=_fmt_ci,
        headline=headline,
    )


def write_report(evaluation: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (figures must already be there)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    write_text_atomic(json_path, json.dumps(evaluation, indent=2, sort_keys=True, allow_nan=False))
    write_text_atomic(html_path, render_html(evaluation))
    return {"json": json_path, "html": html_path}
