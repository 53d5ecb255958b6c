"""Model cards (``README.md``) for enecg ensembles and in-house experts, rendered offline from plain data.

The templates are ``hub_cards/ensemble.md`` and ``hub_cards/expert.md`` (installed as the package
``enecg.hub_cards``); they are rendered by ``huggingface_hub.ModelCard.from_template`` with a ``ModelCardData``
built here, so the YAML metadata is what the Hub expects: ``library_name: enecg``, ``tags``, ``base_model`` (the
experts' Hub IDs) with ``base_model_relation: adapter``, ``datasets``, ``license`` (the most restrictive expert
licence, see :mod:`enecg.hub.licenses`), ``metrics`` and a ``model-index`` built from evaluation results.

Nothing here knows the ensemble's classes: callers fill the context dataclasses (plain values, JSON-like dicts;
``ExpertCardInfo.from_dict`` accepts ``Expert.describe()``), so the cards can be rendered from a saved folder as
well as from a live model. Rendering never touches the network; ``ModelCard.validate()`` (which asks the Hub) is
left to :func:`enecg.hub.upload.push_folder` (``validate=True``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from enecg.ensemble.tasks import TASK_TYPES, evaluated_as, task_type
from enecg.evaluation.report import CAVEAT, headline
from enecg.evaluation.report import format_number as _fmt
from enecg.hub.licenses import LicenceDecision, licence_display_name, most_restrictive_licence
from enecg.utils.files import write_text_atomic
from enecg.utils.version import __version__ as ENECG_VERSION

ENSEMBLE_TEMPLATE = "ensemble.md"
EXPERT_TEMPLATE = "expert.md"
LIBRARY_NAME = "enecg"
BASE_TAGS: tuple[str, ...] = ("ecg", "electrocardiogram", "enecg", "medical", "biosignals", "time-series")
ENSEMBLE_TAGS: tuple[str, ...] = (*BASE_TAGS, "lora", "peft", "mixture-of-experts")
EXAMPLE_RECORD = "path/to/record"

# headline() names -> metric ids on the Hub (https://hf.co/metrics) and their `average` argument.
_METRIC_IDS = {"macro AUROC": ("roc_auc", {"average": "macro"}), "MAE": ("mae", None)}


# ----------------------------------------------------------------------------------------------- context data


@dataclass
class ExpertCardInfo:
    """One expert as the card shows it. ``hub_id`` None means an in-house expert (listed in the body only)."""

    name: str = field(metadata={"help": "Expert name in the ensemble (e.g. 'hubert-ecg-base')."})
    family: str = field(metadata={"help": "Expert family (net1d, hubert_ecg, ecg_fm, moment, light)."})
    license: str = field(
        metadata={"help": "Licence id of the expert's weights (e.g. 'mit', 'cc-by-nc-4.0')."}
    )
    hub_id: str | None = field(default=None, metadata={"help": "Hub repo of the weights; None for in-house."})
    revision: str | None = field(default=None, metadata={"help": "Commit sha the ensemble was trained with."})
    embedding_dim: int | None = field(default=None, metadata={"help": "Size of the expert's embedding."})
    contract: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "InputContract as a dict (fs, leads, length, filters, scaling...)."},
    )
    contract_summary: str | None = field(
        default=None, metadata={"help": "One-line contract summary; derived from `contract` when None."}
    )
    num_parameters: int | None = field(default=None, metadata={"help": "Parameter count of the expert."})
    description: str = field(default="", metadata={"help": "One sentence about the expert."})
    reference: str | None = field(default=None, metadata={"help": "URL of the paper / model page."})
    citation: str | None = field(default=None, metadata={"help": "BibTeX entry to cite the expert."})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertCardInfo:
        """From a plain dict such as ``Expert.describe()``; keys that are not fields (``source``, ``keys``,
        ``frozen``...) are ignored because ``describe()`` carries more than a card shows."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class TaskCardInfo:
    """One prediction task."""

    name: str = field(metadata={"help": "Task name (e.g. 'superdiagnostic')."})
    type: str = field(metadata={"help": "multilabel | binary | multiclass | regression."})
    labels: list[str] = field(default_factory=list, metadata={"help": "Label (class / target) names."})
    thresholds: dict[str, float] | None = field(
        default=None, metadata={"help": "Decision threshold per label shipped with the model, if any."}
    )
    description: str = field(default="", metadata={"help": "What the task predicts."})
    unit: str | None = field(default=None, metadata={"help": "Unit of a regression target (e.g. 'years')."})

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: unknown type {self.type!r} (expected one of {TASK_TYPES.names()})")


