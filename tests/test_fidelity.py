"""Token-in, token-out with a real pretrained model: SmolLM2-135M-Instruct plays real HotpotQA records
(tests/fixtures) on the rollout's Ray actors; the ids it read are the ids training encodes, the top-k it stored
are its own log-probs on the training sequence, and its turns are real (non-empty) thoughts and actions."""
from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "hotpotqa"


def test_smollm2_rollout_ids_are_the_training_ids(smollm2_dir, tmp_path):
    from raysad import fidelity, models
    from raysad.rollout import RolloutConfig, default_engine_factory, run_rollout
    from raysad.trajectory import read_trajectories

    prompts = tmp_path / "prompts.jsonl"
    cfg = RolloutConfig(env="hotpotqa", split="train", data=str(FIXTURES), episodes=4, policy="hf",
                        model=str(smollm2_dir), topk=4, few_shot=2, max_steps=2, env_actors=1, envs_per_actor=4,
                        engine_args={"dtype": "float32"}, out=str(tmp_path / "t.jsonl"), num_cpus=2)
    summary = run_rollout(cfg, engine_factory=fidelity.recording_factory(default_engine_factory(cfg), prompts),
                          progress=False, track=False)
    assert summary.episodes == 4 and summary.errors == 0
    with read_trajectories(cfg.out) as reader:
        trajs = list(reader)
    tokenizer = models.load_tokenizer(smollm2_dir)
    contexts = fidelity.context_mismatches(trajs, tokenizer, fidelity.read_prompts(prompts))
    assert contexts["turns"] >= 4 and contexts["mismatched"] == 0
    error = fidelity.topk_error(models.load_model(smollm2_dir, dtype="float32", device="cpu"), trajs, tokenizer)
    assert error["entries"] > 100 and error["max_abs_error"] <= 1e-4
    shares = fidelity.turn_shares(trajs)
    assert shares["non_empty"] >= 0.95, shares  # with two ReAct examples in the prompt (few_shot=2)
    assert summary.model_turns == contexts["turns"] and summary.empty_thoughts == round(
        shares["empty_thought"] * shares["model_turns"])
