"""Packaging shim: pyproject.toml holds the metadata; this only maps the top-level data folders into the package.

`adapters/` (expert adapter specs), `hub_cards/` (model-card templates) and `recipes/` (training recipes) live at
the repository top level, where contributors expect them, and ship inside the wheel as the packages
`enecg.adapters`, `enecg.hub_cards` and `enecg.recipes` so an installed enecg finds them with `importlib.resources`.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["enecg", "enecg.*"]),
        "enecg.adapters",
        "enecg.hub_cards",
        "enecg.recipes",
        "enecg.recipes.accelerate_configs",
    ],
    package_dir={
        "enecg.adapters": "adapters",
        "enecg.hub_cards": "hub_cards",
        "enecg.recipes": "recipes",
        "enecg.recipes.accelerate_configs": "recipes/accelerate_configs",
    },
    package_data={
        "enecg.adapters": ["*.yaml", "*.yml", "*.json", "*.md"],
        "enecg.hub_cards": ["*.md", "*.jinja"],
        "enecg.recipes": ["*.yaml", "*.md"],
        "enecg.recipes.accelerate_configs": ["*.yaml"],
    },
)
