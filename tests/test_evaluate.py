"""The evaluate stage: expert ≈ 1 and random ≈ 0 on the real envs, metrics agree with the written trajectories,
CoT match is 1 for a policy against its own greedy reference and lower for another, MLflow and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
import yaml
from typer.testing import CliRunner

import raysad_envs
from raysad import models
from raysad.cli import app
from raysad.evaluate import (EvalConfig, count_parameters, normalize_action, run_evaluate, student_params,
                             token_f1)
from raysad.trajectory_reader import read_trajectories

JSON_KEYS = ("eval/success_rate", "eval/mean_reward", "eval/score", "eval/steps", "eval/invalid_action_rate",
             "eval/reasoning_tokens", "eval/latency_per_step_s", "eval/tokens_per_s", "eval/params")


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two random tiny Llamas (seeds 0 and 1) sharing a small BPE tokenizer trained on HotPotQA prompts."""
    root = tmp_path_factory.mktemp("tiny")
    env = raysad_envs.make("hotpotqa", split="train")
    texts = []
    for task_id in raysad_envs.list_tasks("hotpotqa", "train")[:20]:
        obs, _ = env.reset(options={"task_id": task_id})
        texts.append(env.unwrapped.prompt(obs) + "Thought 1: search it\nAction 1: Search[x]\nObservation 1: y\n")
    tokenizer = models.train_tokenizer(texts, vocab_size=400)
    dirs = []
    for seed in (0, 1):
        # large initial weights, and no way to end early (eos/pad embeddings zeroed): random models that write
        # varied text rather than repeating one token, so two of them disagree
        model = models.build_tiny_model({"num_hidden_layers": 2, "initializer_range": 0.5}, tokenizer, seed=seed)
        with torch.no_grad():
            model.get_input_embeddings().weight[[tokenizer.eos_token_id, tokenizer.pad_token_id]] = 0
        model.save_pretrained(root / f"model{seed}")
        models.save_tokenizer(tokenizer, root / f"model{seed}")
        dirs.append(str(root / f"model{seed}"))
    return dirs


def evaluate(tmp_path, name, **kw) -> tuple[dict, list]:
    cfg = EvalConfig(**{"env_actors": 1, "envs_per_actor": 4, "out": str(tmp_path / name)} | kw)
    metrics = run_evaluate(cfg, progress=False, track=False)
    return metrics, list(read_trajectories(Path(cfg.out) / "trajectories.jsonl"))


@pytest.mark.parametrize("env", ["webshop", "hotpotqa"])
def test_expert_near_one_random_near_zero(tmp_path, env):
    expert, trajs = evaluate(tmp_path, "expert", env=env, policy="expert", episodes=12)
    assert sorted(t.task_id for t in trajs) == sorted(raysad_envs.list_tasks(env, "test")[:12])
    assert expert["eval/success_rate"] >= 0.9 and expert["eval/invalid_action_rate"] == 0
    # metrics are what the written trajectories say
    assert expert["eval/success_rate"] == sum(t.success for t in trajs) / len(trajs)
    assert expert["eval/mean_reward"] == pytest.approx(sum(t.reward for t in trajs) / len(trajs))
    assert expert["eval/steps"] == sum(len(t.turns) for t in trajs) / len(trajs)
    saved = json.loads((tmp_path / "expert" / "eval.json").read_text())
    assert set(JSON_KEYS) <= set(saved["metrics"])
    assert saved["metrics"]["eval/success_rate"] == expert["eval/success_rate"]
    assert saved["student"]["method"] == "expert" and saved["metrics"]["eval/params"] is None
    # every episode's outcome, by task, for paired comparisons of students
    assert saved["episodes"] == [{"task_id": t.task_id, "success": bool(t.success),
                                  "score": float(t.extra.get("metrics", {}).get("score", t.success))}
                                 for t in sorted(trajs, key=lambda t: t.task_id)]

    random, trajs = evaluate(tmp_path, "random", env=env, policy="random", episodes=12)
    assert random["eval/success_rate"] <= 0.1 and random["eval/mean_reward"] < expert["eval/mean_reward"] / 2
    assert all(not t.turns[0].thought for t in trajs) and trajs[0].policy["model"] == "random"
    if env == "hotpotqa":
        assert random["eval/em"] <= 0.1 and random["eval/f1"] < expert["eval/f1"]
        assert expert["eval/em"] == expert["eval/success_rate"]
        # the random HotPotQA agent sometimes looks up before any search: those steps are invalid
        rejected = sum(t.observation.startswith("Invalid action") for tr in trajs for t in tr.turns)
        steps = sum(len(tr.turns) for tr in trajs)
        assert random["eval/invalid_action_rate"] == pytest.approx(rejected / steps)