@dataclass
class DatasetCardInfo:
    """A dataset used for training or evaluation."""

    name: str = field(metadata={"help": "Display name (e.g. 'PTB-XL')."})
    hub_id: str | None = field(
        default=None, metadata={"help": "Hub dataset id, when the data is on the Hub."}
    )
    url: str | None = field(default=None, metadata={"help": "Where the data comes from (e.g. PhysioNet)."})
    license: str | None = field(default=None, metadata={"help": "Licence id of the data."})
    citation: str | None = field(default=None, metadata={"help": "BibTeX entry to cite the dataset."})

    @property
    def metadata_id(self) -> str:
        """The value for the card's ``datasets`` list and ``model-index`` ``dataset.type``."""
        return self.hub_id or self.name


@dataclass
class TrainingSummary:
    """How the model was trained."""

    splits: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Split name -> number of records."}
    )
    epochs: int | float | None = field(default=None, metadata={"help": "Epochs trained."})
    recipe: str | None = field(
        default=None, metadata={"help": "Recipe YAML (path in the repo or source tree)."}
    )
    split_method: str | None = field(
        default=None,
        metadata={"help": "How splits were made (e.g. 'PTB-XL strat_fold 1-8 / 9 / 10, patient-wise')."},
    )
    hyperparameters: dict[str, Any] = field(default_factory=dict, metadata={"help": "Key settings to show."})


@dataclass
class EvaluationSummary:
    """Results of one evaluation: ``tasks`` maps task name -> ``evaluate_task`` result."""

    split: str = field(metadata={"help": "Split evaluated (e.g. 'test')."})
    tasks: dict[str, dict[str, Any]] = field(
        metadata={"help": "Task -> enecg.evaluation.evaluate_task result."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Name of a DatasetCardInfo; None = the first dataset of the context."}
    )
    paired: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=dict,
        metadata={
            "help": "Task -> baseline -> enecg.evaluation.paired.paired_difference result (the ensemble minus "
            "the uniform average, the validation-chosen single expert, the stacker)."
        },
    )
    best_single_expert: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Task -> the expert chosen on validation as the best single one."}
    )

    @classmethod
    def from_evaluation(
        cls, evaluation: Mapping[str, Any], split: str, dataset: str | None = None
    ) -> EvaluationSummary:
        """The summary of an :func:`enecg.evaluation.runner.evaluate_ensemble` result: task results, paired
        differences to the baselines and the validation-chosen single expert."""
        return cls(
            split=split,
            tasks=evaluation["tasks"],
            dataset=dataset,
            paired=evaluation.get("paired") or {},
            best_single_expert=(evaluation.get("baseline_details") or {}).get("best_single_expert") or {},
        )


@dataclass
class EnsembleCardContext:
    """Everything the ensemble card shows (plain data)."""

    repo_id: str = field(metadata={"help": "Hub repo id (ORG/NAME) the card is for."})
    experts: list[ExpertCardInfo] = field(metadata={"help": "Experts of the ensemble."})
    tasks: list[TaskCardInfo] = field(metadata={"help": "Tasks the ensemble predicts."})
    title: str | None = field(default=None, metadata={"help": "Card title; default: the repo name."})
    description: str = field(default="", metadata={"help": "A paragraph about the model."})
    datasets: list[DatasetCardInfo] = field(
        default_factory=list, metadata={"help": "Training / evaluation data."}
    )
    training: TrainingSummary | None = field(default=None, metadata={"help": "Training summary."})
    evaluations: list[EvaluationSummary] = field(
        default_factory=list, metadata={"help": "Results per split."}
    )
    gate_mean_weights: dict[str, dict[str, float]] = field(
        default_factory=dict, metadata={"help": "Task -> expert -> mean gate weight on the test split."}
    )
    gate_split: str = field(default="test", metadata={"help": "Split the gate weights were averaged over."})
    enecg_version: str = field(
        default=ENECG_VERSION, metadata={"help": "enecg version that saved the model."}
    )
    example_record: str = field(
        default=EXAMPLE_RECORD, metadata={"help": "WFDB record path used in the loading snippet."}
    )
    loading_snippet: str | None = field(
        default=None,
        metadata={"help": "Python code to load and run the model; default: default_ensemble_snippet."},
    )
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags besides the enecg ones."})
    citation: str | None = field(default=None, metadata={"help": "BibTeX entry for this model."})


