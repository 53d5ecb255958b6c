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


def test_string_keys_take_command_line_numbers_as_written(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    config = load_config(path, Outer, ["--name=2024", "--note", "1.50", "--steps=2"])
    assert config.name == "2024" and config.note == "1.50" and config.steps == 2
    assert load_config(path, Outer, ["--note=null"]).note is None
    with pytest.raises(ConfigError, match="name: expected a string"):
        load_config(path, Outer, ["--name=[1, 2]"])
    with pytest.raises(ConfigError, match="command line: unknown key 'config_name'"):  # a ClassVar is no key
        load_config(path, Outer, ["--config_name=x"])


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
    assert resolve_config(COMPAT / "pretrain_ssl.yaml").epochs > 0
    assert load_seed_recipe("efficiency", str(COMPAT / "efficiency_benchmark.yaml"), []) is not None


# ------------------------------------------------------- pretraining and generative configs (same engine)

REPO = Path(__file__).resolve().parents[1]
COMPAT_0CFB972 = Path(__file__).resolve().parent / "fixtures" / "compat_0cfb972"
_GENERATIVE = {"data": "d", "task": "superclass", "output_dir": "o"}


def _diffusion_config() -> dict:
    import json

    return json.loads((COMPAT_0CFB972 / "diffusion" / "config.json").read_text())


def test_pretraining_and_generative_configs_use_the_engine() -> None:
    from enecg.generative import DiffusionSpec, GenerativeConfig
    from enecg.pretraining import AugmentConfig, PretrainConfig

    for cls in (PretrainConfig, AugmentConfig, GenerativeConfig, DiffusionSpec):
        assert issubclass(cls, ConfigMixin), cls
    config = PretrainConfig.from_dict({"data": "d", "bandpass": [1, 40], "augmentation": {"noise_p": 1}})
    assert config.bandpass == (1.0, 40.0) and config.augmentation.noise_p == 1.0
    assert PretrainConfig.from_dict(config.to_dict()) == config
    assert PretrainConfig.from_dict({"data": "d", "splits": "train"}).splits == ("train",)  # accepted before
    generative = GenerativeConfig.from_dict({**_GENERATIVE, "leads": ["I", "II"], "block_out_channels": [8, 16]})
    assert generative.leads == ("I", "II") and generative.block_out_channels == (8, 16)
    assert GenerativeConfig.from_dict(generative.to_dict()) == generative
    assert "config_name" not in config.to_dict() and "config_name" not in config_help(PretrainConfig)


@pytest.mark.parametrize(
    ("schema", "data", "message"),
    [
        ("PretrainConfig", {"data": "d", "lerning_rate": 1}, "pretraining config: unknown key 'lerning_rate'"),
        ("PretrainConfig", {"data": "d", "augmentation": {"nois": 1}},
         r"pretraining config: unknown key 'augmentation\.nois'; known keys of augmentation"),
        ("PretrainConfig", {"data": "d", "epochs": "ten"}, "pretraining config: epochs: expected an integer"),
        ("PretrainConfig", {"data": "d", "bandpass": [1]},
         r"pretraining config: bandpass: expected tuple or null, got \[1\]"),
        ("PretrainConfig", {"data": "d", "augmentation": {"noise_p": True}},
         r"augmentation\.noise_p: expected a number, got True"),
        ("PretrainConfig", {"data": "d", "mixed_precision": False}, "mixed_precision: expected a string"),
        ("PretrainConfig", {}, "pretraining config: missing required key 'data'"),
        ("PretrainConfig", {"data": "d", "objective": "simclr"}, "the top level: .*objective 'simclr'"),
        ("AugmentConfig", {"noise_p": 2.0}, "augmentation: the top level: .*noise_p must be a probability"),
        ("GenerativeConfig", {**_GENERATIVE, "max_step": 1}, "generative config: unknown key 'max_step'"),
        ("GenerativeConfig", {**_GENERATIVE, "leads": ["I", 2]}, "generative config: leads: expected tuple or null"),
        ("GenerativeConfig", {**_GENERATIVE, "parts": "train"}, "parts: expected a list"),
        ("GenerativeConfig", {**_GENERATIVE, "max_steps": 1.5}, "max_steps: expected an integer"),
        ("GenerativeConfig", {**_GENERATIVE, "parts": ["test"]},
         "generative config: the top level: parts .*trains on training parts only"),
        ("GenerativeConfig", {"data": "d", "task": "t"}, "missing required key 'output_dir'"),
    ],
)
def test_pretraining_and_generative_errors_name_source_and_key(schema, data, message) -> None:
    import enecg.generative as generative
    import enecg.pretraining as pretraining

    cls = getattr(pretraining, schema, None) or getattr(generative, schema)
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(data)


def test_saved_diffusion_config_errors_name_the_file(tmp_path: Path) -> None:
    import json

    from enecg.generative import DiffusionSpec, load_diffusion

    saved = _diffusion_config()
    assert DiffusionSpec.from_dict(saved).to_dict() == saved
    with pytest.raises(ConfigError, match=r"config\.json: not an enecg ECG diffusion model"):
        DiffusionSpec.from_dict({k: v for k, v in saved.items() if k != "model_type"}, "config.json")
    with pytest.raises(ConfigError, match="diffusion config: length: expected an integer"):
        DiffusionSpec.from_dict({**saved, "length": "256"})
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**saved, "unet": {}}))
    with pytest.raises(ConfigError, match=rf"{folder / 'config.json'}: unknown key 'unet'"):
        load_diffusion(folder)


