"""ALFWorld's text engine, one game at a time: TextWorld's PDDL environment wrapped in ALFWorld's AlfredDemangler.

This is what `alfworld.agents.environment.AlfredTWEnv` runs per game, without its gym batching (which starts
worker processes): `textworld.envs.PddlEnv` (fast-downward under the hood) + `AlfredDemangler`, so names,
observations and admissible commands are ALFWorld's own. `World` is a read-only snapshot of the true state
(demangled names) for the scripted expert.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
from textworld.envs.pddl import PddlEnv

try:  # PddlEnv needs fast-downward; `pip install textworld[pddl]` installs it
    import fast_downward
except ImportError:  # pragma: no cover - PddlEnv itself raises with install advice
    fast_downward = None

# fast-downward's PDDL translator keeps module-level options and rewrites sys.argv; serialise and undo that.
_TRANSLATE_LOCK = threading.Lock()


def _memoise_parsers() -> None:
    """TextWorld re-parses the same few grammar templates and queries with TatSu on every step (~30 parses of
    ~8 ms each, i.e. most of a step's time). The parse is a pure function of its text, so keep the results and
    hand out deep copies (callers mutate them): same output, several times faster steps."""
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    for module in (textgen, logic):
        original = module._parse_and_convert
        if getattr(original, "memoised", False):
            continue
        cache: dict = {}

        def parse(text, _original=original, _cache=cache, **kwargs):
            key = (text, tuple(sorted(kwargs.items())))
            if key not in _cache:
                if len(_cache) > 4096:
                    _cache.clear()
                _cache[key] = _original(text, **kwargs)
            return copy.deepcopy(_cache[key])

        parse.memoised = True
        module._parse_and_convert = parse


def _memoise_translation() -> None:
    """PddlEnv translates the game's PDDL to SAS (twice: plain and optimised for replanning) in load() and
    again in every reset(). The translation is a pure function of (domain, problem, options): keep the last
    few, so a load + reset translates once and a reset of the same game not at all."""
    if fast_downward is None or getattr(fast_downward.pddl2sas, "memoised", False):
        return
    cached = functools.lru_cache(maxsize=8)(fast_downward.pddl2sas)
    cached.memoised = True
    fast_downward.pddl2sas = cached


_memoise_parsers()
_memoise_translation()


class _Translating:
    def __enter__(self):
        _TRANSLATE_LOCK.acquire()
        self._argv = list(sys.argv)

    def __exit__(self, *exc):
        sys.argv[:] = self._argv
        _TRANSLATE_LOCK.release()


def _type_name(name: str) -> str:
    """'mugtype ' (a demangled otype/rtype constant) -> 'mug'."""
    name = name.strip()
    return name[: -len("type")] if name.endswith("type") else name


@dataclass
class World:
    """The true state of a game, with ALFWorld's demangled names ('mug 1', 'countertop 2')."""
    agent_location: str = ""
    holding: list[str] = field(default_factory=list)
    parent: dict[str, str] = field(default_factory=dict)                  # object -> receptacle holding it
    contents: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    location: dict[str, str] = field(default_factory=dict)                # receptacle -> location
    otype: dict[str, str] = field(default_factory=dict)                   # object -> class ('mug')
    rtype: dict[str, str] = field(default_factory=dict)                   # receptacle -> class ('countertop')
    can_contain: set[tuple[str, str]] = field(default_factory=set)        # (receptacle class, object class)
    openable: set[str] = field(default_factory=set)
    opened: set[str] = field(default_factory=set)
    pickupable: set[str] = field(default_factory=set)
    clean: set[str] = field(default_factory=set)
    hot: set[str] = field(default_factory=set)
    cool: set[str] = field(default_factory=set)
    toggled: set[str] = field(default_factory=set)

    @classmethod
    def from_facts(cls, facts) -> "World":
        w = cls()
        for fact in facts:
            args = [v.name.strip() for v in fact.arguments]
            name = fact.name
            if name == "atlocation":
                w.agent_location = args[1]
            elif name == "holds":
                w.holding.append(args[1])
            elif name == "inreceptacle":
                w.parent[args[0]] = args[1]
                w.contents[args[1]].append(args[0])
            elif name == "receptacleatlocation":
                w.location[args[0]] = args[1]
            elif name == "objecttype":
                w.otype[args[0]] = _type_name(args[1])
            elif name == "receptacletype":
                w.rtype[args[0]] = _type_name(args[1])
            elif name == "cancontain":
                w.can_contain.add((_type_name(args[0]), _type_name(args[1])))
            elif name in ("openable", "opened", "pickupable"):
                getattr(w, name).add(args[0])
            elif name in ("isclean", "ishot", "iscool", "istoggled"):
                {"isclean": w.clean, "ishot": w.hot, "iscool": w.cool, "istoggled": w.toggled}[name].add(args[0])
        for objs in w.contents.values():
            objs.sort(key=_natural)
        return w

    def receptacles_here(self) -> list[str]:
        return sorted((r for r, loc in self.location.items() if loc == self.agent_location), key=_natural)

    def receptacles(self) -> list[str]:
        return sorted(self.location, key=_natural)

    def is_closed(self, receptacle: str) -> bool:
        return receptacle in self.openable and receptacle not in self.opened


def _natural(name: str):
    """'cabinet 10' after 'cabinet 9'."""
    head, _, tail = name.rpartition(" ")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


# fast-downward's shared library cannot be unloaded safely (dlclose-ing two of PddlEnv's private copies
# crashes the interpreter at exit), so a closed engine's PddlEnv, library included, waits here for the next.
_IDLE: list[tuple[PddlEnv, AlfredDemangler]] = []
_IDLE_LOCK = threading.Lock()


def _new_pddl_env() -> tuple[PddlEnv, AlfredDemangler]:
    with _IDLE_LOCK:
        if _IDLE:
            return _IDLE.pop()
    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, command_templates=True)
    with _Translating():
        pddl = PddlEnv(infos)  # loads a private copy of fast-downward's shared library
    return pddl, AlfredDemangler(pddl, shuffle=False)