@dataclass
class ExpertCardContext:
    """Everything the card of an in-house expert (e.g. a light CNN) shows."""

    repo_id: str = field(metadata={"help": "Hub repo id (ORG/NAME) the card is for."})
    expert: ExpertCardInfo = field(metadata={"help": "The expert (its hub_id may be None or repo_id)."})
    title: str | None = field(default=None, metadata={"help": "Card title; default: the repo name."})
    description: str = field(default="", metadata={"help": "A paragraph about the expert."})
    architecture: str = field(
        default="", metadata={"help": "Architecture in words (layers, widths, pooling)."}
    )
    architecture_config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The config.json values that define the architecture."}
    )
    tasks: list[TaskCardInfo] = field(default_factory=list, metadata={"help": "Tasks it was trained on."})
    datasets: list[DatasetCardInfo] = field(
        default_factory=list, metadata={"help": "Training / evaluation data."}
    )
    training: TrainingSummary | None = field(default=None, metadata={"help": "Training summary."})
    evaluations: list[EvaluationSummary] = field(
        default_factory=list, metadata={"help": "Results per split."}
    )
    enecg_version: str = field(
        default=ENECG_VERSION, metadata={"help": "enecg version that saved the expert."}
    )
    example_record: str = field(
        default=EXAMPLE_RECORD, metadata={"help": "WFDB record path used in the loading snippet."}
    )
    loading_snippet: str | None = field(
        default=None,
        metadata={"help": "Python code to load and run the expert; default: default_expert_snippet."},
    )
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags besides the enecg ones."})
    citation: str | None = field(default=None, metadata={"help": "BibTeX entry for this expert."})


# ------------------------------------------------------------------------------------------------- snippets


def default_ensemble_snippet(repo_id: str, example_record: str = EXAMPLE_RECORD) -> str:
    """The loading example of an ensemble card (the card's only ``python`` code block)."""
    return (
        "import enecg\n"
        "from enecg import Ensemble\n"
        "\n"
        "# Downloads the heads, adapters and gate, and each expert at the revision recorded in the config.\n"
        f'model = Ensemble.from_pretrained("{repo_id}")  # revision="<commit sha>" pins this exact version\n'
        f'record = enecg.read_record("{example_record}")  # a WFDB record: header path, with or without .hea\n'
        "predictions = model.predict_record(record)  # task -> {label: probability} (or value)\n"
        "print(predictions)\n"
    )


def default_expert_snippet(repo_id: str, example_record: str = EXAMPLE_RECORD) -> str:
    """The loading example of an in-house expert card."""
    return (
        "import enecg\n"
        "\n"
        f'expert = enecg.load_expert("{repo_id}")  # revision="<commit sha>" pins this exact version\n'
        f'record = enecg.read_record("{example_record}")  # a WFDB record: header path, with or without .hea\n'
        "embedding = expert.embed(record)  # (1, embedding_dim); the input contract is applied for you\n"
        "print(embedding.shape)\n"
    )


# ---------------------------------------------------------------------------------------------- formatting


