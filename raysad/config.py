"""Typed stage configs: dataclasses filled from a YAML file and command-line flags, with clear errors.

Each pipeline stage keeps its own config dataclass next to its code (rollout.py has RolloutConfig, ...);
this module only knows how to fill one: defaults < YAML `--config` file < flags given on the command line.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the file and the field."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or value is None and (type(None) in args or annotation is None):
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if isinstance(value, str):  # from a flag: k=v,k=v
            value = _parse_mapping(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        if len(args) != 2:
            return dict(value)
        return {_coerce(k, args[0], f"{where}[{k!r}]"): _coerce(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        try:
            number = annotation(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    if annotation is Path:
        return Path(value)
    return value


def _parse_mapping(text: str, where: str) -> dict[str, Any]:
    """`k=v,k=v` as a dict; each value read as a YAML scalar (4096 -> int, true -> bool, else the text)."""
    mapping: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: expected key=value[,key=value...], got {text!r}")
        try:
            mapping[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            mapping[key.strip()] = value.strip()
    return mapping


def build_config(cls: type[C], yaml_path: str | Path | None = None, **overrides: Any) -> C:
    """Fill the dataclass `cls`: its defaults, then the YAML file, then `overrides` whose value is not None."""
    values: dict[str, Any] = {}
    source = "flags"
    if yaml_path is not None:
        source = str(yaml_path)
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{yaml_path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of field: value at the top level")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"known: {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{source}: field '{name}'") for name, value in values.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)} for {cls.__name__}")
    return cls(**kwargs)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass or nested dict as flat `a.b` keys, the form MLflow params take."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
