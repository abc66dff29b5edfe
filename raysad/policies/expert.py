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


def expert_episodes(env_name: str, n: int, max_turns: int = 6, prompt_chars: int | None = None,
                    observation_chars: int | None = None, split: str = "train", id_prefix: str | None = None,
                    few_shot: int = 0) -> list:
    """n episodes of the scripted expert in this process (seeds 0..n-1) as Trajectories: small training data
    for tests and benchmarks. `prompt_chars` / `observation_chars` keep only the prompt's last / each
    observation's first that many characters (short sequences for tiny models). `few_shot` > 0: the prompt is
    the env's agent prompt with that many solved examples (as a ReAct agent reads it), not the bare task."""
    import raysad_envs

    from raysad.trajectory import Trajectory, Turn

    env = raysad_envs.make(env_name, split=split)
    episodes = []
    for i in range(n):
        obs, _ = env.reset(seed=i)
        prompt = env.unwrapped.prompt(obs, few_shot=few_shot) if few_shot > 0 else obs
        turns, reward, info = [], 0.0, {}
        for _ in range(max_turns):
            thought, action = env.unwrapped.expert_turn()
            next_obs, reward, term, trunc, info = env.step(action)
            turns.append(Turn(thought, action, next_obs[:observation_chars]))
            if term or trunc:
                break
        episodes.append(Trajectory(
            id=f"{id_prefix or env_name}-{i}", env=env_name, task_id=str(info.get("task_id", i)), split=split,
            instruction="", prompt=prompt[-prompt_chars:] if prompt_chars else prompt, turns=turns,
            reward=float(reward), success=bool(info.get("success")), policy={"backend": "expert", "model": "expert"}))
    return episodes
