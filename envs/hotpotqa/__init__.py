"""HotPotQA-ReAct environment: Search/Lookup/Finish over a local corpus, reward = HotpotQA exact match.

    from raysad_envs.hotpotqa import HotPotQAEnv, list_tasks
    env = HotPotQAEnv(split="test", data=None)           # None: generated offline world (3000 questions)
    ids = list_tasks("test", seed=0)

Real data: `data=` a HotpotQA JSON file / directory / list, or {split: path}; `corpus=` an optional
JSON-lines abstracts file ({"title", "text"}). See data.py and corpus.py for the formats.
"""
from __future__ import annotations

from .data import load_dataset
from .env import EXAMPLES, INSTRUCTION, HotPotQAEnv
from .metrics import em_f1, exact_match_score, f1_score, normalize_answer


def list_tasks(split: str = "train", data=None, corpus=None, seed: int = 0, num_tasks: int | None = None,
               **_env_kwargs) -> list[str]:
    """Task ids of a split in a fixed order (other env keywords, e.g. max_steps, do not change them)."""
    from ..core import SPLITS, split_error

    if split not in SPLITS:
        raise ValueError(split_error(split))
    return list(load_dataset(data, corpus, seed, num_tasks).splits[split])


__all__ = ["HotPotQAEnv", "list_tasks", "load_dataset", "normalize_answer", "exact_match_score", "f1_score",
           "em_f1", "INSTRUCTION", "EXAMPLES"]
