"""Agent formats: rendering, span parsing of raw transcripts, token masks, stored-token alignment."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import raysad
from raysad.agent_formats import FormatError, get_format
from raysad.encoding import (TOPK_PAD_LOGPROB, check_piecewise, encode_context, encode_trajectory, fit_to_length,
                             token_masks)
from raysad.segments import _lead, parse_turn, render, render_context, segment_text
from raysad.trajectory import Trajectory, Turn

# --- hand-written trajectories and their expected spans --------------------------------------------------

HOTPOT_PROMPT = ("Solve a question answering task with interleaving Thought, Action, Observation steps.\n"
                 "Question: What is the elevation range for the area that the eastern sector of the Colorado "
                 "orogeny extends into?\n")
HOTPOT = Trajectory(
    id="h1", env="hotpotqa", task_id="hq-1", split="dev", instruction="What is the elevation range?",
    prompt=HOTPOT_PROMPT, reward=1.0, success=True, policy={"backend": "expert", "model": ""},
    turns=[
        Turn("I should search Colorado orogeny.", "Search[Colorado orogeny]",
             "The Colorado orogeny was an episode of mountain building in Colorado and surrounding areas."),
        Turn("", "Lookup[eastern sector]", "(Result 1 / 1) The eastern sector extends into the High Plains."),
        Turn("High Plains rise from around 1,800 to 7,000 ft, so the answer is 1,800 to 7,000 ft.",
             "Finish[1,800 to 7,000 ft]", "Episode finished, reward = 1"),
    ])
HOTPOT_SPANS = [
    ("prompt", HOTPOT_PROMPT),
    ("obs", "Thought 1: "),
    ("reason", "I should search Colorado orogeny.\n"),
    ("obs", "Action 1: "),
    ("act", "Search[Colorado orogeny]\n"),
    ("obs", "Observation 1: The Colorado orogeny was an episode of mountain building in Colorado and "
            "surrounding areas.\nAction 2: "),
    ("act", "Lookup[eastern sector]\n"),
    ("obs", "Observation 2: (Result 1 / 1) The eastern sector extends into the High Plains.\nThought 3: "),
    ("reason", "High Plains rise from around 1,800 to 7,000 ft, so the answer is 1,800 to 7,000 ft.\n"),
    ("obs", "Action 3: "),
    ("act", "Finish[1,800 to 7,000 ft]\n"),
    ("obs", "Observation 3: Episode finished, reward = 1\n"),
]

ALF_PROMPT = ("Interact with a household to solve a task.\nYou are in the middle of a room. Looking quickly "
              "around you, you see a cabinet 1, a countertop 1, and a sinkbasin 1.\n"
              "Your task is to: put a clean mug in coffeemachine.")  # no final newline: render adds one
ALF = Trajectory(
    id="a1", env="alfworld", task_id="pick_clean_then_place-Mug-1", split="train",
    instruction="put a clean mug in coffeemachine.", prompt=ALF_PROMPT, reward=0.0, success=False,
    policy={"backend": "hf", "model": "tiny"},
    turns=[
        Turn("To solve the task, I need to find and take a mug, then clean it with sinkbasin.",
             "go to countertop 1", "On the countertop 1, you see a mug 1."),
        Turn("", "take mug 1 from countertop 1", "You pick up the mug 1 from the countertop 1."),
    ])
ALF_SPANS = [
    ("prompt", ALF_PROMPT + "\n"),
    ("obs", "> think: "),
    ("reason", "To solve the task, I need to find and take a mug, then clean it with sinkbasin.\n"),
    ("obs", "OK.\n> "),
    ("act", "go to countertop 1\n"),
    ("obs", "On the countertop 1, you see a mug 1.\n> "),
    ("act", "take mug 1 from countertop 1\n"),
    ("obs", "You pick up the mug 1 from the countertop 1.\n"),
]

SHOP_PROMPT = ("WebShop [SEP] Instruction: [SEP] i need a long clip-in hair extension which is natural looking, "
               "and price lower than 40.00 dollars [SEP] Search\n")
SHOP = Trajectory(
    id="w1", env="webshop", task_id="ws-7", split="test", instruction="i need a long clip-in hair extension",
    prompt=SHOP_PROMPT, reward=0.75, success=False, policy={"backend": "vllm", "model": "teacher"},
    turns=[
        Turn("", "search[long clip-in hair extension natural looking]",
             "[Back to Search] [SEP] Page 1 (Total results: 50) [SEP] B09QQLDJ93 [SEP] Hair Extensions [SEP] $24.99"),
        Turn("B09QQLDJ93 is a clip-in hair extension [natural] under 40 dollars. I can check it first.",
             "click[B09QQLDJ93]", "[Back to Search] [SEP] Hair Extensions 22 inch [SEP] Price: $24.99 [SEP] Buy Now"),
    ])
SHOP_SPANS = [
    ("prompt", SHOP_PROMPT),
    ("obs", "Action: "),
    ("act", "search[long clip-in hair extension natural looking]\n"),
    ("obs", "Observation: [Back to Search] [SEP] Page 1 (Total results: 50) [SEP] B09QQLDJ93 [SEP] Hair Extensions"
            " [SEP] $24.99\n\nAction: think["),
    ("reason", "B09QQLDJ93 is a clip-in hair extension [natural] under 40 dollars. I can check it first.]"),
    ("obs", "\nObservation: OK.\n\nAction: "),
    ("act", "click[B09QQLDJ93]\n"),
    ("obs", "Observation: [Back to Search] [SEP] Hair Extensions 22 inch [SEP] Price: $24.99 [SEP] Buy Now\n\n"),
]

CASES = {"hotpotqa": (HOTPOT, HOTPOT_SPANS), "alfworld": (ALF, ALF_SPANS), "webshop": (SHOP, SHOP_SPANS)}

USER_YAML = """\
name: reasoning_action
reason_prefix: "Reasoning: "
reason_end: "\\n"
act_prefix: ""
act_end: "\\n"
observation: "Observation: {observation}\\n"
line_patterns:
  - {kind: reason, regex: '^Reasoning: (?P<body>.*\\n?)'}
  - {kind: act, regex: '^(?P<body>(?:Action|Answer): .*\\n?)'}
  - {kind: obs, regex: '^Observation: '}
