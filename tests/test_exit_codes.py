"""Exit codes that tell the truth, and one line instead of a traceback.

`raysad tune` exits 1 when a trial errored (one line per failed trial: its id, the last line of its error,
where its logs are) and 130 when interrupted; a KD sweep over trajectories without stored top-k stops before
any trial with one line naming the file. Bad input elsewhere (`envs play` flags, a model folder without
config.json, an unknown split, a binary or non-UTF-8 trajectory file) exits 2 with one `error:` line naming
the file or field, never a traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raysad.cli import app
from raysad.trajectory import TrajectoryError
from raysad.trajectory_reader import read_trajectories
from raysad.trajectory_writer import TrajectoryWriter
from test_distill import expert_trajectories
from test_tune import data, ray_cluster, sweep_file  # noqa: F401  (module fixtures of the real sweeps)

RAYSAD = Path(sys.executable).parent / "raysad"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, *words: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line holding every word."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    (line,) = error_lines(result.output)
    for word in words:
        assert word in line, line
    return line


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """Expert trajectories without token ids or top-k (what `raysad rollout --policy expert` writes)."""
    path = tmp_path_factory.mktemp("plain") / "expert.jsonl"
    with TrajectoryWriter(path) as out:
        for traj in expert_trajectories(3):
            out.write(traj)
    return path


# ---------------------------------------------------------------------------------------- raysad tune ----
def test_a_sweep_whose_trial_errors_exits_1_and_names_the_trial(ray_cluster, data, tmp_path):  # noqa: F811
    path = sweep_file(data, tmp_path, "failing", ["sft"],
                      space={"student": ["tiny-1m"], "method": ["sft"], "fail_once_at_step": [1]},
                      distill={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "max_length": 160, "warmup_steps": 1,
                               "workers": 1, "log_every": 100, "max_failures": 0}, report=False)
    result = invoke("tune", path)
    assert result.exit_code == 1, (result.output, result.exception)
    failed = [line for line in result.output.splitlines() if line.startswith("tune: trial ")]
    assert len(failed) == 1, result.output
    trial_dirs = list((tmp_path / "runs" / "failing" / "trials").iterdir())
    assert len(trial_dirs) == 1
    trial_id = trial_dirs[0].name
    assert failed[0].startswith(f"tune: trial {trial_id} failed: ")
    assert "injected failure" in failed[0] and str(trial_dirs[0]) in failed[0]  # the error's last line, the logs
    assert "1/1 trial(s) failed" in result.output


def test_an_interrupted_sweep_exits_130(monkeypatch, tmp_path, capsys):
    from raysad import tune

    finished = {"trial_id": "a", "status": "TERMINATED", "error": None, "done": True, "logs": []}
    pending = {"trial_id": "b", "status": "PENDING", "error": None, "done": False, "logs": []}
    errored = {"trial_id": "c", "status": "ERROR", "error": "RuntimeError: boom", "done": False,
               "logs": [str(tmp_path / "c")]}
    result = tune.SweepResult(sweep_dir=tmp_path, run_id=None, trials=[finished, pending], interrupted=True)
    assert result.exit_code == 130
    # Tune creates trials as it goes: interrupted after the first, it knows 2 of the sweep's 4
    result.planned = 4
    tune.say_failures(result)
    assert "interrupted with 3 trial(s) unfinished" in capsys.readouterr().err
    assert tune.SweepResult(sweep_dir=tmp_path, run_id=None, trials=[finished, errored]).exit_code == 1
    assert tune.SweepResult(sweep_dir=tmp_path, run_id=None, trials=[finished]).exit_code == 0

    # Ctrl-C outside Tune's own handler (while the inputs are prepared) also exits 130, in one line
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "run_sweep", interrupted)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "envs": ["hotpotqa"], "trajectories": str(tmp_path / "x.jsonl"),
                                    "space": {"student": ["tiny-1m"], "method": ["sft"]}}))
    cli = invoke("tune", path)
    assert cli.exit_code == 130 and "interrupted" in cli.output and "Traceback" not in cli.output


def test_a_kd_sweep_over_trajectories_without_topk_fails_before_any_trial(plain, tmp_path):
    body = {"name": "notopk", "envs": ["hotpotqa"], "trajectories": str(plain),
            "space": {"student": ["tiny-1m"], "method": ["sad", "sft"]}, "storage": str(tmp_path / "runs"),
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = tmp_path / "notopk.yaml"
    path.write_text(yaml.safe_dump(body))
    assert_one_line_error(invoke("tune", path), str(plain), "top-k", "sad")
    assert not (tmp_path / "runs" / "notopk").exists()  # no trial, no sweep folder, no Ray
    body["space"]["method"] = ["sft"]  # imitation needs no teacher signal: the pre-flight lets it through
    from raysad.sweep import check_stored_topk
    from raysad.tune import load_sweep

    path.write_text(yaml.safe_dump(body))
    check_stored_topk(load_sweep(path))


# ----------------------------------------------------------------------------------- one line, exit 2 ----
@pytest.mark.parametrize("args, words", [
    (["chess"], ["unknown environment 'chess'"]),
    (["hotpotqa", "--split", "valid_seen"], ["valid_seen", "allowed: train, valid, test"]),
    (["alfworld", "--split", "valid_seen", "--expert"], ["valid_seen", "allowed: train, valid, test"]),
    (["hotpotqa", "--few-shot", "9", "--expert"], ["few_shot"]),
    (["hotpotqa", "--data", "/nowhere/hotpot.json", "--expert"], ["/nowhere/hotpot.json"]),
    (["alfworld", "--task-id", "nope", "--expert"], ["--task-id 'nope'"]),  # a KeyError inside the env
])
def test_envs_play_bad_flags_give_one_line(args, words):
    assert_one_line_error(invoke("envs", "play", *args), *words)


def test_envs_play_negative_seed_is_a_usage_error():
    result = invoke("envs", "play", "hotpotqa", "--seed", "-1", "--expert")
    assert result.exit_code == 2 and "--seed" in result.output and result.exception.__class__ is SystemExit


@pytest.mark.parametrize("stage", ["distill", "sft"])
def test_a_model_folder_without_config_json_gives_one_line(stage, plain, tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    flags = (["distill", "--trajectories", plain, "--student", empty, "--method", "sft", "--workers", "0"]
             if stage == "distill" else ["sft", "--trajectories", plain, "--model", empty])
    assert_one_line_error(invoke(*flags, "--out", tmp_path / "out"), str(empty), "config.json")


def test_load_model_and_tokenizer_name_the_folder(tmp_path):
    from raysad import models

    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(FileNotFoundError) as err:
            load(tmp_path)
        assert str(tmp_path) in str(err.value) and "config.json" in str(err.value)
        assert "\n" not in str(err.value)


def test_evaluate_with_a_model_folder_without_config_json_exits_2(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    proc = subprocess.run([str(RAYSAD), "evaluate", "--env", "hotpotqa", "--model", str(empty), "--episodes", "1",
                           "--env-actors", "1", "--envs-per-actor", "1", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(empty) in line and "config.json" in line


def test_a_vllm_engine_without_vllm_installed_says_what_to_install(tmp_path):
    """The engine actor that cannot import vLLM fails to start; the driver exits 2 with the install command."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from raysad import models

    tokenizer = models.train_tokenizer(["Thought: search.\nAction: Search[x]\n"] * 5, vocab_size=300)
    model_dir = tmp_path / "model"
    models.build_tiny_model("tiny-1m", tokenizer).save_pretrained(model_dir)
    models.save_tokenizer(tokenizer, model_dir)
    proc = subprocess.run([str(RAYSAD), "evaluate", "--env", "hotpotqa", "--policy", "vllm", "--model", str(model_dir),
                           "--episodes", "1", "--env-actors", "1", "--envs-per-actor", "1",
                           "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "MissingExtra: vLLM is not installed" in line and "pip install" in line and "raysad.config" not in line


def test_an_unknown_split_names_the_allowed_ones(tmp_path):
    assert_one_line_error(invoke("rollout", "--env", "hotpotqa", "--split", "valid_seen", "--episodes", "1",
                                 "--out", tmp_path / "t.jsonl"), "valid_seen", "allowed: train, valid, test")


def test_binary_and_non_utf8_trajectory_files_name_the_file_and_line(plain, tmp_path):
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert_one_line_error(invoke("sft", "--trajectories", binary, "--model", "tiny-1m", "--out", tmp_path / "o"),
                          f"{binary}:1:", "not UTF-8")
    latin = tmp_path / "latin.jsonl"
    good = plain.read_bytes().splitlines()[0]
    assert b'"thought":"' in good
    latin.write_bytes(good + b"\n" + good.replace(b'"thought":"', b'"thought":"caf\xe9 ', 1) + b"\n")
    with pytest.raises(TrajectoryError, match=rf"{latin}:2: not UTF-8 text \(byte 0xe9"):
        list(read_trajectories(latin))
    assert len(list(read_trajectories(latin, skip_bad=True))) == 1  # skip_bad skips that line only


def test_a_sweep_counts_the_trials_tune_has_not_created_yet():
    from raysad.sweep import SweepConfig, trial_count

    space = [{"student": ["tiny-1m"], "method": ["sad", "sft"], "seed": [0, 1]}, {"student": ["tiny-1m"],
                                                                                 "method": ["token_kd"]}]
    assert trial_count(SweepConfig(name="s", envs=["hotpotqa", "webshop"], space=space)) == 10
    assert trial_count(SweepConfig(name="s", envs=["hotpotqa"], space=space, num_samples=2)) == 10
    assert trial_count(SweepConfig(name="s", envs=["hotpotqa"], search="random", num_samples=7,
                                   space={"lambda_act": {"uniform": [0.5, 2.0]}})) == 7


@pytest.mark.parametrize("raised,code,words", [
    ("incomplete", 1, "error: 3 of 12 episodes not played"), ("interrupt", 130, "interrupted: rerun the same command")])
def test_a_stage_that_did_less_or_was_interrupted_says_so_in_one_line(raised, code, words, capsys):
    import typer

    from raysad.cli import run_stage
    from raysad.ui import StageIncomplete

    def stage():
        if raised == "incomplete":
            raise StageIncomplete("3 of 12 episodes not played (their env actor failed 3 times); rerun the same "
                                  "command to play them")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exit_:
        run_stage(stage)
    assert exit_.value.exit_code == code
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
