"""ALFWorld on its own engine (TextWorld PDDL + ALFWorld's domain, grammar and demangler), with an offline
task generator for all six task types and a loader for the real json_2.1.1 games.

    from raysad_envs.alfworld import ALFWorldEnv, list_tasks
    ids = list_tasks("test")                      # generated pool (seed=0, 1000 tasks over the three splits)
    ids = list_tasks("test", data="/path/alfworld_data")   # real valid_unseen games
"""
from .env import ALFWorldEnv
from .tasks import list_tasks

__all__ = ["ALFWorldEnv", "list_tasks"]
