"""Token-in, token-out checks: did a model read at rollout the ids it is trained on, and do the stored top-k
log-probs describe those very ids? Used by benchmarks/tokenization_fidelity.py and the tests. No Ray.

    engine = RecordingEngine(engine, "prompts.jsonl")        # every prompt (token ids) an engine is given
    ... a rollout writes trajectories ...
    contexts = context_mismatches(trajectories, tokenizer, read_prompts("prompts.jsonl"))
    error = topk_error(model, trajectories, tokenizer)       # max |stored - recomputed| over stored entries
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

from raysad.agent_formats import trajectory_format
from raysad.encoding import TOPK_PAD_LOGPROB, encode_context, encode_trajectory
from raysad.trajectory import Turn


class RecordingEngine:
    """An engine that appends every prompt it is given (token ids, one JSON list a line) to `path`."""

    def __init__(self, engine, path: str | Path):
        self.engine, self.path = engine, Path(path)

    def generate(self, prompts, *args, **kwargs):
        with open(self.path, "a") as f:
            f.writelines(json.dumps(list(p)) + "\n" for p in prompts)
        return self.engine.generate(prompts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def _recording(make_engine: Callable[[], Any], path: str) -> RecordingEngine:
    return RecordingEngine(make_engine(), path)


def recording_factory(make_engine: Callable[[], Any], path: str | Path) -> Callable[[], RecordingEngine]:
    """A picklable engine factory (for rollout's engine actors) whose engines record their prompts."""
    return functools.partial(_recording, make_engine, str(path))


def read_prompts(path: str | Path) -> set[tuple[int, ...]]:
    with open(path) as f:
        return {tuple(json.loads(line)) for line in f if line.strip()}


def context_mismatches(trajectories, tokenizer, prompts: set[tuple[int, ...]]) -> dict[str, int]:
    """For every model turn (one with token_ids): the contexts of its thought and action phases as training
    encodes them must be prompts the engine was given, and the training example must hold each context
    followed by the ids generated there. Returns {"turns": n, "mismatched": n}."""
    turns = mismatched = 0
    for traj in trajectories:
        fmt = trajectory_format(traj)
        ids = list(encode_trajectory(traj, tokenizer, fmt)["input_ids"])
        for n, turn in enumerate(traj.turns):
            if turn.token_ids is None:
                continue
            turns += 1
            k = turn.num_thought_tokens
            thought_ctx = encode_context(traj.prompt, [*traj.turns[:n], Turn("", "", "")], "thought", tokenizer, fmt)
            action_ctx = encode_context(traj.prompt, traj.turns[:n + 1], "action", tokenizer, fmt)
            ok = (tuple(thought_ctx) in prompts and tuple(action_ctx) in prompts
                  and ids[:len(thought_ctx) + k] == thought_ctx + turn.token_ids[:k]
                  and ids[:len(action_ctx) + len(turn.token_ids) - k] == action_ctx + turn.token_ids[k:])
            mismatched += not ok
    return {"turns": turns, "mismatched": mismatched}


def topk_error(model, trajectories, tokenizer) -> dict[str, float]:
    """The largest |stored top-k log-prob - the model's log-prob of that id at that position of the training
    sequence| over every stored (non-padding) entry, by one fp32 forward pass per trajectory."""
    import torch

    worst, entries = 0.0, 0
    model = model.float().eval()
    device = next(model.parameters()).device
    for traj in trajectories:
        ex = encode_trajectory(traj, tokenizer, trajectory_format(traj))
        if ex["topk_mask"] is None or not ex["topk_mask"].any():
            continue
        ids = torch.as_tensor(ex["input_ids"], device=device)[None]
        with torch.no_grad():
            logp = model(ids).logits[0].float().log_softmax(-1).cpu()
        rows = torch.as_tensor(ex["topk_mask"]).nonzero()[:, 0]
        top_ids = torch.as_tensor(ex["topk_ids"])[rows]
        stored = torch.as_tensor(ex["topk_logprobs"])[rows]
        real = stored > TOPK_PAD_LOGPROB / 2
        recomputed = logp[rows - 1].gather(-1, top_ids)  # row t: the distribution that predicts token t
        diff = (recomputed - stored).abs()[real]
        entries += int(real.sum())
        if diff.numel():
            worst = max(worst, float(diff.max()))
    return {"max_abs_error": worst, "entries": entries}


def turn_shares(trajectories) -> dict[str, float]:
    """Shares of model turns that were truncated (a segment closed by the engine) or have an empty thought or
    an empty action."""
    model_turns = [t for traj in trajectories for t in traj.turns if t.token_ids is not None]
    n = max(len(model_turns), 1)
    return {"model_turns": len(model_turns),
            "truncated": sum(bool(t.extra.get("truncated")) for t in model_turns) / n,
            "empty_thought": sum(not t.thought.strip() for t in model_turns) / n,
            "empty_action": sum(not t.action.strip() for t in model_turns) / n,
            "non_empty": sum(bool(t.thought.strip() and t.action.strip()) for t in model_turns) / n}