"""


def pieces(r):
    return [(s.kind, r.text[s.start:s.end]) for s in r.spans]


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the test texts (no download); bos=True adds <bos> like Llama."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [render(t).text for t, _ in CASES.values()] * 2
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<bos>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --- rendering -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_render_gives_the_expected_spans(name):
    traj, expected = CASES[name]
    r = render(traj, name)
    assert pieces(r) == expected
    assert r.text == "".join(text for _, text in expected)
    assert [s.start for s in r.spans[1:]] == [s.end for s in r.spans[:-1]]  # contiguous, whole text
    assert r.prompt_end == len(expected[0][1])
    assert render(traj).text == r.text  # fmt defaults to the format named like traj.env


@pytest.mark.parametrize("name", CASES)
def test_segment_text_of_rendered_text_gives_the_same_spans(name):
    traj, _ = CASES[name]
    r = render(traj, name)
    spans, stats = segment_text(r.text, name)
    assert spans == r.spans
    assert segment_text(r.text, name, prompt_end=r.prompt_end)[0] == r.spans
    assert stats["unmatched_lines"] == 0 and stats["thoughts_without_action"] == 0
    assert stats["turns"] == len(traj.turns)
    assert stats["reason_lines"] == sum(1 for t in traj.turns if t.thought)
    assert stats["actions_without_thought"] == sum(1 for t in traj.turns if not t.thought)


def test_few_shot_examples_in_the_prompt_stay_prompt_with_prompt_end():
    example = ("Question: Which magazine was started first?\nThought 1: I need to search both.\n"
               "Action 1: Search[Arthur's Magazine]\nObservation 1: Arthur's Magazine (1844-1846).\n")
    traj = Trajectory(**{**HOTPOT.__dict__, "prompt": example + HOTPOT_PROMPT})
    r = render(traj)
    spans, _ = segment_text(r.text, "hotpotqa", prompt_end=r.prompt_end)
    assert spans == r.spans
    naive, _ = segment_text(r.text, "hotpotqa")  # without the boundary the example's thought counts
    assert r.text[naive[2].start:naive[2].end] == "I need to search both.\n" and naive[2].kind == "reason"


@pytest.mark.parametrize("name", CASES)
def test_render_context_is_a_prefix_of_render(name):
    traj, _ = CASES[name]
    fmt = get_format(name)
    full = render(traj, fmt).text
    for n in range(len(traj.turns) + 1):
        assert full.startswith(render_context(traj.prompt, traj.turns[:n], fmt))
    assert render_context(traj.prompt, traj.turns, fmt) == full


def _leads(fmt) -> dict[str, str]:
    return {"reason": _lead(fmt.reason_prefix)[1], "act": _lead(fmt.act_prefix)[1]}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("stored", [False, True])
def test_context_ids_are_exactly_the_training_ids_before_each_segment(tokenizer, name, stored):
    """Token-in, token-out: what an engine is given to write a thought / an action is, id for id, what the
    training example holds before that segment (with stored ids and with text-only turns)."""
    traj, _ = CASES[name]
    fmt = get_format(name)
    if stored:
        traj = Trajectory(**{**traj.__dict__, "turns": [
            _generated(tokenizer, fmt, t.thought, t.action, t.observation, k=2, seed=n)
            for n, t in enumerate(traj.turns)]})
    example = list(encode_trajectory(traj, tokenizer, fmt)["input_ids"])
    for n, turn in enumerate(traj.turns):
        placeholder = Turn("", "", "")
        thought_ctx = encode_context(traj.prompt, [*traj.turns[:n], placeholder], "thought", tokenizer, fmt)
        action_ctx = encode_context(traj.prompt, [*traj.turns[:n], turn], "action", tokenizer, fmt)
        assert example[:len(action_ctx)] == action_ctx
        if stored:
            k = turn.num_thought_tokens
            if k:  # the thought phase ran: its context, then the generated ids, then the action's context
                assert example[:len(thought_ctx) + k] == thought_ctx + turn.token_ids[:k]
            assert example[len(action_ctx):len(action_ctx) + len(turn.token_ids) - k] == turn.token_ids[k:]
        elif turn.thought:
            assert example[:len(thought_ctx)] == thought_ctx
    with pytest.raises(ValueError, match="role must be"):
        encode_context(traj.prompt, [Turn("", "", "")], "observation", tokenizer, fmt)


def test_prefix_lead_goes_with_the_generated_text(tokenizer):
    """'Thought 1: ' is never tokenised with its trailing space alone: the context ends at 'Thought 1:' and
    the thought's ids start with ' I' (as a pretrained BPE model writes it)."""
    fmt = get_format("hotpotqa")
    ctx = encode_context("Question: q\n", [Turn("", "", "")], "thought", tokenizer, fmt)
    assert tokenizer.decode(ctx) == "Question: q\nThought 1:"
    out = encode_trajectory(HOTPOT, tokenizer, fmt)
    first = _runs(out["reason_mask"])[0]
    assert tokenizer.decode(out["input_ids"][first[0]:first[1]]) == " I should search Colorado orogeny.\n"
    turn = parse_turn(" I think.\n", " Search[x]\n", fmt)
    assert (turn.thought, turn.action) == ("I think.", "Search[x]")


