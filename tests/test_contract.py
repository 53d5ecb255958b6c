"""Input-contract application: resampling, leads, filters, windows, scaling, layouts, errors, batch API.

The example contracts below follow /work/shared/docs/foundation-models.md (the real adapter specs live
elsewhere); they check that every FM contract is expressible and gives the shape the model expects.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy import signal

from enecg.contract import (
    InputContract,
    PreparedInput,
    apply_contract,
    apply_contract_array,
    resampling_ratio,
)
from enecg.leads import STANDARD_12_LEADS
from enecg.record import ECGRecord, RecordError

JEPA_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")

FM_CONTRACTS = {
    # 100 Hz, 5 s per lead, FIR 0.05-47 Hz (0.3 s of taps at the 500 Hz filtering rate, as the official
    # `apply_filter`), per-lead min-max to [-1, 1], the 12 leads concatenated into 6000 samples.
    "hubert_ecg": InputContract(
        fs=100,
        leads=STANDARD_12_LEADS,
        length=500,
        bandpass=(0.05, 47.0),
        bandpass_design="fir",
        bandpass_order=150,
        scaling="minmax_lead",
        layout="concat_leads",
    ),
    "ecgfounder": InputContract(
        fs=500,
        leads=STANDARD_12_LEADS,
        length=5000,
        notch=50.0,
        bandpass=(0.67, 40.0),
        bandpass_design="butter",
        bandpass_order=4,
        baseline="median",
        scaling="zscore_record",
    ),
    "ecg_fm": InputContract(
        fs=500,
        leads=STANDARD_12_LEADS,
        length=2500,
        long_records="segments",
        aggregation="mean",
        zero_constant_leads=True,
        scaling="zscore_lead",
    ),
    # Any rate, each lead its own series (the model is channel-independent), RevIN inside the model.
    "moment": InputContract(length=512, scaling="none"),
    "st_mem": InputContract(
        fs=250, leads=STANDARD_12_LEADS, length=2250, bandpass=(0.67, 40.0), scaling="zscore_lead"
    ),
    "ecg_jepa": InputContract(fs=250, leads=JEPA_LEADS, length=2500, scaling="none"),
}
EXPECTED_SHAPES = {  # for a 10 s, 500 Hz, 12-lead record
    "hubert_ecg": (1, 6000),
    "ecgfounder": (1, 12, 5000),
    "ecg_fm": (2, 12, 2500),
    "moment": (1, 12, 512),
    "st_mem": (1, 12, 2250),
    "ecg_jepa": (1, 8, 2500),
}


def read_ptbxl(ptbxl_dir: Path, ecg_id: int, rate: int = 500) -> ECGRecord:
    suffix, folder = ("hr", "records500") if rate == 500 else ("lr", "records100")
    path = ptbxl_dir / folder / f"{(ecg_id // 1000) * 1000:05d}" / f"{ecg_id:05d}_{suffix}"
    raw = wfdb.rdrecord(str(path))
    return ECGRecord(raw.p_signal.T, raw.fs, raw.sig_name, f"{ecg_id:05d}", metadata={"path": str(path)})


def synthetic(leads=STANDARD_12_LEADS, fs: float = 500.0, seconds: float = 10.0, seed: int = 0) -> ECGRecord:
    rng = np.random.default_rng(seed)
    t = np.arange(round(fs * seconds)) / fs
    rows = [
        np.sin(2 * np.pi * (1.0 + i) * t) * (1 + i) + 0.1 * rng.standard_normal(t.size)
        for i in range(len(leads))
    ]
    return ECGRecord(np.stack(rows), fs, leads, "synthetic", metadata={"path": "/data/synthetic.hea"})


# ------------------------------------------------------------------------------------------------ resampling


def test_resampling_ratio_is_exact() -> None:
    assert resampling_ratio(500, 100) == (1, 5)
    assert resampling_ratio(360, 500) == (25, 18)
    assert resampling_ratio(257, 250) == (250, 257)
    assert resampling_ratio(1000 / 3, 500) == (3, 2)
    with pytest.raises(ValueError, match="ratio"):
        resampling_ratio(499.9871, 500)


def test_resampled_ptbxl_matches_its_own_100hz_file(ptbxl_dir: Path) -> None:
    """500 Hz -> 100 Hz against PTB-XL's own 100 Hz file of the same record.

    Measured on 15 records among 1-99: the 100 Hz files lag the 500 Hz ones by 1 ms (a tenth of a 100 Hz
    sample), so the lag is estimated by cross-correlation on a 1000 Hz grid first. After alignment the
    relative RMS error is 0.020-0.057 (the files' own anti-aliasing differs from resample_poly's); without
    alignment it is 0.06-0.14. Tolerance: 0.08, and a lead correlation >= 0.99.
    """
    contract = InputContract(fs=100)
    upsample = 10  # 1000 Hz grid: 1 ms lag resolution
    edge = 50 * upsample  # ignore 0.5 s at both ends (filter edges)
    for ecg_id in (1, 8, 15, 22, 29):
        ours = apply_contract(read_ptbxl(ptbxl_dir, ecg_id, 500), contract).windows[0].astype(np.float64)
        theirs = read_ptbxl(ptbxl_dir, ecg_id, 100).signal.astype(np.float64)
        assert ours.shape == theirs.shape == (12, 1000)
        ours_fine = signal.resample_poly(ours, upsample, 1, axis=-1, padtype="line")
        theirs_fine = signal.resample_poly(theirs, upsample, 1, axis=-1, padtype="line")
        reference = theirs_fine[:, edge:-edge]

        def shifted(lag: int, ours_fine=ours_fine) -> np.ndarray:
            return ours_fine[:, edge + lag : ours_fine.shape[1] - edge + lag]

        lags = range(-2 * upsample, 2 * upsample + 1)
        lag = max(lags, key=lambda lag: float(np.sum(shifted(lag) * reference)))
        aligned = shifted(lag)
        relative_rms = np.sqrt(np.mean((aligned - reference) ** 2)) / reference.std()
        assert relative_rms < 0.08, (ecg_id, lag, relative_rms)
        correlations = [np.corrcoef(a, b)[0, 1] for a, b in zip(aligned, reference)]
        assert min(correlations) >= 0.99, (ecg_id, lag, correlations)
        # The tolerance is tight enough to catch a one-sample (10 ms) misalignment.
        off = shifted(lag + upsample)
        assert np.sqrt(np.mean((off - reference) ** 2)) / reference.std() > 0.08


def test_upsampling_length_and_dc() -> None:
    record = ECGRecord(np.full((2, 360), 1.5), 360, ("I", "II"), "r")
    windows = apply_contract(record, InputContract(fs=500)).windows
    assert windows.shape == (1, 2, 500)
    # padtype='line': no ringing at the edges. The remaining 0.07% ripple is resample_poly's default Kaiser
    # (beta 5) anti-imaging filter, whose 25 polyphase branches have slightly different DC gains.
    np.testing.assert_allclose(windows, 1.5, rtol=2e-3)


# ----------------------------------------------------------------------------------------------------- leads


def test_lead_reorder_round_trip(ptbxl_dir: Path) -> None:
    record = read_ptbxl(ptbxl_dir, 1)
    order = tuple(np.random.default_rng(3).permutation(STANDARD_12_LEADS))
    permuted = apply_contract(record, InputContract(leads=order)).windows[0]
    assert not np.array_equal(permuted, record.signal)
    back = apply_contract_array(
        permuted, record.fs, order, InputContract(leads=STANDARD_12_LEADS), source="p"
    )
    np.testing.assert_array_equal(back.windows[0], record.signal)
    assert back.lead_mask.all()


def test_mimic_lead_order_maps_by_name() -> None:
    # Row i holds the constant i, spelt as MIMIC-IV-ECG headers spell them (upper-case aV*).
    signal_rows = np.repeat(np.arange(12, dtype=np.float32)[:, None], 100, axis=1)
    header_names = [name.upper() for name in MIMIC_LEADS]
    record = ECGRecord(signal_rows, 500, header_names, "mimic")
    windows = apply_contract(record, InputContract(leads=STANDARD_12_LEADS)).windows[0]
    expected_rows = [MIMIC_LEADS.index(lead) for lead in STANDARD_12_LEADS]
    assert expected_rows[4:6] == [5, 4]  # aVL is MIMIC's 6th row, aVF its 5th
    np.testing.assert_array_equal(windows[:, 0], np.asarray(expected_rows, dtype=np.float32))


def test_missing_leads_zero_filled_and_masked() -> None:
    record = synthetic(leads=("II", "V5"), seconds=4)
    contract = InputContract(leads=STANDARD_12_LEADS, scaling="zscore_record")
    prepared = apply_contract(record, contract)
    assert prepared.lead_mask.tolist() == [lead in ("II", "V5") for lead in STANDARD_12_LEADS]
    window = prepared.windows[0]
    assert np.all(window[~prepared.lead_mask] == 0)
    # The zero-filled rows neither enter the record statistics nor change: the present rows are standardised.
    present = window[prepared.lead_mask].astype(np.float64)
    assert abs(present.mean()) < 1e-6 and abs(present.std() - 1) < 1e-5


def test_missing_leads_refused() -> None:
    record = synthetic(leads=("II", "V5"), seconds=2)
    with pytest.raises(RecordError, match=r"/data/synthetic\.hea: record lacks contract leads \['I', 'III'"):
        apply_contract(record, InputContract(leads=STANDARD_12_LEADS, missing_leads="refuse"))


def test_no_contract_lead_present_is_an_error() -> None:
    record = synthetic(leads=("ECG1", "ECG2"), seconds=2)
    with pytest.raises(RecordError, match="none of the contract leads"):
        apply_contract(record, InputContract(leads=STANDARD_12_LEADS))


def test_duplicated_lead_is_ambiguous() -> None:
    record = synthetic(leads=("I", "II", "II"), seconds=1)
    with pytest.raises(RecordError, match="lead II appears 2 times"):
        apply_contract(record, InputContract(leads=("I", "II")))


# --------------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("name", sorted(FM_CONTRACTS))
def test_fm_contracts_give_the_models_shapes(ptbxl_dir: Path, name: str) -> None:
    record = read_ptbxl(ptbxl_dir, 2)
    assert record.n_samples == 5000 and record.fs == 500
    prepared = apply_contract(record, FM_CONTRACTS[name])
    assert isinstance(prepared, PreparedInput)
    assert prepared.windows.shape == EXPECTED_SHAPES[name]
    assert prepared.windows.dtype == np.float32 and np.isfinite(prepared.windows).all()
    assert prepared.lead_mask.dtype == bool and prepared.lead_mask.all()


def test_ecg_fm_segments_are_the_two_standardised_halves(ptbxl_dir: Path) -> None:
    record = read_ptbxl(ptbxl_dir, 3)
    windows = apply_contract(record, FM_CONTRACTS["ecg_fm"]).windows
    assert windows.shape == (2, 12, 2500)
    for index in range(2):
        half = record.signal[:, index * 2500 : (index + 1) * 2500].astype(np.float64)
        expected = (half - half.mean(axis=1, keepdims=True)) / half.std(axis=1, keepdims=True)
        np.testing.assert_allclose(windows[index], expected, atol=1e-5)


def test_hubert_blocks_are_min_max_scaled(ptbxl_dir: Path) -> None:
    windows = apply_contract(read_ptbxl(ptbxl_dir, 4), FM_CONTRACTS["hubert_ecg"]).windows
    assert windows.shape == (1, 6000)
    blocks = windows[0].reshape(12, 500)  # lead after lead
    np.testing.assert_allclose(blocks.min(axis=1), -1.0, atol=1e-6)
    np.testing.assert_allclose(blocks.max(axis=1), 1.0, atol=1e-6)


def test_concat_layout_is_lead_after_lead() -> None:
    record = synthetic(leads=("I", "II", "III"), seconds=1)
    stacked = apply_contract(record, InputContract(length=200)).windows
    flat = apply_contract(record, InputContract(length=200, layout="concat_leads")).windows
    np.testing.assert_array_equal(flat[0, 200:400], stacked[0, 1])


def test_crop_start_and_center() -> None:
    ramp = np.tile(np.arange(1000, dtype=np.float32), (2, 1))
    record = ECGRecord(ramp, 100, ("I", "II"), "ramp")
    centre = apply_contract(record, InputContract(length=100, long_records="crop_center")).windows
    start = apply_contract(record, InputContract(length=100)).windows
    assert centre.shape == start.shape == (1, 2, 100)
    assert centre[0, 0, 0] == 450 and centre[0, 0, -1] == 549
    assert start[0, 0, 0] == 0 and start[0, 0, -1] == 99


def test_segments_drop_remainder_and_respect_max_segments() -> None:
    record = synthetic(seconds=12.2)
    contract = InputContract(length=2500, long_records="segments")
    windows = apply_contract(record, contract).windows
    assert windows.shape == (2, 12, 2500)  # 6100 samples: two full segments, the 1100-sample rest dropped
    np.testing.assert_array_equal(windows[1], record.signal[:, 2500:5000])
    capped = apply_contract(record, dataclasses.replace(contract, max_segments=1)).windows
    np.testing.assert_array_equal(capped, windows[:1])


def test_short_record_padded_after_scaling_or_refused() -> None:
    record = synthetic(leads=("I", "II"), seconds=3)
    padded = apply_contract(record, InputContract(length=2500, scaling="zscore_lead")).windows
    assert padded.shape == (1, 2, 2500)
    assert np.all(padded[0, :, 1500:] == 0)
    real = padded[0, :, :1500].astype(np.float64)
    np.testing.assert_allclose(real.mean(axis=1), 0, atol=1e-6)  # statistics of the real samples only
    np.testing.assert_allclose(real.std(axis=1), 1, atol=1e-5)
    with pytest.raises(RecordError, match="shorter than the contract length 2500"):
        apply_contract(record, InputContract(length=2500, short_records="refuse"))


# --------------------------------------------------------------------------------------------------- scaling


def test_zscore_lead_and_record_invariants(ptbxl_dir: Path) -> None:
    record = read_ptbxl(ptbxl_dir, 5)
    per_lead = apply_contract(record, InputContract(scaling="zscore_lead")).windows[0].astype(np.float64)
    np.testing.assert_allclose(per_lead.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(per_lead.std(axis=1), 1, atol=1e-5)
    whole = apply_contract(record, InputContract(scaling="zscore_record")).windows[0].astype(np.float64)
    assert abs(whole.mean()) < 1e-5 and abs(whole.std() - 1) < 1e-5
    assert np.std(whole.std(axis=1)) > 0.05  # leads keep their relative amplitudes


@pytest.mark.parametrize("scaling", ["zscore_lead", "zscore_record", "minmax_lead", "none"])
def test_constant_lead_is_safe(scaling: str) -> None:
    record = synthetic(leads=("I", "II", "III"), seconds=2)
    record.signal[1] = 3.0
    contract = InputContract(scaling=scaling, length=500, long_records="segments")
    windows = apply_contract(record, contract).windows
    assert np.isfinite(windows).all()
    if scaling == "zscore_lead":
        assert np.all(windows[:, 1] == 0)
    if scaling == "minmax_lead":
        assert np.all(windows[:, 1] == -1)  # HuBERT-ECG's (x - min) / (max - min + eps) gives the bottom
    zeroed = apply_contract(record, dataclasses.replace(contract, zero_constant_leads=True)).windows
    assert np.all(zeroed[:, 1] == 0)
    np.testing.assert_array_equal(zeroed[:, [0, 2]], windows[:, [0, 2]])


def test_all_constant_record_is_safe() -> None:
    record = ECGRecord(np.full((3, 1000), 2.0), 500, ("I", "II", "III"), "flat")
    for scaling in ("zscore_lead", "zscore_record", "minmax_lead"):
        windows = apply_contract(record, InputContract(scaling=scaling, bandpass=(0.5, 40))).windows
        assert np.isfinite(windows).all() and np.abs(windows).max() <= 1


def test_flat_lead_after_filters_is_zeroed() -> None:
    # An exactly flat lead leaves the filters with ~1e-16 ripple: it must still count as constant.
    record = synthetic(leads=("I", "II"), seconds=10)
    record.signal[0] = 5.0
    contract = InputContract(
        fs=250,
        bandpass=(0.67, 40.0),
        notch=50.0,
        baseline="median",
        scaling="zscore_lead",
        zero_constant_leads=True,
    )
    windows = apply_contract(record, contract).windows
    assert np.all(windows[0, 0] == 0) and windows[0, 1].std() > 0.9


# --------------------------------------------------------------------------------------------------- filters


def _tone(freq: float, fs: float = 500.0, seconds: float = 10.0, amplitude: float = 1.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(fs * seconds)) / fs)


def _interior_rms(x: np.ndarray, fs: float = 500.0) -> float:
    edge = int(fs)  # 1 s: zero-phase filters' edge transients
    return float(np.sqrt(np.mean(x[..., edge:-edge] ** 2)))


def test_notch_removes_mains_and_keeps_ecg_band() -> None:
    ecg_band = _tone(10.0)
    data = np.stack([ecg_band + _tone(50.0), ecg_band])
    out = apply_contract_array(data, 500, ("I", "II"), InputContract(notch=50.0), source="t").windows[0]
    assert _interior_rms(out[0] - ecg_band) < 0.02 * _interior_rms(_tone(50.0))
    assert _interior_rms(out[1] - ecg_band) < 0.01


@pytest.mark.parametrize(
    "contract",
    [
        InputContract(bandpass=(0.67, 40.0)),
        InputContract(baseline="median"),
        InputContract(bandpass=(0.5, 40.0), bandpass_design="fir", bandpass_order=1501),
    ],
    ids=["butterworth", "median-baseline", "fir"],
)
def test_drift_removed_by_high_pass_or_baseline(contract: InputContract) -> None:
    drift = _tone(0.1, amplitude=2.0) + 1.0  # respiration-like wander on a DC offset
    beats = _tone(8.0, amplitude=0.5)
    out = apply_contract_array((drift + beats)[None], 500, ("II",), contract, source="t").windows[0, 0]
    assert _interior_rms(out - beats) < 0.1 * _interior_rms(drift)


def test_dc_passes_without_filters() -> None:
    data = np.full((1, 3000), 0.75)
    out = apply_contract_array(data, 500, ("I",), InputContract(fs=250), source="t").windows
    np.testing.assert_allclose(out, 0.75, atol=1e-6)
    out = apply_contract_array(data, 500, ("I",), InputContract(), source="t").windows
    assert np.all(out == np.float32(0.75))


def test_filters_run_at_the_higher_rate() -> None:
    """Decimating: filter at the source rate, then resample (HuBERT-ECG's order); upsampling: the reverse."""
    data = np.stack([_tone(45.0) + _tone(5.0), _tone(0.2) + _tone(20.0)])
    contract = InputContract(fs=100, bandpass=(0.5, 30.0), bandpass_design="fir", bandpass_order=151)
    out = apply_contract_array(data, 500, ("I", "II"), contract, source="t").windows[0]
    taps_500 = signal.firwin(151, [0.5, 30.0], pass_zero=False, fs=500)
    expected = signal.resample_poly(
        signal.filtfilt(taps_500, [1.0], data, axis=-1), 1, 5, axis=-1, padtype="line"
    )
    np.testing.assert_allclose(out, expected, atol=1e-5)
    taps_100 = signal.firwin(151, [0.5, 30.0], pass_zero=False, fs=100)
    other_order = signal.filtfilt(
        taps_100, [1.0], signal.resample_poly(data, 1, 5, axis=-1, padtype="line"), axis=-1
    )
    assert np.abs(out - other_order).max() > 0.01

    slow = data[:, ::5]  # a 100 Hz record for a 500 Hz model: resample first, then filter at 500 Hz
    up = apply_contract_array(
        slow, 100, ("I", "II"), dataclasses.replace(contract, fs=500), source="t"
    ).windows[0]
    expected_up = signal.filtfilt(
        taps_500, [1.0], signal.resample_poly(slow, 5, 1, axis=-1, padtype="line"), axis=-1
    )
    np.testing.assert_allclose(up, expected_up, atol=1e-5)


def test_notch_at_or_above_nyquist_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"notch=50 is invalid.*Nyquist"):
        InputContract(fs=100, notch=50)
    with pytest.raises(ValueError, match=r"bandpass.*Nyquist"):
        InputContract(fs=100, bandpass=(0.5, 60))
    # Without a target rate the filters run at the record's own rate: the record is refused, by name.
    record = synthetic(leads=("I",), fs=100, seconds=5)
    with pytest.raises(RecordError, match=r"/data/synthetic\.hea: notch at 60.0 Hz is at/above the Nyquist"):
        apply_contract(record, InputContract(notch=60))
    # Upsampling a 100 Hz record to a 500 Hz model: the 60 Hz notch runs at 500 Hz and is fine.
    assert apply_contract(record, InputContract(fs=500, notch=60)).windows.shape == (1, 1, 2500)


