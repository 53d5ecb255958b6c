"""`evaluate_ensemble` end to end: a small ensemble of in-house light experts with trained heads, evaluated on the
PTB-XL sample (and, through the PTB-XL <-> SNOMED CT label map, on the CinC sample), report written and consistent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from enecg.contract import InputContract
from enecg.data.build import load_dataset_dir
from enecg.data.cinc import CincOptions, prepare_cinc
from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl
from enecg.data.rows import label_arrays, row_to_record
from enecg.data.schema import TaskInfo
from enecg.ensemble import Ensemble, EnsembleConfig, TaskConfig
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.evaluation.metrics import BootstrapConfig, OperatingPoint
from enecg.evaluation.runner import UNIFORM_BASELINE, collect_predictions, evaluate_ensemble
from enecg.evaluation.task_eval import evaluate_task
from enecg.experts import load_expert
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import save_inhouse_expert

BOOT = BootstrapConfig(n_resamples=10, seed=3)
POINT = OperatingPoint(method="sensitivity", target_sensitivity=0.8)
PTBXL_TASKS = ("superclass", "rhythm", "sex", "age")


def _save_expert(folder: Path, name: str, architecture: str, seed: int, demographics: bool) -> Path:
    config = LightCNNConfig(
        architecture=architecture, width_multiplier=0.25, embedding_dim=24, use_demographics=demographics
    )
    torch.manual_seed(seed)
    contract = InputContract(fs=100.0, length=1000, scaling="zscore_lead")
    return save_inhouse_expert(
        build_light_model(config), family="light", config=config, contract=contract, folder=folder, name=name
    )


def _task_configs(meta) -> list[TaskConfig]:
    tasks = []
    for name in PTBXL_TASKS:
        info = meta.task(name)
        if info.type == "binary":  # the dataset names both classes; the head predicts the positive one
            tasks.append(TaskConfig(name=name, type="binary", label_names=[info.names[-1]]))
        elif info.type == "regression":
            tasks.append(TaskConfig(name=name, type="regression", target_mean=60.0, target_std=17.0))
        else:
            tasks.append(TaskConfig.from_task_info(info))
    return tasks


def build_ensemble(folders: dict[str, Path], meta, **gate) -> Ensemble:
    experts = {name: load_expert(folder) for name, folder in folders.items()}
    config = EnsembleConfig(
        experts=[
            {"name": n, "hub_id": str(f), "embedding_dim": experts[n].embedding_dim}
            for n, f in folders.items()
        ],
        tasks=_task_configs(meta),
        heads={"hidden_sizes": [32]},
        lora={"on_heads": False},
        # A random router start: in 80 joint steps the gate learns to lean on the informative expert.
        gate={"hidden_sizes": [16], "init_uniform": False, **gate},
        seed=0,
    )
    return Ensemble(config, experts)


def train_heads(ensemble: Ensemble, part, meta, steps: int = 80) -> None:
    """A plain loop on cached embeddings (the experts are frozen): heads and gate learn the tasks."""
    table = part.with_format("numpy")
    rows = [table[i] for i in range(len(table))]
    batch = EnsembleInputBuilder.for_ensemble(ensemble)([row_to_record(r) for r in rows])
    labels = {
        k: torch.from_numpy(v) for k, v in label_arrays(rows, [meta.task(t) for t in PTBXL_TASKS]).items()
    }
    with torch.no_grad():
        embeddings = ensemble.embed(batch.expert_inputs, batch.demographics, batch.window_masks)
    optimizer = torch.optim.Adam([p for p in ensemble.parameters() if p.requires_grad], lr=5e-3)
    ensemble.train()
    for _ in range(steps):
        output = ensemble(embeddings, batch.gate_input, batch.demographics, from_embeddings=True)
        loss, _parts = ensemble.compute_loss(output, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ensemble.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ptbxl_dir: Path) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("evaluation")
    _, meta = prepare_ptbxl(ptbxl_dir, root / "ptbxl", PtbxlOptions(rate=100, tasks=PTBXL_TASKS))
    cross = []
    if (data_dir / "cinc").is_dir():
        prepare_cinc(data_dir / "cinc", root / "cinc", CincOptions())
        cross = [root / "cinc"]
    folders = {
        # With (age, sex) fused into its embedding, the sex task is learnable from this expert: a record/label
        # misalignment anywhere in the evaluation would show as chance-level AUROC.
        "demo_cnn": _save_expert(root / "demo_cnn", "demo_cnn", "SimpleNet", 0, demographics=True),
        "attia": _save_expert(root / "attia", "attia", "AttiaNet", 1, demographics=False),
    }
    dataset, _ = load_dataset_dir(root / "ptbxl")
    ensemble = build_ensemble(folders, meta)
    train_heads(ensemble, dataset["train"], meta)
    evaluation = evaluate_ensemble(
        ensemble,
        root / "ptbxl",
        out_dir=root / "report",
        operating_point=POINT,
        bootstrap=BOOT,
        n_examples=3,
        batch_size=24,
        cross_data=cross,
    )
    return SimpleNamespace(
        root=root,
        meta=meta,
        dataset=dataset,
        ensemble=ensemble,
        folders=folders,
        evaluation=evaluation,
        report=root / "report",
        cross=cross,
    )


def test_report_files_and_figures(run: SimpleNamespace) -> None:
    data = json.loads((run.report / "report.json").read_text())
    assert data == run.evaluation
    html = (run.report / "report.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (run.report / src).is_file() and (run.report / src).stat().st_size > 1000, src
    sections = {f["section"] for f in data["figures"]}
    assert {"superclass", "rhythm", "sex", "gate"} <= sections  # regression (age) has a table, no curve
    assert {Path(f["path"]).name for f in data["figures"]} >= {
        "roc_pr_superclass.png",
        "calibration_rhythm.png",
        "gate.png",
    }
    for needle in ("Task: superclass", "Task: age", UNIFORM_BASELINE, "demo_cnn", "attia", "Example records"):
        assert needle in html
    assert data["n_records"] == len(run.dataset["test"])
    assert data["split"] == "test" and data["validation_split"] == "validation"


def assert_same(expected: object, actual: object, path: str = "") -> None:
    """Equal JSON trees, floats within 1e-6 (the same records batched differently differ in the last bits)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(expected) == set(actual), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(expected) == len(actual), path
        for i, (a, b) in enumerate(zip(expected, actual)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(expected, float) and isinstance(actual, float):
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-6), path
    else:
        assert expected == actual, path