def test_alfworld_expert_solves_random_does_not(tmp_path):
    kw = dict(env="alfworld", episodes=2, envs_per_actor=2)
    expert, _ = evaluate(tmp_path, "expert", policy="expert", **kw)
    random, trajs = evaluate(tmp_path, "random", policy="random", max_turns=8, **kw)
    assert expert["eval/success_rate"] == 1.0 and expert["eval/score"] == 1.0
    assert random["eval/success_rate"] == 0.0 and all(len(t.turns) == 8 for t in trajs)


def test_expert_cot_match_on_its_own_reference(tmp_path):
    _, reference = evaluate(tmp_path, "teacher", env="webshop", policy="expert", episodes=3)
    ref_path = str(tmp_path / "teacher" / "trajectories.jsonl")
    expert, _ = evaluate(tmp_path, "expert", env="webshop", policy="expert", episodes=3, reference=ref_path)
    assert expert["eval/cot_prefixes"] == sum(len(t.turns) for t in reference)
    assert expert["eval/cot_match_rate"] == 1.0 and expert["eval/thought_match_rate"] == 1.0
    random, _ = evaluate(tmp_path, "random", env="webshop", policy="random", episodes=3, reference=ref_path)
    assert random["eval/cot_match_rate"] < 0.5 and random["eval/thought_f1"] < 0.5


def test_hf_student_metrics_and_cot_match(tmp_path, tiny_models):
    first, other = tiny_models
    common = dict(env="hotpotqa", policy="hf", episodes=3, max_turns=2, max_new_tokens=6)
    m, trajs = evaluate(tmp_path, "self", model=first, **common)
    turns = [t for tr in trajs for t in tr.turns]
    assert all(t.num_thought_tokens is not None for t in turns)
    assert m["eval/reasoning_tokens"] == pytest.approx(sum(t.num_thought_tokens for t in turns) / len(trajs))
    assert m["eval/params"] == models.parameter_count(models.load_model(first, device="cpu"))
    assert m["eval/latency_per_step_s"] > 0 and m["eval/tokens_per_s"] > 0
    assert 0 < m["eval/engine_decoded_rows"] <= 2 * sum(len(tr.turns) for tr in trajs) * (6 - 1)  # the engine's own
    rejected = sum(t.observation.startswith("Invalid action") for t in turns)
    assert m["eval/invalid_action_rate"] == pytest.approx(rejected / len(turns))

    # greedy: the same model writes the same turns (a rerun on the same output plays nothing, only the CoT part)
    ref_path = str(tmp_path / "self" / "trajectories.jsonl")
    same, _ = evaluate(tmp_path, "self", model=first, reference=ref_path, **common)
    assert same["eval/cot_prefixes"] == len(turns)
    assert same["eval/cot_match_rate"] == 1.0 and same["eval/thought_match_rate"] == 1.0
    assert same["eval/thought_f1"] == 1.0
    different, _ = evaluate(tmp_path, "different", model=other, reference=ref_path, **common | {"episodes": 1})
    assert different["eval/cot_match_rate"] < 1.0 and different["eval/thought_f1"] < 1.0


def test_reference_ce_is_the_models_log_probs_of_the_reference_tokens(tmp_path, tiny_models):
    """The reference CE of the model that generated the reference equals what its engine recorded for those very
    tokens (top-k log-probs at generation); another model scores them worse; --no-cot-match generates nothing."""
    from raysad.encoding import encode_trajectory

    first, other = tiny_models
    common = dict(env="hotpotqa", policy="hf", episodes=3, max_turns=2, max_new_tokens=6)
    tokenizer = models.load_tokenizer(first)
    # top-k over the whole vocabulary: the delimiters an engine appends to close a segment are scored too
    _, reference = evaluate(tmp_path, "ref", model=first, topk=len(tokenizer), **common)
    logprobs = []
    for traj in reference:
        ex = encode_trajectory(traj, tokenizer)
        scored = ex["reason_mask"] | ex["act_mask"]
        assert (ex["topk_mask"] == scored).all()  # every scored token is one the engine generated, and only those
        for pos in scored.nonzero()[0]:
            (hit,) = (ex["topk_ids"][pos] == ex["input_ids"][pos]).nonzero()[0]
            logprobs.append(float(ex["topk_logprobs"][pos][hit]))
    ref_path = str(tmp_path / "ref" / "trajectories.jsonl")
    same, _ = evaluate(tmp_path, "same", model=first, reference=ref_path, cot_match=False, **common)
    assert same["eval/reference_ce"] == pytest.approx(-sum(logprobs) / len(logprobs), rel=1e-4)
    assert "eval/cot_match_rate" not in same
    different, _ = evaluate(tmp_path, "different", model=other, reference=ref_path, cot_match=False, **common)
    assert different["eval/reference_ce"] > same["eval/reference_ce"]
    # the same model behind an OpenAI-compatible server: the same CE, from the server's echo log-probs
    from raysad.policies.openai_server import serve_hf

    with serve_hf(first, device="cpu") as server:
        served, _ = evaluate(tmp_path, "served", model=str(first), reference=ref_path, cot_match=False,
                             **common | {"policy": "openai", "engine_args": {"base_url": server.url}})
    assert served["eval/reference_ce"] == pytest.approx(same["eval/reference_ce"], rel=1e-4)


