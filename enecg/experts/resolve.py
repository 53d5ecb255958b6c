"""Resolving an expert name to local files + the spec that says how to load them.

Accepted names (first match wins):

* ``local-dir:PATH`` or an existing folder: the files in that folder;
* ``hf-hub:ORG/NAME[@REV]``: a Hub repo;
* a spec file (``*.yaml`` / ``*.json``);
* a bundled spec name (``hubert-ecg-small``, see ``enecg experts list``): its Hub repo and file;
* ``ORG/NAME[@REV]``: a Hub repo.

Which spec applies: the ``spec=`` argument; else the bundled spec the name is (or the one bundled for that Hub
ID: published third-party repos carry no spec of their own, so no extra request is made); else the folder's / repo's
own ``enecg_expert.json`` (in-house experts); else the families' ``detect(folder)`` (a published layout recognised
from its files, borrowing the input contract of the family's bundled specs and reading the config from the files).

Hub files are fetched with :func:`huggingface_hub.hf_hub_download` (one call per file the spec needs), honouring
``revision``, ``token``, ``cache_dir`` and ``local_files_only``; ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` /
``HF_HUB_CACHE`` are read from :mod:`huggingface_hub.constants` at call time, so patching them works.

Recorded revision: for a Hub repo, the 40-hex commit sha of the snapshot the files came from (read from the cache
path ``.../snapshots/<sha>/...``, which huggingface_hub names after the ``X-Repo-Commit`` it received). For a local
folder it is ``None``: a folder has no immutable identity, and hashing gigabytes of weights on every load would be
costly; provenance then rests on the folder path (``ResolvedExpert.source``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from enecg.experts.family import family_names, get_family
from enecg.experts.spec import (
    SPEC_FILENAME,
    Spec,
    SpecError,
    bundled_specs,
    default_spec_for_hub_id,
)

logger = logging.getLogger(__name__)

LOCAL_PREFIX = "local-dir:"
HUB_PREFIX = "hf-hub:"
_HUB_NAME_RE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[^@\s]+))?$"
)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class ExpertLoadError(RuntimeError):
    """An expert that cannot be resolved or loaded. One-line message naming the repo / folder / file."""


@dataclass
class ResolvedExpert:
    """Where an expert's files are and which spec loads them.

    Attributes:
        spec: the adapter spec that applies.
        folder: local folder holding the files (a Hub cache snapshot folder for Hub repos).
        weights_path: the weights file to read.
        files: every required repo file (weights, extra files, config file) -> local path.
        hub_id: the Hub repo the files came from (None for a local folder).
        revision: the resolved commit sha (Hub) or None (local folder; see the module docstring).
        requested_revision: the revision that was asked for (branch/tag/sha), Hub only.
        source: ``'hf-hub:ORG/NAME@<sha>'`` or ``'local-dir:<path>'``, for provenance and messages.
        spec_origin: where the spec came from ('argument', 'bundled', 'repo', 'detected').
    """

    spec: Spec
    folder: Path
    weights_path: Path
    files: dict[str, Path] = field(default_factory=dict)
    hub_id: str | None = None
    revision: str | None = None
    requested_revision: str | None = None
    source: str = ""
    spec_origin: str = "argument"


def resolve_expert(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    spec: Spec | str | Path | None = None,
) -> ResolvedExpert:
    """Resolve ``name_or_path`` (see the module docstring) to local files and a spec. Downloads as needed.

    Args:
        revision: Hub branch, tag or commit (overrides ``@REV`` in the name and the spec's default).
        token: Hub token (None: huggingface_hub's default, e.g. ``HF_TOKEN`` or the saved login).
        cache_dir: Hub cache folder (None: ``huggingface_hub.constants.HF_HUB_CACHE``).
        local_files_only: only use the cache (None: ``huggingface_hub.constants.HF_HUB_OFFLINE``).
        spec: a :class:`Spec`, a bundled spec name or a spec file, overriding every other spec source.
    """
    explicit_spec = _coerce_spec(spec)
    name = str(name_or_path)

    if name.startswith(LOCAL_PREFIX):
        return _resolve_local(Path(name[len(LOCAL_PREFIX) :]).expanduser(), explicit_spec, revision)
    if name.startswith(HUB_PREFIX):
        repo_id, name_revision = _parse_hub_name(name[len(HUB_PREFIX) :], name)
        return _resolve_hub(
            repo_id,
            _pick_revision(revision, name_revision, name),
            explicit_spec,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_local(path, explicit_spec, revision)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        file_spec = Spec.from_file(path)
        return _resolve_spec(
            explicit_spec or file_spec, file_spec, revision, token, cache_dir, local_files_only
        )
    specs = bundled_specs()
    if name in specs:
        return _resolve_spec(
            explicit_spec or specs[name], specs[name], revision, token, cache_dir, local_files_only
        )
    match = _HUB_NAME_RE.match(name)
    if match and not path.exists():
        return _resolve_hub(
            match["repo"],
            _pick_revision(revision, match["rev"], name),
            explicit_spec,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    raise ExpertLoadError(
        f"{name}: not a folder, a spec file, a bundled spec name or a Hub repo id ORG/NAME; "
        f"bundled specs: {', '.join(sorted(specs)) or 'none'}"
    )


# ---------------------------------------------------------------------- local folders


def _resolve_local(folder: Path, explicit_spec: Spec | None, revision: str | None) -> ResolvedExpert:
    if not folder.is_dir():
        raise ExpertLoadError(f"{folder}: expert folder not found")
    if revision is not None:
        raise ExpertLoadError(
            f"{folder}: a revision ({revision!r}) only applies to Hub repos, not local folders"
        )
    folder = folder.resolve()
    spec, origin = _spec_for_folder(folder, explicit_spec, hub_id=None)
    files = {}
    for name in spec.required_files:
        path = folder / name
        if not path.is_file():
            raise ExpertLoadError(
                f"{path}: file {name!r} required by spec {spec.name!r} not found in {folder}"
            )
        files[name] = path
    return ResolvedExpert(
        spec=spec,
        folder=folder,
        weights_path=files[spec.weights_file],
        files=files,
        source=f"{LOCAL_PREFIX}{folder}",
        spec_origin=origin,
    )


def _spec_for_folder(folder: Path, explicit_spec: Spec | None, *, hub_id: str | None) -> tuple[Spec, str]:
    """The spec for a folder's files: explicit > the folder's enecg_expert.json > bundled for hub_id > detect."""
    if explicit_spec is not None:
        return explicit_spec, "argument"
    own = folder / SPEC_FILENAME
    if own.is_file():
        return Spec.from_json(own), "repo"
    if hub_id is not None:
        bundled = default_spec_for_hub_id(hub_id)
        if bundled is not None:
            return bundled, "bundled"
    return _detect_spec(folder, name=folder.name), "detected"


def _detect_spec(folder: Path, *, name: str) -> Spec:
    """Recognise a published layout with the families' ``detect`` and borrow the family's bundled contract."""
    hits: list[tuple[str, Path]] = []
    for family_name in family_names():
        weights = get_family(family_name).detect(folder)
        if weights is not None:
            hits.append((family_name, Path(weights)))
    if not hits:
        raise ExpertLoadError(
            f"{folder}: no {SPEC_FILENAME} and no expert family recognises the files "
            f"(families: {', '.join(family_names()) or 'none'}); pass spec= or add {SPEC_FILENAME}"
        )
    if len(hits) > 1:
        raise ExpertLoadError(
            f"{folder}: several families recognise the files ({[h[0] for h in hits]}); pass spec="
        )
    family_name, weights = hits[0]
    weights_file = weights.relative_to(folder).as_posix() if weights.is_absolute() else weights.as_posix()
    template = _template_spec(folder, family_name, weights_file)
    # The folder need not hold the published size: an inline constructor config would be a guess, so the
    # config comes from the files (the family's read_checkpoint) unless the template reads a repo JSON file.
    config_from, config = template.config_from, dict(template.config)
    if config_from == "inline":
        config_from, config = "checkpoint", {}
    return template.replace(
        config_from=config_from,
        config=config,
        name=_safe_name(name),
        weights_file=weights_file,
        hub_id=None,
        revision="main",
        default_for_repo=False,
        extra_files=[f for f in template.extra_files if (folder / f).is_file()],
        embedding_dim=None,  # taken from the family for this config
        description=f"{family_name} model recognised from the files in {folder.name}",
        license=template.license,
    )


def _template_spec(folder: Path, family_name: str, weights_file: str) -> Spec:
    """A bundled spec of the family whose input contract and key expectations a detected folder borrows.

    Prefers specs naming the same weights file; requires them to agree on the input contract (else the choice
    would be a guess: e.g. 12-lead vs 1-lead models of one family)."""
    same_family = [s for s in bundled_specs().values() if s.family == family_name]
    candidates = [
        s for s in same_family if Path(s.weights_file).name == Path(weights_file).name
    ] or same_family
    if not candidates:
        raise ExpertLoadError(
            f"{folder}: recognised as family {family_name!r}, but no bundled spec gives its input contract; "
            f"pass spec= or add {SPEC_FILENAME}"
        )
    contracts = {s.contract for s in candidates}
    if len(contracts) > 1:
        raise ExpertLoadError(
            f"{folder}: recognised as family {family_name!r}, but its bundled specs "
            f"({', '.join(sorted(s.name for s in candidates))}) differ in input contract; pass spec="
        )
    return sorted(candidates, key=lambda s: s.name)[0]


# ---------------------------------------------------------------------- Hub repos


def _resolve_spec(
    spec: Spec,
    named_spec: Spec,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
    local_files_only: bool | None,
) -> ResolvedExpert:
    """A spec name / file: load ``spec`` from the repo ``named_spec`` points at."""
    if named_spec.hub_id is None:
        raise ExpertLoadError(
            f"spec {named_spec.name!r} names no hub_id; load its folder with local-dir:PATH"
        )
    origin = "bundled" if spec is named_spec else "argument"
    return _resolve_hub(
        named_spec.hub_id,
        revision or named_spec.revision,
        spec,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        origin=origin,
    )


def _resolve_hub(
    repo_id: str,
    revision: str | None,
    spec: Spec | None,
    *,
    token: str | bool | None,
    cache_dir: str | Path | None,
    local_files_only: bool | None,
    origin: str = "argument",
) -> ResolvedExpert:
    hub = _HubFetcher(repo_id, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if spec is None:
        # A bundled spec wins for the published repos it describes (no extra request); other repos may carry
        # their own spec (in-house experts), else the families recognise the files.
        spec = default_spec_for_hub_id_or_error(repo_id)
        origin = "bundled"
        if spec is None:
            own_spec_path = hub.try_download(SPEC_FILENAME, revision or "main")
            if own_spec_path is not None:
                spec, origin = Spec.from_json(own_spec_path), "repo"
    if revision is None:
        revision = spec.revision if spec is not None else "main"

    if spec is None:
        # Unknown repo: fetch the metadata + weight files and let the families recognise the layout.
        folder = hub.snapshot(revision)
        spec, origin = _detect_spec(folder, name=repo_id.split("/")[-1]), "detected"

    files = {name: hub.download(name, revision) for name in spec.required_files}
    commits = {_commit_of(path) for path in files.values()}
    if len(commits) != 1:
        raise ExpertLoadError(
            f"{repo_id}@{revision}: files came from different commits {sorted(map(str, commits))}"
        )
    commit = commits.pop()
    weights_path = files[spec.weights_file]
    folder = _snapshot_root(weights_path, spec.weights_file)
    return ResolvedExpert(
        spec=spec,
        folder=folder,
        weights_path=weights_path,
        files=files,
        hub_id=repo_id,
        revision=commit,
        requested_revision=revision,
        source=f"{HUB_PREFIX}{repo_id}@{commit or revision}",
        spec_origin=origin,
    )


def default_spec_for_hub_id_or_error(repo_id: str) -> Spec | None:
    try:
        return default_spec_for_hub_id(repo_id)
    except SpecError as exc:
        raise ExpertLoadError(str(exc)) from None


class _HubFetcher:
    """hf_hub_download / snapshot_download for one repo, with every Hub error turned into one clear line."""

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | bool | None,
        cache_dir: str | Path | None,
        local_files_only: bool | None,
    ) -> None:
        self.repo_id = repo_id
        self.token = token
        # Read at call time (not import time) so patched constants / late env changes are honoured.
        self.cache_dir = str(cache_dir) if cache_dir is not None else hf_constants.HF_HUB_CACHE
        self.local_files_only = (
            bool(hf_constants.HF_HUB_OFFLINE) if local_files_only is None else local_files_only
        )
        self.offline = self.local_files_only or bool(hf_constants.HF_HUB_OFFLINE)
        self.endpoint = hf_constants.ENDPOINT

    def download(self, filename: str, revision: str) -> Path:
        try:
            return Path(
                huggingface_hub.hf_hub_download(
                    self.repo_id,
                    filename,
                    revision=revision,
                    token=self.token,
                    cache_dir=self.cache_dir,
                    local_files_only=self.local_files_only,
                    endpoint=self.endpoint,
                )
            )
        except Exception as exc:
            mapped = self._error(exc, revision, filename)
            if mapped is None:
                raise
            raise mapped from exc

    def try_download(self, filename: str, revision: str) -> Path | None:
        """Download ``filename`` if the repo has it; None if it does not (or, offline, if it is not cached)."""
        try:
            return self.download(filename, revision)
        except ExpertLoadError as exc:
            cause = exc.__cause__
            if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
                return None
            if isinstance(cause, LocalEntryNotFoundError) and self._revision_cached(revision):
                return None  # offline, the revision is cached, the file is not: treat as absent
            raise

    def snapshot(self, revision: str) -> Path:
        patterns = [SPEC_FILENAME, "*.json", "*.yaml", "*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt"]
        try:
            return Path(
                huggingface_hub.snapshot_download(
                    self.repo_id,
                    revision=revision,
                    token=self.token,
                    cache_dir=self.cache_dir,
                    local_files_only=self.local_files_only,
                    allow_patterns=patterns,
                    endpoint=self.endpoint,
                )
            )
        except Exception as exc:
            mapped = self._error(exc, revision, None)
            if mapped is None:
                raise
            raise mapped from exc

    # -- error mapping

    def _error(self, exc: Exception, revision: str, filename: str | None) -> ExpertLoadError | None:
        """One-line error for a Hub failure; None for an exception that is not about the Hub (re-raised)."""
        repo, where = self.repo_id, f"{self.repo_id}@{revision}"
        what = f"file {filename!r}" if filename else "the repository files"
        if isinstance(exc, RevisionNotFoundError):
            return ExpertLoadError(f"{repo}: revision {revision!r} not found on the Hub ({self.endpoint})")
        if isinstance(exc, GatedRepoError):
            return ExpertLoadError(f"{repo}: gated repository: accept its terms on the Hub and pass a token")
        if isinstance(exc, RepositoryNotFoundError):
            return ExpertLoadError(
                f"{repo}: repository not found on {self.endpoint} (private repos need a token)"
            )
        if isinstance(exc, LocalEntryNotFoundError) or (
            self.offline and isinstance(exc, (OSError, ValueError))
        ):
            return ExpertLoadError(self._offline_message(revision, filename))
        if isinstance(exc, EntryNotFoundError):
            return ExpertLoadError(f"{where}: {what} not found in the repository")
        if isinstance(exc, HfHubHTTPError):
            return ExpertLoadError(f"{where}: Hub request for {what} failed: {_first_line(exc)}")
        if isinstance(exc, OSError):
            return ExpertLoadError(f"{where}: could not fetch {what}: {_first_line(exc)}")
        return None

    def _offline_message(self, revision: str, filename: str | None) -> str:
        """Explain a cache miss precisely: repo not cached, revision not cached, or file not cached."""
        mode = (
            "offline (HF_HUB_OFFLINE / local_files_only)" if self.offline else "the Hub could not be reached"
        )
        repo_cache = self._repo_cache()
        if not repo_cache.is_dir():
            return f"{self.repo_id}: not in the local Hub cache {self.cache_dir} and {mode}"
        if not self._revision_cached(revision):
            known = (
                sorted(p.name for p in (repo_cache / "refs").glob("*"))
                if (repo_cache / "refs").is_dir()
                else []
            )
            return (
                f"{self.repo_id}: revision {revision!r} not found in the local Hub cache "
                f"(cached refs: {', '.join(known) or 'none'}) and {mode}"
            )
        what = f"file {filename!r}" if filename else "the repository files"
        return f"{self.repo_id}@{revision}: {what} not found in the cached snapshot and {mode}"

    def _repo_cache(self) -> Path:
        return Path(self.cache_dir) / hf_constants.REPO_ID_SEPARATOR.join(
            ["models", *self.repo_id.split("/")]
        )

    def _revision_cached(self, revision: str) -> bool:
        repo_cache = self._repo_cache()
        if (repo_cache / "refs" / revision).is_file():
            return True
        return bool(_COMMIT_RE.match(revision)) and (repo_cache / "snapshots" / revision).is_dir()


# ---------------------------------------------------------------------- small helpers


def _coerce_spec(spec: Spec | str | Path | None) -> Spec | None:
    if spec is None or isinstance(spec, Spec):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml", ".json"):
        return Spec.from_file(path)
    specs = bundled_specs()
    if text in specs:
        return specs[text]
    raise ExpertLoadError(f"spec {text!r}: not a spec file (.yaml/.json) nor a bundled spec name")


def _parse_hub_name(text: str, original: str) -> tuple[str, str | None]:
    match = _HUB_NAME_RE.match(text)
    if not match:
        raise ExpertLoadError(f"{original}: not a Hub repo id of the form ORG/NAME[@REVISION]")
    return match["repo"], match["rev"]


def _pick_revision(argument: str | None, in_name: str | None, name: str) -> str | None:
    if argument is not None and in_name is not None and argument != in_name:
        raise ExpertLoadError(
            f"{name}: revision {in_name!r} in the name conflicts with revision={argument!r}"
        )
    return argument if argument is not None else in_name


def _commit_of(path: Path) -> str | None:
    """The commit sha from a Hub cache path ``.../snapshots/<sha>/<file>`` (None outside a Hub cache)."""
    for parent in path.parents:
        if parent.parent.name == "snapshots" and _COMMIT_RE.match(parent.name):
            return parent.name
    return None


def _snapshot_root(path: Path, relative: str) -> Path:
    root = path
    for _ in Path(relative).parts:
        root = root.parent
    return root


def _safe_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name or "expert"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
