"""Reduced-lead and short records, end to end: what each contract needs of a record's leads (refused or
zero-filled + masked), lead and padding masks that reach MOMENT and HuBERT-ECG (checked against the official calls
on the parity fixtures), a gate that routes a record away from experts that cannot read it, and predictions that
say which leads were real.

Records are built here: a synthetic ECG-like signal for the contract-level cases, and a real PTB-XL record cut
down to 2 leads at 360 Hz (a Holter-like MLII + V5 pair) or 1 lead where the shared data are present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb
from conftest import parity_dir

from enecg import contract as contract_module
from enecg.contract import ContractRefusal, InputContract, apply_contract, apply_contract_records
from enecg.ensemble import Ensemble, EnsembleConfig, predict_records
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.experts import load_expert
from enecg.experts.families.light import LightCNNConfig, build_light_model
from enecg.experts.inhouse import save_inhouse_expert
from enecg.experts.spec import bundled_spec
from enecg.leads import STANDARD_12_LEADS, parse_lead_aliases
from enecg.record import ECGRecord, RecordError

RNG = np.random.default_rng(7)


def synthetic(
    leads=STANDARD_12_LEADS, fs: float = 100.0, seconds: float = 10.0, record_id: str = "r"
) -> ECGRecord:
    n = round(fs * seconds)
    t = np.arange(n) / fs
    rows = [
        np.sin(2 * np.pi * (1.1 + 0.1 * k) * t) + 0.05 * RNG.standard_normal(n) for k in range(len(leads))
    ]
    return ECGRecord(np.stack(rows), fs, tuple(leads), record_id, metadata={"path": f"/data/{record_id}.hea"})


def keep(record: ECGRecord, leads: list[str], record_id: str) -> ECGRecord:
    rows = [record.leads.index(lead) for lead in leads]
    return ECGRecord(
        record.signal[rows], record.fs, tuple(leads), record_id, metadata={"path": f"/data/{record_id}.hea"}
    )


# ---------------------------------------------------------------------------------------------- contracts


def test_min_and_required_leads_refuse_a_record_naming_its_file() -> None:
    two = keep(synthetic(), ["II", "V5"], "holter")
    need_all = InputContract(fs=100, leads=STANDARD_12_LEADS, length=500, min_leads=12)
    with pytest.raises(
        ContractRefusal, match=r"/data/holter.hea: record has 2 of the model's 12 leads .*min_leads 12"
    ):
        apply_contract(two, need_all)
    need_v1 = InputContract(fs=100, leads=STANDARD_12_LEADS, length=500, required_leads=["v1"])
    with pytest.raises(ContractRefusal, match=r"lacks the model's required leads \['V1'\]"):
        apply_contract(two, need_v1)
    # Zero-fill where allowed: the missing leads are exactly zero and marked False.
    out = apply_contract(
        two, InputContract(fs=100, leads=STANDARD_12_LEADS, length=500, scaling="zscore_lead")
    )
    assert out.lead_mask.tolist() == [lead in ("II", "V5") for lead in STANDARD_12_LEADS]
    assert not out.windows[:, ~out.lead_mask].any() and out.windows[:, out.lead_mask].std() > 0.5
    with pytest.raises(ValueError, match="min_leads=13 is invalid"):
        InputContract(leads=STANDARD_12_LEADS, min_leads=13)
    with pytest.raises(ValueError, match=r"required_leads=.* is invalid, expected a subset"):
        InputContract(leads=["I", "II"], required_leads=["V1"])


def test_refusals_are_marked_per_record_and_other_errors_still_raise() -> None:
    full, two = synthetic(record_id="full"), keep(synthetic(), ["II", "V5"], "two")
    contract = InputContract(fs=100, leads=STANDARD_12_LEADS, length=500, min_leads=12)
    stacked = apply_contract_records([full, two, full], contract, on_refusal="mark")
    assert stacked.available.tolist() == [True, False, True]
    assert stacked.refusals[0] is None and "min_leads 12" in stacked.refusals[1]
    assert not stacked.windows[1].any()
    with pytest.raises(ContractRefusal, match=r"two\.hea"):
        apply_contract_records([full, two], contract)
    broken = synthetic(record_id="broken")
    broken.signal[3, 10] = np.nan
    with pytest.raises(RecordError, match=r"broken\.hea: signal contains 1 NaN") as info:
        apply_contract_records([full, broken], contract, on_refusal="mark")
    assert not isinstance(info.value, ContractRefusal)


def test_contracts_without_the_new_fields_keep_their_digest() -> None:
    """Feature-cache entries written before min_leads/required_leads existed stay valid."""
    contract = InputContract(fs=500, leads=STANDARD_12_LEADS, length=5000, bandpass=(0.67, 40), notch=50)
    before = {k: v for k, v in contract.to_dict().items() if k not in ("min_leads", "required_leads")}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert contract.digest() == expected
    assert dataclasses.replace(contract, min_leads=12).digest() != expected


def test_size_caps_refuse_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    day = synthetic(leads=["II", "V5"], fs=50.0, seconds=200.0, record_id="holter24h")
    monkeypatch.setattr(contract_module, "MAX_PREPARED_VALUES", 10_000)
    with pytest.raises(
        ContractRefusal,
        match=r"holter24h.hea: record of 10000 samples x 2 leads at 50 Hz becomes "
        r"100000 samples per lead at 500 Hz, over the cap of 10000 values",
    ):
        apply_contract(day, InputContract(fs=500, leads=["II", "V5"]))
    monkeypatch.setattr(contract_module, "MAX_PREPARED_VALUES", 10**9)
    monkeypatch.setattr(contract_module, "MAX_WINDOWS", 10)
    segments = InputContract(fs=50, leads=["II"], length=100, long_records="segments")
    with pytest.raises(
        ContractRefusal,
        match="gives 100 windows of 100 samples, over the cap of 10: set the contract's max_segments",
    ):
        apply_contract(day, segments)
    assert apply_contract(day, dataclasses.replace(segments, max_segments=5)).windows.shape == (5, 1, 100)


def test_short_records_report_their_real_samples_per_window() -> None:
    short = synthetic(seconds=3.0, record_id="short")
    out = apply_contract(short, InputContract(fs=100, leads=STANDARD_12_LEADS, length=500))
    assert out.valid_samples.tolist() == [300] and not out.windows[..., 300:].any()
    stacked = apply_contract_records(
        [short, synthetic()],
        InputContract(fs=100, leads=STANDARD_12_LEADS, length=500, layout="concat_leads"),
    )
    assert stacked.valid_samples.tolist() == [[300], [500]]


def test_lead_aliases_only_on_the_users_word() -> None:
    holter = synthetic(leads=["MLII", "V5"], fs=360.0, record_id="mitdb")
    assert holter.leads == ("MLII", "V5")
    aliased = holter.with_lead_aliases(parse_lead_aliases(["MLII=II"]))
    assert aliased.leads == ("II", "V5") and aliased.metadata["lead_aliases"] == {"MLII": "II"}
    with pytest.raises(RecordError, match="duplicate leads"):
        synthetic(leads=["MLII", "II"]).with_lead_aliases({"MLII": "II"})
    with pytest.raises(ValueError, match="expected FROM=TO"):
        parse_lead_aliases(["MLII"])
    with pytest.raises(ValueError, match="'xyz' is not a known lead name"):
        parse_lead_aliases(["MLII=xyz"])


# ------------------------------------------------------------------------------- masks in the FM families


MOMENT_FIXTURE = parity_dir() / "moment" / "tiny_a"
HUBERT_FIXTURE = parity_dir() / "hubert_ecg" / "tiny_a"


def _fixture_expert(folder: Path, spec_name: str, contract: InputContract, dim: int):
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"parity fixture {folder} not present")
    return load_expert(
        str(folder), spec=bundled_spec(spec_name).replace(contract=contract, embedding_dim=dim)
    )


def test_moment_leaves_missing_leads_out_exactly_as_the_official_model_without_them() -> None:
    contract = InputContract(fs=100, leads=STANDARD_12_LEADS, length=64, min_leads=1)
    expert = _fixture_expert(MOMENT_FIXTURE, "moment-1-small", contract, 32)
    reduced = keep(synthetic(), ["II", "V5"], "holter")
    masked = expert.embed(reduced)
    windows = torch.from_numpy(apply_contract(reduced, contract).windows)  # (1, 12, 64), 10 leads zero
    real = [STANDARD_12_LEADS.index("II"), STANDARD_12_LEADS.index("V5")]
    with torch.no_grad():
        official = expert.model.embed(
            windows[:, real], reduction="mean"
        )  # the official call on II and V5 alone
        zero_filled = expert.model.embed(windows, reduction="mean")
    torch.testing.assert_close(masked, official, atol=1e-5, rtol=0)
    assert (masked - zero_filled).abs().max() > 1e-3  # the mask matters


def test_moment_short_record_uses_the_official_input_mask() -> None:
    contract = InputContract(fs=100, leads=STANDARD_12_LEADS, length=64)
    expert = _fixture_expert(MOMENT_FIXTURE, "moment-1-small", contract, 32)
    short = synthetic(seconds=0.4, record_id="short")  # 40 of 64 samples
    ours = expert.embed(short)
    windows = torch.from_numpy(apply_contract(short, contract).windows)
    mask = (torch.arange(64) < 40).float()[None]
    with torch.no_grad():
        official = expert.model.embed(windows, input_mask=mask, reduction="mean")
        unmasked = expert.model.embed(windows, reduction="mean")
        # Whatever sits in the padding does not change the embedding: it never enters RevIN, attention or pooling.
        noisy = windows.clone()
        noisy[..., 40:] = 5.0
        noisy_ours = expert.family.embed(expert.model, noisy, valid_samples=torch.tensor([40]))
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)
    torch.testing.assert_close(noisy_ours, official, atol=1e-5, rtol=0)
    assert (ours - unmasked).abs().max() > 1e-3


def test_hubert_ecg_short_record_runs_its_real_samples_alone_like_the_official_code() -> None:
    contract = InputContract(fs=100, leads=STANDARD_12_LEADS, length=100, layout="concat_leads")
    expert = _fixture_expert(HUBERT_FIXTURE, "hubert-ecg-small", contract, 32)
    short, full = synthetic(seconds=0.6, record_id="short"), synthetic(seconds=2.0, record_id="full")
    batch = expert.prepare_batch([short, full])
    assert batch.valid_samples.tolist() == [[60], [100]]
    ours = expert.embed([short, full])
    with torch.no_grad():
        alone = apply_contract(
            short, dataclasses.replace(contract, length=None)
        ).windows  # (1, 12*60), unpadded
        official_short = expert.official_forward(torch.from_numpy(alone)).last_hidden_state.mean(dim=1)
        official_full = expert.official_forward(batch.windows[1:, 0]).last_hidden_state.mean(dim=1)
        padded = expert.official_forward(batch.windows[:1, 0]).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(ours[:1], official_short, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1:], official_full, atol=1e-4, rtol=0)
    assert (ours[:1] - padded).abs().max() > 1e-3  # padding would have changed it


# ------------------------------------------------------------------------------------ ensemble and gate

CONTRACT = InputContract(fs=100, leads=STANDARD_12_LEADS, length=1000, scaling="zscore_lead")
TASKS = [
    {"name": "superclass", "type": "multilabel", "label_names": ["NORM", "MI", "STTC", "CD", "HYP"]},
    {"name": "age", "type": "regression", "target_mean": 60.0, "target_std": 17.0},
]


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two in-house experts: one that needs all 12 leads, one that reads any of them (zero-fill)."""
    root = tmp_path_factory.mktemp("experts")
    dirs = {}
    for seed, (name, contract) in enumerate(
        {"all12": dataclasses.replace(CONTRACT, min_leads=12), "any": CONTRACT}.items()
    ):
        torch.manual_seed(seed)
        config = LightCNNConfig(architecture="SimpleNet", width_multiplier=0.25, embedding_dim=16)
        dirs[name] = save_inhouse_expert(
            build_light_model(config),
            family="light",
            config=config,
            contract=contract,
            folder=root / name,
            name=name,
        ).resolve()
    return dirs


