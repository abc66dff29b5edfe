"""What every text engine promises, and the two-phase ReAct turn built on top of it.

An engine (hf.HFEngine, vllm, openai) has one method, token ids in, token ids out:

    generate(prompts, stop=None, max_tokens=None, topk=0, temperature=None, seed=None) -> list[Generation]

`prompts` are token id lists, built by encoding.encode_context (the same encoder as training; an engine never
tokenises a context itself, so what a model reads at rollout is what it is trained on). None means the
engine's own default (set when it was built). For each prompt it returns a `Generation`:
  text            the generated text, cut right after the first stop string (the stop string included);
  token_ids       the generated ids; they decode to exactly `text`;
  topk_ids/...    when topk > 0: k ids and log-probs (log_softmax of the raw logits, temperature 1) for every
                  position of token_ids (len(topk_ids) == len(token_ids));
  finish_reason   "stop" when the model wrote a stop string, "length" (token budget) or "eos" otherwise.
When `stop` is given and the model did not write one ("length"/"eos"), the engine *closes* the text with
stop[0]: its tokens are appended and their top-k rows are the model's distribution at those positions. So a
segment always ends with its delimiter, and a student trained on it learns to write the delimiter.
`cut_at_stop` below is the shared token bookkeeping for that.

`next_turns` runs a batch of agents one turn: thought phase, then action phase, each a batched `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    finish_reason: str = "stop"  # "stop" | "length" | "eos"
    reencoded: bool = False  # the engine could not pass ids through (a text-only server): they were re-derived


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], stop: list[str] | None = None, max_tokens: int | None = None,
                 topk: int = 0, temperature: float | None = None, seed: int | None = None) -> list[Generation]:
        ...


def call_settings(engine, stop, max_tokens, temperature, seed):
    """One generate call's settings: the engine's defaults (`max_new_tokens`, `temperature`) where the call
    gives none, and, for an engine built with a seed, one seed per call in call order (reproducible runs)."""
    if seed is None and engine.seed is not None:
        seed = engine.seed + engine.calls
    engine.calls += 1
    return ([s for s in (stop or []) if s], max_tokens or engine.max_new_tokens,
            engine.temperature if temperature is None else temperature, seed)


def cut_at_stop(tokenizer, token_ids: list[int], stop: list[str] | None,
                close: bool = True) -> tuple[list[int], int, str, str]:
    """Token bookkeeping shared by engines: cut generated ids right after the first stop string.

    Returns (ids, keep, text, finish_reason): `ids` decode to exactly `text`; the first `keep` of them are
    the model's own tokens (their top-k rows from generation stay valid); the rest were re-encoded (the
    model's last token ran past the stop string, e.g. "]\\n" when the stop is "]") or appended to close the
    text with stop[0] (when `close` and no stop string was written): the engine scores those positions.
    `token_ids` must already be cut at the first EOS (finish_reason then "eos" unless a stop came first).
    """
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    full = decode(token_ids)
    hits = [(full.find(s) + len(s), s) for s in (stop or []) if s and s in full]
    if not hits:
        if not (close and stop):
            return list(token_ids), len(token_ids), full, "length"
        ids = list(token_ids) + tokenizer.encode(stop[0], add_special_tokens=False)
        if decode(ids) == full + stop[0]:
            return ids, len(token_ids), full + stop[0], "length"
        return tokenizer.encode(full + stop[0], add_special_tokens=False), 0, full + stop[0], "length"
    end = min(hits)[0]
    target = full[:end]
    # the shortest prefix of tokens whose text covers the stop string (prefix texts grow with the prefix)
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(token_ids[:mid])) >= end:
            hi = mid
        else:
            lo = mid + 1
    head = decode(token_ids[:lo])
    if head == target:
        return list(token_ids[:lo]), lo, target, "stop"
    kept = list(token_ids[:lo - 1])
    base = decode(kept)
    if target.startswith(base):
        ids = kept + tokenizer.encode(target[len(base):], add_special_tokens=False)
        if decode(ids) == target:
            return ids, len(kept), target, "stop"
    # a multi-byte character split across tokens: re-encode all of it (every position is then rescored)
    return tokenizer.encode(target, add_special_tokens=False), 0, target, "stop"


def next_turns(engine: Engine, tokenizer, fmt, prompts: list[str], histories: list[list], topk: int = 0,
               max_thought_tokens: int | None = None, max_action_tokens: int | None = None,
               temperature: float | None = None, seed: int | None = None) -> list:
    """One ReAct turn for each agent, generated in two batched phases; observations are left empty.

    Agent j has the prompt prompts[j] and the finished turns histories[j] (with the ids they were generated
    with, where they have them). Thought phase: encoding.encode_context(..., "thought") (the context up to the
    reason prefix), stop at reason_end. Action phase: encode_context(..., "action") with the thought's ids
    spliced in as generated, stop at act_end. Turn.thought / Turn.action are the texts cut at their end
    delimiter, without the prefix's lead (segments.parse_turn); `token_ids` are the generated ids, thought's
    (lead + thought + reason_end) then action's, `num_thought_tokens` says where the split is, and top-k rows
    come with every token. A segment the engine had to close (token budget or EOS before the delimiter) is
    named in turn.extra["truncated"] ("thought", "action"), so rollouts can count and report it.
    """
    from raysad.agent_formats import get_format
    from raysad.encoding import encode_context
    from raysad.segments import parse_turn
    from raysad.trajectory import Turn

    fmt = get_format(fmt)
    if len(prompts) != len(histories):
        raise ValueError(f"next_turns: {len(prompts)} prompts but {len(histories)} histories")
    if not prompts:
        return []
    kw = dict(topk=topk, temperature=temperature)
    placeholder = Turn(thought="", action="", observation="")
    ids = [encode_context(p, [*h, placeholder], "thought", tokenizer, fmt) for p, h in zip(prompts, histories)]
    thoughts = engine.generate(ids, stop=fmt.reason_stop, max_tokens=max_thought_tokens, seed=seed, **kw)
    pending = []
    for g in thoughts:
        if not g.token_ids:
            raise ValueError("next_turns: the engine returned no token ids (token-in, token-out needs them)")
        pending.append(Turn(thought=parse_turn(g.text, "", fmt).thought, action="", observation="",
                            token_ids=list(g.token_ids), num_thought_tokens=len(g.token_ids)))
    ids = [encode_context(p, [*h, t], "action", tokenizer, fmt) for p, h, t in zip(prompts, histories, pending)]
    actions = engine.generate(ids, stop=fmt.act_stop, max_tokens=max_action_tokens,
                              seed=None if seed is None else seed + 1, **kw)
    turns = []
    for g_t, g_a in zip(thoughts, actions):
        if not g_a.token_ids:
            raise ValueError("next_turns: the engine returned no token ids (token-in, token-out needs them)")
        turn = parse_turn(g_t.text, g_a.text, fmt)
        turn.token_ids = list(g_t.token_ids) + list(g_a.token_ids)
        turn.num_thought_tokens = len(g_t.token_ids)
        if topk and g_t.topk_ids is not None and g_a.topk_ids is not None:
            turn.topk_ids = list(g_t.topk_ids) + list(g_a.topk_ids)
            turn.topk_logprobs = list(g_t.topk_logprobs) + list(g_a.topk_logprobs)
        closed = [name for name, g in (("thought", g_t), ("action", g_a)) if g.finish_reason != "stop"]
        if closed:
            turn.extra["truncated"] = closed
        if g_t.reencoded or g_a.reencoded:
            turn.extra["reencoded"] = True
        turns.append(turn)
    return turns


# Keywords a backend does not use but callers pass to every backend alike (rollout passes tensor_parallel).
_IGNORED_KWARGS = {"hf": {"tensor_parallel"}, "vllm": set(), "openai": set()}


ENV_SIDE_POLICIES = ("expert", "random")  # policies that ask the environment, not a text model


def make_policy(backend: str, model: Any = None, **kwargs) -> Any:
    """The policy of a backend: "expert" / "random" (ask the env), or a text engine: "hf", "vllm", "openai".

    `model` is a model directory (or, for hf, a loaded model) or a served model's name; keywords go to the
    engine's constructor (an unknown one is a TypeError), except those it has no use for (hf: tensor_parallel).
    """
    if backend == "expert":
        from raysad.policies.expert import ExpertPolicy

        return ExpertPolicy()
    if backend == "random":
        from raysad.policies.random_policy import RandomPolicy

        return RandomPolicy(kwargs.get("seed", 0))
    if backend not in _IGNORED_KWARGS:
        raise ValueError(f"unknown policy backend {backend!r}; known: {', '.join(ENV_SIDE_POLICIES)}, "
                         f"{', '.join(_IGNORED_KWARGS)}")
    if model is None:
        raise ValueError(f"policy backend {backend!r} needs a model")
    kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS[backend]}
    if backend == "hf":
        from raysad.policies.hf import HFEngine

        return HFEngine(model, **kwargs)
    if backend == "vllm":
        from raysad.policies.vllm import VLLMEngine

        return VLLMEngine(model, **kwargs)
    from raysad.policies.openai_client import OpenAIEngine

    return OpenAIEngine(model, **kwargs)
