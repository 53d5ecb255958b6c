"""Smoke test of ``bench/bench_contract.py --quick``: tiny configs, batch 2, one repeat; checks the JSON schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_one_row_per_family(tmp_path: Path, ptbxl_dir: Path) -> None:
    out = tmp_path / "contract.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "bench_contract.py"),
            "--quick",
            "--data",
            str(ptbxl_dir),
            "--out",
            str(out),
        ],
        check=True,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["protocol"]["quick"] is True
    rows = report["results"]
    assert sorted(r["family"] for r in rows) == sorted(report["protocol"]["families"])
    for row in rows:
        assert row["forward_ms_per_record"] > 0 and row["threads"] == 1 and row["batch"] == 2
        assert set(row["per_rate"]) == {"500", "100"}
        for rate in row["per_rate"].values():
            assert rate["max_abs_diff"] <= report["protocol"]["tolerance"]
            assert (
                rate["ratio_fast_to_forward"]
                == rate["contract_fast_ms_per_record"] / row["forward_ms_per_record"]
            )
