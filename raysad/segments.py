"""Agent text and its spans: a trajectory rendered in its agent format, with [REASON]/[ACT]/other spans, a
generated turn parsed back, and the spans of a raw transcript found by the format's line patterns.
No Ray, no torch. Tokens (ids and loss masks) are raysad.encoding's, built on the same pieces (`text_pieces`).

A turn with no thought (and no generated thought ids) is written without reason prefix, reason and ack.

Span kinds: `prompt` (the prompt, plus a newline when it lacks one), `reason` (thought + reason_end),
`act` (action + act_end) and `obs` (the observation AND the fixed scaffolding inside turns: prefixes and
acks). Only reason and act carry loss. Spans are contiguous, cover the whole text, and adjacent spans of the
same kind are merged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raysad.agent_formats import AgentFormat, get_format, resolve_format
from raysad.trajectory import Trajectory, Turn

KINDS = ("prompt", "reason", "act", "obs")
LOSS_KINDS = ("reason", "act")


@dataclass(frozen=True)
class Span:
    kind: str   # prompt | reason | act | obs
    start: int  # character offsets into the text, end exclusive
    end: int


@dataclass
class Rendered:
    text: str
    spans: list[Span]
    prompt_end: int  # where the first turn starts (len(prompt) plus the newline render adds, if any)


# --- rendering -------------------------------------------------------------------------------------------

def _lead(prefix: str) -> tuple[str, str]:
    """A prefix split into (fixed text, lead): the lead is its trailing spaces. Byte-level BPE tokenizers
    attach a space to the word after it ("Thought 1: I" is ['Thought', ' 1', ':', ' I']), so the lead is
    tokenised with the text the model writes, never on its own: a pretrained model continues "Thought 1:"
    with " I", while after a lone " " token its likeliest next token is a newline."""
    fixed = prefix.rstrip(" ")
    return fixed, prefix[len(fixed):]


def has_reason(turn: Turn) -> bool:
    """Whether a turn is written with its reason part: a thought, or generated thought ids (an empty thought
    the model wrote is still what it saw when it wrote the action)."""
    return bool(turn.thought) or bool(turn.token_ids is not None and turn.num_thought_tokens)


def text_pieces(prompt: str, turns: list[Turn], fmt: AgentFormat,
                until: str | None = None) -> list[tuple[str, str, int, str | None]]:
    """The text in order as (kind, text, turn index, role); role 'thought'/'action' marks generated text and
    'thought_lead'/'action_lead' the prefix's trailing spaces that go with it (see `_lead`).

    The one place that decides what a rendered turn looks like: render, encode_context and encode_trajectory
    all build on it, so they agree by construction. `until` ('thought' or 'action') stops in the last turn
    right before that role's lead: what the model sees when it is asked to write it.
    """
    out: list[tuple[str, str, int, str | None]] = []
    if prompt:
        out.append(("prompt", prompt if prompt.endswith("\n") else prompt + "\n", -1, None))
    last = len(turns) - 1
    for n, turn in enumerate(turns):
        i = n + 1
        stop_at = until if n == last else None
        parts = []
        if stop_at == "thought" or has_reason(turn):
            fixed, lead = _lead(fmt.fill(fmt.reason_prefix, i))
            parts += [("obs", fixed, None), ("obs", lead, "thought_lead"),
                      ("reason", turn.thought + fmt.reason_end, "thought"), ("obs", fmt.fill(fmt.ack, i), None)]
        fixed, lead = _lead(fmt.fill(fmt.act_prefix, i))
        parts += [("obs", fixed, None), ("obs", lead, "action_lead"), ("act", turn.action + fmt.act_end, "action"),
                  ("obs", fmt.fill(fmt.observation, i, turn.observation), None)]
        for kind, text, role in parts:
            if stop_at is not None and role in (stop_at + "_lead", stop_at):
                return out
            out.append((kind, text, n, role))
    return out


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for s in spans:
        if s.end <= s.start:
            continue
        if out and out[-1].kind == s.kind and out[-1].end == s.start:
            out[-1] = Span(s.kind, out[-1].start, s.end)
        else:
            out.append(s)
    return out


def render(traj: Trajectory, fmt: str | Path | AgentFormat | None = None) -> Rendered:
    """The trajectory as training text with its spans (fmt defaults to the format named like traj.env)."""
    fmt = resolve_format(fmt, traj)
    spans, pos, prompt_end = [], 0, 0
    texts = []
    for kind, text, _, _ in text_pieces(traj.prompt, traj.turns, fmt):
        spans.append(Span(kind, pos, pos + len(text)))
        texts.append(text)
        pos += len(text)
        if kind == "prompt":
            prompt_end = pos
    return Rendered("".join(texts), _merge(spans), prompt_end)


def render_context(prompt: str, turns: list[Turn], fmt: str | Path | AgentFormat) -> str:
    """The text up to where turn len(turns)+1 starts (prompt and finished turns with their observations)."""
    return "".join(text for _, text, _, _ in text_pieces(prompt, turns, get_format(fmt)))


def split_at(text: str, end: str) -> tuple[str, bool]:
    """(text before the first `end`, whether `end` was found). Engines drop or keep the stop string; both work."""
    cut = text.find(end)
    return (text, False) if cut < 0 else (text[:cut], True)


def parse_turn(thought_text: str, action_text: str, fmt: str | Path | AgentFormat, observation: str = "") -> Turn:
    """A Turn from two generated texts, each cut at its end delimiter (reason_end / act_end), without the
    lead the model wrote first (the prefix's trailing space, see `_lead`; render writes it back).

    Nothing else is stripped, so the texts stay what the model wrote. The policy sets token_ids /
    num_thought_tokens / topk_* on the returned turn when it has them (they hold lead and delimiters).
    """
    fmt = get_format(fmt)
    thought, action = split_at(thought_text, fmt.reason_end)[0], split_at(action_text, fmt.act_end)[0]
    reason_lead, act_lead = _lead(fmt.fill(fmt.reason_prefix, 1))[1], _lead(fmt.fill(fmt.act_prefix, 1))[1]
    return Turn(thought=thought.removeprefix(reason_lead), action=action.removeprefix(act_lead),
                observation=observation)


# --- segmenting raw text ---------------------------------------------------------------------------------

def _lines(text: str, start: int = 0):
    """(start, end) of each line from `start`, the newline included."""
    pos, n = start, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        end = n if nl < 0 else nl + 1
        yield pos, end
        pos = end


def segment_text(text: str, fmt: str | Path | AgentFormat, prompt_end: int | None = None) -> tuple[list[Span], dict]:
    """Spans of a raw transcript from the format's line patterns, and counts of what was found.

    Text before the first reason/act line is `prompt`; pass `prompt_end` when the prompt itself holds
    example turns (few-shot), so they stay prompt. Lines matching no pattern are kept as `obs`.
    stats: lines, reason_lines, act_lines, obs_lines, unmatched_lines (non-blank lines after the prompt that
    match no pattern), turns, thoughts_without_action, actions_without_thought.
    For text from render(traj), segment_text(r.text, fmt, r.prompt_end) gives r.spans back (also without
    prompt_end when the prompt holds no turn-like lines), provided thoughts, actions and observations do
    not contain newlines (their end delimiters).
    """
    fmt = get_format(fmt)
    stats = dict(lines=0, reason_lines=0, act_lines=0, obs_lines=0, unmatched_lines=0, turns=0,
                 thoughts_without_action=0, actions_without_thought=0)
    spans: list[Span] = []
    start = 0
    started = prompt_end is not None
    if prompt_end:
        spans.append(Span("prompt", 0, prompt_end))
        start = prompt_end
    pending_thought = False
    for ls, le in _lines(text, start):
        stats["lines"] += 1
        line = text[ls:le]
        kind, body = None, (ls, le)
        for k, rx in fmt._compiled:
            m = rx.match(line)
            if m:
                kind = k
                if k != "obs" and "body" in rx.groupindex and m.group("body") is not None:
                    body = (ls + m.start("body"), ls + m.end("body"))
                break
        if kind in ("reason", "act"):
            started = True
            stats[f"{kind}_lines"] += 1
            spans += [Span("obs", ls, body[0]), Span(kind, *body), Span("obs", body[1], le)]
            if kind == "reason":
                stats["thoughts_without_action"] += pending_thought
                pending_thought = True
            else:
                stats["actions_without_thought"] += not pending_thought
                stats["turns"] += 1
                pending_thought = False
            continue
        if not started:
            spans.append(Span("prompt", ls, le))
            continue
        if kind == "obs":
            stats["obs_lines"] += 1
        elif line.strip():
            stats["unmatched_lines"] += 1
        spans.append(Span("obs", ls, le))
    if pending_thought:
        stats["thoughts_without_action"] += 1
    stats["turns"] += stats["thoughts_without_action"]
    return _merge(spans), stats
