"""Saving an ensemble to a folder and loading it back, from a folder or from the Hub, bit for bit.

A saved ensemble (a folder, or a Hub model repo once pushed) holds exactly:

- ``config.json``: the :class:`~enecg.ensemble.config.EnsembleConfig` with, per expert, its Hub ID and resolved
  commit (``revision``), its full adapter spec (family, input contract, licence...) and ``weights_sha256``, the
  SHA-256 of its weights file; plus the enecg version and ``format_version`` of the layout.
- ``model.safetensors``: :meth:`Ensemble.trainable_state_dict` (heads, LoRA, gate, projections, task weights).
  The frozen experts' own weights are never saved: they are re-loaded from their recorded source. One exception,
  with LoRA on the experts' layers only: the experts then follow the ensemble's train mode, so training updates
  the running statistics of their normalisation layers (BatchNorm), which are saved too
  (:func:`expert_running_stats`; a few numbers per channel), or the reload would not be bit-identical.
- ``adapters/<expert>/adapter_config.json`` + ``adapter_model.safetensors`` (with LoRA): each expert branch's
  adapter in peft's own format, ``base_model_name_or_path`` = the expert's Hub ID and ``revision`` = its commit,
  so a peft user can load one expert's adapter without enecg. enecg itself reads only ``model.safetensors``.
- ``thresholds.json`` (optional): decision thresholds per task and label (:attr:`Ensemble.decision_thresholds`).
- ``README.md``: the model card, when one is given (rendered in the hub layer: :mod:`enecg.hub.publish`).

Loading (:func:`load_pretrained`, behind ``Ensemble.from_pretrained``) re-loads every expert with :func:`~enecg.experts.load_expert` at its recorded
commit and with its recorded spec (so a newer enecg with different bundled specs still feeds the expert the same
way), then refuses, with one line naming the expert, weights whose SHA-256 differs from the recorded one (a
branch that moved, a local folder that changed, an override pointing at another model).

Experts loaded from local folders have no Hub identity: their folder path is recorded, so such an ensemble only
re-loads where that path exists (or with ``expert_overrides``). Portable ensembles use experts from the Hub,
including in-house experts pushed there (:mod:`enecg.experts.inhouse`).

Writes are atomic: everything is written into a temporary folder next to the target (``.NAME.saving-*``), which
then replaces the target as a whole: a rename for a new target, an atomic swap of the two folders for an existing
one (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is moved aside, the new one moved in, and the
old one put back on failure). Nothing of an older save survives a new one (no stale ``card_context.json``,
thresholds or plots of the previous model), an interrupted save leaves the previous model loadable, and the next
save of the same folder removes what a killed save left behind (restoring a model moved aside). A folder that is
not a saved ensemble (no ``config.json``) and not empty is never replaced.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import RepoCard
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from enecg.ensemble.config import CONFIG_FILE, FORMAT_VERSION, EnsembleConfig, ExpertRef
from enecg.ensemble.model import Ensemble
from enecg.ensemble.prediction import check_thresholds
from enecg.experts import ExpertLoadError, Spec, SpecError, load_expert
from enecg.experts.weights import WeightsError
from enecg.utils.files import write_text_atomic
from enecg.utils.version import __version__ as ENECG_VERSION

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
ADAPTERS_DIR = "adapters"
THRESHOLDS_FILE = "thresholds.json"
CARD_FILE = "README.md"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# The files load_pretrained needs (plus the optional thresholds); the card and adapters are for people and peft.
_LOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE, THRESHOLDS_FILE)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_LOCAL_PREFIX = "local-dir:"


class EnsembleLoadError(RuntimeError):
    """A saved ensemble that cannot be loaded as it was saved. One line naming the folder / repo and the problem."""


# ------------------------------------------------------------------------------------------------ fingerprints

_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file (hex). Cached per process by path, size, mtime and inode: FM checkpoints are
    large, and one session may save and load the same experts several times."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    digest = _DIGESTS.get(key)
    if digest is None:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        _DIGESTS[key] = digest
    return digest


# ------------------------------------------------------------------------------------------------------ saving


def save_pretrained(
    ensemble: Ensemble,
    directory: str | os.PathLike,
    *,
    card: RepoCard | str | None = None,
) -> Path:
    """Save ``ensemble`` into ``directory`` (see the module docstring for the layout); returns the folder.

    Args:
        card: the model card (``README.md``): a ``ModelCard`` or Markdown text, written as is; None writes no
            card. Cards are rendered in the hub layer above this one: :func:`enecg.hub.publish.save_ensemble`
            saves with a card rendered from the config (or from evaluation results), and
            :func:`enecg.hub.publish.push_ensemble` renders one for the repo it pushes to.

    Raises:
        ValueError: a trainable part left frozen (it would not be saved), or bad decision thresholds.
    """
    directory = Path(directory)
    config = resolved_config(ensemble)
    state = _trainable_state(ensemble)
    thresholds = check_thresholds(config, getattr(ensemble, "decision_thresholds", None) or {})
    card_text = _card_text(card)

    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_save(directory)
    _check_replaceable(directory)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; a saved model is an ordinary shareable folder
        save_file(
            state, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "enecg_format": str(FORMAT_VERSION)}
        )
        if config.lora.enabled:
            for ref in config.experts:
                _save_adapter(ensemble, ref, staging / ADAPTERS_DIR / ref.name)
        if thresholds:
            write_text_atomic(
                staging / THRESHOLDS_FILE, json.dumps(thresholds, indent=2, sort_keys=True) + "\n"
            )
        if card_text is not None:
            write_text_atomic(staging / CARD_FILE, card_text)
        config.save(staging)
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Saved ensemble (%d trainable tensors) to %s", len(state), directory)
    return directory


def resolved_config(ensemble: Ensemble) -> EnsembleConfig:
    """A copy of the ensemble's config with what its experts really are: Hub ID, commit, spec and weights hash.

    The values come from the loaded expert modules (enecg :class:`~enecg.experts.Expert` attributes ``hub_id``,
    ``revision``, ``spec``, ``weights_path``) where they have them, else from the config as given."""
    config = EnsembleConfig.from_dict(copy.deepcopy(ensemble.config.to_dict()))
    refs = []
    for ref in config.experts:
        expert = ensemble.branch(ref.name).expert
        changes: dict[str, Any] = {}
        hub_id, revision = getattr(expert, "hub_id", None), getattr(expert, "revision", None)
        source = str(getattr(expert, "source", "") or "")
        if hub_id:
            changes["hub_id"] = hub_id
        elif source.startswith(_LOCAL_PREFIX):  # the absolute folder, whatever path it was loaded by
            changes["hub_id"] = source[len(_LOCAL_PREFIX) :]
        if revision:
            changes["revision"] = revision
        spec = getattr(expert, "spec", None)
        if isinstance(spec, Spec):
            changes["spec"] = spec.to_dict()
        weights_path = getattr(expert, "weights_path", None)
        if weights_path is not None and Path(weights_path).is_file():
            changes["weights_sha256"] = weights_sha256(weights_path)
        ref = dataclasses.replace(ref, **changes)
        if ref.weights_sha256 is None:
            logger.warning(
                "expert %r has no weights file to fingerprint: a reload cannot check that it gets the same weights",
                ref.name,
            )
        if not is_hub_ref(ref):
            logger.warning(
                "expert %r comes from the local folder %s: the saved ensemble only loads where that folder exists "
                "(push the expert to the Hub for a portable ensemble)",
                ref.name,
                ref.hub_id,
            )
        refs.append(ref)
    config.experts = refs
    config.enecg_version = ENECG_VERSION
    config.format_version = FORMAT_VERSION
    return config


def is_hub_ref(ref: ExpertRef) -> bool:
    """Whether an expert was loaded from the Hub (a repo ID with a resolved commit), not from a local folder."""
    return ref.revision is not None and bool(_HUB_ID_RE.match(ref.hub_id))


def _trainable_state(ensemble: Ensemble) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors``, checked: every trainable part is included, no frozen expert weight."""
    frozen_parts = [
        name
        for name, p in ensemble.named_parameters()
        if not p.requires_grad and not _is_expert_weight(name) and ".original_module." not in name
    ]
    if frozen_parts:
        # trainable_state_dict() holds trainable tensors only: a head or gate frozen for a training phase would
        # silently be left out and come back at its initial values.
        raise ValueError(
            f"parameters outside the experts are frozen and would not be saved: {frozen_parts[:5]} "
            f"(of {len(frozen_parts)}); set requires_grad=True on them before saving"
        )
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in ensemble.trainable_state_dict().items()}
    leaked = [name for name in state if _is_expert_weight(name)]
    if leaked:
        raise RuntimeError(f"frozen expert weights in the trainable state: {leaked[:5]}")
    stats = {k: v.to("cpu").contiguous().clone() for k, v in expert_running_stats(ensemble).items()}
    return state | stats


