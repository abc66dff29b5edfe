"""The trajectory schema: Turn and Trajectory, their flat JSON form, and validation with where:field errors.

Files of trajectories are read by raysad.trajectory_reader and written by raysad.trajectory_writer
(raysad.trajectory_files: the on-disk layout both share).

Field contract (docs/architecture.md, "Interfaces"): `Turn.token_ids` are the ids a model generated for the
thought segment (thought + its end delimiter) followed by those of the action segment (action + its end
delimiter); `num_thought_tokens` is where the split is; `topk_ids`/`topk_logprobs` hold k entries per
generated token. Fields a reader does not know (top level or per turn) land in `extra` and are written back
flat, so a round trip keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRAJECTORY_FIELDS = ("id", "env", "task_id", "split", "instruction", "prompt", "turns", "reward", "success",
                     "policy")
TURN_FIELDS = ("thought", "action", "observation")
TURN_OPTIONAL_FIELDS = ("token_ids", "topk_ids", "topk_logprobs", "num_thought_tokens")


class TrajectoryError(ValueError):
    """Bad trajectory input. The message names the file, the line (JSONL) or row (Parquet) and the field."""


@dataclass
class Turn:
    thought: str
    action: str
    observation: str
    token_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    num_thought_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown per-turn fields, written back flat

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"thought": self.thought, "action": self.action, "observation": self.observation}
        for name in TURN_OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        _merge_extra(d, self.extra, (*TURN_FIELDS, *TURN_OPTIONAL_FIELDS), "turn")
        return d


@dataclass
class Trajectory:
    id: str
    env: str
    task_id: str
    split: str
    instruction: str
    prompt: str
    turns: list[Turn]
    reward: float
    success: bool
    policy: dict[str, Any]  # {"backend": ..., "model": ...}
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level fields; extra["error"] on failure

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able dict: the known fields in contract order, then the `extra` fields."""
        d = {"id": self.id, "env": self.env, "task_id": self.task_id, "split": self.split,
             "instruction": self.instruction, "prompt": self.prompt,
             "turns": [t.to_dict() for t in self.turns], "reward": self.reward, "success": self.success,
             "policy": self.policy}
        _merge_extra(d, self.extra, TRAJECTORY_FIELDS, "trajectory")
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "trajectory") -> Trajectory:
        """Validate `d` and build a Trajectory; raise TrajectoryError "<where>: field '<name>': <problem>"."""
        validate(d, where)
        turns = []
        for t in d["turns"]:
            known = {k: t[k] for k in (*TURN_FIELDS, *TURN_OPTIONAL_FIELDS) if k in t}
            turns.append(Turn(**known, extra={k: v for k, v in t.items() if k not in known}))
        extra = {k: v for k, v in d.items() if k not in TRAJECTORY_FIELDS}
        return cls(**{k: d[k] for k in TRAJECTORY_FIELDS if k != "turns"}, turns=turns, extra=extra)


def _merge_extra(d: dict, extra: dict, known: tuple[str, ...], what: str) -> None:
    clash = sorted(set(extra) & set(known))
    if clash:
        raise ValueError(f"{what} extra holds known field name(s) {clash}; set them as attributes instead")
    d.update(extra)


# --- validation ------------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def field_error(where: str, name: str, problem: str) -> TrajectoryError:
    """The error of one bad field: "<where>: field '<name>': <problem>"."""
    return TrajectoryError(f"{where}: field '{name}': {problem}")


def _is_number(x: Any) -> bool:
    return type(x) is float or type(x) is int


def _check_int_list(value: Any, where: str, name: str) -> None:
    if type(value) is not list:
        raise field_error(where, name, f"expected a list of int, got {_type_name(value)}")
    if not all(type(x) is int for x in value):
        j = next(j for j, x in enumerate(value) if type(x) is not int)
        raise field_error(where, f"{name}[{j}]", f"expected int, got {_type_name(value[j])}")