def test_record_too_short_for_filter() -> None:
    record = synthetic(leads=("I",), seconds=0.5)
    with pytest.raises(RecordError, match="too short for the FIR band-pass filter"):
        apply_contract(record, InputContract(bandpass=(0.5, 40), bandpass_design="fir", bandpass_order=501))


# ---------------------------------------------------------------------------------------- determinism, batch


def test_deterministic(ptbxl_dir: Path) -> None:
    record = read_ptbxl(ptbxl_dir, 6)
    for contract in FM_CONTRACTS.values():
        first, second = apply_contract(record, contract), apply_contract(record, contract)
        assert first.windows.tobytes() == second.windows.tobytes()


@pytest.mark.parametrize("name", ["hubert_ecg", "ecgfounder", "ecg_fm", "ecg_jepa"])
def test_batch_equals_per_record(ptbxl_dir: Path, name: str) -> None:
    records = [read_ptbxl(ptbxl_dir, ecg_id) for ecg_id in (7, 8, 9)]
    contract = FM_CONTRACTS[name]
    batch = apply_contract_array(
        np.stack([r.signal for r in records]), 500, records[0].leads, contract, source="batch"
    )
    assert batch.windows.shape == (3, *EXPECTED_SHAPES[name])
    for index, record in enumerate(records):
        single = apply_contract(record, contract)
        np.testing.assert_array_equal(batch.windows[index], single.windows)  # bit-identical
        np.testing.assert_array_equal(batch.lead_mask, single.lead_mask)


