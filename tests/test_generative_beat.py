"""The beat-template generative model (kind ``beat``, enecg.generative.beat): fit on real PTB-XL records, Hub round
trip, seeded sampling, conditioning, synthetic-row guards, bad requests, anomaly scores, and the kind registry
shared with the diffusion model. Fits take about a second on one CPU thread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from enecg.generative.base import generative_kinds, load_generative
from enecg.generative.beat import BeatConfig, BeatModel, train_beat


def beat_config(data: Path, out: Path, **changes: object) -> BeatConfig:
    values: dict[str, object] = {
        "data": str(data),
        "task": "superclass",
        "output_dir": str(out),
        "max_records": 120,
        "components": 8,
        "anomaly_components": 4,
        **changes,
    }
    return BeatConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fitted(ptbxl_training_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_beat(beat_config(ptbxl_training_dataset, tmp_path_factory.mktemp("beat") / "model"))


def test_fit_writes_a_hub_ready_folder_of_kind_beat(fitted: Path) -> None:
    assert {"model.safetensors", "config.json", "README.md", "metrics.json"} <= {p.name for p in fitted.iterdir()}
    config = json.loads((fitted / "config.json").read_text())
    assert config["kind"] == "beat" and config["label_names"] == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert len(config["leads"]) == 12 and config["fs"] == 100.0 and config["length"] == 1000
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["records"] == 120 and metrics["records_used"] + metrics["skipped_no_beats"] == 120
    assert metrics["records_used"] >= 100 and metrics["anomaly_records"] > 10
    assert "synthetic" in (fitted / "README.md").read_text()
    assert isinstance(load_generative(fitted), BeatModel)
    assert generative_kinds.names() == ["beat", "diffusion"]


def test_samples_look_like_ecg_and_are_identical_under_a_seed_after_a_hub_round_trip(
    fitted: Path, tmp_path: Path
) -> None:
    import huggingface_hub

    from enecg.generative.evaluate import heart_rates
    from enecg.testing.endpoint import use_endpoint
    from enecg.testing.local_hub import LocalHub

    local = load_generative(fitted)
    first = local.sample(["HYP"], 3, seed=7)
    assert first.shape == (3, 12, 1000) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, local.sample(["HYP"], 3, seed=7))
    np.testing.assert_array_equal(first[:2], local.sample(["HYP"], 2, seed=7))  # record i: stream (seed, i)
    assert not np.array_equal(first, local.sample(["HYP"], 3, seed=8))
    rates = heart_rates(local.sample(["NORM"], 8, seed=0), 100.0, 1)
    assert 40 < np.nanmedian(rates) < 130  # beats at a heart rate, not noise
    repo_id = "enecg-test/ecg-beat"
    with LocalHub(tmp_path / "hub") as hub, use_endpoint(hub.url):
        huggingface_hub.create_repo(repo_id)
        huggingface_hub.upload_folder(folder_path=str(fitted), repo_id=repo_id)
        remote = load_generative(repo_id)
    assert remote.name == repo_id
    np.testing.assert_array_equal(remote.sample(["HYP"], 3, seed=7), first)
    np.testing.assert_array_equal(
        remote.sample_conditions(np.eye(5, dtype=np.float32), 5, ages=np.full(5, 60.0), seed=1),
        local.sample_conditions(np.eye(5, dtype=np.float32), 5, ages=np.full(5, 60.0), seed=1),
    )


def test_bad_requests_are_one_line_errors(fitted: Path, ptbxl_training_dataset: Path, tmp_path: Path, capsys) -> None:
    from enecg.cli import main

    model = load_generative(fitted)
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['XYZ'\].*known: \['NORM'"):
        model.sample(["XYZ"], 1)
    with pytest.raises(ValueError, match="at least 1"):
        model.sample(["HYP"], 0)
    assert main(["generate", "sample", str(fitted), "--label", "XYZ", "--n", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("enecg: error: unknown label(s) ['XYZ']") and "\n" not in err
    assert not list(tmp_path.iterdir())
    # Zero records: an empty part, or records without any beats to measure.
    with pytest.raises(ValueError, match=r"no part\(s\) \['nope'\]"):
        train_beat(beat_config(ptbxl_training_dataset, tmp_path / "m", parts=("nope",)))
    with pytest.raises(ValueError, match="training parts only"):
        beat_config(ptbxl_training_dataset, tmp_path / "m", parts=("train", "test"))
    from enecg.generative.beat import BeatSpec, fit_beat_model

    spec = BeatSpec(task="t", task_type="multiclass", label_names=["A"], leads=["II"], fs=100.0, length=1000)
    with pytest.raises(ValueError, match=r"only 0 record\(s\) with beats"):
        fit_beat_model(spec, np.zeros((4, 1, 1000)), np.ones((4, 1)), np.full(4, np.nan), np.full(4, np.nan))


# ---------------------------------------------------------------------- conditioning


def _toy_signal(fast: bool, i: int) -> np.ndarray:
    """Two leads, 10 s at 100 Hz: "slow" = 60 bpm with upright T waves, "fast" = 110 bpm with inverted ones."""
    rng = np.random.default_rng(i)
    t = np.arange(1000) / 100.0
    rr = 60 / (110 if fast else 60) * (1 + 0.03 * rng.standard_normal())
    signal = np.zeros_like(t)
    for centre in np.arange(rng.uniform(0.3, 0.8), 10.0, rr):
        signal += 1.0 * np.exp(-0.5 * ((t - centre) / 0.012) ** 2)
        signal += (-0.3 if fast else 0.3) * np.exp(-0.5 * ((t - centre - 0.25) / 0.04) ** 2)
        signal += 0.1 * np.exp(-0.5 * ((t - centre + 0.16) / 0.02) ** 2)
    signal = signal + 0.01 * rng.standard_normal(t.shape)
    return np.stack([signal, 0.5 * signal]).astype(np.float32)


def _toy_record(job):  # module level: the builder may pickle it
    from enecg.record import ECGRecord

    i = int(job.record_id.split(":")[1])
    return ECGRecord(signal=_toy_signal(i % 2 == 1, i), fs=100.0, leads=("I", "II"), record_id=job.record_id)


def test_conditioning_makes_a_real_data_classifier_see_the_requested_label(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from enecg.data.build import BuildPlan, RecordJob, build_dataset
    from enecg.data.schema import TaskInfo

    jobs = [
        RecordJob(path="", record_id=f"toy:{i}", split="train", values={"wave": float(i % 2)}) for i in range(40)
    ]
    task = TaskInfo(name="wave", type="multiclass", names=["slow", "fast"])
    plan = BuildPlan(source="toy", jobs=jobs, tasks=[task], parts=["train"], options={}, reader=_toy_record)
    build_dataset(plan, tmp_path / "toy", workers=1)
    config = BeatConfig(
        data=str(tmp_path / "toy"),
        task="wave",
        output_dir=str(tmp_path / "model"),
        use_age_sex=False,
        components=4,
        normal_label=None,
    )
    model = load_generative(train_beat(config))

    def features(x: np.ndarray) -> np.ndarray:
        return np.abs(np.fft.rfft(x[:, 1], axis=-1))

    real = np.stack([_toy_signal(i % 2 == 1, i) for i in range(40)])
    classifier = LogisticRegression(max_iter=1000).fit(features(real), np.arange(40) % 2)

    def fast_fraction(labels: list[str] | None) -> float:
        return float(classifier.predict(features(model.sample(labels, 20, seed=0))).mean())

    unconditioned, fast, slow = fast_fraction(None), fast_fraction(["fast"]), fast_fraction(["slow"])
    assert fast >= unconditioned + 0.2 and slow < unconditioned and fast - slow >= 0.5
    with pytest.raises(ValueError, match="no anomaly model"):
        model.anomaly_scores([_toy_record(jobs[0])])


# ---------------------------------------------------------------------- synthetic rows stay in training


def test_beat_samples_join_the_training_part_only(fitted: Path, ptbxl_training_dataset: Path, tmp_path: Path) -> None:
    import pandas as pd

    from enecg.data.build import load_dataset_dir
    from enecg.data.wfdb_folder import WfdbFolderOptions, prepare_wfdb_folder
    from enecg.generative.augment import materialize_synthetic
    from enecg.generative.sampling import sample_to_folder
    from enecg.training.recipe import parse_recipe_dict

    out = tmp_path / "samples"
    sample_to_folder(load_generative(fitted), ["HYP"], 3, out, model_name="enecg-test/ecg-beat", seed=1)
    table = pd.read_csv(out / "labels.csv")
    assert set(table["source"]) == {"synthetic:enecg-test/ecg-beat"} and table["superclass:HYP"].tolist() == [1] * 3
    options = WfdbFolderOptions(labels=str(out / "labels.csv"), validation_fraction=0.4, test_fraction=0.4)
    _, meta = prepare_wfdb_folder(out, tmp_path / "ds", options, workers=1)
    assert meta.splits == {"train": 3, "validation": 0, "test": 0}

    recipe = parse_recipe_dict(
        {
            "data": {"path": str(ptbxl_training_dataset), "synthetic": {"model": str(fitted), "per_label": {"CD": 2}}},
            "experts": [{"name": "a", "source": "experts/a"}],
            "tasks": [{"name": "superclass"}],
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    resolved = materialize_synthetic(recipe)
    _, meta = load_dataset_dir(resolved.data.extra_train[0])
    assert meta.splits == {"train": 2, "validation": 0, "test": 0}


# ---------------------------------------------------------------------- anomaly scores


def test_anomaly_scores_are_higher_for_abnormal_records(fitted: Path, ptbxl_training_dataset: Path) -> None:
    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.generative.anomaly import evaluate_anomaly

    result = evaluate_anomaly(load_generative(fitted), ptbxl_training_dataset, bootstrap=BootstrapConfig(n_resamples=20))
    assert 0 < result["abnormal"] < result["records"]
    assert result["mean_score_abnormal"] > result["mean_score_normal"] and result["auroc"] > 0.6


def test_anomaly_likelihood_is_scikit_learns_ppca_score() -> None:
    from sklearn.decomposition import PCA

    from enecg.generative.beat import ppca_log_likelihood

    x = np.random.default_rng(0).standard_normal((50, 6)) @ np.diag([3, 2, 1, 0.5, 0.3, 0.2])
    pca = PCA(n_components=3).fit(x)
    arrays = {
        "a_mean": pca.mean_,
        "a_components": pca.components_,
        "a_variance": pca.explained_variance_,
        "a_noise": np.asarray([pca.noise_variance_]),
    }
    np.testing.assert_allclose(ppca_log_likelihood(x[:5], arrays, "a_"), pca.score_samples(x[:5]), rtol=1e-6)


def test_predict_anomaly_scores_use_the_beat_model(fitted: Path, ptbxl_dir: Path) -> None:
    from enecg.cli.evaluate import anomaly_scores

    good = str(ptbxl_dir / "records100" / "00000" / "00001_lr")
    scores = anomaly_scores(str(fitted), [(good, object(), None), ("bad.hea", None, "bad.hea: unreadable")])
    assert list(scores) == [good] and np.isfinite(scores[good])


# ---------------------------------------------------------------------- command line: the recipe's kind


def test_cli_trains_the_recipe_kind_and_samples(ptbxl_training_dataset: Path, tmp_path: Path, capsys) -> None:
    import yaml

    from enecg.cli import main

    recipe = tmp_path / "beat.yaml"
    recipe.write_text(
        yaml.safe_dump({"kind": "beat", "data": str(ptbxl_training_dataset), "task": "superclass",
                        "output_dir": str(tmp_path / "model"), "max_records": 30, "components": 4})
    )
    assert main(["generate", "train", str(recipe), "--seed=3"]) == 0
    assert "model saved to" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["generative_config"]["seed"] == 3 and metrics["kind"] == "beat"
    out = tmp_path / "samples"
    assert main(["generate", "sample", str(tmp_path / "model"), "--label", "MI", "--n", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("*.hea"))) == 2
    assert main(["generate", "train", str(recipe), "--bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert main(["generate", "train", str(recipe), "--kind=vae"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown generative model kind 'vae'; known: ['beat', 'diffusion']" in err and "\n" not in err


def test_example_beat_recipe_keys_are_config_fields() -> None:
    import yaml
    from conftest import REPO_ROOT

    data = yaml.safe_load((REPO_ROOT / "recipes" / "generate_beat_ptbxl.yaml").read_text())
    assert data.pop("kind") == "beat"
    config = BeatConfig.from_dict(data)
    assert config.parts == ("train",) and config.seconds == 10.0


def test_cli_evaluate_reports_a_beat_model_and_its_card(
    fitted: Path, ptbxl_training_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    import torch

    from enecg.cli import main
    from enecg.contract import InputContract
    from enecg.experts.families.light import LightCNNConfig, build_light_model
    from enecg.experts.inhouse import save_inhouse_expert

    config = LightCNNConfig(architecture="SimpleNet", width_multiplier=0.25, embedding_dim=8)
    torch.manual_seed(0)
    expert = save_inhouse_expert(
        build_light_model(config),
        family="light",
        config=config,
        contract=InputContract(fs=100.0, length=1000, scaling="zscore_lead"),
        folder=tmp_path / "expert",
        name="tiny",
    )
    model = tmp_path / "model"
    shutil.copytree(fitted, model)
    out = tmp_path / "eval"
    argv = ["generate", "evaluate", str(model), "--data", str(ptbxl_training_dataset), "--expert", str(expert)]
    assert main([*argv, "--out", str(out), "--n-synthetic", "24", "--augment", "HYP", "--augment-n", "8"]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["summary"]["frechet_ratio"] > 0 and 0 <= result["summary"]["tstr_macro_auroc"] <= 1
    assert result["heart_rate"]["synthetic"]["detected"] > 0.9  # beats, found by xqrs
    assert result["augmentation"]["HYP"]["n_synthetic"] == 8
    card = (model / "README.md").read_text()
    assert "beat-template" in card and "frechet_ratio" in card
