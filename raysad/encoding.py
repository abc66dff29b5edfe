"""Agent text -> token ids and [REASON]/[ACT] loss masks: the one encoder of contexts, for engines and training.

How a policy generates turn i (token-in, token-out):

    ids     = encode_context(prompt, turns + [pending], "thought", tokenizer, fmt)   # ... "Thought 3:"
    thought = generate(ids, stop=fmt.reason_stop)           # " I should ...\n": lead + thought + reason_end
    ids     = encode_context(prompt, turns + [pending with the thought's ids], "action", tokenizer, fmt)
    action  = generate(ids, stop=fmt.act_stop)
    turn    = parse_turn(thought, action, fmt) + the generated ids (thought's, then action's)

encode_trajectory(traj) then yields exactly those context ids followed by the generated ids, turn after turn
(each piece of fixed text tokenised on its own, generated ids spliced in as they were), so a model is trained
on the very token sequence it read and wrote. segments.render(traj) gives the same text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raysad.agent_formats import AgentFormat, get_format, resolve_format
from raysad.segments import LOSS_KINDS, Span, render, text_pieces
from raysad.trajectory import Trajectory, Turn

TOPK_PAD_LOGPROB = -1e4  # fills top-k rows without a teacher entry: finite, so 0 * pad stays 0 (no NaN)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; offset mappings need one "
                        "(load it with use_fast=True or wrap a `tokenizers` Tokenizer in PreTrainedTokenizerFast)")


def token_masks(text: str, spans: list[Span], tokenizer, max_length: int | None = None,
                add_special_tokens: bool = True) -> dict[str, Any]:
    """Tokenise `text` and mark the tokens of reason and act spans (any span list: render or segment_text).

    A token belongs to the span holding most of its characters; a tie goes to reason, then act, then the
    rest (so a BPE token ' I' made of a prefix's space and a thought's 'I' carries loss). Tokens without
    characters (special tokens) carry none. mask[t] marks token t as a target: the loss at position t-1
    predicts it. max_length: see `fit_to_length` (the prompt is cut from the left first).
    Returns input_ids int64[T], reason_mask bool[T], act_mask bool[T] and fit_to_length's counts.
    """
    _require_fast(tokenizer)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    codes = np.zeros(len(text), dtype=np.int8)
    for s in spans:
        if s.kind in LOSS_KINDS:
            codes[s.start:s.end] = 1 if s.kind == "reason" else 2
    cum_r = np.concatenate([[0], np.cumsum(codes == 1)])
    cum_a = np.concatenate([[0], np.cumsum(codes == 2)])
    s, e = offsets[:, 0], offsets[:, 1]
    n_r, n_a = cum_r[e] - cum_r[s], cum_a[e] - cum_a[s]
    n_o = (e - s) - n_r - n_a
    reason = (n_r > 0) & (n_r >= n_a) & (n_r >= n_o)
    act = (n_a > 0) & ~reason & (n_a >= n_o)
    head = len(_special_ids(tokenizer)[0]) if add_special_tokens else 0
    return fit_to_length({"input_ids": ids, "reason_mask": reason, "act_mask": act}, max_length, head)


LENGTH_COUNTS = ("num_tokens", "truncated", "dropped_prompt_tokens", "dropped_loss_tokens", "dropped_turns")


def fit_to_length(out: dict[str, Any], max_length: int | None, head: int = 0,
                  boundaries: list[int] | None = None) -> dict[str, Any]:
    """Cut an encoded example to at most `max_length` tokens without cutting into what carries loss first.

    1. The prompt is cut from the left: tokens after the first `head` ones (special tokens such as BOS, kept)
       and before the first loss token (reason/act), keeping the one right before it (it predicts that token).
       The few-shot examples and the start of a long prompt go; the question and the turns stay.
    2. If that is not enough, the example ends at the last of `boundaries` (positions where a turn starts, or
       the end) that fits: whole turns are dropped from the end, never part of one, unless the first turn
       alone is too long (then it is cut at max_length).
    Arrays of `out` are cut alike. Adds the counts of LENGTH_COUNTS: num_tokens (before), truncated,
    dropped_prompt_tokens, dropped_loss_tokens (reason + act tokens dropped), dropped_turns.
    """
    n = len(out["input_ids"])
    counts = dict(num_tokens=n, truncated=False, dropped_prompt_tokens=0, dropped_loss_tokens=0, dropped_turns=0)
    if max_length is None or n <= max_length:
        out.update(counts)
        return out
    if max_length <= head + 1:
        raise ValueError(f"max_length {max_length} leaves no room after the {head} leading special token(s)")
    loss = out["reason_mask"] | out["act_mask"]
    first_loss = int(np.argmax(loss)) if loss.any() else n
    cut = max(0, min(n - max_length, first_loss - 1 - head))
    keep = np.ones(n, dtype=bool)
    keep[head:head + cut] = False
    end = n
    if n - cut > max_length:
        # the end of the last whole turn that fits (positions shift left by `cut` once the prompt is cut)
        fitting = [b for b in (boundaries or []) if head + cut < b and b - cut <= max_length]
        end = max(fitting) if fitting else max_length + cut
        keep[end:] = False
        counts["dropped_turns"] = sum(1 for b in (boundaries or []) if b >= end and b < n)
    counts.update(truncated=True, dropped_prompt_tokens=cut, dropped_loss_tokens=int(loss[~keep].sum()))
    for key, value in out.items():
        if isinstance(value, np.ndarray) and value.shape[:1] == (n,):
            out[key] = value[keep]
    out.update(counts)
    return out


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. ([bos], []) for Llama)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for s in range(len(full) - len(plain) + 1):
        if full[s:s + len(plain)] == plain:
            return full[:s], full[s + len(plain):]
    return [], []


def check_piecewise(tokenizer) -> None:
    """Fail unless pieces tokenised on their own concatenate to their text: agent text is encoded piece by
    piece (a tokenizer that adds a space before every piece, as SentencePiece's dummy prefix does, would
    write text the model never saw)."""
    _require_fast(tokenizer)
    a, b = "Observation 1: a\n", "Thought 2:"
    ids = tokenizer(a, add_special_tokens=False)["input_ids"] + tokenizer(b, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if text != a + b:
        raise ValueError(f"{type(tokenizer).__name__} adds text around pieces tokenised on their own "
                         f"({a + b!r} came back as {text!r}, e.g. a SentencePiece dummy prefix); raysad encodes "
                         "agent text piecewise and needs a tokenizer without one (load it with "
                         "add_prefix_space=False / legacy=False)")


def _encode_pieces(pieces, turns: list[Turn], tokenizer, add_special_tokens: bool, where: str):
    """Token ids of `pieces` (from text_pieces): each run of fixed text tokenised on its own, each generated
    segment (a turn's lead + thought + reason_end, or lead + action + act_end) as the ids the model generated
    (turn.token_ids, split at num_thought_tokens) or, for a turn without them, its text tokenised on its own.

    Returns (ids, kinds, rows, turn_starts, generated): kinds 0 no loss (also a turn the guide played: extra
    "guide"), 1 reason, 2 act per token; rows (position, topk ids, topk logprobs) for generated tokens with a
    stored top-k; turn_starts the position where each turn's first piece starts; generated {turn index: the
    positions of its token_ids, in order}.
    """
    segments: list[list[Any]] = []  # [kind, text or None, ids or None, topk or None, turn index]
    lead = ""
    for kind, text, n, role in pieces:
        turn = turns[n] if n >= 0 else None
        if role in ("thought_lead", "action_lead"):
            lead = "" if turn.token_ids is not None else text  # stored ids hold the lead the model wrote
            continue
        if role is not None and turn.token_ids is not None:
            k = turn.num_thought_tokens
            if k is None:
                raise ValueError(f"{where}: turns[{n}] has token_ids but no num_thought_tokens")
            cut = slice(0, k) if role == "thought" else slice(k, None)
            topk = (turn.topk_ids[cut], turn.topk_logprobs[cut]) if turn.topk_ids is not None else None
            segments.append([kind, None, list(turn.token_ids[cut]), topk, n])
        elif role is not None:
            segments.append([kind, lead + text, None, None, n])
        elif segments and segments[-1][0] in ("prompt", "obs") and segments[-1][1] is not None:
            segments[-1][1] += text  # one run of fixed text (kind: whatever started it; both carry no loss)
        else:
            segments.append([kind, text, None, None, n])
        lead = ""
    to_tokenize = [seg[1] for seg in segments if seg[2] is None and seg[1]]
    encoded = iter(tokenizer(to_tokenize, add_special_tokens=False)["input_ids"] if to_tokenize else [])
    for seg in segments:
        if seg[2] is None:
            seg[2] = list(next(encoded)) if seg[1] else []
    before, after = _special_ids(tokenizer) if add_special_tokens else ([], [])

    ids = list(before)
    kinds = [0] * len(before)
    rows: list[tuple[int, list[int], list[float]]] = []
    turn_starts: list[int] = []
    generated: dict[int, list[int]] = {}
    for kind, text, seg_ids, topk, n in segments:
        if n >= len(turn_starts):
            turn_starts.append(len(ids))
        if text is None:  # the ids the model generated (turn.token_ids)
            generated.setdefault(n, []).extend(range(len(ids), len(ids) + len(seg_ids)))
        code = 1 if kind == "reason" else 2 if kind == "act" else 0
        if code and turns[n].extra.get("guide"):
            code = 0  # a turn another model (the guide) played: context for the student, like an observation
        if topk is not None:
            rows.extend((len(ids) + j, tid, tlp) for j, (tid, tlp) in enumerate(zip(*topk)))
        ids.extend(seg_ids)
        kinds.extend([code] * len(seg_ids))
    ids.extend(after)
    kinds.extend([0] * len(after))
    return ids, kinds, rows, turn_starts, generated


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as the user's message in the tokenizer's chat template, with the assistant's turn opened: the
    agent's turns follow as the assistant's text. The templated text is the trajectory's prompt, so training
    encodes exactly what the model read (its special tokens are matched as such when tokenised). A leading
    BOS the template writes is left to the tokenizer (encode_context adds it), so it is not doubled."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: has no chat template; "
                         "drop --chat-template (use --few-shot for a base model)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.rstrip("\n")}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _special_ids(tokenizer)[0]:
        text = text[len(bos):]
    return text


def encode_context(prompt: str, turns: list[Turn], role: str, tokenizer, fmt: str | Path | AgentFormat,
                   add_special_tokens: bool = True) -> list[int]:
    """The token ids a model is given to write `role` ('thought' or 'action') of the last turn in `turns`:
    exactly the ids that encode_trajectory puts before that segment once the turn is finished (token-in,
    token-out: engines and training share this encoding). For 'thought' the last turn is a placeholder (its
    fields are not read); for 'action' it carries the thought as generated (token_ids = the thought's ids,
    num_thought_tokens = their count), or a thought text for a turn without ids.
    """
    fmt = get_format(fmt)
    if role not in ("thought", "action"):
        raise ValueError(f"role must be 'thought' or 'action', got {role!r}")
    if not turns:
        raise ValueError("encode_context: `turns` must end with the turn being written")
    pieces = text_pieces(prompt, turns, fmt, until=role)
    ids = _encode_pieces(pieces, turns, tokenizer, add_special_tokens, "context")[0]
    _, after = _special_ids(tokenizer) if add_special_tokens else ([], [])
    return ids[:len(ids) - len(after)] if after else ids


def generated_positions(traj: Trajectory, tokenizer, fmt: str | Path | AgentFormat | None = None,
                        add_special_tokens: bool = True) -> tuple[list[int], dict[int, list[int]]]:
    """The trajectory's ids as encode_trajectory lays them out (before any cut to a length), and for each turn with
    token_ids the positions of those ids: where a scorer reads the distribution each generated token was drawn
    from (the logits one position earlier)."""
    _require_fast(tokenizer)
    pieces = text_pieces(traj.prompt, traj.turns, resolve_format(fmt, traj))
    ids, _, _, _, generated = _encode_pieces(pieces, traj.turns, tokenizer, add_special_tokens,
                                             f"trajectory {traj.id!r}")
    return ids, generated


def _context_rows(traj: Trajectory, length: int, generated: set[int], where: str) -> list:
    """The teacher's rows at tokens no model generated (raysad.scoring: rollout --context-topk), as
    (position, ids, logprobs); checked against this encoding, which must be the one they were scored on."""
    from raysad.scoring import CONTEXT_TOPK

    rows = traj.extra.get(CONTEXT_TOPK)
    if rows is None:
        return []
    field = f"{where}: field '{CONTEXT_TOPK}'"
    try:
        positions, ids, logprobs = rows["positions"], rows["ids"], rows["logprobs"]
        scored_length = int(rows["length"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"{field}: expected {{length, positions, ids, logprobs}}, got {type(rows).__name__} "
                         f"({err})") from None
    if scored_length != length:
        raise ValueError(f"{field}: scored on {scored_length} tokens, this encoding has {length}: the trajectory "
                         "was scored with another tokenizer, agent format or chat template")
    if not len(positions) == len(ids) == len(logprobs):
        raise ValueError(f"{field}: {len(positions)} positions, {len(ids)} id rows, {len(logprobs)} log-prob rows")
    bad = next((p for p in positions if type(p) is not int or not 0 < p < length or p in generated), None)
    if bad is not None:
        raise ValueError(f"{field}: position {bad!r} is not a non-generated token of the {length} encoded")
    return list(zip(positions, ids, logprobs))


def encode_trajectory(traj: Trajectory, tokenizer, fmt: str | Path | AgentFormat | None = None,
                      max_length: int | None = None, add_special_tokens: bool = True,
                      whole_text: bool = False) -> dict[str, Any]:
    """A training example: token ids, reason/act masks and (when turns carry them) the teacher's top-k.

    Tokenisation is piecewise, exactly as engines are given their contexts (encode_context): each run of
    fixed text (prompt, observations, prefixes, acks) is tokenised on its own, and each generated segment
    (lead + thought + reason_end, lead + action + act_end) is either the ids the model generated
    (turn.token_ids, split at num_thought_tokens) or, for turns without them, its text tokenised on its own.
    So the student trains on the very ids the teacher read and wrote, and masks are exact (no token straddles
    two pieces). whole_text=True instead tokenises render(traj).text in one go and masks by offsets
    (token_masks); it needs turns without token_ids.

    Stored ids must come from the same tokenizer (teacher and student share it for logit distillation).

    Returns: input_ids int64[T], reason_mask bool[T], act_mask bool[T], id, the counts of fit_to_length
    (max_length: the prompt is cut from the left, then whole turns from the end), and, when any turn has
    top-k, topk_ids int64[T,k], topk_logprobs float32[T,k], topk_mask bool[T] (else None). Row t holds the
    teacher's distribution for predicting token t (it generated token t from tokens < t), so it lines up with
    the student's logits at position t-1; rows of tokens without teacher top-k, and padding when turns differ
    in k, hold id 0 and TOPK_PAD_LOGPROB (the losses give padded slots no mass on either side).
    """
    _require_fast(tokenizer)
    fmt = resolve_format(fmt, traj)
    if whole_text:
        if any(t.token_ids is not None for t in traj.turns):
            raise ValueError(f"trajectory {traj.id!r}: whole_text=True cannot use stored token_ids")
        r = render(traj, fmt)
        out = token_masks(r.text, r.spans, tokenizer, max_length, add_special_tokens)
        return {**out, "topk_ids": None, "topk_logprobs": None, "topk_mask": None, "id": traj.id}

    where = f"trajectory {traj.id!r}"
    pieces = text_pieces(traj.prompt, traj.turns, fmt)
    ids, kinds, rows, turn_starts, generated = _encode_pieces(pieces, traj.turns, tokenizer, add_special_tokens,
                                                              where)
    rows.extend(_context_rows(traj, len(ids), {p for turn in generated.values() for p in turn}, where))
    ids_arr = np.asarray(ids, dtype=np.int64)
    outside = (ids_arr < 0) | (ids_arr >= len(tokenizer))
    if outside.any():
        raise ValueError(f"{where}: stored token id {int(ids_arr[outside][0])} is outside this "
                         f"tokenizer's {len(tokenizer)} ids; the trajectories were generated with another tokenizer")
    kinds_arr = np.asarray(kinds, dtype=np.int8)
    out: dict[str, Any] = {"input_ids": ids_arr,
                           "reason_mask": kinds_arr == 1, "act_mask": kinds_arr == 2,
                           "topk_ids": None, "topk_logprobs": None, "topk_mask": None}
    if rows:
        k = max(len(tid) for _, tid, _ in rows)
        topk_ids = np.zeros((len(ids), k), dtype=np.int64)
        topk_lp = np.full((len(ids), k), TOPK_PAD_LOGPROB, dtype=np.float32)
        topk_mask = np.zeros(len(ids), dtype=bool)
        for pos, tid, tlp in rows:
            topk_ids[pos, :len(tid)] = tid
            topk_lp[pos, :len(tlp)] = tlp
            topk_mask[pos] = True
        out.update(topk_ids=topk_ids, topk_logprobs=topk_lp, topk_mask=topk_mask)
    before, after = _special_ids(tokenizer) if add_special_tokens else ([], [])
    out = fit_to_length(out, max_length, len(before), [*turn_starts[1:], len(ids) - len(after)])
    out["id"] = traj.id
    return out
