"""Typed configuration: dataclasses <-> mappings / YAML files, with ``--a.b=c`` command-line overrides.

One engine for every configuration of the package: training recipes (:mod:`enecg.training.recipe`), the saved
``config.json`` of an ensemble (:mod:`enecg.ensemble.config`), in-house expert configs, pretraining and generative
recipes. A configuration is a dataclass whose fields carry ``metadata={"help": ...}``; :func:`decode` builds it from
a mapping, recursing into nested dataclasses and lists of them, and :class:`ConfigMixin` gives a dataclass
``from_dict`` / ``to_dict``. Every problem is a :class:`ConfigError` naming where the mapping came from (a file, the
command line, a saved model) and the dotted key:

* an unknown key, in the file or on the command line (never silently ignored);
* a value of the wrong type (``epochs: true``, ``dir: [1, 2]``): checked against the annotation, with only lossless
  coercions (an integral float to ``int``, a number or YAML 1.1's ``3e-4`` string to ``float``, a list to a tuple);
* a missing required key, a value outside a ``Literal``; and whatever the dataclass's ``__post_init__`` refuses.

Why this engine and not a config library (tried on the recipe schema, draccus 0.11 and transformers'
``HfArgumentParser``): ``HfArgumentParser`` has no nested dataclasses, and a recipe is sections of them.
``draccus.decode`` reads every bundled recipe into exactly the same dataclasses, but it coerces wrong types silently
(``output.dir: [1, 2]`` becomes the path ``'[1, 2]'``, ``optim.epochs: true`` becomes 1), reports a null required
value as "Couldn't instantiate class OptimSection", and its command line cannot set a list item
(``--experts.0.revision=...``). ``tests/test_config.py`` and ``tests/test_recipe.py`` pin those cases, so a switch
shows up as failures.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

COMMAND_LINE = "command line"
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names its source (file, command line) and the key."""


class ConfigMixin:
    """``from_dict`` / ``to_dict`` for a configuration dataclass, through :func:`decode`.

    Subclasses set ``config_name`` (how errors name a mapping that comes without a source)."""

    config_name: typing.ClassVar[str] = "config"

    @classmethod
    def from_dict(cls: type[T], data: Any, source: str | None = None) -> T:
        """Build from a mapping; errors name ``source`` (default: the class's ``config_name``) and the key.

        :func:`load_config` goes through this method, so a subclass that must upgrade an older layout first (a
        renamed key, a format version) overrides it and ends with :func:`decode`."""
        return decode(cls, data, source or cls.config_name)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of what JSON and ``yaml.safe_dump`` write (tuples as lists);
        ``from_dict(to_dict())`` gives an equal config."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ reading


