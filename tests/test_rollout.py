"""The rollout stage: the Ray actor pool plays every task once, survives a dying actor, resumes, keeps top-k."""
from __future__ import annotations

import functools
import os
import time
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray
from ray import cloudpickle
from typer.testing import CliRunner

import raysad_envs
from raysad.cli import app

from raysad.rollout import RolloutConfig, finished_task_ids, run_rollout
from raysad.trajectory_reader import read_trajectories
from raysad_envs.core import InvalidAction, TextEnv

# CountEnv below is defined in this test module, which Ray workers cannot import: Ray ships it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CountEnv(TextEnv):
    """Count up to a task's target with `inc`. Task `boom` raises inside step (an env bug, not a bad action);
    with `crash_marker` set, the first episode of `crash_task` kills its whole process at step 2."""

    env_name = "count"
    agent_format = "webshop"
    default_max_steps = 10

    def __init__(self, split="train", num_tasks=12, crash_task=None, crash_marker=None, **kwargs):
        super().__init__(split=split, **kwargs)
        self.num_tasks, self.crash_task, self.crash_marker = num_tasks, crash_task, crash_marker

    def task_ids(self):
        return [f"t{i:02d}" for i in range(self.num_tasks)] + ["boom"]

    def _load_task(self, task_id):
        self.count, self.target = 0, 1 + int(task_id[1:]) % 4 if task_id != "boom" else 3
        return f"Count to {self.target}.", {"instruction": f"count to {self.target}"}

    def _apply(self, action):
        if self.task_id == "boom" and self.count == 1:
            raise RuntimeError("the env broke")
        if self.task_id == self.crash_task and self.count == 1 and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).write_text("crashed once")
            os._exit(1)
        if action != "inc":
            raise InvalidAction(f"unknown action {action!r}")
        self.count += 1
        self._success = self.count == self.target
        return f"count is {self.count}", float(self._success), self._success, {"score": self.count / self.target}

    def expert_turn(self):
        return f"count is {self.count}, target {self.target}", "inc"

    def prompt(self, observation, few_shot=0):
        return f"Say inc to count.\n{observation}\n"


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def config(tmp_path, **kw) -> RolloutConfig:
    base = dict(env="count", policy="expert", env_actors=2, envs_per_actor=3, out=str(tmp_path / "t.jsonl"))
    return RolloutConfig(**(base | kw))


def task_counts(path) -> Counter:
    return Counter(t.task_id for t in read_trajectories(path))


def test_pool_plays_every_task_once_with_the_expert(tmp_path):
    cfg = config(tmp_path)
    summary = run_rollout(cfg, env_factory=functools.partial(CountEnv), progress=False, track=False)
    trajs = {t.task_id: t for t in read_trajectories(cfg.out)}
    assert sorted(trajs) == sorted(CountEnv().task_ids())
    assert summary.episodes == summary.written == 13 and summary.errors == 1
    for task_id, t in trajs.items():
        if task_id == "boom":  # an env that raises ends its episode with the error, not the job
            assert not t.success and "the env broke" in t.extra["error"]
            continue
        target = 1 + int(task_id[1:]) % 4
        assert t.success and t.reward == 1.0 and len(t.turns) == target
        assert [turn.action for turn in t.turns] == ["inc"] * target
        assert t.turns[-1].observation == f"count is {target}"
        assert t.prompt == f"Say inc to count.\nCount to {target}.\n"
        assert t.instruction == f"count to {target}"
        assert t.policy["backend"] == "expert" and t.env == "count"
        assert t.extra["agent_format"] == "webshop"  # the env's format, recorded for every later stage
    assert summary.steps == sum(len(t.turns) for t in trajs.values())


