"""Easy-to-hard curriculum: a complexity score per trajectory, an order, and a linear pacing schedule.

    complexity = a * (reason tokens) + b * (act tokens) + c * (mean teacher entropy, nats)

The entropy is known when the teacher's top-k log-probs were stored: per generated token it is the entropy
of the k entries plus one tail bucket holding the remaining mass (a lower bound on the full entropy), and it
counts 0 for trajectories without top-k. With the defaults a 1-nat mean entropy weighs like 100 tokens.

    order = order_easy_to_hard(examples)                  # indices, easiest first
    n = unlocked(len(order), epoch, start_fraction=0.3, epochs_to_full=3)
    train_on = order[:n]                                   # epoch 0: easiest 30%, epoch 3 on: all
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from raysad.agent_formats import AgentFormat
from raysad.encoding import encode_trajectory
from raysad.trajectory import Trajectory

DEFAULT_A, DEFAULT_B, DEFAULT_C = 1.0, 1.0, 100.0


def topk_entropy(topk_logprobs: Any, mask: Any = None) -> float:
    """Mean over tokens (rows; only rows where mask is true) of the entropy of k entries + a tail bucket.

    Padding entries (TOPK_PAD_LOGPROB, or -inf) have probability 0 and add nothing. No rows -> 0.0.
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if lp.size == 0:
        return 0.0
    lp = lp.reshape(len(lp), -1)
    if mask is not None:
        lp = lp[np.asarray(mask, dtype=bool)]
    if len(lp) == 0:
        return 0.0
    p = np.exp(lp)
    plogp = np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    tail_term = np.where(tail > 0, tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0)
    return float(np.mean(-plogp.sum(axis=1) - tail_term))


def complexity_features(item: dict | Trajectory, tokenizer=None,
                        fmt: str | Path | AgentFormat | None = None) -> tuple[int, int, float | None]:
    """(reason tokens, act tokens, mean teacher entropy or None when no top-k is stored).

    `item` is an encoded example (a dict from encode_trajectory) or a Trajectory. A trajectory is encoded
    with `tokenizer` when one is given; without one, every turn must carry token_ids (the counts then come
    from them, as encode_trajectory would count them).
    """
    if isinstance(item, dict):
        entropy = None
        if item.get("topk_logprobs") is not None and item["topk_mask"].any():
            entropy = topk_entropy(item["topk_logprobs"], item["topk_mask"])
        return int(np.sum(item["reason_mask"])), int(np.sum(item["act_mask"])), entropy
    if tokenizer is not None:
        return complexity_features(encode_trajectory(item, tokenizer, fmt))
    if any(t.token_ids is None for t in item.turns):
        raise ValueError(f"trajectory {item.id!r}: pass a tokenizer to count its tokens "
                         "(not every turn carries token_ids)")
    n_reason = n_act = 0
    rows: list[list[float]] = []
    for t in item.turns:
        k = t.num_thought_tokens or 0
        keep = slice(0, None) if t.thought else slice(k, None)  # an empty thought renders no reason part
        n_reason += k if t.thought else 0
        n_act += len(t.token_ids) - k
        if t.topk_logprobs is not None:
            rows.extend(t.topk_logprobs[keep])
    entropy = None
    if rows:
        width = max(len(r) for r in rows)
        entropy = topk_entropy([r + [-math.inf] * (width - len(r)) for r in rows])
    return n_reason, n_act, entropy


def complexity(item: dict | Trajectory, a: float = DEFAULT_A, b: float = DEFAULT_B, c: float = DEFAULT_C,
               tokenizer=None, fmt: str | Path | AgentFormat | None = None) -> float:
    """a * reason tokens + b * act tokens + c * mean teacher entropy (0 when unknown)."""
    n_reason, n_act, entropy = complexity_features(item, tokenizer, fmt)
    return a * n_reason + b * n_act + c * (entropy or 0.0)


def order_easy_to_hard(items: Iterable[dict | Trajectory], a: float = DEFAULT_A, b: float = DEFAULT_B,
                       c: float = DEFAULT_C, tokenizer=None,
                       fmt: str | Path | AgentFormat | None = None) -> list[int]:
    """Indices of `items` from the lowest complexity to the highest (ties keep the input order)."""
    scores = [complexity(x, a, b, c, tokenizer, fmt) for x in items]
    return sorted(range(len(scores)), key=lambda i: scores[i])


def pacing_fraction(epoch: int, start_fraction: float = 0.3, epochs_to_full: int = 3) -> float:
    """The fraction of the sorted data unlocked at `epoch` (from 0): linear from start_fraction to 1."""
    if not 0.0 < start_fraction <= 1.0:
        raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
    if epochs_to_full < 0 or epoch < 0:
        raise ValueError(f"epoch and epochs_to_full must be >= 0, got {epoch} and {epochs_to_full}")
    if epochs_to_full == 0:
        return 1.0
    return min(1.0, start_fraction + (1.0 - start_fraction) * epoch / epochs_to_full)


def unlocked(n_items: int, epoch: int, start_fraction: float = 0.3, epochs_to_full: int = 3) -> int:
    """How many of the n_items (sorted easy to hard) are trained on at `epoch`: ceil(fraction * n), >= 1."""
    if n_items <= 0:
        return 0
    # round first so that 0.3 * 10 = 3.0000000000000004 does not become 4
    return max(1, math.ceil(round(pacing_fraction(epoch, start_fraction, epochs_to_full) * n_items, 9)))
