"""`benchmarks/distill_step.py` at tiny settings: the variants train the same batches and the table says so."""
import json
import subprocess
import sys
from pathlib import Path

from test_distill import data, one_thread  # noqa: F401 - the fixtures used here

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_step.py"


def test_micro_batch_variants_train_the_same_batches(data, tmp_path):
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, str(SCRIPT), "--student", str(data / "teacher"),
                          "--trajectories", str(data / "topk.jsonl"), "--variants", "micro_batch_size=8",
                          "micro_batch_size=1", "--max-length", "160", "--steps", "2", "--warmup", "0",
                          "--repeats", "1", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    table = out.with_suffix(".md").read_text()
    assert "| micro_batch_size=8 |" in table and "| micro_batch_size=1 |" in table
    assert "same real tokens per step in every run: True" in table
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    whole, single = runs["micro_batch_size=8"][0], runs["micro_batch_size=1"][0]
    assert min(whole["pad_frac"]) > 0 and max(single["pad_frac"]) == 0.0
    assert all(s > 0 for s in whole["step_s"] + single["step_s"])
    assert abs(whole["loss"][-1] - single["loss"][-1]) < 1e-4 * abs(whole["loss"][-1])
    bad = subprocess.run([sys.executable, str(SCRIPT), "--student", "x", "--trajectories", "y",
                          "--variants", "micro_batch=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "DistillConfig has no field 'micro_batch'" in bad.stderr
