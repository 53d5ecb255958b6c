"""Packaging shim: pyproject.toml holds the metadata; this only maps the top-level data folders into the package.

`adapters/` (expert adapter specs) and `hub_cards/` (model-card templates) live at the repository top level, where
contributors expect them, and ship inside the wheel as the packages `enecg.adapters` and `enecg.hub_cards` so an
installed enecg finds them with `importlib.resources`.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["enecg", "enecg.*"]), "enecg.adapters", "enecg.hub_cards"],
    package_dir={"enecg.adapters": "adapters", "enecg.hub_cards": "hub_cards"},
    package_data={"enecg.adapters": ["*.yaml", "*.yml", "*.json"], "enecg.hub_cards": ["*.md", "*.jinja"]},
)
