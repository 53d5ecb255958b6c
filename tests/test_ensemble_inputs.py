"""One batch of records prepared for every expert's contract and the gate's, from the same records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from enecg.contract import InputContract, apply_contract
from enecg.data.rows import row_to_record
from enecg.ensemble.inputs import EnsembleInputBuilder
from enecg.io import read_record
from enecg.record import demographics_array


def test_builder_applies_each_contract_to_the_same_records(ptbxl_dir: Path) -> None:
    records = [read_record(ptbxl_dir / "records500" / "00000" / f"0000{i}_hr") for i in (1, 2, 3)]
    records[1].metadata.update(age=63.0, sex=1.0)
    segments = InputContract(fs=500.0, length=2500, long_records="segments", scaling="zscore_lead")
    hubert_like = InputContract(fs=100.0, length=500, layout="concat_leads", scaling="minmax_lead")
    gate = InputContract(fs=100.0, leads=("II",), length=1000, scaling="zscore_lead")
    batch = EnsembleInputBuilder({"a": segments, "b": hubert_like}, gate)(records)
    assert batch.expert_inputs["a"].shape == (3, 2, 12, 2500)
    assert batch.expert_inputs["b"].shape == (3, 1, 6000)
    assert batch.window_masks["a"].all()
    assert batch.gate_input is not None and batch.gate_input.shape == (3, 1, 1000)
    assert batch.record_ids == [r.record_id for r in records]
    # Row i of every input comes from record i (no shuffling between experts).
    for i, record in enumerate(records):
        np.testing.assert_array_equal(batch.expert_inputs["a"][i].numpy(), apply_contract(record, segments).windows)
    assert batch.demographics[1].tolist() == [63.0, 1.0]


def test_variable_length_records_get_window_masks() -> None:
    from enecg.record import ECGRecord

    rng = np.random.default_rng(0)
    short = ECGRecord(rng.normal(size=(12, 5000)), 500.0, ("I", "II", "III", "aVR", "aVL", "aVF",
                                                          "V1", "V2", "V3", "V4", "V5", "V6"), "short")
    long = ECGRecord(rng.normal(size=(12, 10000)), 500.0, short.leads, "long")
    contract = InputContract(fs=500.0, length=2500, long_records="segments")
    batch = EnsembleInputBuilder({"e": contract})([short, long])
    assert batch.expert_inputs["e"].shape == (2, 4, 12, 2500)
    assert batch.window_masks["e"].tolist() == [[True, True, False, False], [True, True, True, True]]


def test_rows_round_trip() -> None:
    row = {"signal": [[0.0, 1.0], [2.0, 3.0]], "fs": 100.0, "leads": ["I", "avl"], "record_id": "x",
           "patient_id": "p", "age": None, "sex": 1.0, "source": "s", "split": "train"}
    record = row_to_record(row)
    assert record.leads == ("I", "aVL") and record.signal.dtype == np.float32
    demo = demographics_array([record])
    assert np.isnan(demo[0, 0]) and demo[0, 1] == 1.0
    with pytest.raises(ValueError):
        EnsembleInputBuilder({})([])
