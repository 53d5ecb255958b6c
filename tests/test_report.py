"""The evaluation report: JSON + HTML with PNG figures, opened in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from enecg.evaluation.metrics import BootstrapConfig
from enecg.evaluation.plots import plot_calibration, plot_ecg_12lead, plot_gate_weights, plot_roc_pr
from enecg.evaluation.report import render_html, write_report
from enecg.evaluation.task_eval import evaluate_task
from enecg.leads import STANDARD_12_LEADS

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def _evaluation(out: Path) -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 3)).astype(float)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, (60, 3)), 0, 1)
    labels = ["NORM", "MI", "STTC"]
    boot = BootstrapConfig(n_resamples=30)
    diag = evaluate_task("multilabel", labels, y, p, val_true=y, val_pred=p, bootstrap=boot)
    age = evaluate_task("regression", [], rng.uniform(20, 80, 60), rng.uniform(20, 80, 60), bootstrap=boot)
    gate = {"diag": rng.dirichlet([1, 1], 60), "age": rng.dirichlet([1, 1], 60)}
    t = np.arange(1000) / 100
    signal = np.stack([np.sin(2 * np.pi * 1.2 * t) * (0.5 + 0.05 * k) for k in range(12)])
    plot_roc_pr(y, p, labels, "diag", out / "roc_diag.png")
    plot_calibration(y, p, "diag", out / "cal_diag.png")
    plot_gate_weights(gate, ["expert_a", "expert_b"], out / "gate.png")
    plot_ecg_12lead(signal, 100, STANDARD_12_LEADS, "example", out / "ecg_0.png")
    return {
        "title": "test report", "dataset": "synthetic", "split": "test", "n_records": 60,
        "tasks": {"diag": diag, "age": age},
        "experts": {"expert_a": {"diag": diag}},
        "gate": {"mean_weights": {"diag": {"expert_a": 0.4, "expert_b": 0.6}}},
        "examples": [{"record_id": "r0", "image": "ecg_0.png", "labels": {"diag": {"NORM": 1.0}},
                      "predictions": {"diag": {"NORM": 0.8, "MI": 0.1, "STTC": 0.2}},
                      "expert_predictions": {"diag": {"expert_a": {"NORM": 0.7}}},
                      "gate": {"diag": {"expert_a": 0.4, "expert_b": 0.6}}}],
        "figures": [{"path": "roc_diag.png", "caption": "ROC/PR", "section": "diag"},
                    {"path": "cal_diag.png", "caption": "calibration", "section": "diag"},
                    {"path": "gate.png", "caption": "gate weights", "section": "gate"}],
    }


def test_report_files_and_content(tmp_path: Path) -> None:
    evaluation = _evaluation(tmp_path)
    paths = write_report(evaluation, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["tasks"]["diag"]["metrics"]["macro"]["auroc"] == evaluation["tasks"]["diag"]["metrics"]["macro"]["auroc"]
    html = paths["html"].read_text()
    for needle in ("Task: diag", "macro AUROC", "MAE", "expert_a", "Example records", "not a diagnosis"):
        assert needle in html
    # Every referenced image exists next to the page.
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (tmp_path / src).is_file(), src


def test_report_escapes_html() -> None:
    html = render_html({"title": "<script>alert(1)</script>", "tasks": {}})
    assert "<script>alert(1)</script>" not in html


def test_report_renders_in_headless_browser(tmp_path: Path) -> None:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium found (apt-get install chromium-headless-shell)")
    paths = write_report(_evaluation(tmp_path), tmp_path)
    n_images = len(re.findall(r"<img ", paths["html"].read_text()))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
           "--virtual-time-budget=10000", "--dump-dom", paths["html"].as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    rendered = re.search(r'data-images-rendered="(\d+)"', dom)
    assert total and rendered, "the page's load script did not run"
    assert int(total.group(1)) == n_images >= 4
    assert int(rendered.group(1)) == n_images  # every PNG decoded with a non-zero size
    shot = tmp_path / "screenshot.png"
    subprocess.run([*cmd[:-2], f"--screenshot={shot}", "--window-size=1280,2400", paths["html"].as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
