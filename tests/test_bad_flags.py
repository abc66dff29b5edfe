"""Bad numbers fail fast: every numeric flag/field of rollout, evaluate, distill, sft and prune is range-checked
on the driver (the configs' __post_init__, via raysad.config.check_range) before Ray starts or anything is
written, and the CLI exits 2 with one line naming the field and its allowed range (no traceback)."""
from __future__ import annotations

import math
import sys

import pytest
from typer.testing import CliRunner

from raysad.cli import app
from raysad.config import ConfigError, build_config, check_range

STAGES = {"rollout": ("raysad.rollout", "run_rollout"), "evaluate": ("raysad.evaluate", "run_evaluate"),
          "distill": ("raysad.distill", "run_distill"), "sft": ("raysad.sft", "run_sft"),
          "prune": ("raysad.prune", "run_prune")}

# (command, flags, field named in the error, the allowed range as printed)
CLI_CASES = [
    ("rollout", ["--episodes", "-5"], "episodes", ">= 1"),
    ("rollout", ["--episodes", "0"], "episodes", ">= 1"),
    ("rollout", ["--max-turns", "99999999999999999999"], "max_turns", "in [1, 10_000]"),
    ("rollout", ["--max-turns", "0"], "max_turns", "in [1, 10_000]"),
    ("rollout", ["--num-tasks", "0"], "num_tasks", "in [1, 1_000_000]"),
    ("rollout", ["--temperature", "-0.5"], "temperature", ">= 0"),
    ("rollout", ["--temperature", "nan"], "temperature", ">= 0"),
    ("rollout", ["--topk", "-1"], "topk", "in [0, 1000]"),
    ("rollout", ["--topk", "5000"], "topk", "in [0, 1000]"),
    ("rollout", ["--few-shot", "-1"], "few_shot", "in [0, 32]"),
    ("rollout", ["--max-new-tokens", "0"], "max_new_tokens", "in [1, 131_072]"),
    ("rollout", ["--max-new-tokens", "10000000"], "max_new_tokens", "in [1, 131_072]"),
    ("evaluate", ["--max-thought-tokens", "0"], "max_thought_tokens", "in [1, 131_072]"),
    ("rollout", ["--env-actors", "0"], "env_actors", "in [1, 4096]"),
    ("rollout", ["--envs-per-actor", "100000"], "envs_per_actor", "in [1, 4096]"),
    ("rollout", ["--engines", "0"], "engines", "in [1, 1024]"),
    ("rollout", ["--tensor-parallel", "-2"], "tensor_parallel", "in [1, 1024]"),
    ("rollout", ["--gpus-per-engine", "-1"], "gpus_per_engine", "in [0, 1024]"),
    ("rollout", ["--seed", "-1"], "seed", "in [0, "),
    ("evaluate", ["--episodes", "-5"], "episodes", ">= 1"),
    ("evaluate", ["--max-turns", "99999999999999999999"], "max_turns", "in [1, 10_000]"),
    ("evaluate", ["--temperature", "-1"], "temperature", ">= 0"),
    ("evaluate", ["--topk", "-3"], "topk", "in [0, 1000]"),
    ("evaluate", ["--few-shot", "99"], "few_shot", "in [0, 32]"),
    ("evaluate", ["--env-actors", "0"], "env_actors", "in [1, 4096]"),
    ("evaluate", ["--max-new-tokens", "-1"], "max_new_tokens", "in [1, 131_072]"),
    ("distill", ["--lr", "-1"], "lr", "> 0"),
    ("distill", ["--lr", "0"], "lr", "> 0"),
    ("distill", ["--lr", "inf"], "lr", "> 0"),
    ("distill", ["--temperature", "0"], "temperature", "> 0"),
    ("distill", ["--beta", "5"], "beta", "in [0, 1]"),
    ("distill", ["--beta", "-0.1"], "beta", "in [0, 1]"),
    ("distill", ["--lambda-reason", "-1"], "lambda_reason", ">= 0"),
    ("distill", ["--lambda-act", "-0.5"], "lambda_act", ">= 0"),
    ("distill", ["--ce-weight", "-1"], "ce_weight", ">= 0"),
    ("distill", ["--max-length", "1"], "max_length", "in [2, 1_048_576]"),
    ("distill", ["--batch-size", "0"], "batch_size", "in [1, 65_536]"),
    ("distill", ["--micro-batch-size", "0"], "micro_batch_size", "in [1, 65_536]"),
    ("distill", ["--epochs", "0"], "epochs", ">= 1"),
    ("distill", ["--max-steps", "-1"], "max_steps", ">= 0"),
    ("distill", ["--workers", "-1"], "workers", "in [0, 4096]"),
    ("distill", ["--gpus-per-worker", "-1"], "gpus_per_worker", "in [0, 1024]"),
    ("distill", ["--checkpoint-every", "0"], "checkpoint_every", ">= 1"),
    ("sft", ["--lr", "-1"], "lr", "> 0"),
    ("sft", ["--epochs", "0"], "epochs", ">= 1"),
    ("sft", ["--batch-size", "0"], "batch_size", "in [1, 65_536]"),
    ("sft", ["--max-length", "1"], "max_length", "in [2, 1_048_576]"),
    ("sft", ["--workers", "-2"], "workers", "in [0, 4096]"),
    ("sft", ["--max-steps", "-3"], "max_steps", ">= 0"),
    ("prune", ["--ratio", "1"], "ratio", "in [0, 1)"),
    ("prune", ["--ratio", "-0.1"], "ratio", "in [0, 1)"),
    ("prune", ["--batch-size", "0"], "batch_size", "in [1, 65_536]"),
    ("prune", ["--calibration-batches", "0"], "calibration_batches", "in [1, 1_000_000]"),
    ("prune", ["--round-to", "0"], "round_to", "in [1, 65_536]"),
    ("prune", ["--recover-steps", "-1"], "recover_steps", ">= 0"),
    ("prune", ["--max-length", "0"], "max_length", "in [2, 1_048_576]"),
]

