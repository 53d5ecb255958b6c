"""Reading weight files: safetensors, weights_only pickles (numpy numbers allowed, objects refused), strict keys."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from enecg.experts.weights import WeightsError, load_state_dict_strict, read_weights


class _Evil:
    def __reduce__(self):  # pickling this object would run a shell command on load
        return (os.system, ("echo pwned > /tmp/enecg-pwned",))


def test_fairseq_style_checkpoint_with_numpy_scalars_loads(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra_state": {"loss": np.float64(0.5), "step": np.int64(3),
                                                               "arr": np.arange(3, dtype=np.float32)}}, path)
    data = read_weights(path)
    assert torch.equal(data["model"]["w"], torch.ones(2))
    assert float(data["extra_state"]["loss"]) == 0.5 and int(data["extra_state"]["step"]) == 3


def test_arbitrary_objects_are_refused_and_not_executed(tmp_path: Path) -> None:
    marker = Path("/tmp/enecg-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": {"w": torch.ones(1)}, "payload": _Evil()}, fh)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused to unpickle"):
        read_weights(path)
    assert not marker.exists()
    obj_array = tmp_path / "objects.pt"
    torch.save({"x": np.array([{"a": 1}], dtype=object)}, obj_array)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        read_weights(obj_array)


def test_safetensors_and_bad_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3)}, tmp_path / "m.safetensors")
    assert read_weights(tmp_path / "m.safetensors")["w"].shape == (3,)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"broken\.safetensors: not a readable safetensors"):
        read_weights(tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match=r"missing\.pt: weights file not found"):
        read_weights(tmp_path / "missing.pt")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(WeightsError, match="unknown weights format"):
        read_weights(tmp_path / "x.onnx")


def test_strict_loading_reports_keys() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    sd = model.state_dict()
    head = {"head.weight": torch.zeros(1)}
    report = load_state_dict_strict(model, {**sd, **head}, source="f.pt", expected_unexpected=["head.*"])
    assert report["dropped"] == ["head.weight"]
    with pytest.raises(WeightsError, match=r"f\.pt: .*1 unexpected key\(s\) \[head\.weight\]"):
        load_state_dict_strict(model, {**sd, **head}, source="f.pt")
    partial = {k: v for k, v in sd.items() if k != "1.bias"}
    with pytest.raises(WeightsError, match=r"1 missing key\(s\) \[1\.bias\]"):
        load_state_dict_strict(model, partial, source="f.pt")
    bad = {**sd, "0.weight": torch.zeros(3, 3)}
    with pytest.raises(WeightsError, match=r"shape mismatch.*0\.weight"):
        load_state_dict_strict(model, bad, source="f.pt")