class Engine:
    """Plays one ALFWorld game file at a time. Not thread-safe; one per environment instance."""

    def __init__(self):
        self._pddl, self._env = _new_pddl_env()
        self._game_file: str | None = None
        self.state = None

    def start(self, game_file: str) -> str:
        """Load `game_file` (skipped when it is already loaded) and reset it; returns the intro text."""
        if self._pddl is None:
            raise RuntimeError("this ALFWorld engine is closed")
        with _Translating():
            if game_file != self._game_file:
                self._game_file = None
                with open(game_file) as f:  # PddlEnv.load(path) would leave the file open
                    self._env.load(json.load(f))
                self._game_file = game_file
            self.state = self._env.reset()
        return self.state.feedback

    def step(self, command: str) -> str:
        self.state, _, _ = self._env.step(command)
        return self.state.feedback

    @property
    def won(self) -> bool:
        return bool(self.state and self.state["won"])

    @property
    def admissible(self) -> list[str]:
        return list(self.state["admissible_commands"]) if self.state else []

    @property
    def put_template(self) -> str:
        """ALFWorld >= 0.4 says 'move {o} to {r}'; the 2.1.1 game files say 'put {o} in/on {r}'."""
        return "move {o} to {r}" if "move {o} to {r}" in self.state["command_templates"] else "put {o} in/on {r}"

    def world(self) -> World:
        return World.from_facts(self.state["facts"])

    def plan(self) -> list[str]:
        """fast-downward's optimal plan from the current state (TextWorld's `policy_commands`); [] if none.

        Called rarely (it searches): only when the scripted expert meets a state it has no rule for."""
        with _Translating():
            return list(self._pddl._pddl_state.replan(self._pddl._entity_infos))

    def close(self) -> None:
        """Drop the game and free the planner's memory; the PddlEnv goes back to the idle pool for reuse."""
        if self._pddl is None:
            return
        pddl, env = self._pddl, self._env
        self._pddl, self._env, self.state, self._game_file = None, None, None, None
        pddl.downward_lib.cleanup()
        for attr in ("_pddl_state", "_game_data", "_entity_infos", "state", "prev_state"):
            if hasattr(pddl, attr):
                setattr(pddl, attr, None)
        with _IDLE_LOCK:
            _IDLE.append((pddl, env))