def _cell(value: Any) -> str:
    """A Markdown table cell: text on one line, pipes escaped."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(item) for item in value)
    text = "–" if value is None or value == "" else str(value)
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def _fmt_ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return "–"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_count(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def summarize_contract(contract: Mapping[str, Any]) -> str:
    """One line from an InputContract dict, e.g. ``'500 Hz, 12 leads, 5000 samples (crop_start), zscore_lead'``."""
    if not contract:
        return "–"
    parts = [f"{contract['fs']:g} Hz" if contract.get("fs") else "native rate"]
    leads = contract.get("leads")
    if leads is None:
        parts.append("record's leads")
    else:
        parts.append(", ".join(leads) if len(leads) <= 2 else f"{len(leads)} leads")
    if contract.get("length"):
        parts.append(f"{contract['length']} samples ({contract.get('long_records', 'crop_start')})")
    if contract.get("bandpass"):
        low, high = contract["bandpass"]
        parts.append(f"band-pass {low:g}–{high:g} Hz")
    if contract.get("notch"):
        parts.append(f"notch {contract['notch']:g} Hz")
    if contract.get("baseline") not in (None, "none"):
        parts.append(f"{contract['baseline']} baseline")
    parts.append(contract.get("scaling") or "none")
    if contract.get("layout") == "concat_leads":
        parts.append("leads concatenated")
    return ", ".join(parts)


def _expert_rows(experts: Sequence[ExpertCardInfo]) -> list[dict[str, str]]:
    return [
        {
            "name": _cell(e.name),
            "source": _cell(
                f"[`{e.hub_id}`](https://huggingface.co/{e.hub_id})" if e.hub_id else "in-house (this repo)"
            ),
            "revision": _cell(f"`{e.revision}`" if e.revision else None),
            "family": _cell(e.family),
            "license": _cell(licence_display_name(e.license)),
            "embedding_dim": _cell(e.embedding_dim),
            "parameters": _cell(_fmt_count(e.num_parameters)),
            "contract": _cell(e.contract_summary or summarize_contract(e.contract)),
        }
        for e in experts
    ]


def _task_rows(tasks: Sequence[TaskCardInfo]) -> list[dict[str, str]]:
    rows = []
    for t in tasks:
        if t.thresholds:
            thresholds = ", ".join(
                f"{label}: {t.thresholds[label]:.3f}" for label in t.labels if label in t.thresholds
            )
        elif evaluated_as(t.type) == "regression":
            thresholds = "n/a"
        elif evaluated_as(t.type) == "multiclass":
            thresholds = "argmax"
        else:
            thresholds = "none shipped (probabilities)"
        label_text = ", ".join(t.labels) if t.labels else "–"
        if evaluated_as(t.type) == "regression" and t.unit:
            label_text += f" ({t.unit})"
        rows.append(
            {
                "name": _cell(t.name),
                "type": _cell(task_type(t.type).card_pipeline[1]),
                "labels": _cell(label_text),
                "thresholds": _cell(thresholds),
                "description": _cell(t.description or None),
            }
        )
    return rows


def _dataset_for(evaluation: EvaluationSummary, datasets: Sequence[DatasetCardInfo]) -> DatasetCardInfo:
    if evaluation.dataset is None:
        if not datasets:
            raise ValueError(
                f"evaluation of split {evaluation.split!r} names no dataset and the card lists none"
            )
        return datasets[0]
    for dataset in datasets:
        if evaluation.dataset in (dataset.name, dataset.hub_id):
            return dataset
    # An evaluation-only dataset the caller did not list: still shown, with its name as id.
    return DatasetCardInfo(name=evaluation.dataset)


def _result_rows(
    evaluations: Sequence[EvaluationSummary], datasets: Sequence[DatasetCardInfo]
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Headline rows (one per evaluation x task) and per-label detail tables of classification tasks."""
    headline_rows: list[dict[str, str]] = []
    details: list[dict[str, Any]] = []
    for ev in evaluations:
        dataset = _dataset_for(ev, datasets)
        for task, result in ev.tasks.items():
            metric, value, ci = headline(result)
            headline_rows.append(
                {
                    "dataset": _cell(dataset.name),
                    "split": _cell(ev.split),
                    "task": _cell(task),
                    "n": _cell(result.get("n_records")),
                    "metric": _cell(metric),
                    "value": _cell(_fmt(value)),
                    "ci": _cell(_fmt_ci(ci)),
                }
            )
            per_label = (result.get("metrics") or {}).get("per_label")
            if result.get("type") in ("multilabel", "binary") and per_label:
                cis = result.get("ci") or {}
                details.append(
                    {
                        "title": f"{task} — {dataset.name} {ev.split}",
                        "rows": [
                            {
                                "label": _cell(label),
                                "n": _cell(int(m["n"]) if isinstance(m.get("n"), (int, float)) else None),
                                "prevalence": _cell(_fmt(m.get("prevalence"))),
                                "auroc": _cell(_fmt(m.get("auroc"))),
                                "auroc_ci": _cell(_fmt_ci(cis.get(f"{label}/auroc"))),
                                "auprc": _cell(_fmt(m.get("auprc"))),
                                "threshold": _cell(_fmt(m.get("threshold"))),
                                "sensitivity": _cell(_fmt(m.get("sensitivity"))),
                                "specificity": _cell(_fmt(m.get("specificity"))),
                            }
                            for label, m in per_label.items()
                        ],
                    }
                )
    return headline_rows, details


