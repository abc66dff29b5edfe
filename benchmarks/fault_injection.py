"""Fault injection: kill what runs `raysad rollout`, `raysad distill` and `raysad tune` mid-run, rerun the same
command as a user would, and check that nothing was lost, doubled or changed, and that every exit code told the
truth.

    python benchmarks/fault_injection.py                          # every scenario, tiny models, ~10 min on 2 cores
    python benchmarks/fault_injection.py --scenarios rollout-parquet-driver-sigkill,distill-worker-sigkill
    python benchmarks/fault_injection.py --list

Each scenario runs the real CLI in a subprocess (its own local Ray), waits until the run is well under way, then
injects one fault:
  driver SIGKILL   the `raysad` process itself dies (`kill -9`); the Ray processes it started are then killed too
                   (what is left of a killed terminal session); the same command is run again
  driver SIGINT    Ctrl-C on the driver: the run must stop with exit 130, and the same command again finishes it
  env actor /      one Ray actor process (`ray::EnvWorker`, `ray::EngineActor`, `ray::RayTrainWorker`) is killed
  engine actor /   with SIGKILL: the run must recover by itself and exit 0
  Train worker
and compares the outcome with the same command run without a fault (the reference):
  rollout   episodes expected / written / duplicated / lost, and each episode equal to the reference's
            (the expert and a greedy model engine are deterministic per task)
  distill   optimizer steps in train_log.jsonl (each once), the final weights equal to the reference's, bit for bit
  tune      trials finished / run twice / lost, and each trial's test success equal to the reference's
and, for every stage, its MLflow run: not FINISHED after a driver fault (a killed process cannot say anything:
RUNNING; Ctrl-C: KILLED), one run FINISHED after the rerun, which continues it.
A row is ok when nothing is lost or doubled, the result equals the reference, the MLflow run tells the truth, and
the exit codes are truthful (faulted run: 130 for SIGINT, killed for SIGKILL, 0 when an actor died; rerun: 0).
The table is printed and written to <out>/fault_injection.md (and .json); the script exits 1 if any row is not
ok.

Models and data are made here, offline: HotPotQA expert episodes, a tokenizer trained on them, a tiny random
teacher (engine-actor scenarios, online teacher for distill) and a tiny student built from config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

RAYSAD = str(Path(sys.executable).parent / "raysad")
# test hook, loaded by every process of a run (sitecustomize): slow every env step so a kill lands mid-run
SLOW_STEPS = """
import os
if os.environ.get("RAYSAD_TEST_STEP_DELAY"):
    import time
    import raysad_envs.core as _core
    _step = _core.TextEnv.step
    def _slow_step(self, action, _delay=float(os.environ["RAYSAD_TEST_STEP_DELAY"])):
        time.sleep(_delay)
        return _step(self, action)
    _core.TextEnv.step = _slow_step
