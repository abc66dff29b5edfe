"""A teacher's top-k rows over given trajectories, from its engine (local or an actor): on every token a model
generated (on-policy: the teacher scores the student's own tokens) and, with `context`, on every other token
after the first generated one (observations, the format's labels: what flat_kd distils offline).

The ids scored are exactly the ids training reads (encoding.generated_positions, the one encoder), so row p
is the teacher's distribution for token p given tokens < p, as encoding.encode_trajectory lays rows out.
Context rows are kept per trajectory in `extra["context_topk"]`: {"length": the encoded length they were
scored on, "positions": [...], "ids": [[...]], "logprobs": [[...]]} (encode_trajectory checks the length).
"""
from __future__ import annotations

from typing import Any

CONTEXT_TOPK = "context_topk"  # the trajectory extra field that holds the context rows


def score_trajectories(trajectories: list, tokenizer, engine: Any, topk: int, *, generated: bool = True,
                       context: bool = False) -> None:
    """Set the teacher's top-`topk` rows in place, from one `engine.score` request for all of `trajectories`:
    generated=True: each turn's topk_ids / topk_logprobs at its token_ids; context=True: extra["context_topk"]
    at every position after the first generated token that no model generated. A trajectory without generated
    ids is left as it is."""
    from raysad.agent_formats import trajectory_format
    from raysad.encoding import generated_positions

    requests = []  # (trajectory, ids, first scored position, positions per turn)
    for traj in trajectories:
        ids, positions = generated_positions(traj, tokenizer, trajectory_format(traj))
        made = sorted(p for turn in positions.values() for p in turn)
        if made:
            end = len(ids) if context else made[-1] + 1
            requests.append((traj, ids, made[0], end, positions, set(made)))
    if not requests:
        return
    rows = engine.score([ids[:first] for _, ids, first, _, _, _ in requests],
                        [ids[first:end] for _, ids, first, end, _, _ in requests], topk)
    for (traj, ids, first, end, positions, made), (topk_ids, topk_logprobs) in zip(requests, rows):
        if generated:
            for n, turn_positions in positions.items():
                turn = traj.turns[n]
                turn.topk_ids = [topk_ids[p - first] for p in turn_positions]
                turn.topk_logprobs = [topk_logprobs[p - first] for p in turn_positions]
        if context:
            kept = [p for p in range(first, end) if p not in made]
            traj.extra[CONTEXT_TOPK] = {"length": len(ids), "positions": kept,
                                        "ids": [topk_ids[p - first] for p in kept],
                                        "logprobs": [topk_logprobs[p - first] for p in kept]}