def build_eval_results(
    evaluations: Sequence[EvaluationSummary], datasets: Sequence[DatasetCardInfo]
) -> list[EvalResult]:
    """``model-index`` entries: each task's headline metric per evaluation (macro AUROC or MAE), with the split.

    The task name goes in ``dataset_config`` (PTB-XL's label sets are effectively configurations of the data) so
    two tasks on the same split stay separate entries. Metrics that could not be computed (``None``) are left out.
    """
    results: list[EvalResult] = []
    for ev in evaluations:
        dataset = _dataset_for(ev, datasets)
        for task, result in ev.tasks.items():
            metric, value, _ = headline(result)
            if value is None or metric not in _METRIC_IDS or result.get("type") not in TASK_TYPES:
                continue
            metric_id, metric_args = _METRIC_IDS[metric]
            # The Hub has no ECG task ids: each task type names an "<input>-<problem>" id leaderboards can group.
            task_id, task_kind = task_type(result["type"]).card_pipeline
            results.append(
                EvalResult(
                    task_type=task_id,
                    task_name=f"{task} ({task_kind})",
                    dataset_type=dataset.metadata_id,
                    dataset_name=dataset.name,
                    dataset_config=task,
                    dataset_split=ev.split,
                    metric_type=metric_id,
                    metric_name=f"{metric} ({task})",
                    metric_value=round(float(value), 4),
                    metric_args=metric_args,
                )
            )
    return results


def _metric_ids(eval_results: Sequence[EvalResult], tasks: Sequence[TaskCardInfo]) -> list[str]:
    ids = [r.metric_type for r in eval_results]
    if not ids:  # no results yet: the metrics the tasks will be judged by
        ids = ["mae" if evaluated_as(t.type) == "regression" else "roc_auc" for t in tasks]
    return list(dict.fromkeys(ids))


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def _citations(*groups: Sequence[Any], own: str | None = None) -> list[str]:
    entries = [own] if own else []
    for group in groups:
        entries.extend(item.citation for item in group if getattr(item, "citation", None))
    return _unique([entry.strip() for entry in entries])


def _load_template(name: str) -> str:
    return importlib.resources.files("enecg.hub_cards").joinpath(name).read_text(encoding="utf-8")


def _check_snippet(snippet: str, owner: str) -> str:
    if "```" in snippet:
        raise ValueError(f"{owner}: loading_snippet must be plain Python code without Markdown fences")
    return snippet.strip("\n")


def _card_data(
    *,
    repo_id: str,
    licence: LicenceDecision,
    tags: Sequence[str],
    base_models: Sequence[str],
    datasets: Sequence[DatasetCardInfo],
    eval_results: list[EvalResult],
    metrics: list[str],
) -> ModelCardData:
    extra: dict[str, Any] = {}
    if base_models:
        # The Hub reads this key to list the model under each expert's "adapters" (ModelCardData keeps extra keys).
        extra["base_model_relation"] = "adapter"
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=licence.license,
        license_name=licence.license_name,
        tags=_unique(list(tags)),
        base_model=list(base_models) or None,
        datasets=_unique([d.metadata_id for d in datasets]) or None,
        metrics=metrics or None,
        # The model-index name; only meaningful (and only written) with results.
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )


# ------------------------------------------------------------------------------------------------- renderers


def ensemble_licence(experts: Sequence[ExpertCardInfo]) -> LicenceDecision:
    """The ensemble's licence: the most restrictive of its experts' (see :mod:`enecg.hub.licenses`)."""
    names = [e.name for e in experts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"expert names must be unique in a card, repeated: {', '.join(duplicates)}")
    return most_restrictive_licence([(e.name, e.license) for e in experts])


