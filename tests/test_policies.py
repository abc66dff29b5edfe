"""raysad.policies: the HF engine (top-k capture, stop strings, batching), cut_at_stop, next_turns, expert."""
from __future__ import annotations

import pytest
import torch

from raysad import models
from raysad.policies import Generation, cut_at_stop, make_policy, next_turns
from raysad.policies.expert import ExpertPolicy, expert_turns
from raysad.policies.hf import HFEngine
from raysad.agent_formats import get_format
from raysad.encoding import encode_context, encode_trajectory
from raysad.segments import _lead
from raysad.trajectory import Trajectory, Turn
from raysad_envs.core import TextEnv

TEXT = [
    f"Thought {i}: I need to find the {w} of item {i * 7}.\nAction {i}: Search[item {i * 7} {w}]\n"
    f"Observation {i}: The item {i * 7} has a {w} of {i * 3} units.\n"
    for i in range(40) for w in ("price", "colour", "size")
] + ["Action: think[I should search for a red shirt.]\nObservation: OK.\n\nAction: search[red shirt]\n",
     "> think: I need a mug.\nOK.\n> go to countertop 1\nOn the countertop 1, you see a mug 2.\n"] * 5

PROMPTS = ["Question: which item is red?\n", "Thought 1: ", "Observation 3: The item 21 has a size of 9"]


@pytest.fixture(scope="module")
def tokenizer():
    return models.train_tokenizer(TEXT, vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer):
    # a large init scale gives peaked, varied next-token distributions: random text with real stop strings
    # in it, and no near-ties that batching noise could flip under greedy decoding
    model = models.build_tiny_model({"num_hidden_layers": 2, "initializer_range": 0.5}, tokenizer, seed=0)
    # zero EOS/pad embedding rows (tied): their logit is 0, far below the best one, so random text runs on
    with torch.no_grad():
        model.get_input_embeddings().weight[[tokenizer.eos_token_id, tokenizer.pad_token_id]] = 0
    return model


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return HFEngine(model, tokenizer, batch_size=8, max_new_tokens=24)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def forward_logprobs(engine, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-probs of the model at each generated position, by one unbatched forward pass."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt_ids + ids])).logits[0]
    return logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(ids)].log_softmax(-1)