def expert_running_stats(ensemble: Ensemble) -> dict[str, Tensor]:
    """Running statistics of normalisation layers inside the experts that training may have updated.

    Only with ``lora.on_experts``: frozen experts always run in eval mode, so their statistics stay the published
    ones; experts carrying LoRA follow the ensemble's mode, and a training step in train mode updates them."""
    if not ensemble.config.lora.on_experts:
        return {}
    stats = {}
    for name, module in ensemble.named_modules():
        if ".expert." not in f".{name}." or not getattr(module, "track_running_stats", False):
            continue
        for buffer_name, buffer in module.named_buffers(recurse=False):
            stats[f"{name}.{buffer_name}"] = buffer.detach()
    return stats


def _is_expert_weight(name: str) -> bool:
    """A parameter of an expert module itself (LoRA layers injected into it excluded)."""
    return (".expert." in f".{name}") and ".lora_" not in name


def _save_adapter(ensemble: Ensemble, ref: ExpertRef, folder: Path) -> None:
    """The branch's peft adapter, its config pointing at the expert's resolved Hub ID and commit."""
    ensemble.save_expert_adapter(ref.name, folder)
    path = folder / ADAPTER_CONFIG_FILE
    data = json.loads(path.read_text())
    # The branch was wrapped with the config's revision at construction time, which may have been unresolved.
    data["base_model_name_or_path"] = ref.hub_id
    data["revision"] = ref.revision
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _card_text(card: RepoCard | str | None) -> str | None:
    if card is None or isinstance(card, str):
        return card
    if isinstance(card, RepoCard):
        return str(card)
    raise TypeError(f"card must be a ModelCard, Markdown text or None, got {type(card).__name__}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # a filesystem without it
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


# The rename used to move folders into place (a seam for tests that simulate a save killed between steps).
_rename = os.replace


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace something that is not a saved ensemble (a save replaces the whole folder)."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a folder")
    if not (directory / CONFIG_FILE).is_file() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory}: exists and is not a saved ensemble (no {CONFIG_FILE}); refusing to replace it"
        )


