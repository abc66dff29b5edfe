"""`benchmarks/reference_ce.py` on a hand-made sweep folder of two finished trials (test_distill's tiny teacher
and a second tiny model): one row each with its own model's CE, --log adds the metric to the trial runs that
lack it, once, and a run holding another value is a one-line error."""
import json
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from raysad import models
from raysad.evaluate import read_reference, reference_ce
from test_distill import data  # noqa: F401 - the fixture used here

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_ce.py"


def test_rows_and_metrics_added_once(data, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    tokenizer = models.load_tokenizer(data / "teacher")
    models.build_tiny_model("tiny-1m", tokenizer, seed=7).save_pretrained(other)
    models.save_tokenizer(tokenizer, other)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    for trial_id, model, method in (("t0", data / "teacher", "sad"), ("t1", other, "sft")):
        folder = tmp_path / "sweep" / "trials" / trial_id
        folder.mkdir(parents=True)
        (folder / "trial.json").write_text(json.dumps({"trial_id": trial_id, "model": str(model),
                                                       "student": {"method": method, "seed": 0}}))
        (folder / "mlflow_run_id").write_text(client.create_run(experiment).info.run_id)
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "sweep"), "--reference", str(data / "topk.jsonl"),
           "--episodes", "8", "--tracking-uri", uri, "--threads", "1"]

    def run(*extra):
        done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)
        rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["t0"], ["t1"])}
        return done, rows

    done, rows = run("--log")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(rows) == ["t0", "t1"] and rows["t0"][1] == "sad" and rows["t1"][4] == "added"
    ce = {t: float(row[3]) for t, row in rows.items()}
    reference = read_reference(data / "topk.jsonl", "hotpotqa", 8)
    assert ce == {t: round(reference_ce(m, reference), 3) for t, m in (("t0", data / "teacher"), ("t1", other))}
    assert ce["t0"] != ce["t1"]
    runs = {json.loads((tmp_path / "sweep" / "trials" / t / "trial.json").read_text())["trial_id"]:
            client.get_run((tmp_path / "sweep" / "trials" / t / "mlflow_run_id").read_text()) for t in ("t0", "t1")}
    for t, r in runs.items():
        assert abs(r.data.metrics["eval/reference_ce"] - ce[t]) < 1e-3 and "reference_ce_added_later" in r.data.tags

    done, rows = run("--log")  # again: found, not logged twice
    assert done.returncode == 0 and [row[4] for row in rows.values()] == ["yes", "yes"]
    assert len(client.get_metric_history(runs["t0"].info.run_id, "eval/reference_ce")) == 1

    mlflow.set_tracking_uri(uri)
    client.log_metric(runs["t1"].info.run_id, "eval/reference_ce", ce["t1"] + 1.0)
    done, _ = run("--log")
    assert done.returncode == 1 and "t1: its run holds eval/reference_ce" in done.stderr
    assert "Traceback" not in done.stderr
