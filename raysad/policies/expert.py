"""The scripted expert as a policy: each environment knows its true state and says the next (thought, action).

Used by the rollout stage to make teacher data without a model (`--policy expert`), and as an upper bound in
evaluation. It needs the environments themselves, not text contexts, so it has its own entry point.
"""
from __future__ import annotations

from typing import Any


class ExpertPolicy:
    backend = "expert"

    def next_turns(self, envs: list[Any]) -> list:
        """One Turn per environment from `env.unwrapped.expert_turn()`; observations are left empty."""
        return expert_turns(envs)


def expert_turns(envs: list[Any]) -> list:
    from raysad.trajectory import Turn

    turns = []
    for env in envs:
        thought, action = env.unwrapped.expert_turn()
        turns.append(Turn(thought=thought, action=action, observation=""))
    return turns
