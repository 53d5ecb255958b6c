"""Generative ECG models (enecg.generative): training, Hub round trip, sampling, synthetic-row guards, anomaly
scores, evaluation. Models are tiny (seconds on one CPU thread)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from enecg.generative import GenerativeConfig, load_diffusion, train_diffusion

TINY = {"block_out_channels": (16, 32, 32), "condition_hidden": 16, "sample_steps": 4, "length": 256}


def tiny_config(data: Path, out: Path, **changes: object) -> GenerativeConfig:
    values: dict[str, object] = {
        "data": str(data),
        "task": "superclass",
        "output_dir": str(out),
        "batch_size": 8,
        "max_steps": 40,
        "log_every": 10,
        "learning_rate": 2e-3,
        "max_records": 96,
        **TINY,
    }
    values.update(changes)
    return GenerativeConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(ptbxl_training_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch as _torch

    _torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("gen") / "model"
    return train_diffusion(tiny_config(ptbxl_training_dataset, out))


def test_training_loss_decreases_and_the_folder_is_hub_ready(trained: Path) -> None:
    assert {"model.safetensors", "config.json", "README.md", "metrics.json"} <= {
        p.name for p in trained.iterdir()
    }
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["records"] == 96
    assert metrics["final_loss"] < metrics["first_loss"]
    config = json.loads((trained / "config.json").read_text())
    assert config["label_names"] == ["NORM", "MI", "STTC", "CD", "HYP"] and len(config["leads"]) == 12
    assert "synthetic" in (trained / "README.md").read_text()


def test_training_refuses_validation_and_test_parts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="training parts only"):
        tiny_config(tmp_path, tmp_path / "m", parts=("train", "test"))


def test_saved_model_reloads_by_hub_id_and_samples_identically_under_a_seed(
    trained: Path, tmp_path: Path
) -> None:
    import huggingface_hub

    from enecg.testing.endpoint import use_endpoint
    from enecg.testing.local_hub import LocalHub

    local = load_diffusion(trained)
    first = local.sample(["HYP"], 2, seed=7)
    assert first.shape == (2, 12, 256) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, local.sample(["HYP"], 2, seed=7))
    assert not np.array_equal(first, local.sample(["HYP"], 2, seed=8))
    repo_id = "enecg-test/ecg-diffusion"
    with LocalHub(tmp_path / "hub") as hub, use_endpoint(hub.url):
        huggingface_hub.create_repo(repo_id)
        huggingface_hub.upload_folder(folder_path=str(trained), repo_id=repo_id)
        remote = load_diffusion(repo_id)
    np.testing.assert_array_equal(remote.sample(["HYP"], 2, seed=7), first)


def test_unknown_label_and_zero_n_are_one_line_errors(trained: Path) -> None:
    model = load_diffusion(trained)
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['XYZ'\].*known: \['NORM'"):
        model.sample(["XYZ"], 1)
    with pytest.raises(ValueError, match="at least 1"):
        model.sample(["HYP"], 0)


def test_condition_vector_drops_labels_and_flags_it() -> None:
    from enecg.generative import DiffusionSpec, ECGDiffusion

    spec = DiffusionSpec(
        task="t",
        task_type="multiclass",
        label_names=["A", "B"],
        leads=["I"],
        fs=100.0,
        length=64,
        block_out_channels=[16, 32, 32],
    )
    model = ECGDiffusion(spec)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cond = model.condition(
        labels,
        2,
        torch.tensor([50.0, float("nan")]),
        torch.tensor([1.0, 0.0]),
        drop=torch.tensor([False, True]),
    )
    assert cond[0].tolist() == [1.0, 0.0, 0.0, 0.5, 1.0, 0.0, 0.0]
    assert cond[1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------- synthetic records and the guards


@pytest.fixture(scope="module")
def sampled(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enecg.generative.sampling import sample_to_folder

    out = tmp_path_factory.mktemp("samples")
    model = load_diffusion(trained)
    sample_to_folder(model, ["HYP"], 3, out, model_name="enecg-test/ecg-diffusion", seed=1)
    sample_to_folder(model, ["NORM"], 2, out, model_name="enecg-test/ecg-diffusion", seed=1)
    return out


def test_samples_are_wfdb_records_marked_synthetic_with_a_labels_csv(sampled: Path) -> None:
    import pandas as pd
    import wfdb

    table = pd.read_csv(sampled / "labels.csv")
    assert list(table.columns[:3]) == ["record", "source", "superclass:NORM"]
    assert len(table) == 5 and set(table["source"]) == {"synthetic:enecg-test/ecg-diffusion"}
    assert table["superclass:HYP"].tolist() == [1, 1, 1, 0, 0]
    header = wfdb.rdheader(str(sampled / table["record"][0]))
    assert header.fs == 100 and header.sig_len == 256 and header.n_sig == 12
    assert "Synthetic: enecg-test/ecg-diffusion" in header.comments


def test_prepared_synthetic_records_join_the_training_part_only(sampled: Path, tmp_path: Path) -> None:
    from enecg.data.wfdb_folder import WfdbFolderOptions, prepare_wfdb_folder

    options = WfdbFolderOptions(
        labels=str(sampled / "labels.csv"), validation_fraction=0.4, test_fraction=0.4
    )
    parts, meta = prepare_wfdb_folder(sampled, tmp_path / "ds", options, workers=1)
    assert meta.splits == {"train": 5, "validation": 0, "test": 0}
    assert meta.task("superclass").names == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert set(parts["train"]["source"]) == {"synthetic:enecg-test/ecg-diffusion"}
    assert sorted(map(tuple, parts["train"]["superclass"]))[0] == (0.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="cannot be k-folded"):
        prepare_wfdb_folder(sampled, tmp_path / "kf", WfdbFolderOptions(kfold=2), workers=1)


def test_builder_refuses_a_synthetic_row_in_a_test_part(tmp_path: Path) -> None:
    from enecg.data.build import BuildPlan, RecordJob, build_dataset

    jobs = [RecordJob(path="x", record_id="a", split="test", values={"source": "synthetic:m"})]
    plan = BuildPlan(source="wfdb", jobs=jobs, tasks=[], parts=["train", "test"], options={})
    with pytest.raises(ValueError, match="synthetic record"):
        build_dataset(plan, tmp_path / "ds", workers=1)
    assert not (tmp_path / "ds").exists()


def test_evaluation_refuses_synthetic_rows() -> None:
    import datasets

    from enecg.evaluation.runner import _part

    parts = datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"source": ["ptbxl", "synthetic:m"], "record_id": ["a", "b"]})}
    )
    with pytest.raises(ValueError, match=r"d/test: 1 synthetic record\(s\)"):
        _part(parts, "test", "d")


# ---------------------------------------------------------------------- command line


def test_cli_sample_bad_requests_are_one_line_errors(trained: Path, tmp_path: Path, capsys) -> None:
    from enecg.cli import main

    assert (
        main(["generate", "sample", str(trained), "--label", "XYZ", "--n", "2", "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("enecg: error: unknown label(s) ['XYZ']") and "\n" not in err
    assert (
        main(["generate", "sample", str(trained), "--label", "HYP", "--n", "0", "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == "enecg: error: --n must be at least 1, got 0"
    assert not list(tmp_path.iterdir())


def test_cli_trains_from_a_recipe_and_samples(ptbxl_training_dataset: Path, tmp_path: Path, capsys) -> None:
    import yaml

    from enecg.cli import main

    recipe = tmp_path / "gen.yaml"
    config = tiny_config(ptbxl_training_dataset, tmp_path / "model", max_steps=2, max_records=16).to_dict()
    recipe.write_text(yaml.safe_dump(config))
    assert main(["generate", "train", str(recipe), "--seed=3"]) == 0
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["generative_config"]["seed"] == 3
    out = tmp_path / "samples"
    assert (
        main(["generate", "sample", str(tmp_path / "model"), "--label", "MI", "--n", "2", "--out", str(out)])
        == 0
    )
    assert len(list(out.glob("*.hea"))) == 2
    assert main(["generate", "train", str(recipe), "--bogus=1"]) == 2
    assert "command line: unknown key 'bogus'" in capsys.readouterr().err


def test_example_recipe_keys_are_config_fields() -> None:
    import yaml

    data = yaml.safe_load((REPO_ROOT / "recipes" / "generate_ptbxl.yaml").read_text())
    config = GenerativeConfig.from_dict(data)
    assert config.parts == ("train",) and config.length == 1000


# ---------------------------------------------------------------------- conditioning


def _toy_record(job):  # module level: the builder may pickle it
    from enecg.record import ECGRecord

    i = int(job.record_id.split(":")[1])
    rng = np.random.default_rng(i)
    t = np.arange(64) / 100.0
    wave = np.sin(2 * np.pi * (1.5 if i % 2 == 0 else 12.0) * t + rng.uniform(0, 2 * np.pi))
    signal = wave[None] + 0.05 * rng.standard_normal((1, 64))
    return ECGRecord(signal=signal.astype(np.float32), fs=100.0, leads=("II",), record_id=job.record_id)


def test_conditioning_makes_a_real_data_classifier_see_the_requested_label(tmp_path: Path) -> None:
    """Two very different classes (1.5 Hz vs 12 Hz waves): a classifier fitted on the real records finds the
    requested class in conditioned samples more often than in unconditioned ones (all seeded: deterministic)."""
    from accelerate.state import AcceleratorState
    from sklearn.linear_model import LogisticRegression

    from enecg.data.build import BuildPlan, RecordJob, build_dataset
    from enecg.data.schema import TaskInfo

    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    jobs = [
        RecordJob(path="", record_id=f"toy:{i}", split="train", values={"wave": float(i % 2)})
        for i in range(64)
    ]
    task = TaskInfo(name="wave", type="multiclass", names=["slow", "fast"])
    plan = BuildPlan(source="toy", jobs=jobs, tasks=[task], parts=["train"], options={}, reader=_toy_record)
    build_dataset(plan, tmp_path / "toy", workers=1)
    config = GenerativeConfig(
        data=str(tmp_path / "toy"),
        task="wave",
        output_dir=str(tmp_path / "model"),
        length=64,
        block_out_channels=(16, 32),
        condition_hidden=16,
        sample_steps=10,
        batch_size=16,
        max_steps=300,
        learning_rate=3e-3,
        use_age_sex=False,
    )
    model = load_diffusion(train_diffusion(config))

    def features(x: np.ndarray) -> np.ndarray:
        return np.abs(np.fft.rfft(x[:, 0], axis=-1))

    real = np.stack([_toy_record(job).signal for job in jobs])
    classifier = LogisticRegression().fit(features(real), np.arange(64) % 2)

    def fast_fraction(labels: list[str] | None) -> float:
        samples = model.sample(labels, 16, seed=0, guidance_scale=3.0)
        return float(classifier.predict(features(samples)).mean())

    unconditioned = fast_fraction(None)
    assert fast_fraction(["fast"]) >= unconditioned + 0.2
    assert fast_fraction(["slow"]) <= unconditioned - 0.2


# ---------------------------------------------------------------------- anomaly scores and evaluation


def test_anomaly_scores_are_seeded_and_rank_a_corrupted_record_highest(
    trained: Path, ptbxl_dir: Path
) -> None:
    from enecg import read_record
    from enecg.generative.anomaly import score_anomaly

    model = load_diffusion(trained)
    records = [read_record(ptbxl_dir / "records100" / "00000" / f"0000{i}_lr") for i in (1, 2, 3)]
    noisy = read_record(ptbxl_dir / "records100" / "00000" / "00004_lr")
    noisy.signal = (noisy.signal + 3.0 * np.random.default_rng(0).standard_normal(noisy.signal.shape)).astype(
        np.float32
    )
    scores = score_anomaly(model, [*records, noisy])
    assert scores.shape == (4,) and np.argmax(scores) == 3
    np.testing.assert_array_equal(scores[:3], score_anomaly(model, records))


def test_anomaly_is_evaluated_as_a_binary_task(trained: Path, ptbxl_training_dataset: Path) -> None:
    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.generative.anomaly import evaluate_anomaly

    result = evaluate_anomaly(
        load_diffusion(trained), ptbxl_training_dataset, bootstrap=BootstrapConfig(n_resamples=20)
    )
    assert 0 < result["abnormal"] < result["records"] and 0.0 <= result["auroc"] <= 1.0
    assert result["auroc_ci"][0] <= result["auroc_ci"][1]


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enecg.contract import InputContract
    from enecg.experts.families.light import LightCNNConfig, build_light_model
    from enecg.experts.inhouse import save_inhouse_expert

    config = LightCNNConfig(architecture="SimpleNet", width_multiplier=0.25, embedding_dim=8)
    torch.manual_seed(0)
    contract = InputContract(fs=100.0, length=1000, scaling="zscore_lead")  # 256-sample samples are padded
    folder = tmp_path_factory.mktemp("expert") / "tiny"
    return save_inhouse_expert(
        build_light_model(config),
        family="light",
        config=config,
        contract=contract,
        folder=folder,
        name="tiny",
    )


def test_cli_evaluate_writes_frechet_heart_rate_and_tstr(
    trained: Path, tiny_expert: Path, ptbxl_training_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    from enecg.cli import main

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    out = tmp_path / "eval"
    argv = [
        "generate",
        "evaluate",
        str(model),
        "--data",
        str(ptbxl_training_dataset),
        "--expert",
        str(tiny_expert),
    ]
    extra = ["--n-synthetic", "24", "--steps", "3", "--augment", "HYP", "--augment-n", "8"]
    assert main([*argv, "--out", str(out), *extra]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    summary = result["summary"]
    assert summary["frechet_distance"] > 0 and summary["frechet_floor_real_vs_real"] > 0
    assert summary["frechet_ratio"] == pytest.approx(
        summary["frechet_distance"] / summary["frechet_floor_real_vs_real"]
    )
    assert 0 <= summary["tstr_macro_auroc"] <= 1 and 0 <= summary["trtr_macro_auroc"] <= 1
    assert result["sizes"]["synthetic"] == 24 and set(result["tstr"]["per_label"]) == {
        "NORM",
        "MI",
        "STTC",
        "CD",
        "HYP",
    }
    assert {"real_test", "synthetic"} == set(result["heart_rate"]) and len(
        result["spectra_mean_abs_log10_difference"]
    ) == 12
    assert (out / "summary.png").is_file() and (out / "sample_HYP_0.png").is_file()
    assert {"real_test", "synthetic", "method"} == set(result["qrs_width_ms"])
    assert "qrs_width_wasserstein_ms" in summary
    hyp = result["augmentation"]["HYP"]
    assert hyp["n_synthetic"] == 8 and hyp["delta_ci"][0] <= hyp["delta"] <= hyp["delta_ci"][1]
    card = (model / "README.md").read_text()
    assert "frechet_ratio" in card  # the local model's card now reports its evaluation


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift() -> None:
    from enecg.generative.evaluate import frechet_distance

    x = np.random.default_rng(0).standard_normal((200, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1.0) == pytest.approx(4.0, rel=1e-6)


def test_predict_adds_anomaly_scores_of_the_predicted_records(trained: Path, ptbxl_dir: Path) -> None:
    from enecg.cli.evaluate import anomaly_scores

    good = str(ptbxl_dir / "records100" / "00000" / "00001_lr")
    scores = anomaly_scores(str(trained), [(good, object(), None), ("bad.hea", None, "bad.hea: unreadable")])
    assert list(scores) == [good] and scores[good] > 0


# ---------------------------------------------------------------------- recipe augmentation (data.synthetic)


def _augmented_recipe(data: Path, model: str, out: Path, per_label: dict[str, int]):
    from enecg.training.recipe import parse_recipe_dict

    return parse_recipe_dict(
        {
            "data": {"path": str(data), "synthetic": {"model": model, "per_label": per_label, "steps": 2}},
            "experts": [{"name": "a", "source": "experts/a"}],
            "tasks": [{"name": "superclass"}],
            "output": {"dir": str(out)},
        }
    )


def test_recipe_synthetic_records_are_pooled_into_training_only(
    trained: Path, ptbxl_training_dataset: Path, tmp_path: Path
) -> None:
    from enecg.data.build import load_dataset_dir
    from enecg.data.pool import pool_training_part
    from enecg.generative.augment import materialize_synthetic
    from enecg.training.trainer import train

    recipe = _augmented_recipe(ptbxl_training_dataset, str(trained), tmp_path / "run", {"HYP": 3})
    with pytest.raises(ValueError, match=r"data\.synthetic: generate the records first"):
        train(recipe)
    resolved = materialize_synthetic(recipe)
    assert resolved.data.synthetic is None and len(resolved.data.extra_train) == 1
    _, meta = load_dataset_dir(resolved.data.extra_train[0])
    assert meta.splits == {"train": 3, "validation": 0, "test": 0}
    real, real_meta = load_dataset_dir(ptbxl_training_dataset)
    pooled = pool_training_part(real["train"], resolved.data.extra_train, [real_meta.task("superclass")])
    synthetic = [row for row in pooled if row["source"].startswith("synthetic:")]
    assert len(pooled) == len(real["train"]) + 3 and len(synthetic) == 3
    assert all(row["superclass"] == [0.0, 0.0, 0.0, 0.0, 1.0] for row in synthetic)
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['XYZ'\]"):
        materialize_synthetic(
            _augmented_recipe(ptbxl_training_dataset, str(trained), tmp_path / "r2", {"XYZ": 1})
        )


# ---------------------------------------------------------------------- QRS width, augmentation gain, model options


def _beats(qrs_ms: float, fs: float = 100.0, seconds: float = 10.0) -> np.ndarray:
    """A 3-lead trace of beats at 72 bpm whose Q, R and S components spread over about ``qrs_ms``."""
    t = np.arange(int(seconds * fs)) / fs
    sd = qrs_ms / 1000 / 6
    signal = np.zeros_like(t)
    for centre in np.arange(0.5, seconds, 60 / 72):
        signal += 1.2 * np.exp(-0.5 * ((t - centre) / sd) ** 2)
        signal -= 0.25 * np.exp(-0.5 * ((t - centre + 1.5 * sd) / sd) ** 2)
        signal -= 0.3 * np.exp(-0.5 * ((t - centre - 1.5 * sd) / sd) ** 2)
        signal += 0.3 * np.exp(-0.5 * ((t - centre - 0.3) / 0.04) ** 2)  # T wave
        signal += 0.1 * np.exp(-0.5 * ((t - centre + 0.16) / 0.02) ** 2)  # P wave
    return np.stack([signal, 0.5 * signal, -0.3 * signal])


def test_qrs_width_grows_with_the_true_width_and_is_nan_without_beats() -> None:
    from enecg.generative.evaluate import heart_rates, qrs_widths, r_peaks

    signals = np.stack([_beats(80), _beats(140), _beats(180)])
    peaks = r_peaks(signals, 100.0, 0)
    assert [len(p) for p in peaks] == [12, 12, 12]
    np.testing.assert_allclose(heart_rates(signals, 100.0, 0, peaks), 72.0, atol=3.0)
    widths = qrs_widths(signals, 100.0, 0, peaks)
    assert widths[0] < widths[1] < widths[2]
    assert 50 <= widths[0] <= 120  # a narrow complex reads narrow
    np.testing.assert_array_equal(widths, qrs_widths(signals, 100.0, 0))  # peaks detected inside: the same
    assert np.isnan(qrs_widths(np.zeros((1, 3, 1000)), 100.0, 0)).all()


def test_augmentation_gain_is_paired_pooled_and_its_ci_excludes_zero_only_for_a_real_gain() -> None:
    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.generative.evaluate import augmentation_gain

    rng = np.random.default_rng(0)

    def fold(n: int, offset: int) -> dict[str, object]:
        y = (np.arange(n) % 4 == 0).astype(float)
        y[1] = np.nan  # an unlabelled record is ignored
        return {
            "y": y,
            "real": rng.random(n),  # chance
            "augmented": np.nan_to_num(y) + 0.8 * rng.random(n),  # much better
            "patients": [f"p{offset + i // 2}" for i in range(n)],  # two records per patient
        }

    folds = [fold(80, 0), fold(60, 100)]
    boot = BootstrapConfig(n_resamples=200)
    gain = augmentation_gain(folds, boot)
    assert gain["evaluations"] == 2 and gain["records"] == 138 and gain["positives"] == 35
    assert gain["gain"] == pytest.approx(np.mean(gain["per_evaluation"]))
    assert gain["gain"] > 0.2 and gain["ci"][0] > 0 and gain["excludes_zero"]
    same = [dict(f, augmented=f["real"]) for f in folds]  # no change: gain 0, every resample 0
    flat = augmentation_gain(same, boot)
    assert flat["gain"] == 0.0 and flat["ci"] == [0.0, 0.0] and not flat["excludes_zero"]
    with pytest.raises(ValueError, match="differ in length"):
        augmentation_gain([dict(folds[0], patients=["p"])], boot)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clean_estimate_inverts_the_training_target(prediction_type: str) -> None:
    from diffusers import DDPMScheduler

    from enecg.generative.model import PREDICTION_TARGETS

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    clean, noise = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    t = torch.tensor([0, 250, 600, 999])
    noisy = scheduler.add_noise(clean, noise, t)
    rule = PREDICTION_TARGETS[prediction_type]
    a = scheduler.alphas_cumprod[t][:, None, None]
    estimate = rule.clean_estimate(noisy, rule.target(scheduler, clean, noise, t), a)
    torch.testing.assert_close(estimate[:3], clean[:3], atol=1e-4, rtol=1e-4)


def test_v_prediction_cosine_ema_model_trains_saves_and_samples_identically(
    ptbxl_training_dataset: Path, tmp_path: Path
) -> None:
    from accelerate.state import AcceleratorState

    from enecg.generative import DiffusionSpec

    AcceleratorState._reset_state(True)
    changes = {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2", "max_steps": 12}
    averaged = train_diffusion(
        tiny_config(ptbxl_training_dataset, tmp_path / "ema", ema_decay=0.99, **changes)
    )
    AcceleratorState._reset_state(True)
    raw = train_diffusion(tiny_config(ptbxl_training_dataset, tmp_path / "raw", **changes))
    config = json.loads((averaged / "config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["beta_schedule"] == "squaredcos_cap_v2"
    model, raw_model = load_diffusion(averaged), load_diffusion(raw)
    # Same seed, same batches: only the averaging differs, so the saved weights do.
    assert any(
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw_model.state_dict().values())
    )
    first = model.sample(["HYP"], 2, seed=3, steps=3)
    assert np.isfinite(first).all() and first.shape == (2, 12, 256)
    np.testing.assert_array_equal(first, load_diffusion(averaged).sample(["HYP"], 2, seed=3, steps=3))
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSpec.from_dict({**config, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_config(ptbxl_training_dataset, tmp_path / "x", ema_decay=1.0)


def test_contrast_anomaly_score_is_the_normal_minus_the_unconditioned_error(
    trained: Path, ptbxl_dir: Path
) -> None:
    from enecg import read_record
    from enecg.generative.anomaly import score_anomaly

    model = load_diffusion(trained)
    records = [read_record(ptbxl_dir / "records100" / "00000" / f"0000{i}_lr") for i in (1, 2, 3)]
    normal = score_anomaly(model, records, noise_levels=(0.05, 0.2))
    unconditioned = score_anomaly(model, records, normal_label=None, noise_levels=(0.05, 0.2))
    contrast = score_anomaly(model, records, noise_levels=(0.05, 0.2), contrast=True)
    np.testing.assert_allclose(contrast, normal - unconditioned, rtol=1e-5, atol=1e-7)
    assert not np.allclose(normal, unconditioned)  # the condition matters
