"""Smoke runs of benchmarks/loss_memory.py and benchmarks/prefix_cache.py at toy sizes (each in a subprocess,
as a reader would run them): every variant / side is in the one table, losses and gradients agree, the cache
writes the same actions; and the verbatim copy of TRL's loss computes what the installed trl does."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *flags: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *flags], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def table_rows(stdout: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


@pytest.mark.timeout(120)
def test_loss_memory_quick_run_has_every_variant_and_they_agree(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import loss_memory
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = run("loss_memory.py", "--quick", "--seq", "64", "--vocab", "512", "--hidden", "16",
              "--out", str(tmp_path / "lm"))
    rows = table_rows(out)
    assert out.count("| variant |") == 1  # one table
    assert {row[0] for row in rows} == set(loss_memory.VARIANTS)
    for row in rows:
        assert row[-1] == "reference" or row[-1].startswith("ok ("), row
        assert float(row[3].replace(",", "")) > 0  # a peak was measured
    assert "TRL's loss: " in out and "CPUs" in out  # where TRL's formula came from; the machine
    data = json.loads((tmp_path / "lm.json").read_text())
    assert all(a["ok"] for a in data["agreement"].values()) and len(data["agreement"]) == len(loss_memory.VARIANTS)
    for results in data["runs"].values():
        (result,) = results
        assert not result["peak_hidden_by_setup"] and result["threads"] == 1
        assert result["warmup"]["seconds"] > 0 and result["targets"] == 32  # 50% of 64, in spans of 32
    assert (tmp_path / "lm.md").read_text().count("| variant |") == 1


def test_trl_loss_copy_is_what_trl_computes():
    pytest.importorskip("trl")
    import torch

    spec = importlib.util.spec_from_file_location("loss_memory_copy", BENCHMARKS / "loss_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    installed, source = module.trl_loss_function(prefer_installed=True)
    if "installed" not in source:
        pytest.skip(f"trl has no GKDTrainer.generalized_jsd_loss here ({source})")
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 12, 50, generator=generator), torch.randn(2, 12, 50, generator=generator)
    labels = torch.where(torch.rand(2, 12, generator=generator) < 0.5, 1, -100)
    for beta in (0.0, 0.5, 1.0):
        for temperature in (1.0, 2.0):
            kw = dict(labels=labels, beta=beta, temperature=temperature)
            torch.testing.assert_close(module._trl_generalized_jsd_loss(student, teacher, **kw),
                                       installed(student, teacher, **kw), rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_prefix_cache_tiny_run_has_both_sides_and_the_same_actions(tmp_path):
    out = run("prefix_cache.py", "--env", "alfworld", "--size", "tiny-1m", "--episodes", "2", "--max-steps", "2",
              "--max-new-tokens", "8", "--repeats", "1", "--out", str(tmp_path / "pc"))
    rows = table_rows(out)
    assert out.count("| prefix cache |") == 1
    assert [row[0] for row in rows] == ["off", "on"]
    for row in rows:
        assert row[1] == "4" and row[8] == "2/2 (every run)", row  # 2 episodes x 2 steps; the cache is exact
    assert rows[0][6] == "0%" and rows[1][6] != "0%"  # the cache served prompt tokens
    assert "speed-up (on / off, medians): ×" in out and "load average" in out
    data = json.loads((tmp_path / "pc.json").read_text())
    assert data["same_actions"] == {"off": 2, "on": 2}
    assert [len(data["runs"][side]) for side in ("off", "on")] == [1, 1]
    for side in ("off", "on"):
        assert data["runs"][side][0]["warmup_steps"] == 2 and data["runs"][side][0]["threads"] == 1


@pytest.mark.timeout(120)
def test_prefix_cache_compares_dropping_finished_rows(tmp_path):
    out = run("prefix_cache.py", "--compare", "finished_rows", "--env", "hotpotqa", "--size", "tiny-1m",
              "--episodes", "4", "--max-steps", "2", "--max-new-tokens", "8", "--repeats", "1")
    rows = table_rows(out)
    assert out.count("| dropping finished rows |") == 1 and [row[0] for row in rows] == ["off", "on"]
    assert rows[0][6] != "0%" and rows[1][6] != "0%"  # the prefix cache is on for both sides
    assert int(rows[1][7]) <= int(rows[0][7])  # rows decoded
    assert rows[0][8] == rows[1][8] == "4/4 (every run)"
