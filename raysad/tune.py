"""Ray Tune sweeps: many students distilled, pruned and evaluated, one MLflow run each (`raysad tune FILE`).

    from raysad.tune import load_sweep, run_sweep
    result = run_sweep(load_sweep("tune_configs/quickstart.yaml"))
    result.table            # the `raysad report` table of the sweep's trials

The sweep file (tune_configs/*.yaml): its fields, checks and search space are raysad/sweep.py's (SweepConfig).

Who runs where:
  driver   (this module) reads and checks the sweep file, prepares the shared inputs once (rollout, teacher,
           tokenizer, derived students) under <storage>/<name>/, opens the sweep's MLflow run, runs the Tuner,
           then prints `raysad report`.
  trial    raysad.trial, a Tune function trainable: distill in chunks (a valid evaluation and a report to Tune
           after each: ASHA stops weak trials there) -> optional prune -> evaluate on the test split. What it
           reserves, and so how to size cpus_per_trial and max_concurrent_trials, is said there.

MLflow: the sweep is a run (tag stage=tune) in experiment `name`; every trial is a run nested under it (what
it holds: raysad.trial), so `raysad report --experiment NAME` has one row per trial.

Resume: an interrupted sweep (Ctrl-C, a lost driver, trials that errored) continues when the same command runs
again (Tuner.restore with resume_unfinished and resume_errored); finished trials are not run again, a trial
cut short continues from its last finished chunk (raysad.trial); its MLflow run is reopened. `--no-resume`
starts the sweep again from nothing. A sweep whose settings changed since it started (sweep.json in its folder)
is not resumed: that is refused, naming the fields. One change is a resume: a grid sweep whose `space` gained
points (another seed, another arm) and lost none runs its finished and unfinished trials as before (tune/) and
the new points as a Tune experiment of their own (tune-2/, tune-3/, ...; grid_parts.json lists them), all under
the same MLflow sweep run.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysad import report as names
from raysad.config import ConfigError
from raysad.sweep import (SweepConfig, axis_values, check_stored_topk, check_sweep, param_space, search_algorithm,
                          spaces, student_size, trial_count, tune_metric)
from raysad.tracking import resumable_run
from raysad.trial import trainable

TUNE_DIR = "tune"                          # Ray Tune's experiment folder under the sweep folder
PARENT_RUN_FILE = "mlflow_sweep_run_id"
SETTINGS_FILE = "sweep.json"               # the settings the sweep started with: a resume must match them
GRID_PARTS_FILE = "grid_parts.json"        # a grown grid sweep: its later Tune experiments and their grid points
# SweepConfig fields a resumed sweep may change: where and how it runs, not what its trials compute
RESUME_MAY_CHANGE = ("ray_address", "num_cpus", "max_concurrent_trials", "max_failures", "report",
                     "report_group_by", "tracking_uri")


@dataclass
class SweepResult:
    sweep_dir: Path
    run_id: str | None                         # the sweep's MLflow run
    trials: list[dict]                         # per trial: trial_id, status, config, last metrics
    table: Any = None                          # the report's table (pandas), None without report
    wall_s: float = 0.0
    interrupted: bool = False                  # Ctrl-C / SIGINT stopped the Tuner with trials unfinished
    planned: int = 0                           # trials the sweep runs in all (sweep.trial_count)

    @property
    def failed(self) -> list[dict]:
        """The trials that errored."""
        return [t for t in self.trials if t["error"] is not None]

    @property
    def exit_code(self) -> int:
        """`raysad tune`'s exit status: 130 interrupted, 1 a trial errored, else 0."""
        return 130 if self.interrupted else 1 if self.failed else 0


