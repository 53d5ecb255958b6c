"""Point ``huggingface_hub`` at another Hub endpoint (or switch offline mode) at run time.

Real users do not need this: set ``HF_ENDPOINT`` (and ``HF_HUB_OFFLINE``) in the environment before starting
Python, or use the real Hub. ``huggingface_hub`` reads those variables once, at import, into
``huggingface_hub.constants`` and into the module-level ``HfApi`` behind ``create_repo``, ``upload_folder``,
``model_info``... Tests and the offline quickstart start a :class:`~enecg.testing.local_hub.LocalHub` after
that import, so :func:`use_endpoint` patches those values for the duration of a ``with`` block and restores
them afterwards.

What is patched (huggingface_hub 2.x): ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (file
URLs of ``hf_hub_download``), ``constants.HF_URL_HOSTS`` (hosts treated as the Hub), ``constants.HF_HUB_OFFLINE``
(read by ``is_offline_mode()``, which ``transformers`` also uses), ``hf_api.api.endpoint``, the
``HF_ENDPOINT``/``HF_HUB_OFFLINE`` environment variables (for subprocesses) and, when ``datasets`` is already
imported, ``datasets.config.HF_ENDPOINT``/``HUB_DATASETS_URL``/``HF_HUB_OFFLINE``. The patch is process-wide:
do not use it from concurrent threads with different endpoints.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_MISSING = object()
# huggingface_hub is imported inside the functions, not here: it reads HF_ENDPOINT / HF_HUB_CACHE once, at its own
# import, so importing this module must leave that moment to the caller (who may set the variables first).


def _validated_endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Hub endpoint must be an http(s) URL with a host, got {url!r}")
    return url.rstrip("/")


class _Patcher:
    """Sets attributes / environment variables and remembers the old values to restore them in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def setattr(self, target: Any, name: str, value: Any) -> None:
        self._undo.append((target, name, getattr(target, name, _MISSING)))
        setattr(target, name, value)

    def setenv(self, name: str, value: str) -> None:
        self._undo.append((os.environ, name, os.environ.get(name, _MISSING)))
        os.environ[name] = value

    def restore(self) -> None:
        for target, name, old in reversed(self._undo):
            if target is os.environ:
                if old is _MISSING:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
            elif old is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, old)
        self._undo.clear()


@contextmanager
def use_endpoint(url: str | None, *, offline: bool = False) -> Iterator[str | None]:
    """Make ``huggingface_hub`` talk to ``url`` (and set its offline mode) inside the ``with`` block.

    Args:
        url: Hub endpoint, e.g. ``LocalHub.url``. ``None`` keeps the current endpoint and only sets offline mode.
        offline: Value of ``HF_HUB_OFFLINE`` inside the block. ``False`` allows network calls even when the
            environment (e.g. ``tests/conftest.py``) set ``HF_HUB_OFFLINE=1``; ``True`` forbids them, so only
            the local cache answers.

    Yields the endpoint in effect. Previous values are restored on exit, also after an exception.
    """
    from huggingface_hub import constants, hf_api

    patcher = _Patcher()
    try:
        endpoint = constants.ENDPOINT
        if url is not None:
            endpoint = _validated_endpoint(url)
            patcher.setattr(constants, "ENDPOINT", endpoint)
            patcher.setattr(
                constants,
                "HUGGINGFACE_CO_URL_TEMPLATE",
                endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            )
            if hasattr(constants, "HF_URL_HOSTS"):
                hosts = frozenset(constants.HF_URL_HOSTS) | {urlsplit(endpoint).hostname.lower()}
                patcher.setattr(constants, "HF_URL_HOSTS", hosts)
            # `create_repo`, `upload_folder`, `model_info`... are bound methods of this instance, whose endpoint
            # was fixed when huggingface_hub was imported.
            patcher.setattr(hf_api.api, "endpoint", endpoint)
            patcher.setenv("HF_ENDPOINT", endpoint)
        patcher.setattr(constants, "HF_HUB_OFFLINE", offline)
        patcher.setenv("HF_HUB_OFFLINE", "1" if offline else "0")

        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:  # only if imported already: importing datasets here would be slow
            if url is not None:
                patcher.setattr(datasets_config, "HF_ENDPOINT", endpoint)
                patcher.setattr(
                    datasets_config,
                    "HUB_DATASETS_URL",
                    endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
                )
            patcher.setattr(datasets_config, "HF_HUB_OFFLINE", offline)
            if hasattr(datasets_config, "HF_DATASETS_OFFLINE"):
                patcher.setattr(datasets_config, "HF_DATASETS_OFFLINE", offline)
        yield endpoint
    finally:
        patcher.restore()


@contextmanager
def fresh_hub_cache(path: str | os.PathLike) -> Iterator[Path]:
    """Empty ``path`` and make it ``huggingface_hub``'s default cache inside the ``with`` block, so every download
    really goes through the Hub protocol (nothing answered from an older cache). Patches
    ``constants.HF_HUB_CACHE`` and the ``HF_HUB_CACHE`` environment variable (for subprocesses); both are
    restored on exit, also after an exception. Yields the cache folder."""
    from huggingface_hub import constants

    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    patcher = _Patcher()
    try:
        patcher.setattr(constants, "HF_HUB_CACHE", str(path))
        patcher.setenv("HF_HUB_CACHE", str(path))
        yield path
    finally:
        patcher.restore()


def current_endpoint() -> str:
    """The endpoint ``huggingface_hub`` uses right now (``HF_ENDPOINT`` or a :func:`use_endpoint` override)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


__all__ = ["current_endpoint", "fresh_hub_cache", "use_endpoint"]
