"""What the three environments share: text spaces, step bookkeeping, invalid actions, splits, caching.

An environment subclasses `TextEnv` and fills in four methods:
  task_ids()            the task ids of its split (deterministic)
  _load_task(task_id)   -> (observation, info)      start an episode
  _apply(action)        -> (observation, reward, terminated, info)
                          raise InvalidAction("why") for an action it cannot parse or apply
  expert_turn()         -> (thought, action)        the scripted expert's next turn from the true state
and `prompt(observation, few_shot)` for the ReAct prompt. Everything else (seeding, step counting,
truncation, turning bad actions into an observation, keeping text inside the space's charset) lives here,
once.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import string
import unicodedata
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

# Printable ASCII plus newline/tab: every observation is mapped into it so that Text spaces contain it.
CHARSET = frozenset(string.printable)
_OUTSIDE_CHARSET = re.compile(r"[^\t\n\x0b\x0c\r\x20-\x7e]")  # the complement of CHARSET, for a fast check
OBS_MAX_CHARS = 16_384
ACTION_MAX_CHARS = 1_024
SPLITS = ("train", "valid", "test")
# ALFWorld's own folder names, and the split each is (envs/alfworld/tasks.py REAL_SPLITS)
SPLIT_ALIASES = {"valid_train": "train", "valid_seen": "valid", "valid_unseen": "test"}


def split_error(split: object) -> str:
    """The one-line message for an unknown split: names the allowed ones (and the split an ALFWorld folder
    name such as valid_seen stands for)."""
    hint = f" (ALFWorld's {split} is --split {SPLIT_ALIASES[split]})" if split in SPLIT_ALIASES else ""
    return f"--split {split!r}: unknown split; allowed: {', '.join(SPLITS)}{hint}"


class InvalidAction(Exception):
    """Raised by an environment's `_apply` for an action it cannot parse or apply; never escapes `step`."""


# common typographic punctuation in real data (product titles, Wikipedia) has a plain ASCII twin
_PUNCTUATION = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                              "\u2014": "-", "\u2026": "...", "\u00a0": " ", "\u2022": "*", "\u00d7": "x"})


def text_space(max_length: int) -> spaces.Text:
    return spaces.Text(min_length=0, max_length=max_length, charset="".join(sorted(CHARSET)))


def to_text(text: str, max_chars: int = OBS_MAX_CHARS) -> str:
    """Map arbitrary text (real data has accents, curly quotes, emoji) into the ASCII charset and bound it."""
    if _OUTSIDE_CHARSET.search(text):
        text = unicodedata.normalize("NFKD", text).translate(_PUNCTUATION)
        text = "".join(c if c in CHARSET else ("" if unicodedata.combining(c) else "?") for c in text)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def assign_splits(task_ids: list[str], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """Disjoint train/valid/test lists, deterministic from the seed and independent of the input order."""
    ids = sorted(set(task_ids))
    random.Random(seed).shuffle(ids)
    n_train = int(round(fractions[0] * len(ids)))
    n_valid = int(round(fractions[1] * len(ids)))
    return {"train": ids[:n_train], "valid": ids[n_train:n_train + n_valid], "test": ids[n_train + n_valid:]}


def cache_dir(env_name: str) -> Path:
    """Where generated tasks are cached: $RAYSAD_CACHE/<env> (default ~/.cache/raysad/<env>)."""
    root = Path(os.environ.get("RAYSAD_CACHE", Path.home() / ".cache" / "raysad"))
    path = root / env_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(*parts: Any) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:12]


class TextEnv(gym.Env[str, str]):
    """A text-in, text-out gymnasium environment over a fixed list of tasks."""

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 1}
    env_name: str = "text"
    agent_format: str = "react"  # the name of this env's agent format in raysad.segments
    default_max_steps: int = 50
    # (thought, action) token budgets of a model's turn when a rollout sets none: each env's fit its expert's
    # longest thought and action with room to spare (benchmarks/expert_token_lengths.py measures them)
    token_budget: tuple[int, int] = (128, 128)

    def __init__(self, split: str = "train", max_steps: int | None = None, render_mode: str | None = None):
        if split not in SPLITS:
            raise ValueError(split_error(split))
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.split = split
        self.max_steps = max_steps or self.default_max_steps
        self.render_mode = render_mode
        self.observation_space = text_space(OBS_MAX_CHARS)
        self.action_space = text_space(ACTION_MAX_CHARS)
        self.task_id: str | None = None
        self._steps = 0
        self._done = False
        self._last_obs = ""
        self._success = False

    # --- to implement -----------------------------------------------------------------------------------
    def task_ids(self) -> list[str]:
        raise NotImplementedError

    def _load_task(self, task_id: str) -> tuple[str, dict]:
        raise NotImplementedError

    def _apply(self, action: str) -> tuple[str, float, bool, dict]:
        raise NotImplementedError

    def expert_turn(self) -> tuple[str, str]:
        raise NotImplementedError

    def prompt(self, observation: str, few_shot: int = 0) -> str:
        """The text the agent sees before its first turn: instructions, `few_shot` examples, the task."""
        raise NotImplementedError

    def admissible_actions(self) -> list[str] | None:
        return None

    # --- gymnasium API ------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        task_id = (options or {}).get("task_id")
        if task_id is None:
            ids = self.task_ids()
            if not ids:
                raise RuntimeError(f"{self.env_name}: split {self.split!r} has no tasks")
            task_id = ids[int(self.np_random.integers(len(ids)))]
        self.task_id = str(task_id)
        self._steps, self._done, self._success = 0, False, False
        obs, info = self._load_task(self.task_id)
        self._last_obs = to_text(obs)
        return self._last_obs, self._info(info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.task_id is None:
            raise RuntimeError("call reset() before step()")
        self._steps += 1
        if self._done:
            obs, reward, terminated, info = "The episode is over; call reset() to start another.", 0.0, True, {}
        else:
            try:
                obs, reward, terminated, info = self._apply(str(action).strip())
            except InvalidAction as err:
                obs, reward, terminated, info = f"Invalid action: {err}", 0.0, False, {"invalid_action": True}
        self._done = self._done or terminated
        truncated = not terminated and self._steps >= self.max_steps
        self._last_obs = to_text(obs)
        if self.render_mode == "human":
            print(self._last_obs)
        return self._last_obs, float(reward), bool(terminated), bool(truncated), self._info(info)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._last_obs
        if self.render_mode == "human":
            print(self._last_obs)
        return None

    def _info(self, extra: dict) -> dict:
        info = {"task_id": self.task_id, "steps": self._steps, "success": self._success,
                "invalid_action": False}
        admissible = self.admissible_actions()
        if admissible is not None:
            info["admissible_actions"] = list(admissible)
        info.update(extra)
        return info
