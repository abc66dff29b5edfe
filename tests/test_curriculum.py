"""Curriculum: complexity from token counts and teacher entropy, easy-to-hard order, linear pacing."""
from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raysad.curriculum import complexity, complexity_features, order_easy_to_hard, topk_entropy, unlocked
from raysad.agent_formats import get_format
from raysad.encoding import TOPK_PAD_LOGPROB, encode_trajectory
from raysad.trajectory import Trajectory, Turn

LN2 = math.log(2)


def example(n_reason: int, n_act: int, topk_logprobs=None, topk_rows=None) -> dict:
    """An encoded example as encode_trajectory returns it: n_reason reason tokens, then n_act act tokens."""
    n = 2 + n_reason + n_act
    reason = np.zeros(n, bool)
    reason[2:2 + n_reason] = True
    act = np.zeros(n, bool)
    act[2 + n_reason:] = True
    out = {"input_ids": np.arange(n), "reason_mask": reason, "act_mask": act,
           "topk_ids": None, "topk_logprobs": None, "topk_mask": None}
    if topk_logprobs is not None:
        lp = np.full((n, len(topk_logprobs[0])), TOPK_PAD_LOGPROB, np.float32)
        mask = np.zeros(n, bool)
        for row, values in zip(topk_rows, topk_logprobs):
            lp[row] = values
            mask[row] = True
        out.update(topk_ids=np.zeros_like(lp, dtype=np.int64), topk_logprobs=lp, topk_mask=mask)
    return out


def test_topk_entropy_with_tail_bucket_by_hand():
    # p = (1/2, 1/4) and a tail of 1/4: H = 1/2 ln 2 + 1/4 ln 4 + 1/4 ln 4 = 1.5 ln 2
    assert topk_entropy([[math.log(0.5), math.log(0.25)]]) == pytest.approx(1.5 * LN2)
    # a certain token: 0; a row of two halves, one padded entry: ln 2; the mean of the three rows
    rows = [[0.0, TOPK_PAD_LOGPROB], [math.log(0.5), math.log(0.5)], [math.log(0.5), math.log(0.25)]]
    assert topk_entropy(rows) == pytest.approx((0 + LN2 + 1.5 * LN2) / 3)
    assert topk_entropy(rows, mask=[False, True, False]) == pytest.approx(LN2)
    assert topk_entropy(np.zeros((0, 4))) == 0.0


def test_complexity_of_encoded_examples_by_hand():
    plain = example(3, 2)
    assert complexity_features(plain) == (3, 2, None)
    assert complexity(plain, a=1.0, b=2.0, c=100.0) == 3 + 4  # entropy unknown: no contribution
    # top-k on the two thought rows 2 and 3: entropies 1.5 ln 2 and ln 2, mean 1.25 ln 2
    hard = example(3, 2, [[math.log(0.5), math.log(0.25)], [math.log(0.5), math.log(0.5)]], [2, 3])
    n_r, n_a, h = complexity_features(hard)
    assert (n_r, n_a) == (3, 2) and h == pytest.approx(1.25 * LN2)
    assert complexity(hard, a=0.5, b=1.0, c=10.0) == pytest.approx(1.5 + 2 + 12.5 * LN2)


def test_order_and_ties_keep_input_order():
    items = [example(5, 1), example(1, 1), example(2, 2), example(1, 1), example(0, 10)]
    assert order_easy_to_hard(items) == [1, 3, 2, 0, 4]                # a = b = 1: 6, 2, 4, 2, 10
    assert order_easy_to_hard(items, a=1.0, b=0.0) == [4, 1, 3, 2, 0]  # reason tokens only: 5, 1, 2, 1, 0
    certain = example(1, 1, [[0.0, TOPK_PAD_LOGPROB]], [2])
    unsure = example(1, 1, [[math.log(0.5), math.log(0.5)]], [2])
    assert order_easy_to_hard([unsure, certain, example(1, 1)], c=100.0) == [1, 2, 0]


@pytest.mark.parametrize("epoch, expected", [(0, 3), (1, 6), (2, 8), (3, 10), (7, 10)])
def test_linear_pacing_by_hand(epoch, expected):
    # fraction = 0.3 + 0.7 * epoch / 3: 0.3, 0.533, 0.767, 1.0 -> ceil(10 * f)
    assert unlocked(10, epoch, start_fraction=0.3, epochs_to_full=3) == expected


