"""A loopback HTTP server that speaks the Hugging Face Hub protocol, for tests and the offline quickstart.

No upstream project ships a local Hub; the real ``huggingface_hub`` client works unchanged against this small
server, so pushing and pulling ensembles is exercised end to end without a network. It implements the routes
``huggingface_hub`` 2.x uses to create repos, commit files (``preupload`` answers ``uploadMode: "regular"`` for
every file, so contents arrive base64 inside the NDJSON commit and no LFS/Xet storage is involved), read repo
info/trees/refs and resolve files, with the headers and error codes the client turns into its exception classes
(``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``, ``HfHubHTTPError``).

Storage is a directory that survives restarts (the quickstart reuses it)::

    <root>/blobs/<sha256>                               file contents, stored once by content
    <root>/repos/<type>s/<ns>/<name>/repo.json          refs (branch -> commit), visibility, creation date
    <root>/repos/<type>s/<ns>/<name>/commits/<oid>.json one immutable file per commit: parent, message, snapshot

Each repository has a linear history per branch; a commit id is the SHA-1 of its parent, message, date and
snapshot (path -> content), like git's. Like the real Hub, a new repository starts with one commit holding a
``.gitattributes`` file. A commit writes its blobs and commit file first and moves the branch ref (an atomic
rename of ``repo.json``) last, under a lock, so a failed or rejected request never leaves a partial commit.

It binds ``127.0.0.1`` only. Not implemented: LFS/Xet uploads, pull requests, tags, pagination (one page),
``.gitignore`` rules, namespace permissions (any valid token may write anywhere). Unknown routes answer 404 with
a message naming the route, so a client feature this server lacks shows up clearly in the request log.

Example::

    with LocalHub(tmp_path / "hub") as hub, use_endpoint(hub.url):
        huggingface_hub.create_repo("org/model")
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from enecg.utils.files import write_bytes_atomic

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
DEFAULT_BRANCH = "main"
ANONYMOUS_USER = "local-user"

# The URL segment of each repo type in API routes (`/api/models/...`) and in file URLs (`/datasets/ns/name/...`).
_API_SEGMENT_TO_TYPE = {"models": "model", "datasets": "dataset"}
_URL_PREFIX_OF_TYPE = {"model": "", "dataset": "datasets/"}

# What the real Hub puts in the first commit of a new repository (abridged): code that lists repo files
# must cope with it, so the local server does the same.
INITIAL_GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.npy filter=lfs diff=lfs merge=lfs -text\n"
    "*.npz filter=lfs diff=lfs merge=lfs -text\n"
    "*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    "*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    "*.pt filter=lfs diff=lfs merge=lfs -text\n"
    "*.pth filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
)

_REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_OID_RE = re.compile(r"^[0-9a-f]{7,40}$")
_BYTES_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_COPY_CHUNK = 1024 * 1024


class HubHTTPError(Exception):
    """An HTTP error answer: status, message (``X-Error-Message`` and JSON ``error``) and optional error code.

    ``error_code`` is the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that
    ``huggingface_hub`` maps to its exception classes.
    """

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.body = dict(body or {})  # extra JSON fields next to "error"


@dataclass(frozen=True)
class LoggedRequest:
    """One handled request, for assertions: ``route`` is a short name such as ``"commit"`` or ``"resolve"``."""

    method: str
    path: str
    route: str
    status: int


@dataclass
class _FailureRule:
    matches: Callable[[str, str, str], bool]  # (method, path, route) -> bool
    status: int
    remaining: int
    message: str


@dataclass(frozen=True)
class FileEntry:
    """A file in a snapshot: content hash (blob key), git blob id (what the Hub calls ``oid``) and size."""

    sha256: str
    oid: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "oid": self.oid, "size": self.size}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        return cls(sha256=data["sha256"], oid=data["oid"], size=int(data["size"]))

    @classmethod
    def of_content(cls, content: bytes) -> FileEntry:
        return cls(sha256=hashlib.sha256(content).hexdigest(), oid=git_blob_oid(content), size=len(content))


@dataclass(frozen=True)
class Commit:
    """An immutable commit: ``files`` is the full snapshot (path -> entry) after the commit."""

    oid: str
    parent: str | None
    summary: str
    description: str
    date: str
    files: Mapping[str, FileEntry]

    def to_json(self) -> dict[str, Any]:
        return {
            "oid": self.oid,
            "parent": self.parent,
            "summary": self.summary,
            "description": self.description,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Commit:
        return cls(
            oid=data["oid"],
            parent=data["parent"],
            summary=data["summary"],
            description=data["description"],
            date=data["date"],
            files={path: FileEntry.from_json(entry) for path, entry in data["files"].items()},
        )


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.repo_type,
            "id": self.repo_id,
            "private": self.private,
            "createdAt": self.created_at,
            "refs": dict(self.refs),
        }


def git_blob_oid(content: bytes) -> str:
    """The git blob id of ``content`` (what the Hub reports as a regular file's ``oid`` and ``ETag``)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _validate_repo_path(path: str) -> str:
    """Reject paths that could escape the repo or that git would not store (``..``, absolute, empty parts)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in path:
        raise HubHTTPError(400, f"Invalid path in repository: {path!r}")
    return path


# ----------------------------------------------------------------------------------------------------- storage


class HubStorage:
    """Repositories, commits and blobs on disk, with an in-memory index. All mutations hold one lock."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._commits: dict[tuple[str, str], dict[str, Commit]] = {}
        self._load()

    # -- paths ---------------------------------------------------------------------------------------------

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _load(self) -> None:
        repos_root = self.root / "repos"
        for repo_file in sorted(repos_root.glob("*/*/*/repo.json")):
            try:
                data = json.loads(repo_file.read_text())
                repo = _Repo(
                    repo_type=data["type"],
                    repo_id=data["id"],
                    private=bool(data["private"]),
                    created_at=data["createdAt"],
                    refs=dict(data["refs"]),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{repo_file}: unreadable local Hub repository index ({exc})") from exc
            self._repos[(repo.repo_type, repo.repo_id)] = repo
            self._commits[(repo.repo_type, repo.repo_id)] = {}

    # -- reads -----------------------------------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise HubHTTPError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
            return repo

    def list_repos(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._repos)

    def get_commit(self, repo: _Repo, oid: str) -> Commit:
        key = (repo.repo_type, repo.repo_id)
        with self._lock:
            cache = self._commits.setdefault(key, {})
            commit = cache.get(oid)
            if commit is None:
                path = self._repo_dir(*key) / "commits" / f"{oid}.json"
                try:
                    commit = Commit.from_json(json.loads(path.read_text()))
                except FileNotFoundError:
                    raise HubHTTPError(
                        404, f"Commit {oid} not found in {repo.repo_id}", "RevisionNotFound"
                    ) from None
                cache[oid] = commit
            return commit

    def resolve_revision(self, repo: _Repo, revision: str) -> str:
        """A branch name, a full commit id or a unique commit-id prefix (>= 7 hex) -> full commit id."""
        with self._lock:
            if revision in repo.refs:
                return repo.refs[revision]
            if _COMMIT_OID_RE.fullmatch(revision):
                matches = {oid for oid in self._history_oids(repo) if oid.startswith(revision)}
                if len(matches) == 1:
                    return matches.pop()
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _history_oids(self, repo: _Repo) -> Iterator[str]:
        seen: set[str] = set()
        for head in repo.refs.values():
            oid: str | None = head
            while oid is not None and oid not in seen:
                seen.add(oid)
                yield oid
                oid = self.get_commit(repo, oid).parent

    def history(self, repo: _Repo, oid: str) -> Iterator[Commit]:
        """Commits from ``oid`` back to the first one."""
        current: str | None = oid
        while current is not None:
            commit = self.get_commit(repo, current)
            yield commit
            current = commit.parent

    # -- writes ----------------------------------------------------------------------------------------------

    def _save_repo(self, repo: _Repo) -> None:
        path = self._repo_dir(repo.repo_type, repo.repo_id) / "repo.json"
        write_bytes_atomic(path, json.dumps(repo.to_json(), indent=1).encode())

    def _store_blob(self, content: bytes, entry: FileEntry) -> None:
        path = self.blob_path(entry.sha256)
        if not path.exists():  # content-addressed: an existing blob already holds these bytes
            write_bytes_atomic(path, content)

    def _write_commit(
        self,
        repo: _Repo,
        parent: str | None,
        summary: str,
        description: str,
        files: Mapping[str, FileEntry],
    ) -> Commit:
        date = _utc_now()
        identity = {
            "parent": parent,
            "summary": summary,
            "description": description,
            "date": date,
            "files": {path: entry.sha256 for path, entry in sorted(files.items())},
        }
        oid = hashlib.sha1(json.dumps(identity, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
        commit = Commit(
            oid=oid, parent=parent, summary=summary, description=description, date=date, files=files
        )
        path = self._repo_dir(repo.repo_type, repo.repo_id) / "commits" / f"{oid}.json"
        write_bytes_atomic(path, json.dumps(commit.to_json()).encode())
        self._commits.setdefault((repo.repo_type, repo.repo_id), {})[oid] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubHTTPError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_utc_now())
            content = INITIAL_GITATTRIBUTES.encode()
            entry = FileEntry.of_content(content)
            self._store_blob(content, entry)
            first = self._write_commit(repo, None, "initial commit", "", {".gitattributes": entry})
            repo.refs[DEFAULT_BRANCH] = first.oid
            self._save_repo(repo)  # last: the repo exists only once its index is complete
            self._repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            self.get_repo(repo_type, repo_id)
            repo_dir = self._repo_dir(repo_type, repo_id)
            # Remove the index first: a half-deleted directory without repo.json is simply ignored on load.
            (repo_dir / "repo.json").unlink()
            for commit_file in (repo_dir / "commits").glob("*.json"):
                commit_file.unlink()
            for directory in (repo_dir / "commits", repo_dir):
                directory.rmdir()
            del self._repos[(repo_type, repo_id)]
            self._commits.pop((repo_type, repo_id), None)

    def commit(
        self,
        repo: _Repo,
        branch: str,
        operations: list[tuple[str, str, bytes | None]],
        summary: str,
        description: str,
        parent_commit: str | None,
    ) -> Commit:
        """Apply ``(kind, path, content)`` operations (``file``, ``deletedFile``, ``deletedFolder``) on ``branch``.

        Every check happens before anything is written; the branch moves only after blobs and the commit file
        are on disk.
        """
        with self._lock:
            if branch not in repo.refs:
                if _COMMIT_OID_RE.fullmatch(branch):
                    raise HubHTTPError(400, f"Cannot commit to {branch!r}: commits must target a branch")
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = self.get_commit(repo, repo.refs[branch])
            if parent_commit is not None and not head.oid.startswith(parent_commit):
                raise HubHTTPError(
                    412,
                    f"A commit has happened since {parent_commit}: {branch} is at {head.oid}. Refresh and retry.",
                )
            files = dict(head.files)
            blobs: list[tuple[bytes, FileEntry]] = []
            for kind, path, content in operations:
                if kind == "file":
                    assert content is not None
                    entry = FileEntry.of_content(content)
                    if any(existing.startswith(path + "/") for existing in files):
                        raise HubHTTPError(400, f"Cannot add file {path!r}: a folder with this name exists")
                    files[path] = entry
                    blobs.append((content, entry))
                elif kind == "deletedFile":
                    if path not in files:
                        raise HubHTTPError(
                            404,
                            f"A file with this name doesn't exist: {path}",
                            "EntryNotFound",
                            {"X-Repo-Commit": head.oid},
                        )
                    del files[path]
                else:  # deletedFolder
                    prefix = path.rstrip("/") + "/"
                    doomed = [existing for existing in files if existing.startswith(prefix)]
                    if not doomed:
                        raise HubHTTPError(
                            404,
                            f"A folder with this name doesn't exist: {path}",
                            "EntryNotFound",
                            {"X-Repo-Commit": head.oid},
                        )
                    for existing in doomed:
                        del files[existing]
            for content, entry in blobs:
                self._store_blob(content, entry)
            commit = self._write_commit(repo, head.oid, summary, description, files)
            new_refs = {**repo.refs, branch: commit.oid}
            self._save_repo(_Repo(repo.repo_type, repo.repo_id, repo.private, repo.created_at, new_refs))
            repo.refs = new_refs
            return commit

    def create_branch(self, repo: _Repo, branch: str, starting_point: str | None) -> None:
        with self._lock:
            if branch in repo.refs:
                raise HubHTTPError(409, f"Branch {branch} already exists in {repo.repo_id}")
            if (
                not branch
                or branch.startswith(("refs/", "/"))
                or ".." in branch
                or _COMMIT_OID_RE.fullmatch(branch)
            ):
                raise HubHTTPError(400, f"Invalid branch name: {branch!r}")
            target = self.resolve_revision(repo, starting_point or DEFAULT_BRANCH)
            new_refs = {**repo.refs, branch: target}
            self._save_repo(_Repo(repo.repo_type, repo.repo_id, repo.private, repo.created_at, new_refs))
            repo.refs = new_refs

    def delete_branch(self, repo: _Repo, branch: str) -> None:
        with self._lock:
            if branch == DEFAULT_BRANCH:
                raise HubHTTPError(403, f"Cannot delete the default branch {DEFAULT_BRANCH}")
            if branch not in repo.refs:
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            new_refs = {name: oid for name, oid in repo.refs.items() if name != branch}
            self._save_repo(_Repo(repo.repo_type, repo.repo_id, repo.private, repo.created_at, new_refs))
            repo.refs = new_refs


# ------------------------------------------------------------------------------------------------ HTTP server


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart on a fixed port must not wait for TIME_WAIT sockets

    def __init__(self, hub: LocalHub, port: int) -> None:
        self.hub = hub
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((LOOPBACK_HOST, port), _HubRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = LOOPBACK_HOST
        self.server_port = self.server_address[1]


class LocalHub:
    """A Hugging Face Hub stand-in on ``http://127.0.0.1:<port>`` backed by ``storage_dir``.

    Args:
        storage_dir: Where repositories and blobs live; reused across restarts.
        tokens: ``None`` for an open server (everyone may write, private repos are readable). Otherwise the accepted bearer tokens (a collection, or a mapping
            token -> user name): write requests, ``whoami`` and reads of private repos then need one of them, and
            get 401 otherwise (as the real Hub: unknown or private repo reads look like ``RepositoryNotFoundError``,
            bad tokens give ``HfHubHTTPError`` "Invalid credentials").
        port: 0 (default) picks a free port. The server never binds anything but 127.0.0.1.
        request_timeout: Seconds a connection may stay silent (idle keep-alive or a stalled body) before closing.
        max_body_bytes: Larger request bodies are refused with 413.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike,
        *,
        tokens: Collection[str] | Mapping[str, str] | None = None,
        port: int = 0,
        request_timeout: float = 30.0,
        max_body_bytes: int = 1 << 31,
    ) -> None:
        self.storage = HubStorage(storage_dir)
        if tokens is None:
            self.tokens: dict[str, str] | None = None
        elif isinstance(tokens, Mapping):
            self.tokens = dict(tokens)
        else:
            self.tokens = {token: ANONYMOUS_USER for token in tokens}
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self._port = port
        self._server: _LoopbackServer | None = None
        self._thread: threading.Thread | None = None
        self._log: list[LoggedRequest] = []
        self._failures: list[_FailureRule] = []
        self._state_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        """Bind 127.0.0.1 and serve in a background thread. Returns ``self``."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running")
        self._server = _LoopbackServer(self, self._port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="enecg-local-hub",
            daemon=True,
        )
        self._thread.start()
        logger.info("Local Hub serving %s from %s", self.url, self.storage.root)
        return self

    def stop(self) -> None:
        """Stop serving, close open keep-alive connections and release the port. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        with server.connections_lock:
            for connection in list(server.open_connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not running: call start() first")
        return self._server.server_port

    @property
    def url(self) -> str:
        """The endpoint to give ``huggingface_hub`` (``HF_ENDPOINT`` or :func:`enecg.testing.endpoint.use_endpoint`)."""
        return f"http://{LOOPBACK_HOST}:{self.port}"

    # -- test hooks ------------------------------------------------------------------------------------------

    def fail_next(
        self,
        route: str | Callable[[str, str, str], bool],
        *,
        status: int = 500,
        times: int = 1,
        message: str = "Injected failure (LocalHub.fail_next)",
    ) -> None:
        """Make the next ``times`` requests matching ``route`` fail with ``status`` before they are processed.

        ``route`` is a route name (``"create"``, ``"preupload"``, ``"commit"``, ``"resolve"``, ``"info"``,
        ``"tree"``, ``"refs"``, ``"branch"``, ``"whoami"``, ``"delete"``, ``"validate-yaml"``) or a predicate
        ``(method, path, route) -> bool``. The request body is read first (the upload really happened) and
        nothing is stored. Note ``huggingface_hub`` retries some calls on 500/502/503/504 with backoff (e.g. the
        commits of ``upload_folder``): use ``times`` or a non-retried status such as 400/422/507 accordingly.
        """
        if times < 1:
            raise ValueError(f"fail_next: times must be >= 1, got {times}")
        if isinstance(route, str):
            name = route

            def matches(method: str, path: str, route_name: str) -> bool:
                return route_name == name

        else:
            matches = route
        with self._state_lock:
            self._failures.append(
                _FailureRule(matches=matches, status=status, remaining=times, message=message)
            )

    def clear_failures(self) -> None:
        with self._state_lock:
            self._failures.clear()

    def _take_failure(self, method: str, path: str, route: str) -> _FailureRule | None:
        with self._state_lock:
            for rule in self._failures:
                if rule.remaining > 0 and rule.matches(method, path, route):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._failures.remove(rule)
                    return rule
        return None

    @property
    def requests(self) -> list[LoggedRequest]:
        """A copy of the request log, oldest first."""
        with self._state_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._state_lock:
            self._log.clear()

    def _record(self, entry: LoggedRequest) -> None:
        with self._state_lock:
            self._log.append(entry)

    # -- convenience reads (for tests and the quickstart) ----------------------------------------------------

    def head_commit(self, repo_id: str, *, repo_type: str = "model", branch: str = DEFAULT_BRANCH) -> str:
        """The commit id ``branch`` points to (``RepoNotFound``/``RevisionNotFound`` as :class:`HubHTTPError`)."""
        repo = self.storage.get_repo(repo_type, repo_id)
        return self.storage.resolve_revision(repo, branch)

    def list_files(
        self, repo_id: str, *, repo_type: str = "model", revision: str = DEFAULT_BRANCH
    ) -> list[str]:
        repo = self.storage.get_repo(repo_type, repo_id)
        return sorted(self.storage.get_commit(repo, self.storage.resolve_revision(repo, revision)).files)


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request of the Hub protocol. Every response carries a Content-Length (keep-alive safe)."""

    protocol_version = "HTTP/1.1"
    server_version = "enecg-local-hub/1"
    server: _LoopbackServer
    # Per-request state, reset by _dispatch; these defaults cover errors raised while parsing the request line.
    _status = 0
    _log_path = ""
    _route_name = "malformed"

    # -- plumbing --------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.timeout = self.server.hub.request_timeout
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def _base_url(self) -> str:
        return self.hub.url

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body_bytes:
            self.close_connection = True  # the unread body makes the connection unusable
            raise HubHTTPError(
                413, f"Request body of {length} bytes exceeds the limit of {self.hub.max_body_bytes}"
            )
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > self.hub.max_body_bytes:
                self.close_connection = True
                raise HubHTTPError(413, f"Request body exceeds the limit of {self.hub.max_body_bytes} bytes")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8", headers)

    def _send_error(self, error: HubHTTPError) -> None:
        headers = {"X-Error-Message": error.message.replace("\n", " "), **error.headers}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        self._send_json({**error.body, "error": error.message}, status=error.status, headers=headers)

    def send_response(self, code: int, message: str | None = None) -> None:
        # Log when the status line is written, before the body: a client may act on the answer (and a test read
        # the log) before this thread finishes writing.
        self._record(code)
        super().send_response(code, message)

    def _record(self, status: int) -> None:
        if not self._status:
            self._status = status
            self.hub._record(LoggedRequest(self.command, self._log_path, self._route_name, status))

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._user: str | None = None
        split = urlsplit(self.path)
        # Split the raw path before unquoting: revisions such as `refs%2Fpr%2F1` are one segment.
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        route, handler = self._route(method, segments)
        self._log_path, self._route_name = split.path, route
        try:
            body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            failure = self.hub._take_failure(method, split.path, route)
            if failure is not None:
                raise HubHTTPError(failure.status, failure.message)
            if handler is None:
                raise HubHTTPError(404, f"Not found: the local Hub does not implement {method} {split.path}")
            self._user = self._authenticate()
            handler(segments, query, body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            self._record(499)  # the client went away before an answer
        except Exception as exc:
            if self._status:  # the response had started: the only honest signal left is a closed connection
                logger.exception("Local Hub failed while answering %s %s", method, self.path)
                self.close_connection = True
            elif isinstance(exc, HubHTTPError):
                self._send_error(exc)
            else:  # a server bug must answer 500, not hang the client
                logger.exception("Local Hub failed on %s %s", method, self.path)
                self._send_error(
                    HubHTTPError(500, f"Internal error in the local Hub: {type(exc).__name__}: {exc}")
                )
        finally:
            self._record(0)  # a no-op when the status line went out

    def _route(
        self, method: str, seg: list[str]
    ) -> tuple[str, Callable[[list[str], dict, bytes], None] | None]:
        """(route name, handler) for a request; handler ``None`` when the method/path is not implemented."""
        routes: dict[tuple[str, str], Callable[[list[str], dict, bytes], None]] = {
            ("GET", "whoami"): self._whoami,
            ("GET", "agent-harnesses"): self._agent_harnesses,
            ("POST", "create"): self._create_repo,
            ("DELETE", "delete"): self._delete_repo,
            ("POST", "validate-yaml"): self._validate_yaml,
            ("GET", "info"): self._repo_info,
            ("GET", "tree"): self._tree,
            ("GET", "refs"): self._refs,
            ("POST", "preupload"): self._preupload,
            ("POST", "commit"): self._commit,
            ("POST", "branch"): self._create_branch,
            ("DELETE", "branch"): self._delete_branch,
            ("GET", "resolve"): self._resolve,
            ("HEAD", "resolve"): self._resolve,
        }
        name = "unknown"
        if seg[:2] == ["api", "whoami-v2"]:
            name = "whoami"
        elif seg[:2] == ["api", "agent-harnesses"]:
            name = "agent-harnesses"
        elif seg[:3] == ["api", "repos", "create"]:
            name = "create"
        elif seg[:3] == ["api", "repos", "delete"]:
            name = "delete"
        elif seg[:2] == ["api", "validate-yaml"]:
            name = "validate-yaml"
        elif len(seg) >= 4 and seg[0] == "api" and seg[1] in _API_SEGMENT_TO_TYPE:
            if len(seg) == 4 or (len(seg) == 6 and seg[4] == "revision"):
                name = "info"
            elif len(seg) >= 6 and seg[4] in ("tree", "preupload", "commit", "branch"):
                name = seg[4]
            elif len(seg) == 5 and seg[4] == "refs":
                name = "refs"
        elif self._resolve_parts(seg) is not None:
            name = "resolve"
        return name, routes.get((method, name))

    # -- auth ------------------------------------------------------------------------------------------------

    def _authenticate(self) -> str | None:
        """The user of the request's bearer token, ``None`` without a token; 401 for an unknown token.

        An open server (``tokens=None``) treats every request as from :data:`ANONYMOUS_USER`.
        """
        if self.hub.tokens is None:
            return ANONYMOUS_USER
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            return None
        user = self.hub.tokens.get(header[7:].strip())
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _require_write(self, repo_scoped: bool) -> str:
        user = self._user
        if user is None:
            # The real Hub answers 401 here; on repo routes the client reports it as RepositoryNotFoundError.
            raise HubHTTPError(
                401,
                "Invalid username or password: a token is required to write to this Hub",
                "RepoNotFound" if repo_scoped else None,
            )
        return user

    def _readable_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.hub.storage.get_repo(repo_type, repo_id)
        if repo.private and self._user is None:
            # Private repos are indistinguishable from missing ones without credentials, as on the real Hub.
            raise HubHTTPError(401, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str) -> _Repo:
        self._require_write(repo_scoped=True)
        return self.hub.storage.get_repo(repo_type, repo_id)

    # -- account / validation routes -------------------------------------------------------------------------

    def _whoami(self, seg: list[str], query: dict, body: bytes) -> None:
        user = self._user
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header: a token is required")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode(), usedforsecurity=False).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _agent_harnesses(self, seg: list[str], query: dict, body: bytes) -> None:
        # huggingface_hub fetches this registry once to tag its user agent; an empty one disables detection.
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, seg: list[str], query: dict, body: bytes) -> None:
        self._send_json({"errors": [], "warnings": []})

    def _create_repo(self, seg: list[str], query: dict, body: bytes) -> None:
        user = self._require_write(repo_scoped=False)
        payload = _json_object(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX_OF_TYPE:
            raise HubHTTPError(
                400, f"Unsupported repo type {repo_type!r}: the local Hub has models and datasets"
            )
        name = payload.get("name")
        namespace = payload.get("organization") or user
        for part in (namespace, name):
            if not isinstance(part, str) or not _REPO_NAME_RE.fullmatch(part) or ".." in part:
                raise HubHTTPError(400, f"Invalid repo name: {namespace}/{name}")
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        repo_id = f"{namespace}/{name}"
        url = f"{self._base_url()}/{_URL_PREFIX_OF_TYPE[repo_type]}{repo_id}"
        try:
            self.hub.storage.create_repo(repo_type, repo_id, private)
        except HubHTTPError as error:
            # The Hub's 409 carries the repo URL: `create_repo(exist_ok=True)` reads it from the error body.
            error.body["url"] = url
            raise
        self._send_json({"url": url, "name": repo_id})

    def _delete_repo(self, seg: list[str], query: dict, body: bytes) -> None:
        user = self._require_write(repo_scoped=False)
        payload = _json_object(body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        self.hub.storage.delete_repo(repo_type, repo_id)
        self._send_json({})

    # -- repo routes -----------------------------------------------------------------------------------------

    @staticmethod
    def _api_repo(seg: list[str]) -> tuple[str, str]:
        return _API_SEGMENT_TO_TYPE[seg[1]], f"{seg[2]}/{seg[3]}"

    def _repo_info(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._readable_repo(repo_type, repo_id)
        storage = self.hub.storage
        oid = storage.resolve_revision(repo, seg[5] if len(seg) == 6 else DEFAULT_BRANCH)
        commit = storage.get_commit(repo, oid)
        with_blobs = _truthy(query.get("blobs"))
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
            siblings.append(sibling)
        namespace = repo_id.split("/")[0]
        card = _card_data(storage, commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo_id,
            "author": namespace,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []) if isinstance(card.get("tags"), list) else [],
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if card:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        self._send_json(info)

    def _tree(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._readable_repo(repo_type, repo_id)
        storage = self.hub.storage
        commit = storage.get_commit(repo, storage.resolve_revision(repo, seg[5]))
        folder = "/".join(seg[6:]).strip("/")
        recursive = _truthy(query.get("recursive"))
        prefix = f"{folder}/" if folder else ""
        if folder and not any(path.startswith(prefix) for path in commit.files):
            raise HubHTTPError(
                404, f"Folder not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.oid}
            )
        entries: dict[str, dict[str, Any]] = {}
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = PurePosixPath(path[len(prefix) :]).parts
            # Every folder between `folder` and the file (only the first one unless recursive).
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                sub = prefix + "/".join(parts[:depth])
                entries.setdefault(sub, {"type": "directory", "path": sub, "size": 0})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        for path, item in entries.items():
            if item["type"] == "directory":
                listing = sorted((p, e.oid) for p, e in commit.files.items() if p.startswith(path + "/"))
                item["oid"] = hashlib.sha1(json.dumps(listing).encode(), usedforsecurity=False).hexdigest()
        if _truthy(query.get("expand")):
            for path, item in entries.items():
                item["lastCommit"] = _last_commit_touching(
                    storage, repo, commit, path, item["type"] == "directory"
                )
        # Like git trees: folders first, then files, each sorted by path.
        ordered = sorted(entries.values(), key=lambda item: (item["type"] != "directory", item["path"]))
        self._send_json(ordered)

    def _refs(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._readable_repo(repo_type, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(repo.refs.items())
        ]
        # No tags, conversions or pull requests on the local Hub; the keys are there because the client reads them.
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _create_branch(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._writable_repo(repo_type, repo_id)
        payload = _json_object(body) if body else {}
        self.hub.storage.create_branch(repo, "/".join(seg[5:]), payload.get("startingPoint"))
        self._send_json({})

    def _delete_branch(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._writable_repo(repo_type, repo_id)
        self.hub.storage.delete_branch(repo, "/".join(seg[5:]))
        self._send_json({})

    def _preupload(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._writable_repo(repo_type, repo_id)
        storage = self.hub.storage
        if _truthy(query.get("create_pr")):
            raise HubHTTPError(400, "Pull requests are not supported by the local Hub")
        head = storage.get_commit(repo, storage.resolve_revision(repo, "/".join(seg[5:])))
        files = _json_object(body).get("files")
        if not isinstance(files, list):
            raise HubHTTPError(400, "preupload: body must be {'files': [...]}")
        answer = []
        for item in files:
            path = _validate_repo_path(str(item.get("path", "")) if isinstance(item, dict) else "")
            existing = head.files.get(path)
            # `oid` lets the client skip files whose content did not change (git blob id for regular files).
            answer.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing else None,
                }
            )
        self._send_json({"files": answer})

    def _commit(self, seg: list[str], query: dict, body: bytes) -> None:
        repo_type, repo_id = self._api_repo(seg)
        repo = self._writable_repo(repo_type, repo_id)
        if _truthy(query.get("create_pr")):
            raise HubHTTPError(400, "Pull requests are not supported by the local Hub")
        branch = "/".join(seg[5:])
        header, operations = _parse_commit_payload(body)
        summary = str(header.get("summary") or "").strip()
        if not summary:
            raise HubHTTPError(400, "Commit summary (message) must not be empty")
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and _COMMIT_OID_RE.fullmatch(parent)):
            raise HubHTTPError(400, f"Invalid parentCommit: {parent!r}")
        commit = self.hub.storage.commit(
            repo, branch, operations, summary, str(header.get("description") or ""), parent
        )
        prefix = _URL_PREFIX_OF_TYPE[repo_type]
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._base_url()}/{prefix}{repo_id}/commit/{commit.oid}",
                "commitMessage": summary,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    # -- file downloads --------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_parts(seg: list[str]) -> tuple[str, str, str, str] | None:
        """``(repo_type, repo_id, revision, path)`` of a ``/[datasets/]ns/name/resolve/rev/path`` URL."""
        repo_type = "model"
        if seg and seg[0] == "datasets":
            repo_type, seg = "dataset", seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and seg[0] != "api":
            return repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:])
        return None

    def _resolve(self, seg: list[str], query: dict, body: bytes) -> None:
        parts = self._resolve_parts(seg)
        assert parts is not None
        repo_type, repo_id, revision, path = parts
        repo = self._readable_repo(repo_type, repo_id)
        storage = self.hub.storage
        oid = storage.resolve_revision(repo, revision)
        entry = storage.get_commit(repo, oid).files.get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the absence of the file for this commit.
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(PurePosixPath(path).name)}",
        }
        start, end = 0, entry.size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = _BYTES_RANGE_RE.fullmatch(range_header.strip())
            if match is None or match.groups() == ("", ""):
                raise HubHTTPError(416, f"Unsupported Range header: {range_header}")
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), entry.size - 1) if last else entry.size - 1
            else:  # suffix range: the last N bytes
                start = max(entry.size - int(last), 0)
            if start >= entry.size or start > end:
                raise HubHTTPError(416, f"Range {range_header} outside a file of {entry.size} bytes")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with open(storage.blob_path(entry.sha256), "rb") as blob:
            blob.seek(start)
            remaining = length
            while remaining > 0:
                chunk = blob.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"blob {entry.sha256} is shorter than its recorded size {entry.size}")
                self.wfile.write(chunk)
                remaining -= len(chunk)


