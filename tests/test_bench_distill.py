"""`benchmarks/distill_throughput.py` at tiny settings: every side runs the same batches, the table has them all.

The sides train the same student on the same batches with the same optimiser, so their final losses agree (TRL's
loss as shipped, in a bare loop and at target positions only, and raysad's chunked loss: the same forward KL)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is the optional extra [bench]: pip install -e '.[bench]'")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_throughput.py"
SIDES = ("raysad", "trl-trainer", "trl-loss", "trl-loss-targets")


def test_every_side_runs_the_same_work(tmp_path):
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "work"), "--steps", "2",
                          "--warmup", "1", "--batch-size", "2", "--repeats", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    table = out.with_suffix(".md").read_text()
    for side in SIDES:
        assert f"| {side} |" in table
    assert "| NO |" not in table  # every side trained on the batches raysad's order gives
    figures = json.loads(out.with_suffix(".json").read_text())
    runs = [figures[f"768/{side}"][0] for side in SIDES]  # one repeat each
    assert all(r["tokens"] > 0 and r["seconds"] > 0 and r["peak_rss_mb"] > r["rss_after_imports_mb"] for r in runs)
    losses = [r["final_loss"] for r in runs]
    assert max(losses) - min(losses) < 1e-3 * max(abs(x) for x in losses), losses