def test_metrics_match_recomputation(run: SimpleNamespace) -> None:
    """The report's numbers are evaluate_task on the model's own outputs, thresholds fitted on validation."""
    tasks = run.ensemble.config.tasks
    infos = [TaskInfo(name=t.name, type=t.type, names=list(t.label_names) or [t.name]) for t in tasks]
    test = collect_predictions(run.ensemble, run.dataset["test"], infos, batch_size=24)
    val = collect_predictions(run.ensemble, run.dataset["validation"], infos, batch_size=24)
    assert test.record_ids == list(run.dataset["test"]["record_id"])
    for info in infos:
        t = info.name
        expected = evaluate_task(
            info.type,
            info.names,
            test.labels[t],
            test.predictions[t],
            val_true=val.labels[t],
            val_pred=val.predictions[t],
            test_groups=test.patient_ids,
            operating_point=POINT,
            bootstrap=BOOT,
        )
        reported = dict(run.evaluation["tasks"][t])
        # Every test record is readable by the ensemble here: all of them were predicted.
        assert reported.pop("n_predicted") == expected["n_records"] == len(test.record_ids)
        assert_same(json.loads(json.dumps(expected)), reported)
        for e, expert in enumerate(run.ensemble.expert_names):
            alone = evaluate_task(
                info.type,
                info.names,
                test.labels[t],
                test.expert_predictions[t][:, e],
                val_true=val.labels[t],
                val_pred=val.expert_predictions[t][:, e],
                test_groups=test.patient_ids,
                operating_point=POINT,
                bootstrap=BOOT,
            )
            alone_reported = dict(run.evaluation["experts"][expert][t])
            assert alone_reported.pop("n_predicted") == len(test.record_ids)  # each expert read every record
            assert_same(json.loads(json.dumps(alone)), alone_reported)
        # mix='probabilities': the ensemble is the gate-weighted mixture of the experts' probabilities, the
        # baseline the equal-weight one (regression: the same in target units).
        w = test.gate_weights[t]
        weights = w if test.expert_predictions[t].ndim == 2 else w[:, :, None]
        np.testing.assert_allclose(
            (weights * test.expert_predictions[t]).sum(1), test.predictions[t], atol=2e-5
        )
        np.testing.assert_allclose(test.expert_predictions[t].mean(1), test.uniform_predictions[t], atol=2e-5)
    assert set(run.evaluation["baselines"][UNIFORM_BASELINE]) == {t.name for t in tasks}
    # Thresholds came from validation, so the test sensitivity is near (not exactly) the 0.8 target.
    assert run.evaluation["tasks"]["superclass"]["operating_point"]["fitted_on"] == "validation"


