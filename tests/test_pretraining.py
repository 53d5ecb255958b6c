"""Self-supervised pretraining: augmentations, the CMSC and masked-reconstruction objectives on real PTB-XL
records, an end-to-end ``pretrain()`` run whose folder loads as an expert (by path, and by Hub ID from a local
Hub), and the ``enecg pretrain`` command line with its recipe.

Encoders are SimpleNet at a quarter width and runs are a few steps: the tests check behaviour, not quality.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT

from enecg.contract import apply_contract_array
from enecg.experts.family import get_family
from enecg.leads import STANDARD_12_LEADS
from enecg.pretraining import augment as A
from enecg.pretraining.augment import AugmentConfig, ECGAugment
from enecg.pretraining.data import SegmentPairCollator, WfdbFolderRecords, open_records
from enecg.pretraining.objectives import (
    CMSCObjective,
    MaskedReconstructionObjective,
    SelfSupervisedModel,
    masked_mse,
    span_mask,
)
from enecg.pretraining.pretrainer import PretrainConfig, freeze_unused_parameters, pretrain

N_RECORDS = 32
RECIPE = REPO_ROOT / "recipes" / "pretrain_ssl.yaml"


@pytest.fixture(autouse=True, scope="module")
def _reset_accelerate_state() -> Iterator[None]:
    # Accelerate keeps process-wide singleton state; leave none behind for other test modules.
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def windows(ptbxl_dir: Path) -> torch.Tensor:
    """32 real PTB-XL records at 100 Hz under the default pretraining contract: ``(32, 2, 12, 500)``."""
    from enecg.io import read_record

    records = [
        read_record(ptbxl_dir / "records100" / "00000" / f"{i:05d}_lr") for i in range(1, N_RECORDS + 1)
    ]
    contract = PretrainConfig(data="unused").contract()
    prepared = apply_contract_array(
        np.stack([r.signal for r in records]), records[0].fs, records[0].leads, contract, source="ptbxl"
    )
    assert prepared.windows.shape == (N_RECORDS, 2, 12, 500)
    return torch.from_numpy(prepared.windows)


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = PretrainConfig(data="unused", width_multiplier=0.25, embedding_dim=64).encoder_config()
    return get_family("light").build(config.to_dict())


def _ssl_model(objective: str, seed: int = 0) -> SelfSupervisedModel:
    encoder = _encoder(seed)
    return SelfSupervisedModel(
        encoder, get_family("light").embed, embedding_dim=64, leads=12, length=500, objective=objective
    )


# ---------------------------------------------------------------------- augmentations

ALL_ON = AugmentConfig(**{f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")})
OPS = {
    "amplitude_scale": lambda x, g: A.amplitude_scale(x, g),
    "gaussian_noise": lambda x, g: A.gaussian_noise(x, g),
    "baseline_wander": lambda x, g: A.baseline_wander(x, g, fs=100.0),
    "powerline": lambda x, g: A.powerline(x, g, fs=100.0),
    "lead_dropout": lambda x, g: A.lead_dropout(x, g, rate=0.5),
    "time_mask": lambda x, g: A.time_mask(x, g, max_fraction=0.2),
    "time_shift": lambda x, g: A.time_shift(x, g),
    "composed": lambda x, g: ECGAugment(ALL_ON, fs=100.0)(x, g),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_augmentation_keeps_shape_dtype_is_seeded_and_changes_signal(
    windows: torch.Tensor, name: str, dtype: torch.dtype
) -> None:
    x = windows[:8, 0].to(dtype)
    op = OPS[name]
    out = op(x, _generator(1))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, op(x, _generator(1))), "same seed must give the same output"
    assert not torch.equal(out, op(x, _generator(2))), "another seed must give another output"
    assert not torch.equal(out, x), "the augmentation must change the signal"


@pytest.mark.parametrize("snr_db", [5.0, 20.0])
def test_gaussian_noise_has_the_requested_snr(windows: torch.Tensor, snr_db: float) -> None:
    x = windows[:, 0].double()  # (32, 12, 500), z-scored per lead
    noise = A.gaussian_noise(x, _generator(3), snr_db=snr_db) - x
    signal_power = x.pow(2).mean(dim=-1)
    noise_power = noise.pow(2).mean(dim=-1)
    live = signal_power > 0  # zeroed (flat) leads get no noise at all
    assert torch.all(noise_power[~live] == 0)
    measured = 10 * torch.log10(signal_power[live] / noise_power[live])
    # 500 samples estimate a lead's noise power to ~6 % (0.27 dB); the mean over ~380 leads to ~0.02 dB.
    assert abs(measured.mean().item() - snr_db) < 0.1
    assert (measured - snr_db).abs().max().item() < 1.5


def test_lead_dropout_zeros_whole_leads_and_keeps_one(windows: torch.Tensor) -> None:
    x = windows[:, 0] + 10.0  # no sample is zero before dropout
    out = A.lead_dropout(x, _generator(4), rate=0.5)
    zero_samples = out == 0
    dropped = zero_samples.all(dim=-1)  # (B, leads)
    assert torch.equal(zero_samples.any(dim=-1), dropped), "a lead is either dropped entirely or untouched"
    assert torch.equal(out[~dropped], x[~dropped])
    assert dropped.any() and not dropped.all(dim=1).any(), "some leads dropped, never all leads of a record"
    assert 0.3 < dropped.float().mean().item() < 0.7
    everything = A.lead_dropout(x, _generator(4), rate=0.999)
    assert torch.all((everything != 0).all(dim=-1).sum(dim=1) == 1)


def test_time_mask_and_shift_zero_contiguous_spans(windows: torch.Tensor) -> None:
    x = windows[:8, 0] + 10.0
    masked = A.time_mask(x, _generator(5), max_fraction=0.3)
    zero_steps = (masked == 0).all(dim=1)  # (B, T): masked steps are zero in every lead
    assert torch.equal((masked == 0).any(dim=1), zero_steps)
    for row in zero_steps:
        idx = torch.nonzero(row).flatten()
        if idx.numel():
            assert idx[-1] - idx[0] + 1 == idx.numel(), "one contiguous span"
            assert idx.numel() <= 0.3 * 500
    shifted = A.time_shift(x, _generator(6), max_fraction=0.1)
    for original, moved in zip(x, shifted):
        zeros = int((moved == 0).all(dim=0).sum())
        assert zeros <= 50
        if zeros:  # the rest is the same signal, displaced by `zeros` samples one way or the other
            assert torch.equal(moved[:, zeros:], original[:, :-zeros]) or torch.equal(
                moved[:, :-zeros], original[:, zeros:]
            )


def test_powerline_and_baseline_wander_add_the_right_frequencies() -> None:
    x = torch.ones(4, 12, 1000)  # RMS 1 per lead
    hum = A.powerline(x, _generator(7), fs=500.0, amplitude=0.5, frequencies=(60.0,)) - x
    spectrum = torch.fft.rfft(hum, dim=-1).abs()
    freqs = torch.fft.rfftfreq(1000, d=1 / 500)
    assert torch.all(freqs[spectrum.argmax(dim=-1)] == 60.0)
    wander = A.baseline_wander(x, _generator(8), fs=500.0, amplitude=0.5, frequency_range=(0.1, 0.5)) - x
    step = wander.diff(dim=-1).abs().max().item()
    # A sinusoid of <= 0.5 Hz and amplitude <= 0.5 changes by at most 2 pi * 0.5 * 0.5 / 500 per sample (x2 parts).
    assert 0 < step <= 2 * (2 * math.pi * 0.5 * 0.5 / 500)
    assert wander.abs().max().item() > 0.01


def test_random_crop_takes_a_window_of_the_record() -> None:
    x = torch.arange(20.0).view(1, 1, 20).expand(3, 2, 20).contiguous()
    out = A.random_crop(x, _generator(9), 8)
    assert out.shape == (3, 2, 8)
    assert torch.all(out.diff(dim=-1) == 1) and torch.equal(out[:, 0], out[:, 1])


# ---------------------------------------------------------------------- CMSC


def test_cmsc_loss_is_lower_for_matched_than_for_shuffled_segments(windows: torch.Tensor) -> None:
    encoder = _encoder(seed=0).eval()
    torch.manual_seed(0)
    cmsc = CMSCObjective(embedding_dim=64, temperature=0.1)
    with torch.no_grad():
        first, second = encoder.features(windows[:, 0]), encoder.features(windows[:, 1])
        matched, logs = cmsc(first, second)
        shuffled = [
            cmsc(first, second[torch.randperm(N_RECORDS, generator=_generator(s))])[0] for s in range(5)
        ]
    assert matched.item() < min(s.item() for s in shuffled)
    assert logs["accuracy"].item() > 1 / N_RECORDS
    # Patient groups: two records of one "patient" are both positives -> the loss can only drop.
    groups = torch.arange(N_RECORDS)
    groups[1] = 0
    with torch.no_grad():
        assert cmsc(first, second, groups)[0].item() <= matched.item() + 1e-6


def _cmsc_eval(model: SelfSupervisedModel, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return model(windows[:, 0], windows[:, 1])[0].item()


def test_cmsc_loss_decreases_over_steps(windows: torch.Tensor) -> None:
    model = _ssl_model("cmsc")
    augment = ECGAugment(AugmentConfig(), fs=100.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = _generator(10)
    before = _cmsc_eval(model, windows)
    for _ in range(20):
        first, second = augment(windows[:, 0], generator), augment(windows[:, 1], generator)
        loss, _ = model(first, second)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _cmsc_eval(model, windows)
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------------- masked reconstruction


def test_span_mask_covers_the_requested_fraction_in_whole_spans() -> None:
    mask = span_mask(64, 500, _generator(11), ratio_range=(0.15, 0.25), span=20)
    assert mask.shape == (64, 500) and mask.dtype == torch.bool
    assert torch.equal(mask, span_mask(64, 500, _generator(11), ratio_range=(0.15, 0.25), span=20))
    fraction = mask.float().mean(dim=1)
    assert fraction.min() >= 0.14 and fraction.max() <= 0.26  # k whole spans of 20 = 4..6 spans
    assert torch.all(mask.sum(dim=1) % 20 == 0)
    edges = torch.diff(mask.int(), dim=1, prepend=torch.zeros(64, 1, dtype=torch.int32))
    for row, edge in zip(mask, edges):
        starts = torch.nonzero(edge == 1).flatten()
        runs = torch.diff(torch.cat([starts, torch.tensor([500])]))
        assert all(int(row[s : s + 20].sum()) == 20 for s in starts), "every gap is >= one whole span"
        assert runs.numel() >= 1


def test_reconstruction_loss_counts_masked_positions_only() -> None:
    target = torch.randn(4, 12, 100)
    mask = torch.zeros(4, 100, dtype=torch.bool)
    mask[:, 20:40] = True
    prediction = target.clone()
    prediction[..., ~mask[0]] += 100.0  # wrong everywhere outside the mask
    assert masked_mse(prediction, target, mask).item() == 0.0
    prediction = prediction.clone().requires_grad_(True)
    off = prediction.detach().clone()
    off[..., 20:40] += 1.0  # error 1 on every masked sample -> MSE exactly 1
    assert masked_mse(off, target, mask).item() == pytest.approx(1.0)
    masked_mse(prediction + 0.5, target, mask).backward()
    assert torch.all(prediction.grad[..., ~mask[0]] == 0)
    assert torch.all(prediction.grad[..., mask[0]] != 0)
    # The masked input the encoder sees is zero exactly on the masked steps of every lead.
    seen = MaskedReconstructionObjective.mask_input(target, mask)
    assert torch.all(seen[..., 20:40] == 0) and torch.equal(seen[..., :20], target[..., :20])
    with pytest.raises(ValueError, match="selects no samples"):
        masked_mse(target, target, torch.zeros_like(mask))


def test_reconstruction_loss_decreases_over_steps(windows: torch.Tensor) -> None:
    model = _ssl_model("reconstruction")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = windows[:16, 0]
    fixed_mask = span_mask(16, 500, _generator(12))
    with torch.no_grad():
        before, logs = model(x, mask=fixed_mask)
    assert set(logs) == {"loss", "reconstruction/loss", "reconstruction/masked_fraction"}
    generator = _generator(13)
    for _ in range(20):
        loss, _ = model(x, mask=span_mask(16, 500, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after, _ = model(x, mask=fixed_mask)
    assert after.item() < 0.92 * before.item(), (before.item(), after.item())


# ---------------------------------------------------------------------- data and pretrain() end to end


def test_collator_mixes_rates_and_lengths_and_skips_unreadable_records(
    ptbxl_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "records"
    folder.mkdir()
    for name in ("records100/00000/00001_lr", "records100/00000/00002_lr", "records500/00000/00003_hr"):
        for suffix in (".hea", ".dat"):
            source = ptbxl_dir / (name + suffix)
            (folder / source.name).symlink_to(source)
    (folder / "broken.hea").write_text("broken 12 100\n")  # 12 signals announced, none described
    records = open_records(folder)
    assert isinstance(records, WfdbFolderRecords) and len(records) == 4
    items = [records[i] for i in range(len(records))]
    assert sum(item is None for item in items) == 1 and "broken.hea" in caplog.text
    contract = PretrainConfig(data="unused").contract()
    batch = SegmentPairCollator(contract)(items)
    assert batch["first"].shape == batch["second"].shape == (3, 12, 500)
    assert int(batch["n_records"]) == 3 and int(batch["n_skipped"]) == 1
    assert batch["adjacent"].all() and batch["groups"].tolist() == [0, 1, 2]
    # The 500-Hz record went through the same contract: windows i and i+1 of a 10-s record are both 5 s.
    expected = apply_contract_array(
        items[2].signal, items[2].fs, items[2].leads, contract, source="00003_hr"
    ).windows
    assert any(torch.equal(batch["first"][i], torch.from_numpy(expected[0])) for i in range(3))


def test_unused_encoder_parameters_are_frozen_without_touching_batchnorm() -> None:
    encoder = _encoder().train()
    stats = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    unused = freeze_unused_parameters(encoder, get_family("light").embed, leads=12, length=500)
    assert unused == ["classifier.1.weight", "classifier.1.bias"]  # the standalone head: not in the embedding
    assert encoder.training and all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in stats.items())
    assert [n for n, p in encoder.named_parameters() if not p.requires_grad] == unused


@pytest.fixture(scope="module")
def ptbxl_dataset(ptbxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enecg.data.ptbxl import PtbxlOptions, prepare_ptbxl

    out = tmp_path_factory.mktemp("ssl-data") / "ptbxl100"
    prepare_ptbxl(ptbxl_dir, out, PtbxlOptions(rate=100, ecg_ids=tuple(range(1, 41))), workers=1)
    return out


def _quick_config(data: Path, out: Path, **changes: object) -> PretrainConfig:
    values: dict[str, object] = {
        "data": str(data),
        "splits": ("train",),
        "width_multiplier": 0.25,
        "embedding_dim": 64,
        "batch_size": 8,
        "max_steps": 3,
        "log_every": 2,
        "output_dir": str(out),
        "name": "ssl-test",
    }
    values.update(changes)
    return PretrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pretrained(ptbxl_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ssl-run") / "expert"
    assert pretrain(_quick_config(ptbxl_dataset, out, use_patient_ids=True)) == out
    return out


def test_pretrain_writes_an_expert_that_loads_strictly_and_embeds(pretrained: Path, ptbxl_dir: Path) -> None:
    from enecg import load_expert, read_record
    from enecg.experts.inhouse import load_inhouse_expert_module

    assert sorted(p.name for p in pretrained.iterdir()) == [
        "config.json",
        "enecg_expert.json",
        "metrics.json",
        "model.safetensors",
    ]
    spec = json.loads((pretrained / "enecg_expert.json").read_text())
    assert spec["family"] == "light" and spec["embedding_dim"] == 64
    assert "CMSC" in spec["description"] and "reconstruction" in spec["description"]
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["objective"] == "combined" and metrics["steps"] == 3
    assert metrics["records_seen"] == 24 and metrics["records_skipped"] == 0
    assert {"loss", "cmsc/loss", "reconstruction/loss"} <= set(metrics["final"])
    assert metrics["pretraining_config"]["use_patient_ids"] is True
    load_inhouse_expert_module(pretrained)  # strict: every key present, none extra (no head, no decoder)

    expert = load_expert(pretrained)
    assert expert.frozen and expert.contract.long_records == "segments" and expert.contract.fs == 100.0
    record = read_record(ptbxl_dir / "records500" / "00000" / "00001_hr")  # 500 Hz: the contract resamples
    embedding = expert.embed(record)
    assert embedding.shape == (1, 64) and torch.isfinite(embedding).all()
    torch.testing.assert_close(expert.embed([record, record]), embedding.expand(2, -1))


def test_pretrain_refuses_to_overwrite_an_expert(pretrained: Path, ptbxl_dataset: Path) -> None:
    with pytest.raises(ValueError, match="already holds an expert"):
        pretrain(_quick_config(ptbxl_dataset, pretrained))


def test_pushed_expert_loads_by_hub_id(pretrained: Path, tmp_path: Path, ptbxl_dir: Path) -> None:
    import huggingface_hub

    from enecg import load_expert, read_record
    from enecg.testing.endpoint import use_endpoint
    from enecg.testing.local_hub import LocalHub

    record = read_record(ptbxl_dir / "records100" / "00000" / "00002_lr")
    local = load_expert(pretrained).embed(record)
    repo_id = "enecg-test/ssl-simplenet"
    with LocalHub(tmp_path / "hub") as hub:
        with use_endpoint(hub.url):  # online against the loopback Hub (conftest sets HF_HUB_OFFLINE=1)
            huggingface_hub.create_repo(repo_id)
            huggingface_hub.upload_folder(folder_path=str(pretrained), repo_id=repo_id)
            expert = load_expert(repo_id)
        assert expert.hub_id == repo_id and len(expert.revision) == 40
        torch.testing.assert_close(expert.embed(record), local)
        with use_endpoint(hub.url, offline=True):  # back offline: the Hub cache answers
            cached = load_expert(repo_id)
        assert cached.revision == expert.revision


# ---------------------------------------------------------------------- config and command line


def test_recipe_keys_are_the_config_fields() -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    assert list(recipe) == PretrainConfig.field_names()
    assert list(recipe["augmentation"]) == [f.name for f in dataclasses.fields(AugmentConfig)]
    config = PretrainConfig.from_dict(recipe)
    assert config.leads == STANDARD_12_LEADS and config.mixed_precision == "no"
    assert config.contract().length == config.window_length
    with pytest.raises(ValueError, match="pretraining config: unknown key 'learning_rate'"):
        PretrainConfig.from_dict({**recipe, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"pretraining config: unknown key 'augmentation\.noise'"):
        PretrainConfig.from_dict({**recipe, "augmentation": {"noise": 1.0}})


def test_cli_pretrains_from_the_recipe_on_a_record_folder(
    ptbxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from enecg import load_expert
    from enecg.cli import main

    out = tmp_path / "cli-expert"
    common = ["pretrain", "--config", str(RECIPE), f"--data={ptbxl_dir / 'records100'}"]
    assert main([*common, "--learning_rate=0.1"]) == 2  # unknown key
    assert "command line: unknown key 'learning_rate'" in capsys.readouterr().err
    assert main([*common, "--temp=0.2"]) == 2  # no prefix matching either
    assert "command line: unknown key 'temp'" in capsys.readouterr().err

    args = [
        *common,
        "--max_records=16",
        "--batch_size=8",
        "--max_steps=2",
        "--width_multiplier=0.25",
        "--objective=cmsc",
        "--augmentation.noise_p=1.0",
        f"--output_dir={out}",
    ]
    assert main([*args, "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["max_records"] == 16 and resolved["augmentation"]["noise_p"] == 1.0
    assert resolved["mixed_precision"] == "no" and not out.exists()
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "cmsc" and metrics["unique_records"] == 16
    assert set(metrics["final"]) == {
        "loss",
        "cmsc/loss",
        "cmsc/accuracy",
        "cmsc/positive_similarity",
        "cmsc/negative_similarity",
    }
    assert load_expert(out).embedding_dim == 128