# fields without a flag, from a --config YAML file (the issue's `lambda_reason: -1` among them)
YAML_CASES = [
    ("distill", "lambda_reason: -1\n", "lambda_reason", ">= 0"),
    ("distill", "curriculum_start: 0\n", "curriculum_start", "in (0, 1]"),
    ("distill", "min_lr_ratio: 2\n", "min_lr_ratio", "in [0, 1]"),
    ("distill", "max_grad_norm: -1\n", "max_grad_norm", ">= 0"),
    ("sft", "vocab_size: 10\n", "vocab_size", "in [258, 1_048_576]"),
    ("prune", "recover_lr: 0\n", "recover_lr", "> 0"),
    ("rollout", "max_attempts: 0\n", "max_attempts", "in [1, 1000]"),
    ("rollout", "batch_wait_s: -1\n", "batch_wait_s", "in [0, 3600]"),
    ("evaluate", "num_cpus: 0\n", "num_cpus", ">= 1"),
]


@pytest.fixture
def sealed(tmp_path, monkeypatch):
    """An empty working directory, the stages' run_* functions and ray.init replaced by tripwires: a bad number
    must fail while the config is built, before any of them."""
    import importlib

    called = []

    def tripwire(what):
        def fire(*args, **kwargs):
            called.append(what)
            raise RuntimeError(f"tripwire: {what} was reached")
        return fire

    for module, fn in STAGES.values():
        monkeypatch.setattr(importlib.import_module(module), fn, tripwire(fn))
    ray = sys.modules.get("ray")  # imported by raysad.rollout
    if ray is not None:
        monkeypatch.setattr(ray, "init", tripwire("ray.init"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tmp_path, called
    assert not called, called
    if ray is not None:
        assert not ray.is_initialized()


def _required(command: str, tmp_path) -> list[str]:
    out = tmp_path / "out"
    base = {"rollout": ["--out", str(out / "t.jsonl")],
            "evaluate": ["--policy", "expert", "--out", str(out)],
            "distill": ["--trajectories", str(tmp_path / "t.jsonl"), "--student", "tiny-1m", "--out", str(out)],
            "sft": ["--trajectories", str(tmp_path / "t.jsonl"), "--out", str(out)],
            "prune": ["--model", str(tmp_path / "model"), "--out", str(out)]}
    return [command, *base[command]]


def _check_refused(result, tmp_path, field: str, allowed: str) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(output.splitlines()) == 1, output
    assert output.startswith("error: ") and f"field '{field}' must be {allowed}" in output, output
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "cwd").iterdir()) == []
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command,flags,field,allowed", CLI_CASES,
                         ids=[f"{c}{''.join(f)}" for c, f, _, _ in CLI_CASES])
def test_bad_flag_exits_2_before_ray(command, flags, field, allowed, sealed):
    tmp_path, _ = sealed
    result = CliRunner().invoke(app, [*_required(command, tmp_path), *flags])
    _check_refused(result, tmp_path, field, allowed)


