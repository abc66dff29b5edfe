"""`benchmarks/student_recovery.py` at tiny settings: a student cut from test_distill's tiny teacher trains on its
expert trajectories, one block of rows per (cut, loss), and training on the thought + action tokens lowers the
held-out CE of those tokens."""
import subprocess
import sys
from pathlib import Path

from test_distill import data  # noqa: F401 - the fixture used here

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "student_recovery.py"


def test_rows_per_cut_and_loss_and_the_cut_student_learns(data):  # noqa: F811
    run = subprocess.run([sys.executable, str(SCRIPT), "--teacher", str(data / "teacher"),
                          "--trajectories", str(data / "topk.jsonl"), "--cuts", "derive:keep_every=2",
                          "--losses", "generated", "context", "--lrs", "1e-2", "--steps", "6", "--eval-every", "3",
                          "--batch-size", "4", "--held-out", "2", "--max-length", "160", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("keep_every=2 ")]
    ce = {(loss, int(step)): float(value) for _, loss, _, step, _, value in rows}
    assert sorted(ce) == [(loss, step) for loss in ("context", "generated") for step in (0, 3, 6)]
    assert ce[("generated", 0)] == ce[("context", 0)]  # the same cut student before training
    assert ce[("generated", 6)] < ce[("generated", 0)]
