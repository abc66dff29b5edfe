"""A real two-node Ray cluster on this machine (Ray's own `ray.cluster_utils.Cluster`, token auth on as on
cluster.yaml's nodes): custom resources pin rollout env actors, an hf teacher engine and Ray Train workers to
the node that holds them, as `teacher_engine` / `trainer` do on the AWS cluster.

  head   (node a): 2 CPUs, node_a, trainer: 1
  node b         : 1 CPU,  node_b, trainer: 1
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

import raysad_envs
from raysad import models
from raysad.distill import DistillConfig, run_distill
from raysad.rollout import RolloutConfig, run_rollout
from raysad.serving import _share, placement
from raysad.trajectory_reader import read_trajectories

ENV = "webshop"


@pytest.fixture(scope="module")
def nodes():
    """{"a": node id, "b": node id, "address": GCS address} of a running two-node cluster, this process
    connected to it."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "token")  # every node and client, as cluster.yaml sets it
    reset_auth_token_state()  # this process read its auth mode when Ray was imported: read it again
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
        (Path.home() / ".ray" / "auth_token").is_file()
    if not has_token:  # what a local ray.init() would make: the token in ~/.ray/auth_token
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       check=True, capture_output=True)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 10, "trainer": 1}, "include_dashboard": False})
    try:
        node_b = cluster.add_node(num_cpus=1, resources={"node_b": 10, "trainer": 1})
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        yield {"a": cluster.head_node.node_id, "b": node_b.node_id, "address": cluster.address}
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()
        reset_auth_token_state()


@pytest.fixture(scope="module")
def expert_rollout(nodes, tmp_path_factory):
    """Expert episodes played by two env actors pinned to node b."""
    cfg = RolloutConfig(env=ENV, split="test", episodes=6, env_actors=2, envs_per_actor=2,
                        env_actor_resources={"node_b": 1},
                        out=str(tmp_path_factory.mktemp("expert") / "expert.jsonl"))
    return cfg, run_rollout(cfg, progress=False, track=False)


@pytest.fixture(scope="module")
def tokenizer_dir(expert_rollout, tmp_path_factory):
    from raysad.agent_formats import get_format
    from raysad.segments import render_context

    cfg, _ = expert_rollout
    fmt = get_format(ENV)
    texts = [render_context(t.prompt, t.turns, fmt) for t in read_trajectories(cfg.out)]
    out = tmp_path_factory.mktemp("tok")
    models.train_tokenizer(texts, vocab_size=400, out_dir=out)
    return out


def test_cpu_share_fits_every_actor_on_some_node():
    assert _share([1.0, 1.0], 3) == 0.5       # 3 x 2/3 CPU would fit the total (2) but one node takes only one
    assert _share([4.0, 1.0], 2) == 2.0       # both on the large node
    assert _share([2.0], 3) == 0.6666         # rounded down to Ray's unit: 3 x 0.6667 > 2 would not fit
    assert _share([0.0], 2) == 0.0 and _share([], 1) == 0.0


def test_token_auth_is_on_and_a_wrong_token_is_refused(nodes):
    script = ("import ray, sys\n"
              "try:\n"
              f"    ray.init(address={nodes['address']!r}, logging_level='ERROR')\n"
              "except Exception as err:\n"
              "    print(type(err).__name__, err); sys.exit(3)\n"
              "print('connected')\n")
    # RAY_NUM_REDIS_GET_RETRIES: give up after 3 tries (one a second) rather than Ray's 20
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64, "RAY_NUM_REDIS_GET_RETRIES": "3"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "connected" not in result.stdout, result.stdout + result.stderr
    assert "InvalidAuthToken" in result.stderr  # refused for its token, not for anything else


def test_env_actors_play_on_the_node_holding_their_resource(nodes, expert_rollout):
    cfg, summary = expert_rollout
    # node b has 1 CPU for 2 actors: each asks half of it (asking a share of the cluster's 3 would leave one
    # actor unplaceable)
    assert placement(cfg) == (0.0, 0.0, 0.5)
    trajs = list(read_trajectories(cfg.out))
    assert sorted(t.task_id for t in trajs) == sorted(raysad_envs.list_tasks(ENV, "test")[:6])
    assert summary.errors == 0 and all(t.success for t in trajs)
    assert {t.extra["node_id"] for t in trajs} == {nodes["b"]}


def test_hf_engine_on_one_node_env_actors_on_the_other(nodes, tokenizer_dir, tmp_path):
    model = models.init_model_dir("tiny-1m", tokenizer_dir, tmp_path / "teacher")
    cfg = RolloutConfig(env=ENV, split="test", episodes=2, max_turns=1, policy="hf", model=str(model),
                        max_new_tokens=4, env_actors=1, envs_per_actor=2, engine_resources={"node_a": 1},
                        env_actor_resources={"node_b": 1}, out=str(tmp_path / "hf.jsonl"))
    gpus, engine_cpus, actor_cpus = placement(cfg)
    assert (gpus, engine_cpus, actor_cpus) == (0.0, 2.0, 1.0)  # a CPU model gets all of node a's cores
    summary = run_rollout(cfg, progress=False, track=False)
    trajs = list(read_trajectories(cfg.out))
    assert len(trajs) == 2 and summary.errors == 0
    assert all(turn.token_ids for t in trajs for turn in t.turns)  # the engine did generate them
    assert summary.engine_nodes == [nodes["a"]]
    assert {t.extra["node_id"] for t in trajs} == {nodes["b"]}
    assert summary.actors_with_local_engine == 0  # none to be had: the env actor asks the engine on node a


def test_distill_workers_go_one_per_node_holding_trainer(nodes, expert_rollout, tokenizer_dir, tmp_path):
    # two CPU workers would both fit on the head's 2 CPUs: `trainer: 1` (one unit per node) spreads them
    cfg, _ = expert_rollout
    config = DistillConfig(trajectories=cfg.out, student="tiny-1m", tokenizer=str(tokenizer_dir),
                           out=str(tmp_path / "student"), method="sft", workers=2,
                           worker_resources={"trainer": 1}, batch_size=4, micro_batch_size=2, max_steps=2,
                           max_length=128, checkpoint_every=2, resume=False)
    result = run_distill(config, track=False)
    assert [line["step"] for line in result.log] == [0, 1]
    assert sorted(w["rank"] for w in result.workers) == [0, 1]
    assert {w["node_id"] for w in result.workers} == {nodes["a"], nodes["b"]}
    assert (Path(result.out) / "config.json").is_file()