def render_ensemble_card(context: EnsembleCardContext, *, template: str | None = None) -> ModelCard:
    """The ensemble's model card (metadata + body) from ``hub_cards/ensemble.md`` (or ``template`` text)."""
    if not context.experts:
        raise ValueError(f"ensemble card for {context.repo_id}: no experts")
    if not context.tasks:
        raise ValueError(f"ensemble card for {context.repo_id}: no tasks")
    licence = ensemble_licence(context.experts)
    eval_results = build_eval_results(context.evaluations, context.datasets)
    base_models = _unique([e.hub_id for e in context.experts if e.hub_id])
    in_house = [e for e in context.experts if not e.hub_id]
    families = [e.family.replace("_", "-") for e in context.experts]
    card_data = _card_data(
        repo_id=context.repo_id,
        licence=licence,
        tags=[*ENSEMBLE_TAGS, *families, *context.tags],
        base_models=base_models,
        datasets=context.datasets,
        eval_results=eval_results,
        metrics=_metric_ids(eval_results, context.tasks),
    )
    result_rows, label_tables = _result_rows(context.evaluations, context.datasets)
    baseline_rows = _baseline_rows(context.evaluations)
    gate_experts = _unique(
        [e.name for e in context.experts] + [e for w in context.gate_mean_weights.values() for e in w]
    )
    gate_rows = [
        {"task": _cell(task), "weights": [_cell(_fmt(weights.get(name))) for name in gate_experts]}
        for task, weights in context.gate_mean_weights.items()
    ]
    snippet = context.loading_snippet or default_ensemble_snippet(context.repo_id, context.example_record)
    return ModelCard.from_template(
        card_data,
        template_str=template if template is not None else _load_template(ENSEMBLE_TEMPLATE),
        **_template_vars(context),
        title=context.title or context.repo_id.split("/")[-1],
        licence=licence,
        in_house_experts=in_house,
        expert_rows=_expert_rows(context.experts),
        task_rows=_task_rows(context.tasks),
        result_rows=result_rows,
        baseline_rows=baseline_rows,
        label_tables=label_tables,
        gate_experts=[_cell(name) for name in gate_experts],
        gate_rows=gate_rows,
        dataset_rows=_dataset_rows(context.datasets),
        training_rows=_training_rows(context.training),
        snippet=_check_snippet(snippet, context.repo_id),
        citations=_citations(context.experts, context.datasets, own=context.citation),
        caveat=CAVEAT,
    )


def render_expert_card(context: ExpertCardContext, *, template: str | None = None) -> ModelCard:
    """The card of an in-house expert from ``hub_cards/expert.md`` (or ``template`` text)."""
    expert = context.expert
    licence = most_restrictive_licence([(expert.name, expert.license)])
    eval_results = build_eval_results(context.evaluations, context.datasets)
    card_data = _card_data(
        repo_id=context.repo_id,
        licence=licence,
        tags=[*BASE_TAGS, "feature-extraction", expert.family.replace("_", "-"), *context.tags],
        base_models=[],
        datasets=context.datasets,
        eval_results=eval_results,
        metrics=_metric_ids(eval_results, context.tasks),
    )
    result_rows, label_tables = _result_rows(context.evaluations, context.datasets)
    snippet = context.loading_snippet or default_expert_snippet(context.repo_id, context.example_record)
    config_rows = [{"key": _cell(k), "value": _cell(v)} for k, v in context.architecture_config.items()]
    return ModelCard.from_template(
        card_data,
        template_str=template if template is not None else _load_template(EXPERT_TEMPLATE),
        **_template_vars(context),
        title=context.title or context.repo_id.split("/")[-1],
        licence=licence,
        expert_row=_expert_rows([expert])[0],
        contract_rows=[{"key": _cell(k), "value": _cell(v)} for k, v in expert.contract.items()],
        config_rows=config_rows,
        task_rows=_task_rows(context.tasks),
        result_rows=result_rows,
        label_tables=label_tables,
        dataset_rows=_dataset_rows(context.datasets),
        training_rows=_training_rows(context.training),
        snippet=_check_snippet(snippet, context.repo_id),
        citations=_citations(context.datasets, own=context.citation or expert.citation),
        caveat=CAVEAT,
    )


