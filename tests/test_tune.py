"""raysad.tune: sweep files (validation with file/line/field errors, the shipped configs), the search space,
chunked schedules, and real sweeps on a 2-CPU Ray: trials distil tiny-1m students (Ray Train, one worker) on
expert HotPotQA trajectories with a tiny teacher's top-k, evaluate them (raysad.evaluate), and log one MLflow
run each under the sweep's run; an interrupted sweep resumes without running a finished trial again.

Data helpers (expert trajectories, the teacher's top-k) are test_distill's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from raysad import models
from raysad.config import ConfigError
from raysad.sweep import SweepConfig, check_stored_topk, grid_points, student_size
from raysad.trajectory_writer import TrajectoryWriter
from raysad.trial import chunk_config
from raysad.tune import SETTINGS_FILE, check_resume, load_sweep, run_sweep
from test_distill import expert_trajectories, with_teacher_topk

CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"


# ----------------------------------------------------------------------------------------- sweep files ----
def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


BASE = """\
name: t
envs: [hotpotqa]
trajectories: /nowhere/topk.jsonl
space:
  student: [tiny-1m]
  method: [sad, sft]
"""


@pytest.mark.parametrize("extra, field, line", [
    ("distill:\n  max_stepz: 3\n", "distill.max_stepz", 8),
    ("distill:\n  max_steps: many\n", "distill.max_steps", 8),
    ("distill:\n  workers: 0\n", "distill.workers", 8),
    ("distill:\n  out: x\n", "distill.out", 8),
    ("search: grid\nspace_extra: 1\n", None, None),
    ("chunks: 2\ndistill: {max_steps: 1}\n", "chunks", 7),
    ("asha: true\nchunks: 2\ndistill: {max_steps: 4}\n", "asha", 7),
    ("evaluate:\n  episodes: 3\n", "evaluate.episodes", 8),
    ("prune:\n  importance: 3d\n", "prune.importance", 8),
])
def test_sweep_errors_name_file_line_and_field(tmp_path, extra, field, line):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    message = str(err.value)
    assert message.startswith(str(path))
    if field is None:
        assert "unknown field(s) space_extra" in message
    else:
        assert f"{path}:{line}: field '{field}'" in message, message


@pytest.mark.parametrize("space, field, words", [
    ("  student: [tiny-1M]\n", "space.student[0]", "neither a tiny size"),
    ("  student: ['derive:keep_every=2']\n", "space.student[0]", "set teacher"),
    ("  student: [tiny-1m]\n  method: [sad, ppo]\n", "space.method[1]", "ppo"),
    ("  student: [tiny-1m]\n  prune_ratio: [0.5, 1.0]\n", "space.prune_ratio[1]", "[0, 1)"),
    ("  student: [tiny-1m]\n  lambda_act: [1, big]\n", "space.lambda_act[1]", "expected float"),
    ("  student: [tiny-1m]\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n", "space.lr", "random or optuna"),
    ("  method: [sft]\n", "space.student", "name the student"),
    ("  student: [tiny-1m]\n  trajectories: [a, b]\n", "space.trajectories", "not a search axis"),
])
def test_space_errors(tmp_path, space, field, words):
    text = "name: t\nenvs: [hotpotqa]\ntrajectories: /x.jsonl\nspace:\n" + space
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, text))
    assert f"field '{field}'" in str(err.value) and words in str(err.value), str(err.value)


def test_teacher_signal_and_data_sources_are_checked(tmp_path):
    kd_without_teacher = "name: t\nenvs: [webshop]\nrollout: {policy: expert}\nspace: {student: [tiny-1m]}\n"
    with pytest.raises(ConfigError, match="need a teacher signal"):
        load_sweep(write(tmp_path, kd_without_teacher))
    sft_only = kd_without_teacher.replace("{student: [tiny-1m]}", "{student: [tiny-1m], method: [sft]}")
    assert load_sweep(write(tmp_path, sft_only)).rollout == {"policy": "expert"}
    # flat_kd distils observation tokens: from the online teacher, or from rows a context_topk rollout stored there
    flat = "name: t\nenvs: [hotpotqa]\nrollout: {policy: expert}\nspace: {student: [tiny-1m], method: [flat_kd]}\n"
    with pytest.raises(ConfigError, match="flat_kd distils observation tokens too.*context_topk"):
        load_sweep(write(tmp_path, flat))
    assert load_sweep(write(tmp_path, flat + "teacher: /some/teacher\n")).teacher == "/some/teacher"
    # a given file: its rows decide, before any trial starts
    given = write(tmp_path, flat.replace("rollout: {policy: expert}", f"trajectories: {tmp_path / 'flat.jsonl'}"))
    with TrajectoryWriter(tmp_path / "flat.jsonl") as out:
        out.write(expert_trajectories(1)[0])
    with pytest.raises(ConfigError, match="holds no teacher top-k at observation tokens"):
        check_stored_topk(load_sweep(given))
    with pytest.raises(ConfigError, match=r"envs\[1\].*unknown environment"):
        load_sweep(write(tmp_path, sft_only.replace("[webshop]", "[webshop, chess]")))
    with pytest.raises(ConfigError, match="several envs need"):
        load_sweep(write(tmp_path, BASE.replace("[hotpotqa]", "[hotpotqa, webshop]")))


def test_shipped_sweep_files_load_with_the_paper_grids():
    quick = load_sweep(CONFIGS / "quickstart.yaml")
    assert [p["method"] for p in grid_points(quick)] == ["sad", "token_kd", "sft"]
    assert quick.distill["workers"] == 1 and quick.online_teacher
    for env in ("alfworld", "webshop", "hotpotqa"):
        sweep = load_sweep(CONFIGS / f"paper_{env}.yaml")
        points = grid_points(sweep)
        sad = [p for p in points if p["method"] == "sad"]
        assert {(p["lambda_reason"], p["lambda_act"]) for p in sad} == {(a, b) for a in (0.5, 1, 2)
                                                                        for b in (0.5, 1, 2)}
        assert {p["prune_ratio"] for p in points} == {0.0, 0.25, 0.5} and {p["seed"] for p in points} == {0, 1, 2}
        assert {p["method"] for p in points} == {"sad", "token_kd", "sft"} and {p["env"] for p in points} == {env}
        assert sweep.distill["gpus_per_worker"] >= 1 and sweep.asha and sweep.chunks >= 2
        assert len(points) == len({json.dumps(p, sort_keys=True) for p in points})  # no trial twice
    weights = load_sweep(CONFIGS / "loss_weights.yaml")
    assert len({(p["lambda_reason"], p["lambda_act"]) for p in grid_points(weights)}) == 16


def test_student_size_names():
    assert student_size("tiny-5m") == "tiny-5m"
    assert student_size("derive:keep_every=2") == "derived-k2"
    assert student_size("derive:keep_every=3,width_factor=0.5") == "derived-k3-w0.5"
    assert student_size("/models/qwen-0.5b") == "qwen-0.5b"


def test_chunks_split_the_steps_and_follow_one_schedule():
    from raysad.distill import DistillConfig
    from raysad.train_loop import lr_at

    whole = DistillConfig(trajectories="x", student="tiny-1m", max_steps=30, lr=1e-3, warmup_steps=4,
                          min_lr_ratio=0.1, seed=3)
    parts = [chunk_config(whole, i, 3, "s", Path(f"o{i}")) for i in range(3)]
    assert [p.max_steps for p in parts] == [10, 10, 10]
    assert parts[0].seed == 3 and len({p.seed for p in parts}) == 3  # later chunks see a new data order
    assert parts[0].warmup_steps == 4 and parts[1].warmup_steps == parts[2].warmup_steps == 0
    for i, part in enumerate(parts):  # each chunk starts and ends (within one step) where the whole run would
        start = 10 * i
        assert lr_at(0, part.max_steps, part) == pytest.approx(lr_at(start, 30, whole), rel=0.05)
        assert lr_at(part.max_steps - 1, part.max_steps, part) == pytest.approx(lr_at(start + 9, 30, whole),
                                                                                rel=0.01)
    assert chunk_config(whole, 0, 1, "s", Path("o")).max_steps == 30


# ----------------------------------------------------------------------------------------- real sweeps ----
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from raysad.sft import trajectory_texts
    from raysad.trajectory_writer import TrajectoryWriter

    root = tmp_path_factory.mktemp("tune")
    trajs = expert_trajectories(8)
    models.train_tokenizer(trajectory_texts(trajs), vocab_size=400, out_dir=root / "tok")
    tokenizer = models.load_tokenizer(root / "tok")
    teacher = models.build_tiny_model("tiny-1m", tokenizer, seed=123)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    teacher.save_pretrained(root / "teacher")
    models.save_tokenizer(tokenizer, root / "teacher")
    with TrajectoryWriter(root / "topk.jsonl") as out:
        for traj in with_teacher_topk(trajs, teacher, tokenizer, k=8):
            out.write(traj)
    return root


def sweep_file(data: Path, tmp: Path, name: str, methods: list[str], **extra) -> Path:
    """A sweep of tiny-1m students on the module's trajectories and teacher; `extra` replaces any field."""
    body = {
        "name": name, "envs": ["hotpotqa"], "trajectories": str(data / "topk.jsonl"), "teacher": str(data / "teacher"),
        "space": {"student": ["tiny-1m"], "method": methods},
        "distill": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "max_length": 160, "lr": 3e-3,
                    "warmup_steps": 1, "workers": 1, "log_every": 100},
        "test_episodes": 2, "evaluate": {"max_turns": 2, "max_new_tokens": 12, "env_actors": 1, "envs_per_actor": 2},
        "cpus_per_trial": 0, "max_concurrent_trials": 1, "max_failures": 0,
        "storage": str(tmp / "runs"), "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def mlflow_runs(tmp: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def events(sweep_dir: Path) -> dict[str, list[str]]:
    return {d.name: [json.loads(line)["event"] for line in (d / "events.jsonl").read_text().splitlines()]
            for d in sorted((sweep_dir / "trials").iterdir())}


