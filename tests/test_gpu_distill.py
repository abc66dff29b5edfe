"""`benchmarks/gpu_distill.py` is run blind on a lent GPU (one short try), so its CPU smoke run is kept working
here: both variants train, and the chunked loss equals the plain one."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_distill.py"


def test_cpu_smoke_run_trains_both_variants_to_the_same_loss(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--seq", "64",
                           "--warmup", "1", "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"chunked", "plain"}
    for r in results.values():
        assert r["params"] > 0 and r["tokens_per_s"] > 0 and r["device"] == "cpu"
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CUDA-only figures are not made up on a CPU
    # same weights, same batch, same optimiser steps: the two ways of computing the loss agree
    assert abs(results["chunked"]["loss"] - results["plain"]["loss"]) <= 1e-3 * abs(results["plain"]["loss"])
    assert "chunked" in done.stdout and "plain" in done.stdout
