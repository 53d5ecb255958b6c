"""Push a saved model folder (ensemble or in-house expert) to the Hub in one commit, leaving private files behind.

What goes up: weights (``*.safetensors``), configuration and results (``*.json``), the model card and notes
(``*.md``) and plots (``*.png``, ``*.svg``). What never goes up, whatever else the folder holds: Accelerate
checkpoints (``checkpoints/``; ``save_state`` pickles the optimizer, scheduler, sampler and RNG states), pickles and
torch files (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``), ``optimizer*``/``scheduler*``/
``random_states*`` files, tracker logs (``logs/``, ``runs/``, ``wandb/``) and hidden files. ``upload_folder``
sends the selection as a single commit, so the repository moves from one complete version to the next or not at
all; the local folder is only read.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

logger = logging.getLogger(__name__)

REQUIRED_FILE = "config.json"
ALLOW_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.json", "*.md", "*.png", "*.svg")
# `*` matches across "/" in huggingface_hub's patterns (fnmatch), so "x/*" covers the whole folder x/ and "*/x/*"
# the same folder nested anywhere.
IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoints/*",
    "*/checkpoints/*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "*.ckpt",
    "optimizer*",
    "*/optimizer*",
    "scheduler*",
    "*/scheduler*",
    "random_states*",
    "*/random_states*",
    "logs/*",
    "runs/*",
    "wandb/*",
    ".*",
    "*/.*",
)
_AUTH_STATUSES = (401, 403)


class PushError(RuntimeError):
    """A push that did not happen, with one line saying why and what to do (the CLI prints it as is)."""


@dataclass(frozen=True)
class PushResult:
    """The outcome of :func:`push_folder`."""

    repo_id: str
    commit_sha: str = field(metadata={"help": "Head commit of the branch after the push."})
    url: str = field(metadata={"help": "Web address of the repository (at the branch when not main)."})
    files: tuple[str, ...] = field(metadata={"help": "Paths uploaded (relative to the folder), sorted."})
    changed: bool = field(
        default=True, metadata={"help": "False when the Hub already held these exact files (no new commit)."}
    )


def files_to_push(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` that :func:`push_folder` uploads (POSIX paths relative to it, sorted)."""
    root = Path(folder)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(
        filter_repo_objects(paths, allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS))
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create: bool = True,
    validate: bool = False,
    accelerator: Any | None = None,
    is_main_process: bool | None = None,
) -> PushResult | None:
    """Upload ``folder`` to the model repo ``repo_id`` in one commit (see the module doc for what is sent).

    Args:
        folder: A saved model folder; it must hold ``config.json``. Never modified.
        repo_id: ``ORG/NAME`` on the Hub that ``huggingface_hub`` is configured for (``HF_ENDPOINT``).
        private: Visibility when the repo is created (an existing repo keeps its visibility).
        token: Hub token; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
        commit_message: Commit title; default ``"Upload <folder name> with enecg"``.
        revision: Branch to commit to (created from ``main`` when missing); default ``main``.
        create: Create the repo when it does not exist (``exist_ok``). With ``False`` a missing repo is an error.
        validate: Check ``README.md`` with the Hub's card validation (``ModelCard.validate``) before uploading.
        accelerator: An ``accelerate.Accelerator``: only its main process pushes.
        is_main_process: The same without an Accelerator (e.g. ``RANK == 0``); default True.

    Returns:
        A :class:`PushResult`, or ``None`` on a non-main process (which does nothing: no request, no file read).

    Raises:
        PushError: no ``config.json``; authentication refused (401/403); repo missing with ``create=False``; card
            rejected by validation; the Hub failing during the upload (nothing committed, the folder unchanged:
            retrying is safe, files already on the Hub are skipped).
    """
    main = accelerator.is_main_process if accelerator is not None else is_main_process
    if main is False:
        return None
    folder = Path(folder)
    if not (folder / REQUIRED_FILE).is_file():
        raise PushError(
            f"{folder}: not a saved model folder (no {REQUIRED_FILE}); save the model there first"
        )
    files = files_to_push(folder)
    if "README.md" in files:
        _parse_card(folder / "README.md")
    else:
        logger.warning("%s has no README.md: the Hub repo will have no model card", folder)
    branch = revision or "main"
    api = HfApi(token=token)
    endpoint = api.endpoint

    def hub_error(exc: Exception, action: str) -> PushError:
        status = _status(exc)
        if status in _AUTH_STATUSES:
            return PushError(
                f"authentication failed for {endpoint}: set HF_TOKEN or pass token=... ({action})"
            )
        return PushError(f"{action} on {endpoint} failed: {_describe(exc)}")

    if validate:
        _validate_card(folder, endpoint)
    try:
        if create:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            url = str(repo_url)
        else:
            api.repo_info(repo_id)  # a clear error now rather than a failed upload later
            url = f"{endpoint}/{repo_id}"
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
            url = f"{url}/tree/{branch}"
        head_before = api.repo_info(repo_id, revision=branch).sha
    except RepositoryNotFoundError as exc:
        # The Hub reports a repo the token may not see as "not found", with status 401.
        if _status(exc) in _AUTH_STATUSES:
            raise hub_error(exc, f"access to {repo_id}") from exc
        raise PushError(
            f"repository {repo_id} not found on {endpoint} (create=False): create it first"
        ) from exc
    except (HfHubHTTPError, *_network_errors()) as exc:
        raise hub_error(exc, f"preparing {repo_id}") from exc

    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            commit_message=commit_message or f"Upload {folder.name} with enecg",
            # Fresh lists: upload_folder appends its defaults to ignore_patterns in place.
            allow_patterns=list(ALLOW_PATTERNS),
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except (HfHubHTTPError, *_network_errors()) as exc:
        if _status(exc) in _AUTH_STATUSES:
            raise hub_error(exc, f"upload to {repo_id}") from exc
        raise PushError(
            f"upload of {folder} to {repo_id} failed: {_describe(exc)}; "
            f"{_commit_state(api, repo_id, branch, head_before)}; the local folder is unchanged — retry"
        ) from exc
    logger.info("Pushed %d files from %s to %s (commit %s)", len(files), folder, url, info.oid)
    return PushResult(
        repo_id=repo_id, commit_sha=info.oid, url=url, files=tuple(files), changed=info.oid != head_before
    )


