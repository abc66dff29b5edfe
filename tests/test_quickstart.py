"""`raysad quickstart --small` end to end: every stage runs for real (Ray actors, Ray Train, MLflow)."""
import json

import mlflow
import pytest
from typer.testing import CliRunner

from raysad.cli import app


def check_every_stage(out, uri: str, experiment: str, distill_steps: int) -> tuple[dict, list, dict]:
    """What every quickstart leaves, whatever its teacher: a result per model on HotPotQA, students smaller than
    the teacher with their train logs, teacher rollouts with stored top-k, the plots, and one MLflow run per
    stage nested under the `quickstart` run. Returns (quickstart.json, the teacher's trajectories, runs by name)."""
    summary = json.loads((out / "quickstart.json").read_text())
    results = summary["results"]
    assert set(results) == {"teacher", "untrained", "sad", "token_kd", "sft"}
    for name, per_env in results.items():
        metrics = per_env["hotpotqa"]
        assert name == "untrained" or 0.0 <= metrics["eval/success_rate"] <= 1.0
        assert metrics["eval/params"] == summary["params"][name]
    assert all(summary["params"][m] < summary["params"]["teacher"] for m in ("sad", "token_kd", "sft"))
    assert summary["params"]["untrained"] == summary["params"]["sad"]
    # every model scored on the teacher's own test tokens, the student as cut further off than the teacher (a
    # near-uniform tiny teacher may be beaten there by a student trained on its greedy tokens: the real-weights
    # test checks the teacher against the students)
    ce = {name: per_env["hotpotqa"]["eval/reference_ce"] for name, per_env in results.items()}
    assert all(value > 0 for value in ce.values()) and ce["teacher"] < ce["untrained"]
    for method in ("sad", "token_kd", "sft"):
        assert (out / "students" / method / "config.json").exists()
        assert (out / "students" / method / "train_log.jsonl").read_text().count("\n") == distill_steps
    teacher_trajs = [json.loads(line) for line in (out / "data" / "teacher_all.jsonl").read_text().splitlines()]
    assert teacher_trajs and all(t["turns"][0]["topk_ids"] for t in teacher_trajs)
    assert all((out / "plots" / name).exists() for name in ("pareto.png", "training_curves.png"))

    mlflow.set_tracking_uri(uri)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")}
    parent = runs["quickstart"].info.run_id
    for name in ("sft-teacher", "distill-sad", "distill-token_kd", "distill-sft", "evaluate-sad-hotpotqa",
                 "evaluate-teacher-hotpotqa", "rollout-teacher-hotpotqa"):
        assert runs[name].data.tags.get("mlflow.parentRunId") == parent, name
    assert "distill/reason_loss" in runs["distill-sad"].data.metrics
    assert runs["evaluate-sad-hotpotqa"].data.metrics["eval/reference_ce"] == ce["sad"]
    assert runs["quickstart"].data.metrics["untrained_student/hotpotqa/reference_ce"] == ce["untrained"]
    assert runs["evaluate-sad-hotpotqa"].data.params["method"] == "sad"
    return summary, teacher_trajs, runs


@pytest.mark.slow  # (the same stages as the real-weights test below, which CI runs; 4 min on 2 cores)
@pytest.mark.timeout(900)
def test_small_quickstart_runs_every_stage_and_logs_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--teacher", "tiny-1m", "--small", "--out", str(out),
                                      "--tracking-uri", uri, "--experiment", "qs-test"])
    assert result.exit_code == 0, result.output
    check_every_stage(out, uri, "qs-test", distill_steps=8)  # (students derived: every 2nd layer)


