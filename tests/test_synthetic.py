"""The synthetic ECGSYN dataset: reproducible, mV-scale 12-lead signals whose labels follow the latent parameters,
patient-disjoint splits, the shared schema (describe, CLI) and labels that are learnable but not trivial."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from wfdb import processing

from enecg.cli import main
from enecg.data.build import load_dataset_dir
from enecg.data.describe import describe_dataset
from enecg.data.synthetic import (
    MORPHOLOGY_LABELS,
    RHYTHM_CLASSES,
    SYNTHETIC_TASKS,
    SyntheticOptions,
    SyntheticRecordSpec,
    plan_synthetic,
    prepare_synthetic,
    simulate_record,
    synthetic_specs,
)
from enecg.data.targets import heart_rate_target
from enecg.leads import STANDARD_12_LEADS
from enecg.record import ECGRecord

# Raised prevalences so that 24 records hold every label; seed 3 gives every rhythm class among clean records.
OPTIONS = SyntheticOptions(
    n_records=24,
    seed=3,
    tinv_prevalence=0.4,
    wide_qrs_prevalence=0.25,
    low_voltage_prevalence=0.25,
    noisy_fraction=0.4,
)
FS = 500


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    dataset_dict, meta = prepare_synthetic(out, OPTIONS, workers=2)
    rows = [row for part in dataset_dict.values() for row in part.with_format("numpy")]
    rows.sort(key=lambda row: row["record_id"])
    specs = {spec.record_id: spec for spec in synthetic_specs(OPTIONS)}
    return {"out": out, "meta": meta, "rows": rows, "specs": specs}


def _record(row: dict) -> ECGRecord:
    return ECGRecord(row["signal"], row["fs"], tuple(row["leads"]), row["record_id"])


def _clean(spec: SyntheticRecordSpec) -> bool:
    """Records on which a QRS detector and a T-wave measure are expected to work: no added noise, normal voltage."""
    return not spec.noisy and not spec.low_voltage


def test_schema_leads_and_mv_scale(built: dict) -> None:
    meta, rows, specs = built["meta"], built["rows"], built["specs"]
    assert meta.source == "synthetic" and sum(meta.splits.values()) == 24 and not meta.skipped
    assert [t.name for t in meta.tasks] == list(SYNTHETIC_TASKS)
    assert meta.task("rhythm").names == list(RHYTHM_CLASSES)
    assert meta.task("morphology").names == list(MORPHOLOGY_LABELS)
    assert all("SYNTHETIC" in t.description for t in meta.tasks)
    assert (
        meta.options["rate"] == FS and meta.options["neurokit2_version"] and meta.options["generator_version"]
    )
    for row in rows:
        spec = specs[row["record_id"]]
        signal = row["signal"]
        assert signal.dtype == np.float32 and signal.shape == (12, 10 * FS) and np.isfinite(signal).all()
        assert tuple(row["leads"]) == STANDARD_12_LEADS and row["fs"] == FS and row["source"] == "synthetic"
        # The largest deflection (R or S) of the record, above its lead's baseline: mV scale, small if LOWVOLT.
        peak = np.max(np.percentile(np.abs(signal - np.median(signal, axis=1, keepdims=True)), 99.9, axis=1))
        if spec.low_voltage:
            assert peak < 0.7 if not spec.noisy else peak < 1.5, (row["record_id"], peak)
        else:
            assert 0.5 < peak < 3.5, (row["record_id"], peak)
        # Einthoven's law and Goldberger's leads hold (III, aVR, aVL, aVF come from I and II).
        lead = {name: signal[i].astype(np.float64) for i, name in enumerate(STANDARD_12_LEADS)}
        np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-5)
        np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-5)


def test_labels_follow_latent_parameters(built: dict) -> None:
    rows, specs = built["rows"], built["specs"]
    for row in rows:
        spec = specs[row["record_id"]]
        rhythm = RHYTHM_CLASSES[int(row["rhythm"])]
        expected = "SBRAD" if spec.heart_rate < 60 else "STACH" if spec.heart_rate > 100 else "SR"
        assert rhythm == expected == spec.rhythm
        assert row["heart_rate"] == pytest.approx(spec.heart_rate, abs=0.01)
        assert list(row["morphology"]) == [float(spec.tinv), float(spec.wide_qrs), float(spec.low_voltage)]
        assert row["age"] == pytest.approx(spec.age, abs=0.01) and row["sex"] == spec.sex
        assert row["noisy"] == float(spec.noisy) and row["patient_id"] == spec.patient_id


def test_measured_heart_rate_matches_rhythm_label(built: dict) -> None:
    """The existing HR-target code (wfdb gqrs) on clean records agrees with the simulator set point."""
    rows, specs = built["rows"], built["specs"]
    seen = set()
    for row in rows:
        spec = specs[row["record_id"]]
        if not _clean(spec):
            continue
        measured, note = heart_rate_target(_record(row))
        assert note is None, (row["record_id"], note)
        # HRV moves a 10 s window's mean rate a little away from the set point.
        assert measured == pytest.approx(spec.heart_rate, rel=0.06), row["record_id"]
        if spec.rhythm == "STACH":
            assert measured > 95
        elif spec.rhythm == "SBRAD":
            assert measured < 63
        seen.add(spec.rhythm)
    assert seen == set(RHYTHM_CLASSES), f"the test build lacks clean records of {set(RHYTHM_CLASSES) - seen}"


def _t_wave_level(signal: np.ndarray, lead: int, beats: np.ndarray) -> float:
    """Mean of one lead over the T-wave windows (0.18-0.42 RR after each R peak), relative to its median."""
    x = signal[lead] - np.median(signal[lead])
    rr = np.median(np.diff(beats))
    windows = [x[r + int(0.18 * rr) : r + int(0.42 * rr)] for r in beats[:-1]]
    return float(np.mean(np.concatenate(windows)))


def _r_peaks(signal: np.ndarray) -> np.ndarray:
    lead_ii = signal[STANDARD_12_LEADS.index("II")].astype(np.float64)
    detected = processing.gqrs_detect(sig=lead_ii, fs=FS)
    half = int(0.08 * FS)  # gqrs marks near the QRS onset: move to the largest |deflection| nearby
    return np.array(
        [max(0, d - half) + int(np.argmax(np.abs(lead_ii[max(0, d - half) : d + half]))) for d in detected]
    )


def test_inverted_t_waves_where_the_latent_parameters_say(built: dict) -> None:
    rows, specs = built["rows"], built["specs"]
    checked = {True: 0, False: 0}
    for row in rows:
        spec = specs[row["record_id"]]
        if not _clean(spec) or spec.wide_qrs:  # a wide QRS's S wave reaches into the T window
            continue
        beats = _r_peaks(row["signal"])
        if spec.tinv:
            leads = [
                lead for lead in spec.t_inverted_leads if lead != "V1"
            ]  # V1's T is small even when upright
            assert leads
            for lead in leads:
                level = _t_wave_level(row["signal"], STANDARD_12_LEADS.index(lead), beats)
                assert level < 0, (row["record_id"], lead, level)
        else:
            for lead in ("II", "V2", "V3", "V4", "V5", "V6"):
                level = _t_wave_level(row["signal"], STANDARD_12_LEADS.index(lead), beats)
                assert level > 0, (row["record_id"], lead, level)
        checked[spec.tinv] += 1
    assert checked[True] >= 1 and checked[False] >= 3, checked


def test_splits_are_patient_disjoint_with_repeat_patients(built: dict) -> None:
    rows = built["rows"]
    part_of: dict[str, set[str]] = {}
    for row in rows:
        part_of.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(parts) == 1 for parts in part_of.values())
    assert len(part_of) < len(rows), "no patient has several records"
    assert {row["split"] for row in rows} == {"train", "validation", "test"}


def test_deterministic_per_seed_and_record_and_independent_of_workers(built: dict, tmp_path: Path) -> None:
    rows = {row["record_id"]: row for row in built["rows"]}
    # The same options plan the same records, labels and parts.
    first, second = plan_synthetic(OPTIONS), plan_synthetic(dataclasses.replace(OPTIONS))
    assert [dataclasses.asdict(j) for j in first.jobs] == [dataclasses.asdict(j) for j in second.jobs]
    # A second build (one process, fewer records) gives the same first records as the pooled build.
    small = dataclasses.replace(OPTIONS, n_records=3)
    dataset_dict, _ = prepare_synthetic(tmp_path / "small", small, workers=1)
    again = [row for part in dataset_dict.values() for row in part.with_format("numpy")]
    assert len(again) == 3
    for row in again:
        reference = rows[row["record_id"]]
        np.testing.assert_array_equal(row["signal"], reference["signal"])
        for name in ("rhythm", "heart_rate", "age", "sex", "noisy", "patient_id"):
            assert row[name] == reference[name]
        np.testing.assert_array_equal(row["morphology"], reference["morphology"])
    # Another seed: other patients and other signals.
    other = synthetic_specs(dataclasses.replace(OPTIONS, seed=4))
    assert [s.heart_rate for s in other] != [s.heart_rate for s in built["specs"].values()]
    other_signal = simulate_record(other[0], FS, 10.0)
    assert not np.allclose(other_signal, rows[other[0].record_id]["signal"])
    # An identical request reuses the folder (same cache key) instead of simulating again.
    _, meta = prepare_synthetic(built["out"], OPTIONS)
    assert meta.cache_key == built["meta"].cache_key


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """Probability that a positive scores above a negative (1 or 0: one threshold separates them perfectly)."""
    pos, neg = score[label == 1], score[label == 0]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_labels_learnable_but_not_given_away_by_a_trivial_statistic(built: dict) -> None:
    rows = built["rows"]
    signals = np.stack([row["signal"] for row in rows]).astype(np.float64)
    centred = signals - np.median(signals, axis=2, keepdims=True)
    statistics = {
        "mean_abs": np.abs(centred).mean(axis=(1, 2)),
        "std": centred.std(axis=2).mean(axis=1),
        "peak_to_peak": np.ptp(signals, axis=2).mean(axis=1),
    }
    morphology = np.stack([row["morphology"] for row in rows])
    labels = {
        "sex": np.array([row["sex"] for row in rows]),
        "TINV": morphology[:, 0],
        "WIDEQRS": morphology[:, 1],
        "noisy": np.array([row["noisy"] for row in rows]),
        "tachycardia": np.array(
            [row["rhythm"] == RHYTHM_CLASSES.index("STACH") for row in rows], dtype=float
        ),
    }
    # Learnable: low voltage shows in the mean |amplitude| (well above chance, AUC 0.5; noise blurs it).
    assert _auc(-statistics["mean_abs"], morphology[:, 2]) > 0.75
    # Not a toy: no single threshold on a trivial statistic separates any of these labels perfectly.
    for label_name, label in labels.items():
        assert 0 < label.sum() < len(label), f"the test build has no variation in {label_name}"
        for stat_name, stat in statistics.items():
            auc = _auc(stat, label)
            assert 0.0 < auc < 1.0, f"{label_name} is perfectly separated by {stat_name} (AUC {auc})"


def test_describe(built: dict) -> None:
    info = describe_dataset(built["out"])
    assert info["source"] == "synthetic" and info["records"] == 24
    assert info["sampling_rates"] == {"500": 24} and info["lead_sets"] == {" ".join(STANDARD_12_LEADS): 24}
    assert info["duration_s"]["min"] == pytest.approx(10.0)
    assert sum(info["labels"]["rhythm"]["classes"].values()) == 24
    assert info["labels"]["morphology"]["missing"] == 0


def test_cli_help_and_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", "synthetic", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: enecg data prepare synthetic")
    out = tmp_path / "cli"
    argv = ["data", "prepare", "synthetic", "--out", str(out), "--n-records", "4", "--rate", "100"]
    argv += [
        "--seconds",
        "5",
        "--kfold",
        "2",
        "--tasks",
        "rhythm,heart_rate",
        "--workers",
        "1",
        "--seed",
        "7",
    ]
    assert main(argv) == 0
    assert "4 records" in capsys.readouterr().out
    dataset_dict, meta = load_dataset_dir(out)
    assert set(dataset_dict) == {"fold_0", "fold_1"} and [t.name for t in meta.tasks] == [
        "rhythm",
        "heart_rate",
    ]
    row = next(iter(dataset_dict.values())).with_format("numpy")[0]
    assert row["signal"].shape == (12, 500) and row["fs"] == 100 and meta.options["seed"] == 7
    assert main(["data", "describe", str(out)]) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rate": 50}, "rate"),
        ({"tasks": ("rhythm", "qt")}, "unknown synthetic tasks"),
        ({"n_records": 0}, "n_records"),
    ],
)
def test_bad_options_are_one_line_errors(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticOptions(**change)


def test_low_rates_are_resampled_from_500_hz_and_do_not_hang() -> None:
    """ECGSYN itself hangs on some records at 100 Hz (seed 0, record 22); enecg simulates at 500 Hz instead."""
    from scipy.signal import resample_poly

    from enecg.data.synthetic import SIMULATION_FS, SyntheticOptions, simulate_record, synthetic_specs

    spec = synthetic_specs(SyntheticOptions(seed=0, n_records=24))[22]
    low = simulate_record(spec, fs=100, seconds=5.0)
    assert low.shape == (12, 500) and low.dtype == np.float32 and np.isfinite(low).all()
    high = simulate_record(spec, fs=SIMULATION_FS, seconds=5.0)
    expected = resample_poly(high, 1, 5, axis=-1, padtype="line")[:, :500]
    np.testing.assert_allclose(low, expected, atol=1e-5)