@pytest.mark.parametrize("command,text,field,allowed", YAML_CASES,
                         ids=[f"{c}-{t.split(':')[0]}" for c, t, _, _ in YAML_CASES])
def test_bad_yaml_field_exits_2_before_ray(command, text, field, allowed, sealed):
    tmp_path, _ = sealed
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = CliRunner().invoke(app, [*_required(command, tmp_path), "--config", str(config)])
    _check_refused(result, tmp_path, field, allowed)


def test_tripwires_catch_a_stage_that_runs(sealed):
    """The check above is not vacuous: with valid numbers the stage's run_* function is reached."""
    tmp_path, called = sealed
    result = CliRunner().invoke(app, [*_required("distill", tmp_path), "--lr", "1e-3"])
    assert "tripwire: run_distill" in repr(result.exception) and called == ["run_distill"]
    called.clear()


def test_cli_table_is_broad():
    assert len(CLI_CASES) + len(YAML_CASES) >= 25
    assert {c for c, *_ in CLI_CASES} == set(STAGES)


def test_zero_where_zero_means_something():
    from raysad.distill import DistillConfig
    from raysad.evaluate import EvalConfig
    from raysad.prune import PruneConfig
    from raysad.rollout import RolloutConfig
    from raysad.sft import SFTConfig

    r = build_config(RolloutConfig, None, temperature=0.0, topk=0, few_shot=0, max_restarts=0, batch_wait_s=0,
                     cpus_per_env_actor=0, gpus_per_engine=0, seed=0, max_turns=10_000, max_new_tokens=131_072)
    assert r.temperature == 0 and r.topk == 0  # 0 = greedy, no logprobs stored
    e = build_config(EvalConfig, None, policy="expert", temperature=0.0, topk=0, few_shot=32, episodes=1)
    assert e.few_shot == 32
    d = build_config(DistillConfig, None, trajectories="t.jsonl", student="tiny-1m", max_steps=0, workers=0,
                     ce_weight=0, max_grad_norm=0, warmup_steps=0, weight_decay=0, gpus_per_worker=0,
                     lambda_reason=0, beta=0, min_lr_ratio=0, curriculum_start=1, max_failures=0)
    assert d.workers == 0 and d.beta == 0
    # both lambdas 0 stay allowed: the loss_weights sweep's (0, 0) corner
    assert build_config(DistillConfig, None, trajectories="t", student="s", lambda_reason=0, lambda_act=0, beta=1)
    s = build_config(SFTConfig, None, trajectories="t.jsonl", workers=0, max_steps=0, max_grad_norm=0, vocab_size=258)
    assert s.workers == 0
    p = build_config(PruneConfig, None, model="m", ratio=0.0, recover_steps=0, recover_workers=0, round_to=1)
    assert p.ratio == 0
    # the defaults stay valid
    RolloutConfig(), EvalConfig(policy="expert"), DistillConfig(trajectories="t", student="s")
    SFTConfig(trajectories="t"), PruneConfig(model="m")


def test_check_range_messages():
    with pytest.raises(ConfigError, match=r"^field 'beta' must be in \[0, 1\], got 5$"):
        check_range("beta", 5, 0, 1)
    with pytest.raises(ConfigError, match=r"^field 'lr' must be > 0, got 0.0$"):
        check_range("lr", 0.0, 0, low_inclusive=False)
    with pytest.raises(ConfigError, match=r"^field 'ratio' must be in \[0, 1\), got 1.0 \(what it is\)$"):
        check_range("ratio", 1.0, 0, 1, high_inclusive=False, why="what it is")
    with pytest.raises(ConfigError, match=r"^field 'max_steps' must be in \[1, 10_000\] or unset, got 10\*\*30"
                       .replace(r"10\*\*30", str(10**30))):
        check_range("max_steps", 10**30, 1, 10_000, optional=True)
    for bad in (math.nan, math.inf, -math.inf, True, "3", 10**400):
        with pytest.raises(ConfigError):
            check_range("x", bad, 0, 10**6)
    with pytest.raises(ConfigError, match="must be <= 3"):
        check_range("x", 4, high=3)
    check_range("x", None, 1, optional=True)
    check_range("x", 0, 0)
    check_range("x", 10**20, 0)  # a huge int is fine where there is no upper bound
    assert issubclass(ConfigError, ValueError)