def test_parse_turn_cuts_at_the_end_delimiters():
    fmt = get_format("webshop")
    turn = parse_turn("the cheaper one is better]\nObservation: OK.", "click[buy now]\nObservation:", fmt)
    assert (turn.thought, turn.action, turn.observation) == ("the cheaper one is better", "click[buy now]", "")
    assert fmt.reason_stop == ["]"] and fmt.act_stop == ["\n"]
    hot = parse_turn("no delimiter because the engine dropped it", "  Search[x]", "hotpotqa")
    assert (hot.thought, hot.action) == ("no delimiter because the engine dropped it", " Search[x]")


# --- raw transcripts -------------------------------------------------------------------------------------

def test_raw_hotpotqa_transcript_counts_stray_lines_and_thoughts_without_action():
    text = ("Question: Who was born first?\n"
            "Thought 1: I need to search Adam Clayton Powell.\n"
            "Action 1: Search[Adam Clayton Powell]\n"
            "Observation 1: Could not find [Adam Clayton Powell].\n"
            "(the model rambled here)\n"
            "Thought 2: Maybe the film.\n"
            "Thought 3: I should search the documentary.\n"
            "Action 3: Search[The Saimaa Gesture]\n"
            "Observation 3: The Saimaa Gesture is a 1981 film.\n"
            "Thought 4: So the answer is the film")  # cut off: a thought without an action, no newline
    spans, stats = segment_text(text, "hotpotqa")
    got = [(s.kind, text[s.start:s.end]) for s in spans if s.kind in ("reason", "act", "prompt")]
    assert got == [("prompt", "Question: Who was born first?\n"),
                   ("reason", "I need to search Adam Clayton Powell.\n"), ("act", "Search[Adam Clayton Powell]\n"),
                   ("reason", "Maybe the film.\n"), ("reason", "I should search the documentary.\n"),
                   ("act", "Search[The Saimaa Gesture]\n"), ("reason", "So the answer is the film")]
    stray = text.index("(the model")
    assert any(s.kind == "obs" and s.start <= stray < s.end for s in spans)
    assert stats == dict(lines=10, reason_lines=4, act_lines=2, obs_lines=2, unmatched_lines=1, turns=4,
                         thoughts_without_action=2, actions_without_thought=0)


