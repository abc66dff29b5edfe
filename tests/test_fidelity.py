"""Token-in, token-out with a real pretrained model: SmolLM2-135M-Instruct plays real HotpotQA records
(tests/fixtures) on the rollout's Ray actors; the ids it read are the ids training encodes, the top-k it stored
are its own log-probs on the training sequence, its turns are real (non-empty) thoughts and actions, and a
student cut from it distils on exactly those ids and says how many loss tokens it used and dropped."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "hotpotqa"


@pytest.fixture(scope="module")
def rollout(smollm2_dir, tmp_path_factory):
    from raysad import fidelity
    from raysad.rollout import RolloutConfig, run_rollout
    from raysad.serving import default_engine_factory
    from raysad.trajectory_reader import read_trajectories

    out = tmp_path_factory.mktemp("fidelity")
    prompts = out / "prompts.jsonl"
    cfg = RolloutConfig(env="hotpotqa", split="train", data=str(FIXTURES), episodes=4, policy="hf",
                        model=str(smollm2_dir), topk=4, few_shot=2, max_turns=2, env_actors=1, envs_per_actor=4,
                        engine_args={"dtype": "float32"}, out=str(out / "t.jsonl"), num_cpus=2)
    summary = run_rollout(cfg, engine_factory=fidelity.recording_factory(default_engine_factory(cfg), prompts),
                          progress=False, track=False)
    with read_trajectories(cfg.out) as reader:
        trajs = list(reader)
    return summary, trajs, fidelity.read_prompts(prompts), cfg


def test_smollm2_rollout_ids_are_the_training_ids(smollm2_dir, rollout):
    from raysad import fidelity, models

    summary, trajs, prompts, _ = rollout
    assert summary.episodes == 4 and summary.errors == 0
    tokenizer = models.load_tokenizer(smollm2_dir)
    contexts = fidelity.context_mismatches(trajs, tokenizer, prompts)
    assert contexts["turns"] >= 4 and contexts["mismatched"] == 0
    error = fidelity.topk_error(models.load_model(smollm2_dir, dtype="float32", device="cpu"), trajs, tokenizer)
    assert error["entries"] > 100 and error["max_abs_error"] <= 1e-4
    shares = fidelity.turn_shares(trajs)
    assert shares["non_empty"] >= 0.95, shares  # with two ReAct examples in the prompt (few_shot=2)
    assert summary.model_turns == contexts["turns"] and summary.empty_thoughts == round(
        shares["empty_thought"] * shares["model_turns"])


def test_a_student_cut_from_smollm2_distils_on_those_ids_and_reports_its_tokens(smollm2_dir, rollout, tmp_path):
    import numpy as np

    from raysad import models
    from raysad.distill import DistillConfig, run_distill
    from raysad.encoding import encode_trajectory

    _, trajs, _, cfg = rollout
    config = DistillConfig(trajectories=cfg.out, student="derive:keep_every=10", teacher=str(smollm2_dir),
                           method="sad", max_steps=3,
                           batch_size=2, max_length=600, out=str(tmp_path / "student"), workers=0, num_cpus=2)
    result = run_distill(config, track=False)
    m = result.metrics
    tokenizer = models.load_tokenizer(smollm2_dir)
    examples = [encode_trajectory(t, tokenizer, max_length=600) for t in trajs]
    # what it reports is what the encoder kept and dropped, and the stored (generated) ids are what it trains on
    assert m["data/reason_tokens"] == sum(int(e["reason_mask"].sum()) for e in examples) > 0
    assert m["data/act_tokens"] == sum(int(e["act_mask"].sum()) for e in examples) > 0
    assert m["data/dropped_prompt_tokens"] == sum(e["dropped_prompt_tokens"] for e in examples) > 0  # few-shot
    assert m["data/dropped_loss_tokens"] == sum(e["dropped_loss_tokens"] for e in examples)
    for traj, ex in zip(trajs, examples):
        generated = [i for t in traj.turns for i in t.token_ids]
        kept = ex["input_ids"][ex["reason_mask"] | ex["act_mask"]]
        assert list(kept) == generated[:len(kept)]
    assert np.isfinite(m["distill/loss"]) and (tmp_path / "student" / "derived-student" / "config.json").is_file()
    assert models.load_model(tmp_path / "student").config.num_hidden_layers == 3
