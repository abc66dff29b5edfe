"""How a stage config is declared, filled and checked: defaults < YAML `--config` file < command-line flags.

The configs themselves are in raysad/configs.py, composed from shared parts. A field is declared with
`setting(default, help)`: its name, type, default and help live there once, and the CLI builds each command's
flags from them (raysad/cli.py). `Checked` runs every part's `check` when a config is built, so a bad value
fails on the driver in one line that names the field, before Ray starts or anything is written.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the file and the field."""


class MissingExtra(ImportError):
    """An optional dependency that a chosen setting needs (vLLM for --policy/--engine vllm) is not installed
    where it runs; the message says what to install."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            flag: str | None = None, shown: str | None = None) -> Any:
    """A config field with its command-line help. `help` "" keeps the field out of the CLI (YAML only);
    `flag` names a boolean's pair (`--prune-heads/--keep-heads`; default `--x/--no-x`); `shown` is the
    default as --help prints it, where the value itself says little (None = "the env's")."""
    metadata = {"help": help, "flag": flag, "shown": shown}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_of(part: type, name: str, default: Any, help: str | None = None, shown: str | None = None) -> Any:
    """Field `name` of a shared part with another default (help, shown default) in one stage: sft trains for
    3 epochs where distill trains for 1, evaluate plays the test split where rollout plays train."""
    meta = part.__dataclass_fields__[name].metadata  # the part's `shown` described its default, not this one
    return setting(default, meta["help"] if help is None else help, flag=meta["flag"], shown=shown)


class Checked:
    """Base of the config parts: building a config runs the `check` of each class it is made of (its parts
    first, then its own), each checking its own fields."""

    def __post_init__(self) -> None:
        for klass in reversed(type(self).__mro__):
            check = vars(klass).get("check")
            if check is not None:
                check(self)


def values_of(config: Any, *parts: type) -> dict[str, Any]:
    """The values of `config`'s fields that belong to `parts`: how one stage hands shared settings to the
    stage it runs (evaluate plays through rollout, sft trains through distill)."""
    names = [f.name for part in parts for f in dataclasses.fields(part)]
    return {name: getattr(config, name) for name in names}


def _bound(x: float) -> str:
    return f"{x:_}" if isinstance(x, int) and abs(x) >= 10_000 else f"{x:g}" if isinstance(x, float) else str(x)


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_inclusive: bool = True, high_inclusive: bool = True, optional: bool = False,
                why: str = "") -> None:
    """Raise a one-line ConfigError naming field `name` and its allowed range unless `value` lies in it.

    The stage configs call this from `__post_init__`, so a bad number fails on the driver, before Ray starts
    or anything is written. `optional`: None is allowed (the field's "default/auto" value). NaN and infinities
    are never in range. `why` (short) is appended to the message, e.g. what 0 means."""
    if value is None and optional:
        return
    if low is not None and high is not None:
        allowed = (f"{'[' if low_inclusive else '('}{_bound(low)}, {_bound(high)}{']' if high_inclusive else ')'}")
        allowed = f"in {allowed}"
    elif low is not None:
        allowed = f"{'>=' if low_inclusive else '>'} {_bound(low)}"
    elif high is not None:
        allowed = f"{'<=' if high_inclusive else '<'} {_bound(high)}"
    else:
        allowed = "a finite number"
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (isinstance(value, int) or math.isfinite(value)))
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ConfigError(f"field '{name}' must be {allowed}{' or unset' if optional else ''}, got {value!r}"
                          f"{f' ({why})' if why else ''}")


SEED_MAX = 2**40 - 1  # seeds: >= 0 (gymnasium refuses negative ones); derived seeds (distill's seed·1_000_003 +
#                      step, tune's chunk seeds seed·1000 + i) must still fit torch's 64 bits


def coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or value is None and (type(None) in args or annotation is None):
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
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
        return origin(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if isinstance(value, str):  # from a flag: k=v,k=v
            value = _parse_mapping(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        if len(args) != 2:
            return dict(value)
        return {coerce(k, args[0], f"{where}[{k!r}]"): coerce(v, args[1], f"{where}[{k!r}]")
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


def read_config_file(yaml_path: str | Path) -> dict[str, Any]:
    """The field: value mapping of a --config YAML file (dashes in names read as underscores)."""
    try:
        loaded = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{yaml_path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{yaml_path}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{yaml_path}: expected a mapping of field: value at the top level")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def build_config(cls: type[C], yaml_path: str | Path | None = None, **overrides: Any) -> C:
    """Fill the dataclass `cls`: its defaults, then the YAML file, then `overrides` whose value is not None."""
    values: dict[str, Any] = {}
    source = "flags"
    if yaml_path is not None:
        source = str(yaml_path)
        values.update(read_config_file(yaml_path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(_with_hints(unknown, cls, fields))} for "
                          f"{cls.__name__}; known: {', '.join(fields)}")
    kwargs = {name: coerce(value, hints[name], f"{source}: field '{name}'") for name, value in values.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)} for {cls.__name__}")
    return cls(**kwargs)


def _with_hints(unknown: list[str], cls: type, fields: dict[str, Any]) -> list[str]:
    """Each unknown name, with the field it was renamed to (a class's RENAMED) or the closest known name."""
    import difflib

    renamed = getattr(cls, "RENAMED", {})
    hinted = []
    for name in unknown:
        close = [renamed[name]] if name in renamed else difflib.get_close_matches(name, fields, n=1)
        hinted.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return hinted


REDACTED = "***"
# a key holds a secret when its words (split at . - _ and camelCase) contain one of these anywhere ...
_SECRET_WORDS = ("secret", "password", "passwd", "authorization", "api_key", "apikey")
# ... or end in `token` (hf_token, access_token; not max_new_tokens, tokenizer or reasoning_token_unit)
_SECRET_LAST_WORD = "token"


def is_secret_key(key: Any) -> bool:
    """Whether a config/param key names a secret: api_key, token, secret, password, authorization (any case,
    also inside names such as OPENAI_API_KEY, hf_token, client_secret, engine_args.api_key)."""
    if not isinstance(key, str):
        return False
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    words = re.sub(r"[^a-z0-9]+", "_", words).strip("_")
    return any(word in words for word in _SECRET_WORDS) or words.split("_")[-1] == _SECRET_LAST_WORD


def redact(value: Any) -> Any:
    """A copy of `value` (a dataclass, dict, list, or a flat `a.b` params dict) fit to be written anywhere:
    the value of every secret key (is_secret_key), at any depth, becomes "***". The running code keeps using
    the original; call this on what goes to MLflow, JSON files and logs."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and v not in (None, "") else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass or nested dict as flat `a.b` keys, the form MLflow params take (secrets redacted)."""
    data = redact(config) if dataclasses.is_dataclass(config) else redact(dict(config))
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------------- recorded settings ----
# A stage that resumes from its output (rollout, quickstart, tune) records the settings it started with next to
# it and refuses to continue with others; these two functions are that record, for all of them.

def changed_settings(path: str | Path, settings: dict[str, Any], ignore: tuple[str, ...] = (),
                     only_recorded: bool = False, renamed: dict[str, str] | None = None) -> list[str] | None:
    """`key: old -> new` for each setting that differs from those recorded in `path` (None: nothing recorded,
    or an unreadable record). Values compare as JSON reads them back (tuples are lists). `ignore`: keys that
    may change; `only_recorded`: compare only keys the record has (a record older than a new setting);
    `renamed`: old name -> new name of settings an older record holds under their old name."""
    import json

    path = Path(path)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    recorded = {(renamed or {}).get(k, k): v for k, v in recorded.items()}
    current = json.loads(json.dumps(settings, default=str))
    # what the record holds first (those are the real changes), then settings it has never seen
    keys = [k for k in sorted(recorded) if k not in ignore]
    keys += [] if only_recorded else [k for k in sorted(current) if k not in recorded and k not in ignore]
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys if recorded.get(k) != current.get(k)]


def record_settings(path: str | Path, settings: dict[str, Any]) -> None:
    """Write the settings record atomically (a kill leaves the old record or the new one, never half of one)."""
    write_json(path, settings)


def write_json(path: str | Path, record: Any) -> None:
    """A small JSON record (settings, a done marker, a pointer) written atomically: a kill leaves the old file or
    the new one, never half of one."""
    import json
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