def build_ensemble(expert_dirs: dict[str, Path], gate: dict) -> Ensemble:
    experts = {name: load_expert(str(folder)) for name, folder in expert_dirs.items()}
    config = EnsembleConfig.from_dict(
        {
            "experts": [
                {"name": n, "hub_id": str(expert_dirs[n]), "embedding_dim": e.embedding_dim}
                for n, e in experts.items()
            ],
            "tasks": TASKS,
            "heads": {"hidden_sizes": [16]},
            "gate": {"hidden_sizes": [8], "init_uniform": False, **gate},
            "seed": 1,
        }
    )
    return Ensemble(config, experts).eval()


GATES = {
    "signal": {"input": "signal"},
    "embeddings-top1": {"input": "embeddings", "top_k": 1},
    "global": {"input": "global"},
    "uniform": {"input": "uniform"},
}


@pytest.mark.parametrize("gate", list(GATES))
def test_gate_routes_a_reduced_lead_record_to_the_experts_that_can_read_it(expert_dirs, gate: str) -> None:
    model = build_ensemble(expert_dirs, GATES[gate])
    full = synthetic(record_id="full")
    two = keep(synthetic(), ["II", "V5"], "two")
    batch = EnsembleInputBuilder.for_ensemble(model)([full, two, full])
    assert batch.available.tolist() == [[True, True], [False, True], [True, True]]
    assert batch.record_leads[1] == ["II", "V5"]
    with torch.no_grad():
        out = model(batch.expert_inputs, batch.gate_input, batch.demographics, **batch.masks())
        alone = model.branch("any").head_logits(
            model.branch("any").embed(batch.expert_inputs["any"][1:2], None, batch.window_masks["any"][1:2])
        )
    weights = out.gate_weights["superclass"][1]
    assert weights.tolist() == pytest.approx([0.0, 1.0])
    # The reduced record's prediction is the able expert's alone; the other expert's is missing, not made up.
    torch.testing.assert_close(out.predictions["superclass"][1], torch.sigmoid(alone["superclass"][0]))
    assert torch.isnan(out.expert_predictions["superclass"][1, 0]).all()
    assert bool(out.routed[1].tolist() == [False, True])
    # Cached embeddings (NaN where an expert cannot read the record) give the same predictions.
    with torch.no_grad():
        embeddings = model.embed(batch.expert_inputs, batch.demographics, **batch.masks())
        assert torch.isnan(embeddings["all12"][1]).all() and torch.isfinite(embeddings["any"]).all()
        cached = model(embeddings, batch.gate_input, from_embeddings=True)
    for task in out.predictions:
        torch.testing.assert_close(cached.predictions[task], out.predictions[task], atol=1e-5, rtol=1e-5)