def test_rerun_resumes_and_refuses_another_policy(tmp_path):
    first, _ = evaluate(tmp_path, "run", env="webshop", policy="expert", episodes=3)
    again, trajs = evaluate(tmp_path, "run", env="webshop", policy="expert", episodes=3)
    assert len(trajs) == 3 and again["eval/success_rate"] == first["eval/success_rate"]
    assert again["eval/latency_per_step_s"] is None  # nothing was played in the rerun
    with pytest.raises(ValueError, match="choose another --out"):
        evaluate(tmp_path, "run", env="webshop", policy="random", episodes=3)


def test_cli_logs_to_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"env": "hotpotqa", "episodes": 3, "env_actors": 1}))
    result = CliRunner().invoke(app, ["evaluate", "--config", "eval.yaml", "--policy", "random", "--out", "ev",
                                      "--experiment", "evaltest", "--student-size", "none"])
    assert result.exit_code == 0, result.output
    assert "success rate" in result.output and (tmp_path / "ev" / "eval.json").is_file()
    mlflow.set_tracking_uri(uri)
    [run] = mlflow.search_runs(experiment_names=["evaltest"], output_format="list")
    assert run.data.tags["stage"] == "evaluate"
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]
    assert run.data.metrics["eval/success_rate"] == saved["eval/success_rate"]
    assert run.data.metrics["eval/steps"] == saved["eval/steps"] > 0 and "eval/params" not in run.data.metrics
    params = run.data.params
    assert (params["env"], params["split"], params["policy"]) == ("hotpotqa", "test", "random")
    assert (params["method"], params["student_size"], params["eval.seed"]) == ("random", "none", "0")
    assert "seed" not in params  # a bare seed is the student's training seed (the report groups by it)
    # the run spans the evaluation (it used to open after it: 19-59 ms runs whatever the evaluation took)
    assert (run.info.end_time - run.info.start_time) / 1000 >= saved["eval/seconds"]
    assert run.info.status == "FINISHED"
    # the per-task outcomes a paired comparison reads come back from the run's eval.json artifact
    from raysad import report

    rows = report.load_runs("evaltest", uri=uri)
    episodes = json.loads((tmp_path / "ev" / "eval.json").read_text())["episodes"]
    assert report.episode_outcomes(rows, uri) == {(0, e["task_id"]): float(e["success"]) for e in episodes}
    assert len(episodes) == 3

    bad = CliRunner().invoke(app, ["evaluate", "--policy", "hf", "--out", "x"])
    assert bad.exit_code == 2 and "needs --model" in bad.output
    # an evaluation that fails after its run opened leaves that run FAILED, not a run that never was
    broken = CliRunner().invoke(app, ["evaluate", "--env", "hotpotqa", "--policy", "random", "--episodes", "1",
                                      "--reference", str(tmp_path / "missing.jsonl"), "--out", "ev2",
                                      "--experiment", "evaltest", "--run-name", "broken"])
    assert broken.exit_code != 0
    [failed] = mlflow.search_runs(experiment_names=["evaltest"], filter_string="tags.mlflow.runName = 'broken'",
                                  output_format="list")
    assert failed.info.status == "FAILED"


def test_student_params_from_the_model_dir(tmp_path):
    (tmp_path / "raysad.json").write_text(json.dumps({"method": "sad", "student_size": "tiny-5m", "seed": 3,
                                                      "lambda_act": 2.0, "unrelated": 1}))
    (tmp_path / "prune_summary.json").write_text(json.dumps({"ratio": 0.3, "params_after": 10}))
    cfg = EvalConfig(policy="hf", model=str(tmp_path))
    assert student_params(cfg) == {"method": "sad", "student_size": "tiny-5m", "seed": "3", "lambda_act": "2.0",
                                   "prune_ratio": "0.3"}
    flagged = EvalConfig(policy="hf", model=str(tmp_path), method="token_kd")
    assert student_params(flagged)["method"] == "token_kd"


def test_helpers():
    assert normalize_action("  Search[ Foo   Bar]") == normalize_action("search[ foo bar]")
    assert token_f1("go to the desk", "go to the desk") == 1.0 and token_f1("", "") == 1.0
    assert token_f1("a b", "c d") == 0.0 and 0 < token_f1("go to desk 1", "go to desk 2") < 1
    assert count_parameters("/nonexistent-model-dir") is None