# ---------------------------------------------------------------------------------------------------- errors


def test_nan_and_inf_raise_naming_the_record(ptbxl_dir: Path) -> None:
    record = read_ptbxl(ptbxl_dir, 10)
    record.signal[7, 100] = np.nan
    with pytest.raises(RecordError) as caught:
        apply_contract(record, FM_CONTRACTS["ecg_fm"])
    assert caught.value.path == record.metadata["path"]
    assert "NaN" in str(caught.value) and "V2 (1)" in str(caught.value) and "\n" not in str(caught.value)
    record.signal[7, 100] = np.inf
    with pytest.raises(RecordError, match="inf"):
        apply_contract(record, InputContract())
    batch = np.zeros((2, 1, 10))
    batch[1, 0, 3] = np.nan
    with pytest.raises(RecordError, match=r"batch-x: .*NaN values in batch items \[1\]"):
        apply_contract_array(batch, 500, ("I",), InputContract(), source="batch-x")


def test_empty_record_raises() -> None:
    record = ECGRecord(np.zeros((2, 0)), 500, ("I", "II"), "empty", metadata={"path": "/x/empty.hea"})
    with pytest.raises(RecordError, match=r"/x/empty\.hea: record has 0 samples"):
        apply_contract(record, InputContract())


def test_bad_array_shapes_raise() -> None:
    with pytest.raises(RecordError, match="got shape"):
        apply_contract_array(np.zeros(10), 500, ("I",), InputContract(), source="s")
    with pytest.raises(RecordError, match="2 signal rows but 1 lead names"):
        apply_contract_array(np.zeros((2, 10)), 500, ("I",), InputContract(), source="s")