def _baseline_rows(evaluations: Sequence[EvaluationSummary]) -> list[dict[str, str]]:
    """The ensemble against each baseline, per evaluation and task: both values and the paired difference."""
    rows = []
    for evaluation in evaluations:
        for task, per_baseline in evaluation.paired.items():
            for name, d in per_baseline.items():
                expert = evaluation.best_single_expert.get(task) if name.startswith("best single") else None
                verdict = {"a": "ensemble better", "b": "baseline better"}.get(d.get("better"), "no clear difference")
                rows.append(
                    {
                        "split": _cell(evaluation.split),
                        "task": _cell(task),
                        "baseline": _cell(f"{name} ({expert})" if expert else name),
                        "metric": _cell(d.get("metric")),
                        "ensemble": _fmt(d.get("a")),
                        "value": _fmt(d.get("b")),
                        "difference": "–" if d.get("difference") is None else f"{d['difference']:+.3f}",
                        "ci": _fmt_ci(d.get("ci")),
                        "verdict": verdict,
                    }
                )
    return rows


def _template_vars(context: Any) -> dict[str, Any]:
    """The context's own fields, for templates that want them raw (derived values are passed next to them)."""
    return {f.name: getattr(context, f.name) for f in dataclasses.fields(context) if f.name != "title"}


def _dataset_rows(datasets: Sequence[DatasetCardInfo]) -> list[dict[str, str]]:
    return [
        {
            "name": _cell(d.name),
            "source": _cell(
                f"[`{d.hub_id}`](https://huggingface.co/datasets/{d.hub_id})" if d.hub_id else (d.url or None)
            ),
            "license": _cell(licence_display_name(d.license) if d.license else None),
        }
        for d in datasets
    ]


def _training_rows(training: TrainingSummary | None) -> dict[str, Any]:
    if training is None:
        return {"splits": [], "facts": []}
    facts = []
    if training.split_method:
        facts.append(("Splits", training.split_method))
    if training.epochs is not None:
        facts.append(("Epochs", _fmt(training.epochs, 1)))
    if training.recipe:
        facts.append(("Recipe", f"`{training.recipe}`"))
    facts.extend((key, f"`{value}`") for key, value in training.hyperparameters.items())
    return {
        "splits": [{"split": _cell(s), "records": _cell(n)} for s, n in training.splits.items()],
        "facts": [{"key": _cell(k), "value": _cell(v)} for k, v in facts],
    }


# ---------------------------------------------------------------------------------------------------- saving


def save_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write ``card`` as ``<folder>/README.md`` atomically (readers never see half a card). Returns the path."""
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, str(card))
    return path


CARD_CONTEXT_FILE = "card_context.json"


def save_card_context(context: EnsembleCardContext, folder: str | os.PathLike) -> Path:
    """Keep the card's data next to the model (``card_context.json``), so the card can be re-rendered with its
    results for whichever repo the folder is later pushed to."""
    path = Path(folder) / CARD_CONTEXT_FILE
    # Insertion order kept (no sort_keys): tasks and results render in the order the run produced them.
    write_text_atomic(path, json.dumps(dataclasses.asdict(context), indent=2, default=str))
    return path


def load_card_context(folder: str | os.PathLike) -> EnsembleCardContext | None:
    """The context saved by :func:`save_card_context`, or None when the folder has none."""
    path = Path(folder) / CARD_CONTEXT_FILE
    if not path.is_file():
        return None
    try:
        return _dataclass_from_dict(EnsembleCardContext, json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a valid card context ({exc})") from exc


def _dataclass_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) card dataclass from ``dataclasses.asdict`` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _convert_field(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert_field(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert_field(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_dict(tp, value)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_dataclass_from_dict(args[0], v) for v in value]
    return value


def extract_python_snippet(card: ModelCard | str) -> str:
    """The code of the card's ``python`` fenced block (exactly one is expected)."""
    text = card.text if isinstance(card, ModelCard) else str(card)
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    if len(blocks) != 1:
        raise ValueError(f"expected exactly one ```python block in the card, found {len(blocks)}")
    return blocks[0]


__all__ = [
    "BASE_TAGS",
    "ENSEMBLE_TAGS",
    "DatasetCardInfo",
    "EnsembleCardContext",
    "EvaluationSummary",
    "ExpertCardContext",
    "ExpertCardInfo",
    "TaskCardInfo",
    "TrainingSummary",
    "build_eval_results",
    "default_ensemble_snippet",
    "default_expert_snippet",
    "ensemble_licence",
    "extract_python_snippet",
    "render_ensemble_card",
    "render_expert_card",
    "save_card",
    "summarize_contract",
]
