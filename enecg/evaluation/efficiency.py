"""Efficiency of a model for real-time ECG interpretation: measured costs and one Efficiency Score.

The light-CNN paper ("Efficient Neural Architectures for Real-Time ECG Interpretation on Limited Hardware",
arXiv 2605.09848) ranks models by an Efficiency Score combining model size, inference speed, memory and AUROC, but
does not publish the formula. This module measures the four inputs and defines our own score.

**Measurements** (:func:`measure_saved_model`, CPU, ``eval()`` under ``torch.no_grad()``):

- *parameters*: every parameter of the module (for an ensemble: frozen experts, heads, LoRA and gate);
- *latency*: the model's forward on contract-prepared inputs (preparation is not timed), ``warmup`` untimed calls
  then ``repeats`` timed calls, median (and p10/p90) in ms, at batch size 1 (one record: the real-time case) and
  at ``batch_size`` (reported per batch and per record). The torch thread count is set and recorded;
- *peak memory*: the **resident-set high-water mark of a fresh subprocess** (Linux ``VmHWM``): after the imports
  the high-water mark is reset (``/proc/self/clear_refs``, value 5) and the current RSS taken as baseline; the
  model is then loaded and run once at ``batch_size``; ``peak_memory_mb`` = high-water mark - baseline, i.e.
  weights + activations + allocator workspace, without the Python/torch runtime every model shares. Where the
  reset is not available (not Linux) the baseline is ``ru_maxrss`` after imports (recorded as ``method``).

**Efficiency Score** (:func:`efficiency_score`), for AUROC ``a`` and costs ``c_k`` (parameters, latency at batch
size 1, peak memory) against a reference model's costs ``r_k``::

    score = 100 * skill(a) * prod_k (r_k / max(c_k, floor_k)) ** (beta * w_k / sum(w))
    skill(a) = max(a - 0.5, 0) / 0.5                      # discrimination above chance, 0..1

Why this form:

- *Skill above chance, not raw AUROC*: AUROC 0.5 is a coin; a model no better than chance has no value at any
  cost, so its score is 0. Linear in ``a`` above 0.5: each AUROC point counts the same.
- *Ratios to a reference, combined geometrically* (a weighted geometric mean of ``r_k / c_k``): costs span orders
  of magnitude and what matters is relative (2x faster is the same gain at 1 ms as at 10 ms); the product is
  unit-free, so switching ms to s or parameters to millions changes nothing, and a model with exactly the
  reference's costs scores ``100 * skill``.
- *A small cost exponent* ``beta`` (default 0.05): accuracy dominates in a diagnostic task. With 0.05, a model that
  is 10x costlier on all three costs scores the same as the reference only if its skill is ``10 ** 0.05`` = 1.12x
  higher (e.g. AUROC 0.95 instead of 0.90).
- *Floors* (default 1000 parameters, 0.01 ms, 1 MB): measurements below them are noise (timer resolution, memory
  pages), and a cost of 0 would make the score infinite.
- *Monotone by construction*: increasing in ``a`` (strictly above 0.5), decreasing in each cost (strictly above its
  floor), for any positive weights; the reference is fixed per table, so one model's score never depends on the
  other rows (unlike min-max normalisation over the table). Tested property-style in ``tests/test_efficiency.py``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

COST_KEYS = ("params", "latency_ms", "memory_mb")
_RESULT_PREFIX = "ENECG_EFFICIENCY_RESULT "


# ---------------------------------------------------------------------------------------------------- score


@dataclass
class ScoreSettings:
    """How measured costs and AUROC become one Efficiency Score (see the module docstring)."""

    reference: str = field(
        default="AttiaNet",
        metadata={"help": "Row whose measured costs are the reference (its score is 100 * skill)."},
    )
    cost_exponent: float = field(
        default=0.05, metadata={"help": "beta: weight of the geometric cost ratio against AUROC skill."}
    )
    weight_params: float = field(default=1.0, metadata={"help": "Relative weight of the parameter count."})
    weight_latency: float = field(default=1.0, metadata={"help": "Relative weight of latency (batch 1)."})
    weight_memory: float = field(default=1.0, metadata={"help": "Relative weight of peak inference memory."})
    floor_params: float = field(default=1000.0, metadata={"help": "Parameter counts below this count as it."})
    floor_latency_ms: float = field(default=0.01, metadata={"help": "Latencies below this count as it (ms)."})
    floor_memory_mb: float = field(default=1.0, metadata={"help": "Memory below this counts as it (MB)."})

    def __post_init__(self) -> None:
        weights = (self.weight_params, self.weight_latency, self.weight_memory)
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"score weights must be >= 0 with a positive sum, got {weights}")
        if not (math.isfinite(self.cost_exponent) and self.cost_exponent >= 0):
            raise ValueError(f"score cost_exponent must be >= 0, got {self.cost_exponent}")
        if min(self.floor_params, self.floor_latency_ms, self.floor_memory_mb) <= 0:
            raise ValueError("score floors must be > 0")

    def weights(self) -> dict[str, float]:
        total = self.weight_params + self.weight_latency + self.weight_memory
        return {
            "params": self.weight_params / total,
            "latency_ms": self.weight_latency / total,
            "memory_mb": self.weight_memory / total,
        }

    def floors(self) -> dict[str, float]:
        return {
            "params": self.floor_params,
            "latency_ms": self.floor_latency_ms,
            "memory_mb": self.floor_memory_mb,
        }


def auroc_skill(auroc: float) -> float:
    """Discrimination above chance: ``max(auroc - 0.5, 0) / 0.5`` in [0, 1]."""
    if not (isinstance(auroc, (int, float)) and 0.0 <= auroc <= 1.0):
        raise ValueError(f"AUROC must be a number in [0, 1], got {auroc!r}")
    return max(float(auroc) - 0.5, 0.0) / 0.5


def _cost(name: str, value: Any, floor: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return max(float(value), floor)


def efficiency_score(
    auroc: float | None,
    costs: Mapping[str, float],
    reference: Mapping[str, float],
    settings: ScoreSettings | None = None,
) -> float | None:
    """The Efficiency Score of one model; None when its AUROC is undefined (None or NaN).

    Args:
        auroc: test macro AUROC in [0, 1].
        costs: ``params``, ``latency_ms`` (per record at batch size 1) and ``memory_mb`` of the model.
        reference: the same three costs of the reference model.
    """
    settings = settings or ScoreSettings()
    if auroc is None or (isinstance(auroc, float) and math.isnan(auroc)):
        return None
    skill = auroc_skill(auroc)
    floors, weights = settings.floors(), settings.weights()
    log_ratio = 0.0
    for key in COST_KEYS:
        if key not in costs or key not in reference:
            raise ValueError(f"costs and reference need {list(COST_KEYS)}; missing {key!r}")
        own = _cost(key, costs[key], floors[key])
        ref = _cost(f"reference {key}", reference[key], floors[key])
        log_ratio += weights[key] * (math.log(ref) - math.log(own))
    return 100.0 * skill * math.exp(settings.cost_exponent * log_ratio)


# --------------------------------------------------------------------------------------------- measurement


@dataclass
class MeasurementSettings:
    """How latency and memory are measured (CPU)."""

    threads: int = field(default=1, metadata={"help": "torch threads during measurement (recorded)."})
    batch_size: int = field(
        default=32, metadata={"help": "Batch size of the per-batch latency and of memory."}
    )
    warmup: int = field(default=5, metadata={"help": "Untimed calls before timing (each batch size)."})
    repeats: int = field(default=30, metadata={"help": "Timed calls (each batch size); the median is used."})
    timeout_s: float = field(default=600.0, metadata={"help": "Limit for one measurement subprocess."})

    def __post_init__(self) -> None:
        for name in ("threads", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"measurement.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError("measurement.warmup must be >= 0")


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def time_calls(call: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median / p10 / p90 wall time of ``call()`` in ms after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    values = np.asarray(times)
    return {
        "median_ms": float(np.median(values)),
        "p10_ms": float(np.quantile(values, 0.1)),
        "p90_ms": float(np.quantile(values, 0.9)),
        "repeats": repeats,
    }


def synthetic_records(n: int, *, fs: float = 500.0, seconds: float = 10.0, seed: int = 0) -> list[Any]:
    """``n`` random 12-lead records (values do not change a CNN's speed); each model's contract prepares them."""
    from enecg.leads import STANDARD_12_LEADS
    from enecg.record import ECGRecord

    rng = np.random.default_rng(seed)
    length = round(fs * seconds)
    return [
        ECGRecord(
            signal=(0.1 * rng.standard_normal((12, length))).astype(np.float32),
            fs=fs,
            leads=tuple(STANDARD_12_LEADS),
            record_id=f"synthetic:{i}",
            patient_id=f"synthetic:{i}",
            metadata={"age": 60.0, "sex": float(i % 2)},
        )
        for i in range(n)
    ]


@dataclass
class MeasuredModel:
    """How to load a saved model, prepare its inputs and run its forward (see :func:`measured_model`)."""

    load: Callable[[], torch.nn.Module]
    make_inputs: Callable[[torch.nn.Module, int], Any]
    forward: Callable[[torch.nn.Module, Any], Any]


def measured_model(kind: str, folder: str | os.PathLike) -> MeasuredModel:
    """Loading, input preparation and forward of a saved model.

    ``kind`` is ``light`` (an in-house light expert folder: its standalone classifier forward on contract-prepared
    windows, with age/sex when the model fuses them) or ``ensemble`` (an ensemble ``save_pretrained`` folder: its
    full forward, experts + heads + gate, on inputs prepared for every expert and the gate). Inputs are
    :func:`synthetic_records` prepared with the model's contracts; preparation is never timed.
    """
    if kind == "light":
        from enecg.contract import InputContract, apply_contract_records
        from enecg.experts.inhouse import load_inhouse_expert_module, read_inhouse_spec
        from enecg.record import demographics_array

        contract = InputContract.from_dict(read_inhouse_spec(folder)["contract"])

        def load_light() -> torch.nn.Module:
            return load_inhouse_expert_module(folder)[0].eval()

        def light_inputs(model: torch.nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            records = synthetic_records(batch_size)
            windows = torch.from_numpy(apply_contract_records(records, contract).windows[:, 0])
            uses = bool(getattr(getattr(model, "config", None), "use_demographics", False))
            return windows, torch.from_numpy(demographics_array(records)) if uses else None

        def light_forward(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor | None]) -> Any:
            windows, demographics = inputs
            return model(windows) if demographics is None else model(windows, demographics)

        return MeasuredModel(load_light, light_inputs, light_forward)
    if kind == "ensemble":
        from enecg.ensemble.inference import run_batch
        from enecg.ensemble.inputs import EnsembleInputBuilder
        from enecg.ensemble.model import Ensemble

        def load_ensemble() -> torch.nn.Module:
            return Ensemble.from_pretrained(folder, local_files_only=True).eval()

        def ensemble_inputs(model: torch.nn.Module, batch_size: int) -> Any:
            return EnsembleInputBuilder.for_ensemble(model)(synthetic_records(batch_size))

        def ensemble_forward(model: torch.nn.Module, batch: Any) -> Any:
            return run_batch(model, batch)

        return MeasuredModel(load_ensemble, ensemble_inputs, ensemble_forward)
    raise ValueError(f"unknown model kind {kind!r} (light | ensemble)")


def measure_latency(
    model: torch.nn.Module,
    forward: Callable[[torch.nn.Module, Any], Any],
    inputs_single: Any,
    inputs_batch: Any,
    settings: MeasurementSettings,
) -> dict[str, Any]:
    """Latency at batch size 1 and ``settings.batch_size`` with ``settings.threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.no_grad():
            single = time_calls(lambda: forward(model, inputs_single), settings.warmup, settings.repeats)
            batched = time_calls(lambda: forward(model, inputs_batch), settings.warmup, settings.repeats)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": settings.threads,
        "latency_ms": single["median_ms"],
        "batch1": single,
        "batch": {**batched, "batch_size": settings.batch_size},
        "latency_ms_per_record_batched": batched["median_ms"] / settings.batch_size,
    }


