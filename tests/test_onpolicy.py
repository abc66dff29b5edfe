"""raysad.onpolicy on tiny models: the student plays HotPotQA on Ray actors, the teacher scores exactly the
student's tokens, the student trains on them, and the next iteration plays with the trained weights.

Teacher and student: tiny random models sharing the tokenizer of test_distill's data (the teacher's final
norm scaled up, so its distributions are peaked). Episodes are 2 turns of at most 6 tokens per segment.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysad import models
from raysad.agent_formats import trajectory_format
from raysad.configs import OnPolicyConfig
from raysad.encoding import encode_trajectory
from raysad.onpolicy import iteration_dir, iteration_tasks, run_onpolicy
from raysad.trajectory_reader import read_trajectories
from test_distill import data, one_thread  # noqa: F401 - the fixtures used here


@pytest.fixture(scope="module")
def student_dir(data):
    tokenizer = models.load_tokenizer(data / "tok")
    student = models.build_tiny_model("tiny-1m", tokenizer, seed=7)
    out = data / "onpolicy-student"
    student.save_pretrained(out)
    models.save_tokenizer(tokenizer, out)
    return out


def onpolicy_config(data, student_dir, out, **overrides) -> OnPolicyConfig:
    base = dict(student=str(student_dir), teacher=str(data / "teacher"), out=str(out), env="hotpotqa",
                iterations=2, episodes=2, max_turns=2, max_new_tokens=6, max_steps=2, batch_size=2,
                micro_batch_size=2, max_length=512, lr=3e-3, warmup_steps=0, workers=0, env_actors=1,
                envs_per_actor=2, num_cpus=2, seed=0)
    return OnPolicyConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def run(data, student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onpolicy")
    cfg = onpolicy_config(data, student_dir, out)
    return cfg, run_onpolicy(cfg, track=False, progress=False)


def test_each_iteration_plays_new_tasks_and_trains_on_them(run):
    cfg, result = run
    assert len(result.iterations) == 2 and (result.student / "config.json").is_file()
    played = [list(read_trajectories(iteration_dir(cfg.out, k) / "trajectories.jsonl")) for k in range(2)]
    assert [sorted(t.task_id for t in p) for p in played] != [sorted(t.task_id for t in played[0])] * 2
    for k, metrics in enumerate(result.iterations):
        assert metrics["onpolicy/iteration"] == k and metrics["onpolicy/steps"] == 2
        assert metrics["onpolicy/tokens_trained"] > 0 and metrics["onpolicy/staleness"] == 0
        assert np.isfinite(metrics["onpolicy/reason_divergence"]) and np.isfinite(metrics["onpolicy/act_divergence"])
    # iteration 1 is played by iteration 0's trained student: the weight sync
    assert {t.policy["model"] for t in played[1]} == {str(iteration_dir(cfg.out, 0) / "student")}
    before = models.load_model(cfg.student).state_dict()
    after = models.load_model(iteration_dir(cfg.out, 0) / "student").state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_the_teacher_reads_exactly_the_students_tokens(run, data):
    cfg, _ = run
    tokenizer = models.load_tokenizer(cfg.student)
    (traj, *_) = read_trajectories(iteration_dir(cfg.out, 0) / "trajectories.jsonl")
    example = encode_trajectory(traj, tokenizer, trajectory_format(traj), max_length=cfg.max_length)
    generated = [i for turn in traj.turns for i in turn.token_ids]
    scored = example["input_ids"][example["reason_mask"] | example["act_mask"]].tolist()
    assert generated and scored == generated  # token-in, token-out: no id re-derived from text
    # the teacher's log-probs at those positions are its forward pass over exactly these ids
    teacher = models.load_model(cfg.teacher)
    with torch.no_grad():
        logp = teacher(torch.as_tensor(example["input_ids"])[None]).logits[0].log_softmax(-1)
    rows = np.nonzero(example["reason_mask"] | example["act_mask"])[0]
    assert torch.isfinite(logp[rows - 1, torch.as_tensor(scored)]).all()


def test_the_next_iteration_samples_from_the_trained_weights(data, student_dir, tmp_path):
    # greedy play: iteration 1's first thought must be what iteration 0's trained student writes greedily
    from raysad.agent_formats import get_format
    from raysad.policies import make_policy, next_turns

    cfg = onpolicy_config(data, student_dir, tmp_path / "greedy", sample_temperature=0.0, episodes=1)
    run_onpolicy(cfg, track=False, progress=False)
    (traj,) = read_trajectories(iteration_dir(cfg.out, 1) / "trajectories.jsonl")
    trained = str(iteration_dir(cfg.out, 0) / "student")
    engine = make_policy("hf", trained)
    (turn,) = next_turns(engine, models.load_tokenizer(trained), get_format("hotpotqa"), [traj.prompt], [[]],
                         max_thought_tokens=6, max_action_tokens=6, temperature=0.0)
    assert turn.token_ids == traj.turns[0].token_ids


def test_lambda_reason_zero_gives_no_gradient_on_thought_tokens(run):
    from raysad.data import collate, loss_masks
    from raysad.train_loop import batch_loss

    cfg, _ = run
    tokenizer = models.load_tokenizer(cfg.student)
    (traj, *_) = read_trajectories(iteration_dir(cfg.out, 0) / "trajectories.jsonl")
    batch = collate([encode_trajectory(traj, tokenizer, trajectory_format(traj), max_length=cfg.max_length)],
                    tokenizer.pad_token_id)
    student, teacher = models.load_model(cfg.student), models.load_model(cfg.teacher)
    with torch.no_grad():  # position t predicts target t (the batch's labels are the ids shifted by one)
        teacher_logits = teacher(batch["input_ids"]).logits[:, :-1]
    logits = student(batch["input_ids"]).logits[:, :-1].detach().requires_grad_(True)
    for lambda_reason, lambda_act in ((0.0, 1.0), (1.0, 0.0)):
        config = OnPolicyConfig(student="s", teacher="t", lambda_reason=lambda_reason, lambda_act=lambda_act)
        reason, act = loss_masks(batch, config)
        assert reason.any() and act.any()
        logits.grad = None
        total, _ = batch_loss(logits, teacher_logits, batch, config)
        total.backward()
        grad = logits.grad.abs().sum(-1)[0]
        zero, nonzero = (reason[0], act[0]) if lambda_reason == 0 else (act[0], reason[0])
        assert grad[zero].max() == 0 and grad[nonzero].min() > 0


def test_a_rerun_continues_and_refuses_other_settings(run, data, student_dir):
    cfg, result = run
    again = run_onpolicy(cfg, track=False, progress=False)  # both iterations done: nothing is played again
    assert again.iterations == result.iterations
    done = json.loads((iteration_dir(cfg.out, 1) / "done.json").read_text())
    assert done["metrics"] == result.iterations[1]
    with pytest.raises(ValueError, match="other settings .*lambda_act"):
        run_onpolicy(onpolicy_config(data, student_dir, cfg.out, lambda_act=2.0), track=False, progress=False)


def test_playing_ahead_uses_weights_one_iteration_older(data, student_dir, tmp_path):
    # max_staleness 1: iteration k+1 is played while k trains, by the student of iteration k-1
    cfg = onpolicy_config(data, student_dir, tmp_path / "ahead", iterations=3, episodes=1, max_staleness=1)
    result = run_onpolicy(cfg, track=False, progress=False)
    players = [{t.policy["model"] for t in read_trajectories(iteration_dir(cfg.out, k) / "trajectories.jsonl")}
               for k in range(3)]
    assert players == [{str(student_dir)}, {str(student_dir)}, {str(iteration_dir(cfg.out, 0) / "student")}]
    assert [m["onpolicy/staleness"] for m in result.iterations] == [0.0, 1.0, 1.0]
    assert all(m["onpolicy/tokens_trained"] > 0 for m in result.iterations)


def test_teacher_trajectories_are_mixed_in_at_their_share(data, student_dir, tmp_path):
    cfg = onpolicy_config(data, student_dir, tmp_path / "mix", iterations=1, episodes=2,
                          teacher_trajectories=str(data / "text.jsonl"), teacher_share=0.5)
    (metrics,) = run_onpolicy(cfg, track=False, progress=False).iterations
    mixed = list(read_trajectories(iteration_dir(cfg.out, 0) / "train.jsonl"))
    assert [t.policy["backend"] for t in mixed] == ["hf", "hf", "expert", "expert"]
    assert metrics["onpolicy/teacher_trajectories"] == 2


def test_tasks_walk_through_the_split():
    pool = [str(i) for i in range(5)]
    assert iteration_tasks(pool, 0, 2) == ["0", "1"] and iteration_tasks(pool, 2, 2) == ["4", "0"]
    assert iteration_tasks(pool, 0, 9) == pool


def test_bad_settings_fail_in_one_line(data, student_dir, tmp_path):
    with pytest.raises(ValueError, match="on-policy distillation uses sad"):
        onpolicy_config(data, student_dir, tmp_path, method="sft")
    with pytest.raises(ValueError, match="teacher_share' needs --teacher-trajectories"):
        onpolicy_config(data, student_dir, tmp_path, teacher_share=0.5)
    with pytest.raises(ValueError, match="not a model directory"):
        run_onpolicy(onpolicy_config(data, student_dir, tmp_path, student=str(tmp_path / "none")), track=False)
    # a student with another tokenizer: refused before anything is played
    other_tok = models.train_tokenizer(["some other text entirely"] * 20, vocab_size=300, out_dir=tmp_path / "tok2")
    other = tmp_path / "other-student"
    models.build_tiny_model("tiny-1m", other_tok, seed=1).save_pretrained(other)
    models.save_tokenizer(other_tok, other)
    with pytest.raises(ValueError, match="tokenizer"):
        run_onpolicy(onpolicy_config(data, student_dir, tmp_path / "o", student=str(other)), track=False)
    assert not list(Path(tmp_path).rglob("iter_*"))


def test_a_restarted_engine_actor_comes_back_as_the_current_player(data, student_dir, tmp_path):
    import os
    import signal

    import ray

    from raysad.configs import RolloutConfig
    from raysad.onpolicy import CurrentPlayer
    from raysad.policies.hf import HFEngine
    from raysad.serving import RemoteEngine, start_engines

    trained = models.init_model_dir("tiny-1m", data / "tok", tmp_path / "trained", seed=11)  # a later student
    prompts = [models.load_tokenizer(data / "tok").encode("Thought 1: I need to search", add_special_tokens=False)]

    def ids(engine):
        return [g.token_ids for g in engine.generate(prompts, max_tokens=8, temperature=0.0)]

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        player = CurrentPlayer(RolloutConfig(env="hotpotqa", policy="hf", model=str(student_dir)),
                               tmp_path / "player.json")
        player.point(str(student_dir), 0)
        (engine,) = start_engines(player, 1, 0, 0, max_restarts=1)
        remote = RemoteEngine(engine)
        assert ids(remote) == ids(HFEngine(str(student_dir)))
        player.point(str(trained), 0)  # what onpolicy.play does before each iteration
        ray.get(engine.load_weights.remote(str(trained), 0))
        expected = ids(HFEngine(str(trained)))
        assert ids(remote) == expected
        os.kill(ray.get(engine.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
        assert ids(remote) == expected  # Ray restarted it: built on the current player's weights, not the first
    finally:
        ray.shutdown()


def test_the_curriculum_schedules_depth_and_take_over_linearly():
    from raysad.onpolicy import curriculum

    def shares(**kw):
        cfg = OnPolicyConfig(student="s", teacher="t", iterations=4, **kw)
        return [curriculum(cfg, k, horizon=8) for k in range(5)]

    b2f = shares(depth_curriculum="b2f")  # the teacher's first turns shrink: 6, 4, 2, 0 of 8
    assert [s["guide_turns"] for s in b2f] == [6, 4, 2, 0, 0] and {s["guide"] for s in b2f} == {"t"}
    assert {s["turn_limit"] for s in b2f} == {None} and {s["guide_share"] for s in b2f} == {0.0}
    f2b = shares(depth_curriculum="f2b", curriculum_iterations=2)  # the student's depth grows: 4, then all 8
    assert [s["turn_limit"] for s in f2b] == [4, None, None, None, None]
    assert {s["guide_turns"] for s in f2b} == {0} and {s["guide"] for s in f2b} == {None}
    takeover = shares(teacher_takeover=0.8)
    assert [round(s["guide_share"], 6) for s in takeover] == [0.8, 0.6, 0.4, 0.2, 0.0]
    assert {s["guide_turns"] for s in takeover} == {0} and {s["turn_limit"] for s in takeover} == {None}
    off = shares()
    assert off[0] == {"guide": None, "guide_turns": 0, "turn_limit": None, "guide_share": 0.0}


def test_b2f_the_teacher_plays_the_first_turns_and_they_carry_no_loss(data, student_dir, tmp_path):
    # greedy play, 2 turns, 2 iterations: iteration 0's first turn is the teacher's (what it writes greedily),
    # its second the student's; iteration 1 is the student's alone. Training sees only the student's ids.
    from raysad.agent_formats import get_format
    from raysad.policies import make_policy, next_turns

    cfg = onpolicy_config(data, student_dir, tmp_path / "b2f", depth_curriculum="b2f", sample_temperature=0.0,
                          episodes=1)
    result = run_onpolicy(cfg, track=False, progress=False)
    (first,) = read_trajectories(iteration_dir(cfg.out, 0) / "trajectories.jsonl")
    (second,) = read_trajectories(iteration_dir(cfg.out, 1) / "trajectories.jsonl")
    assert [bool(t.extra.get("guide")) for t in first.turns] == [True, False]
    assert not any(t.extra.get("guide") for t in second.turns)
    tokenizer, fmt = models.load_tokenizer(cfg.student), get_format("hotpotqa")
    for model, history, turn in ((cfg.teacher, [], first.turns[0]), (str(student_dir), first.turns[:1], first.turns[1])):
        (expected,) = next_turns(make_policy("hf", model), tokenizer, fmt, [first.prompt], [history],
                                 max_thought_tokens=6, max_action_tokens=6, temperature=0.0)
        assert expected.token_ids == turn.token_ids
    example = encode_trajectory(first, tokenizer, trajectory_format(first), max_length=cfg.max_length)
    trained_ids = example["input_ids"][example["reason_mask"] | example["act_mask"]].tolist()
    assert trained_ids == first.turns[1].token_ids  # the teacher's turn is context
    m0, m1 = result.iterations
    assert (m0["onpolicy/teacher_turns"], m0["onpolicy/student_turns"], m0["onpolicy/teacher_prefix_turns"]) == (1, 1, 1)
    assert (m1["onpolicy/teacher_turns"], m1["onpolicy/teacher_prefix_turns"]) == (0, 0)


def test_f2b_episodes_end_at_the_students_depth(data, student_dir, tmp_path):
    cfg = onpolicy_config(data, student_dir, tmp_path / "f2b", depth_curriculum="f2b", episodes=2)
    result = run_onpolicy(cfg, track=False, progress=False)
    turns = [[len(t.turns) for t in read_trajectories(iteration_dir(cfg.out, k) / "trajectories.jsonl")]
             for k in range(2)]
    assert turns[0] == [1, 1] and max(turns[1]) == 2  # (a random student's episodes run to the limit)
    assert [m["onpolicy/turn_limit"] for m in result.iterations] == [1, 2]
    assert all(m["onpolicy/teacher_turns"] == 0 for m in result.iterations)


def test_a_full_take_over_leaves_nothing_to_learn_and_says_so(data, student_dir, tmp_path):
    cfg = onpolicy_config(data, student_dir, tmp_path / "takeover", teacher_takeover=1.0, iterations=1)
    with pytest.raises(RuntimeError, match="the student played no turn .* lower --teacher-takeover"):
        run_onpolicy(cfg, track=False, progress=False)
    played = list(read_trajectories(iteration_dir(cfg.out, 0) / "trajectories.jsonl"))
    assert played and all(t.extra.get("guide") for traj in played for t in traj.turns)


@pytest.mark.parametrize("method", ["sad", "flat_kd"])
def test_with_teacher_topk_the_teachers_engines_score_exactly_the_students_tokens(data, student_dir, tmp_path,
                                                                                  method):
    """flat_kd: the observation tokens too (every token after the student's first that it did not write)."""
    from raysad.encoding import generated_positions
    from raysad.onpolicy import train_config
    from raysad.scoring import CONTEXT_TOPK

    cfg = onpolicy_config(data, student_dir, tmp_path / "topk", teacher_topk=4, iterations=1, method=method)
    (metrics,) = run_onpolicy(cfg, track=False, progress=False).iterations
    assert metrics["onpolicy/score_s"] > 0 and metrics["onpolicy/tokens_trained"] > 0
    assert train_config(cfg, 0, "s", Path("d")).teacher is None  # training reads the stored rows
    scored = list(read_trajectories(iteration_dir(cfg.out, 0) / "scored.jsonl"))
    played = list(read_trajectories(iteration_dir(cfg.out, 0) / "trajectories.jsonl"))
    assert [t.turns[0].token_ids for t in scored] == [t.turns[0].token_ids for t in played]
    tokenizer, teacher = models.load_tokenizer(cfg.teacher), models.load_model(cfg.teacher)
    for traj in scored:
        ids, generated = generated_positions(traj, tokenizer, trajectory_format(traj))
        with torch.no_grad():  # the teacher's distribution at each generated token, one sequence, no padding
            logp = teacher(torch.as_tensor(ids)[None]).logits[0].log_softmax(-1)
        for n, turn in enumerate(traj.turns):
            assert len(turn.topk_ids) == len(turn.token_ids) == len(generated[n])
            for p, row_ids, row_lp in zip(generated[n], turn.topk_ids, turn.topk_logprobs):
                expected = logp[p - 1]
                assert np.allclose(row_lp, expected[row_ids].numpy(), atol=1e-4)
                assert min(row_lp) >= expected.topk(5).values[-1].item() - 1e-4  # they are its 4 largest
        context = traj.extra.get(CONTEXT_TOPK)
        assert (context is not None) == (method == "flat_kd")
        if context is not None:
            made = sorted(p for turn in generated.values() for p in turn)
            assert context["positions"] == [p for p in range(made[0], len(ids)) if p not in set(made)]
            for p, row_ids, row_lp in zip(context["positions"], context["ids"], context["logprobs"]):
                assert np.allclose(row_lp, logp[p - 1].topk(4).values.numpy(), atol=1e-4)


def test_b2f_starts_from_the_teachers_median_episode_length(data, student_dir, tmp_path):
    # a teacher that finishes in a few turns of many: b2f counts its depth from that length, not from --max-turns
    from raysad.onpolicy import horizon_of

    lengths = sorted(len(t.turns) for t in read_trajectories(data / "text.jsonl"))
    cfg = onpolicy_config(data, student_dir, tmp_path, depth_curriculum="b2f", max_turns=50,
                          teacher_trajectories=str(data / "text.jsonl"))
    assert horizon_of(cfg) == lengths[len(lengths) // 2] < 50
    assert horizon_of(dataclasses.replace(cfg, depth_curriculum="f2b")) == 50  # f2b grows to the max turns
    assert horizon_of(dataclasses.replace(cfg, teacher_trajectories=None)) == 50