def test_raw_alfworld_and_webshop_transcripts():
    alf = ("You are in the middle of a room.\nYour task is to: heat some egg and put it in diningtable.\n"
           "> think: First I need to find an egg.\nOK.\n> open fridge 1\nYou open the fridge 1.\n"
           "The fridge 1 is open. In it, you see a egg 1.\n> think: Now I take it.\n")
    spans, stats = segment_text(alf, "alfworld")
    assert [(s.kind, alf[s.start:s.end]) for s in spans if s.kind in ("reason", "act")] == [
        ("reason", "First I need to find an egg.\n"), ("act", "open fridge 1\n"), ("reason", "Now I take it.\n")]
    assert stats["unmatched_lines"] == 0 and stats["obs_lines"] == 3 and stats["thoughts_without_action"] == 1
    shop = ("WebShop [SEP] Instruction: [SEP] i want a red mug\nAction: search[red mug]\nObservation:\n"
            "[Back to Search]\nPage 1 (Total results: 3)\nAction: think[The first one is red.]\n"
            "Observation: OK.\n\nAction: click[B01]\n")
    spans, stats = segment_text(shop, "webshop")
    assert [(s.kind, shop[s.start:s.end]) for s in spans if s.kind != "obs"] == [
        ("prompt", "WebShop [SEP] Instruction: [SEP] i want a red mug\n"), ("act", "search[red mug]\n"),
        ("reason", "The first one is red.]"), ("act", "click[B01]\n")]
    assert stats["turns"] == 2 and stats["unmatched_lines"] == 0


# --- formats from YAML -----------------------------------------------------------------------------------

