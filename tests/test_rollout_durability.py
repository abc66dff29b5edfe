"""Rollout output and its done-tracking survive a SIGKILL at any point; errored episodes are retried; a rerun with
other settings is refused."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle

from raysad.rollout import RolloutConfig, done_path, finished_task_ids, run_rollout, settings_path
from raysad.trajectory_files import parts_dir
from raysad.trajectory_reader import count_trajectories, read_task_ids, read_task_status, read_trajectories
from raysad.trajectory_writer import TrajectoryWriter
from raysad_envs.core import InvalidAction, TextEnv

cloudpickle.register_pickle_by_value(sys.modules[__name__])

RAYSAD = str(Path(sys.executable).parent / "raysad")


# --- a real `raysad rollout` killed with SIGKILL -------------------------------------------------------------

SLOW_STEPS = """
import os
if os.environ.get("RAYSAD_TEST_STEP_DELAY"):  # test only: slow every env step so a kill lands mid-run
    import time
    import raysad_envs.core as _core
    _step = _core.TextEnv.step
    def _slow_step(self, action, _delay=float(os.environ["RAYSAD_TEST_STEP_DELAY"])):
        time.sleep(_delay)
        return _step(self, action)
    _core.TextEnv.step = _slow_step
"""


def _cli(tmp_path: Path, out: Path, episodes: int) -> subprocess.Popen:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_STEPS)
    (tmp_path / "ray.yaml").write_text("num_cpus: 2\n")
    env = dict(os.environ, RAYSAD_TEST_STEP_DELAY="0.04", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("RAY_ADDRESS", None)
    cmd = [RAYSAD, "rollout", "--policy", "expert", "--env", "webshop", "--episodes", str(episodes),
           "--env-actors", "1", "--envs-per-actor", "2", "--out", str(out), "--config", str(tmp_path / "ray.yaml")]
    log = open(tmp_path / f"rollout-{time.monotonic_ns()}.log", "w+b")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


def _durable_ids(out: Path) -> set[str]:
    """What a rerun would count as done: the task ids in the output and in its done file."""
    try:
        listed = set(done_path(out).read_text().split()) if done_path(out).exists() else set()
        return read_task_ids(out) | listed
    except Exception:  # noqa: BLE001 -- a file being renamed while we look: look again
        return set()


def _end(proc: subprocess.Popen) -> str:
    """SIGKILL whatever is left of the process group the test started (the local Ray it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sigkilled_cli_rollout_reruns_to_each_task_exactly_once(tmp_path, suffix):
    out, n = tmp_path / f"trajs{suffix}", 40
    proc = _cli(tmp_path, out, n)
    try:
        deadline = time.monotonic() + 240
        while len(_durable_ids(out)) < 3:  # some episodes count as done: kill the driver, no chance to clean up
            assert proc.poll() is None, f"rollout ended before the kill:\n{_end(proc)}"
            assert time.monotonic() < deadline, "no episode written in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _end(proc)
    before = _durable_ids(out)
    assert 3 <= len(before) < n, f"the kill did not land mid-run ({len(before)} of {n} written)"
    if suffix == ".parquet":  # the killed writer left complete parts, read as one output
        assert parts_dir(out).is_dir() and count_trajectories(out) == len(before)
        assert {t.task_id for t in read_trajectories(out)} == before

    rerun = _cli(tmp_path, out, n)
    try:
        rerun.wait(timeout=300)
    finally:
        log = _end(rerun)
    assert rerun.returncode == 0, log
    counts = Counter(t.task_id for t in read_trajectories(out))
    assert len(counts) == n and set(counts.values()) == {1}, counts
    assert set(counts) >= before
    assert all(t.success and "error" not in t.extra for t in read_trajectories(out))
    if suffix == ".parquet":
        assert not parts_dir(out).exists() and pq.ParquetFile(out).metadata.num_rows == n


# --- the Parquet writer, killed ------------------------------------------------------------------------------

def _traj(i: int, error: str | None = None) -> dict:
    d = {"id": f"traj-{i}", "env": "webshop", "task_id": f"task-{i}", "split": "train", "instruction": "buy",
         "prompt": "p", "turns": [{"thought": "t", "action": "a", "observation": "o"}], "reward": 1.0,
         "success": error is None, "policy": {"backend": "expert", "model": "expert"}}
    return d | ({"error": error} if error else {})


def test_killed_parquet_writer_keeps_its_flushed_parts_and_a_rerun_merges_them(tmp_path):
    path = tmp_path / "t.parquet"
    code = textwrap.dedent(f"""
        import json, os, signal
        from raysad.trajectory_writer import TrajectoryWriter
        template = json.loads({json.dumps(json.dumps(_traj(0)))})
        w = TrajectoryWriter({str(path)!r}, part_rows=2, part_s=3600)
        for i in range(5):
            w.write(template | {{"id": f"traj-{{i}}", "task_id": f"task-{{i}}"}})
        assert w.durable == 4, w.durable
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert read_task_ids(path) == {f"task-{i}" for i in range(4)}  # the buffered 5th row was never durable
    assert [t.id for t in read_trajectories(path)] == [f"traj-{i}" for i in range(4)]
    (parts_dir(path) / "part-x.parquet.tmp").write_bytes(b"PAR1 cut short")  # a part write killed midway
    with TrajectoryWriter(path, append=True) as w:
        w.write(_traj(4))
    assert [t.id for t in read_trajectories(path)] == [f"traj-{i}" for i in range(5)]
    assert not parts_dir(path).exists()
    # a merge killed after replacing the file but before deleting its parts: the parts are not read twice
    meta = pq.read_schema(path).metadata
    assert meta is not None
    parts_dir(path).mkdir()
    with TrajectoryWriter(tmp_path / "other.parquet", part_rows=1) as w:
        w.write(_traj(9))
    names = json.loads(meta[b"raysad.merged_parts"])
    assert names, "the merged file names its parts"
    (parts_dir(path) / names[0]).write_bytes((tmp_path / "other.parquet").read_bytes())
    assert count_trajectories(path) == 5 and read_task_ids(path) == {f"task-{i}" for i in range(5)}
    with TrajectoryWriter(path, append=True) as w:
        pass
    assert [t.id for t in read_trajectories(path)] == [f"traj-{i}" for i in range(5)]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_writer_drops_the_records_a_rerun_replaces(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    with TrajectoryWriter(path) as w:
        for i in range(4):
            w.write(_traj(i, error="generate: context too long" if i in (1, 2) else None))
    assert read_task_status(path) == ({"task-0", "task-3"}, {"task-1", "task-2"})
    with TrajectoryWriter(path, append=True, drop_task_ids={"task-1"}) as w:
        w.write(_traj(1))
    assert Counter(t.task_id for t in read_trajectories(path)) == Counter(f"task-{i}" for i in range(4))
    assert read_task_status(path) == ({"task-0", "task-1", "task-3"}, {"task-2"})


# --- in-process rollouts: errored episodes, settings ---------------------------------------------------------

class FlakyEnv(TextEnv):
    """Count to `target` (2) with `inc`. While `broken` (a file) exists, task t01 raises in step: an errored episode."""

    env_name = "flaky"
    agent_format = "webshop"
    default_max_steps = 5

    def __init__(self, split="train", broken=None, target=2, **kwargs):
        super().__init__(split=split, **kwargs)
        self.broken, self.target = broken, target

    def task_ids(self):
        return [f"t{i:02d}" for i in range(6)]

    def _load_task(self, task_id):
        self.count = 0
        return "Count to 2.", {"instruction": "count to 2"}

    def _apply(self, action):
        if self.task_id == "t01" and self.broken and os.path.exists(self.broken):
            raise RuntimeError("context too long")
        if action != "inc":
            raise InvalidAction(action)
        self.count += 1
        self._success = self.count == self.target
        return f"count is {self.count}", float(self._success), self._success, {}

    def expert_turn(self):
        return "count", "inc"

    def prompt(self, observation, few_shot=0):
        return f"Say inc.\n{observation}\n"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _config(out, **kw) -> RolloutConfig:
    return RolloutConfig(**({"env": "flaky", "policy": "expert", "env_actors": 1, "envs_per_actor": 2,
                             "out": str(out)} | kw))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_errored_episode_is_retried_by_a_rerun_and_replaced(tmp_path, suffix, ray_local):
    out, broken = tmp_path / f"t{suffix}", tmp_path / "broken"
    broken.write_text("")
    env = functools.partial(FlakyEnv, broken=str(broken))
    first = run_rollout(_config(out), env_factory=env, progress=False, track=False)
    assert first.episodes == 6 and first.errors == 1
    assert "t01" not in finished_task_ids(out)
    # an older version listed errored episodes in the done file: that must not make them done
    done_path(out).write_text("t01\n")
    assert "t01" not in finished_task_ids(out)
    broken.unlink()  # the cause is fixed: the rerun plays t01 (only) and its record replaces the errored one
    second = run_rollout(_config(out), env_factory=env, progress=False, track=False)
    assert second.episodes == 1 and second.skipped == 5 and second.errors == 0
    trajs = list(read_trajectories(out))
    assert Counter(t.task_id for t in trajs) == Counter(f"t{i:02d}" for i in range(6))
    assert all(t.success and "error" not in t.extra for t in trajs)
    third = run_rollout(_config(out), env_factory=env, progress=False, track=False)
    assert third.episodes == 0 and third.skipped == 6


def test_only_success_remembers_failures_but_not_errors(tmp_path, ray_local):
    out, broken = tmp_path / "t.jsonl", tmp_path / "broken"
    broken.write_text("")
    env = functools.partial(FlakyEnv, broken=str(broken), target=9)  # past the step limit: all fail, t01 errs
    cfg = _config(out, only_success=True)
    first = run_rollout(cfg, env_factory=env, progress=False, track=False)
    assert first.episodes == 6 and first.written == 0 and first.errors == 1
    assert finished_task_ids(out) == {"t00", "t02", "t03", "t04", "t05"}
    assert run_rollout(cfg, env_factory=env, progress=False, track=False).episodes == 1  # t01 again


def test_rerun_with_other_settings_is_refused(tmp_path, ray_local):
    out = tmp_path / "t.jsonl"
    run_rollout(_config(out, episodes=3), env_factory=FlakyEnv, progress=False, track=False)
    assert json.loads(settings_path(out).read_text())["few_shot"] == 0
    with pytest.raises(ValueError, match=r"other settings \(few_shot: 0 -> 2, seed: 0 -> 7\).*fresh --out") as err:
        run_rollout(_config(out, few_shot=2, seed=7), env_factory=FlakyEnv, progress=False, track=False)
    assert "\n" not in str(err.value)
    assert count_trajectories(out) == 3  # untouched
    # more episodes with the same settings resume; a fresh --out takes the new settings
    assert run_rollout(_config(out, episodes=6), env_factory=FlakyEnv, progress=False, track=False).episodes == 3
    fresh = run_rollout(_config(tmp_path / "new.jsonl", few_shot=2, seed=7), env_factory=FlakyEnv, progress=False,
                        track=False)
    assert fresh.episodes == 6


def test_cli_refuses_other_settings_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "t.jsonl"
    with TrajectoryWriter(out) as w:
        w.write(_traj(0))
    settings_path(out).write_text(json.dumps({"env": "webshop", "policy": "expert", "few_shot": 6}))
    from typer.testing import CliRunner

    from raysad.cli import app

    result = CliRunner().invoke(app, ["rollout", "--policy", "expert", "--env", "webshop", "--few-shot", "2",
                                      "--out", str(out)])
    assert result.exit_code == 2
    assert "other settings (few_shot: 6 -> 2)" in result.output


def test_a_guided_output_resumes_only_with_the_same_guide_turns(tmp_path):
    # on-policy curricula change who plays which turn: an iteration's output played with other guide settings is
    # not continued (its episodes would mix two shares of teacher turns)
    from raysad.configs import RolloutConfig
    from raysad.rollout import check_settings

    out = tmp_path / "t.jsonl"

    def cfg(**kw):
        return RolloutConfig(env="hotpotqa", policy="hf", model="student", guide="teacher", out=str(out), **kw)

    check_settings(cfg(guide_turns=3))
    out.write_text("")  # the output exists from here on
    check_settings(cfg(guide_turns=3))
    with pytest.raises(ValueError, match=r"other settings \(guide_turns: 3 -> 2\)"):
        check_settings(cfg(guide_turns=2))
