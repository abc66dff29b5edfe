"""`raysad quickstart --small` end to end: every stage runs for real (Ray actors, Ray Train, MLflow)."""
import json

import mlflow
import pytest
from typer.testing import CliRunner

from raysad.cli import app


@pytest.mark.timeout(900)
def test_small_quickstart_runs_every_stage_and_logs_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--small", "--out", str(out), "--tracking-uri", uri,
                                      "--experiment", "qs-test"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["results"]) == {"teacher", "sad", "token_kd", "sft"}
    for name, per_env in summary["results"].items():
        metrics = per_env["hotpotqa"]
        assert 0.0 <= metrics["eval/success_rate"] <= 1.0
        assert metrics["eval/params"] == summary["params"][name]
    # the students are smaller than the teacher (derived: every 2nd layer)
    assert all(summary["params"][m] < summary["params"]["teacher"] for m in ("sad", "token_kd", "sft"))
    for method in ("sad", "token_kd", "sft"):
        assert (out / "students" / method / "config.json").exists()
        assert (out / "students" / method / "train_log.jsonl").read_text().count("\n") == 8
    teacher_trajs = [json.loads(line) for line in (out / "data" / "teacher_all.jsonl").read_text().splitlines()]
    assert teacher_trajs and all(t["turns"][0]["topk_ids"] for t in teacher_trajs)
    assert all((out / "plots" / name).exists() for name in ("pareto.png", "training_curves.png"))

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["qs-test"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["quickstart"].info.run_id
    for name in ("sft-teacher", "distill-sad", "distill-token_kd", "distill-sft", "evaluate-sad-hotpotqa",
                 "evaluate-teacher-hotpotqa", "rollout-teacher-hotpotqa"):
        assert by_name[name].data.tags.get("mlflow.parentRunId") == parent, name
    assert "distill/reason_loss" in by_name["distill-sad"].data.metrics
    assert by_name["evaluate-sad-hotpotqa"].data.params["method"] == "sad"