def _check_rows(value: Any, where: str, name: str, n_rows: int, is_item, item: str) -> list[int]:
    """A list of n_rows lists whose items pass `is_item`; returns the row lengths."""
    if type(value) is not list:
        raise field_error(where, name, f"expected a list of lists, got {_type_name(value)}")
    if len(value) != n_rows:
        raise field_error(where, name, f"expected {n_rows} rows (one per token id), got {len(value)}")
    for j, row in enumerate(value):
        if type(row) is not list:
            raise field_error(where, f"{name}[{j}]", f"expected a list of {item}, got {_type_name(row)}")
        if not all(is_item(x) for x in row):
            m = next(m for m, x in enumerate(row) if not is_item(x))
            raise field_error(where, f"{name}[{j}][{m}]", f"expected {item}, got {_type_name(row[m])}")
    return [len(row) for row in value]


def validate(d: Any, where: str = "trajectory") -> None:
    """Check one trajectory dict (the JSON form) against the schema; the first problem raises TrajectoryError."""
    if not isinstance(d, dict):
        raise TrajectoryError(f"{where}: expected a JSON object, got {_type_name(d)}")
    for name in TRAJECTORY_FIELDS:
        if name not in d:
            raise field_error(where, name, "missing")
    for name in ("id", "env", "task_id", "split", "instruction", "prompt"):
        if type(d[name]) is not str:
            raise field_error(where, name, f"expected str, got {_type_name(d[name])}")
    if not _is_number(d["reward"]):
        raise field_error(where, "reward", f"expected float, got {_type_name(d['reward'])}")
    if type(d["success"]) is not bool:
        raise field_error(where, "success", f"expected bool, got {_type_name(d['success'])}")
    if not isinstance(d["policy"], dict):
        raise field_error(where, "policy", f"expected an object like {{\"backend\": ..., \"model\": ...}}, "
                                           f"got {_type_name(d['policy'])}")
    turns = d["turns"]
    if type(turns) is not list:
        raise field_error(where, "turns", f"expected a list, got {_type_name(turns)}")
    for i, t in enumerate(turns):
        at = f"turns[{i}]"
        if not isinstance(t, dict):
            raise field_error(where, at, f"expected an object, got {_type_name(t)}")
        for name in TURN_FIELDS:
            if name not in t:
                raise field_error(where, f"{at}.{name}", "missing")
            if type(t[name]) is not str:
                raise field_error(where, f"{at}.{name}", f"expected str, got {_type_name(t[name])}")
        _validate_tokens(t, where, at)


def _validate_tokens(t: dict, where: str, at: str) -> None:
    ids = t.get("token_ids")
    if ids is None:
        for name in TURN_OPTIONAL_FIELDS:
            if t.get(name) is not None:
                raise field_error(where, f"{at}.{name}", "given without token_ids")
        return
    _check_int_list(ids, where, f"{at}.token_ids")
    n = t.get("num_thought_tokens")
    if n is None:
        raise field_error(where, f"{at}.num_thought_tokens", "missing (required with token_ids)")
    if type(n) is not int:
        raise field_error(where, f"{at}.num_thought_tokens", f"expected int, got {_type_name(n)}")
    if not 0 <= n <= len(ids):
        raise field_error(where, f"{at}.num_thought_tokens", f"{n} is outside 0..{len(ids)} (the number of token_ids)")
    topk_ids, topk_lp = t.get("topk_ids"), t.get("topk_logprobs")
    if (topk_ids is None) != (topk_lp is None):
        missing = "topk_logprobs" if topk_lp is None else "topk_ids"
        raise field_error(where, f"{at}.{missing}", "missing (topk_ids and topk_logprobs go together)")
    if topk_ids is None:
        return
    k_ids = _check_rows(topk_ids, where, f"{at}.topk_ids", len(ids), lambda x: type(x) is int, "int")
    k_lp = _check_rows(topk_lp, where, f"{at}.topk_logprobs", len(ids), _is_number, "float")
    if k_ids != k_lp:
        j = next(j for j, (a, b) in enumerate(zip(k_ids, k_lp)) if a != b)
        raise field_error(where, f"{at}.topk_logprobs[{j}]",
                          f"expected {k_ids[j]} entries (as topk_ids[{j}]), got {k_lp[j]}")