def test_a_training_step_with_an_unreadable_record_keeps_gradients_finite(expert_dirs) -> None:
    model = build_ensemble(expert_dirs, {"input": "embeddings"}).train()
    batch = EnsembleInputBuilder.for_ensemble(model)([synthetic(), keep(synthetic(), ["I"], "one")])
    out = model(batch.expert_inputs, batch.gate_input, batch.demographics, **batch.masks())
    labels = {
        "superclass": torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32),
        "age": torch.tensor([50.0, 70.0]),
    }
    loss = model.compute_loss(out, labels)[0]
    losses, _ = model.expert_losses(out, labels)
    (loss + sum(losses.values())).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_predictions_state_the_real_leads_and_who_could_not_read_them(expert_dirs, tmp_path: Path) -> None:
    model = build_ensemble(expert_dirs, {"input": "embeddings"})
    holter = synthetic(leads=["MLII", "V5"], fs=360.0, record_id="mitdb100")
    results = predict_records(model, [synthetic(record_id="full"), holter.with_lead_aliases({"MLII": "II"})])
    data = json.loads(json.dumps([r.to_dict() for r in results], allow_nan=False))
    assert data[0]["leads"] == list(STANDARD_12_LEADS)
    assert data[0]["inputs"] == {
        "all12": {"zero_filled_leads": [], "refused": None},
        "any": {"zero_filled_leads": [], "refused": None},
    }
    assert data[1]["leads"] == ["II", "V5"]
    assert "min_leads 12" in data[1]["inputs"]["all12"]["refused"]
    assert data[1]["inputs"]["any"]["zero_filled_leads"] == [
        lead for lead in STANDARD_12_LEADS if lead not in ("II", "V5")
    ]
    assert data[1]["tasks"]["superclass"]["experts"]["all12"] is None
    assert data[1]["tasks"]["superclass"]["gate_weights"]["all12"] == 0.0
    # Without the user's alias, MLII is not lead II; a record no expert can read is refused, naming its file.
    assert predict_records(model, [holter])[0].leads == ["MLII", "V5"]
    with pytest.raises(
        RecordError,
        match=r"/data/nolead.hea: no expert of the ensemble can read this record "
        r"\(all12: none of the contract leads .*; any: none of the contract leads",
    ):
        predict_records(model, [synthetic(leads=["MLII"], record_id="nolead")])


