"""Recipes: YAML + dotted command-line overrides into typed dataclasses; unknown keys and bad types are errors
naming the key and the file; the shipped recipes parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from enecg.cli import build_parser
from enecg.ensemble.config import GateSettings, HeadSettings
from enecg.training.data import plan_runs
from enecg.training.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe_dict,
    recipe_help,
)
from enecg.utils.config import COMMAND_LINE, parse_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FM_HUB_IDS = {
    "Edoardo-BS/hubert-ecg-small",
    "PKUDigitalHealth/ECGFounder",
    "wanglab/ecg-fm",
    "AutonLab/MOMENT-1-small",
}

MINIMAL = """\
data:
  path: data/ptbxl
experts:
  - name: a
    source: experts/a
  - name: b
    source: org/model-b
    revision: main
tasks:
  - name: superclass
  - name: age
    regression_loss: huber
model:
  gate:
    input: signal
    top_k: 1
optim:
  lr: 3e-4          # YAML 1.1 reads this as a string: accepted as a number
  epochs: 3
output:
  dir: runs/x
"""


@pytest.fixture()
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL)
    return path


def test_yaml_parses_into_typed_sections(recipe_file: Path) -> None:
    recipe = load_recipe(recipe_file)
    assert isinstance(recipe, Recipe)
    assert recipe.optim.lr == pytest.approx(3e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.optim.epochs == 3
    assert [e.name for e in recipe.experts] == ["a", "b"]
    assert recipe.experts[1].revision == "main"
    assert recipe.tasks[1].regression_loss == "huber"
    # The ensemble's own dataclasses, with their defaults for keys the file does not set.
    assert isinstance(recipe.model.gate, GateSettings) and recipe.model.gate.top_k == 1
    assert isinstance(recipe.model.heads, HeadSettings) and recipe.model.heads.hidden_sizes == [256, 256]
    assert recipe.output.resume == "auto"
    assert recipe.tracking.log_with == ["tensorboard"]
    # Round trip through a plain mapping.
    assert parse_recipe_dict(recipe.to_dict()) == recipe


def test_overrides_set_dotted_keys_with_yaml_values(recipe_file: Path) -> None:
    recipe = load_recipe(
        recipe_file,
        [
            "--optim.lr=1e-2",
            "--optim.max_steps",
            "7",
            "--model.gate.top_k=null",
            "--model.heads.hidden_sizes=[64, 32]",
            "--experts.1.revision=abc123",
            "--model.lora.on_heads=false",
            "--tracking.log_with=[]",
            "--data.max-records=20",  # dashes work like underscores
        ],
    )
    assert recipe.optim.lr == pytest.approx(1e-2)
    assert recipe.optim.max_steps == 7
    assert recipe.model.gate.top_k is None
    assert recipe.model.heads.hidden_sizes == [64, 32]
    assert recipe.experts[1].revision == "abc123"
    assert recipe.model.lora.on_heads is False
    assert recipe.tracking.log_with == []
    assert recipe.data.max_records == 20


def test_parse_overrides_forms() -> None:
    assert parse_overrides(["--a.b=1", "--c", "x y", "--flag"]) == [("a.b", 1), ("c", "x y"), ("flag", True)]
    with pytest.raises(RecipeError, match="expected --key=value"):
        parse_overrides(["optim.lr=1"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("  epochs: 3", "  epochs: 3\n  learning_rate: 0.1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and "unknown key 'optim.learning_rate'" in message
    assert "\n" not in message


def test_unknown_nested_and_top_level_keys(tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text(MINIMAL.replace("    top_k: 1", "    top_k: 1\n    topk: 2"))
    with pytest.raises(RecipeError, match=r"'model\.gate\.topk'"):
        load_recipe(nested)
    top = tmp_path / "top.yaml"
    top.write_text(MINIMAL + "optimizer:\n  lr: 1\n")
    with pytest.raises(RecipeError, match="unknown key 'optimizer'"):
        load_recipe(top)
    in_list = tmp_path / "list.yaml"
    in_list.write_text(MINIMAL.replace("    revision: main", "    revison: main"))
    with pytest.raises(RecipeError, match=r"'experts\.1\.revison'"):
        load_recipe(in_list)


def test_unknown_override_names_the_command_line(recipe_file: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["--optim.lrr=1"])
    assert COMMAND_LINE in str(info.value) and "optim.lrr" in str(info.value)
    with pytest.raises(RecipeError, match=r"model\.gate\.bogus"):
        load_recipe(recipe_file, ["--model.gate.bogus=1"])
    with pytest.raises(RecipeError, match="is a value"):
        load_recipe(recipe_file, ["--optim.lr.x=1"])
    with pytest.raises(RecipeError, match="out of range"):
        load_recipe(recipe_file, ["--experts.5.revision=x"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("--optim.lr=fast", r"optim\.lr: expected a number, got 'fast'"),
        ("--optim.epochs=2.5", r"optim\.epochs: expected an integer"),
        ("--optim.epochs=[1]", r"optim\.epochs: expected an integer"),
        ("--model.lora.on_heads=maybe", r"model\.lora\.on_heads: expected true or false"),
        ("--output.dir=null", r"output\.dir: must not be null"),
        ("--data.feature_cache=sometimes", r"data\.feature_cache: must be one of"),
        ("--model.heads.hidden_sizes=12", r"model\.heads\.hidden_sizes: expected a list"),
        ("--optim.epochs=0", r"optim\.epochs must be >= 1"),  # the section's own validation
        # Cases a permissive decoder (draccus) accepts silently: a list as a path, a boolean as a count.
        ("--output.dir=[1, 2]", r"output\.dir: expected a string"),
        ("--optim.epochs=true", r"optim\.epochs: expected an integer"),
        ("--optim.lr=null", r"optim\.lr: must not be null"),
    ],
)
def test_type_and_value_errors(recipe_file: Path, override: str, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern) as info:
        load_recipe(recipe_file, [override])
    assert str(recipe_file) in str(info.value)


def test_missing_required_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {path: x}\nexperts: [{name: a, source: b}]\ntasks: [{name: t}]\n")
    with pytest.raises(RecipeError, match=r"missing required key 'output'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"absent\.yaml: file not found"):
        load_recipe(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(listing)


def test_duplicate_names_and_hub_push_checks(recipe_file: Path) -> None:
    with pytest.raises(RecipeError, match="duplicate expert names"):
        load_recipe(recipe_file, ["--experts.1.name=a"])
    with pytest.raises(RecipeError, match=r"hub\.push needs hub\.repo_id"):
        load_recipe(recipe_file, ["--hub.push=true"])
    with pytest.raises(RecipeError, match="single hold-out run"):
        load_recipe(recipe_file, ["--hub.push=true", "--hub.repo_id=o/n", "--optim.repeats=2"])


def test_run_plans_never_train_on_the_test_fold(recipe_file: Path) -> None:
    holdout = plan_runs(load_recipe(recipe_file, ["--optim.repeats=2"]))
    assert [(r.name, r.seed) for r in holdout] == [("repeat_0", 42), ("repeat_1", 43)]
    kfold = plan_runs(load_recipe(recipe_file, ["--data.kfold=5"]))
    assert [r.test_part for r in kfold] == [f"fold_{i}" for i in range(5)]
    for run in kfold:
        assert run.test_part not in run.train_parts and run.validation_part not in run.train_parts
        assert run.test_part != run.validation_part
        assert len(run.train_parts) == 3
    assert len({r.seed for r in kfold}) == 5  # each fold re-initialised from its own seed
    with pytest.raises(RecipeError, match="kfold must be >= 3"):
        load_recipe(recipe_file, ["--data.kfold=2"])


def test_help_lists_every_section_with_help_text() -> None:
    text = recipe_help()
    for key in (
        "data.path",
        "optim.lr",
        "model.gate.top_k",
        "model.lora.r",
        "experts.N.source",
        "output.resume",
        "tracking.log_with",
        "hub.repo_id",
        "data.feature_cache",
    ):
        assert key in text
    assert "Peak learning rate" in text


def test_shipped_recipes_parse() -> None:
    light = load_recipe(RECIPES / "ptbxl_light_ensemble.yaml")
    assert len(light.experts) >= 2 and all(e.create is not None for e in light.experts)
    assert [t.name for t in light.tasks] == ["superclass", "sex", "age"]
    fm = load_recipe(RECIPES / "ptbxl_foundation_models.yaml")
    assert {e.source for e in fm.experts} == FM_HUB_IDS
    assert all(e.create is None for e in fm.experts)
    assert fm.data.rate == 500


def test_shipped_accelerate_configs_are_yaml() -> None:
    import yaml

    configs = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
    names = {c.stem for c in configs}
    assert {"cpu_single", "cpu_ddp_gloo", "multi_gpu", "cpu_bf16"} <= names
    for config in configs:
        data = yaml.safe_load(config.read_text())
        assert data["num_processes"] >= 1 and "distributed_type" in data


def test_cli_registers_train_with_overrides() -> None:
    args = build_parser().parse_args(["train", "r.yaml", "--optim.lr=1", "--model.gate.top_k", "2"])
    assert args.recipe == "r.yaml" and args.overrides == ["--optim.lr=1", "--model.gate.top_k", "2"]
