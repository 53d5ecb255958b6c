"""``enecg quickstart``: the whole mission offline, checked from its outputs.

CI runs the README's quickstart command first and points ``ENECG_QUICKSTART_OUTPUT`` at its output folder; these
tests then check that folder. Without the variable, the quickstart runs here once per module (``--fast``, in
process through the ``enecg`` entry point) on the PTB-XL sample when the shared data is present, else on the
synthetic ECGSYN set: the quickstart must work without data, so nothing here skips.

Checks: the summary lists every output; the Hub was shut down; the pushed experts and ensemble are in the Hub
storage and load by ID from a restarted server into a fresh cache; the reloaded ensemble predicts exactly as the
trained model folder does; the report and every image it references exist; the ensemble beats a constant
predictor. The data-source selection and the recipe have fast unit tests of their own.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT

from enecg.cli.quickstart import ENSEMBLE_REPO, SUMMARY_FILE
from enecg.cli.quickstart_plan import (
    DEFAULT_RECIPE,
    QUICKSTART_EXPERTS,
    DataSource,
    build_recipe,
    choose_data_source,
    recipe_experts,
)
from enecg.evaluation.summary import compare_with_constant

OUTPUT_ENV = "ENECG_QUICKSTART_OUTPUT"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# The headline task per data source: a classification task (macro AUROC) and a regression task (MAE).
HEADLINE_TASKS = {"ptbxl": ("superclass", "age"), "synthetic": ("rhythm", "heart_rate")}


# ------------------------------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The quickstart's output folder and summary (CI's, or a ``--fast`` run made here)."""
    given = os.environ.get(OUTPUT_ENV)
    printed = None
    if given:
        out = Path(given)
        assert (out / SUMMARY_FILE).is_file(), (
            f"{OUTPUT_ENV}={given}: no {SUMMARY_FILE} (did the quickstart finish?)"
        )
    else:
        from enecg.cli import main

        out = tmp_path_factory.mktemp("quickstart") / "out"
        cache_before = _hub_cache_setting()
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["quickstart", "--out", str(out), "--fast", "--seed", "0"]) == 0
        printed = buffer.getvalue()
        assert _hub_cache_setting() == cache_before  # the fresh Hub caches were scoped to the run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return SimpleNamespace(out=out, summary=summary, printed=printed)


def _hub_cache_setting() -> tuple[str, str | None]:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE, os.environ.get("HF_HUB_CACHE")


@pytest.fixture(scope="module")
def restarted_hub(quickstart: SimpleNamespace) -> Iterator[object]:
    """A LocalHub restarted on the quickstart's storage, with huggingface_hub pointed at it."""
    from enecg.testing.endpoint import use_endpoint
    from enecg.testing.local_hub import LocalHub

    with LocalHub(quickstart.out / "hub") as hub, use_endpoint(hub.url):
        yield hub


@pytest.mark.slow
def test_summary_lists_every_output(quickstart: SimpleNamespace) -> None:
    summary, out = quickstart.summary, quickstart.out
    assert summary["data"]["source"] in ("ptbxl", "synthetic")
    if summary["data"]["source"] == "ptbxl":  # the whole sample, official folds
        assert summary["data"]["splits"] == {"train": 353, "validation": 81, "test": 66}
    assert Path(summary["data"]["dataset_dir"], "enecg_dataset.json").is_file()
    assert len(summary["experts"]) >= 2
    assert len({e["architecture"] for e in summary["experts"]}) == len(summary["experts"])  # all different
    for expert in summary["experts"]:
        assert COMMIT_RE.match(expert["commit"]) and expert["repo_id"].startswith("local-org/")
    assert len(summary["training"]["tasks"]) >= 3
    assert Path(summary["training"]["model_dir"], "config.json").is_file()
    assert summary["training"]["feature_cache"]["enabled"] is True
    assert summary["ensemble"]["repo_id"] == ENSEMBLE_REPO and COMMIT_RE.match(summary["ensemble"]["commit"])
    assert summary["ensemble"]["reload_check"]["identical"] is True
    assert summary["ensemble"]["reload_check"]["max_abs_difference"] == 0.0
    assert len(summary["ensemble"]["reload_check"]["records"]) >= 1
    assert Path(summary["report"]["html"]).is_file() and Path(summary["report"]["json"]).is_file()
    assert summary["hub"]["storage"] == str(out / "hub")
    assert summary["seconds"]["total"] > 0 and set(summary["seconds"]) >= {"data", "pretraining", "training"}
    # The training really loaded each expert at its pushed commit, by Hub ID.
    config = json.loads(Path(summary["training"]["model_dir"], "config.json").read_text())
    recorded = {e["name"]: (e["hub_id"], e["revision"]) for e in config["experts"]}
    assert recorded == {e["name"]: (e["repo_id"], e["commit"]) for e in summary["experts"]}
    if quickstart.printed is not None:  # run here: the printed summary says where everything went
        for text in (summary["report"]["html"], ENSEMBLE_REPO, str(out / SUMMARY_FILE)):
            assert text in quickstart.printed