def test_predictions_are_informative(run: SimpleNamespace) -> None:
    sex = run.evaluation["tasks"]["sex"]
    # The expert that sees (age, sex) predicts sex alone; the ensemble (mixing in a blind expert) still does well.
    assert run.evaluation["experts"]["demo_cnn"]["sex"]["metrics"]["per_label"]["female"]["auroc"] > 0.85
    assert run.evaluation["experts"]["attia"]["sex"]["metrics"]["per_label"]["female"]["auroc"] < 0.75
    assert sex["metrics"]["per_label"]["female"]["auroc"] > 0.75
    assert (
        sex["ci"]["female/auroc"][0]
        <= sex["metrics"]["per_label"]["female"]["auroc"]
        <= sex["ci"]["female/auroc"][1]
    )
    age = run.evaluation["tasks"]["age"]["metrics"]
    assert age["n"] > 0 and 0 < age["mae"] < 40


def test_gate_statistics(run: SimpleNamespace) -> None:
    gate = run.evaluation["gate"]
    for task in PTBXL_TASKS:
        assert set(gate["mean_weights"][task]) == {"demo_cnn", "attia"}
        assert sum(gate["mean_weights"][task].values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(gate["top_weight_share"][task].values()) == pytest.approx(1.0)


def test_examples_carry_experts_and_gate(run: SimpleNamespace) -> None:
    examples = run.evaluation["examples"]
    assert len(examples) == 3
    ids = list(run.dataset["test"]["record_id"])
    assert len({ex["record_id"] for ex in examples}) == 3
    for ex in examples:
        assert (run.report / ex["image"]).is_file()
        row = run.dataset["test"][ids.index(ex["record_id"])]
        assert ex["labels"]["rhythm"] == {
            n: (None if np.isnan(v) else v)
            for n, v in zip(run.meta.task("rhythm").names, np.asarray(row["rhythm"], float))
        }
        for task in PTBXL_TASKS:
            assert sum(ex["gate"][task].values()) == pytest.approx(1.0, abs=1e-5)
            for expert in ("demo_cnn", "attia"):
                assert set(ex["expert_predictions"][task][expert]) == set(ex["predictions"][task])
        assert set(ex["predictions"]["superclass"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
        assert set(ex["predictions"]["sex"]) == {"female"}


def test_cross_dataset_side_by_side(run: SimpleNamespace) -> None:
    if not run.cross:
        pytest.skip("CinC sample not found")
    cross = run.evaluation["cross_dataset"]
    in_source = next(k for k in cross if "in-source" in k)
    external = next(k for k in cross if "external" in k)
    # SCP <-> SNOMED statements (rhythm), and the tasks both sources define alike, paired by name.
    assert set(cross[in_source]) == set(cross[external]) == {"rhythm", "superclass", "sex", "age"}
    superclass = {(p["model_label"], p["target_label"]) for p in cross[external]["superclass"]["label_pairs"]}
    assert superclass == {(n, n) for n in ("NORM", "MI", "STTC", "CD", "HYP")}
    assert cross[external]["age"]["type"] == "regression" and cross[external]["age"]["metrics"]["n"] > 0
    pairs = {(p["model_label"], p["target_label"]) for p in cross[external]["rhythm"]["label_pairs"]}
    assert {("SR", "NSR"), ("AFIB", "AF"), ("STACH", "STach"), ("SBRAD", "SB"), ("AFLT", "AFL")} <= pairs
    _, cinc_meta = load_dataset_dir(run.cross[0])
    assert cross[external]["rhythm"]["n_records"] == sum(cinc_meta.splits.values())
    assert cross[in_source]["rhythm"]["n_records"] == len(run.dataset["test"])
    # Side by side: the same labels, and thresholds from the source validation split on both rows.
    assert cross[in_source]["rhythm"]["labels"] == cross[external]["rhythm"]["labels"]
    assert cross[in_source]["rhythm"]["thresholds"] == cross[external]["rhythm"]["thresholds"]
    html = (run.report / "report.html").read_text()
    assert "Cross-dataset validation" in html and "(external)" in html and "in-source" in html
    plan = run.evaluation["cross_dataset_plans"][0]
    assert plan["label_map"] == "ptbxl-cinc" and plan["n_records"] == sum(cinc_meta.splits.values())


def test_sparse_routing_still_scores_every_expert(run: SimpleNamespace) -> None:
    """With top-1 routing the forward pass skips experts; expert-alone predictions must still cover every record
    (and equal a dense ensemble's, whose heads are initialised identically from the same seed)."""
    dense = build_ensemble(run.folders, run.meta)
    sparse = build_ensemble(run.folders, run.meta, top_k=1)
    sparse.load_trainable_state_dict(dense.trainable_state_dict())
    part = run.dataset["test"].select(range(10))
    a = collect_predictions(dense, part, batch_size=4)
    b = collect_predictions(sparse, part, batch_size=4)
    for task in PTBXL_TASKS:
        assert not np.isnan(b.expert_predictions[task]).any()
        np.testing.assert_allclose(a.expert_predictions[task], b.expert_predictions[task], atol=1e-5)
        assert ((b.gate_weights[task] > 0).sum(1) == 1).all()


def test_embedding_combination_scores_experts_and_baseline(run: SimpleNamespace) -> None:
    """gate.combine='embeddings' has no per-expert heads: an expert alone is the shared head on its projection."""
    ensemble = build_ensemble(run.folders, run.meta, combine="embeddings", projection_dim=16)
    part = run.dataset["test"].select(range(6))
    predictions = collect_predictions(ensemble, part, batch_size=4)
    heads = ensemble.shared_heads["superclass"]
    batch = EnsembleInputBuilder.for_ensemble(ensemble)([row_to_record(r) for r in part.with_format("numpy")])
    with torch.no_grad():
        embeddings = ensemble.embed(batch.expert_inputs, batch.demographics, batch.window_masks)
        projections = [ensemble.branch(n).project(embeddings[n]) for n in ensemble.expert_names]
        alone = torch.sigmoid(heads(projections[1])).numpy()
        uniform = torch.sigmoid(heads((projections[0] + projections[1]) / 2)).numpy()
    np.testing.assert_allclose(predictions.expert_predictions["superclass"][:, 1], alone, atol=1e-5)
    np.testing.assert_allclose(predictions.uniform_predictions["superclass"], uniform, atol=1e-5)
    assert predictions.expert_predictions["age"].shape == (6, 2)


def test_without_validation_split_thresholds_default(run: SimpleNamespace, tmp_path: Path) -> None:
    evaluation = evaluate_ensemble(
        run.ensemble,
        run.root / "ptbxl",
        val_split=None,
        out_dir=tmp_path,
        bootstrap=BootstrapConfig(n_resamples=0),
        n_examples=0,
    )
    result = evaluation["tasks"]["superclass"]
    assert result["operating_point"]["fitted_on"] == "default 0.5"
    assert set(result["thresholds"].values()) == {0.5}
    assert "temperature" not in result["calibration"] and evaluation["validation_split"] is None
    assert evaluation["examples"] == [] and evaluation["cross_dataset"] == {}
    assert (tmp_path / "report.html").is_file()


def test_bad_split_and_task_mismatch(run: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no split part 'holdout'"):
        evaluate_ensemble(run.ensemble, run.root / "ptbxl", split="holdout", out_dir=tmp_path)
    other = build_ensemble(run.folders, run.meta)
    other.config.tasks[0].label_names = ["NORM", "MI", "STTC", "CD", "XYZ"]
    with pytest.raises(ValueError, match="task 'superclass' is multilabel"):
        evaluate_ensemble(other, run.root / "ptbxl", out_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    from enecg.cli import main

    for command, needles in (
        ("evaluate", ("--operating-point", "--cross-data", "--label-map", "--bootstrap")),
        ("predict", ("--model", "--json")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for needle in needles:
            assert needle in text


def test_cli_operating_point_parsing() -> None:
    from enecg.cli.evaluate import parse_operating_point

    assert parse_operating_point("max_f1") == OperatingPoint("max_f1")
    assert parse_operating_point("sensitivity:0.95") == OperatingPoint("sensitivity", 0.95)
    for bad in ("sensitivity", "sensitivity:1.5", "youden"):
        with pytest.raises(Exception, match="operating point"):
            parse_operating_point(bad)


def test_cli_evaluate_and_predict_a_saved_model(
    run: SimpleNamespace, ptbxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from enecg.cli import main
    from enecg.ensemble.serialization import save_pretrained

    model = save_pretrained(run.ensemble, tmp_path / "model")
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            str(model),
            "--data",
            str(run.root / "ptbxl"),
            "--out",
            str(out),
            "--bootstrap",
            "5",
            "--examples",
            "1",
            "--operating-point",
            "sensitivity:0.8",
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "report.json").read_text())
    assert (out / "report.html").is_file() and len(printed["examples"]) == 1
    # The reloaded model gives the in-memory model's metrics (same weights, same records).
    for task in PTBXL_TASKS:
        assert_same(run.evaluation["tasks"][task]["metrics"], printed["tasks"][task]["metrics"])
    assert printed["tasks"]["sex"]["operating_point"]["method"] == "sensitivity"

    records = [ptbxl_dir / "records100" / "00000" / f"0000{i}_lr.hea" for i in (1, 2)]
    assert main(["predict", *map(str, records), "--model", str(model), "--device", "cpu", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["record_id"] for p in predictions] == ["00001_lr", "00002_lr"]
    for prediction in predictions:
        for task in PTBXL_TASKS:
            entry = prediction["tasks"][task]
            assert set(entry["experts"]) == {"demo_cnn", "attia"}
            assert sum(entry["gate_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", str(records[0]), "--model", str(model), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "superclass:" in text and "gate" in text
    assert main(["predict", str(tmp_path / "missing.hea"), "--model", str(model), "--device", "cpu"]) == 2
    assert "missing.hea" in capsys.readouterr().err
    # One bad record among good ones: its own one-line error; the good records are still predicted and printed.
    bad = tmp_path / "bad.hea"
    bad.write_text((records[0]).read_text().replace(" 100 ", " 0.01 ", 1))
    argv = ["predict", str(records[0]), str(bad), str(records[1]), "--model", str(model), "--device", "cpu"]
    assert main([*argv, "--json"]) == 2
    captured = capsys.readouterr()
    predictions = json.loads(captured.out)
    assert [p.get("record_id") for p in predictions] == ["00001_lr", None, "00002_lr"]
    assert predictions[1]["path"] == str(bad) and "sampling rate 0.01 Hz is implausible" in predictions[1]["error"]
    assert f"enecg: error: {bad}: sampling rate 0.01 Hz" in captured.err
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "00001_lr" in captured.out and "00002_lr" in captured.out and f"{bad}: ERROR" in captured.out


def test_baselines_and_paired_comparisons(run: SimpleNamespace) -> None:
    from enecg.evaluation.baselines import BEST_SINGLE, STACKER, probe_name

    evaluation = run.evaluation
    names = set(evaluation["baselines"])
    assert {UNIFORM_BASELINE, BEST_SINGLE, STACKER, probe_name("demo_cnn"), probe_name("attia")} <= names
    chosen = evaluation["baseline_details"]["best_single_expert"]
    for task in PTBXL_TASKS:
        # The validation-chosen expert's row is that expert's own row, evaluated the same way.
        assert (
            evaluation["baselines"][BEST_SINGLE][task]["metrics"] == evaluation["experts"][chosen[task]][task]["metrics"]
        )
        paired = evaluation["paired"][task]
        assert set(paired) == {UNIFORM_BASELINE, BEST_SINGLE, STACKER}
        for result in paired.values():
            assert result["difference"] == pytest.approx(result["a"] - result["b"])
            low, high = result["ci"]
            assert low <= high
    # The sex task is learnable from the demographics expert's embedding: its probe finds it.
    assert evaluation["baselines"][probe_name("demo_cnn")]["sex"]["metrics"]["per_label"]["female"]["auroc"] > 0.85
    html = (run.report / "report.html").read_text()
    assert "Ensemble vs baselines (paired)" in html and STACKER in html


def test_cross_split_all_means_every_record(run: SimpleNamespace, tmp_path: Path) -> None:
    if not run.cross:
        pytest.skip("CinC sample not found")
    evaluation = evaluate_ensemble(
        run.ensemble,
        run.root / "ptbxl",
        out_dir=tmp_path / "report",
        bootstrap=BOOT,
        n_examples=0,
        baselines=False,
        cross_data=run.cross,
        cross_split="all",
    )
    _, cinc_meta = load_dataset_dir(run.cross[0])
    plan = evaluation["cross_dataset_plans"][0]
    assert plan["split"] == "all" and plan["n_records"] == sum(cinc_meta.splits.values())
