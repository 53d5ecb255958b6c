"""The wheel ships the data folders an installed enecg needs: adapter specs, card templates, recipes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_adapters_cards_and_recipes(tmp_path: Path) -> None:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment (needed to build the wheel offline)")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("enecg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("adapters", "enecg/adapters"), ("hub_cards", "enecg/hub_cards"),
                            ("recipes", "enecg/recipes")):
        for path in (REPO / folder).glob("*"):
            if path.suffix in (".yaml", ".md"):
                assert f"{package}/{path.name}" in names, path
    assert "enecg/recipes/accelerate_configs/cpu_ddp_gloo.yaml" in names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)


def test_installed_package_finds_its_resources() -> None:
    import importlib.resources

    from enecg.cli.quickstart import DEFAULT_RECIPE
    from enecg.experts.spec import bundled_specs

    assert len(bundled_specs()) >= 10
    assert (importlib.resources.files("enecg.hub_cards") / "ensemble.md").is_file()
    assert Path(DEFAULT_RECIPE).is_file()
