"""Pushing a saved folder to a loopback Hub (``LocalHub``) with the real ``huggingface_hub`` client.

The server requires a token, so authentication failures are real 401s. Failures mid-upload are injected with a
status ``upload_folder`` does not retry (507), so they surface at once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub as hh
import numpy as np
import pytest
from huggingface_hub import ModelCard
from safetensors.numpy import save_file

from enecg.cli import main as cli_main
from enecg.hub.cards import ExpertCardContext, ExpertCardInfo, render_expert_card, save_card
from enecg.hub.upload import PushError, files_to_push, push_folder
from enecg.testing.endpoint import use_endpoint
from enecg.testing.local_hub import LocalHub

TOKEN = "hf_enecg_writer"
PUSHED = {
    "README.md",
    "config.json",
    "model.safetensors",
    "enecg_expert.json",
    "adapters/hubert-ecg-base/adapter_config.json",
    "adapters/hubert-ecg-base/adapter_model.safetensors",
    "plots/roc.png",
    "plots/gate.svg",
    "report.json",
}
PRIVATE = {
    "checkpoints/step_1/optimizer.bin",
    "checkpoints/step_1/model.safetensors",
    "checkpoints/step_1/random_states_0.pkl",
    "checkpoints/step_1/scheduler.bin",
    "model.pt",
    "heads.pth",
    "optimizer.json",
    "runs/events.out.tfevents.1",
    "logs/metrics.json",
    ".hidden.json",
    "train.log",
    "report.html",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with LocalHub(tmp_path_factory.mktemp("hub"), tokens={TOKEN: "enecg-test"}) as server:
        yield server


@pytest.fixture
def online(hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    monkeypatch.delenv("HF_TOKEN", raising=False)  # only tokens the tests pass explicitly
    hub.clear_failures()
    with use_endpoint(hub.url):
        yield hub
    hub.clear_failures()


def make_output_folder(folder: Path) -> Path:
    """A saved model folder as training leaves it: publishable files next to private checkpoints and logs."""
    for path in PUSHED | PRIVATE:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"experts": ["hubert-ecg-base"], "tasks": ["superdiagnostic"]})
    )
    save_file({"head.weight": np.ones((4, 8), np.float32)}, str(folder / "model.safetensors"))
    save_file(
        {"lora_A": np.zeros((2, 8), np.float32)},
        str(folder / "adapters/hubert-ecg-base/adapter_model.safetensors"),
    )
    (folder / "adapters/hubert-ecg-base/adapter_config.json").write_text('{"r": 8}')
    (folder / "enecg_expert.json").write_text('{"family": "light"}')
    (folder / "report.json").write_text('{"tasks": {}}')
    (folder / "plots/roc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    (folder / "plots/gate.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    card = render_expert_card(
        ExpertCardContext(
            repo_id="enecg-test/model",
            expert=ExpertCardInfo(name="light-cnn", family="light", license="cc-by-4.0", embedding_dim=64),
        )
    )
    save_card(card, folder)
    for path in PRIVATE:
        (folder / path).write_bytes(b"private " + path.encode())
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (files and folders) with a hash of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def commit_statuses(hub: LocalHub) -> list[int]:
    return [entry.status for entry in hub.requests if entry.route == "commit"]


def test_files_to_push_selects_publishable_files(tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    assert set(files_to_push(folder)) == PUSHED


def test_push_uploads_only_allowed_files_in_one_commit(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    before = snapshot(folder)
    online.clear_requests()
    result = push_folder(folder, "enecg-test/ensemble", token=TOKEN, commit_message="Add ensemble")
    assert result is not None and result.changed
    assert commit_statuses(online) == [200]  # one commit
    assert set(online.list_files("enecg-test/ensemble")) == PUSHED | {".gitattributes"}
    assert set(result.files) == PUSHED
    assert result.commit_sha == online.head_commit("enecg-test/ensemble")
    assert result.url == f"{online.url}/enecg-test/ensemble"
    assert snapshot(folder) == before

    info = hh.model_info("enecg-test/ensemble", token=TOKEN)
    assert info.card_data.license == "cc-by-4.0" and info.card_data.library_name == "enecg"
    readme = hh.hf_hub_download("enecg-test/ensemble", "README.md", token=TOKEN, cache_dir=tmp_path / "cache")
    card = ModelCard.load(readme)
    assert card.data.license == "cc-by-4.0" and "enecg" in card.data.tags
    assert card.text == ModelCard.load(folder / "README.md").text

    # Pushing the same folder again: nothing new to commit, the result says so.
    again = push_folder(folder, "enecg-test/ensemble", token=TOKEN)
    assert again is not None and not again.changed and again.commit_sha == result.commit_sha


def test_auth_failures_are_one_clear_line(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    expected = f"authentication failed for {online.url}: set HF_TOKEN or pass token=..."
    for token in ("hf_wrong", None):
        with pytest.raises(PushError) as excinfo:
            push_folder(folder, "enecg-test/auth", token=token)
        assert str(excinfo.value).startswith(expected) and "\n" not in str(excinfo.value)
    # Repo exists, but the upload itself is refused.
    push_folder(folder, "enecg-test/auth", token=TOKEN)
    online.fail_next("preupload", status=401)
    with pytest.raises(PushError, match="authentication failed"):
        push_folder(folder, "enecg-test/auth", token=TOKEN)


def test_failure_mid_upload_commits_nothing_and_retry_succeeds(online: LocalHub, tmp_path: Path) -> None:
    repo_id = "enecg-test/flaky"
    folder = make_output_folder(tmp_path / "out")
    hh.create_repo(repo_id, token=TOKEN)
    head = online.head_commit(repo_id)
    before = snapshot(folder)

    online.fail_next("commit", status=507)  # the file contents were sent; the commit is refused
    with pytest.raises(PushError) as excinfo:
        push_folder(folder, repo_id, token=TOKEN)
    message = str(excinfo.value)
    assert message.startswith(f"upload of {folder} to {repo_id} failed: 507")
    assert "nothing was committed; the local folder is unchanged — retry" in message and "\n" not in message
    assert online.head_commit(repo_id) == head and online.list_files(repo_id) == [".gitattributes"]
    assert snapshot(folder) == before

    result = push_folder(folder, repo_id, token=TOKEN)
    assert result is not None and result.commit_sha != head
    assert set(online.list_files(repo_id)) == PUSHED | {".gitattributes"}
    assert snapshot(folder) == before


def test_folder_without_config_is_refused(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    (folder / "config.json").unlink()
    online.clear_requests()
    with pytest.raises(PushError, match=r"out: not a saved model folder \(no config.json\)"):
        push_folder(folder, "enecg-test/no-config", token=TOKEN)
    assert online.requests == []


def test_broken_card_metadata_is_refused_before_any_request(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    (folder / "README.md").write_text("---\nlicense: [mit\ntags: ecg\n---\n# Broken\n")
    online.clear_requests()
    with pytest.raises(PushError, match=r"README.md: invalid model card metadata"):
        push_folder(folder, "enecg-test/broken-card", token=TOKEN)
    assert online.requests == []


def test_only_the_main_process_pushes(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    online.clear_requests()
    assert push_folder(folder, "enecg-test/multi", token=TOKEN, is_main_process=False) is None
    worker = SimpleNamespace(is_main_process=False)  # what push_folder reads from an accelerate.Accelerator
    assert push_folder(folder, "enecg-test/multi", token=TOKEN, accelerator=worker) is None
    assert online.requests == []
    main = SimpleNamespace(is_main_process=True)
    assert push_folder(folder, "enecg-test/multi", token=TOKEN, accelerator=main) is not None


def test_validate_asks_the_endpoint(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    online.clear_requests()
    push_folder(folder, "enecg-test/validated", token=TOKEN, validate=True)
    routes = [entry.route for entry in online.requests]
    assert routes[0] == "validate-yaml" and "commit" in routes

    online.fail_next("validate-yaml", status=400, message="license: not a valid licence id")
    online.clear_requests()
    with pytest.raises(PushError, match="model card rejected by"):
        push_folder(folder, "enecg-test/validated-2", token=TOKEN, validate=True)
    assert [entry.route for entry in online.requests] == ["validate-yaml"]  # stopped before creating anything


def test_revision_branch_and_create_false(online: LocalHub, tmp_path: Path) -> None:
    folder = make_output_folder(tmp_path / "out")
    with pytest.raises(PushError, match="repository enecg-test/missing not found"):
        push_folder(folder, "enecg-test/missing", token=TOKEN, create=False)

    repo_id = "enecg-test/branches"
    hh.create_repo(repo_id, token=TOKEN)
    main_head = online.head_commit(repo_id)
    result = push_folder(folder, repo_id, token=TOKEN, revision="v1", create=False)
    assert result is not None and result.url.endswith("/tree/v1")
    assert online.head_commit(repo_id) == main_head  # main untouched
    assert online.head_commit(repo_id, branch="v1") == result.commit_sha
    assert set(online.list_files(repo_id, revision="v1")) == PUSHED | {".gitattributes"}


def test_cli_push(online: LocalHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["push", "--help"])
    assert excinfo.value.code == 0
    assert "OUTPUT_DIR" in capsys.readouterr().out

    folder = make_output_folder(tmp_path / "out")
    repo_id = "enecg-test/from-cli"
    code = cli_main(
        ["push", str(folder), repo_id, "--token", TOKEN, "--message", "First release", "--private"]
    )
    assert code == 0
    out = capsys.readouterr().out
    head = online.head_commit(repo_id)
    assert f"{repo_id}: pushed, {len(PUSHED)} files at commit {head}" in out
    assert set(online.list_files(repo_id)) == PUSHED | {".gitattributes"}
    info = hh.model_info(repo_id, token=TOKEN)
    assert info.private is True
    repo = online.storage.get_repo("model", repo_id)
    assert online.storage.get_commit(repo, head).summary == "First release"


def test_cli_errors_are_one_line(
    online: LocalHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_output_folder(tmp_path / "out")
    assert cli_main(["push", str(folder), "enecg-test/cli-auth", "--token", "hf_wrong"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("enecg: error: authentication failed for") and "\n" not in err