def test_a_sweep_logs_one_nested_run_per_trial_and_prints_the_report(ray_cluster, data, tmp_path):
    result = run_sweep(load_sweep(sweep_file(data, tmp_path, "fast", ["sad"], prune={"round_to": 1},
                                             space={"student": ["tiny-1m"], "method": ["sad"],
                                                    "prune_ratio": [0.25], "lambda_act": [2.0]})))
    assert [t["done"] for t in result.trials] == [True] and result.trials[0]["error"] is None
    client, runs = mlflow_runs(tmp_path, "fast")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    (sweep,), (trial,), (report,) = by_stage["tune"], by_stage["trial"], by_stage["report"]
    assert sweep.info.run_id == result.run_id and sweep.info.status == "FINISHED"
    assert trial.data.tags["mlflow.parentRunId"] == sweep.info.run_id == report.data.tags["mlflow.parentRunId"]
    assert trial.info.status == "FINISHED"
    assert {k: trial.data.params[k] for k in ("method", "student_size", "lambda_reason", "lambda_act", "prune_ratio",
                                              "divergence", "seed", "env")} == {
        "method": "sad", "student_size": "tiny-1m", "lambda_reason": "1.0", "lambda_act": "2.0",
        "prune_ratio": "0.25", "divergence": "forward_kl", "seed": "0", "env": "hotpotqa"}
    assert trial.data.params["distill.max_steps"] == "3" and trial.data.params["distill.workers"] == "1"
    assert {trial.data.tags[k] for k in ("sweep", "method", "student_size")} == {"fast", "sad", "tiny-1m"}
    metrics = trial.data.metrics
    assert 0 <= metrics["eval/success_rate"] <= 1 and metrics["eval/episodes"] == 2
    assert 0 < metrics["prune/fraction_removed"] < 0.5
    assert metrics["eval/params"] == metrics["prune/params_after"] < metrics["prune/params_before"]
    curve = client.get_metric_history(trial.info.run_id, "distill/reason_loss")
    assert sorted(m.step for m in curve) == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert {"eval.json", "trial.png", "trial.json", "config.json"} <= artifacts
    assert list(result.table["method"]) == ["sad"]  # the report ran over the sweep's trials
    assert (result.sweep_dir / "report" / "pareto.png").is_file()
    student = json.loads((Path(trial.data.tags["model_path"]) / "raysad.json").read_text())
    assert student["method"] == "sad" and student["prune_ratio"] == "0.25"