def test_user_yaml_format_renders_and_segments(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(USER_YAML)
    fmt = get_format(path)
    assert fmt.name == "reasoning_action" and fmt.ack == ""
    traj = Trajectory(
        id="u1", env="custom", task_id="c-1", split="train", instruction="2+2?", prompt="Task: what is 2+2?\n",
        reward=1.0, success=True, policy={},
        turns=[Turn("I can use the calculator.", "Action: calc[2+2]", "4"),
               Turn("The calculator says 4.", "Answer: 4", "correct")])
    r = render(traj, fmt)
    assert pieces(r) == [
        ("prompt", "Task: what is 2+2?\n"), ("obs", "Reasoning: "), ("reason", "I can use the calculator.\n"),
        ("act", "Action: calc[2+2]\n"), ("obs", "Observation: 4\nReasoning: "),
        ("reason", "The calculator says 4.\n"), ("act", "Answer: 4\n"), ("obs", "Observation: correct\n")]
    assert segment_text(r.text, fmt)[0] == r.spans
    shipped = get_format(Path(raysad.__file__).parent / "formats" / "example_reasoning_action.yaml")
    assert render(traj, shipped).spans == r.spans


@pytest.mark.parametrize("yaml_text, message", [
    (USER_YAML.replace('act_end: "\\n"\n', ""), "field 'act_end': missing"),
    (USER_YAML.replace("(?P<body>.*\\n?)'}\n  - {kind: act", "(?P<body>.*\\n?'}\n  - {kind: act"),
     "field 'line_patterns[0].regex': invalid regex"),
    (USER_YAML.replace("kind: obs", "kind: answer"), "field 'line_patterns[2].kind': expected reason, act or obs"),
    (USER_YAML.replace("{observation}", "{obs}"), "field 'observation': unknown placeholder {obs}"),
    (USER_YAML.replace('reason_end: "\\n"', 'reason_end: ""'), "field 'reason_end': must not be empty"),
    (USER_YAML + "colour: blue\n", "unknown field(s) 'colour'"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_format_names_file_and_field(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(FormatError) as err:
        get_format(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_unknown_format_name_lists_the_builtins():
    with pytest.raises(FormatError, match="built-in: hotpotqa, alfworld, webshop"):
        get_format("react")


# --- token masks -----------------------------------------------------------------------------------------

def _runs(mask):
    """(start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("name", CASES)
def test_token_masks_follow_the_spans(tokenizer, name):
    traj, expected = CASES[name]
    r = render(traj, name)
    out = token_masks(r.text, r.spans, tokenizer)
    ids, reason, act = out["input_ids"], out["reason_mask"], out["act_mask"]
    assert len(ids) == len(reason) == len(act) and not (reason & act).any()
    assert tokenizer.decode(ids) == r.text and not out["truncated"]
    offsets = tokenizer(r.text, return_offsets_mapping=True)["offset_mapping"]
    for (s, e), is_loss in zip(offsets, reason | act):
        inside_no_loss = any(sp.kind in ("prompt", "obs") and sp.start <= s and e <= sp.end for sp in r.spans)
        if inside_no_loss:
            assert not is_loss  # a token wholly in prompt/obs text never carries loss
    # each masked run decodes to its segment (a BPE token may bring the prefix's space along)
    for mask, kind in ((reason, "reason"), (act, "act")):
        decoded = [tokenizer.decode(ids[a:b]) for a, b in _runs(mask)]
        wanted = [text for k, text in expected if k == kind]
        assert [d.strip() for d in decoded] == [w.strip() for w in wanted]


def test_token_masks_on_raw_text_and_truncation(tokenizer):
    text = "Question: x\nThought 1: look it up\nAction 1: Search[x]\nObservation 1: nothing\n"
    spans, _ = segment_text(text, "hotpotqa")
    full = token_masks(text, spans, tokenizer)
    cut = token_masks(text, spans, tokenizer, max_length=5)
    assert cut["truncated"] and cut["num_tokens"] == len(full["input_ids"]) > 5
    first_loss = int(np.argmax(full["reason_mask"] | full["act_mask"]))
    # the prompt goes from the left (all but the token before the first target), then the end is cut
    assert cut["dropped_prompt_tokens"] == first_loss - 1
    kept = full["input_ids"][first_loss - 1:first_loss - 1 + 5]
    assert list(cut["input_ids"]) == list(kept) and len(cut["reason_mask"]) == 5
    loss = full["reason_mask"] | full["act_mask"]
    assert cut["dropped_loss_tokens"] == int(loss.sum()) - int((cut["reason_mask"] | cut["act_mask"]).sum())


@pytest.mark.parametrize("name", CASES)
def test_encode_trajectory_without_stored_ids_is_exact_per_segment(tokenizer, name):
    traj, expected = CASES[name]
    out = encode_trajectory(traj, tokenizer, name)
    ids = out["input_ids"]
    assert tokenizer.decode(ids) == render(traj, name).text  # pieces concatenate to the rendered text
    leads = _leads(get_format(name))
    for mask, kind in ((out["reason_mask"], "reason"), (out["act_mask"], "act")):
        assert [tokenizer.decode(ids[a:b]) for a, b in _runs(mask)] == [leads[kind] + t for k, t in expected
                                                                        if k == kind]
    assert out["topk_ids"] is None and out["topk_mask"] is None and out["id"] == traj.id
    whole = encode_trajectory(traj, tokenizer, name, whole_text=True)
    assert tokenizer.decode(whole["input_ids"]) == render(traj, name).text


def _generated(tokenizer, fmt, thought, action, observation, k, seed):
    """A turn as a model would record it: ids of thought+end and action+end, with synthetic top-k rows whose
    first entry is the chosen token and whose log-probs encode (seed, position)."""
    fmt = get_format(fmt)
    leads = _leads(fmt)
    t_ids = tokenizer(leads["reason"] + thought + fmt.reason_end, add_special_tokens=False)["input_ids"] \
        if thought else []
    a_ids = tokenizer(leads["act"] + action + fmt.act_end, add_special_tokens=False)["input_ids"]
    ids = t_ids + a_ids
    topk_ids = [[tid] + [(tid + m) % 50 + 2 for m in range(1, k)] for tid in ids]
    topk_lp = [[-(seed + j / 100)] + [-10.0 - m for m in range(1, k)] for j in range(len(ids))]
    return Turn(thought, action, observation, token_ids=ids, num_thought_tokens=len(t_ids),
                topk_ids=topk_ids, topk_logprobs=topk_lp)


def test_encode_trajectory_splices_stored_ids_and_aligns_topk():
    tok = tiny_tokenizer(bos=True)
    fmt = get_format("hotpotqa")
    a = _generated(tok, fmt, "I should search Colorado orogeny.", "Search[Colorado orogeny]", "It is in Colorado.",
                   k=3, seed=1)
    b = Turn("", "Lookup[eastern sector]", "High Plains.")  # an expert turn: no stored ids
    c = _generated(tok, fmt, "So the answer is 1,800 ft.", "Finish[1,800 ft]", "Episode finished", k=2, seed=3)
    traj = Trajectory(**{**HOTPOT.__dict__, "turns": [a, b, c]})
    out = encode_trajectory(traj, tok, fmt)
    ids, reason, act, tmask = out["input_ids"], out["reason_mask"], out["act_mask"], out["topk_mask"]
    assert ids[0] == tok.bos_token_id and not (reason[0] or act[0] or tmask[0])
    assert tok.decode(ids, skip_special_tokens=True) == render(traj, fmt).text
    # the stored ids appear verbatim, in order, at the rows that carry top-k
    assert list(ids[tmask]) == a.token_ids + c.token_ids
    assert out["topk_ids"].shape == (len(ids), 3) and out["topk_logprobs"].dtype == np.float32
    assert (out["topk_ids"][tmask][:, 0] == ids[tmask]).all()  # row t is the distribution for token t
    want_lp = [row + [TOPK_PAD_LOGPROB] * (3 - len(row)) for row in a.topk_logprobs + c.topk_logprobs]
    np.testing.assert_allclose(out["topk_logprobs"][tmask], np.asarray(want_lp, dtype=np.float32))
    assert (out["topk_logprobs"][~tmask] == TOPK_PAD_LOGPROB).all() and (out["topk_ids"][~tmask] == 0).all()
    # masks: stored thought ids are reason, stored action ids act; the expert turn's action is tokenised
    runs = [(tok.decode(ids[s:e]), "reason" if reason[s] else "act") for s, e in _runs(reason | act)]
    assert runs == [(" I should search Colorado orogeny.\n", "reason"), (" Search[Colorado orogeny]\n", "act"),
                    (" Lookup[eastern sector]\n", "act"), (" So the answer is 1,800 ft.\n", "reason"),
                    (" Finish[1,800 ft]\n", "act")]
    first_thought = np.flatnonzero(reason)[: a.num_thought_tokens]
    assert list(ids[first_thought]) == a.token_ids[: a.num_thought_tokens]
    # truncation keeps every array aligned
    cut = encode_trajectory(traj, tok, fmt, max_length=20)
    assert cut["truncated"] and all(len(cut[key]) <= 20 for key in
                                    ("input_ids", "reason_mask", "act_mask", "topk_ids", "topk_logprobs", "topk_mask"))
    assert len({len(cut[key]) for key in ("input_ids", "reason_mask", "topk_ids", "topk_mask")}) == 1


def test_stored_thought_ids_of_an_empty_thought_are_kept(tokenizer):
    """A model that wrote only the delimiter as its thought still saw '> think: \n' when it wrote the action:
    the example keeps those ids (reason tokens) and render shows the same text."""
    fmt = get_format("alfworld")
    t = _generated(tokenizer, fmt, "x", "go to desk 1", "You arrive at desk 1.", k=2, seed=0)
    delim = tokenizer(fmt.reason_end, add_special_tokens=False)["input_ids"]
    t.thought = ""
    t.token_ids = delim + t.token_ids[t.num_thought_tokens:]
    t.topk_ids = [[i, 3] for i in t.token_ids]
    t.topk_logprobs = [[-0.1, -3.0] for _ in t.token_ids]
    t.num_thought_tokens = len(delim)
    traj = Trajectory(**{**ALF.__dict__, "turns": [t]})
    out = encode_trajectory(traj, tokenizer, fmt)
    assert list(out["input_ids"][out["reason_mask"]]) == delim
    assert tokenizer.decode(out["input_ids"][out["act_mask"]]) == " go to desk 1\n"
    assert out["topk_mask"].sum() == len(t.token_ids)
    # the ids are what the model wrote (no lead space before its newline); render writes the prefix as is
    assert tokenizer.decode(out["input_ids"]) == render(traj, fmt).text.replace("> think: \n", "> think:\n")


def test_fit_to_length_cuts_the_prompt_from_the_left_and_whole_turns_from_the_end():
    n = 12  # [bos] p p p p T T T | turn 2 starts at 8: T T T T
    out = {"input_ids": np.arange(n), "reason_mask": np.zeros(n, bool), "act_mask": np.zeros(n, bool)}
    out["reason_mask"][[5, 6, 9, 10]] = True
    out["act_mask"][[7, 11]] = True
    short = fit_to_length({k: v.copy() for k, v in out.items()}, 10, head=1, boundaries=[8, 12])
    assert list(short["input_ids"]) == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # bos kept, 2 prompt tokens gone
    assert (short["dropped_prompt_tokens"], short["dropped_loss_tokens"], short["dropped_turns"]) == (2, 0, 0)
    shorter = fit_to_length({k: v.copy() for k, v in out.items()}, 6, head=1, boundaries=[8, 12])
    # all of the prompt but the token before the first target goes, then turn 2 (whole) goes from the end
    assert list(shorter["input_ids"]) == [0, 4, 5, 6, 7]
    assert (shorter["dropped_prompt_tokens"], shorter["dropped_loss_tokens"], shorter["dropped_turns"]) == (3, 3, 1)
    same = fit_to_length({k: v.copy() for k, v in out.items()}, 12, head=1)
    assert not same["truncated"] and same["num_tokens"] == 12 and len(same["input_ids"]) == 12


def test_a_tokenizer_that_adds_a_prefix_space_to_every_piece_is_refused():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "Observation": 1, "1": 2, ":": 3, "a": 4, "Thought": 5, "2": 6},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces: the pieces do not concatenate to their text
    with pytest.raises(ValueError, match="piecewise"):
        check_piecewise(PreTrainedTokenizerFast(tokenizer_object=tok))
    check_piecewise(tiny_tokenizer())


def test_stored_ids_from_another_tokenizer_fail_clearly(tokenizer):
    turn = Turn("x", "go to desk 1", "ok", token_ids=[5, len(tokenizer) + 7], num_thought_tokens=1)
    traj = Trajectory(**{**ALF.__dict__, "turns": [turn]})
    with pytest.raises(ValueError, match=rf"trajectory 'a1': stored token id {len(tokenizer) + 7} is outside"):
        encode_trajectory(traj, tokenizer, "alfworld")


def test_chat_prompt_wraps_the_task_as_the_users_message(smollm2_dir, tokenizer):
    """--chat-template: the prompt becomes the user's message with the assistant's turn opened; its special
    tokens are encoded as themselves (one id each) and turns follow as the assistant's text."""
    from raysad.models import load_tokenizer
    from raysad.encoding import chat_prompt

    tok = load_tokenizer(smollm2_dir)
    text = chat_prompt(tok, "Question: where is the apple?\n")
    assert "Question: where is the apple?" in text and text.endswith("<|im_start|>assistant\n")
    ids = encode_context(text, [Turn("", "", "")], "thought", tok, "hotpotqa")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == text.count("<|im_start|>") >= 2  # special tokens, not their characters
    assert tok.decode(ids).endswith("<|im_start|>assistant\nThought 1:")
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tokenizer, "Question: x\n")