def test_only_success_and_done_file(tmp_path):
    cfg = config(tmp_path, only_success=True, episodes=5, task_ids=None)
    env = functools.partial(CountEnv, num_tasks=4)  # tasks t00..t03 and boom (which fails)
    summary = run_rollout(cfg, env_factory=env, progress=False, track=False)
    assert summary.episodes == 5 and summary.written == 4
    assert sorted(task_counts(cfg.out)) == ["t00", "t01", "t02", "t03"]
    # boom ended with an error: not done, so a rerun plays it (only it) again
    assert finished_task_ids(cfg.out) == {"t00", "t01", "t02", "t03"}
    again = run_rollout(cfg, env_factory=env, progress=False, track=False)
    assert again.episodes == 1 and again.skipped == 4


def test_dying_env_actor_loses_and_duplicates_nothing(tmp_path):
    cfg = config(tmp_path, max_restarts=2)
    marker = tmp_path / "crashed"
    env = functools.partial(CountEnv, crash_task="t03", crash_marker=str(marker))
    summary = run_rollout(cfg, env_factory=env, progress=False, track=False)
    assert marker.exists(), "the crash hook did not fire"
    assert summary.actor_failures == 1
    counts = task_counts(cfg.out)
    assert counts == Counter({t: 1 for t in CountEnv().task_ids()})
    assert all(t.success for t in read_trajectories(cfg.out) if t.task_id != "boom")