def test_cli_predict_json_on_a_2_lead_holter_record(expert_dirs, tmp_path: Path, capsys) -> None:
    from enecg.cli import main

    model = build_ensemble(expert_dirs, {"input": "embeddings"})
    model.save_pretrained(tmp_path / "model")
    holter = synthetic(leads=["MLII", "V5"], fs=360.0, seconds=12.0, record_id="mitdb")
    wfdb.wrsamp(
        "mitdb",
        fs=360,
        units=["mV", "mV"],
        sig_name=["MLII", "V5"],
        p_signal=holter.signal.T.astype(np.float64),
        fmt=["16", "16"],
        write_dir=str(tmp_path),
    )
    nolead = tmp_path / "nolead"
    wfdb.wrsamp(
        "nolead",
        fs=360,
        units=["mV"],
        sig_name=["MLIII"],
        p_signal=holter.signal[:1].T.astype(np.float64),
        fmt=["16"],
        write_dir=str(tmp_path),
    )
    code = main(
        [
            "predict",
            str(tmp_path / "mitdb"),
            str(nolead),
            "--model",
            str(tmp_path / "model"),
            "--json",
            "--lead-alias",
            "MLII=II",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2  # one record failed, the other was predicted
    out = json.loads(captured.out)
    assert out[0]["leads"] == ["II", "V5"] and out[0]["inputs"]["all12"]["refused"]
    weights = out[0]["tasks"]["superclass"]["gate_weights"]
    assert weights["all12"] == 0.0 and math.isclose(weights["any"], 1.0)
    assert "nolead" in out[1]["path"] and "no expert of the ensemble can read this record" in out[1]["error"]
    assert captured.err.count("\n") == 2 and "1 of 2 records failed" in captured.err
    code = main(["predict", str(tmp_path / "mitdb"), "--model", str(tmp_path / "model")])
    text = capsys.readouterr().out
    assert code == 0 and "leads MLII, V5" in text and "all12: not used, cannot read this record" in text


def test_reduced_lead_bench_runs_quick_and_states_each_outcome(data_dir: Path, tmp_path: Path) -> None:
    """``bench/bench_reduced_leads.py --quick``: every family's outcome for a 1- and 2-lead record is refused (with
    the contract's reason) or read (with the embedding's change); no figure is asserted."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = tmp_path / "reduced_leads.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "bench_reduced_leads.py"),
            "--quick",
            "--records",
            "1",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(out.read_text())
    assert set(result["models"]) >= {
        "hubert-ecg-small",
        "ecgfounder-12lead",
        "ecg-fm-pretrained",
        "moment-1-small",
    }
    for model in result["models"].values():
        assert set(model["variants"]) == {"holter_2lead", "single_lead_I", "short_4s"}
        for variant in model["variants"].values():
            assert (variant["outcome"] == "refused") == ("reason" in variant)
    moment = result["models"]["moment-1-small"]["variants"]
    assert (
        moment["holter_2lead"]["outcome"] == "masked"
        and "cosine_to_full_without_mask" in moment["holter_2lead"]
    )
    assert result["models"]["hubert-ecg-small"]["variants"]["single_lead_I"]["outcome"] == "refused"


def test_evaluation_scores_each_expert_on_what_it_read_and_reports_the_leads(
    expert_dirs, ptbxl_training_dataset: Path, tmp_path: Path
) -> None:
    """A test part where 20 records keep only II and V5: the 12-lead expert is scored on the other records, the
    ensemble and the baselines on all they can, and the report says which leads the records had."""
    import datasets

    from enecg.evaluation.metrics import BootstrapConfig
    from enecg.evaluation.runner import evaluate_ensemble

    dataset = datasets.load_from_disk(str(ptbxl_training_dataset))
    holter = [STANDARD_12_LEADS.index("II"), STANDARD_12_LEADS.index("V5")]

    def reduce(row: dict, index: int) -> dict:
        if index < 20:
            row["signal"] = [row["signal"][k] for k in holter]
            row["leads"] = ["II", "V5"]
        return row

    dataset["test"] = dataset["test"].map(reduce, with_indices=True)
    folder = tmp_path / "mixed"
    dataset.save_to_disk(str(folder))
    (folder / "enecg_dataset.json").write_text((ptbxl_training_dataset / "enecg_dataset.json").read_text())
    model = build_ensemble(expert_dirs, {"input": "embeddings"})
    evaluation = evaluate_ensemble(
        model,
        folder,
        out_dir=tmp_path / "eval",
        bootstrap=BootstrapConfig(n_resamples=5, seed=0),
        n_examples=1,
    )
    coverage = evaluation["lead_coverage"]
    assert coverage["lead_sets"] == {", ".join(STANDARD_12_LEADS): 46, "II, V5": 20}
    assert coverage["unreadable_records"] == {"all12": 20, "any": 0}
    assert evaluation["tasks"]["superclass"]["n_predicted"] == 66
    assert evaluation["experts"]["all12"]["superclass"]["n_predicted"] == 46
    assert evaluation["experts"]["any"]["superclass"]["n_predicted"] == 66
    from enecg.evaluation.baselines import STACKER

    assert evaluation["baselines"][STACKER]["superclass"]["n_predicted"] == 46
    for comparison in evaluation["paired"]["superclass"].values():
        assert math.isfinite(comparison["difference"]) and comparison["n_compared"] > 0
    assert "II, V5" in (tmp_path / "eval" / "report.html").read_text()
