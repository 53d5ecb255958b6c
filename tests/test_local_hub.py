"""The loopback Hub server against the real ``huggingface_hub`` client (no mocks of the client).

conftest.py sets ``HF_HUB_OFFLINE=1`` for the whole session: online calls run inside ``use_endpoint(hub.url)``,
which switches offline mode off for the block. Every download goes to a fresh ``cache_dir`` so nothing is
answered from an earlier test's cache.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub as hh
import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

from enecg.testing.endpoint import current_endpoint, use_endpoint
from enecg.testing.local_hub import LocalHub

README = "---\nlicense: apache-2.0\ntags:\n- ecg\n- enecg\nlibrary_name: enecg\n---\n# Test ensemble\n"
WEIGHTS = {
    "gate.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "head.bias": np.ones(5, dtype=np.float16),
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with LocalHub(tmp_path_factory.mktemp("local-hub")) as server:
        yield server


@pytest.fixture
def online(hub: LocalHub) -> Iterator[LocalHub]:
    with use_endpoint(hub.url):
        yield hub


def make_model_folder(folder: Path) -> Path:
    """A small model folder: JSON config, binary safetensors, model card, a subfolder and a file to leave out."""
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"experts": ["net1d", "light"], "n_tasks": 3}))
    save_file(WEIGHTS, str(folder / "model.safetensors"))
    (folder / "README.md").write_text(README)
    (folder / "sub" / "notes.txt").write_text("per-expert notes\n")
    (folder / "train.log").write_text("not for the Hub\n")
    return folder


def commits_logged(hub: LocalHub) -> list[int]:
    return [entry.status for entry in hub.requests if entry.route == "commit"]


def test_create_repo_exist_ok_and_initial_commit(online: LocalHub) -> None:
    url = hh.create_repo("enecg-test/created")
    assert url.repo_id == "enecg-test/created"
    assert url.startswith(online.url)
    with pytest.raises(HfHubHTTPError) as excinfo:
        hh.create_repo("enecg-test/created")
    assert excinfo.value.response.status_code == 409
    assert hh.create_repo("enecg-test/created", exist_ok=True).repo_id == "enecg-test/created"
    info = hh.model_info("enecg-test/created")
    # Like the real Hub, a new repo has one commit holding .gitattributes.
    assert info.sha == online.head_commit("enecg-test/created")
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert info.private is False
    hh.create_repo("enecg-test/hidden", private=True)
    assert hh.model_info("enecg-test/hidden").private is True
    hh.delete_repo("enecg-test/hidden")
    assert not hh.repo_exists("enecg-test/hidden")
    hh.delete_repo("enecg-test/hidden", missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        hh.delete_repo("enecg-test/hidden")


def test_dataset_repos(online: LocalHub, tmp_path: Path) -> None:
    hh.create_repo("enecg-test/records", repo_type="dataset")
    hh.upload_file(
        path_or_fileobj=b"id,label\n1,AF\n",
        path_in_repo="data/train.csv",
        repo_id="enecg-test/records",
        repo_type="dataset",
    )
    assert hh.dataset_info("enecg-test/records").sha == online.head_commit(
        "enecg-test/records", repo_type="dataset"
    )
    path = hh.hf_hub_download(
        "enecg-test/records", "data/train.csv", repo_type="dataset", cache_dir=tmp_path / "cache"
    )
    assert Path(path).read_bytes() == b"id,label\n1,AF\n"
    with pytest.raises(RepositoryNotFoundError):  # a dataset is not a model
        hh.model_info("enecg-test/records")


def test_upload_folder_is_one_commit_and_downloads_by_id_sha_and_snapshot(
    online: LocalHub, tmp_path: Path
) -> None:
    repo_id = "enecg-test/ensemble"
    hh.create_repo(repo_id)
    online.clear_requests()
    folder = make_model_folder(tmp_path / "out")
    info = hh.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=["*.json", "*.safetensors", "*.md", "sub/*"],
        commit_message="Add ensemble",
    )
    assert commits_logged(online) == [200]
    assert info.oid == online.head_commit(repo_id)
    expected = {".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"}
    assert set(hh.list_repo_files(repo_id)) == expected

    model = hh.model_info(repo_id, files_metadata=True)
    assert model.sha == info.oid
    sizes = {s.rfilename: s.size for s in model.siblings}
    assert sizes["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert model.card_data is not None and model.card_data.license == "apache-2.0"
    assert set(model.tags) >= {"ecg", "enecg"}

    # By ID (main) into a fresh cache: the binary file round-trips byte for byte.
    cache = tmp_path / "cache"
    weights_path = hh.hf_hub_download(repo_id, "model.safetensors", cache_dir=cache)
    assert Path(weights_path).read_bytes() == (folder / "model.safetensors").read_bytes()
    loaded = load_file(weights_path)
    assert set(loaded) == set(WEIGHTS)
    np.testing.assert_array_equal(loaded["gate.weight"], WEIGHTS["gate.weight"])
    assert loaded["head.bias"].dtype == np.float16
    assert f"snapshots/{info.oid}/" in Path(weights_path).as_posix()

    # By commit sha, into another fresh cache.
    by_sha = hh.hf_hub_download(repo_id, "sub/notes.txt", revision=info.oid, cache_dir=tmp_path / "cache2")
    assert Path(by_sha).read_text() == "per-expert notes\n"

    snapshot = Path(hh.snapshot_download(repo_id, cache_dir=tmp_path / "cache3"))
    assert snapshot.name == info.oid
    assert {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} == expected
    assert json.loads((snapshot / "config.json").read_text())["n_tasks"] == 3

    # Tree listing: folders and files, recursive or not, with last commits on request.
    top = {entry.path: type(entry).__name__ for entry in hh.list_repo_tree(repo_id)}
    assert top["sub"] == "RepoFolder" and "sub/notes.txt" not in top
    deep = {entry.path for entry in hh.list_repo_tree(repo_id, recursive=True)}
    assert "sub/notes.txt" in deep
    expanded = {entry.path: entry for entry in hh.list_repo_tree(repo_id, expand=True)}
    assert expanded["config.json"].last_commit.title == "Add ensemble"
    assert expanded[".gitattributes"].last_commit.title == "initial commit"

    # Uploading the same folder again changes nothing: the client skips unchanged files (preupload oids).
    online.clear_requests()
    again = hh.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=["*.json", "*.safetensors"])
    assert again.oid == info.oid
    assert commits_logged(online) == []


def test_new_commit_moves_main_but_old_sha_and_branch_keep_old_content(
    online: LocalHub, tmp_path: Path
) -> None:
    repo_id = "enecg-test/history"
    hh.create_repo(repo_id)
    first = hh.upload_file(path_or_fileobj=b'{"version": 1}', path_in_repo="config.json", repo_id=repo_id)
    hh.create_branch(repo_id, branch="v1", revision=first.oid)
    second = hh.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("config.json", b'{"version": 2}'),
            CommitOperationAdd("extra/new.txt", b"new"),
        ],
        commit_message="Version 2",
        parent_commit=first.oid,
    )
    assert second.oid != first.oid
    assert hh.model_info(repo_id).sha == second.oid
    assert hh.model_info(repo_id, revision=first.oid).sha == first.oid

    def read(revision: str, cache: str) -> dict:
        return json.loads(
            Path(
                hh.hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=tmp_path / cache)
            ).read_text()
        )

    assert read("main", "a") == {"version": 2}
    assert read(first.oid, "b") == {"version": 1}
    assert read("v1", "c") == {"version": 1}
    assert read(first.oid[:10], "d") == {"version": 1}  # a unique sha prefix resolves too
    assert "extra/new.txt" not in hh.list_repo_files(repo_id, revision="v1")

    refs = hh.list_repo_refs(repo_id)
    assert {ref.name: ref.target_commit for ref in refs.branches} == {"main": second.oid, "v1": first.oid}

    # A stale parent commit is refused (412) and nothing changes.
    with pytest.raises(HfHubHTTPError) as excinfo:
        hh.create_commit(
            repo_id,
            operations=[CommitOperationAdd("x.txt", b"x")],
            commit_message="stale",
            parent_commit=first.oid,
        )
    assert excinfo.value.response.status_code == 412
    assert hh.model_info(repo_id).sha == second.oid

    # Deletions: a file, a folder, and a missing file (the client's EntryNotFoundError).
    hh.create_commit(
        repo_id,
        operations=[CommitOperationDelete("config.json"), CommitOperationDelete("extra/")],
        commit_message="Clean up",
    )
    assert hh.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        hh.delete_file("missing.txt", repo_id=repo_id)


def test_missing_repo_file_and_revision_raise_the_client_exceptions(online: LocalHub, tmp_path: Path) -> None:
    repo_id = "enecg-test/errors"
    hh.create_repo(repo_id)
    hh.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        hh.model_info("enecg-test/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hh.hf_hub_download("enecg-test/does-not-exist", "config.json", cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hh.hf_hub_download(repo_id, "no-such-file.json", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hh.hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hh.model_info(repo_id, revision="0" * 40)
    assert hh.file_exists(repo_id, "config.json") and not hh.file_exists(repo_id, "nope.json")
    assert not hh.repo_exists("enecg-test/does-not-exist")
    # Routes the server lacks answer 404 with a message naming them, rather than failing silently.
    with pytest.raises(HfHubHTTPError, match="does not implement"):
        list(hh.get_repo_discussions(repo_id))


def test_range_requests_and_head(online: LocalHub) -> None:
    repo_id = "enecg-test/ranges"
    hh.create_repo(repo_id)
    payload = bytes(range(256)) * 4
    hh.upload_file(path_or_fileobj=payload, path_in_repo="blob.bin", repo_id=repo_id)
    url = f"{online.url}/{repo_id}/resolve/main/blob.bin"
    request = urllib.request.Request(url, headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{len(payload)}"
        assert response.read() == payload[10:20]
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as response:
        assert int(response.headers["Content-Length"]) == len(payload)
        assert response.headers["X-Repo-Commit"] == online.head_commit(repo_id)
        assert response.headers["ETag"].startswith('"') and response.headers["ETag"].endswith('"')
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=5000-"}), timeout=10)
    assert excinfo.value.code == 416


def test_tokens_required_for_writes_and_private_reads(tmp_path: Path) -> None:
    with LocalHub(tmp_path / "hub", tokens={"hf_alice": "alice"}) as hub, use_endpoint(hub.url):
        with pytest.raises(HfHubHTTPError) as excinfo:
            hh.create_repo("alice/model", token=False)
        assert excinfo.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError, match="Invalid credentials") as excinfo:
            hh.create_repo("alice/model", token="hf_wrong")
        assert excinfo.value.response.status_code == 401
        assert hh.whoami(token="hf_alice")["name"] == "alice"
        with pytest.raises(HfHubHTTPError, match="Invalid user token"):
            hh.whoami(token="hf_wrong")

        hh.create_repo("model", token="hf_alice", private=True)  # no namespace: the token's user
        head = hub.head_commit("alice/model")
        with pytest.raises(RepositoryNotFoundError):  # unauthenticated upload: 401, reported as the Hub does
            hh.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model", token=False)
        assert hub.head_commit("alice/model") == head
        hh.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model", token="hf_alice")

        # A private repo is invisible without a token, readable with one.
        with pytest.raises(RepositoryNotFoundError):
            hh.model_info("alice/model", token=False)
        with pytest.raises(RepositoryNotFoundError):
            hh.hf_hub_download("alice/model", "x.txt", token=False, cache_dir=tmp_path / "c1")
        assert hh.model_info("alice/model", token="hf_alice").private is True
        path = hh.hf_hub_download("alice/model", "x.txt", token="hf_alice", cache_dir=tmp_path / "c2")
        assert Path(path).read_bytes() == b"x"
        assert [e.status for e in hub.requests if e.route == "create"][:2] == [401, 401]


def test_failed_commit_leaves_repo_unchanged_and_retry_succeeds(online: LocalHub, tmp_path: Path) -> None:
    repo_id = "enecg-test/flaky"
    hh.create_repo(repo_id)
    folder = make_model_folder(tmp_path / "out")
    head = online.head_commit(repo_id)
    files_before = online.list_files(repo_id)

    # create_commit does not retry: the server error surfaces, the body was received but nothing is stored.
    online.fail_next("commit", status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        hh.create_commit(
            repo_id,
            operations=[CommitOperationAdd("config.json", folder / "config.json")],
            commit_message="x",
        )
    assert excinfo.value.response.status_code == 500
    assert online.head_commit(repo_id) == head and online.list_files(repo_id) == files_before

    # upload_folder retries its commit on 5xx; a non-retried failure (507) surfaces the same way.
    online.fail_next("commit", status=507)
    with pytest.raises(HfHubHTTPError):
        hh.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=["*.json", "*.safetensors"])
    assert online.head_commit(repo_id) == head and online.list_files(repo_id) == files_before

    # A transient 500 mid-upload: the client's backoff retries and exactly one commit lands.
    online.clear_requests()
    online.fail_next("commit", status=500)
    info = hh.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=["*.json", "*.safetensors"])
    assert commits_logged(online) == [500, 200]
    assert online.head_commit(repo_id) == info.oid
    assert set(online.list_files(repo_id)) == {".gitattributes", "config.json", "model.safetensors"}

    # A predicate picks the request to fail; a failing preupload stops the upload before any commit.
    online.fail_next(lambda method, path, route: route == "preupload" and method == "POST", status=422)
    with pytest.raises(HfHubHTTPError):
        hh.upload_file(path_or_fileobj=b"late", path_in_repo="late.txt", repo_id=repo_id)
    assert online.head_commit(repo_id) == info.oid


def test_concurrent_commits_all_land_in_a_linear_history(online: LocalHub) -> None:
    repo_id = "enecg-test/concurrent"
    hh.create_repo(repo_id)
    first = online.head_commit(repo_id)

    def push(index: int) -> str:
        return hh.upload_file(
            path_or_fileobj=f"{index}".encode(), path_in_repo=f"f{index}.txt", repo_id=repo_id
        ).oid

    with ThreadPoolExecutor(max_workers=4) as pool:
        oids = list(pool.map(push, range(6)))
    head = online.head_commit(repo_id)
    assert set(online.list_files(repo_id)) == {".gitattributes"} | {f"f{i}.txt" for i in range(6)}
    repo = online.storage.get_repo("model", repo_id)
    history = [commit.oid for commit in online.storage.history(repo, head)]
    assert history[-1] == first and len(history) == 7 and set(oids) == set(history[:-1])


def test_offline_reload_from_cache_and_restart_keeps_repos(tmp_path: Path) -> None:
    storage = tmp_path / "hub"
    cache = tmp_path / "cache"
    with LocalHub(storage) as hub:
        with use_endpoint(hub.url):
            hh.create_repo("enecg-test/persist")
            folder = make_model_folder(tmp_path / "out")
            info = hh.upload_folder(
                repo_id="enecg-test/persist", folder_path=folder, allow_patterns=["*.json"]
            )
            hh.snapshot_download("enecg-test/persist", cache_dir=cache)
        hub.clear_requests()
        with use_endpoint(hub.url, offline=True):
            path = hh.hf_hub_download("enecg-test/persist", "config.json", cache_dir=cache)
            assert json.loads(Path(path).read_text())["n_tasks"] == 3
            path = hh.hf_hub_download(
                "enecg-test/persist", "config.json", cache_dir=cache, local_files_only=True
            )
            assert f"snapshots/{info.oid}/" in Path(path).as_posix()
            assert Path(hh.snapshot_download("enecg-test/persist", cache_dir=cache)).name == info.oid
            with pytest.raises(LocalEntryNotFoundError):
                hh.hf_hub_download("enecg-test/persist", "missing.bin", cache_dir=cache)
            with pytest.raises(OfflineModeIsEnabled):
                hh.model_info("enecg-test/persist")
        assert hub.requests == []  # offline: not a single request reached the server

    # The same storage after a restart (new port): same repo, same commit.
    with LocalHub(storage) as restarted, use_endpoint(restarted.url):
        assert hh.model_info("enecg-test/persist").sha == info.oid
        path = hh.hf_hub_download("enecg-test/persist", "config.json", cache_dir=tmp_path / "fresh")
        assert json.loads(Path(path).read_text())["n_tasks"] == 3


def test_use_endpoint_patches_and_restores(hub: LocalHub) -> None:
    from huggingface_hub import constants, hf_api

    before = (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        constants.HF_HUB_OFFLINE,
        hf_api.api.endpoint,
    )
    with pytest.raises(RuntimeError), use_endpoint(hub.url + "/") as endpoint:
        assert endpoint == hub.url == current_endpoint() == hf_api.api.endpoint
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.url + "/{repo_id}/resolve/")
        assert constants.HF_HUB_OFFLINE is False and hh.is_offline_mode() is False
        raise RuntimeError("restored even after an error")
    after = (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        constants.HF_HUB_OFFLINE,
        hf_api.api.endpoint,
    )
    assert after == before
    with use_endpoint(None, offline=True):
        assert hh.is_offline_mode() is True and current_endpoint() == before[0]
    with pytest.raises(ValueError, match="http"):
        with use_endpoint("127.0.0.1:1234"):
            pass


def test_fresh_hub_cache_is_empty_and_scoped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from huggingface_hub import constants

    from enecg.testing.endpoint import fresh_hub_cache

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    before = constants.HF_HUB_CACHE
    stale = tmp_path / "cache" / "models--org--old"
    stale.mkdir(parents=True)
    with fresh_hub_cache(tmp_path / "cache") as cache:
        assert cache == tmp_path / "cache" and list(cache.iterdir()) == []
        assert constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"] == str(cache)
    assert constants.HF_HUB_CACHE == before and "HF_HUB_CACHE" not in os.environ