def _read_status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _read_status_kb("VmHWM") is not None


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS is live memory before the baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_here(kind: str, folder: str, settings: MeasurementSettings) -> dict[str, Any]:
    """In a fresh process: inputs prepared, then the memory high-water of loading the model and one forward at
    ``settings.batch_size`` above the baseline, then latency."""
    torch.set_num_threads(settings.threads)
    # Import everything loading needs (expert families, ensemble) and run tiny convolutions once before the
    # baseline, so the runtime's own memory (libraries, kernel initialisation) is not counted for any model.
    import enecg.contract
    import enecg.ensemble.inputs
    import enecg.ensemble.model
    import enecg.experts.families
    import enecg.experts.inhouse  # noqa: F401

    with torch.no_grad():
        torch.nn.functional.conv1d(torch.zeros(1, 2, 16), torch.zeros(2, 2, 3))
        torch.nn.functional.conv2d(torch.zeros(1, 1, 2, 16), torch.zeros(2, 1, 1, 3))
        torch.nn.functional.linear(torch.zeros(1, 4), torch.zeros(3, 4))
    spec = measured_model(kind, folder)
    # Inputs are data, not model: prepared with a first copy of the model (for its contracts), which is then
    # dropped, so neither preparation nor that copy is counted.
    first = spec.load()
    inputs_single, inputs_batch = spec.make_inputs(first, 1), spec.make_inputs(first, settings.batch_size)
    del first
    _release_free_memory()
    resettable = _reset_high_water()
    if resettable:
        method = "VmHWM after reset (/proc/self/clear_refs) minus VmRSS at reset; inputs prepared before"
        baseline_kb = _read_status_kb("VmRSS") or 0.0
    else:
        method = "ru_maxrss growth after imports and input preparation"
        baseline_kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    model = spec.load()
    with torch.no_grad():
        spec.forward(model, inputs_batch)
    if resettable:
        peak_kb = _read_status_kb("VmHWM") or 0.0
    else:
        peak_kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    memory = {
        "peak_memory_mb": max(peak_kb - baseline_kb, 0.0) / 1024.0,
        "process_peak_rss_mb": peak_kb / 1024.0,
        "baseline_rss_mb": baseline_kb / 1024.0,
        "memory_batch_size": settings.batch_size,
        "memory_method": method,
    }
    latency = measure_latency(model, spec.forward, inputs_single, inputs_batch, settings)
    return {"params": count_parameters(model), **memory, **latency}