def check_topk(engine, prompt: list[int], gen: Generation, k: int) -> None:
    vocab = len(engine.tokenizer)
    assert len(gen.topk_ids) == len(gen.topk_logprobs) == len(gen.token_ids)
    ids, lps = torch.tensor(gen.topk_ids), torch.tensor(gen.topk_logprobs)
    assert ids.shape == (len(gen.token_ids), k)
    assert ((ids >= 0) & (ids < vocab)).all()
    assert (lps <= 0).all() and (lps.exp().sum(-1) <= 1 + 1e-5).all()
    assert (lps[:, :-1] >= lps[:, 1:]).all()  # best first
    expected = forward_logprobs(engine, prompt, gen.token_ids)
    torch.testing.assert_close(lps, expected.gather(1, ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lps, expected.topk(k).values, atol=1e-4, rtol=1e-4)


def test_token_logprobs_are_the_models_log_probs_of_the_given_tokens(engine, prompt_ids):
    """engine.token_logprobs (what the reference CE is made of): the log-prob of each given token, teacher-forced;
    for the engine's own greedy tokens, each is its position's best."""
    gens = engine.generate(prompt_ids, max_tokens=12, topk=1)
    given = engine.token_logprobs(prompt_ids, [g.token_ids for g in gens])
    for prompt, gen, logprobs in zip(prompt_ids, gens, given):
        expected = forward_logprobs(engine, prompt, gen.token_ids)
        ids = torch.tensor(gen.token_ids)[:, None]
        torch.testing.assert_close(torch.tensor(logprobs), expected.gather(1, ids)[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(gen.topk_logprobs)[:, 0], atol=1e-4,
                                   rtol=1e-4)
    shifted = engine.token_logprobs(prompt_ids[:1], [gens[0].token_ids[1:] + gens[0].token_ids[:1]])[0]
    assert sum(shifted) < sum(given[0])  # other tokens at those positions: less likely


def test_topk_capture_matches_the_models_own_logprobs(engine, prompt_ids):
    gens = engine.generate(prompt_ids, max_tokens=12, topk=5)
    for prompt, gen in zip(prompt_ids, gens):
        assert gen.finish_reason == "length" and len(gen.token_ids) == 12
        assert engine.tokenizer.decode(gen.token_ids) == gen.text
        check_topk(engine, prompt, gen, 5)
        assert [row[0] for row in gen.topk_ids] == gen.token_ids  # greedy: the generated token is the top one


def test_batched_equals_one_by_one(engine, prompt_ids):
    together = engine.generate(prompt_ids, max_tokens=16, topk=3)
    for prompt, gen in zip(prompt_ids, together):
        alone = engine.generate([prompt], max_tokens=16, topk=3)[0]
        assert alone.token_ids == gen.token_ids and alone.text == gen.text
        torch.testing.assert_close(torch.tensor(alone.topk_logprobs), torch.tensor(gen.topk_logprobs),
                                   atol=1e-4, rtol=1e-4)


def test_rows_that_stop_leave_the_decode_batch(engine, tokenizer, prompt_ids):
    """With "1" as the stop these 7 rows stop after 25, 3, 8, 25, 2, 5 and 2 tokens: rows that have stopped are
    no longer decoded along with the longest ones, and every row is still what it would be alone."""
    more = ["Action 2: Search[item 14", "Thought 5: I need", "> go to countertop 1\n", "Observation: OK.\n"]
    prompts = prompt_ids + [tokenizer.encode(p, add_special_tokens=False) for p in more]
    engine.decoded_rows = 0
    together = engine.generate(prompts, stop=["1"], max_tokens=24, topk=3)
    lengths = [len(g.token_ids) for g in together]
    # (the premise: some rows stop early, two or more run on after the batch has shrunk)
    assert min(lengths) < 5 and sum(n == max(lengths) for n in lengths) >= 2
    static = len(prompts) * (24 - 1)  # every row decoded to the end of the longest (the first token is prefill's)
    assert engine.decoded_rows < 0.6 * static
    for prompt, gen in zip(prompts, together):
        alone = engine.generate([prompt], stop=["1"], max_tokens=24, topk=3)[0]
        assert alone.token_ids == gen.token_ids and alone.finish_reason == gen.finish_reason
        check_topk(engine, prompt, gen, 3)


def test_keys_and_values_written_in_place_decode_as_transformers_cache_does(model, tokenizer, prompt_ids):
    """The engine's own cache layers (spare columns, written in place; grown several times in 20+ steps from
    short prompts, and cut when rows stop) give the tokens and log-probs of transformers' DynamicLayer."""
    from raysad.policies.hf import _growing_cache

    assert {type(layer).__name__ for layer in _growing_cache(model).layers} == {"GrowingLayer"}
    outs = [HFEngine(model, tokenizer, prefix_cache=4, growing_cache=growing).generate(
        prompt_ids, stop=["1"], max_tokens=40, topk=3) for growing in (True, False)]
    assert max(len(g.token_ids) for g in outs[0]) > 20 > min(len(g.token_ids) for g in outs[0])
    for grown, plain in zip(*outs):
        assert grown.token_ids == plain.token_ids
        torch.testing.assert_close(torch.tensor(grown.topk_logprobs), torch.tensor(plain.topk_logprobs),
                                   atol=1e-5, rtol=1e-5)


def test_stop_strings_cut_text_and_tokens(engine, tokenizer, prompt_ids):
    free = engine.generate(prompt_ids[:2], max_tokens=16)
    checked_overshoot = False
    for prompt, gen in zip(prompt_ids[:2], free):
        pieces = [tokenizer.decode([t]) for t in gen.token_ids]
        # a stop inside a multi-character token (the model's token runs past it), and one at a token's end
        inner = next(((j, p) for j, p in enumerate(pieces) if len(p) > 1 and j > 0), None)
        stops = [pieces[3][-1:] or pieces[3]]
        if inner is not None:
            stops.append(inner[1][0])
        for stop in stops:
            cut = gen.text.index(stop) + len(stop)
            out = engine.generate([prompt], stop=[stop, "\x00never"], max_tokens=16, topk=4)[0]
            assert out.text == gen.text[:cut] and out.finish_reason == "stop"
            assert tokenizer.decode(out.token_ids) == out.text
            check_topk(engine, prompt, out, 4)
            checked_overshoot |= not gen.text[:cut] == tokenizer.decode(gen.token_ids[:len(out.token_ids)])
    assert checked_overshoot  # at least one stop ended inside a generated token


def test_text_is_closed_with_the_stop_when_tokens_run_out(engine, tokenizer):
    stop = "]\n"
    prompt = tokenizer.encode("Thought 1: ", add_special_tokens=False)
    out = engine.generate([prompt], stop=[stop], max_tokens=6, topk=3)[0]
    free = engine.generate([prompt], max_tokens=6)[0]
    assert stop not in free.text  # (the premise: the model does not write it by itself here)
    assert out.finish_reason == "length" and out.text == free.text + stop
    assert out.token_ids[:6] == free.token_ids and tokenizer.decode(out.token_ids) == out.text
    check_topk(engine, prompt, out, 3)  # the appended delimiter tokens are scored too


def test_sampling_is_seeded(engine, prompt_ids):
    a = engine.generate(prompt_ids[:2], max_tokens=10, temperature=1.0, seed=7)
    b = engine.generate(prompt_ids[:2], max_tokens=10, temperature=1.0, seed=7)
    greedy = engine.generate(prompt_ids[:2], max_tokens=10)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


def test_prefix_cache_reuses_keys_and_values_exactly(model, tokenizer, prompt_ids):
    """An agent-like sequence of calls, each prompt extending an earlier prompt + its generation, gives the same
    tokens and top-k log-probs with the cache as without, while most prompt tokens come from the cache."""
    cached = HFEngine(model, tokenizer, batch_size=8, prefix_cache=8)
    plain = HFEngine(model, tokenizer, batch_size=8, prefix_cache=0)
    contexts = [list(p) for p in prompt_ids]
    for turn in range(3):
        # (rows stop at different steps: those that stop first leave the batch, their keys/values kept then)
        outs = [e.generate(contexts, stop=["1", "."], max_tokens=10, topk=3) for e in (cached, plain)]
        for with_cache, without in zip(*outs):
            assert with_cache.token_ids == without.token_ids and with_cache.text == without.text
            torch.testing.assert_close(torch.tensor(with_cache.topk_logprobs),
                                       torch.tensor(without.topk_logprobs), atol=1e-4, rtol=1e-4)
        # rows move on by different amounts, and one row starts afresh: a batch mixes cached prefixes of
        # different lengths with a row that has none
        contexts = [c + g.token_ids + tokenizer.encode(f" obs {turn}{'!' * i}\n", add_special_tokens=False)
                    for i, (c, g) in enumerate(zip(contexts, outs[0]))]
        contexts[turn % 3] = tokenizer.encode(f"Observation {turn}: a new prompt", add_special_tokens=False)
    stats = cached.prefix_cache.stats()
    assert stats["hits"] >= 6 and stats["reused_token_fraction"] > 0.25
    assert stats["entries"] <= 8
    assert plain.prefix_cache is None


def test_cut_at_stop(tokenizer):
    ids = tokenizer.encode("Search[item 7]\nObservation 1: x", add_special_tokens=False)
    out, keep, text, reason = cut_at_stop(tokenizer, ids, ["]"])
    assert (text, reason) == ("Search[item 7]", "stop") and tokenizer.decode(out) == text
    assert out[:keep] == ids[:keep]
    out, keep, text, reason = cut_at_stop(tokenizer, ids, ["zzz"])
    assert reason == "length" and text.endswith("x" + "zzz") and tokenizer.decode(out) == text
    assert keep == len(ids) and out[:keep] == ids
    out, keep, text, _ = cut_at_stop(tokenizer, ids, None)
    assert out == ids and text == tokenizer.decode(ids)


class ScriptedEngine:
    """Replays fixed texts, tokenised like a model's output, and records the prompts it was given."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.prompts = tokenizer, list(texts), []

    def generate(self, prompts, stop=None, max_tokens=None, topk=0, temperature=None, seed=None):
        self.prompts.append(list(prompts))
        out = []
        for _ in prompts:
            text = self.texts.pop(0)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            out.append(Generation(text, ids, [[t] * topk for t in ids] if topk else None,
                                  [[0.0] * topk for _ in ids] if topk else None))
        return out


@pytest.mark.parametrize("name", ["hotpotqa", "alfworld", "webshop"])
def test_next_turns_two_phase_prompts(tokenizer, name):
    fmt = get_format(name)
    r_lead, a_lead = _lead(fmt.reason_prefix)[1], _lead(fmt.act_prefix)[1]
    engine = ScriptedEngine(tokenizer, [f"{r_lead}look for item 7{fmt.reason_end}", f"{r_lead}go{fmt.reason_end}",
                                        f"{a_lead}search[item 7]{fmt.act_end}", f"click[x]{fmt.act_end}"])
    prompts = ["Task: find item 7.\n", "Task: buy x.\n"]
    earlier = [Turn("I start.", "search[x]", "results"), Turn("", "click[y]", "a page")]
    turns = next_turns(engine, tokenizer, fmt, prompts, [[], earlier], topk=2)
    # token ids in: the contexts are encoding.encode_context's, up to the prefix without its lead
    assert tokenizer.decode(engine.prompts[0][0]) == prompts[0] + fmt.fill(fmt.reason_prefix, 1).rstrip(" ")
    assert engine.prompts[0][1] == encode_context(prompts[1], [*earlier, Turn("", "", "")], "thought", tokenizer, fmt)
    thought_ids = tokenizer.encode(f"{r_lead}go{fmt.reason_end}", add_special_tokens=False)
    assert tokenizer.decode(engine.prompts[1][1]) == tokenizer.decode(engine.prompts[0][1] + thought_ids) + \
        fmt.fill(fmt.ack, 3) + fmt.fill(fmt.act_prefix, 3).rstrip(" ")
    assert [(t.thought, t.action, t.observation) for t in turns] == [
        ("look for item 7", "search[item 7]", ""), ("go", "click[x]", "")]
    n = turns[0].num_thought_tokens
    assert tokenizer.decode(turns[0].token_ids[:n]) == f"{r_lead}look for item 7" + fmt.reason_end
    assert len(turns[0].topk_ids) == len(turns[0].token_ids)
    assert "truncated" not in turns[0].extra


class RecordingEngine:
    """A real engine whose prompts (token ids) are recorded."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def generate(self, prompts, **kw):
        self.prompts += [list(p) for p in prompts]
        return self.engine.generate(prompts, **kw)


def test_next_turns_with_a_model_trains_on_the_ids_it_read_and_wrote(engine, tokenizer):
    """Token-in, token-out with a real model: the training example of the finished trajectory holds, before
    each generated segment, exactly the ids the engine was given, and then exactly the ids it generated."""
    fmt = get_format("hotpotqa")
    prompt = "Answer the question by searching.\nQuestion: what is the price of item 21?\n"
    traj = Trajectory(id="t", env="hotpotqa", task_id="q", split="train", instruction="q", prompt=prompt,
                      turns=[], reward=0.0, success=False, policy={"backend": "hf", "model": "tiny"})
    recorder = RecordingEngine(engine)
    for step in range(3):
        turn = next_turns(recorder, tokenizer, fmt, [prompt], [traj.turns], topk=3, max_thought_tokens=8,
                          max_action_tokens=6)[0]
        assert "\n" not in turn.thought and "\n" not in turn.action  # the delimiter is hotpotqa's newline
        n = turn.num_thought_tokens
        assert tokenizer.decode(turn.token_ids[:n]).removeprefix(" ") == turn.thought + fmt.reason_end
        assert tokenizer.decode(turn.token_ids[n:]).removeprefix(" ") == turn.action + fmt.act_end
        assert len(turn.topk_ids) == len(turn.topk_logprobs) == len(turn.token_ids)
        turn.observation = f"result {step}"
        traj.turns.append(turn)
    example = encode_trajectory(traj, tokenizer, fmt)
    ids = list(example["input_ids"])
    for j, turn in enumerate(traj.turns):
        k = turn.num_thought_tokens
        thought_ctx, action_ctx = recorder.prompts[2 * j], recorder.prompts[2 * j + 1]
        assert ids[:len(thought_ctx) + k] == thought_ctx + turn.token_ids[:k]
        assert ids[:len(action_ctx) + len(turn.token_ids) - k] == action_ctx + turn.token_ids[k:]
    assert int(example["topk_mask"].sum()) == sum(len(t.token_ids) for t in traj.turns)
    truncated = [t.extra.get("truncated") for t in traj.turns]
    assert all(c is None or set(c) <= {"thought", "action"} for c in truncated)
    assert any(truncated)  # 8 / 6 tokens of random text: some segment ran out and was closed (and said so)


def test_make_policy(tmp_path, tokenizer):
    assert isinstance(make_policy("expert"), ExpertPolicy)
    model_dir = tmp_path / "m"
    models.build_tiny_model("tiny-1m", tokenizer).save_pretrained(model_dir)
    models.save_tokenizer(tokenizer, model_dir)
    engine = make_policy("hf", str(model_dir), max_new_tokens=5, tensor_parallel=1, batch_size=2)
    assert isinstance(engine, HFEngine) and engine.max_new_tokens == 5 and engine.batch_size == 2
    assert len(engine.generate([[5], [6], [7, 8]])[2].token_ids) == 5
    with pytest.raises(TypeError):  # a misspelt engine argument is not silently dropped
        make_policy("hf", str(model_dir), max_new_token=5)
    with pytest.raises(ValueError, match="unknown policy backend"):
        make_policy("gpt")
    with pytest.raises(ValueError, match="needs a model"):
        make_policy("hf")


class PairEnv(TextEnv):
    env_name, agent_format = "pair", "hotpotqa"

    def task_ids(self):
        return ["a", "b"]

    def _load_task(self, task_id):
        self.n = 0
        return f"task {task_id}", {}

    def _apply(self, action):
        self.n += 1
        return f"n={self.n}", 0.0, self.n >= 2, {}

    def expert_turn(self):
        return f"{self.task_id} at {self.n}", "step"


def test_expert_turns_ask_each_env():
    envs = [PairEnv(), PairEnv()]
    for env, task in zip(envs, ["a", "b"]):
        env.reset(options={"task_id": task})
    envs[1].step("step")
    turns = ExpertPolicy().next_turns(envs)
    assert [(t.thought, t.action, t.observation) for t in turns] == [("a at 0", "step", ""), ("b at 1", "step", "")]
    assert expert_turns([]) == []