def test_a_sweep_resumes_only_with_the_settings_it_started_with(tmp_path):
    sweep = SweepConfig(name="t", envs=["hotpotqa"], space={"student": ["tiny-1m"], "method": ["sad"]},
                        distill={"max_steps": 3})
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(sweep)))
    assert check_resume(sweep, tmp_path) == []  # the same settings
    assert check_resume(dataclasses.replace(sweep, num_cpus=2, report=False), tmp_path) == []  # how it runs
    for changed, field in ((dict(distill={"max_steps": 4}), "distill"), (dict(test_episodes=5), "test_episodes"),
                           # a grid that loses a point, a random search: not a grown grid
                           (dict(space={"student": ["tiny-1m"], "method": ["sft"]}), "space"),
                           (dict(space={"student": ["tiny-1m"], "method": ["sad", "sft"]}, search="random"),
                            "search, space"),
                           (dict(space={"student": ["tiny-1m"], "method": ["sad", "sft"]}, test_episodes=5),
                            "space, test_episodes")):
        with pytest.raises(ConfigError, match=rf"changed: {field}\)"):
            check_resume(dataclasses.replace(sweep, **changed), tmp_path)
    with pytest.raises(ConfigError, match=r"lacks 1 grid point.*'method': 'sad'"):
        check_resume(dataclasses.replace(sweep, space={"student": ["tiny-1m"], "method": ["sft"]}), tmp_path)
    # a grid that only gains points: the new points, in the grid's order (another arm, another seed)
    grown = dataclasses.replace(sweep, space=[{"student": ["tiny-1m"], "method": ["sad", "sft"]},
                                              {"student": ["tiny-1m"], "method": ["sad"], "seed": [1]}])
    assert check_resume(grown, tmp_path) == [{"env": "hotpotqa", "student": "tiny-1m", "method": "sft"},
                                             {"env": "hotpotqa", "student": "tiny-1m", "method": "sad", "seed": 1}]
    assert check_resume(dataclasses.replace(sweep, test_episodes=5), tmp_path / "older") == []  # unchecked


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_and_runs_nothing_twice(ray_cluster, data, tmp_path):
    # token_kd's distillation dies once at step 2 (distill's fail_once_at_step hook, no Train retries): the first
    # invocation ends with that trial errored, the same command again resumes it from distill's checkpoint
    distill = {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "max_length": 160, "lr": 3e-3,
               "warmup_steps": 1, "workers": 1, "log_every": 100, "checkpoint_every": 1, "max_failures": 0}
    space = [{"student": ["tiny-1m"], "method": ["sad", "sft"]},
             {"student": ["tiny-1m"], "method": ["token_kd"], "fail_once_at_step": [2]}]
    path = sweep_file(data, tmp_path, "resume", [], space=space, distill=distill)
    first = run_sweep(load_sweep(path))
    assert sorted((t["config"]["method"], t["done"], t["error"] is not None) for t in first.trials) == [
        ("sad", True, False), ("sft", True, False), ("token_kd", False, True)]
    before = events(first.sweep_dir)

    second = run_sweep(load_sweep(path))  # the same command again: Tuner.restore
    assert second.run_id == first.run_id and second.sweep_dir == first.sweep_dir
    assert sorted(t["config"]["method"] for t in second.trials if t["done"]) == ["sad", "sft", "token_kd"]
    after = events(second.sweep_dir)
    assert len(after) == 3
    for name, ev in before.items():
        if ev[-1] == "done":
            assert after[name] == ev  # a finished trial did not run again
        else:
            assert after[name] == ev + ["distill", "evaluate", "done"]  # the errored one went on
    log = [json.loads(line) for line in (second.sweep_dir / "trials" / next(n for n, ev in before.items()
                                         if ev[-1] != "done") / "student" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [0, 1, 2]  # continued from its checkpoint, no step lost or doubled

    _, runs = mlflow_runs(tmp_path, "resume")
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert sorted(r.data.params["method"] for r in trials) == ["sad", "sft", "token_kd"]  # the same run reopened
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == first.run_id for r in trials)
    assert all("eval/success_rate" in r.data.metrics for r in trials)
    assert len([r for r in runs if r.data.tags.get("stage") == "tune"]) == 1

    changed = load_sweep(path, space=[{"student": ["tiny-1m"], "method": ["sft"]}])  # not what the folder holds
    with pytest.raises(ConfigError, match=r"changed: space\).*--no-resume"):
        run_sweep(changed)

    # the grid grows by a seed: only the new point runs (in an experiment of its own), under the same sweep run
    grown_path = sweep_file(data, tmp_path, "resume", [], space=space + [{"student": ["tiny-1m"], "method": ["sad"],
                                                                          "seed": [1]}], distill=distill)
    third = run_sweep(load_sweep(grown_path))
    assert third.run_id == first.run_id and third.planned == 4 and not third.interrupted
    assert sorted((t["config"]["method"], str(t["config"].get("seed", "-"))) for t in third.trials if t["done"]) == [
        ("sad", "-"), ("sad", "1"), ("sft", "-"), ("token_kd", "-")]
    grown_events = events(third.sweep_dir)
    assert {name: ev for name, ev in grown_events.items() if name in after} == after  # none of the 3 ran again
    assert [ev for name, ev in grown_events.items() if name not in after] == [["distill", "evaluate", "done"]]
    assert (third.sweep_dir / "tune-2").is_dir()
    fourth = run_sweep(load_sweep(grown_path))  # the grown sweep again: nothing to do
    assert events(fourth.sweep_dir) == grown_events and sum(t["done"] for t in fourth.trials) == 4
    _, runs = mlflow_runs(tmp_path, "resume")
    assert len([r for r in runs if r.data.tags.get("stage") == "trial"]) == 4
    assert len([r for r in runs if r.data.tags.get("stage") == "tune"]) == 1


def test_a_trial_continues_its_student_on_policy_when_the_sweep_says_so(ray_cluster, data, tmp_path):
    # two grids: one trial distils and stops there; the other takes its student as given (distill: false) and
    # trains it on-policy with the trial's own on-policy method and depth curriculum (onpolicy.<field> axes)
    onpolicy = {"iterations": 1, "episodes": 2, "max_turns": 2, "max_new_tokens": 6, "max_steps": 2,
                "batch_size": 2, "micro_batch_size": 2, "max_length": 512, "workers": 1, "env_actors": 1,
                "envs_per_actor": 2}
    space = [{"student": ["tiny-1m"], "method": ["sad"], "onpolicy": [False]},
             {"student": [str(data / "teacher")], "method": ["sad"], "distill": [False],
              "onpolicy.method": ["token_kd"], "onpolicy.depth_curriculum": ["f2b"]}]
    path = sweep_file(data, tmp_path, "onpolicy", ["sad"], onpolicy=onpolicy, space=space)
    result = run_sweep(load_sweep(path))
    assert [t["error"] for t in result.trials] == [None, None] and all(t["done"] for t in result.trials)
    client, runs = mlflow_runs(tmp_path, "onpolicy")
    trials = {r.data.params["method"]: r for r in runs if r.data.tags.get("stage") == "trial"}
    assert set(trials) == {"sad", "sad+onpolicy-token_kd-f2b"}
    on, off = trials["sad+onpolicy-token_kd-f2b"], trials["sad"]
    assert on.data.params["onpolicy.iterations"] == "1" and on.data.params["onpolicy.method"] == "token_kd"
    assert "onpolicy.iterations" not in off.data.params
    assert on.data.metrics["onpolicy/tokens_trained"] > 0 and "onpolicy/tokens_trained" not in off.data.metrics
    assert Path(on.data.tags["model_path"]).parent.name == "onpolicy"  # the on-policy student was tested
    assert "eval/success_rate" in on.data.metrics and "eval/success_rate" in off.data.metrics
    assert sorted(events(result.sweep_dir).values()) == [["distill", "evaluate", "done"],
                                                         ["distill_skipped", "onpolicy", "evaluate", "done"]]


def test_an_onpolicy_section_is_checked_like_the_others(tmp_path, data):
    with pytest.raises(ConfigError, match=r"field 'onpolicy.student': set by the sweep"):
        load_sweep(sweep_file(data, tmp_path, "bad", ["sad"], onpolicy={"student": "x"}))
    with pytest.raises(ConfigError, match=r"field 'onpolicy.workers': must be >= 1"):
        load_sweep(sweep_file(data, tmp_path, "bad", ["sad"], onpolicy={"workers": 0}))
    with pytest.raises(ConfigError, match=r"field 'space.onpolicy': not a search axis"):
        load_sweep(sweep_file(data, tmp_path, "bad", ["sad"], space={"student": ["tiny-1m"], "onpolicy": [True]}))
    with pytest.raises(ConfigError, match=r"field 'space.distill': false takes the student as given, and tiny-1m"):
        load_sweep(sweep_file(data, tmp_path, "bad", ["sad"], space={"student": ["tiny-1m"], "distill": [False]}))
    with pytest.raises(ConfigError, match=r"field 'space.onpolicy.depth_curriculum\[0\]'"):
        load_sweep(sweep_file(data, tmp_path, "bad", ["sad"], onpolicy={"iterations": 2},
                              space={"student": ["tiny-1m"], "onpolicy.depth_curriculum": ["sideways"]}))


@pytest.mark.slow
def test_chunks_report_valid_success_to_asha(ray_cluster, data, tmp_path):
    path = sweep_file(data, tmp_path, "asha", ["sad", "sft"], chunks=2, asha=True, valid_episodes=1,
                      distill={"max_steps": 4, "batch_size": 4, "micro_batch_size": 4, "max_length": 160,
                               "lr": 3e-3, "warmup_steps": 1, "workers": 1, "log_every": 100})
    result = run_sweep(load_sweep(path))
    assert all(t["error"] is None for t in result.trials) and any(t["done"] for t in result.trials)
    client, runs = mlflow_runs(tmp_path, "asha")
    for run in (r for r in runs if r.data.tags.get("stage") == "trial"):
        valid = sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid/success_rate"))
        curve = sorted(m.step for m in client.get_metric_history(run.info.run_id, "distill/act_loss"))
        finished = "eval/success_rate" in run.data.metrics
        assert valid == ([2, 4] if finished else [2])  # one valid evaluation per chunk, at its last step
        assert curve == (list(range(4)) if finished else [0, 1])  # chunks continue the step count
