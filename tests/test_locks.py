"""One writer per output: the lock files of rollout and distill, and the lock around MLflow's sqlite set-up.

Real processes throughout: a rollout CLI refused while another process holds its output's lock, a lock left
by a killed holder taken over, four processes creating MLflow runs in one fresh sqlite file at once."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raysad.locks import LockHeld, lock_path, output_lock

RAYSAD = str(Path(sys.executable).with_name("raysad"))


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_DEDUP_LOGS": "0"}


def _holding_process(path: Path, tmp_path: Path) -> subprocess.Popen:
    """A python process that takes the lock `path` and sleeps; returns once it holds it."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    code = textwrap.dedent(f"""
        import pathlib, time
        from raysad.locks import output_lock
        with output_lock({str(path)!r}, "the test output"):
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
        time.sleep(0.05)
    return proc


def test_second_rollout_on_one_out_fails_at_once_naming_the_lock_and_holder(tmp_path):
    out = tmp_path / "runs" / "w.jsonl"
    args = [RAYSAD, "rollout", "--policy", "expert", "--env", "webshop", "--split", "test", "--episodes", "3",
            "--env-actors", "1", "--out", str(out)]
    holder = _holding_process(lock_path(out), tmp_path)
    try:
        second = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                                timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    [error] = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert str(lock_path(out)) in error and f"pid {holder.pid} on host {socket.gethostname()}" in error
    assert "Traceback" not in second.stderr and not out.exists()  # refused before writing anything

    # the holder was killed (SIGKILL: no clean-up): its lock file is stale, the next rollout takes it over
    assert lock_path(out).exists()
    first = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stale lock" in first.stderr and str(holder.pid) in first.stderr
    ids = [json.loads(line)["task_id"] for line in out.read_text().splitlines() if line.strip()]
    assert len(ids) == 3 and len(set(ids)) == 3  # each task once
    assert not lock_path(out).exists()  # released on exit


def test_a_lock_held_by_another_process_refuses_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    path = tmp_path / "out.jsonl.lock"
    holder = _holding_process(path, tmp_path)
    try:
        with pytest.raises(LockHeld) as err:
            output_lock(path, "rollout --out out.jsonl").acquire()
        message = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in message
        assert str(path) in message and f"pid {holder.pid}" in message and "rollout --out out.jsonl" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="raysad.locks"), output_lock(path) as lock:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert lock.path == path
    assert "stale lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert not path.exists()


def test_a_stale_lock_naming_a_dead_pid_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: this pid no longer exists
    path = tmp_path / "student.lock"
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z",
                                "command": "raysad distill --out student"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="raysad.locks"), output_lock(path, "distill --out student"):
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(LockHeld):  # held now, also against this process's own second writer
            output_lock(path).acquire()
    assert f"pid {dead.pid}" in caplog.text and "(pid dead)" in caplog.text
    assert not path.exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_after_an_exception(tmp_path, error):
    path = tmp_path / "x.lock"
    with pytest.raises(error), output_lock(path):
        assert path.exists()
        raise error("boom")
    assert not path.exists()
    with output_lock(path):  # free again
        pass


def test_rollout_holds_its_lock_while_it_runs_and_releases_it_on_error(tmp_path, monkeypatch):
    from raysad import rollout

    out = tmp_path / "w.jsonl"
    seen = []

    def failing_run(cfg, *args):
        with pytest.raises(LockHeld) as err:  # a second writer is refused while this one runs
            output_lock(lock_path(cfg.out)).acquire()
        seen.append(str(err.value))
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout, "_run", failing_run)
    with pytest.raises(KeyboardInterrupt):
        rollout.run_rollout(rollout.RolloutConfig(env="webshop", out=str(out)), track=False)
    assert seen and str(lock_path(out)) in seen[0] and f"pid {os.getpid()}" in seen[0]
    assert not lock_path(out).exists()


def test_distill_holds_its_lock_from_before_prepare_and_releases_it_on_error(tmp_path, monkeypatch):
    from raysad import distill

    out = tmp_path / "student"
    seen = []

    def failing_prepare(config):
        with pytest.raises(LockHeld) as err:
            output_lock(lock_path(config.out), "distill --out student").acquire()
        seen.append(str(err.value))
        assert json.loads(lock_path(config.out).read_text())["pid"] == os.getpid()
        raise ValueError("bad data")

    monkeypatch.setattr(distill, "prepare", failing_prepare)
    with pytest.raises(ValueError, match="bad data"):
        distill.run_distill(distill.DistillConfig(trajectories=str(tmp_path / "t.jsonl"), student="tiny-5m",
                                                  out=str(out)), track=False)
    assert seen and str(tmp_path / "student.lock") in seen[0] and f"pid {os.getpid()}" in seen[0]
    assert not lock_path(out).exists()


def test_the_lock_file_names_the_command_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/raysad", "rollout", "--api-key", "sk-live-1", "--hf-token=abc123",
                                      "--tokenizer", "tok", "--max-new-tokens", "64", "--out", "o.jsonl"])
    with output_lock(tmp_path / "o.lock"):
        command = json.loads((tmp_path / "o.lock").read_text())["command"]
    assert command.startswith("raysad rollout") and "o.jsonl" in command and "--tokenizer tok" in command
    assert "--max-new-tokens 64" in command and "--api-key '***'" in command
    assert "sk-live-1" not in command and "abc123" not in command


def test_processes_creating_mlflow_runs_in_one_fresh_sqlite_db_together_all_succeed(tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    db.parent.mkdir()
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, pathlib, sys, time
        import mlflow, sqlalchemy  # the slow imports happen before the start line
        from raysad import tracking
        pathlib.Path({str(tmp_path)!r}, "ready-" + sys.argv[1]).touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.002)
        with tracking.start_run("race", "run-" + sys.argv[1], {{"i": sys.argv[1]}}, uri={f"sqlite:///{db}"!r}):
            tracking.log_metrics({{"x": 1.0}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=tmp_path, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready-{i}").exists() for i in range(4)):  # all four imported and waiting
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "a process did not start"
        time.sleep(0.05)
    go.touch()  # each polls it every 2 ms: they start together
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["race"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == [f"run-{i}" for i in range(4)]
