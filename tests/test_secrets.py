"""Secrets in a config (engine_args api_key, tokens, passwords, Authorization headers) are redacted in
everything written: MLflow params, the config.json artifact, eval.json; the running code keeps the real value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysad.config import REDACTED, flatten, is_secret_key, redact
from raysad.rollout import RolloutConfig

SECRET = "sk-SECRET123"


def files_with_secret(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def mlflow_params_and_artifacts(uri: str, run_id: str, dest: Path) -> tuple[dict, Path]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    params = client.get_run(run_id).data.params
    return params, Path(client.download_artifacts(run_id, "", str(dest)))


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "OPENAI_API_KEY", "apiKey", "x-api-key", "token",
                                 "hf_token", "access_token", "Authorization", "client_secret", "password",
                                 "engine_args.api_key", "eval.engine_args.token"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_new_tokens", "tokenizer", "reasoning_token_unit", "eval/tokens_per_s",
                                 "topk", "model", "key", "engine_args"])
def test_ordinary_keys_are_kept(key):
    assert not is_secret_key(key)


def test_redact_is_deep_and_leaves_the_original_alone():
    config = {"engine_args": {"api_key": SECRET, "headers": {"Authorization": f"Bearer {SECRET}"},
                              "max_model_len": 4096},
              "servers": [{"url": "http://x", "token": SECRET}], "tokenizer": "tok", "password": None}
    clean = redact(config)
    assert clean == {"engine_args": {"api_key": REDACTED, "headers": {"Authorization": REDACTED},
                                     "max_model_len": 4096},
                     "servers": [{"url": "http://x", "token": REDACTED}], "tokenizer": "tok", "password": None}
    assert config["engine_args"]["api_key"] == SECRET  # the running code keeps the real value
    assert SECRET not in json.dumps(flatten(config))


def test_rollout_config_params_and_artifact_carry_no_secret(tmp_path, monkeypatch):
    """flatten -> tracking.start_run (MLflow params + config.json artifact), as every stage logs its config."""
    from raysad import tracking

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands under tmp_path too
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RolloutConfig(env="hotpotqa", policy="openai", model="served", tokenizer="tok",
                        engine_args={"api_key": SECRET, "headers": {"Authorization": f"Bearer {SECRET}"}})
    with tracking.start_run("secrets", "rollout", flatten(cfg), uri=uri) as run:
        run_id = run.info.run_id
    # params built by hand (not through flatten) are redacted by start_run as well
    with tracking.start_run("secrets", "raw", {"engine_args.api_key": SECRET, "hf_token": SECRET}, uri=uri) as raw:
        raw_id = raw.info.run_id
    assert cfg.engine_args["api_key"] == SECRET

    for rid, name in ((run_id, "a"), (raw_id, "b")):
        params, artifacts = mlflow_params_and_artifacts(uri, rid, tmp_path / "downloaded" / name)
        assert SECRET not in json.dumps(params)
        assert SECRET not in (artifacts / "config.json").read_text()
    assert params["engine_args.api_key"] == REDACTED
    assert files_with_secret(tmp_path) == []


def test_evaluate_writes_no_secret(tmp_path, monkeypatch):
    """A real evaluate run (expert policy, 2 HotPotQA episodes) with an api_key in engine_args, tracked."""
    import ray

    from raysad.evaluate import EvalConfig, rollout_config, run_evaluate

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = EvalConfig(env="hotpotqa", policy="expert", episodes=2, env_actors=1, envs_per_actor=2, num_cpus=1,
                     engine_args={"api_key": SECRET}, out=str(tmp_path / "eval"), experiment="secrets",
                     tracking_uri=uri)
    try:
        run_evaluate(cfg, progress=False, track=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["config"]["engine_args"] == {"api_key": REDACTED}
    # the code that plays still gets the real value
    assert cfg.engine_args["api_key"] == SECRET and rollout_config(cfg).engine_args["api_key"] == SECRET

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    params, artifacts = mlflow_params_and_artifacts(uri, run.info.run_id, tmp_path / "downloaded")
    assert SECRET not in json.dumps(params) and params["eval.engine_args.api_key"] == REDACTED
    assert {"config.json", "eval.json"} <= {p.name for p in artifacts.iterdir()}
    assert files_with_secret(tmp_path) == []
