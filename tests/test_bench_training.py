"""Smoke test of ``bench/bench_training.py --quick``: every section runs end to end at tiny sizes and the JSON
has the documented schema with sane values (no timing is asserted: the numbers of a quick run mean nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_training.py"


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_the_schema(ptbxl_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    command = [
        sys.executable,
        str(BENCH),
        "--quick",
        f"--data-dir={ptbxl_dir.parent}",
        f"--out={out}",
        "--threads=1",
        # The smallest slice of each section that still exercises its whole path: random-weight foundation
        # experts through the trainer with and without the cache, fresh-subprocess peak memory of the two modes a
        # ratio needs, and one fold x seed of the ensemble-quality protocol for the default and the joint strategy.
        "--cache-sets=foundation",
        "--memory-sets=light",
        "--memory-modes=ensemble,full_finetune",
        "--folds=0",
        "--seeds=0",
        "--variants=staged,staged_finetune,joint",
        f"--work-dir={tmp_path / 'work'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp"))  # written atomically

    assert document["schema_version"] == 1 and document["benchmark"] == "training"
    assert document["machine"]["cpu_count"] >= 1 and document["settings"]["quick"] is True

    cache = document["feature_cache"]["foundation"]
    for mode in ("cached", "recomputed"):
        assert len(cache[mode]["epoch_s"]) == cache["epochs"] == 1
        assert cache[mode]["global_step"] >= 1
    assert cache["cached"]["feature_cache_build_s"] > 0 and cache["recomputed"]["feature_cache_build_s"] == 0
    assert len(cache["cached"]["feature_table_s"]) == 3  # train, validation, test embedded once each
    assert _positive(cache["ratio_epoch"])

    memory = document["memory"]["light"]
    assert set(memory["modes"]) == {"ensemble", "full_finetune"}
    for result in memory["modes"].values():
        assert "error" not in result, result
        assert result["peak_rss_mb"] >= result["rss_after_model_mb"] > 0
    full, ensemble = memory["modes"]["full_finetune"], memory["modes"]["ensemble"]
    assert full["trainable_in_this_mode"] > ensemble["trainable_in_this_mode"]
    assert _positive(memory["ratio_full_finetune_to_ensemble"]["peak_rss"])

    params = document["trainable_parameters"]["light"]
    assert (
        0 < params["trainable"] < params["total"]
        and params["fraction"] == params["trainable"] / params["total"]
    )
    assert set(params["experts"]) == {"simplenet", "attianet", "parallelcnn_demographics"}
    assert params["full_finetune_trainable"] == full["trainable_in_this_mode"]

    ensemble = document["ensemble"]
    assert ensemble["folds"] == [0] and ensemble["seeds"] == [0]
    assert {r["variant"] for r in ensemble["runs"]} == {"staged", "staged_finetune", "joint"}
    for run in ensemble["runs"]:
        assert {"ensemble", "uniform average", "best single expert (validation)", "stacker (out-of-fold probes)"} <= set(
            run["rows"]
        )
        for task in ("superclass", "sex", "age"):
            assert set(run["paired"][task]) == {
                "uniform average",
                "best single expert (validation)",
                "stacker (out-of-fold probes)",
            }
            assert run["gate"]["record_sd"][task] >= 0
    staged = next(r for r in ensemble["runs"] if r["variant"] == "staged")
    assert staged["strategy"]["final_phase"] == "gate"
    summary = ensemble["summary"]["staged"]["tasks"]["superclass"]
    assert summary["rows"]["ensemble"]["n"] == 1 and "best single expert (validation)" in summary["paired"]
    targets = ensemble["targets"]
    assert targets["variant"] == "staged_finetune"
    assert targets["superclass_vs_best_single_plus_0.01"]["ensemble_minus_best_single"]["n"] == 1
    assert (tmp_path / "training.png").is_file()  # the figure next to the JSON