def test_pretrain_and_generate_train_command_lines_override_the_recipe(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``enecg pretrain`` / ``enecg generate train``: YAML file + ``--a.b=c`` overrides through the engine (the
    per-field flags of earlier versions are the same overrides), ``--dry-run`` prints the resolved config."""
    import yaml

    from enecg.cli import main

    pretrain_recipe = str(REPO / "recipes" / "pretrain_ssl.yaml")
    args = ["pretrain", "--config", pretrain_recipe, "--data=/records", "--max_records", "16",
            "--augmentation.noise_p=1", "--bandpass=[0.5, 40]", "--name=2024", "--splits=train", "--dry-run"]
    assert main(args) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"] == "/records" and resolved["max_records"] == 16 and resolved["splits"] == ["train"]
    assert resolved["augmentation"]["noise_p"] == 1.0 and resolved["bandpass"] == [0.5, 40.0]
    assert resolved["name"] == "2024"  # a string key takes the text as written
    assert main(["pretrain", "--dry-run", "--data=/records", "--epochs=3"]) == 0  # no recipe: command line only
    assert yaml.safe_load(capsys.readouterr().out)["epochs"] == 3
    for bad, message in (
        (["--config", pretrain_recipe, "--epochs=ten"], "pretrain_ssl.yaml: epochs: expected an integer"),
        (["--config", pretrain_recipe, "--augmentation.nois=1"], "command line: unknown key 'augmentation.nois'"),
        (["--dry"], "command line: unknown key 'dry'"),  # no abbreviation of --dry-run
        ([], "command line: missing required key 'data'"),
    ):
        assert main(["pretrain", *bad, "--dry-run"]) == 2, bad
        assert message in capsys.readouterr().err

    generate_recipe = str(REPO / "recipes" / "generate_ptbxl.yaml")
    assert main(["generate", "train", "--dry-run", generate_recipe, "--seed", "3", "--leads=[I, II]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 3 and resolved["leads"] == ["I", "II"] and resolved["task"] == "superclass"
    assert main(["generate", "train", generate_recipe, "--max_steps=many", "--dry-run"]) == 2
    assert "generate_ptbxl.yaml: max_steps: expected an integer" in capsys.readouterr().err
    assert main(["generate", "train", "--dry-run", "--seed=1"]) == 2
    assert "enecg generate train needs a recipe" in capsys.readouterr().err
    assert main(["generate", "train", "--help-config"]) == 0
    assert "ema_decay (float) = 0.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # other commands still refuse arguments they do not know
        main(["generate", "sample", "m", "--n", "1", "--out", "o", "--bogus=1"])
    assert "unrecognized arguments: --bogus=1" in capsys.readouterr().err


def test_pretrain_help_lists_the_config_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from enecg.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "augmentation.noise_p (float) = 0.5" in capsys.readouterr().out


def test_files_written_by_main_at_0cfb972_still_load() -> None:
    """``tests/fixtures/compat_0cfb972`` (``make_fixtures.py`` there): a pretrained expert's ``metrics.json``, a
    diffusion model folder and the pretrain / generate recipes, written by main at 0cfb972 (hand-written readers,
    before these configs moved to the engine). They load unchanged, and the configs write back the same mappings
    (the quickstart's reuse stamp compares ``PretrainConfig.to_dict()`` with the one it saved)."""
    import json

    from enecg.cli.pretrain import resolve_config
    from enecg.generative import GenerativeConfig, load_diffusion
    from enecg.pretraining import PretrainConfig

    saved = json.loads((COMPAT_0CFB972 / "pretrained_expert_metrics.json").read_text())["pretraining_config"]
    pretraining = PretrainConfig.from_dict(saved, "metrics.json")
    assert pretraining.bandpass == (0.5, 40.0) and pretraining.augmentation.noise_p == 1.0
    assert pretraining.seed == 7 and pretraining.leads[0] == "I" and pretraining.to_dict() == saved
    metrics = json.loads((COMPAT_0CFB972 / "diffusion" / "metrics.json").read_text())
    generative = GenerativeConfig.from_dict(metrics["generative_config"], "metrics.json")
    assert generative.leads == ("I", "II", "V1") and generative.block_out_channels == (8, 16)
    assert generative.to_dict() == metrics["generative_config"]
    model = load_diffusion(COMPAT_0CFB972 / "diffusion")
    assert model.spec.prediction_type == "v_prediction" and model.spec.to_dict() == _diffusion_config()
    assert model.sample(["MI"], 1, seed=0, steps=2).shape == (1, 3, 256)
    assert resolve_config(COMPAT_0CFB972 / "pretrain_ssl.yaml", ["--data=/records"]).epochs > 0
    assert GenerativeConfig.from_yaml(COMPAT_0CFB972 / "generate_ptbxl.yaml").task == "superclass"