# ------------------------------------------------------------------------------------------------ helpers


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError as exc:
        raise HubHTTPError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise HubHTTPError(400, "Request body must be a JSON object")
    return payload


def _parse_commit_payload(body: bytes) -> tuple[dict[str, Any], list[tuple[str, str, bytes | None]]]:
    """Decode the NDJSON commit body: a ``header`` line, then ``file`` / ``deletedFile`` / ``deletedFolder``."""
    header: dict[str, Any] | None = None
    operations: list[tuple[str, str, bytes | None]] = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError):
            raise HubHTTPError(
                400, f"commit payload line {number}: not a {{key, value}} JSON object"
            ) from None
        if key == "header":
            header = value
        elif key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubHTTPError(
                    400, f"commit payload line {number}: unsupported encoding {value.get('encoding')}"
                )
            try:
                content = base64.b64decode(value["content"], validate=True)
            except (binascii.Error, KeyError, TypeError):
                raise HubHTTPError(
                    400, f"commit payload line {number}: file content is not valid base64"
                ) from None
            operations.append(("file", _validate_repo_path(str(value.get("path", ""))), content))
        elif key in ("deletedFile", "deletedFolder"):
            operations.append((key, _validate_repo_path(str(value.get("path", "")).rstrip("/")), None))
        elif key == "lfsFile":
            raise HubHTTPError(
                422,
                f"commit payload line {number}: LFS files are not supported by the local Hub (preupload says regular)",
            )
        else:
            raise HubHTTPError(400, f"commit payload line {number}: unknown operation {key!r}")
    if header is None:
        raise HubHTTPError(400, "commit payload has no header line")
    return header, operations