def decode(schema: type[T], data: Any, source: str = "config", where: str = "") -> T:
    """Build the dataclass ``schema`` from the mapping ``data`` (see the module docstring for the checks).

    ``source`` names where the mapping came from, ``where`` the dotted key of ``data`` inside it ("" at the top)."""
    label = where or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {label}: expected a mapping, got {_describe(data)}")
    hints = _hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'"
            f"{f' (and {unknown[1:]})' if len(unknown) > 1 else ''}; known keys of {label}: {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key {key!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], key, source)
    try:
        return schema(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: {label}: {exc}") from None


def read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a YAML (or JSON) file; an empty file is ``{}``. Errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a configuration file must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_config(path: str | os.PathLike, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read a YAML file into the dataclass ``schema``, after applying ``--key=value`` overrides (through the
    schema's ``from_dict`` when it is a :class:`ConfigMixin`, so its upgrades of older layouts apply)."""
    data = apply_overrides(read_mapping(path), overrides, schema)
    if isinstance(schema, type) and issubclass(schema, ConfigMixin):
        return schema.from_dict(data, str(path))  # type: ignore[return-value]
    return decode(schema, data, source=str(path))


# ------------------------------------------------------------------------------------- command-line overrides


def parse_overrides(arguments: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["--optim.lr=3e-4", "--model.gate.top_k", "1"]`` -> ``[("optim.lr", 3e-4), ("model.gate.top_k", 1)]``.

    Values are YAML (``null``, ``true``, ``[a, b]``, ``{k: v}``); ``--flag`` alone means ``true``."""
    return [(key, _yaml_value(raw)) for key, raw in _split_overrides(arguments)]


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _split_overrides(arguments: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """``--key=value`` / ``--key value`` / ``--flag`` arguments -> ``(key, raw text)`` pairs."""
    parsed: list[tuple[str, str]] = []
    items = list(arguments)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) <= 2:
            raise ConfigError(f"{COMMAND_LINE}: expected --key=value, got {item!r}")
        key, sep, raw = item[2:].partition("=")
        if not sep:
            if i + 1 < len(items) and not items[i + 1].startswith("--"):
                raw = items[i + 1]
                i += 1
            else:
                raw = "true"
        parsed.append((key.replace("-", "_"), raw))
        i += 1
    return parsed


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], schema: type
) -> dict[str, Any]:
    """A copy of ``data`` with dotted-key overrides set (``experts.0.revision`` indexes a list); a key that
    ``schema`` does not have is an error naming the flag.

    Values are YAML, except that a string key (``str`` or ``str | None``) takes a number or boolean as the text
    written (``--name=2024``, ``--tag=1.0``): a shell argument is text, only YAML would make it something else."""
    data = copy.deepcopy(data)
    for key, raw in _split_overrides(overrides):
        value = _yaml_value(raw)
        if _strip_optional(_check_override_path(key, schema)) is str and isinstance(value, (bool, int, float)):
            value = raw
        _set_dotted(data, key.split("."), value, key)
    return data


def _check_override_path(key: str, schema: type) -> Any:
    """Walk ``key`` through the ``schema`` dataclasses and return the annotated type it reaches; raise for a
    key no dataclass has."""
    tp: Any = schema
    walked: list[str] = []
    for part in key.split("."):
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)  # type: ignore[arg-type]
            # The keys are the init fields, as in decode (not a ClassVar such as ConfigMixin's config_name).
            names = sorted(f.name for f in dataclasses.fields(tp) if f.init)  # type: ignore[arg-type]
            if part not in names:
                where = ".".join(walked) or "the top level"
                raise ConfigError(
                    f"{COMMAND_LINE}: unknown key {key!r} ({part!r} is not a key of {where}; known: {names})"
                )
            tp = hints[part]
        elif typing.get_origin(tp) is list:
            if not part.isdigit():
                raise ConfigError(
                    f"{COMMAND_LINE}: {key!r}: {'.'.join(walked)} is a list, index it by number"
                )
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict or tp is Any:
            tp = Any
        else:
            raise ConfigError(f"{COMMAND_LINE}: {key!r}: {'.'.join(walked)} is a value, it has no keys")
        walked.append(part)
    return tp


def _set_dotted(data: Any, parts: list[str], value: Any, key: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(data, list):
        index = int(head)
        if index >= len(data):
            raise ConfigError(f"{COMMAND_LINE}: {key!r}: index {index} out of range (list of {len(data)})")
        if rest:
            _set_dotted(data[index], rest, value, key)
        else:
            data[index] = value
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{COMMAND_LINE}: {key!r}: cannot set a key inside a {type(data).__name__}")
    if rest:
        if data.get(head) is None:
            data[head] = {}
        _set_dotted(data[head], rest, value, key)
    else:
        data[head] = value


# --------------------------------------------------------------------------------------- typed conversion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """``value`` checked against (and losslessly coerced to) the annotated type ``tp``."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: {key}: must not be null")
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {_describe(value)}")
    if value is None:
        raise ConfigError(f"{source}: {key}: must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return decode(tp, value, source, key)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        (item,) = args or (Any,)
        return [_convert(item, v, f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}.{i}", source) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{source}: {key}: expected {len(args)} values, got {_describe(value)}")
        if args:
            return tuple(_convert(a, v, f"{key}.{i}", source) for i, (a, v) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key}: expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string: accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key}: expected a string, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + "/".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------------- help


def config_help(schema: type, skip: tuple[str, ...] = ()) -> str:
    """Every key of ``schema`` with its type, default and help text, nested sections as dotted keys."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in skip or not f.init:
                continue
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            inner = _strip_optional(tp)
            if typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
                lines.append(f"{key}: list of:  {f.metadata.get('help', '')}")
                walk(typing.get_args(inner)[0], f"{key}.N.")
                continue
            if dataclasses.is_dataclass(inner):
                lines.append(f"{key}:  {f.metadata.get('help', '')}")
                walk(inner, f"{key}.")  # type: ignore[arg-type]
                continue
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:
                default = f" = {f.default_factory()!r}"
            else:
                default = " (required)"
            lines.append(f"{key} ({_type_name(tp)}){default}:  {f.metadata.get('help', '')}")

    walk(schema, "")
    return "\n".join(lines)
