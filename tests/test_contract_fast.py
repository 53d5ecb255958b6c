"""The fast contract kernels against the plain scipy reference (``implementation="reference"``).

Every bundled adapter contract, on real PTB-XL records at 500 and 100 Hz, batched and one record at a time,
must give the reference's windows within ``FAST_TOLERANCE`` and the same masks; short records must fail with
the same one-line errors; each fast kernel is also checked on its own against the scipy call it replaces.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, signal
from test_contract import FM_CONTRACTS, read_ptbxl, synthetic

from enecg.contract import (
    FAST_TOLERANCE,
    _fir_zero_phase_fft,
    _median_baseline_float32,
    apply_contract,
    apply_contract_records,
)
from enecg.experts.spec import bundled_spec
from enecg.record import RecordError

ADAPTERS = sorted(p.stem for p in (Path(__file__).parent.parent / "adapters").glob("*.yaml"))
ECG_IDS = (1, 2, 9, 17, 38)


@pytest.fixture(scope="module", params=[500, 100], ids=["500Hz", "100Hz"])
def ptbxl_records(request: pytest.FixtureRequest, ptbxl_dir: Path) -> list:
    return [read_ptbxl(ptbxl_dir, ecg_id, rate=request.param) for ecg_id in ECG_IDS]


def test_bundled_adapters_are_found() -> None:
    assert "ecgfounder-12lead" in ADAPTERS and "hubert-ecg-small" in ADAPTERS and len(ADAPTERS) >= 10


@pytest.mark.parametrize("name", ADAPTERS)
def test_fast_equals_reference_on_every_bundled_contract(name: str, ptbxl_records: list) -> None:
    contract = bundled_spec(name).contract
    fast = apply_contract_records(ptbxl_records, contract)
    reference = apply_contract_records(ptbxl_records, contract, implementation="reference")
    assert fast.windows.dtype == reference.windows.dtype == np.float32
    assert fast.windows.shape == reference.windows.shape
    np.testing.assert_array_equal(fast.window_mask, reference.window_mask)
    np.testing.assert_array_equal(fast.lead_mask, reference.lead_mask)
    np.testing.assert_array_equal(fast.valid_samples, reference.valid_samples)
    assert np.abs(fast.windows - reference.windows).max() <= FAST_TOLERANCE
    # The batch path and the per-record path of the fast implementation agree too.
    single = apply_contract(ptbxl_records[2], contract)
    assert np.abs(single.windows - fast.windows[2, : single.windows.shape[0]]).max() <= FAST_TOLERANCE


@pytest.mark.parametrize("name", sorted(FM_CONTRACTS))
def test_fast_equals_reference_with_missing_leads(name: str, ptbxl_dir: Path) -> None:
    """Zero-filled leads (record-level statistics over present leads only) and a record shorter than the
    contract length (padding after scaling)."""
    record = read_ptbxl(ptbxl_dir, 1)
    keep = [0, 1, 6, 7, 8]
    short = dataclasses.replace(
        record, signal=record.signal[keep, :2200], leads=tuple(record.leads[i] for i in keep)
    )
    contract = FM_CONTRACTS[name]
    fast = apply_contract(short, contract)
    reference = apply_contract(short, contract, implementation="reference")
    np.testing.assert_array_equal(fast.lead_mask, reference.lead_mask)
    np.testing.assert_array_equal(fast.valid_samples, reference.valid_samples)
    assert np.abs(fast.windows - reference.windows).max() <= FAST_TOLERANCE


def test_fir_zero_phase_fft_equals_filtfilt() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 1200)).cumsum(axis=-1)
    for taps in (signal.firwin(150, [0.05, 47], pass_zero=False, fs=500), signal.firwin(31, 10, fs=100)):
        for padlen in (len(taps) - 1, 3 * len(taps)):
            expected = signal.filtfilt(taps, [1.0], x, axis=-1, padlen=padlen)
            np.testing.assert_allclose(_fir_zero_phase_fft(taps, x, padlen), expected, rtol=0, atol=1e-10)


def test_float32_median_is_the_rounded_reference_median() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 900)) * 1e-3 + 0.5
    expected = np.stack(
        [ndimage.median_filter(row, size=101, mode="reflect") for row in x.reshape(-1, 900)]
    ).reshape(x.shape)
    np.testing.assert_array_equal(_median_baseline_float32(x, 101), expected.astype(np.float32))


@pytest.mark.parametrize(
    ("contract", "problem"),
    [
        (FM_CONTRACTS["hubert_ecg"], "too short for the FIR band-pass filter"),
        (FM_CONTRACTS["ecgfounder"], "too short for the notch filter"),
        (
            dataclasses.replace(FM_CONTRACTS["ecgfounder"], notch=None, bandpass=None),
            "shorter than the 301-sample baseline median window",
        ),
    ],
)
def test_errors_are_the_reference_errors(contract, problem: str) -> None:
    record = synthetic(seconds=0.016)  # 8 samples at 500 Hz
    messages = []
    for implementation in ("fast", "reference"):
        with pytest.raises(RecordError, match=problem) as caught:
            apply_contract(record, contract, implementation=implementation)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "synthetic.hea" in messages[0] and "\n" not in messages[0]


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match="implementation='numba'"):
        apply_contract(synthetic(), FM_CONTRACTS["moment"], implementation="numba")  # type: ignore[arg-type]