"""
COMPARED_EVAL = ("eval/success_rate", "eval/mean_reward", "eval/steps", "eval/reasoning_tokens", "eval/episodes")
SIGINT_WAIT_S = 90     # how long an interrupted run may take to stop before it counts as hung
RUN_TIMEOUT_S = 600


@dataclasses.dataclass
class Scenario:
    name: str
    stage: str              # rollout | distill | tune
    fault: str              # driver-sigkill | driver-sigint | actor-sigkill
    actor: str = ""         # the Ray actor class whose process is killed (actor-sigkill)
    fmt: str = "jsonl"      # rollout output format
    policy: str = "expert"  # rollout policy: expert (env side) or hf (engine actors)


SCENARIOS = [Scenario(f"rollout-{fmt}-driver-{sig}", "rollout", f"driver-{sig}", fmt=fmt)
             for fmt in ("jsonl", "parquet") for sig in ("sigkill", "sigint")] + [
    Scenario("rollout-env-actor-sigkill", "rollout", "actor-sigkill", actor="EnvWorker"),
    Scenario("rollout-engine-actor-sigkill", "rollout", "actor-sigkill", actor="EngineActor", policy="hf"),
    Scenario("distill-driver-sigkill", "distill", "driver-sigkill"),
    Scenario("distill-driver-sigint", "distill", "driver-sigint"),
    Scenario("distill-worker-sigkill", "distill", "actor-sigkill", actor="RayTrainWorker"),
    Scenario("tune-driver-sigkill", "tune", "driver-sigkill"),
    Scenario("tune-driver-sigint", "tune", "driver-sigint"),
]


@dataclasses.dataclass
class Row:
    scenario: str
    fault_exit: str         # the faulted run's exit: a code, "killed" (SIGKILL), "hung"
    rerun_exit: str         # "-" when the faulted run had to finish by itself
    unit: str               # episodes | steps | trials
    expected: int
    written: int
    duplicated: int
    lost: int
    same_as_reference: bool
    fault_landed: bool      # the fault hit a run that was still working (else the row proves nothing)
    mlflow: str = ""        # the stage's MLflow run status(es) after the fault -> after the rerun
    ok: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------------------ set-up ----
def prepare(root: Path, episodes: int) -> dict[str, Path]:
    """Tokenizer, tiny teacher (random, peaked) and the training trajectories, made once under root/setup."""
    import torch

    from raysad import models
    from raysad.policies.expert import expert_episodes
    from raysad.sft import trajectory_texts
    from raysad.trajectory_writer import TrajectoryWriter

    setup = root / "setup"
    paths = {"tok": setup / "tok", "teacher": setup / "teacher", "trajectories": setup / "expert.jsonl",
             "site": setup / "site"}
    if (setup / "done").is_file():
        return paths
    setup.mkdir(parents=True, exist_ok=True)
    trajs = expert_episodes("hotpotqa", max(episodes, 16), max_turns=6, prompt_chars=160, observation_chars=80)
    tokenizer = models.train_tokenizer(trajectory_texts(trajs), vocab_size=400, out_dir=paths["tok"])
    teacher = models.build_tiny_model("tiny-1m", tokenizer, seed=123)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)
    teacher.save_pretrained(paths["teacher"])
    models.save_tokenizer(tokenizer, paths["teacher"])
    with TrajectoryWriter(paths["trajectories"]) as out:
        for traj in trajs:
            out.write(traj)
    paths["site"].mkdir(exist_ok=True)
    (paths["site"] / "sitecustomize.py").write_text(SLOW_STEPS)
    (setup / "done").write_text("")
    return paths


def command(sc: Scenario, paths: dict[str, Path], out: Path, args) -> list[str]:
    """The user's command for the scenario, writing under `out`."""
    common = ["--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--num-cpus", "2"]
    if sc.stage == "rollout":
        suffix = "parquet" if sc.fmt == "parquet" else "jsonl"
        cmd = [RAYSAD, "rollout", "--env", "hotpotqa", "--episodes", str(args.episodes), "--env-actors", "2",
               "--envs-per-actor", "2", "--max-restarts", "3", "--out", str(out / f"trajectories.{suffix}")]
        if sc.policy == "hf":
            cmd += ["--policy", "hf", "--model", str(paths["teacher"]), "--temperature", "0", "--max-turns", "3",
                    "--max-new-tokens", "8"]
        else:
            cmd += ["--policy", "expert"]
        return cmd + common
    if sc.stage == "distill":
        return [RAYSAD, "distill", "--trajectories", str(paths["trajectories"]), "--student", "tiny-1m",
                "--tokenizer", str(paths["tok"]), "--teacher", str(paths["teacher"]), "--method", "sad",
                "--out", str(out / "student"), "--workers", "1", "--cpus-per-worker", "1", "--max-steps",
                str(args.steps), "--batch-size", "4", "--micro-batch-size", "4", "--max-length", "160",
                "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "2", "--max-failures", "2",
                "--seed", "0"] + common
    sweep = out / "sweep.yaml"
    if not sweep.exists():
        import yaml

        sweep.write_text(yaml.safe_dump({
            "name": "faults", "envs": ["hotpotqa"], "trajectories": str(paths["trajectories"]),
            "teacher": str(paths["teacher"]), "tokenizer": str(paths["tok"]),
            "space": {"student": ["tiny-1m"], "method": ["sad", "sft", "token_kd"]},
            "online_teacher": True,
            "distill": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 4, "max_length": 160, "lr": 3e-3,
                        "warmup_steps": 1, "workers": 1, "log_every": 100, "checkpoint_every": 2},
            "test_episodes": 2, "evaluate": {"max_turns": 2, "max_new_tokens": 8, "env_actors": 1,
                                             "envs_per_actor": 2},
            "cpus_per_trial": 0, "max_concurrent_trials": 1, "max_failures": 0, "report": False,
            "storage": str(out / "runs"), "tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "num_cpus": 2}))
    return [RAYSAD, "tune", str(sweep)]


# --------------------------------------------------------------------------------------- running it ----
class Run:
    """One CLI run in its own session (so that everything it starts can be killed with it)."""

    def __init__(self, cmd: list[str], cwd: Path, site: Path, log: Path, step_delay: float):
        env = dict(os.environ, RAYSAD_TEST_STEP_DELAY=str(step_delay), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        env.pop("RAY_ADDRESS", None)
        self.log = log
        # SIGINT as a terminal delivers it: a shell starts background jobs (`cmd &`) with SIGINT ignored, and
        # Python keeps an ignored SIGINT ignored, so the run would never see the Ctrl-C this script sends
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait(self, timeout: float) -> str:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "hung"
        return "killed" if code == -signal.SIGKILL else str(code)

    def end(self) -> None:
        """Kill whatever is left of the run's session (the local Ray a killed driver leaves behind)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def actor_pids(self, actor: str) -> list[int]:
        """The processes of Ray actor class `actor` started by this run (Ray titles them `ray::<Class>...`)."""
        import psutil

        pids = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if title.startswith(f"ray::{actor}"):
                pids.append(p.pid)
        return pids


def wait_until(ready: Callable[[], bool], run: Run, timeout: float = RUN_TIMEOUT_S) -> bool:
    """Poll `ready` until it holds (True) or the run has ended / timed out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if run.proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, UnicodeDecodeError):
        return []


def progress(sc: Scenario, out: Path) -> int:
    """How far the run has come, from what it wrote: episodes done, optimizer steps logged, trials finished."""
    if sc.stage == "rollout":
        from raysad.trajectory_reader import read_task_ids

        try:  # the episodes durable so far (JSONL lines, Parquet parts)
            return len(read_task_ids(out / f"trajectories.{'parquet' if sc.fmt == 'parquet' else 'jsonl'}"))
        except Exception:  # noqa: BLE001 -- not there yet, or a part being renamed while we look
            return 0
    if sc.stage == "distill":
        return len(lines(out / "student" / "train_log.jsonl"))
    return len(trial_events(out))


def trial_events(out: Path) -> dict[str, list[str]]:
    """{trial folder: its events}, for the trials that finished ("done")."""
    found = {}
    for events in sorted((out / "runs").glob("*/trials/*/events.jsonl")):
        kinds = [":".join(filter(None, (e["event"], e.get("split")))) for e in map(json.loads, lines(events))]
        if "done" in kinds:
            found[events.parent.name] = kinds
    return found


def inject(sc: Scenario, run: Run, out: Path, args) -> bool:
    """Wait until the run is under way, then inject the scenario's fault; False when the run ended first."""
    total = {"rollout": args.episodes, "distill": args.steps, "tune": 3}[sc.stage]
    threshold = {"rollout": max(2, total // 4), "distill": max(3, total // 3), "tune": 1}[sc.stage]
    if sc.fault == "actor-sigkill":
        # the actor must be alive and working (its process is found by title), then it dies mid-run
        if not wait_until(lambda: progress(sc, out) >= threshold and run.actor_pids(sc.actor), run):
            return False
        pids = run.actor_pids(sc.actor)
        os.kill(pids[0], signal.SIGKILL)
        return progress(sc, out) < total
    if not wait_until(lambda: progress(sc, out) >= threshold, run):
        return False
    landed = progress(sc, out) < total
    run.proc.send_signal(signal.SIGKILL if sc.fault == "driver-sigkill" else signal.SIGINT)
    return landed


def run_scenario(sc: Scenario, paths: dict[str, Path], root: Path, args) -> Row:
    ref_dir, dir_ = root / sc.name / "reference", root / sc.name / "faulted"
    for d in (ref_dir, dir_):
        d.mkdir(parents=True, exist_ok=True)
    cmd = command(sc, paths, ref_dir, args)
    if (ref_dir / "command.json").is_file() and json.loads((ref_dir / "command.json").read_text()) != cmd:
        shutil.rmtree(ref_dir)  # made with other settings
        ref_dir.mkdir(parents=True)
        cmd = command(sc, paths, ref_dir, args)
    if not (ref_dir / "command.json").is_file():
        ref = Run(cmd, ref_dir, paths["site"], ref_dir / "run.log", args.step_delay)
        code = ref.wait(RUN_TIMEOUT_S)
        ref.end()
        if code != "0":
            raise SystemExit(f"{sc.name}: the reference run failed (exit {code}); see {ref_dir / 'run.log'}")
        (ref_dir / "command.json").write_text(json.dumps(cmd))
    run = Run(command(sc, paths, dir_, args), dir_, paths["site"], dir_ / "run.log", args.step_delay)
    landed = inject(sc, run, dir_, args)
    fault_exit = run.wait(SIGINT_WAIT_S if sc.fault == "driver-sigint" else RUN_TIMEOUT_S)
    run.end()
    status_after_fault = run_statuses(dir_)
    rerun_exit = "-"
    if sc.fault != "actor-sigkill":  # the user runs the same command again
        again = Run(command(sc, paths, dir_, args), dir_, paths["site"], dir_ / "run.log", args.step_delay)
        rerun_exit = again.wait(RUN_TIMEOUT_S)
        again.end()
    row = compare(sc, ref_dir, dir_, fault_exit, rerun_exit, landed)
    expected_fault = {"driver-sigkill": "killed", "driver-sigint": "130", "actor-sigkill": "0"}[sc.fault]
    truthful = fault_exit == expected_fault and rerun_exit in ("-", "0")
    # MLflow: an interrupted run is not FINISHED (a killed process cannot say so: RUNNING); the rerun continues
    # the same run, and ends it FINISHED
    row.mlflow = f"{'/'.join(status_after_fault) or '-'} -> {'/'.join(run_statuses(dir_)) or '-'}"
    mlflow_ok = run_statuses(dir_) == ["FINISHED"] and (sc.fault == "actor-sigkill"
                                                          or "FINISHED" not in status_after_fault)
    row.ok = truthful and landed and mlflow_ok and row.lost == 0 and row.duplicated == 0 and row.same_as_reference
    if not mlflow_ok:
        row.note = f"MLflow run status {row.mlflow}"
    if not truthful:
        row.note = f"exit {fault_exit}/{rerun_exit}, expected {expected_fault}/0; see {dir_ / 'run.log'}"
    elif not landed:
        row.note = "the run ended before the fault: rerun with a larger --step-delay"
    return row


# ------------------------------------------------------------------------------------------ checking ----
def run_statuses(out: Path) -> list[str]:
    """The status of each MLflow run of the stage in <out>/mlflow.db (a sweep's: its own run, not its trials')."""
    if not (out / "mlflow.db").is_file():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted(r.info.status for r in runs if r.data.tags.get("stage") in ("rollout", "distill", "tune"))


def compare(sc: Scenario, ref: Path, got: Path, fault_exit: str, rerun_exit: str, landed: bool) -> Row:
    if sc.stage == "rollout":
        return compare_rollouts(sc, ref, got, fault_exit, rerun_exit, landed)
    if sc.stage == "distill":
        return compare_distills(sc, ref, got, fault_exit, rerun_exit, landed)
    return compare_sweeps(sc, ref, got, fault_exit, rerun_exit, landed)


def episodes(path: Path) -> list[tuple[str, str]]:
    """(task id, what was played: actions and reward) per episode written."""
    from raysad.trajectory_reader import read_trajectories

    if not path.exists():
        return []
    with read_trajectories(path) as reader:
        return [(t.task_id, json.dumps([[u.thought, u.action] for u in t.turns] + [t.reward])) for t in reader]


def compare_rollouts(sc, ref, got, fault_exit, rerun_exit, landed) -> Row:
    name = f"trajectories.{'parquet' if sc.fmt == 'parquet' else 'jsonl'}"
    expected, written = dict(episodes(ref / name)), episodes(got / name)
    counts = Counter(task for task, _ in written)
    same = all(expected.get(task) == played for task, played in written)
    return Row(sc.name, fault_exit, rerun_exit, "episodes", len(expected), len(written),
               sum(c - 1 for c in counts.values()), len(set(expected) - set(counts)), same, landed)


def compare_distills(sc, ref, got, fault_exit, rerun_exit, landed) -> Row:
    from safetensors.torch import load_file

    steps = [json.loads(line)["step"] for line in lines(got / "student" / "train_log.jsonl")]
    expected = len(lines(ref / "student" / "train_log.jsonl"))
    counts = Counter(steps)
    try:
        a, b = load_file(ref / "student" / "model.safetensors"), load_file(got / "student" / "model.safetensors")
        same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    except FileNotFoundError:
        same = False
    return Row(sc.name, fault_exit, rerun_exit, "steps", expected, len(steps), sum(c - 1 for c in counts.values()),
               len(set(range(expected)) - set(counts)), same, landed)


def compare_sweeps(sc, ref, got, fault_exit, rerun_exit, landed) -> Row:
    def results(out: Path) -> dict[str, list]:
        found = {}
        for trial in sorted((out / "runs").glob("*/trials/*/trial.json")):
            record = json.loads(trial.read_text())
            # what the trial computed (not how long it took)
            found[record["config"]["method"]] = [record.get(k) for k in COMPARED_EVAL]
        return found

    expected, done = results(ref), results(got)
    # a trial counts twice when its test evaluation ran twice (a resumed trial may redo an unfinished chunk)
    tests = {d: kinds.count("evaluate:test") for d, kinds in trial_events(got).items()}
    same = done == expected
    return Row(sc.name, fault_exit, rerun_exit, "trials", len(expected), len(tests),
               sum(max(n - 1, 0) for n in tests.values()), len(set(expected) - set(done)), same, landed)


# ----------------------------------------------------------------------------------------------- table ----
def table(rows: list[Row]) -> str:
    head = ["scenario", "fault run exit", "rerun exit", "unit", "expected", "written", "duplicated", "lost",
            "same as uninterrupted", "MLflow run", "ok"]
    body = [[r.scenario, r.fault_exit, r.rerun_exit, r.unit, r.expected, r.written, r.duplicated, r.lost,
             "yes" if r.same_as_reference else "NO", r.mlflow, "ok" if r.ok else f"FAIL {r.note}".strip()]
            for r in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(map(str, line)) + " |" for line in body]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fault-injection", help="work folder (default: %(default)s)")
    parser.add_argument("--scenarios", default="", help="comma-separated names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--episodes", type=int, default=24, help="episodes per rollout (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per distill (default: %(default)s)")
    parser.add_argument("--step-delay", type=float, default=0.3,
                        help="seconds added to every env step, so that a kill lands mid-run (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{s.name:34s} {s.stage}: {s.fault} {s.actor}".rstrip() for s in SCENARIOS))
        return 0
    wanted = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(wanted) - {s.name for s in SCENARIOS})
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; --list shows them")
    chosen = [s for s in SCENARIOS if not wanted or s.name in wanted]
    root = Path(args.out).resolve()
    for sc in chosen:  # the faulted side always starts from nothing; references are kept (same settings)
        shutil.rmtree(root / sc.name / "faulted", ignore_errors=True)
    load = os.getloadavg()[0]
    began = time.monotonic()
    paths = prepare(root, args.episodes)
    rows = []
    for sc in chosen:
        t0 = time.monotonic()
        rows.append(run_scenario(sc, paths, root, args))
        print(f"{sc.name}: {'ok' if rows[-1].ok else 'FAIL'} ({time.monotonic() - t0:.0f} s)", flush=True)
    text = table(rows)
    summary = (f"{sum(r.ok for r in rows)}/{len(rows)} scenarios ok; {time.monotonic() - began:.0f} s; load average "
               f"{load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(text + "\n\n" + summary)
    (root / "fault_injection.md").write_text(text + "\n\n" + summary + "\n")
    (root / "fault_injection.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