@pytest.mark.slow
def test_hub_was_shut_down(quickstart: SimpleNamespace) -> None:
    assert not [t for t in threading.enumerate() if t.name == "enecg-local-hub"]
    url = urlsplit(quickstart.summary["hub"]["url_during_run"])
    assert url.hostname == "127.0.0.1"
    if quickstart.printed is not None:  # the port is free again (in CI another process ran the quickstart)
        with pytest.raises(OSError), socket.create_connection((url.hostname, url.port), timeout=2):
            pass


@pytest.mark.slow
def test_pushed_repos_exist_and_load_by_id(
    quickstart: SimpleNamespace, restarted_hub, tmp_path: Path
) -> None:
    import huggingface_hub as hh

    from enecg.experts import load_expert

    summary = quickstart.summary
    for expert in summary["experts"]:
        assert restarted_hub.head_commit(expert["repo_id"]) == expert["commit"]
        assert {"README.md", "config.json", "enecg_expert.json", "model.safetensors"} <= set(
            restarted_hub.list_files(expert["repo_id"])
        )
        loaded = load_expert(expert["repo_id"], cache_dir=tmp_path / "expert-cache")
        assert loaded.hub_id == expert["repo_id"] and loaded.revision == expert["commit"]
    assert restarted_hub.head_commit(ENSEMBLE_REPO) == summary["ensemble"]["commit"]
    card = hh.ModelCard.load(ENSEMBLE_REPO)
    assert card.data.library_name == "enecg"
    assert set(card.data.base_model) == {e["repo_id"] for e in summary["experts"]}


