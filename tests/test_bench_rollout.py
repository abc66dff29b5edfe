"""`benchmarks/rollout_throughput.py` at tiny settings, run as a reader runs it (a subprocess): the three sides play
the same episodes (steps, tokens, actions) and the one table has them all; `--nodes 2` (slow) plays on a local
two-node Ray cluster, one engine per node, each env actor asking the engine on its own node."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_throughput.py"
SIDES = ("ray-pool", "in-process-batched", "one-at-a-time")
TINY = ("--envs", "4", "--env-actors", "2", "--tasks", "4", "--max-turns", "2", "--max-new-tokens", "4",
        "--repeats", "1")


def run(tmp_path: Path, *flags: str, timeout: float) -> tuple[str, list[list[str]], dict]:
    """(stdout, the table's rows without the header, the JSON report)."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, *flags, "--out", str(out)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = out.with_suffix(".md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ")]
    return done.stdout, rows[1:], json.loads(out.with_suffix(".json").read_text())


@pytest.mark.timeout(120)
def test_three_sides_play_the_same_episodes(tmp_path):
    stdout, rows, data = run(tmp_path, timeout=110)
    assert stdout.count("| side |") == 1  # one table
    assert [row[0] for row in rows] == list(SIDES)
    first = {side: data["runs"][side][0] for side in SIDES}  # one repeat each
    assert all(len(data["runs"][side]) == 1 for side in SIDES)
    for r in first.values():
        assert r["steps"] == 4 * 2  # greedy random teacher: every episode runs to --max-turns
        assert r["tokens"] == first["ray-pool"]["tokens"] > 0 and r["seconds"] > 0
        assert r["episodes"] == first["ray-pool"]["episodes"]  # the same actions, episode by episode
        assert r["engine"]["rows"] == 2 * r["steps"]  # a thought and an action prompt per step
    assert first["one-at-a-time"]["engine"]["batches"] == 2 * 8  # one prompt per call
    assert "ray-pool / in-process-batched: ×" in stdout and "same actions in 4/4" in stdout
    assert "CPUs" in stdout and "Timed window" in stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_each_with_its_engine(tmp_path):
    stdout, rows, data = run(tmp_path, "--nodes", "2", timeout=290)
    assert [row[0] for row in rows] == ["1 node", "2 nodes"]
    one, two = data["runs"]["1 node"][0], data["runs"]["2 nodes"][0]
    assert two["steps"] == 2 * one["steps"] == 2 * 8  # weak scaling: each node plays --tasks episodes
    assert (one["engine_nodes"], one["actor_nodes"]) == (1, 1)
    assert (two["engine_nodes"], two["actor_nodes"], two["engine_count"]) == (2, 2, 2)
    assert two["actors_with_local_engine"] == two["env_actors"] == 4  # every env actor asks its own node's engine
    assert "scaling 1 node -> 2 nodes: ×" in stdout
