"""raysad_envs: ALFWorld, HotPotQA-ReAct and WebShop as gymnasium text environments (no Ray, no torch).

    import raysad_envs
    env = raysad_envs.make("webshop", split="test")          # or gymnasium.make("raysad/WebShop-v0")
    obs, info = env.reset(seed=0, options={"task_id": raysad_envs.list_tasks("webshop", "test")[0]})
"""
from __future__ import annotations

import importlib

import gymnasium as gym

# short name -> (gymnasium id, entry point, module that defines list_tasks)
ENVS = {
    "alfworld": ("raysad/ALFWorld-v0", "raysad_envs.alfworld.env:ALFWorldEnv", "raysad_envs.alfworld"),
    "hotpotqa": ("raysad/HotPotQA-v0", "raysad_envs.hotpotqa.env:HotPotQAEnv", "raysad_envs.hotpotqa"),
    "webshop": ("raysad/WebShop-v0", "raysad_envs.webshop.env:WebShopEnv", "raysad_envs.webshop"),
}

for _gym_id, _entry, _ in ENVS.values():
    if _gym_id not in gym.registry:
        gym.register(id=_gym_id, entry_point=_entry)


def canonical(env: str) -> str:
    """'webshop', 'WebShop' or 'raysad/WebShop-v0' -> 'webshop'; any other registered gymnasium id is kept."""
    key = env.lower()
    for name, (gym_id, _, _) in ENVS.items():
        if key in (name, gym_id.lower()):
            return name
    if env in gym.registry:
        return env
    raise ValueError(f"unknown environment {env!r}; known: {', '.join(ENVS)} (or a registered gymnasium id)")


def make(env: str, **kwargs) -> gym.Env:
    """gymnasium.make by short name or id. Keyword arguments go to the environment (split, data, seed, ...)."""
    name = canonical(env)
    return gym.make(ENVS[name][0] if name in ENVS else name, **kwargs)


def list_tasks(env: str, split: str = "train", **kwargs) -> list[str]:
    """The task ids of a split, in a fixed order (the same kwargs as `make`: data, seed, num_tasks, ...)."""
    name = canonical(env)
    if name not in ENVS:
        return list(make(name, split=split, **kwargs).unwrapped.task_ids())
    return importlib.import_module(ENVS[name][2]).list_tasks(split, **kwargs)


__all__ = ["ENVS", "canonical", "make", "list_tasks"]