# ------------------------------------------------------------------------------------- the sweep file ----
def load_sweep(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read and check a sweep file; a bad value raises ConfigError naming the file, line and field."""
    from raysad.config import build_config

    path = Path(path)
    lines = _key_lines(path)
    try:
        sweep = build_config(SweepConfig, path, **overrides)
        check_sweep(sweep, str(path))
    except ConfigError as err:
        raise ConfigError(_with_line(str(err), str(path), lines)) from None
    return sweep


def _key_lines(path: Path) -> dict[str, int]:
    """'a.b' -> 1-based line of that key in the YAML file (for error messages); {} when it cannot be read."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    found: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                found[name] = key.start_mark.line + 1
                walk(value, name + ".")
    walk(root, "")
    return found


def _with_line(message: str, source: str, lines: dict[str, int]) -> str:
    match = re.search(r"field '([\w.\-]+)", message)
    if not match or not message.startswith(source):
        return message
    key = match.group(1)
    while key and key not in lines:
        key = key.rpartition(".")[0]
    return f"{source}:{lines[key]}{message[len(source):]}" if key else message


# ------------------------------------------------------------------------------------- shared inputs ----
def _say(text: str) -> None:
    from raysad import ui

    ui.console().print(f"[cyan]tune[/cyan] {text}")


def prepare_inputs(sweep: SweepConfig, sweep_dir: Path, uri: str) -> dict[str, Any]:
    """Everything the trials share, made once (and reused by a resumed sweep): trajectories per env, the
    teacher, the tokenizer and derived students. Returns absolute paths."""
    from raysad import models
    from raysad.students import derive_student_dir

    data_dir = sweep_dir / "data"
    experiment = sweep.experiment or sweep.name
    trajectories: dict[str, str] = {}
    if isinstance(sweep.trajectories, str):
        trajectories = {sweep.envs[0]: sweep.trajectories}
    elif isinstance(sweep.trajectories, dict):
        trajectories = dict(sweep.trajectories)
    else:
        from raysad.rollout import RolloutConfig, run_rollout

        for env in sweep.envs:
            out = data_dir / f"{env}.train.jsonl"
            cfg = {"model": sweep.teacher, **sweep.rollout}
            if cfg.get("policy", "expert") == "expert":
                cfg.pop("model")
            rcfg = RolloutConfig(**cfg, env=env, split="train", out=str(out), experiment=experiment,
                                 run_name=f"rollout-{env}", tracking_uri=uri)
            _say(f"rollout: {env} train split -> {out}")
            run_rollout(rcfg, progress=False)
            trajectories[env] = str(out)
    trajectories = {env: str(Path(p).expanduser().resolve()) for env, p in trajectories.items()}
    for env, path in trajectories.items():
        if not Path(path).is_file():
            raise ConfigError(f"trajectories for {env}: {path}: file not found")

    teacher = str(Path(sweep.teacher).expanduser().resolve()) if sweep.teacher else None
    if sweep.teacher_sft is not None:
        from raysad.sft import SFTConfig, run_sft

        teacher_dir = sweep_dir / "teacher"
        if not (teacher_dir / "config.json").is_file():
            source = _all_trajectories(trajectories, data_dir)
            _say(f"teacher: fine-tuning {sweep.teacher_sft.get('model', 'tiny-5m')} on {source}")
            run_sft(SFTConfig(**sweep.teacher_sft, trajectories=source, out=str(teacher_dir),
                              experiment=experiment, run_name="teacher-sft", tracking_uri=uri), progress=False)
        teacher = str(teacher_dir.resolve())

    tokenizer = str(Path(sweep.tokenizer).expanduser().resolve()) if sweep.tokenizer else teacher
    students = {str(s): str(s) for space in spaces(sweep) for s in axis_values("student", space["student"])}
    if tokenizer is None and any(s in models.TINY_SIZES for s in students):
        from raysad.sft import train_tokenizer_from_trajectories

        tok_dir = sweep_dir / "tokenizer"
        if not (tok_dir / "tokenizer_config.json").is_file():
            _say(f"tokenizer: training one on the trajectories -> {tok_dir}")
            train_tokenizer_from_trajectories(_all_trajectories(trajectories, data_dir), out_dir=tok_dir)
        tokenizer = str(tok_dir.resolve())
    for spec in students:
        if spec.startswith("derive:"):
            out = sweep_dir / "students" / student_size(spec)
            if not (out / "config.json").is_file():
                _say(f"student {spec}: cut from the teacher -> {out}")
                derive_student_dir(teacher, out, spec)
            students[spec] = str(out.resolve())
        elif spec not in models.TINY_SIZES:
            students[spec] = str(Path(spec).expanduser().resolve())
            if not (Path(students[spec]) / "config.json").is_file():
                raise ConfigError(f"student {spec}: not an HF model directory (no config.json)")
    return {"trajectories": trajectories, "teacher": teacher, "tokenizer": tokenizer, "students": students,
            "sweep_dir": str(sweep_dir.resolve()), "tracking_uri": uri, "experiment": experiment}


def _all_trajectories(trajectories: dict[str, str], data_dir: Path) -> str:
    """One file with every env's trajectories (the teacher and the tokenizer learn all of them)."""
    if len(trajectories) == 1:
        return next(iter(trajectories.values()))
    from raysad.trajectory_reader import read_trajectories
    from raysad.trajectory_writer import TrajectoryWriter

    merged = data_dir / "all.train.jsonl"
    if not merged.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        with TrajectoryWriter(merged) as out:
            for path in trajectories.values():
                for traj in read_trajectories(path):
                    out.write(traj)
    return str(merged)


# ------------------------------------------------------------------------------------------ the sweep ----
def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default spells out the config: too long a path for a grid point


def _settings(sweep: SweepConfig) -> dict:
    """The sweep's settings as SETTINGS_FILE holds them (secrets such as an engine's api_key redacted)."""
    from raysad.config import redact

    return redact(dataclasses.asdict(sweep))


def check_resume(sweep: SweepConfig, sweep_dir: Path) -> list[dict]:
    """A sweep resumes the Tune experiment it finds, with the grid it was started with: when this sweep's settings
    differ from those (a new space, other distill settings), resuming would silently run the old sweep, so refuse
    and say what changed. The exception: a grid sweep whose space only gained points; those new points are
    returned (they run as another Tune experiment, see run_sweep). A sweep folder from before SETTINGS_FILE
    existed resumes unchecked."""
    import json

    from raysad.config import changed_settings
    from raysad.sweep import grid_points

    changed = changed_settings(sweep_dir / SETTINGS_FILE, _settings(sweep), ignore=RESUME_MAY_CHANGE)
    if not changed:
        return []
    fields = [k.split(':')[0] for k in changed]
    refusal = (f"{sweep_dir} holds sweep {sweep.name!r} started with other settings (changed: {', '.join(fields)}); "
               "resuming would run the old one. Rerun with --no-resume to start it again, or give the new sweep "
               "another `name`")
    if fields != ["space"] or sweep.search != "grid":
        raise ConfigError(refusal + ("" if fields != ["space"] else " (only a grid sweep can gain points)"))
    recorded = json.loads((sweep_dir / SETTINGS_FILE).read_text())
    ran = grid_points(dataclasses.replace(sweep, space=recorded["space"]))
    points = grid_points(sweep)
    ran_keys, keys = {_point_key(p) for p in ran}, {_point_key(p) for p in points}
    lost = [p for p in ran if _point_key(p) not in keys]
    if lost:
        raise ConfigError(f"{refusal} (the new space lacks {len(lost)} grid point(s) the sweep has, e.g. {lost[0]}; "
                          "a sweep can gain grid points, not lose them)")
    return [p for p in points if _point_key(p) not in ran_keys]


def _point_key(point: dict) -> str:
    import json

    return json.dumps(point, sort_keys=True, default=str)


def _grid_parts(sweep_dir: Path, grown: list[dict]) -> list[tuple[str, list[dict] | None]]:
    """The Tune experiments of the sweep, in order: (folder name, its grid points; None: the space it started
    with). The points a grown sweep gained (check_resume) become the next one, recorded before it runs."""
    import json

    from raysad.config import write_json

    path = sweep_dir / GRID_PARTS_FILE
    later = json.loads(path.read_text()) if path.is_file() else []
    if grown:
        later.append({"name": f"{TUNE_DIR}-{len(later) + 2}", "points": grown})
        write_json(path, later)
    return [(TUNE_DIR, None)] + [(part["name"], part["points"]) for part in later]


def _tuner(sweep: SweepConfig, trial_fn, tune_dir: Path, restore: bool, points: list[dict] | None = None):
    """Tune's Tuner over the sweep's space (or these grid points), or the one in tune_dir restored."""
    from ray import tune

    if restore:
        _say(f"resuming the sweep in {tune_dir}")
        return tune.Tuner.restore(str(tune_dir), trial_fn, resume_unfinished=True, resume_errored=True)
    metric = tune_metric(sweep)
    search_alg = search_algorithm(sweep, metric)
    scheduler = None
    if sweep.asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.chunks,
                                  grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
    space = param_space(sweep) if points is None else {"params": tune.grid_search(points)}
    return tune.Tuner(
        trial_fn, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials or None,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=tune_dir.name, storage_path=str(tune_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  verbose=1))


def _last_line(error: BaseException) -> str:
    """The last line of a trial's error that says what happened: its last `SomeError: ...` line (a remote error
    ends with the worker's traceback and, after it, hints such as distill's `Run the same command again`),
    else its last line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b[^:\s]*: ", line)]
    return (raised or lines or [type(error).__name__])[-1]


def _summarize(results, sweep_dir: Path | None = None) -> list[dict]:
    """Per trial: id, Tune status, config, error (its last line), finished or not, last metrics, where its logs
    are."""
    trials = []
    tune_trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", None) or [])
    for i, result in enumerate(results):
        metrics = result.metrics or {}
        config = result.config or {}
        trial = tune_trials[i] if i < len(tune_trials) else None
        trial_id = metrics.get("trial_id") or (trial.trial_id if trial is not None else None)
        logs = [str(Path(result.path) / "error.txt")] if result.error and result.path else []
        if sweep_dir is not None and trial_id:
            logs.append(str(sweep_dir / "trials" / trial_id))
        trials.append({"trial_id": trial_id, "status": trial.status if trial is not None else None,
                       "config": config.get("params", config),
                       "error": _last_line(result.error) if result.error else None,
                       "done": bool(metrics.get("trial_done")), "logs": logs,
                       "metrics": {k: v for k, v in metrics.items() if "/" in k}})
    return trials


def _log_counts(trials: list[dict]) -> None:
    """The sweep run gets the counts of its trials and the best success."""
    from raysad import tracking

    done = sum(t["done"] for t in trials)
    errors = sum(t["error"] is not None for t in trials)
    tracking.log_metrics({"tune/trials": len(trials), "tune/finished": done, "tune/errors": errors,
                          "tune/stopped_early": len(trials) - done - errors})
    scores = [t["metrics"].get(names.M_SUCCESS) for t in trials if t["done"]]
    if any(s is not None for s in scores):
        tracking.log_metrics({"tune/best_success_rate": max(s for s in scores if s is not None)})


def run_sweep(sweep: SweepConfig, resume: bool = True) -> SweepResult:
    """Prepare the shared inputs, run (or resume) the Tune experiment, log the sweep run, print the report."""
    import ray
    from ray import tune

    from raysad import tracking
    from raysad.cluster import init_ray
    from raysad.config import flatten, record_settings

    began = time.perf_counter()
    sweep_dir = (Path(sweep.storage).expanduser() / sweep.name).resolve()
    tune_dir = sweep_dir / TUNE_DIR
    if not resume and sweep_dir.exists():
        _say(f"--no-resume: removing {sweep_dir}")
        shutil.rmtree(sweep_dir)
    check_stored_topk(sweep)  # before any folder, Ray or trial: a sweep bound to fail stops here
    resuming = resume and tune.Tuner.can_restore(str(tune_dir))
    grown = check_resume(sweep, sweep_dir) if resuming else []
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        (sweep_dir / GRID_PARTS_FILE).unlink(missing_ok=True)
    parts = _grid_parts(sweep_dir, grown)
    if grown:
        _say(f"the space gained {len(grown)} grid point(s): they run in {sweep_dir / parts[-1][0]}")
    if grown or not resuming:
        record_settings(sweep_dir / SETTINGS_FILE, _settings(sweep))
    uri = tracking.absolute_uri(sweep.tracking_uri)
    experiment = sweep.experiment or sweep.name
    started_ray = init_ray(sweep.ray_address, sweep.num_cpus)
    try:
        with resumable_run(sweep_dir / PARENT_RUN_FILE, experiment, uri, f"sweep-{sweep.name}", flatten(sweep),
                           {names.STAGE_TAG: "tune", "sweep": sweep.name}) as parent:
            run_id = parent.info.run_id
            inputs = prepare_inputs(sweep, sweep_dir, uri)
            _say(f"sweep {sweep.name!r}: trials in {sweep_dir / 'trials'}, MLflow experiment {experiment!r} at {uri}")
            if len(parts) > 1:
                import mlflow

                mlflow.log_artifact(str(sweep_dir / GRID_PARTS_FILE))
            planned = trial_count(sweep)
            later = sum(sweep.num_samples * len(points) for _, points in parts[1:])
            trials = []
            for name, points in parts:
                part = _summarize(_tuner(sweep, trainable(sweep, inputs, run_id), sweep_dir / name,
                                         tune.Tuner.can_restore(str(sweep_dir / name)), points).fit(), sweep_dir)
                trials += part
                # Tune catches Ctrl-C / SIGINT itself: fit() returns with trials neither finished nor errored, or
                # not yet created; the next experiment does not start then
                if unfinished_trials(part, planned - later if points is None else sweep.num_samples * len(points)) > 0:
                    break
            _log_counts(trials)
            interrupted = unfinished_trials(trials, planned) > 0
            table = None
            done = sum(t["done"] for t in trials)
            if sweep.report and done:
                from raysad.report import ReportConfig, run_report

                report = run_report(ReportConfig(experiment=experiment, filter=f"tags.sweep_run_id = '{run_id}'",
                                                 group_by=list(sweep.report_group_by), tracking_uri=uri,
                                                 plots=str(sweep_dir / "report")))
                table = report.table
            wall = time.perf_counter() - began
            tracking.log_metrics({"tune/wall_s": wall})
            _say(f"{done}/{len(trials)} trials finished in {wall:.0f} s; "
                 f"`raysad report --experiment {experiment}` compares them")
            if interrupted:  # Tune caught the Ctrl-C, so nothing raises here: the sweep's run says it itself
                import mlflow

                mlflow.end_run("KILLED")
    finally:
        if started_ray:
            ray.shutdown()
    result = SweepResult(sweep_dir=sweep_dir, run_id=run_id, trials=trials, table=table, wall_s=wall,
                         interrupted=interrupted, planned=planned)
    say_failures(result)
    return result


def unfinished_trials(trials: list[dict], planned: int) -> int:
    """Trials an interrupted sweep left: those Tune had not started or finished, and those it had not created."""
    return (sum(t["status"] in ("PENDING", "RUNNING", "PAUSED") for t in trials)
            + max(planned - len(trials), 0))


def say_failures(result: SweepResult) -> None:
    """One line per errored trial (its id, the last line of its error, where its logs are) on stderr, and
    one if the sweep was interrupted: what `raysad tune` exits non-zero for."""
    import sys

    for t in result.failed:
        print(f"tune: trial {t['trial_id']} failed: {t['error']} (logs: {', '.join(t['logs'])})", file=sys.stderr)
    if result.interrupted:
        unfinished = unfinished_trials(result.trials, result.planned)
        print(f"tune: interrupted with {unfinished} trial(s) unfinished; the same command resumes the sweep in "
              f"{result.sweep_dir}", file=sys.stderr)
    elif result.failed:
        print(f"tune: {len(result.failed)}/{len(result.trials)} trial(s) failed; the same command retries them "
              f"(sweep folder {result.sweep_dir})", file=sys.stderr)


def main(config_path: str | Path, resume: bool = True, **overrides: Any) -> SweepResult:
    """`raysad tune FILE`: read and check the sweep file (flags override its fields), run it. Exits 1 when a
    trial errored and 130 when interrupted (Ctrl-C / SIGINT), after one line per failed trial."""
    import sys

    sweep = load_sweep(config_path, **{k: v for k, v in overrides.items() if v is not None})
    try:
        result = run_sweep(sweep, resume=resume)
    except KeyboardInterrupt:  # outside Tune's own handler (preparing inputs, the report): same exit status
        print(f"tune: interrupted; the same command resumes sweep {sweep.name!r}", file=sys.stderr)
        raise SystemExit(130) from None
    if result.exit_code:
        raise SystemExit(result.exit_code)
    return result