def _recover_interrupted_save(directory: Path) -> None:
    """Undo what a killed save left: put back a model moved aside (``.NAME.old-*``) when ``directory`` is gone,
    and remove every other leftover (``.NAME.saving-*``, ``.NAME.old-*``)."""
    if not directory.parent.is_dir():
        return
    if not directory.exists():
        moved_aside = sorted(
            (p for p in directory.parent.glob(f".{directory.name}.old-*") if (p / CONFIG_FILE).is_file()),
            key=lambda p: p.stat().st_mtime_ns,
        )
        if moved_aside:
            logger.warning("%s: restoring the model an interrupted save had moved aside", directory)
            _rename(moved_aside[-1], directory)
    for pattern in (f".{directory.name}.saving-*", f".{directory.name}.old-*"):
        for leftover in directory.parent.glob(pattern):
            logger.info("removing leftover of an interrupted save: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(staging: Path, directory: Path) -> None:
    """Make the complete ``staging`` folder ``directory``, replacing an older save as a whole (see the module
    docstring): at every instant ``directory`` is the old save or the new one, never a mix."""
    if not directory.exists():
        _rename(staging, directory)  # one rename: the folder appears complete or not at all
        return
    _check_replaceable(directory)
    if _exchange(staging, directory):  # one step; staging now holds the old save, removed by the caller
        return
    # No atomic swap here: move the old save aside, the new one in, and put the old one back on any failure.
    # Killed between the two renames, the old save waits in .NAME.old-*; the next save of NAME restores it.
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    _rename(directory, old)
    try:
        _rename(staging, directory)
    except BaseException:
        _rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- loading


def load_pretrained(
    id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    expert_overrides: Mapping[str, str | os.PathLike] | None = None,
) -> Ensemble:
    """Load a saved ensemble from a folder or a Hub repo (``ORG/NAME``), in eval mode.

    Every expert is loaded from its recorded source at its recorded commit, with its recorded spec, and must have
    the recorded weights (SHA-256). ``revision``, ``token``, ``cache_dir`` and ``local_files_only`` apply to the
    ensemble repo and to the experts' repos alike (``local_files_only=None``: ``HF_HUB_OFFLINE``).

    Args:
        expert_overrides: expert name -> another Hub ID (``ORG/NAME[@REV]``) or local folder to load that expert
            from (e.g. a copy of a local expert on another machine). Its weights must still match the recorded
            hash.

    Raises:
        EnsembleLoadError: one line naming the source and the problem: not found, incomplete folder, a config
            written by a newer enecg format, an expert that cannot be loaded or whose weights changed, weights
            that do not fit the configured model.
    """
    folder, where = _locate(id_or_dir, revision, token, cache_dir, local_files_only)
    config_path = folder / CONFIG_FILE
    try:
        config = EnsembleConfig.load(config_path)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise EnsembleLoadError(_one_line(f"{where}: {exc}")) from exc
    written_by = config.enecg_version
    if _newer_version(written_by, ENECG_VERSION):
        logger.warning("%s was saved by enecg %s, newer than this %s", where, written_by, ENECG_VERSION)
    overrides = {str(k): v for k, v in (expert_overrides or {}).items()}
    unknown = sorted(set(overrides) - set(config.expert_names))
    if unknown:
        raise EnsembleLoadError(
            f"{where}: expert_overrides names unknown experts {unknown}; experts: {config.expert_names}"
        )

    experts, refs = {}, []
    for ref in config.experts:
        expert, loaded_ref = _load_expert(
            ref, overrides.get(ref.name), where, token, cache_dir, local_files_only
        )
        experts[ref.name] = expert
        refs.append(loaded_ref)
    config.experts = refs
    thresholds_path = folder / THRESHOLDS_FILE
    try:
        thresholds = (
            check_thresholds(config, json.loads(thresholds_path.read_text()))
            if thresholds_path.is_file()
            else {}
        )
        ensemble = Ensemble(config, experts)
    except (ValueError, TypeError) as exc:
        raise EnsembleLoadError(_one_line(f"{where}: {exc}")) from exc
    weights_path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except FileNotFoundError:
        raise EnsembleLoadError(f"{where}: no {WEIGHTS_FILE} (incomplete save or upload?)") from None
    except (SafetensorError, OSError) as exc:
        raise EnsembleLoadError(
            _one_line(f"{weights_path}: not a readable safetensors file ({exc})")
        ) from exc
    expected_stats = expert_running_stats(ensemble)
    missing_stats = sorted(set(expected_stats) - set(state))
    if missing_stats:
        raise EnsembleLoadError(
            f"{weights_path}: missing the experts' running statistics {missing_stats[:5]} (of {len(missing_stats)})"
        )
    stats = {name: state.pop(name) for name in expected_stats}
    try:
        ensemble.load_trainable_state_dict(state, source=str(weights_path))
        for name, value in stats.items():
            if value.shape != expected_stats[name].shape:
                raise ValueError(
                    f"{weights_path}: {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(expected_stats[name].shape)}"
                )
            expected_stats[name].copy_(value)
    except ValueError as exc:
        raise EnsembleLoadError(_one_line(str(exc))) from exc
    ensemble.decision_thresholds = thresholds
    return ensemble.eval()


def _load_expert(
    ref: ExpertRef,
    override: str | os.PathLike | None,
    where: str,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
) -> tuple[Any, ExpertRef]:
    """Load one expert as recorded (or from its override) and check its weights' hash."""
    if override is not None:
        source, revision = str(override), None
    elif is_hub_ref(ref):
        source, revision = ref.hub_id, ref.revision
    else:
        source, revision = ref.hub_id, None
    label = f"{source}@{revision}" if revision else source
    try:
        expert = load_expert(
            source,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            spec=_spec_argument(ref),
        )
    except (ExpertLoadError, WeightsError, SpecError, ValueError) as exc:
        hint = ""
        if override is None and not is_hub_ref(ref):
            hint = (
                f"; it was saved from a local folder: pass expert_overrides={{{ref.name!r}: PATH_OR_HUB_ID}} "
                f"to load it from elsewhere"
            )
        raise EnsembleLoadError(_one_line(f"{where}: expert {ref.name!r} ({label}): {exc}{hint}")) from exc
    found = weights_sha256(expert.weights_path)
    if ref.weights_sha256 is not None and found != ref.weights_sha256:
        raise EnsembleLoadError(
            f"{where}: expert {ref.name!r} ({expert.source or label}) has other weights than the ensemble was "
            f"trained with: recorded sha256 {ref.weights_sha256[:16]}…, found {found[:16]}…; load the recorded "
            f"revision or retrain the ensemble"
        )
    if ref.weights_sha256 is None:
        logger.warning(
            "%s: no weights hash recorded for expert %r: its weights cannot be checked", where, ref.name
        )
    local_folder = expert.source[len(_LOCAL_PREFIX) :] if expert.source.startswith(_LOCAL_PREFIX) else None
    loaded = dataclasses.replace(
        ref,
        hub_id=expert.hub_id or local_folder or ref.hub_id,
        revision=expert.revision,
        weights_sha256=found,
    )
    return expert, loaded


def _spec_argument(ref: ExpertRef) -> Spec | str | None:
    """The recorded spec, so the expert is built and fed as it was when the ensemble was trained."""
    if isinstance(ref.spec, dict):
        return Spec.from_dict(ref.spec, source=f"config.json experts[{ref.name}].spec")
    return ref.spec


def _locate(
    id_or_dir: str | os.PathLike,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
) -> tuple[Path, str]:
    """The local folder holding the saved files (downloaded for a Hub ID), and a name for messages."""
    path = Path(id_or_dir).expanduser()
    if path.is_dir():
        if revision is not None:
            raise EnsembleLoadError(
                f"{path}: a revision ({revision!r}) only applies to Hub repos, not folders"
            )
        if not (path / CONFIG_FILE).is_file():
            raise EnsembleLoadError(f"{path}: not a saved ensemble (no {CONFIG_FILE}; interrupted save?)")
        return path, str(path)
    name = str(id_or_dir)
    if not _HUB_ID_RE.match(name):
        raise EnsembleLoadError(f"{name}: neither a folder nor a Hub repo id of the form ORG/NAME")
    cache = str(cache_dir) if cache_dir is not None else hf_constants.HF_HUB_CACHE  # read now: may be patched
    offline = bool(hf_constants.HF_HUB_OFFLINE) if local_files_only is None else bool(local_files_only)
    wanted = revision or "main"
    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                name,
                revision=wanted,
                token=token,
                cache_dir=cache,
                local_files_only=offline,
                allow_patterns=list(_LOAD_FILES),
                endpoint=hf_constants.ENDPOINT,
            )
        )
    except Exception as exc:
        mapped = _hub_error(exc, name, wanted, offline)
        if mapped is None:
            raise
        raise mapped from exc
    where = f"{name}@{folder.name}" if _COMMIT_RE.match(folder.name) else f"{name}@{wanted}"
    if not (folder / CONFIG_FILE).is_file():
        hint = " (or not in the local cache)" if offline else ""
        raise EnsembleLoadError(f"{where}: no {CONFIG_FILE} in the repo{hint}: not an enecg ensemble")
    return folder, where


