"""Generative model kinds: the :class:`GenerativeModel` protocol, their registry and kind-independent loading.

Every kind of generative model (the diffusion model of :mod:`enecg.generative.model`, the beat-template model of
:mod:`enecg.generative.beat`) is one class registered by the ``kind`` it writes into its saved ``config.json``::

    @register_generative
    class MyModel:
        kind = "my_kind"
        ...

Sampling (``enecg generate sample``), recipe augmentation (``data.synthetic``), ``enecg generate evaluate``,
anomaly scores (``enecg predict --anomaly-model``) and ``enecg generate train`` (a recipe's ``kind`` key) work with
any registered kind through :func:`load_generative` and :func:`train_from_recipe`. A ``config.json`` without a
``kind`` is a diffusion model (written before kinds existed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from enecg.record import ECGRecord
from enecg.utils.config import ConfigError, apply_overrides, read_mapping
from enecg.utils.registry import Registry

CONFIG_FILE = "config.json"
# The kind of a saved config.json that names none (diffusion models saved before kinds existed).
DEFAULT_KIND = "diffusion"
# Built-in kinds register themselves when the package is imported.
generative_kinds: Registry[type] = Registry("generative model kind", builtins="enecg.generative", key="kind")
register_generative = generative_kinds.register


@runtime_checkable
class GenerativeModel(Protocol):
    """What every generative model kind provides (duck-typed: a kind need not inherit from this).

    ``spec`` carries at least ``task``, ``task_type``, ``label_names``, ``leads``, ``fs``, ``length``,
    ``use_age_sex`` and ``signal_scale`` (mV per unit of :meth:`prepare`'s output)."""

    kind: ClassVar[str]
    spec: Any

    def label_vector(self, labels: list[str] | tuple[str, ...]) -> Any:
        """Multi-hot ``(K,)`` of label names; an unknown label is a one-line ValueError."""

    def sample(
        self,
        labels: list[str] | tuple[str, ...] | None,
        n: int,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        age: float | None = None,
        sex: float | None = None,
    ) -> np.ndarray:
        """``n`` records ``(n, leads, length)`` in mV with these labels (None: unconditioned); seeded."""

    def sample_conditions(self, labels: np.ndarray | None, n: int, **options: Any) -> np.ndarray:
        """Record ``i`` conditioned on row ``i`` of ``labels`` (and of ``ages``/``sexes`` options)."""

    def prepare(self, records: list[ECGRecord]) -> Any:
        """Real records as the model sees them ``(B, leads, length)``, in units of ``spec.signal_scale`` mV."""

    def anomaly_scores(self, records: list[ECGRecord], **options: Any) -> np.ndarray:
        """One score per record, higher = less like the normal ECGs the model learned."""

    def card(self, metrics: dict[str, Any]) -> str:
        """The Hub model card (README.md) for these metrics (training, and evaluation when recorded)."""


def multi_hot(label_names: list[str], task: str, labels: list[str] | tuple[str, ...]) -> np.ndarray:
    """Multi-hot float32 ``(K,)`` of ``labels`` over a model's ``label_names``; an unknown name is a one-line
    ValueError naming the task and the known labels (every kind's ``label_vector``)."""
    unknown = [name for name in labels if name not in label_names]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown} for task {task!r}; known: {label_names}")
    return np.asarray([float(name in labels) for name in label_names], np.float32)


def card_text(
    title: str, description: str, tags: list[str], metrics: dict[str, Any], load_hint: str, fit_heading: str
) -> str:
    """A generative model's Hub card: front matter, what it generates (``description``), the synthetic-data
    warning, its fit/training metrics and its evaluation (``metrics["evaluation"]``, when recorded)."""
    evaluation = metrics.get("evaluation")
    lines = [
        "---",
        "library_name: enecg",
        f"tags: [{', '.join(tags)}]",
        "---",
        f"# {title}",
        "",
        description,
        "",
        "Samples are **synthetic**: `enecg generate sample` marks them in their WFDB header comments and in the "
        "dataset `source` column (`synthetic:<model>`), and enecg refuses them in validation/test parts.",
        "",
        f"## {fit_heading}",
        "",
        "```json",
        json.dumps({k: v for k, v in metrics.items() if k != "evaluation"}, indent=2, default=str),
        "```",
        "",
        "## Evaluation",
        "",
        "```json\n" + json.dumps(evaluation, indent=2, default=str) + "\n```"
        if evaluation
        else "Not evaluated yet (`enecg generate evaluate`).",
        "",
        f"Load: {load_hint}.",
    ]
    return "\n".join(lines) + "\n"


def load_generative(source: str | os.PathLike, revision: str | None = None) -> Any:
    """Load a saved generative model of any registered kind from a folder or a Hub ID.

    The kind is read from the folder's ``config.json`` (``kind``; none: diffusion); its class's ``load_folder``
    builds the model. The returned model's ``name`` is ``source`` (recorded in synthetic records)."""
    from enecg.generative.model import resolve_folder

    folder = resolve_folder(source, revision)
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a saved enecg generative model")
    kind = json.loads(config.read_text()).get("kind", DEFAULT_KIND)
    try:
        cls = generative_kinds.get(kind)
    except KeyError as exc:
        raise ValueError(f"{source}: {exc.args[0]}") from None
    model = cls.load_folder(folder)
    model.name = str(source)
    return model


def recipe_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[type, Any]:
    """The kind a recipe names (its ``kind`` key; default diffusion) and that kind's config, read through
    :mod:`enecg.utils.config` with ``--key=value`` overrides (``--kind=beat`` picks the kind too)."""
    data = read_mapping(path)
    kind = data.pop("kind", DEFAULT_KIND)
    rest: list[str] = []
    items = list(overrides)
    while items:  # --kind=X / --kind X choose the schema the other overrides are checked against
        item = items.pop(0)
        if item.startswith("--kind="):
            kind = item.partition("=")[2]
        elif item == "--kind" and items and not items[0].startswith("--"):
            kind = items.pop(0)
        else:
            rest.append(item)
    overrides = rest
    try:
        cls = generative_kinds.get(kind)
    except KeyError as exc:
        raise ConfigError(f"{path}: kind: {exc.args[0]}") from None
    schema = cls.recipe_schema()
    data = apply_overrides(data, overrides, schema)
    return cls, schema.from_dict(data, str(path))


def train_from_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Train the kind a recipe names from the recipe's other keys, after ``--key=value`` overrides; returns the
    saved model folder."""
    cls, config = recipe_config(path, overrides)
    return cls.train_config(config)