def measure_saved_model(
    kind: str, folder: str | os.PathLike, settings: MeasurementSettings | None = None
) -> dict[str, Any]:
    """Parameters, latency and peak memory of a saved model, measured in a fresh Python subprocess.

    A fresh process gives every model the same starting state (no allocator caches or warm pages from models
    measured before it) and a clean RSS high-water mark. Raises ``RuntimeError`` with the child's error line when
    the measurement fails.
    """
    settings = settings or MeasurementSettings()
    command = [
        sys.executable,
        "-m",
        "enecg.evaluation.efficiency",
        kind,
        str(Path(folder).absolute()),
        json.dumps(asdict(settings)),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=settings.timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{folder}: efficiency measurement took longer than {settings.timeout_s} s"
        ) from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{folder}: efficiency measurement failed (exit {done.returncode}): {last}")


def machine_info() -> dict[str, Any]:
    """What the timings depend on."""
    import platform

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------------- report


def plot_auroc_vs_latency(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Scatter of test macro AUROC (with CI bars) against latency per record, marker area ~ parameters."""
    from enecg.evaluation.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7.5, 5))
    largest = max([float(r["params"]) for r in rows] or [1.0])
    for row in rows:
        auroc = row.get("auroc")
        if auroc is None:
            continue
        ci = row.get("auroc_ci") or [None, None]
        yerr = None
        if ci[0] is not None and ci[1] is not None:
            yerr = [[max(auroc - ci[0], 0.0)], [max(ci[1] - auroc, 0.0)]]
        size = 40 + 1500 * float(row["params"]) / largest
        marker = "*" if row.get("kind") == "ensemble" else ("s" if row.get("demographics") else "o")
        ax.errorbar(row["latency_ms"], auroc, yerr=yerr, fmt="none", ecolor="#999", elinewidth=0.8, zorder=1)
        ax.scatter(row["latency_ms"], auroc, s=size, marker=marker, alpha=0.6, zorder=2)
        ax.annotate(
            row["name"], (row["latency_ms"], auroc), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency per record at batch size 1 (ms, log scale)")
    ax.set_ylabel("test macro AUROC (95% CI)")
    ax.set_title("AUROC vs latency (marker area ~ parameters; square: with age/sex; star: ensemble)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
 table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
 th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 figure img { max-width: 800px; border: 1px solid #eee; }
 .caveat { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.6em 1em; }
 pre { background: #f6f6f6; padding: 0.6em; }
</style></head><body>
<h1>{{ title }}</h1>
{% for p in paragraphs %}<p>{{ p }}</p>{% endfor %}
<p class="caveat">{{ caveat }}</p>
{% for t in tables %}<h2>{{ t.title }}</h2>
<table><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>
{% if t.note %}<p><small>{{ t.note }}</small></p>{% endif %}{% endfor %}
{% for f in figures %}<figure><img src="{{ f.path }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption>
</figure>{% endfor %}
{% if settings %}<h2>Settings</h2><pre>{{ settings }}</pre>{% endif %}
</body></html>
"""


def render_table_page(
    title: str,
    *,
    paragraphs: Sequence[str] = (),
    tables: Sequence[Mapping[str, Any]] = (),
    figures: Sequence[Mapping[str, str]] = (),
    settings: Mapping[str, Any] | None = None,
) -> str:
    """A self-contained HTML page of tables (``{"title", "columns", "rows", "note"?}``) and figures
    (``{"path", "caption"}``, paths relative to the page), with the evaluation report's clinical caveat."""
    import jinja2

    from enecg.evaluation.report import CAVEAT

    env = jinja2.Environment(autoescape=True)
    return env.from_string(_PAGE).render(
        title=title,
        paragraphs=list(paragraphs),
        tables=list(tables),
        figures=list(figures),
        caveat=CAVEAT,
        settings=json.dumps(settings, indent=2, sort_keys=True, default=str) if settings else "",
    )


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def fmt_ci(ci: Sequence[float | None] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _main(argv: Sequence[str]) -> int:
    """``python -m enecg.evaluation.efficiency KIND FOLDER SETTINGS_JSON``: measure in this (fresh) process."""
    if len(argv) != 3:
        print(
            "usage: python -m enecg.evaluation.efficiency light|ensemble FOLDER SETTINGS_JSON",
            file=sys.stderr,
        )
        return 2
    kind, folder, settings_json = argv
    settings = MeasurementSettings(**json.loads(settings_json))
    try:
        result = _measure_here(kind, folder, settings)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"{folder}: {exc}", file=sys.stderr)
        return 1
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
