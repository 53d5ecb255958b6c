"""The one configuration engine (``enecg.utils.config``): strict typed decoding of nested dataclasses, lossless
coercions only, errors naming the source and the dotted key, ``--a.b=c`` overrides, and ``ConfigMixin`` round trips
for the classes that use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from enecg.ensemble.config import EnsembleConfig, ExpertRef, GateSettings, TaskConfig
from enecg.experts.families.light import LightCNNConfig
from enecg.utils.config import ConfigError, ConfigMixin, config_help, decode, load_config


@dataclass
class Inner:
    rate: float = field(default=1.0, metadata={"help": "A rate."})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "A mode."})


@dataclass
class Outer(ConfigMixin):
    config_name: ClassVar[str] = "outer"

    name: str = field(metadata={"help": "Required name."})
    steps: int = field(default=1, metadata={"help": "Steps."})
    band: tuple[float, float] = field(default=(0.5, 40.0), metadata={"help": "Corners."})
    inner: Inner = field(default_factory=Inner, metadata={"help": "Nested section."})
    items: list[Inner] = field(default_factory=list, metadata={"help": "A list of sections."})
    note: str | None = field(default=None, metadata={"help": "Optional text."})

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_decode_nested_lists_and_lossless_coercions() -> None:
    config = Outer.from_dict(
        {"name": "x", "steps": 3.0, "band": [1, 2], "inner": {"rate": "3e-4"}, "items": [{"mode": "b"}]}
    )
    assert config == Outer(
        name="x", steps=3, band=(1.0, 2.0), inner=Inner(rate=3e-4), items=[Inner(mode="b")]
    )
    assert isinstance(config.band, tuple) and isinstance(config.band[0], float)
    assert Outer.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "stepz": 1}, "outer: unknown key 'stepz'; known keys of the top level"),
        ({"name": "x", "inner": {"rat": 1}}, "unknown key 'inner.rat'; known keys of inner"),
        ({"name": "x", "items": [{}, {"mode": "c"}]}, r"items\.1\.mode: must be one of \['a', 'b'\]"),
        ({"name": "x", "steps": True}, "steps: expected an integer, got True"),
        ({"name": "x", "steps": 1.5}, "steps: expected an integer"),
        ({"name": ["a"]}, "name: expected a string"),
        ({"name": "x", "band": [1, 2, 3]}, "band: expected 2 values"),
        ({"name": "x", "note": 3}, "note: expected str or null"),
        ({}, "missing required key 'name'"),
        ({"name": "x", "steps": -1}, "outer: the top level: steps must be >= 0"),
        ([1, 2], "outer: the top level: expected a mapping"),
    ],
)
def test_decode_errors_name_source_and_key(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Outer.from_dict(data)


def test_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nitems: [{mode: a}, {mode: a}]\n")
    config = load_config(path, Outer, ["--items.1.mode=b", "--inner.rate", "2", "--steps=4"])
    assert config.items[1].mode == "b" and config.inner.rate == 2.0 and config.steps == 4
    with pytest.raises(ConfigError, match=r"command line: unknown key 'inner\.speed'"):
        load_config(path, Outer, ["--inner.speed=1"])
    with pytest.raises(ConfigError, match=r"c\.yaml: items\.0\.mode: must be one of"):
        load_config(path, Outer, ["--items.0.mode=z"])
    with pytest.raises(ConfigError, match="index 5 out of range"):
        load_config(path, Outer, ["--items.5.mode=a"])
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a configuration file must be a mapping"):
        load_config(tmp_path / "list.yaml", Outer)


def test_help_lists_every_key_with_its_help() -> None:
    text = config_help(Outer)
    for line in (
        "name (str) (required):  Required name.",
        "inner.rate (float) = 1.0:  A rate.",
        "items.N.mode",
    ):
        assert line in text


def test_package_configs_use_the_engine() -> None:
    """The ensemble's saved config and the light experts' config decode through the same engine: same checks,
    same messages, round trips exact."""
    for cls in (EnsembleConfig, ExpertRef, TaskConfig, GateSettings, LightCNNConfig):
        assert issubclass(cls, ConfigMixin), cls
    light = LightCNNConfig.from_dict({"architecture": "SimpleNet", "width_multiplier": 1})
    assert isinstance(light.width_multiplier, float) and LightCNNConfig.from_dict(light.to_dict()) == light
    with pytest.raises(ConfigError, match="light config: unknown key 'widht'"):
        LightCNNConfig.from_dict({"widht": 1})
    with pytest.raises(ConfigError, match="light config: in_leads: expected an integer"):
        LightCNNConfig.from_dict({"in_leads": "12"})
    assert decode(GateSettings, {"input": "global"}, "gate").input == "global"


COMPAT = Path(__file__).resolve().parent / "fixtures" / "compat_09966f4"


def test_files_written_by_main_at_09966f4_still_load() -> None:
    """``tests/fixtures/compat_09966f4``: an ensemble ``config.json`` and a light expert's config written by the code
    of main at 09966f4 (before the engine moved), and that commit's recipes, verbatim. Keys added since take their
    defaults; nothing is dropped or renamed."""
    import json

    from enecg.cli.pretrain import resolve_config
    from enecg.cli.seeds import load_seed_recipe
    from enecg.training.recipe import load_recipe

    ensemble = EnsembleConfig.load(COMPAT / "ensemble_config.json")
    assert [e.name for e in ensemble.experts] == ["hubert", "simplenet"]
    assert ensemble.experts[0].lora_target_modules == ["q_proj", "v_proj"]
    assert [t.type for t in ensemble.tasks] == ["multilabel", "binary", "regression"]
    assert ensemble.tasks[2].target_std == 15.0 and ensemble.gate.input == "embeddings" and ensemble.gate.top_k == 1
    assert ensemble.gate.routing_penalty == GateSettings().routing_penalty  # added after 09966f4: its default
    assert EnsembleConfig.from_dict(ensemble.to_dict()) == ensemble
    light = LightCNNConfig.from_dict(json.loads((COMPAT / "light_config.json").read_text()))
    assert light.architecture == "AttiaNet" and light.width_multiplier == 0.5 and light.use_demographics
    for name in ("quickstart.yaml", "ptbxl_light_ensemble.yaml", "ptbxl_foundation_models.yaml"):
        recipe = load_recipe(COMPAT / name)
        assert recipe.experts and recipe.tasks, name
    assert resolve_config(COMPAT / "pretrain_ssl.yaml", {}).epochs > 0
    assert load_seed_recipe("efficiency", str(COMPAT / "efficiency_benchmark.yaml"), []) is not None