def test_pacing_edges():
    assert unlocked(10, 0, start_fraction=0.05, epochs_to_full=4) == 1  # at least one item
    assert unlocked(10, 0, start_fraction=0.5, epochs_to_full=0) == 10   # no pacing
    assert unlocked(0, 2) == 0
    with pytest.raises(ValueError, match="start_fraction"):
        unlocked(10, 0, start_fraction=0.0)


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["> think: find the mug\nOK.\n> go to desk 1\nYou see a mug 1.\n"] * 2,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_trajectories_with_stored_ids_need_no_tokenizer_and_agree_with_encoding():
    tok, fmt = _tokenizer(), get_format("alfworld")
    # as a model writes them after "> think:" and ">": the prefixes' lead space comes with the text
    t_ids = tok(" find the mug\n", add_special_tokens=False)["input_ids"]
    a_ids = tok(" go to desk 1\n", add_special_tokens=False)["input_ids"]
    ids = t_ids + a_ids
    half = [math.log(0.5), math.log(0.5)]
    turn = Turn("find the mug", "go to desk 1", "You see a mug 1.", token_ids=ids, num_thought_tokens=len(t_ids),
                topk_ids=[[i, 0] for i in ids], topk_logprobs=[half] * len(ids))
    traj = Trajectory(id="t", env="alfworld", task_id="x", split="train", instruction="", prompt="Find a mug.\n",
                      turns=[turn], reward=1.0, success=True, policy={})
    assert complexity_features(traj) == (len(t_ids), len(a_ids), pytest.approx(LN2))
    assert complexity(traj, c=10.0) == pytest.approx(len(ids) + 10 * LN2)
    assert complexity(traj, c=10.0) == pytest.approx(complexity(encode_trajectory(traj, tok, fmt), c=10.0))
    assert complexity(traj, c=10.0, tokenizer=tok, fmt=fmt) == pytest.approx(complexity(traj, c=10.0))
    text_only = Trajectory(**{**traj.__dict__, "turns": [Turn("find the mug", "go to desk 1", "ok")]})
    with pytest.raises(ValueError, match="pass a tokenizer"):
        complexity(text_only)
    assert complexity(text_only, tokenizer=tok) == len(ids)  # fmt defaults to the format named like env


@pytest.mark.parametrize("epochs, max_steps, pace", [(1, 300, 0.5), (1, 40, 0.5), (3, 0, 0.5), (2, 500, 0.5),
                                                     (1, 300, 1.0), (4, 0, 1.0)])
def test_a_curriculum_unlocks_all_the_data_early_enough_to_train_on_it(epochs, max_steps, pace):
    # 200 examples of batch 8: one full epoch is 25 steps. The share grows over the first `pace` of the run, then
    # every epoch has all of it. Pacing over the whole of a 300-step run (pace 1) trained the hardest tenth 1.8
    # times each against the easiest's 19; its student scored 5.3% where plain SAD scored 19.3%.
    from types import SimpleNamespace

    from raysad.data import curriculum_pacing, step_batches

    n = 200
    stats = SimpleNamespace(examples=n, complexity=np.random.default_rng(0).random(n))
    config = SimpleNamespace(curriculum=True, curriculum_start=0.3, curriculum_pace=pace, epochs=epochs,
                             max_steps=max_steps, batch_size=8, seed=0)
    batches = step_batches(stats, config)
    paced, _ = curriculum_pacing(stats, config)
    assert len(batches) == (max_steps or sum(math.ceil(unlocked(n, e, 0.3, paced) / 8) for e in range(epochs)))
    ranked = np.argsort(stats.complexity, kind="stable").tolist()
    easiest = set(ranked[:60])
    assert set(batches[0]) <= easiest  # easy first
    assert batches[0] != ranked[:8]  # shuffled within the unlocked share, not in sorted order
    if max_steps > 25:  # the harder share arrives only after the easy one was trained on
        first_hard = next(s for s, b in enumerate(batches) if not set(b) <= easiest)
        assert first_hard >= 60 // 8
    # all of the data is unlocked once `pace` of the run is over (up to the paced epoch that straddles it)
    steps = len(batches)
    unlocked_at = sum(math.ceil(unlocked(n, e, 0.3, paced) / 8) for e in range(paced))
    assert unlocked_at <= pace * steps + 25
    if pace < 1:
        assert set(i for b in batches[unlocked_at:] for i in b) == set(range(n))
    exposures = np.bincount([i for b in batches for i in b], minlength=n)
    assert exposures.min() >= 1  # every example, the hardest included
    hardest = exposures[ranked[-n // 10:]].mean()
    if pace == 0.5 and max_steps == 300:  # a plain run: 12 each
        assert hardest >= 6 and exposures[ranked[:n // 10]].mean() <= 16


@pytest.mark.parametrize("epochs, max_steps, pace, refused", [(1, 0, 0.5, True), (1, 4, 0.5, True),
                                                              (1, 0, 0.0, False), (2, 0, 0.5, False),
                                                              (1, 20, 0.5, False)])
def test_a_curriculum_too_short_to_pace_is_refused(epochs, max_steps, pace, refused):
    # one epoch, or fewer steps than the first (easiest 30%) epoch takes, would train as a plain run without a word
    from types import SimpleNamespace

    from raysad.data import check_curriculum

    stats = SimpleNamespace(examples=200, complexity=np.arange(200.0))
    config = SimpleNamespace(curriculum=True, curriculum_start=0.3, curriculum_pace=pace, epochs=epochs,
                             max_steps=max_steps, batch_size=8, seed=0)
    if refused:
        with pytest.raises(ValueError, match="--curriculum has nothing to pace over"):
            check_curriculum(stats, config)
    else:
        check_curriculum(stats, config)