@pytest.mark.slow
def test_pushed_ensemble_predicts_like_the_trained_model(
    quickstart: SimpleNamespace, restarted_hub, tmp_path: Path
) -> None:
    from enecg.data.build import load_dataset_dir
    from enecg.data.rows import row_to_record
    from enecg.ensemble import Ensemble

    summary = quickstart.summary
    pulled = Ensemble.from_pretrained(ENSEMBLE_REPO, cache_dir=tmp_path / "ensemble-cache")
    assert pulled.expert_names == [e["name"] for e in summary["experts"]]
    assert [ref.revision for ref in pulled.config.experts] == [e["commit"] for e in summary["experts"]]
    trained = Ensemble.from_pretrained(summary["training"]["model_dir"], cache_dir=tmp_path / "local-cache")
    dataset, _ = load_dataset_dir(summary["data"]["dataset_dir"])
    test = dataset["test"].with_format("numpy")
    records = [row_to_record(test[i]) for i in range(0, len(test), max(1, len(test) // 6))]
    expected = [r.to_dict() for r in trained.predict_records(records)]
    assert [r.to_dict() for r in pulled.predict_records(records)] == expected


@pytest.mark.slow
def test_report_and_every_image_it_references_exist(quickstart: SimpleNamespace) -> None:
    report_json = Path(quickstart.summary["report"]["json"])
    report_dir = report_json.parent
    report = json.loads(report_json.read_text())
    assert set(report["tasks"]) == set(quickstart.summary["training"]["tasks"])
    images = [f["path"] for f in report["figures"]] + [e["image"] for e in report["examples"]]
    assert images and report["examples"]
    html = Path(quickstart.summary["report"]["html"]).read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    assert sources, "the HTML report shows no images"
    for path in {*images, *sources}:
        if not path.startswith("data:"):  # inline images need no file
            assert (report_dir / path).is_file(), f"report references missing image {path}"


@pytest.mark.slow
def test_ensemble_beats_a_constant_predictor(quickstart: SimpleNamespace) -> None:
    """Recomputed from report.json and the dataset, not taken from the summary.

    A constant predictor's AUROC is 0.5 whatever its constant, so the classification criterion is that the
    patient-level bootstrap 95 % CI of the macro AUROC lies above 0.5 (better than chance at 95 % confidence);
    for regression the test MAE must be below that of the training-part mean.
    """
    from enecg.data.build import load_dataset_dir

    summary = quickstart.summary
    classification, regression = HEADLINE_TASKS[summary["data"]["source"]]
    report = json.loads(Path(summary["report"]["json"]).read_text())
    tasks = report["tasks"]

    auroc = tasks[classification]["metrics"].get("macro_auroc")
    if auroc is None:
        auroc = tasks[classification]["metrics"]["macro"]["auroc"]
    low, high = tasks[classification]["ci"]["macro_auroc"]
    assert low > 0.5, (
        f"{classification}: macro AUROC {auroc:.3f}, 95% CI [{low:.3f}, {high:.3f}] includes chance"
    )

    dataset, _ = load_dataset_dir(summary["data"]["dataset_dir"])
    train = np.asarray(dataset["train"].with_format("numpy")[regression], dtype=float)
    test = np.asarray(dataset["test"].with_format("numpy")[regression], dtype=float)
    test = test[~np.isnan(test)]
    constant_mae = float(np.mean(np.abs(test - np.nanmean(train))))
    mae = tasks[regression]["metrics"]["mae"]
    assert mae < constant_mae, (
        f"{regression}: MAE {mae:.2f} is not below the train-mean predictor's {constant_mae:.2f}"
    )
    # The summary's own comparison agrees.
    assert summary["metrics"]["tasks"][regression]["constant"] == pytest.approx(constant_mae, rel=1e-6)
    assert summary["metrics"]["tasks"][classification]["beats_constant"] is True
    assert summary["metrics"]["tasks"][regression]["beats_constant"] is True


@pytest.mark.slow
def test_summary_compares_the_ensemble_with_its_baselines(quickstart: SimpleNamespace) -> None:
    """Every task row: the ensemble against the uniform average, the validation-chosen single expert and the
    stacker, each with the paired difference taken from the report (so the printed numbers are the report's)."""
    summary = quickstart.summary
    report = json.loads(Path(summary["report"]["json"]).read_text())
    assert summary["strategy"] == "staged"
    for task, row in summary["metrics"]["tasks"].items():
        assert set(row["baselines"]) == {
            "uniform average",
            "best single expert (validation)",
            "stacker (out-of-fold probes)",
        }
        for name, base in row["baselines"].items():
            paired = report["paired"][task][name]
            assert base["difference"] == paired["difference"] and base["value"] == paired["b"]
        assert row["baselines"]["best single expert (validation)"]["expert"] in {e["name"] for e in summary["experts"]}
    if quickstart.printed is not None:
        assert "vs best single expert (validation)" in quickstart.printed


@pytest.mark.slow
def test_printed_next_commands_work_as_printed(quickstart: SimpleNamespace, tmp_path: Path) -> None:
    """The commands the summary prints run in a fresh environment: no HF_* variable to guess."""
    import shlex
    import subprocess
    import sys

    commands = quickstart.summary["next_commands"]
    assert [c.split()[:2] for c in commands] == [["enecg", "evaluate"], ["enecg", "predict"]]
    if quickstart.printed is not None:
        assert all(c in quickstart.printed for c in commands)
    enecg = Path(sys.executable).with_name("enecg")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS_"))}
    env["HOME"] = str(tmp_path)  # not even a user cache to fall back on
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run(
            [str(enecg), *argv[1:]], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
        if argv[1] == "predict":
            assert "gate" in done.stdout
        else:
            assert "report:" in done.stdout and "ensemble -" in done.stdout


# ------------------------------------------------------------------------------------------ unit tests


def _fake_ptbxl(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ptbxl_database.csv").write_text("ecg_id\n")
    return folder


def test_auto_data_source_prefers_the_ptbxl_sample(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "data"
    sample = _fake_ptbxl(shared / "ptbxl500")
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere" / "deeper"
    repo.mkdir()
    elsewhere.mkdir(parents=True)

    # $ENECG_DATA_DIR, as in the tests
    source = choose_data_source(
        "auto", environ={"ENECG_DATA_DIR": str(shared)}, cwd=elsewhere, repo_root=elsewhere
    )
    assert (
        source == DataSource("ptbxl", sample.resolve(), source.reason) and "ENECG_DATA_DIR" in source.reason
    )
    # ../shared/data next to the working directory, or next to the repository
    by_cwd = choose_data_source("auto", environ={}, cwd=repo, repo_root=elsewhere)
    by_repo = choose_data_source("auto", environ={}, cwd=elsewhere, repo_root=repo)
    assert by_cwd.root == by_repo.root == sample.resolve()
    assert "working directory" in by_cwd.reason and "repository" in by_repo.reason


def test_auto_data_source_falls_back_to_synthetic(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "data"
    _fake_ptbxl(shared / "ptbxl500")
    nowhere = tmp_path / "a" / "b"
    nowhere.mkdir(parents=True)
    assert choose_data_source("auto", environ={}, cwd=nowhere, repo_root=nowhere).kind == "synthetic"
    # $ENECG_DATA_DIR overrides the default location: set but without the sample means synthetic
    missing = choose_data_source(
        "auto",
        environ={"ENECG_DATA_DIR": str(tmp_path / "none")},
        cwd=tmp_path / "repo",
        repo_root=tmp_path / "repo",
    )
    assert missing.kind == "synthetic" and missing.root is None and str(tmp_path / "none") in missing.reason
    # an incomplete folder (no ptbxl_database.csv) is not the sample
    (tmp_path / "c" / "shared" / "data" / "ptbxl500").mkdir(parents=True)
    assert (
        choose_data_source("auto", environ={}, cwd=tmp_path / "c" / "x", repo_root=nowhere).kind
        == "synthetic"
    )


def test_explicit_data_sources(tmp_path: Path) -> None:
    sample = _fake_ptbxl(tmp_path / "data" / "ptbxl500")
    assert (
        choose_data_source("synthetic", environ={"ENECG_DATA_DIR": str(tmp_path / "data")}).kind
        == "synthetic"
    )
    assert choose_data_source(str(sample)).root == sample.resolve()
    assert choose_data_source(str(tmp_path / "data")).root == sample.resolve()  # the folder holding ptbxl500/
    with pytest.raises(FileNotFoundError, match=r"not a PTB-XL folder.*--data synthetic"):
        choose_data_source(str(tmp_path))


def test_quickstart_recipe_trains_three_tasks_from_hub_ids(tmp_path: Path) -> None:
    from enecg.data.ptbxl import PTBXL_TASKS
    from enecg.data.synthetic import SYNTHETIC_TASKS

    assert DEFAULT_RECIPE == REPO_ROOT / "recipes" / "quickstart.yaml"
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    plans = recipe_experts(data, DEFAULT_RECIPE)
    assert 2 <= len(plans) <= 3 and len({p.architecture for p, _ in plans}) == len(plans)
    pushed = [(plan, repo_id, "a" * 40) for plan, repo_id in plans]
    common = dict(experts=pushed, output_dir=tmp_path / "training", seed=3, data_dir=tmp_path / "data")
    ptbxl = build_recipe(
        DEFAULT_RECIPE, data, source=DataSource("ptbxl", tmp_path, "t"), fast=False, **common
    )
    synthetic = build_recipe(
        DEFAULT_RECIPE, data, source=DataSource("synthetic", None, "t"), fast=True, **common
    )
    for recipe, known in ((ptbxl, PTBXL_TASKS), (synthetic, SYNTHETIC_TASKS)):
        assert len(recipe.tasks) >= 3 and {t.name for t in recipe.tasks} <= set(known)
        assert [(e.source, e.revision) for e in recipe.experts] == [(r, c) for _, r, c in pushed]
        assert all(e.create is None for e in recipe.experts)  # nothing is created from folders
        assert recipe.data.path == str(tmp_path / "data") and recipe.data.feature_cache == "on"
        assert recipe.optim.seed == 3 and recipe.output.dir == str(tmp_path / "training")
    assert synthetic.optim.epochs <= ptbxl.optim.epochs
    assert (
        data["experts"][0]["source"] == recipe_experts(data, DEFAULT_RECIPE)[0][1]
    )  # the file is not modified

    with pytest.raises(ValueError, match="not one the quickstart pretrains"):
        recipe_experts({"experts": [{"name": "hubert", "source": "org/x"}]}, DEFAULT_RECIPE)
    with pytest.raises(ValueError, match="Hub ID"):
        recipe_experts(
            {"experts": [{"name": QUICKSTART_EXPERTS[0].name, "source": "folder"}]}, DEFAULT_RECIPE
        )


def test_constant_comparison_direction() -> None:
    evaluation = {
        "tasks": {
            "superclass": {
                "type": "multilabel",
                "metrics": {"macro": {"auroc": 0.7}},
                "ci": {"macro_auroc": [0.6, 0.8]},
            },
            "age": {"type": "regression", "metrics": {"mae": 12.0}, "ci": {}},
            "sex": {"type": "binary", "metrics": {"macro": {"auroc": None}}, "ci": {}},
        }
    }
    constant = {"superclass": {"value": 0.5}, "age": {"value": 11.0}, "sex": {"value": 0.5}}
    rows = compare_with_constant(evaluation, constant)
    assert rows["superclass"]["beats_constant"] is True and rows["superclass"]["ci"] == [0.6, 0.8]
    assert rows["age"]["beats_constant"] is False  # MAE: lower is better
    assert rows["sex"]["beats_constant"] is None  # undefined metric: no verdict


def test_cli_registers_quickstart() -> None:
    from enecg.cli import build_parser

    args = build_parser().parse_args(["quickstart", "--fast", "--data", "synthetic", "--seed", "2"])
    assert (
        args.fast is True and args.data == "synthetic" and args.seed == 2 and args.out == "outputs/quickstart"
    )
    assert callable(args.func)