def _card_data(storage: HubStorage, commit: Commit) -> dict[str, Any]:
    """The YAML front matter of README.md (the Hub's ``cardData``), or ``{}``."""
    entry = commit.files.get("README.md")
    if entry is None:
        return {}
    text = storage.blob_path(entry.sha256).read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return {}
    try:
        import yaml  # installed with huggingface_hub; imported lazily to keep server start cheap

        data = yaml.safe_load(match.group(1))
    except Exception:  # an invalid card must not break repo info, as on the Hub
        return {}
    return data if isinstance(data, dict) else {}


def _last_commit_touching(
    storage: HubStorage, repo: _Repo, head: Commit, path: str, is_folder: bool
) -> dict[str, str]:
    """``lastCommit`` of a tree entry: the newest commit whose change touched ``path`` (file or folder)."""

    def view(commit: Commit) -> Any:
        if not is_folder:
            entry = commit.files.get(path)
            return entry.sha256 if entry else None
        return sorted((p, e.sha256) for p, e in commit.files.items() if p.startswith(path + "/"))

    # Walk back while the entry looks as it does at `head`: the oldest such commit is the one that changed it.
    changed_by = head
    current_view = view(head)
    for commit in storage.history(repo, head.oid):
        if view(commit) != current_view:
            break
        changed_by = commit
    return {"id": changed_by.oid, "title": changed_by.summary, "date": changed_by.date}


__all__ = [
    "DEFAULT_BRANCH",
    "LOOPBACK_HOST",
    "Commit",
    "FileEntry",
    "HubHTTPError",
    "HubStorage",
    "LocalHub",
    "LoggedRequest",
    "git_blob_oid",
]
