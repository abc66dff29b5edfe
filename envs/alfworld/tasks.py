"""Where ALFWorld games come from: the offline generator's pool, or a real ALFWorld data root.

Generated (data=None): a pool of `num_tasks` tasks drawn from `seed`, split train/valid/test by
`envs.core.assign_splits`; a task's files are written to `cache_dir("alfworld")` the first time it is played.

Real (data=PATH, or data="env" for $ALFWORLD_DATA): PATH holds `json_2.1.1/` (as `alfworld-download` lays it
out; PATH may also be the json_2.1.1 dir itself). Splits map to ALFWorld's: train -> `train` (`valid_train`
when there is no `train`), valid -> `valid_seen`, test -> `valid_unseen` (the 134 games of the paper's
evaluation). Trials ALFWorld cannot play are skipped and counted by reason.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..core import SPLITS, assign_splits, cache_dir, split_error
from .generator import GENERATOR_VERSION, TASK_TYPES, generate_task, write_trial

log = logging.getLogger(__name__)

DEFAULT_NUM_TASKS = 1000  # 80/10/10 -> a test split of 100 games, what a comparison needs
REAL_SPLITS = {"train": ("train", "valid_train"), "valid": ("valid_seen",), "test": ("valid_unseen",)}
SKIP_REASONS = {
    "no_game_file": "no game.tw-pddl",
    "unsupported_task_type": "task type ALFWorld does not play (movable receptacle, sliced, other)",
    "unsolvable": '"solvable": false',
    "failed_to_load": "no solvable key and the PDDL does not load",
}


@dataclass
class Catalog:
    """The task ids of one split and where their trial dirs are."""
    ids: list[str]
    root: Path                          # trial dir of task_id = root / task_id
    skipped: Counter = field(default_factory=Counter)
    generated: bool = False
    seed: int = 0

    def trial_dir(self, task_id: str) -> Path:
        if self.generated:
            index = generated_index(task_id)
            task = generate_task(self.seed, index)
            if task.task_id != task_id:
                raise KeyError(f"alfworld: {task_id!r} is not task {index} of the pool drawn from seed {self.seed} "
                               f"(that one is {task.task_id!r}); was it listed with another seed?")
            return write_trial(task, self.root).parent
        # a task id names a trial dir *inside* the data root: refuse '..', absolute ids and symlinks out of it
        root = self.root.resolve()
        path = (root / task_id).resolve()
        if path == root or not path.is_relative_to(root):
            raise ValueError(f"alfworld: task id {task_id!r} is outside the data root {root}")
        if not (path / "game.tw-pddl").is_file():
            raise KeyError(f"alfworld: no game file {path / 'game.tw-pddl'} for task {task_id!r}")
        return path


def resolve_data(data: str | os.PathLike | None) -> Path | None:
    """None -> None (generated); 'env' or '$ALFWORLD_DATA' -> that variable; otherwise the path."""
    if data is None:
        return None
    text = str(data)
    if text.lower() in ("env", "$alfworld_data", "alfworld_data"):
        text = os.environ.get("ALFWORLD_DATA", "")
        if not text:
            raise ValueError("alfworld: data='env' needs the ALFWORLD_DATA environment variable to be set")
    path = Path(os.path.expandvars(os.path.expanduser(text)))
    json_root = path if path.name.startswith("json_") else path / "json_2.1.1"
    if not json_root.is_dir():
        raise FileNotFoundError(f"alfworld: {path} has no json_2.1.1/ directory (expected an ALFWorld data root as "
                                f"laid out by alfworld-download, with json_2.1.1/<split>/... and logic/)")
    return json_root


def generated_index(task_id: str) -> int:
    m = re.search(r"/trial_G(\d+)_", task_id)
    if not m:
        raise KeyError(f"alfworld: {task_id!r} is not a generated task id (…/trial_G<index>_<hash>)")
    return int(m[1])


@functools.lru_cache(maxsize=16)
def _generated_pool(seed: int, num_tasks: int) -> tuple[str, ...]:
    return tuple(generate_task(seed, i).task_id for i in range(num_tasks))


def generated_catalog(split: str, seed: int = 0, num_tasks: int | None = None) -> Catalog:
    ids = assign_splits(list(_generated_pool(seed, num_tasks or DEFAULT_NUM_TASKS)), seed)[split]
    root = cache_dir("alfworld") / f"generated-v{GENERATOR_VERSION}-seed{seed}"
    return Catalog(ids, root, generated=True, seed=seed)


_SOLVABLE = re.compile(r'"solvable"\s*:\s*(true|false|null)')


def _loads(game_file: Path) -> bool:
    """Whether fast-downward can translate the game's PDDL (what PddlEnv.load does first)."""
    from .engine import _Translating
    try:
        import fast_downward
        data = json.loads(game_file.read_text())
        with _Translating():
            fast_downward.pddl2sas(data["pddl_domain"], data["pddl_problem"])
        return True
    except Exception:  # noqa: BLE001 - any failure means ALFWorld could not play it either
        return False


def _skip_reason(trial: Path) -> str | None:
    game_file = trial / "game.tw-pddl"
    if not game_file.is_file():
        return "no_game_file"
    task_type = trial.parent.name.split("-", 1)[0]
    if "movable" in task_type or "Sliced" in trial.parent.name or task_type not in TASK_TYPES:
        return "unsupported_task_type"
    match = _SOLVABLE.search(game_file.read_text())
    if match and match[1] == "false":
        return "unsolvable"
    if (not match or match[1] == "null") and not _loads(game_file):
        return "failed_to_load"
    return None


@functools.lru_cache(maxsize=8)
def _real_catalog(json_root: Path, split: str) -> Catalog:
    names = [n for n in REAL_SPLITS[split] if (json_root / n).is_dir()]
    if not names:
        raise FileNotFoundError(f"alfworld: {json_root} has none of {REAL_SPLITS[split]} for split {split!r}")
    split_root = json_root / names[0]
    ids, skipped = [], Counter()
    for dirpath, _dirs, files in sorted(os.walk(split_root)):
        if "traj_data.json" not in files:
            continue
        trial = Path(dirpath)
        reason = _skip_reason(trial)
        if reason:
            skipped[reason] += 1
        else:
            ids.append(trial.relative_to(json_root).as_posix())
    if skipped:
        detail = ", ".join(f"{n} {SKIP_REASONS[k]}" for k, n in sorted(skipped.items()))
        log.warning("alfworld: %s: %d playable games, skipped %d (%s)", split_root, len(ids),
                    sum(skipped.values()), detail)
    return Catalog(sorted(ids), json_root, skipped)


def catalog(split: str = "train", data=None, seed: int = 0, num_tasks: int | None = None) -> Catalog:
    if split not in SPLITS:
        raise ValueError(split_error(split))
    json_root = resolve_data(data)
    if json_root is None:
        return generated_catalog(split, seed, num_tasks)
    cat = _real_catalog(json_root, split)
    if num_tasks:
        cat = Catalog(cat.ids[:num_tasks], cat.root, cat.skipped)
    return cat


def list_tasks(split: str = "train", data=None, seed: int = 0, num_tasks: int | None = None, **_ignored) -> list[str]:
    """Task ids of a split, in a fixed order. Other keywords (max_steps, ...) are accepted and ignored."""
    return list(catalog(split, data, seed, num_tasks).ids)


def read_traj_data(trial_dir: Path) -> dict:
    path = trial_dir / "traj_data.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"alfworld: cannot read {path}: {err}") from err
