"""`benchmarks/fault_injection.py`: its scenarios run the real CLI, kill it mid-run, rerun it, and check that
nothing was lost, doubled or changed and that the exit codes were truthful. One rollout scenario runs in the
default suite; the distill and tune ones (a minute or more each) are slow tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_injection.py"


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "faults"), *args],
                          capture_output=True, text=True, timeout=1200)


def rows(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "faults" / "fault_injection.json").read_text())


def test_lists_its_scenarios_and_refuses_unknown_ones(tmp_path):
    listed = run_script(tmp_path, "--list")
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"rollout-parquet-driver-sigkill", "rollout-engine-actor-sigkill", "distill-worker-sigkill",
            "tune-driver-sigint"} <= set(names)
    bad = run_script(tmp_path, "--scenarios", "rollout-jsonl-driver-sigkill,nonsense")
    assert bad.returncode == 2 and "unknown scenario(s) nonsense" in bad.stderr


@pytest.mark.slow  # the default suite has the same kill in test_rollout_durability (both formats)
def test_a_parquet_rollout_killed_with_sigkill_loses_and_doubles_nothing(tmp_path):
    done = run_script(tmp_path, "--scenarios", "rollout-parquet-driver-sigkill", "--episodes", "12")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = rows(tmp_path)
    assert row["fault_landed"] and row["fault_exit"] == "killed" and row["rerun_exit"] == "0"
    assert (row["expected"], row["written"], row["duplicated"], row["lost"]) == (12, 12, 0, 0)
    assert row["same_as_reference"] and row["ok"]
    assert "| rollout-parquet-driver-sigkill | killed | 0 | episodes | 12 | 12 | 0 | 0 | yes |" in done.stdout


@pytest.mark.slow
def test_distill_and_tune_survive_every_kill(tmp_path):
    names = ["distill-driver-sigkill", "distill-driver-sigint", "distill-worker-sigkill", "tune-driver-sigkill",
             "tune-driver-sigint", "rollout-engine-actor-sigkill"]
    done = run_script(tmp_path, "--scenarios", ",".join(names))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["scenario"] for r in rows(tmp_path) if r["ok"]] == names