@pytest.mark.timeout(900)
def test_small_quickstart_with_the_real_weights_teacher(tmp_path, monkeypatch, smollm2_dir):
    """`raysad quickstart --teacher smollm2 --small`: SmolLM2-135M-Instruct (real weights, its own tokenizer)
    fine-tuned into the teacher, students cut to 8 of its 30 layers, every stage for real on HotPotQA."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "qs"
    out.mkdir()
    (out / "smollm2-base").symlink_to(smollm2_dir)  # the session's conversion, instead of a second one
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # an earlier quickstart's teacher evaluation in the same experiment: this quickstart's report leaves it out
    client = mlflow.MlflowClient(uri)
    stale = client.create_run(client.create_experiment("qs-real"), run_name="evaluate-teacher-earlier",
                              tags={"stage": "evaluate"}).info.run_id
    for key, value in (("method", "teacher"), ("env", "hotpotqa"), ("policy", "hf")):
        client.log_param(stale, key, value)
    client.log_metric(stale, "eval/success_rate", 1.0)
    client.set_terminated(stale)
    result = CliRunner().invoke(app, ["quickstart", "--teacher", "smollm2", "--small", "--out", str(out),
                                      "--tracking-uri", uri, "--experiment", "qs-real"])
    assert result.exit_code == 0, result.output
    summary, teacher_trajs, runs = check_every_stage(out, uri, "qs-real", distill_steps=2)  # --small: 2 steps
    import csv

    with open(out / "report.csv") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    assert {m: table[m]["n"] for m in table} == {m: "1" for m in ("teacher", "sad", "token_kd", "sft")}
    assert float(table["teacher"]["eval/success_rate"]) == summary["results"]["teacher"]["hotpotqa"]["eval/success_rate"]
    assert all(set(per_env) == {"hotpotqa"} for per_env in summary["results"].values())
    assert summary["params"]["teacher"] == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M, fine-tuned
    ce = {name: per_env["hotpotqa"]["eval/reference_ce"] for name, per_env in summary["results"].items()}
    assert ce["teacher"] < min(ce[m] for m in ("sad", "token_kd", "sft"))  # on its own tokens, the teacher best
    assert all(summary["params"][m] < 0.5 * summary["params"]["teacher"] for m in ("sad", "token_kd", "sft"))
    teacher_config = json.loads((out / "teacher" / "config.json").read_text())
    assert teacher_config["num_hidden_layers"] == 30 and teacher_config["vocab_size"] == 49152
    assert json.loads((out / "student_init" / "config.json").read_text())["num_hidden_layers"] == 8
    # the teacher's own tokenizer end to end: its rollouts store top-k ids from SmolLM2's vocabulary
    assert any(i >= 4096 for t in teacher_trajs for turn in t["turns"] for i in turn["token_ids"])
    assert runs["evaluate-sad-hotpotqa"].data.params["student_size"] == "smollm2/f2-l6"
    assert runs["quickstart"].data.params["teacher"] == "smollm2"
    # --precision auto: bf16 training and engine weights where this CPU computes bf16 natively, else float32
    from raysad.models import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16()
    assert runs["sft-teacher"].data.params["precision"] == runs["distill-sad"].data.params["precision"] \
        == ("bf16" if bf16 else "fp32")
    assert (runs["rollout-teacher-hotpotqa"].data.params.get("engine_args.dtype") == "bf16") == bf16
    assert (runs["evaluate-sad-hotpotqa"].data.params.get("eval.engine_args.dtype") == "bf16") == bf16


def test_unknown_quickstart_teacher_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--teacher", "gpt5", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "'gpt5' is not one of smollm2, tiny-1m" in result.output
    assert "Traceback" not in result.output


def test_a_rerun_with_other_settings_is_refused_in_one_line(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "quickstart_settings.json").write_text(json.dumps({"teacher": "tiny-1m"}))
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out)])  # the default teacher: smollm2
    assert result.exit_code == 2, result.output
    assert "holds a quickstart run with other settings" in result.output and "'tiny-1m' -> 'smollm2'" in result.output


def test_a_rerun_that_would_switch_precision_is_refused(tmp_path):
    """--precision auto is recorded as the precision it resolved to: the same output folder continued on a
    machine that resolves it otherwise is refused, not trained on in another precision."""
    from raysad.models import cpu_has_native_bf16

    here, other = ("bf16", "fp32") if cpu_has_native_bf16() else ("fp32", "bf16")
    out = tmp_path / "q"
    out.mkdir()
    (out / "quickstart_settings.json").write_text(json.dumps({"teacher": "smollm2", "precision": other}))
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out)])  # --precision auto
    assert result.exit_code == 2, result.output
    assert f"precision: '{other}' -> '{here}'" in " ".join(result.output.split())


def test_unknown_precision_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--precision", "fp8", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "field 'precision': must be one of 'auto', 'bf16', 'fp32', got 'fp8'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "q").exists()
