"""Agent text -> [REASON]/[ACT]/other spans -> token masks (per agent format). No Ray, no torch.

An `AgentFormat` says how a ReAct turn is written (docs/architecture.md, "Agent format"):

    <reason_prefix>{thought}<reason_end><ack><act_prefix>{action}<act_end><observation>

Templates may use `{i}` (the turn number, from 1) and `{observation}`; they are filled by plain replacement
(`fmt.fill`), so other braces are literal, except that `{name}` for any other name is refused as a typo.
A turn with no thought (and no generated thought ids) is written without reason prefix, reason and ack.

Span kinds: `prompt` (the prompt, plus a newline when it lacks one), `reason` (thought + reason_end),
`act` (action + act_end) and `obs` (the observation AND the fixed scaffolding inside turns: prefixes and
acks). Only reason and act carry loss. Spans are contiguous, cover the whole text, and adjacent spans of the
same kind are merged.

How a policy generates turn i (token-in, token-out: this module is THE encoder of contexts, for engines and
training alike):

    ids     = encode_context(prompt, turns + [pending], "thought", tokenizer, fmt)   # ... "Thought 3:"
    thought = generate(ids, stop=fmt.reason_stop)           # " I should ...\n": lead + thought + reason_end
    ids     = encode_context(prompt, turns + [pending with the thought's ids], "action", tokenizer, fmt)
    action  = generate(ids, stop=fmt.act_stop)
    turn    = parse_turn(thought, action, fmt) + the generated ids (thought's, then action's)

encode_trajectory(traj) then yields exactly those context ids followed by the generated ids, turn after turn
(each piece of fixed text tokenised on its own, generated ids spliced in as they were), so a model is trained
on the very token sequence it read and wrote. render(traj) gives the same text.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raysad.trajectory import Trajectory, Turn

KINDS = ("prompt", "reason", "act", "obs")
LOSS_KINDS = ("reason", "act")
TOPK_PAD_LOGPROB = -1e4  # fills top-k rows without a teacher entry: finite, so 0 * pad stays 0 (no NaN)
_TEMPLATES = ("reason_prefix", "reason_end", "ack", "act_prefix", "act_end", "observation")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")


class FormatError(ValueError):
    """A bad agent format (built-in name unknown, or a YAML file with a missing/bad field)."""


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


@dataclass
class AgentFormat:
    """How turns are written, and the line patterns that find reason/act/obs lines in a raw transcript.

    line_patterns: ordered (kind, regex) pairs; the first regex that matches at the start of a line wins.
    For reason/act, a named group `body` marks the span (the rest of the line is `obs` scaffolding); without
    it the whole line is the span. Lines matching no pattern are `prompt` before the first reason/act line,
    `obs` after it (and counted in segment_text's stats unless blank).
    """
    name: str
    reason_prefix: str
    reason_end: str
    ack: str
    act_prefix: str
    act_end: str
    observation: str
    line_patterns: list[tuple[str, str]]
    _compiled: list[tuple[str, re.Pattern]] = field(init=False, default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"format {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise FormatError(f"{where}: field 'name': expected a non-empty string")
        for name in _TEMPLATES:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise FormatError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
            for placeholder in _PLACEHOLDER.findall(value):
                if placeholder not in ("i", "observation"):
                    raise FormatError(f"{where}: field '{name}': unknown placeholder {{{placeholder}}} "
                                      f"(templates may use {{i}} and {{observation}})")
        for name in ("reason_end", "act_end"):
            if not getattr(self, name):
                raise FormatError(f"{where}: field '{name}': must not be empty (it is the stop string)")
        if "{observation}" not in self.observation:
            raise FormatError(f"{where}: field 'observation': must contain {{observation}}")
        self._compiled = []
        for j, pair in enumerate(self.line_patterns):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise FormatError(f"{where}: field 'line_patterns[{j}]': expected [kind, regex], got {pair!r}")
            kind, regex = pair
            if kind not in ("reason", "act", "obs"):
                raise FormatError(f"{where}: field 'line_patterns[{j}].kind': expected reason, act or obs, "
                                  f"got {kind!r}")
            try:
                self._compiled.append((kind, re.compile(regex)))
            except (re.error, TypeError) as err:
                raise FormatError(f"{where}: field 'line_patterns[{j}].regex': invalid regex {regex!r}: "
                                  f"{err}") from None
        self.line_patterns = [tuple(p) for p in self.line_patterns]
        if not any(k == "act" for k, _ in self.line_patterns):
            raise FormatError(f"{where}: field 'line_patterns': needs at least one act pattern")

    def fill(self, template: str, i: int, observation: str = "") -> str:
        """A template with {i} and {observation} filled in (plain replacement, other braces stay)."""
        return template.replace("{i}", str(i)).replace("{observation}", observation)

    @property
    def reason_stop(self) -> list[str]:
        """Stop strings for the thought phase (the delimiter belongs to the reason segment)."""
        return [self.reason_end]

    @property
    def act_stop(self) -> list[str]:
        """Stop strings for the action phase (the delimiter belongs to the act segment)."""
        return [self.act_end]


BUILTIN_FORMATS: dict[str, dict[str, Any]] = {
    "hotpotqa": dict(
        reason_prefix="Thought {i}: ", reason_end="\n", ack="", act_prefix="Action {i}: ", act_end="\n",
        observation="Observation {i}: {observation}\n",
        line_patterns=[("reason", r"Thought \d+: (?P<body>.*\n?)"),
                       ("act", r"Action \d+: (?P<body>.*\n?)"),
                       ("obs", r"Observation \d+:")]),
    "alfworld": dict(
        reason_prefix="> think: ", reason_end="\n", ack="OK.\n", act_prefix="> ", act_end="\n",
        observation="{observation}\n",
        # every other line is an observation (ALFWorld's text has no label)
        line_patterns=[("reason", r"> think: (?P<body>.*\n?)"),
                       ("act", r"> (?P<body>.*\n?)"),
                       ("obs", r"")]),
    "webshop": dict(
        reason_prefix="Action: think[", reason_end="]", ack="\nObservation: OK.\n\n", act_prefix="Action: ",
        act_end="\n", observation="Observation: {observation}\n\n",
        # the reason ends at the line's last ']' (its newline is the ack's); WebShop pages span several
        # lines after "Observation:", so every other line is an observation
        line_patterns=[("reason", r"Action: think\[(?P<body>.*\])"),
                       ("act", r"Action: (?P<body>.*\n?)"),
                       ("obs", r"")]),
}


def get_format(name_or_path: str | Path | AgentFormat) -> AgentFormat:
    """A built-in format by name (hotpotqa, alfworld, webshop), a YAML file, or an AgentFormat (returned as is).

    YAML keys: name (default: the file's stem), reason_prefix, reason_end, ack (default ""), act_prefix,
    act_end, observation, line_patterns (a list of [kind, regex] pairs or {kind:, regex:} maps).
    See raysad/formats/example_reasoning_action.yaml.
    """
    if isinstance(name_or_path, AgentFormat):
        return name_or_path
    key = str(name_or_path)
    if key.lower() in BUILTIN_FORMATS:
        return AgentFormat(name=key.lower(), **BUILTIN_FORMATS[key.lower()])
    path = Path(key)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise FormatError(f"unknown agent format {key!r}; built-in: {', '.join(BUILTIN_FORMATS)}, "
                          "or a path to a .yaml format file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: format file not found") from None
    except yaml.YAMLError as err:
        raise FormatError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a mapping of field: value at the top level")
    known = ("name", *_TEMPLATES, "line_patterns")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise FormatError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    data.setdefault("name", path.stem)
    data.setdefault("ack", "")
    for name in known:
        if name not in data:
            raise FormatError(f"{path}: field '{name}': missing")
    patterns = data["line_patterns"]
    if not isinstance(patterns, list):
        raise FormatError(f"{path}: field 'line_patterns': expected a list of [kind, regex], "
                          f"got {type(patterns).__name__}")
    pairs = []
    for j, p in enumerate(patterns):
        if isinstance(p, dict):
            if set(p) != {"kind", "regex"}:
                raise FormatError(f"{path}: field 'line_patterns[{j}]': expected keys kind and regex, got {sorted(p)}")
            p = (p["kind"], p["regex"])
        pairs.append(p)
    data["line_patterns"] = pairs
    try:
        return AgentFormat(**data)
    except FormatError as err:  # say the file rather than the format's name
        prefix = f"format {data['name']!r}: "
        raise FormatError(f"{path}: {str(err).removeprefix(prefix)}") from None


def format_record(fmt: AgentFormat) -> str | dict[str, Any]:
    """What a trajectory records of the format it was played in (`agent_format`): a built-in's name, else the
    whole format (so a run can read it back without the YAML file it came from)."""
    builtin = BUILTIN_FORMATS.get(fmt.name)
    if builtin is not None and get_format(fmt.name) == fmt:
        return fmt.name
    return {"name": fmt.name, **{k: getattr(fmt, k) for k in _TEMPLATES},
            "line_patterns": [list(pair) for pair in fmt.line_patterns]}


_RECORDED: dict[str, AgentFormat] = {}


def trajectory_format(traj: Trajectory) -> AgentFormat:
    """The agent format a trajectory was played in: the one it records (`agent_format`, written by rollout),
    else (files from before it was recorded) the built-in format of its env's name."""
    recorded = traj.extra.get("agent_format")
    if recorded is None:
        name = traj.env
        if name.lower() not in BUILTIN_FORMATS:  # an alias of a built-in env (the envs package is optional here)
            try:
                import raysad_envs

                name = raysad_envs.canonical(traj.env)
            except (ImportError, ValueError):
                pass
        if name.lower() not in BUILTIN_FORMATS:
            raise FormatError(f"trajectory {traj.id!r} (env {traj.env!r}) records no agent_format and {traj.env!r} "
                              f"has no built-in format ({', '.join(BUILTIN_FORMATS)}): roll it out again with "
                              "this raysad, or add the field (a built-in name or the format's fields)")
        return get_format(name)
    key = recorded if isinstance(recorded, str) else json.dumps(recorded, sort_keys=True)
    if key not in _RECORDED:
        if isinstance(recorded, dict):
            try:
                pairs = [tuple(p) for p in recorded.get("line_patterns", [])]
                _RECORDED[key] = AgentFormat(**{**recorded, "line_patterns": pairs})
            except TypeError as err:
                raise FormatError(f"trajectory {traj.id!r}: field 'agent_format': {err}") from None
        else:
            _RECORDED[key] = get_format(recorded)
    return _RECORDED[key]


def _format_of(fmt: str | Path | AgentFormat | None, traj: Trajectory | None = None) -> AgentFormat:
    if fmt is None:
        if traj is None:
            raise FormatError("no agent format given")
        return trajectory_format(traj)
    return get_format(fmt)


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


def _pieces(prompt: str, turns: list[Turn], fmt: AgentFormat,
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
    fmt = _format_of(fmt, traj)
    spans, pos, prompt_end = [], 0, 0
    texts = []
    for kind, text, _, _ in _pieces(traj.prompt, traj.turns, fmt):
        spans.append(Span(kind, pos, pos + len(text)))
        texts.append(text)
        pos += len(text)
        if kind == "prompt":
            prompt_end = pos
    return Rendered("".join(texts), _merge(spans), prompt_end)


def render_context(prompt: str, turns: list[Turn], fmt: str | Path | AgentFormat) -> str:
    """The text up to where turn len(turns)+1 starts (prompt and finished turns with their observations)."""
    return "".join(text for _, text, _, _ in _pieces(prompt, turns, get_format(fmt)))


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


# --- tokens ----------------------------------------------------------------------------------------------

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
    """Token ids of `pieces` (from _pieces): each run of fixed text tokenised on its own, each generated
    segment (a turn's lead + thought + reason_end, or lead + action + act_end) as the ids the model generated
    (turn.token_ids, split at num_thought_tokens) or, for a turn without them, its text tokenised on its own.

    Returns (ids, kinds, rows, turn_starts): kinds 0 no loss, 1 reason, 2 act per token; rows (position, topk
    ids, topk logprobs) for generated tokens with a stored top-k; turn_starts the position where each turn's
    first piece starts.
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
    for kind, _, seg_ids, topk, n in segments:
        if n >= len(turn_starts):
            turn_starts.append(len(ids))
        code = 1 if kind == "reason" else 2 if kind == "act" else 0
        if topk is not None:
            rows.extend((len(ids) + j, tid, tlp) for j, (tid, tlp) in enumerate(zip(*topk)))
        ids.extend(seg_ids)
        kinds.extend([code] * len(seg_ids))
    ids.extend(after)
    kinds.extend([0] * len(after))
    return ids, kinds, rows, turn_starts


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
    pieces = _pieces(prompt, turns, fmt, until=role)
    ids, _, _, _ = _encode_pieces(pieces, turns, tokenizer, add_special_tokens, "context")
    _, after = _special_ids(tokenizer) if add_special_tokens else ([], [])
    return ids[:len(ids) - len(after)] if after else ids


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
    fmt = _format_of(fmt, traj)
    if whole_text:
        if any(t.token_ids is not None for t in traj.turns):
            raise ValueError(f"trajectory {traj.id!r}: whole_text=True cannot use stored token_ids")
        r = render(traj, fmt)
        out = token_masks(r.text, r.spans, tokenizer, max_length, add_special_tokens)
        return {**out, "topk_ids": None, "topk_logprobs": None, "topk_mask": None, "id": traj.id}

    where = f"trajectory {traj.id!r}"
    ids, kinds, rows, turn_starts = _encode_pieces(_pieces(traj.prompt, traj.turns, fmt), traj.turns, tokenizer,
                                                   add_special_tokens, where)
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