def test_interrupted_run_resumes_and_plays_each_task_once(tmp_path):
    cfg = config(tmp_path)
    written = []

    def interrupt_after_three(traj):
        written.append(traj.task_id)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_rollout(cfg, env_factory=CountEnv, progress=False, track=False, _on_write=interrupt_after_three)
    assert sorted(task_counts(cfg.out)) == sorted(written)
    summary = run_rollout(cfg, env_factory=CountEnv, progress=False, track=False)
    assert summary.skipped == 3 and summary.episodes == 10
    assert task_counts(cfg.out) == Counter({t: 1 for t in CountEnv().task_ids()})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama with a small BPE tokenizer, as one HF directory."""
    from raysad import models

    root = tmp_path_factory.mktemp("tiny")
    texts = [f"Action: think[count is {i}]\nObservation: OK.\n\nAction: inc\nObservation: count is {i}\n\n"
             for i in range(50)]
    models.train_tokenizer(texts, vocab_size=300, out_dir=root / "tok")
    return str(models.init_model_dir("tiny-1m", root / "tok", root / "model"))


@pytest.mark.parametrize("env", ["alfworld", "hotpotqa", "webshop"])
def test_expert_solves_the_real_envs(tmp_path, env):
    cfg = config(tmp_path, env=env, split="test", episodes=2, env_actors=1, envs_per_actor=2, few_shot=1)
    summary = run_rollout(cfg, progress=False, track=False)
    expected = raysad_envs.list_tasks(env, "test")[:2]
    trajs = {t.task_id: t for t in read_trajectories(cfg.out)}
    assert sorted(trajs) == sorted(expected) and summary.errors == 0
    for t in trajs.values():
        assert t.success and t.reward > 0 and t.turns and t.env == env and t.split == "test"
        assert all(turn.action and turn.observation for turn in t.turns)
        assert t.instruction and t.instruction in t.prompt


def test_hf_teacher_keeps_token_ids_and_topk(tmp_path, tiny_model):
    cfg = config(tmp_path, env="hotpotqa", split="test", policy="hf", model=tiny_model, topk=3,
                 max_new_tokens=5, max_turns=2, episodes=4, envs_per_actor=2)
    summary = run_rollout(cfg, progress=False, track=False)
    env = raysad_envs.make("hotpotqa", split="test")
    trajs = list(read_trajectories(cfg.out))
    assert sorted(t.task_id for t in trajs) == sorted(raysad_envs.list_tasks("hotpotqa", "test")[:4])
    n_tokens = 0
    for t in trajs:
        obs, _ = env.reset(options={"task_id": t.task_id})
        assert t.prompt == env.unwrapped.prompt(obs, few_shot=0)
        assert t.policy == {"backend": "hf", "model": tiny_model}
        assert 1 <= len(t.turns) <= 2 and not t.success  # a random model: every episode hits --max-steps
        for turn in t.turns:
            assert turn.token_ids and 0 < turn.num_thought_tokens < len(turn.token_ids)
            assert len(turn.topk_ids) == len(turn.topk_logprobs) == len(turn.token_ids)
            assert all(len(row) == 3 for row in turn.topk_ids)
            assert all(a >= b for row in turn.topk_logprobs for a, b in zip(row, row[1:]))
            assert turn.observation  # the env answered every generated action
            n_tokens += len(turn.token_ids)
    assert summary.tokens_generated == n_tokens
    assert summary.engine_prompts == 2 * summary.steps  # a thought and an action prompt per step
    # the engine actors' own counters reach the run's metrics: decode rows (at most max_new_tokens - 1 per prompt:
    # the prefill makes the first token) and the prompt tokens the prefix cache reused (the action prompt extends
    # the thought prompt)
    metrics = summary.metrics()
    assert 0 < metrics["rollout/engine_decoded_rows"] <= summary.engine_prompts * (5 - 1)
    assert 0.3 < metrics["rollout/engine_prefix_reuse_frac"] < 1


def test_context_topk_keeps_the_models_rows_at_every_token_it_read_after_its_first(tmp_path, tiny_model):
    """--context-topk: each episode also carries the model's top-k at the tokens after its first that it did not
    write (observations, the format's labels), from its engine actor, over exactly the ids training encodes."""
    import torch

    from raysad import models
    from raysad.agent_formats import trajectory_format
    from raysad.encoding import generated_positions
    from raysad.scoring import CONTEXT_TOPK

    cfg = config(tmp_path, env="hotpotqa", split="test", policy="hf", model=tiny_model, topk=4, context_topk=True,
                 max_new_tokens=5, max_turns=2, episodes=2, envs_per_actor=2)
    assert run_rollout(cfg, progress=False, track=False).errors == 0
    tokenizer, model = models.load_tokenizer(tiny_model), models.load_model(tiny_model)
    for traj in read_trajectories(cfg.out):
        ids, positions = generated_positions(traj, tokenizer, trajectory_format(traj))
        made = sorted(p for turn in positions.values() for p in turn)
        rows = traj.extra[CONTEXT_TOPK]
        assert rows["length"] == len(ids)
        assert rows["positions"] == [p for p in range(made[0], len(ids)) if p not in set(made)]
        assert len(rows["positions"]) > len(traj.turns)  # every observation's tokens, not one per turn
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        top = logp[[p - 1 for p in rows["positions"]]].topk(4, dim=-1)  # row p predicts token p
        assert rows["ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(rows["logprobs"]), top.values, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="context_topk.*--topk"):
        config(tmp_path, policy="hf", model=tiny_model, context_topk=True)


def test_max_thought_tokens_budgets_thoughts_only(tmp_path, tiny_model):
    """--max-thought-tokens caps each thought, while actions keep --max-new-tokens: a random model writes to
    either budget (and is closed there, flagged and counted)."""
    def segments(max_thought_tokens):
        cfg = config(tmp_path, env="hotpotqa", split="test", policy="hf", model=tiny_model, max_new_tokens=6,
                     max_thought_tokens=max_thought_tokens, max_turns=2, episodes=2, envs_per_actor=2,
                     out=str(tmp_path / f"thought{max_thought_tokens}.jsonl"))
        summary = run_rollout(cfg, progress=False, track=False)
        turns = [turn for t in read_trajectories(cfg.out) for turn in t.turns]
        return (max(turn.num_thought_tokens for turn in turns),
                max(len(turn.token_ids) - turn.num_thought_tokens for turn in turns), summary)

    thought_short, action_short, summary = segments(2)
    thought_long, action_long, _ = segments(None)
    assert thought_long - thought_short == 6 - 2  # (each thought segment: its tokens + the closing delimiter)
    assert action_short == action_long
    assert summary.thoughts_truncated == summary.model_turns > 0


def test_env_actors_kept_across_runs_play_each_run_with_its_settings(tmp_path, tiny_model):
    """On-policy iterations keep their env actors: run_rollout(env_actors=...) tells them each run's settings
    (top-k, token budget, seed ...) and leaves them alive; a run on kept actors writes what fresh actors write,
    also after Ray restarted one between runs (a restart builds it with its first run's settings). Greedy: a
    sampled batch depends on which prompts share it, and that differs from run to run."""
    from raysad.rollout import start_env_actors

    def cfg_for(name: str, topk: int, max_new_tokens: int) -> RolloutConfig:
        return config(tmp_path, env="hotpotqa", split="test", policy="hf", model=tiny_model, temperature=0.0,
                      topk=topk, max_new_tokens=max_new_tokens, max_turns=2, episodes=4, envs_per_actor=2,
                      max_restarts=1, out=str(tmp_path / f"{name}.jsonl"))

    kept = start_env_actors(cfg_for("first", 0, 3), 2)
    try:
        run_rollout(cfg_for("first", 0, 3), env_actors=kept, progress=False, track=False)
        ray.kill(kept[0], no_restart=False)  # Ray rebuilds it, with the first run's settings
        run_rollout(cfg_for("kept", 2, 5), env_actors=kept, progress=False, track=False)
        assert ray.get([a.ready.remote() for a in kept], timeout=60) == [True, True]  # the caller's: alive
    finally:
        for actor in kept:
            ray.kill(actor)
    run_rollout(cfg_for("fresh", 2, 5), progress=False, track=False)

    def turns(name: str) -> dict:
        return {t.task_id: [(turn.token_ids, turn.topk_ids) for turn in t.turns]
                for t in read_trajectories(tmp_path / f"{name}.jsonl")}

    assert len(turns("kept")) == 4 and turns("kept") == turns("fresh")
    first = turns("first")  # no top-k, a smaller budget: the kept actors did not play with these
    assert all(topk is None for played in first.values() for _, topk in played)
    assert all(len(topk[0]) == 2 for played in turns("kept").values() for _, topk in played)


def test_engine_actor_merges_concurrent_requests_into_one_call(tiny_model):
    import asyncio

    from raysad.policies.hf import HFEngine
    from raysad.serving import EngineActor

    from raysad.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    prompts = [tok.encode(p, add_special_tokens=False)
               for p in ["Action: think[count", "Observation: count is 3\n", "Action: inc\n", "Say inc"]]
    served = EngineActor(functools.partial(HFEngine, tiny_model), max_batch=4, batch_wait_s=5.0)

    async def two_callers():
        return await asyncio.gather(served.generate(prompts[:1], stop=["]"], max_tokens=4, topk=2),
                                    served.generate(prompts[1:], stop=["]"], max_tokens=4, topk=2))

    first, rest = asyncio.run(two_callers())
    assert served.stats()["calls"] == 1 and served.stats()["prompts"] == 4  # full batch: no waiting out 5 s
    direct = HFEngine(tiny_model).generate(prompts, stop=["]"], max_tokens=4, topk=2)
    assert [g.token_ids for g in first + rest] == [g.token_ids for g in direct]
    assert [g.text for g in first + rest] == [g.text for g in direct]


def test_engine_actor_batch_waits_only_for_the_prompts_in_flight(tiny_model):
    import asyncio

    from raysad.policies.hf import HFEngine
    from raysad.serving import EngineActor

    served = EngineActor(functools.partial(HFEngine, tiny_model), max_batch=8, batch_wait_s=60.0)
    prompts = [[5, 6, 7], [8, 9]]

    async def two_callers_of_two_in_flight():
        await served.expect(2)  # the driver: its env actors hold 2 episodes, 8 prompts will never come
        began = time.monotonic()
        await asyncio.gather(*(served.generate([p], max_tokens=2) for p in prompts))
        return time.monotonic() - began

    assert asyncio.run(two_callers_of_two_in_flight()) < 30  # not the 60 s window
    assert served.stats()["calls"] == 1 and served.stats()["prompts"] == 2  # and still one batch
    assert served.batch_target() == 2
    asyncio.run(served.expect(None))
    assert served.batch_target() == 8


def test_env_actors_ask_an_engine_on_their_node_while_the_loads_stay_even():
    from raysad.serving import pair_with_engines

    assert pair_with_engines(["a", "b", "a", "b"], ["a", "b"]) == [0, 1, 0, 1]
    assert pair_with_engines(["b", "b", "a", "a"], ["a", "b"]) == [1, 1, 0, 0]
    assert pair_with_engines(["a", "a", "a", "b"], ["a", "b"]) == [0, 0, 1, 1]  # even loads before locality
    assert pair_with_engines(["c", "c", "c"], ["a", "b"]) == [0, 1, 0]  # none co-located: round-robin
    assert pair_with_engines([None, "a"], ["a"]) == [0, 0]
    assert pair_with_engines(["a", "a"], []) == [0, 0]  # no engine (the expert): unused


def test_last_episodes_do_not_wait_out_the_batching_window(tmp_path, tiny_model):
    # 3 episodes, 1 env actor x 2 envs: the engine batches 2 prompts, and the 3rd episode plays alone. Told
    # that 1 episode is in flight, its calls start at once instead of waiting 30 s each for 1 more prompt.
    # (One env actor: with two, one that starts late on a busy machine makes the first batch wait out its
    # window for the other's prompts, which is the window doing its job, not the lone episode waiting.)
    cfg = config(tmp_path, env="hotpotqa", split="test", policy="hf", model=tiny_model, max_new_tokens=3,
                 max_turns=1, episodes=3, env_actors=1, envs_per_actor=2, batch_wait_s=30.0)
    summary = run_rollout(cfg, progress=False, track=False)
    assert summary.episodes == 3 and summary.errors == 0
    assert summary.wall_s < 30  # without the word: two calls of the lone episode, 30 s each
    assert summary.engine_calls == 4 and summary.engine_prompts == 6  # (2 phases) x (a batch of 2, then 1)


def test_cli_with_yaml_config_logs_to_mlflow(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land next to its database
    (tmp_path / "rollout.yaml").write_text("env: webshop\nsplit: test\nepisodes: 3\nenv_actors: 1\n")
    args = ["rollout", "--config", "rollout.yaml", "--episodes", "2", "--out", "out/w.jsonl",
            "--experiment", "cli-test"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "success rate" in result.output
    trajs = list(read_trajectories(tmp_path / "out" / "w.jsonl"))
    assert sorted(t.task_id for t in trajs) == sorted(raysad_envs.list_tasks("webshop", "test")[:2])  # flag wins
    mlflow.set_tracking_uri(uri)
    [run] = mlflow.search_runs(experiment_names=["cli-test"], output_format="list")
    assert run.data.params["env"] == "webshop" and run.data.params["episodes"] == "2"
    assert run.info.run_name == "rollout-expert-webshop-test" and "None" not in run.data.params.values()
    assert run.data.metrics["rollout/success_rate"] == 1.0 and run.data.metrics["rollout/episodes"] == 2
    assert run.data.metrics["rollout/steps_per_s"] > 0

    bad = CliRunner().invoke(app, ["rollout", "--policy", "hf", "--out", "x.jsonl"])
    assert bad.exit_code == 2 and "needs --model" in bad.output


class SlowEcho:
    """A text engine that takes a while per call (so a call is in flight when its actor dies)."""

    def generate(self, prompts, **_):
        time.sleep(1.0)
        return [p.upper() for p in prompts]


def test_a_call_in_flight_when_the_engine_actor_dies_waits_for_its_restart():
    import concurrent.futures
    import signal

    from raysad.serving import RemoteEngine, start_engines

    (engine,) = start_engines(SlowEcho, 1, 0, 0, max_restarts=1)
    ray.get(engine.ready.remote())
    pid = ray.get(engine.__ray_call__.remote(lambda self: os.getpid()))
    remote = RemoteEngine(engine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(remote.generate, ["a", "b"])
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)  # the engine's process dies mid-call; Ray restarts the actor
        assert answer.result(timeout=120) == ["A", "B"]
    assert remote.restarts_waited == 1
    assert ray.get(engine.__ray_call__.remote(lambda self: os.getpid())) != pid


def test_an_engine_that_cannot_be_placed_fails_the_run_in_one_line_naming_it(tmp_path, tiny_model):
    """An engine actor whose start (or restart, after Ray's OOM killer) waits for resources no node has would
    hold the run forever: past --start-timeout-s the run fails, naming the engine, its ask and what is free."""
    cfg = config(tmp_path, env="hotpotqa", policy="hf", model=tiny_model, episodes=2, env_actors=1,
                 engine_resources={"teacher_engine": 1.0}, start_timeout_s=15)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        run_rollout(cfg, progress=False, track=False)
    assert time.monotonic() - started < 60
    message = str(err.value)
    assert "\n" not in message and message.startswith("engine actor 1 of 1 not up after 15 s")
    assert "{'teacher_engine': 1.0}" in message and "free now: {'CPU': " in message
    assert not Path(cfg.out).exists()  # nothing was played, nothing written


def test_engine_actor_gives_the_log_probs_of_given_tokens(tiny_model):
    """Through an engine actor (where a GPU evaluation computes the reference CE): the local engine's numbers."""
    from raysad.policies.hf import HFEngine
    from raysad.serving import RemoteEngine, start_engines

    prompts, continuations = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    (handle,) = start_engines(functools.partial(HFEngine, tiny_model), 1, 0, 0)
    try:
        remote = RemoteEngine(handle).token_logprobs(prompts, continuations)
    finally:
        ray.kill(handle)
    local = HFEngine(tiny_model).token_logprobs(prompts, continuations)
    assert [len(row) for row in remote] == [2, 3]
    assert remote == [pytest.approx(row, abs=1e-5) for row in local]


def test_weight_sync_makes_the_engine_actor_generate_as_the_trained_model(tiny_model, tmp_path):
    from raysad import models
    from raysad.policies.hf import HFEngine
    from raysad.serving import RemoteEngine, start_engines

    # another model of the same architecture and tokenizer (the student after training), and one that is not
    trained = models.init_model_dir("tiny-1m", tiny_model, tmp_path / "trained", seed=7)
    bigger = models.init_model_dir("tiny-5m", tiny_model, tmp_path / "bigger", seed=7)
    tok = models.load_tokenizer(tiny_model)
    prompts = [tok.encode(p, add_special_tokens=False) for p in ["Action: think[count", "Observation: count is 3\n"]]

    def ids(engine):
        return [g.token_ids for g in engine.generate(prompts, max_tokens=12, topk=2)]

    (handle,) = start_engines(functools.partial(HFEngine, tiny_model), 1, 0, 0)
    remote = RemoteEngine(handle)
    before = ids(remote)
    assert before == ids(HFEngine(tiny_model))
    ray.get(handle.load_weights.remote(str(trained)))
    after = ids(remote)
    assert after == ids(HFEngine(str(trained))) and after != before  # its prefix cache went with the old weights
    with pytest.raises(ray.exceptions.RayTaskError, match="not the engine's architecture"):
        ray.get(handle.load_weights.remote(str(bigger)))
    assert ids(remote) == after  # a refused swap leaves the engine as it was
    ray.kill(handle)