def _hub_error(exc: Exception, repo_id: str, revision: str, offline: bool) -> EnsembleLoadError | None:
    endpoint = hf_constants.ENDPOINT
    if isinstance(exc, RevisionNotFoundError):
        return EnsembleLoadError(f"{repo_id}: revision {revision!r} not found on {endpoint}")
    if isinstance(exc, GatedRepoError):
        return EnsembleLoadError(f"{repo_id}: gated repository: accept its terms on the Hub and pass a token")
    if isinstance(exc, RepositoryNotFoundError):
        return EnsembleLoadError(
            f"{repo_id}: repository not found on {endpoint} (private repos need a token)"
        )
    if isinstance(exc, LocalEntryNotFoundError) or (offline and isinstance(exc, (OSError, ValueError))):
        mode = "offline (HF_HUB_OFFLINE / local_files_only)" if offline else "the Hub could not be reached"
        return EnsembleLoadError(f"{repo_id}@{revision}: not in the local Hub cache and {mode}")
    if isinstance(exc, HfHubHTTPError):
        return EnsembleLoadError(_one_line(f"{repo_id}@{revision}: Hub request failed: {exc}"))
    if isinstance(exc, OSError):
        return EnsembleLoadError(_one_line(f"{repo_id}@{revision}: could not download: {exc}"))
    return None


def _newer_version(a: str, b: str) -> bool:
    """Whether version ``a`` is newer than ``b`` (numeric release parts only; unknown versions never are)."""

    def parts(text: str) -> tuple[int, ...]:
        match = re.match(r"^(\d+(?:\.\d+)*)", text or "")
        return tuple(int(p) for p in match.group(1).split(".")) if match else ()

    pa, pb = parts(a), parts(b)
    return bool(pa and pb) and pa > pb


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


__all__ = [
    "ADAPTERS_DIR",
    "CARD_FILE",
    "THRESHOLDS_FILE",
    "WEIGHTS_FILE",
    "EnsembleLoadError",
    "expert_running_stats",
    "is_hub_ref",
    "load_pretrained",
    "resolved_config",
    "save_pretrained",
    "weights_sha256",
]
