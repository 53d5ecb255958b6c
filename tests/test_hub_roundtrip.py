"""An ensemble shared through a (loopback) Hub: push, pull by ID into a fresh cache, bit-identical predictions.

The experts are in-house light CNNs pushed to the ``LocalHub`` first and loaded by Hub ID, so they have a Hub ID
and a commit sha like published FMs. The ensemble is trained a few steps on real PTB-XL records (heads, LoRA and
gate away from their initial values), pushed with ``push_ensemble`` and pulled back with ``from_pretrained`` using
the real ``huggingface_hub`` client. conftest.py sets ``HF_HUB_OFFLINE=1``; ``use_endpoint`` switches it off.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub as hh
import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub import constants as hf_constants
from peft import PeftModel
from safetensors.torch import load_file

from enecg.contract import InputContract
from enecg.data.ptbxl import SUPERCLASSES
from enecg.ensemble import Ensemble, EnsembleConfig, EnsembleLoadError, ExpertBranch, ExpertRef, TaskHead
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.experts import load_expert
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import save_inhouse_expert
from enecg.hub.cards import extract_python_snippet
from enecg.hub.publish import ensemble_card_context, push_ensemble
from enecg.hub.upload import PushError, push_folder
from enecg.io import read_record
from enecg.leads import STANDARD_12_LEADS
from enecg.testing.endpoint import use_endpoint
from enecg.testing.local_hub import LocalHub

TOKEN = "hf_enecg_roundtrip"
ORG = "enecg-test"
ENSEMBLE_REPO = f"{ORG}/ptbxl-ensemble"
EXPERTS = {
    "simple": ("SimpleNet", True),
    "attia": ("AttiaNet", False),
}  # name -> (architecture, demographics)
CONTRACT = InputContract(fs=100.0, leads=STANDARD_12_LEADS, length=1000, scaling="zscore_lead")
N_RECORDS = 24
THRESHOLDS = {"superclass": {"NORM": 0.5, "MI": 0.35}, "sex": {"female": 0.5}}
PRIVATE_FILES = ("checkpoints/step_3/optimizer.bin", "checkpoints/step_3/random_states_0.pkl", "model.pt")


def ptbxl_records(root: Path, n: int) -> tuple[list, dict[str, torch.Tensor]]:
    """The first ``n`` PTB-XL records at 100 Hz with age/sex from the database, and their labels."""
    table = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    statements = pd.read_csv(root / "scp_statements.csv", index_col=0)
    superclass_of = statements[statements["diagnostic"] == 1]["diagnostic_class"].dropna().to_dict()
    records, superclass, age, sex = [], [], [], []
    for _, row in table.head(n).iterrows():
        record = read_record(root / row["filename_lr"])
        record.metadata.update(age=float(row["age"]), sex=float(row["sex"]))
        records.append(record)
        present = {superclass_of[c] for c in ast.literal_eval(row["scp_codes"]) if c in superclass_of}
        superclass.append(
            [float(c in present) for c in SUPERCLASSES] if present else [np.nan] * len(SUPERCLASSES)
        )
        age.append(float(row["age"]))
        sex.append(float(row["sex"]))
    labels = {
        "superclass": torch.tensor(superclass, dtype=torch.float32),
        "age": torch.tensor(age),
        "sex": torch.tensor(sex),
    }
    return records, labels


def push_light_expert(folder: Path, repo_id: str, architecture: str, demographics: bool, seed: int) -> str:
    torch.manual_seed(seed)
    config = LightCNNConfig(
        architecture=architecture, width_multiplier=0.25, embedding_dim=16, use_demographics=demographics
    )
    save_inhouse_expert(
        build_light_model(config),
        family="light",
        config=config,
        contract=CONTRACT,
        folder=folder,
        name=repo_id.split("/")[-1],
    )
    result = push_folder(folder, repo_id, token=TOKEN)
    assert result is not None
    return result.commit_sha


def ensemble_config(experts: dict) -> EnsembleConfig:
    return EnsembleConfig(
        experts=[
            ExpertRef(
                name=name,
                hub_id=expert.hub_id,
                revision=expert.revision,
                embedding_dim=expert.embedding_dim,
                lora_target_modules=expert.lora_target_modules,
            )
            for name, expert in experts.items()
        ],
        tasks=[
            {"name": "superclass", "type": "multilabel", "label_names": list(SUPERCLASSES)},
            {"name": "age", "type": "regression", "target_mean": 60.0, "target_std": 17.0},
            {"name": "sex", "type": "binary", "label_names": ["female"]},
        ],
        heads={"hidden_sizes": [32, 32]},
        gate={"hidden_sizes": [16]},
        lora={"r": 4, "alpha": 8.0, "dropout": 0.0},
        task_weighting="uncertainty",
    )


def full_output(model: Ensemble, batch) -> dict[str, torch.Tensor]:
    """Every output that must survive the round trip, flattened: combined, per-expert, gate weights."""
    model.eval()
    with torch.no_grad():
        out = model(
            batch.expert_inputs, batch.gate_input, batch.demographics, window_masks=batch.window_masks
        )
    tensors = {}
    for task in out.predictions:
        tensors[f"pred/{task}"] = out.predictions[task]
        tensors[f"expert/{task}"] = out.expert_predictions[task]
        tensors[f"gate/{task}"] = out.gate_weights[task]
    return tensors


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    differing = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not differing, f"outputs differ after the round trip: {differing}"


def folder_snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with LocalHub(tmp_path_factory.mktemp("hub"), tokens={TOKEN: "enecg-test"}) as server:
        yield server


@pytest.fixture(scope="module")
def published(
    hub: LocalHub, ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """Experts pushed and loaded by ID, an ensemble trained a few steps on PTB-XL, pushed with its card."""
    tmp = tmp_path_factory.mktemp("published")
    with use_endpoint(hub.url):
        shas, experts = {}, {}
        for seed, (name, (architecture, demographics)) in enumerate(EXPERTS.items()):
            repo_id = f"{ORG}/light-{name}"
            shas[name] = push_light_expert(tmp / "experts" / name, repo_id, architecture, demographics, seed)
            experts[name] = load_expert(repo_id, cache_dir=tmp / "expert-cache")
            assert experts[name].revision == shas[name]
        model = Ensemble(ensemble_config(experts), experts)
        records, labels = ptbxl_records(ptbxl_dir, N_RECORDS)
        batch = EnsembleInputBuilder.for_ensemble(model)(records)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            optimizer.zero_grad()
            out = model(
                batch.expert_inputs, batch.gate_input, batch.demographics, window_masks=batch.window_masks
            )
            model.compute_loss(out, labels)[0].backward()
            optimizer.step()
        model.eval()
        model.decision_thresholds = THRESHOLDS

        out_dir = tmp / "run" / "model"
        model.save_pretrained(out_dir)  # a save replaces the whole folder: the private files come afterwards
        for private in PRIVATE_FILES:  # what training may leave next to the model: must never be pushed
            (out_dir / private).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / private).write_bytes(b"private state")
        record_path = str(ptbxl_dir / "records100/00000/00001_lr")
        context = ensemble_card_context(model, "placeholder/name", example_record=record_path)
        result = push_ensemble(out_dir, ENSEMBLE_REPO, token=TOKEN, card_context=context)
        assert result is not None
        yield SimpleNamespace(
            model=model,
            records=records,
            batch=batch,
            expected=full_output(model, batch),
            shas=shas,
            out_dir=out_dir,
            record_path=record_path,
            commit=result.commit_sha,
            tmp=tmp,
        )


@pytest.fixture
def online(hub: LocalHub, published: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.clear_failures()
    with use_endpoint(hub.url):
        yield hub
    hub.clear_failures()


def test_pull_by_id_in_a_fresh_cache_is_bit_identical(online: LocalHub, published, tmp_path: Path) -> None:
    loaded = Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=tmp_path / "fresh-cache")
    assert not loaded.training
    assert_bit_identical(full_output(loaded, published.batch), published.expected)
    # Each expert came from its Hub ID at the exact commit the ensemble was trained with.
    for ref in loaded.config.experts:
        assert ref.hub_id == f"{ORG}/light-{ref.name}" and ref.revision == published.shas[ref.name]
        assert loaded.branch(ref.name).expert.revision == published.shas[ref.name]
    assert loaded.decision_thresholds == THRESHOLDS
    assert loaded.predict_records(published.records[:3])[0].to_dict() == (
        published.model.predict_records(published.records[:3])[0].to_dict()
    )
    # Pinning the ensemble's own commit gives the same model.
    pinned = Ensemble.from_pretrained(ENSEMBLE_REPO, revision=published.commit, cache_dir=tmp_path / "pinned")
    assert_bit_identical(full_output(pinned, published.batch), published.expected)


def test_pushed_repo_holds_no_checkpoints_and_no_expert_weights(
    online: LocalHub, published, tmp_path: Path
) -> None:
    files = set(online.list_files(ENSEMBLE_REPO))
    adapters = {
        f"adapters/{name}/{f}"
        for name in EXPERTS
        for f in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert (
        files
        == {".gitattributes", "README.md", "config.json", "model.safetensors", "thresholds.json"} | adapters
    )
    assert all((published.out_dir / private).is_file() for private in PRIVATE_FILES)  # left behind, untouched

    snapshot = Path(hh.snapshot_download(ENSEMBLE_REPO, cache_dir=tmp_path / "cache"))
    expert_hashes = set()
    for name in EXPERTS:
        expert = published.model.branch(name).expert
        expert_hashes.add(hashlib.sha256(Path(expert.weights_path).read_bytes()).hexdigest())
    pushed_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in snapshot.rglob("*") if p.is_file()}
    assert not expert_hashes & pushed_hashes
    weights = load_file(snapshot / "model.safetensors")
    frozen = {n for n, p in published.model.named_parameters() if not p.requires_grad}
    assert weights.keys() == published.model.trainable_state_dict().keys()
    assert not weights.keys() & frozen
    assert not [k for k in weights if ".expert." in k and ".lora_" not in k]
    config = json.loads((snapshot / "config.json").read_text())
    for ref in config["experts"]:
        assert ref["revision"] == published.shas[ref["name"]] and len(ref["weights_sha256"]) == 64
        assert ref["spec"]["family"] == "light" and ref["spec"]["contract"]["fs"] == 100.0


def test_one_expert_adapter_loads_with_plain_peft(online: LocalHub, published, tmp_path: Path) -> None:
    name = "simple"
    snapshot = Path(
        hh.snapshot_download(
            ENSEMBLE_REPO, allow_patterns=[f"adapters/{name}/*"], cache_dir=tmp_path / "cache"
        )
    )
    folder = snapshot / "adapters" / name
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"{ORG}/light-{name}"
    assert adapter_config["revision"] == published.shas[name]

    # A peft user: the base (the expert at the adapter's revision + fresh heads), then peft's own loader.
    expert = load_expert(
        adapter_config["base_model_name_or_path"],
        revision=adapter_config["revision"],
        cache_dir=tmp_path / "ex",
    )
    config = published.model.config
    torch.manual_seed(123)
    heads = {t.name: TaskHead(expert.embedding_dim, t.num_outputs, config.heads) for t in config.tasks}
    branch = ExpertBranch(expert, expert.hub_id, heads=heads, squeeze_tasks=("age", "sex"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(branch, str(folder)).eval()
    batch = published.batch
    with torch.no_grad():
        expected = published.model.branch(name)(batch.expert_inputs[name], batch.demographics)
        got = loaded(batch.expert_inputs[name], batch.demographics)
    for task in expected:
        assert torch.equal(got[task], expected[task]), task


def test_failed_upload_keeps_the_output_and_a_retry_succeeds(
    online: LocalHub, published, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(published.out_dir, folder)
    repo_id = f"{ORG}/flaky-ensemble"
    online.fail_next("commit", status=507)
    with pytest.raises(
        PushError, match=r"failed: 507 .*nothing was committed; the local folder is unchanged"
    ):
        push_ensemble(folder, repo_id, token=TOKEN)
    after_failure = folder_snapshot(folder)
    assert set(online.list_files(repo_id)) == {".gitattributes"}  # created, nothing committed
    # The folder is still a complete saved ensemble (its card now names the new repo).
    assert_bit_identical(full_output(Ensemble.from_pretrained(folder), published.batch), published.expected)
    assert f'from_pretrained("{repo_id}")' in (folder / "README.md").read_text()

    result = push_ensemble(folder, repo_id, token=TOKEN)
    assert result is not None and result.changed
    assert folder_snapshot(folder) == after_failure
    loaded = Ensemble.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert_bit_identical(full_output(loaded, published.batch), published.expected)


def test_private_repo_needs_the_token(online: LocalHub, published, tmp_path: Path) -> None:
    repo_id = f"{ORG}/private-ensemble"
    assert push_ensemble(published.out_dir, repo_id, token=TOKEN, private=True) is not None
    with pytest.raises(
        EnsembleLoadError, match=f"{repo_id}: repository not found on .*private repos need a token"
    ):
        Ensemble.from_pretrained(repo_id, cache_dir=tmp_path / "anonymous")
    loaded = Ensemble.from_pretrained(repo_id, token=TOKEN, cache_dir=tmp_path / "cache")
    assert_bit_identical(full_output(loaded, published.batch), published.expected)
    # Non-main processes push nothing.
    online.clear_requests()
    assert push_ensemble(published.model, repo_id, token=TOKEN, is_main_process=False) is None
    assert online.requests == []


def test_offline_reload_from_the_cache_sends_no_request(online: LocalHub, published, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=cache)
    with use_endpoint(None, offline=True):
        online.clear_requests()
        loaded = Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=cache)
        assert online.requests == []
        assert_bit_identical(full_output(loaded, published.batch), published.expected)
        with pytest.raises(
            EnsembleLoadError, match=f"{ENSEMBLE_REPO}@main: not in the local Hub cache and offline"
        ):
            Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=tmp_path / "empty")
        assert online.requests == []


def test_expert_whose_weights_moved_is_refused(online: LocalHub, published, tmp_path: Path) -> None:
    name, repo_id = "attia", f"{ORG}/light-attia"
    # A new commit on the expert's main branch with other weights.
    new_sha = push_light_expert(tmp_path / "retrained", repo_id, *EXPERTS[name], seed=99)
    assert new_sha != published.shas[name]
    # The ensemble pins the old commit: still loads, unchanged.
    pinned = Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=tmp_path / "cache")
    assert_bit_identical(full_output(pinned, published.batch), published.expected)
    # A config pointing at the branch instead of the commit gets the new weights: refused, naming the expert.
    folder = tmp_path / "edited"
    shutil.copytree(published.out_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    next(ref for ref in config["experts"] if ref["name"] == name)["revision"] = "main"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EnsembleLoadError) as excinfo:
        Ensemble.from_pretrained(folder, cache_dir=tmp_path / "cache")
    message = str(excinfo.value)
    assert f"expert '{name}' (hf-hub:{repo_id}@{new_sha})" in message and "\n" not in message
    assert "has other weights than the ensemble was trained with: recorded sha256" in message


def test_card_parses_and_its_snippet_runs(
    online: LocalHub, published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = hh.hf_hub_download(ENSEMBLE_REPO, "README.md", cache_dir=tmp_path / "card")
    card = ModelCard.load(readme)
    assert card.data.library_name == "enecg"
    assert set(card.data.base_model) == {f"{ORG}/light-{name}" for name in EXPERTS}
    assert card.data.license == "apache-2.0"
    snippet = extract_python_snippet(card)
    assert f'Ensemble.from_pretrained("{ENSEMBLE_REPO}")' in snippet and published.record_path in snippet
    # Run it as a user would, in a fresh Hub cache.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "user-cache"))
    namespace: dict = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(snippet, "README.md", "exec"), namespace)
    predictions = namespace["predictions"]
    assert predictions == published.model.predict_record(read_record(published.record_path))
    assert set(predictions) == {"superclass", "age", "sex"} and set(predictions["superclass"]) == set(
        SUPERCLASSES
    )
    assert "superclass" in stdout.getvalue()
    assert (tmp_path / "user-cache").is_dir()


def test_cli_push_of_a_saved_ensemble_names_the_target_repo(
    online: LocalHub, published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import ModelCard, hf_hub_download

    from enecg.cli import main

    saved = tmp_path / "saved"
    published.model.save_pretrained(saved)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    target = f"{ORG}/cli-pushed-ensemble"
    assert main(["push", str(saved), target]) == 0
    card = ModelCard.load(hf_hub_download(target, "README.md", cache_dir=tmp_path / "c", token=TOKEN))
    assert f'from_pretrained("{target}")' in card.text
    loaded = Ensemble.from_pretrained(target, cache_dir=tmp_path / "c2", token=TOKEN)
    assert_bit_identical(full_output(loaded, published.batch), published.expected)
