"""Agent formats: how a ReAct turn is written, and the line patterns that find its parts in a raw transcript.

An `AgentFormat` says how a ReAct turn is written (docs/architecture.md, "Agent format"):

    <reason_prefix>{thought}<reason_end><ack><act_prefix>{action}<act_end><observation>

Templates may use `{i}` (the turn number, from 1) and `{observation}`; they are filled by plain replacement
(`fmt.fill`), so other braces are literal, except that `{name}` for any other name is refused as a typo.

A format is a YAML file of these fields; the built-in ones (hotpotqa, alfworld, webshop) are the files of the
same name in raysad/formats/. A trajectory records the format it was played in (`format_record`), so it
trains without the file (`trajectory_format`).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysad.config import ConfigError, read_config_file
from raysad.trajectory import Trajectory

_TEMPLATES = ("reason_prefix", "reason_end", "ack", "act_prefix", "act_end", "observation")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
FORMATS_DIR = Path(__file__).parent / "formats"
# the built-in formats are data like any user's format: name -> its YAML file
BUILTIN_FORMATS: dict[str, Path] = {name: FORMATS_DIR / f"{name}.yaml"
                                    for name in ("hotpotqa", "alfworld", "webshop")}


class FormatError(ValueError):
    """A bad agent format (built-in name unknown, or a YAML file with a missing/bad field)."""


@dataclass
class AgentFormat:
    """How turns are written, and the line patterns that find reason/act/obs lines in a raw transcript.

    line_patterns: ordered (kind, regex) pairs; the first regex that matches at the start of a line wins.
    For reason/act, a named group `body` marks the span (the rest of the line is `obs` scaffolding); without
    it the whole line is the span. Lines matching no pattern are `prompt` before the first reason/act line,
    `obs` after it (and counted in segment_text's stats unless blank).
    """
    name: str
    reason_prefix: str
    reason_end: str
    ack: str
    act_prefix: str
    act_end: str
    observation: str
    line_patterns: list[tuple[str, str]]
    _compiled: list[tuple[str, re.Pattern]] = field(init=False, default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"format {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise FormatError(f"{where}: field 'name': expected a non-empty string")
        for name in _TEMPLATES:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise FormatError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
            for placeholder in _PLACEHOLDER.findall(value):
                if placeholder not in ("i", "observation"):
                    raise FormatError(f"{where}: field '{name}': unknown placeholder {{{placeholder}}} "
                                      f"(templates may use {{i}} and {{observation}})")
        for name in ("reason_end", "act_end"):
            if not getattr(self, name):
                raise FormatError(f"{where}: field '{name}': must not be empty (it is the stop string)")
        if "{observation}" not in self.observation:
            raise FormatError(f"{where}: field 'observation': must contain {{observation}}")
        self._compiled = []
        for j, pair in enumerate(self.line_patterns):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise FormatError(f"{where}: field 'line_patterns[{j}]': expected [kind, regex], got {pair!r}")
            kind, regex = pair
            if kind not in ("reason", "act", "obs"):
                raise FormatError(f"{where}: field 'line_patterns[{j}].kind': expected reason, act or obs, "
                                  f"got {kind!r}")
            try:
                self._compiled.append((kind, re.compile(regex)))
            except (re.error, TypeError) as err:
                raise FormatError(f"{where}: field 'line_patterns[{j}].regex': invalid regex {regex!r}: "
                                  f"{err}") from None
        self.line_patterns = [tuple(p) for p in self.line_patterns]
        if not any(k == "act" for k, _ in self.line_patterns):
            raise FormatError(f"{where}: field 'line_patterns': needs at least one act pattern")

    def fill(self, template: str, i: int, observation: str = "") -> str:
        """A template with {i} and {observation} filled in (plain replacement, other braces stay)."""
        return template.replace("{i}", str(i)).replace("{observation}", observation)

    @property
    def reason_stop(self) -> list[str]:
        """Stop strings for the thought phase (the delimiter belongs to the reason segment)."""
        return [self.reason_end]

    @property
    def act_stop(self) -> list[str]:
        """Stop strings for the action phase (the delimiter belongs to the act segment)."""
        return [self.act_end]

def get_format(name_or_path: str | Path | AgentFormat) -> AgentFormat:
    """A built-in format by name (hotpotqa, alfworld, webshop), a YAML file, or an AgentFormat (returned as is).

    YAML keys: name (default: the file's stem), reason_prefix, reason_end, ack (default ""), act_prefix,
    act_end, observation, line_patterns (a list of [kind, regex] pairs or {kind:, regex:} maps).
    See raysad/formats/example_reasoning_action.yaml.
    """
    if isinstance(name_or_path, AgentFormat):
        return name_or_path
    key = str(name_or_path)
    if key.lower() in BUILTIN_FORMATS:
        return AgentFormat(**_builtin_fields(key.lower()))
    path = Path(key)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise FormatError(f"unknown agent format {key!r}; built-in: {', '.join(BUILTIN_FORMATS)}, "
                          "or a path to a .yaml format file")
    data = _format_fields(path)
    try:
        return AgentFormat(**data)
    except FormatError as err:  # say the file rather than the format's name
        prefix = f"format {data['name']!r}: "
        raise FormatError(f"{path}: {str(err).removeprefix(prefix)}") from None


@functools.cache
def _builtin_fields(name: str) -> dict[str, Any]:
    # read once per process: get_format is called per trajectory (AgentFormat copies what it is given)
    return _format_fields(BUILTIN_FORMATS[name])


def _format_fields(path: Path) -> dict[str, Any]:
    """The fields of a format YAML file: all there, none unknown, line_patterns as (kind, regex) pairs (their
    values are AgentFormat's to check)."""
    if not path.is_file():
        raise FormatError(f"{path}: format file not found")
    try:
        data = read_config_file(path)
    except ConfigError as err:  # not YAML, or not a mapping: the same message, as a format error
        raise FormatError(str(err)) from None
    known = ("name", *_TEMPLATES, "line_patterns")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise FormatError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    data.setdefault("name", path.stem)
    data.setdefault("ack", "")
    for name in known:
        if name not in data:
            raise FormatError(f"{path}: field '{name}': missing")
    patterns = data["line_patterns"]
    if not isinstance(patterns, list):
        raise FormatError(f"{path}: field 'line_patterns': expected a list of [kind, regex], "
                          f"got {type(patterns).__name__}")
    pairs = []
    for j, p in enumerate(patterns):
        if isinstance(p, dict):
            if set(p) != {"kind", "regex"}:
                raise FormatError(f"{path}: field 'line_patterns[{j}]': expected keys kind and regex, got {sorted(p)}")
            p = (p["kind"], p["regex"])
        pairs.append(p)
    data["line_patterns"] = pairs
    return data


def format_record(fmt: AgentFormat) -> str | dict[str, Any]:
    """What a trajectory records of the format it was played in (`agent_format`): a built-in's name, else the
    whole format (so a run can read it back without the YAML file it came from)."""
    if fmt.name in BUILTIN_FORMATS and get_format(fmt.name) == fmt:
        return fmt.name
    return {"name": fmt.name, **{k: getattr(fmt, k) for k in _TEMPLATES},
            "line_patterns": [list(pair) for pair in fmt.line_patterns]}


_RECORDED: dict[str, AgentFormat] = {}


def trajectory_format(traj: Trajectory) -> AgentFormat:
    """The agent format a trajectory was played in: the one it records (`agent_format`, written by rollout),
    else (files from before it was recorded) the built-in format of its env's name."""
    recorded = traj.extra.get("agent_format")
    if recorded is None:
        name = traj.env
        if name.lower() not in BUILTIN_FORMATS:  # an alias of a built-in env (the envs package is optional here)
            try:
                import raysad_envs

                name = raysad_envs.canonical(traj.env)
            except (ImportError, ValueError):
                pass
        if name.lower() not in BUILTIN_FORMATS:
            raise FormatError(f"trajectory {traj.id!r} (env {traj.env!r}) records no agent_format and {traj.env!r} "
                              f"has no built-in format ({', '.join(BUILTIN_FORMATS)}): roll it out again with "
                              "this raysad, or add the field (a built-in name or the format's fields)")
        return get_format(name)
    key = recorded if isinstance(recorded, str) else json.dumps(recorded, sort_keys=True)
    if key not in _RECORDED:
        if isinstance(recorded, dict):
            try:
                pairs = [tuple(p) for p in recorded.get("line_patterns", [])]
                _RECORDED[key] = AgentFormat(**{**recorded, "line_patterns": pairs})
            except TypeError as err:
                raise FormatError(f"trajectory {traj.id!r}: field 'agent_format': {err}") from None
        else:
            _RECORDED[key] = get_format(recorded)
    return _RECORDED[key]


def resolve_format(fmt: str | Path | AgentFormat | None, traj: Trajectory | None = None) -> AgentFormat:
    """`fmt` (see get_format), or, when None, the format `traj` was played in (trajectory_format)."""
    if fmt is None:
        if traj is None:
            raise FormatError("no agent format given")
        return trajectory_format(traj)
    return get_format(fmt)