# -------------------------------------------------------------------------------------------------- contract


def test_from_dict_rejects_unknown_keys_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"unknown input-contract keys \['sampling_rate'\]"):
        InputContract.from_dict({"fs": 500, "sampling_rate": 500})
    for contract in FM_CONTRACTS.values():
        assert InputContract.from_dict(contract.to_dict()) == contract


def test_invalid_values_rejected() -> None:
    with pytest.raises(ValueError, match="scaling='zscore'"):
        InputContract(scaling="zscore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length=0"):
        InputContract(length=0)
    with pytest.raises(ValueError, match="bandpass"):
        InputContract(bandpass=(40, 0.5))
    with pytest.raises(ValueError, match="leads"):
        InputContract(leads=("I", "I"))


def test_contract_normalises_equal_spellings() -> None:
    a = InputContract.from_dict({"fs": 500, "leads": ["i", "AVL"], "bandpass": [1, 40], "notch": 50})
    b = InputContract(fs=500.0, leads=("I", "aVL"), bandpass=(1.0, 40.0), notch=50.0)
    assert a == b and a.digest() == b.digest()


def test_digest_changes_when_any_field_changes() -> None:
    base = InputContract(fs=500, leads=STANDARD_12_LEADS, length=2500, bandpass=(0.5, 40), notch=50)
    changed = {
        "fs": 250,
        "leads": JEPA_LEADS,
        "length": 2000,
        "long_records": "segments",
        "max_segments": 3,
        "aggregation": "max",
        "short_records": "refuse",
        "missing_leads": "refuse",
        "min_leads": 2,
        "required_leads": ("II",),
        "bandpass": (0.67, 40),
        "bandpass_design": "fir",
        "bandpass_order": 5,
        "notch": 60,
        "notch_q": 20.0,
        "baseline": "median",
        "baseline_window_s": 0.2,
        "scaling": "zscore_lead",
        "zero_constant_leads": True,
        "layout": "concat_leads",
    }
    assert set(changed) == {
        f.name for f in dataclasses.fields(InputContract)
    }  # a new field needs a case here
    digests = {base.digest()}
    for name, value in changed.items():
        variant = dataclasses.replace(base, **{name: value})
        assert variant.digest() != base.digest(), name
        digests.add(variant.digest())
    assert len(digests) == len(changed) + 1
