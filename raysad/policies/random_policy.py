"""The random policy: the "≈ 0" baseline of an evaluation. Like the expert it asks the environment, not a model:
a uniform draw from the env's admissible actions when it lists them (WebShop pages, ALFWorld), else a random
action of the env's action forms (HotPotQA: Search/Lookup/Finish of a random word). It never thinks.

Draws are reproducible per episode: each (env, task) gets its own generator seeded from (seed, task id).
"""
from __future__ import annotations

import random
import re
from typing import Any

from raysad_envs.core import stable_hash

# Action forms by agent format, for envs that list no admissible actions; {w} is a random word.
ACTION_FORMS = {
    "hotpotqa": ("Search[{w}]", "Lookup[{w}]", "Finish[{w}]"),
    "webshop": ("search[{w}]", "click[{w}]"),
    "alfworld": ("go to {w} 1", "open {w} 1", "take {w} 1 from {w} 1", "examine {w} 1"),
}
# Content-free words (no "yes"/"no": they answer many HotPotQA comparison questions).
WORDS = ("red", "blue", "small", "large", "cabinet", "table", "apple", "river", "city", "album", "shirt", "shoes",
         "price", "item", "first", "second", "film", "band", "1", "2", "3")
_PLACEHOLDER = re.compile(r"<[^<>]*>")  # WebShop's "search[<query>]"


class RandomPolicy:
    backend = "random"

    def __init__(self, seed: int = 0, words: tuple[str, ...] = WORDS):
        self.seed, self.words = seed, words
        self._rngs: dict[int, tuple[str, random.Random]] = {}  # id(env) -> (task id, its generator)

    def next_turns(self, envs: list[Any]) -> list:
        """One Turn (empty thought, a random action) per environment; observations are left empty."""
        from raysad.trajectory import Turn

        return [Turn(thought="", action=self.action(env), observation="") for env in envs]

    def action(self, env: Any) -> str:
        env = env.unwrapped
        rng = self._rng(env)
        admissible = [a for a in (env.admissible_actions() or []) if a]
        if admissible:
            return _PLACEHOLDER.sub(lambda _: self._words(rng), rng.choice(admissible))
        forms = ACTION_FORMS.get(str(getattr(env, "agent_format", "")), ("{w}",))
        return rng.choice(forms).replace("{w}", self._words(rng))

    def _words(self, rng: random.Random) -> str:
        return " ".join(rng.choice(self.words) for _ in range(rng.randint(1, 3)))

    def _rng(self, env: Any) -> random.Random:
        task_id = str(getattr(env, "task_id", ""))
        held = self._rngs.get(id(env))
        if held is None or held[0] != task_id:  # a new episode of this env: a fresh, reproducible generator
            held = (task_id, random.Random(int(stable_hash(self.seed, task_id), 16)))
            self._rngs[id(env)] = held
        return held[1]