def _parse_card(card_path: Path) -> ModelCard:
    """The card, parsed locally: broken YAML metadata is caught before anything is sent (no network)."""
    try:
        return ModelCard.load(card_path)
    except (ValueError, yaml.YAMLError) as exc:
        raise PushError(f"{card_path}: invalid model card metadata: {_one_line(str(exc))}") from exc


def _validate_card(folder: Path, endpoint: str) -> None:
    card_path = folder / "README.md"
    if not card_path.is_file():
        raise PushError(f"{folder}: no README.md to validate; render the model card first")
    try:
        _parse_card(card_path).validate()
    except ValueError as exc:  # the Hub's 400 answer: the metadata is invalid
        raise PushError(f"{card_path}: model card rejected by {endpoint}: {_one_line(str(exc))}") from exc
    except (HfHubHTTPError, *_network_errors()) as exc:
        raise PushError(
            f"{card_path}: could not validate the model card on {endpoint}: {_describe(exc)}"
        ) from exc


def _commit_state(api: HfApi, repo_id: str, branch: str, head_before: str) -> str:
    """Whether the branch moved, asked after a failure: an error answer means no commit, but a dropped connection
    could hide one that landed, so look rather than assume."""
    try:
        head_after = api.repo_info(repo_id, revision=branch).sha
    except Exception:  # reporting the first failure matters more than this check
        return "could not check whether a commit landed"
    if head_after == head_before:
        return "nothing was committed"
    return f"the branch {branch} now points to {head_after} (changed since the push began)"


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _describe(exc: Exception) -> str:
    status = _status(exc)
    if status is None:
        return f"{type(exc).__name__}: {_one_line(str(exc))}"
    message = getattr(exc, "server_message", None) or getattr(
        getattr(exc, "response", None), "reason_phrase", ""
    )
    return f"{status} {_one_line(str(message or ''))}".strip()


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (its name changed across versions)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        transport = getattr(module, "TransportError", None)
        if isinstance(transport, type):
            errors.append(transport)
    return tuple(errors)


__all__ = [
    "ALLOW_PATTERNS",
    "IGNORE_PATTERNS",
    "PushError",
    "PushResult",
    "files_to_push",
    "push_folder",
]
