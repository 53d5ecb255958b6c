"""Publishing an ensemble: save it (when given the model), give it a card for its repo, push it in one commit;
and publishing an in-house expert folder with its card (:func:`push_expert`).

:func:`push_ensemble` is what ``hub.push: true`` in a recipe and ``enecg push`` call; :func:`save_ensemble` saves a
model with its card (``Ensemble.save_pretrained`` writes weights, config and adapters only). The upload itself
is :func:`enecg.hub.upload.push_folder` (one commit of ``*.safetensors``, ``*.json``, ``*.md`` and plots, never
checkpoints or pickles; main process only). The card's loading example must load the repo it is pushed to, so:

* with ``card_context`` (or a ``card_context.json`` saved next to the model, e.g. by ``enecg train`` with its test
  results), the card is rendered from it (its ``repo_id`` set to the target repo);
* else a ``README.md`` whose Python example already loads ``repo_id`` is kept as is;
* else a card is rendered from the saved ``config.json`` (experts with their revisions and licences, tasks, decision
  thresholds; no results: pass ``card_context`` with evaluations for those) and replaces the old one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from enecg.ensemble import Ensemble, EnsembleConfig
from enecg.ensemble.serialization import (
    CARD_FILE,
    THRESHOLDS_FILE,
    is_hub_ref,
    resolved_config,
    save_pretrained,
)
from enecg.experts import load_expert
from enecg.experts.spec import SpecError, bundled_specs
from enecg.hub.cards import (
    EnsembleCardContext,
    ExpertCardContext,
    ExpertCardInfo,
    TaskCardInfo,
    extract_python_snippet,
    load_card_context,
    render_ensemble_card,
    render_expert_card,
    save_card,
)
from enecg.hub.upload import PushError, PushResult, push_folder

logger = logging.getLogger(__name__)

UNKNOWN_FAMILY = "unknown"
UNKNOWN_LICENCE = (
    "unknown"  # not a licence id: the licence rules turn it into `other`, for a person to review
)
# The pretraining settings (``metrics.json`` of a pretrained expert) an expert card shows.
PRETRAINING_CARD_KEYS = ("objective", "max_steps", "batch_size", "lr", "window_length", "seed")


def expert_card_info(ref: Any) -> ExpertCardInfo:
    """An expert of the card from its :class:`~enecg.ensemble.config.ExpertRef` (family, licence and contract
    from the recorded spec). Experts from local folders get no Hub ID (the card lists them as in-house)."""
    spec: dict[str, Any] = {}
    if isinstance(ref.spec, dict):
        spec = ref.spec
    elif isinstance(ref.spec, str):
        bundled = bundled_specs().get(ref.spec)
        spec = bundled.to_dict() if bundled is not None else {}
    return ExpertCardInfo(
        name=ref.name,
        family=str(spec.get("family") or UNKNOWN_FAMILY),
        license=str(spec.get("license") or UNKNOWN_LICENCE),
        hub_id=ref.hub_id if is_hub_ref(ref) else None,
        revision=ref.revision,
        embedding_dim=ref.embedding_dim,
        contract=dict(spec.get("contract") or {}),
        description=str(spec.get("description") or ""),
        reference=spec.get("reference") or None,
    )


def ensemble_card_context(
    model: Ensemble | EnsembleConfig,
    repo_id: str,
    *,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
    **fields: Any,
) -> EnsembleCardContext:
    """A card context from an ensemble or a saved config: experts (with the specs, revisions and licences their
    loaded modules report, for a live ensemble), tasks (label names, decision thresholds) and the enecg version;
    ``fields`` sets any other :class:`~enecg.hub.cards.EnsembleCardContext` field (description, datasets,
    evaluations, gate_mean_weights, example_record...)."""
    if isinstance(model, Ensemble):
        if thresholds is None:
            thresholds = model.decision_thresholds
        config = resolved_config(model)
    else:
        config = model
    thresholds = thresholds or {}
    tasks = [
        TaskCardInfo(
            name=task.name,
            type=task.type,
            labels=list(task.label_names),
            thresholds=dict(thresholds[task.name]) if task.name in thresholds else None,
        )
        for task in config.tasks
    ]
    fields.setdefault("enecg_version", config.enecg_version)
    return EnsembleCardContext(
        repo_id=repo_id,
        experts=[expert_card_info(ref) for ref in config.experts],
        tasks=tasks,
        **fields,
    )


def default_card(
    config: EnsembleConfig,
    repo_id: str,
    *,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
    **fields: Any,
) -> ModelCard:
    """The card of a saved ensemble without results: experts (revisions, licences), tasks, thresholds."""
    return render_ensemble_card(ensemble_card_context(config, repo_id, thresholds=thresholds, **fields))


def card_loads(card_path: str | os.PathLike, repo_id: str) -> bool:
    """Whether the card's Python example loads ``repo_id`` (False for a missing card or one without example)."""
    path = Path(card_path)
    if not path.is_file():
        return False
    try:
        snippet = extract_python_snippet(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return f'"{repo_id}"' in snippet or f"'{repo_id}'" in snippet


def update_card(
    folder: str | os.PathLike, repo_id: str, card_context: EnsembleCardContext | None = None
) -> Path:
    """Make ``folder/README.md`` the card for ``repo_id`` (see the module docstring); returns its path."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if card_context is None:
        card_context = load_card_context(folder)  # results saved with the model by `enecg train`
    if card_context is not None:
        return save_card(render_ensemble_card(dataclasses.replace(card_context, repo_id=repo_id)), folder)
    if card_loads(card_path, repo_id):
        return card_path
    config = _read_config(folder)
    thresholds_path = folder / THRESHOLDS_FILE
    thresholds = json.loads(thresholds_path.read_text()) if thresholds_path.is_file() else None
    if card_path.is_file():
        logger.warning(
            "%s does not load %s: replaced by a card rendered from config.json (pass card_context to publish "
            "results in the card)",
            card_path,
            repo_id,
        )
    return save_card(default_card(config, repo_id, thresholds=thresholds), folder)


def save_ensemble(
    ensemble: Ensemble,
    directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    card_context: EnsembleCardContext | None = None,
) -> Path:
    """``ensemble.save_pretrained(directory)`` with a model card: rendered from ``card_context`` (e.g. with test
    results) or from the config (experts with revisions and licences, tasks, thresholds). ``repo_id`` is the ID
    the card's loading example uses (default: the folder's name, a local path); returns the folder."""
    directory = Path(directory)
    repo_id = repo_id or directory.name
    if card_context is not None:
        card = render_ensemble_card(dataclasses.replace(card_context, repo_id=repo_id))
    else:
        thresholds = getattr(ensemble, "decision_thresholds", None) or None
        card = default_card(resolved_config(ensemble), repo_id, thresholds=thresholds)
    return save_pretrained(ensemble, directory, card=card)


def push_ensemble(
    ensemble_or_dir: Ensemble | str | os.PathLike,
    repo_id: str,
    *,
    directory: str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    card_context: EnsembleCardContext | None = None,
    validate: bool = False,
    accelerator: Any | None = None,
    is_main_process: bool | None = None,
) -> PushResult | None:
    """Publish an ensemble to the Hub model repo ``repo_id`` in one commit (created when missing).

    Args:
        ensemble_or_dir: a live :class:`~enecg.ensemble.model.Ensemble` (saved first) or a folder written by
            ``save_pretrained``.
        directory: where to save a live ensemble (kept afterwards); default a temporary folder, removed after the
            push. Ignored for a folder.
        card_context: the card to publish (its ``repo_id`` is replaced by ``repo_id``); see the module docstring.
        private, token, commit_message, revision, validate: as :func:`enecg.hub.upload.push_folder`.
        accelerator / is_main_process: only the main process saves and pushes; others return None at once.

    Returns:
        The :class:`~enecg.hub.upload.PushResult`, or None on a non-main process.

    Raises:
        PushError: the folder is not a saved ensemble, or the push failed (one line; the local folder stays
            complete, so retrying is safe).
    """
    main = accelerator.is_main_process if accelerator is not None else is_main_process
    if main is False:
        return None
    if accelerator is not None and not isinstance(ensemble_or_dir, (str, os.PathLike)):
        ensemble_or_dir = accelerator.unwrap_model(ensemble_or_dir)  # DDP / compiled wrappers
    if isinstance(ensemble_or_dir, Ensemble):
        if directory is None:
            with tempfile.TemporaryDirectory(prefix="enecg-push-") as tmp:
                return _save_and_push(
                    ensemble_or_dir,
                    Path(tmp) / repo_id.split("/")[-1],
                    repo_id,
                    card_context,
                    private,
                    token,
                    commit_message,
                    revision,
                    validate,
                )
        return _save_and_push(
            ensemble_or_dir,
            Path(directory),
            repo_id,
            card_context,
            private,
            token,
            commit_message,
            revision,
            validate,
        )
    if not isinstance(ensemble_or_dir, (str, os.PathLike)):
        raise TypeError(
            f"push_ensemble needs an Ensemble or a saved folder, got {type(ensemble_or_dir).__name__}"
        )
    folder = Path(ensemble_or_dir)
    _read_config(folder)  # a clear error before anything is sent
    update_card(folder, repo_id, card_context)
    return push_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        commit_message=commit_message,
        revision=revision,
        validate=validate,
    )


def expert_card_context(folder: str | os.PathLike, repo_id: str, **fields: Any) -> ExpertCardContext:
    """The card context of an in-house expert folder (as ``enecg pretrain`` writes it) pushed to ``repo_id``: the
    expert as it loads (family, licence, contract, embedding size, description) and its architecture config
    (``config.json``); a ``training`` summary without hyperparameters gets the pretraining settings recorded in
    ``metrics.json`` (:data:`PRETRAINING_CARD_KEYS`). ``fields`` sets any other
    :class:`~enecg.hub.cards.ExpertCardContext` field (architecture, datasets, tags...)."""
    folder = Path(folder)
    expert = load_expert(folder)
    info = ExpertCardInfo.from_dict({**expert.describe(), "hub_id": repo_id})
    info.description = expert.spec.description
    training = fields.pop("training", None)
    if training is not None and not training.hyperparameters:
        metrics = json.loads((folder / "metrics.json").read_text())
        pretraining = metrics.get("pretraining_config", {})
        training = dataclasses.replace(
            training, hyperparameters={key: pretraining.get(key) for key in PRETRAINING_CARD_KEYS}
        )
    fields.setdefault("description", expert.spec.description)
    fields.setdefault(
        "architecture_config", dict(json.loads((folder / "config.json").read_text()).get("config", {}))
    )
    return ExpertCardContext(repo_id=repo_id, expert=info, training=training, **fields)


def push_expert(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    card_context: ExpertCardContext | None = None,
    commit_message: str | None = None,
    **options: Any,
) -> PushResult | None:
    """Publish an in-house expert folder to ``repo_id`` in one commit: its card (``card_context``, default
    :func:`expert_card_context`) is rendered into ``folder/README.md`` first, so the folder on disk and the repo
    hold the same files. ``options`` go to :func:`enecg.hub.upload.push_folder` (private, token, revision...)."""
    context = card_context if card_context is not None else expert_card_context(folder, repo_id)
    save_card(render_expert_card(context), folder)
    return push_folder(folder, repo_id, commit_message=commit_message, **options)


def _save_and_push(
    ensemble: Ensemble,
    folder: Path,
    repo_id: str,
    card_context: EnsembleCardContext | None,
    private: bool,
    token: str | None,
    commit_message: str | None,
    revision: str | None,
    validate: bool,
) -> PushResult | None:
    save_ensemble(ensemble, folder, repo_id=repo_id, card_context=card_context)
    return push_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        commit_message=commit_message,
        revision=revision,
        validate=validate,
    )


def _read_config(folder: Path) -> EnsembleConfig:
    try:
        return EnsembleConfig.load(folder)
    except FileNotFoundError:
        raise PushError(
            f"{folder}: not a saved ensemble (no config.json); save the model there first"
        ) from None
    except (ValueError, TypeError, SpecError) as exc:
        raise PushError(" ".join(f"{folder}: not a saved enecg ensemble ({exc})".split())) from exc


__all__ = [
    "card_loads",
    "default_card",
    "ensemble_card_context",
    "expert_card_context",
    "expert_card_info",
    "push_ensemble",
    "push_expert",
    "save_ensemble",
    "update_card",
]
