"""Smoke test of ``bench/bench_experts.py``: the ``--quick`` mode (tiny configs of every family, one repeat) runs
end to end and writes the documented JSON schema. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

BENCH_PATH = REPO_ROOT / "bench" / "bench_experts.py"

TIMING_KEYS = {"median_s", "p10_s", "p90_s", "repeats", "warmup_s"}
MODEL_KEYS = TIMING_KEYS | {
    "family",
    "config_source",
    "params",
    "input_shape",
    "output_shape",
    "flops",
    "achieved_gflops",
    "ratio_to_matmul",
    "official",
    "official_reason",
}
OFFICIAL_KEYS = TIMING_KEYS | {"implementation", "scope", "compared", "max_abs_diff", "flops", "ratio"}


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_experts", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def quick_result(bench, tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("bench") / "experts.json"
    import torch

    threads = torch.get_num_threads()
    # One thread: the quick run only checks the pipeline, and on a loaded 2-core machine spinning OpenMP threads
    # make tiny kernels 100x slower.
    returned = bench.main(["--quick", "--bf16", "--threads", "1", "--out", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the caller's thread count
    return returned, json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_run_writes_schema(bench, quick_result):
    returned, written = quick_result
    assert written == json.loads(json.dumps(returned))  # the file is what main() returned
    machine = written["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] == 1
    assert machine["device"] == "cpu" and machine["torch"]
    for key in ("matmul_reference", "matmul_reference_bf16"):
        reference = written[key]
        assert _positive(reference["gflops"]) and reference["n"] > 0
        assert [run["when"] for run in reference["runs"]] == ["start", "end"]
    # Every default (non-large) case ran: a family that fails to build would appear under "skipped".
    expected = {case.name for case in bench.CASES if not case.large}
    assert written["skipped"] == {}
    assert set(written["models"]) == expected


def test_quick_run_model_entries(bench, quick_result):
    _, written = quick_result
    matmul = written["matmul_reference"]["gflops"]
    cases = {case.name: case for case in bench.CASES}
    for name, entry in written["models"].items():
        assert MODEL_KEYS <= set(entry), (name, MODEL_KEYS - set(entry))
        assert entry["input_shape"] == [1, *cases[name].input_shape]
        assert entry["output_shape"][0] == 1 and len(entry["output_shape"]) == 2
        assert _positive(entry["flops"]) and _positive(entry["params"])
        assert entry["p10_s"] <= entry["median_s"] <= entry["p90_s"]
        assert entry["achieved_gflops"] == pytest.approx(entry["flops"] / entry["median_s"] / 1e9)
        assert entry["ratio_to_matmul"] == pytest.approx(entry["achieved_gflops"] / matmul)
        assert _positive(entry["bf16_autocast"]["median_s"])
        if cases[name].official is None:
            assert entry["official"] is None and entry["official_reason"]
        elif cases[name].official_optional and entry["official"] is None:
            # An official package with conflicting pins (mantis-tsfm) may be absent: said, not silently skipped.
            assert "not importable here" in entry["official_reason"]
        else:
            official = entry["official"]
            assert official is not None, entry["official_reason"]
            assert OFFICIAL_KEYS <= set(official)
            assert official["ratio"] == pytest.approx(entry["median_s"] / official["median_s"])
            # Same weights, same input: the official implementation must reproduce the native output.
            assert official["max_abs_diff"] < 1e-4


def test_flop_count_includes_cpu_attention(bench):
    """The CPU SDPA kernel is missing from torch's FLOP registry: without the extra formula attention is 0."""
    import torch
    from torch.nn import functional as F

    q = torch.randn(2, 3, 16, 8)
    flops, _ = bench.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 16 * 16 * 8)  # QK^T and PV, 2 FLOPs per multiply-add


def test_model_selection(bench):
    names = [case.name for case in bench.select_cases("hubert_ecg,light-simplenet", include_large=False)]
    assert names == ["hubert-ecg-small", "hubert-ecg-base", "light-simplenet"]
    assert "moment-1-large" in [c.name for c in bench.select_cases("moment", include_large=True)]
    assert "moment-1-large" in [c.name for c in bench.select_cases("moment-1-large", include_large=False)]
    with pytest.raises(SystemExit, match="unknown"):
        bench.select_cases("hubert", include_large=False)


def test_full_size_configs_come_from_the_manifests(bench):
    from conftest import parity_dir

    root = parity_dir()
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root}")
    for case in bench.CASES:
        config, source, params = bench.load_config(case, root, quick=False)
        assert config
        if case.manifest is not None:
            assert Path(source) == root / case.manifest and params > 0
