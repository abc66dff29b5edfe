"""Ray Tune sweeps: many students distilled, pruned and evaluated, one MLflow run each (`raysad tune FILE`).

    from raysad.tune import load_sweep, run_sweep
    result = run_sweep(load_sweep("tune_configs/quickstart.yaml"))
    result.table            # the `raysad report` table of the sweep's trials

A sweep file (tune_configs/*.yaml, fields: SweepConfig below) names the environments, where the teacher
trajectories come from (a file per env, or a `rollout:` section that makes them), the teacher (an HF directory,
or `teacher_sft:` to fine-tune a tiny one on the trajectories first) and the search `space`:
student (tiny size names, `derive:keep_every=2[,width_factor=0.5]` students cut from the teacher, or HF
directories), method (sad / token_kd / flat_kd / sft), lambda_reason, lambda_act, divergence, temperature, lr, seed,
prune_ratio, or any other DistillConfig field. A list is a grid axis (`search: grid`) or a choice (`random`,
`optuna`); `{uniform|loguniform|randint: [lo, hi]}` is a range (random / optuna only); a scalar is fixed.

Who runs where:
  driver   prepares the shared inputs once (rollout, teacher, tokenizer, derived students) under
           <storage>/<name>/, opens the sweep's MLflow run, runs the Tuner, then prints `raysad report`.
  trial    a Tune function trainable that reserves only its own driver's resources (cpus/gpus_per_trial:
           pruning runs here), as Ray Train V2 inside Tune wants it: run_distill launches its TorchTrainer from
           the trial and its `workers` reserve their own CPUs/GPUs; evaluation's engine and env actors
           (raysad.evaluate on the rollout pool) reserve theirs. So on a small CPU box, give trials
           cpus_per_trial 0 and max_concurrent_trials 1: the evaluation engine asks for every CPU of the cluster.
  per trial  distill in `chunks` of steps -> after each chunk evaluate on the valid split and report
           `valid/success_rate` to Tune (ASHA stops weak trials there) -> optional prune -> evaluate on the test
           split (`eval/*`, the metrics `raysad report` reads). With chunks = 1 there is one report per trial,
           so ASHA has nothing to stop early: use chunks >= 2 with asha.
  Chunks: a chunk continues from the previous chunk's student with a fresh optimizer; its learning rate runs
  linearly along the whole run's schedule (warm-up in the first chunk only) and its data order is reseeded,
  so the chunks together approximate one run of distill.max_steps steps.

MLflow: the sweep is a run (tag stage=tune) in experiment `name`; every trial is a run nested under it (tags
stage=trial, sweep, method, student_size, env) with the report's params (docs/metrics.md), the distill
config as distill.* params, per-step `distill/*` curves, `valid/*` after each chunk, `prune/*`, the test
`eval/*`, and artifacts eval.json, the trial's plot and trial.json. The stages run untracked inside a trial
(track=False): the trial run holds everything, so `raysad report --experiment NAME` has one row per trial.

Resume: an interrupted sweep (Ctrl-C, a lost driver, trials that errored) continues when the same command runs
again (Tuner.restore with resume_unfinished and resume_errored); finished trials are not run again, a trial
cut short continues from its last finished chunk (Tune checkpoint) and inside the chunk from distill's own
checkpoint; its MLflow run is reopened. `--no-resume` starts the sweep again from nothing. A sweep whose
settings changed since it started (sweep.json in its folder) is not resumed: that is refused, naming the fields.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raysad import report as names
from raysad.config import ConfigError
from raysad.losses import METHODS as DISTILL_METHODS

TUNE_DIR = "tune"                          # Ray Tune's experiment folder under the sweep folder
PARENT_RUN_FILE = "mlflow_sweep_run_id"
SETTINGS_FILE = "sweep.json"               # the settings the sweep started with: a resume must match them
# SweepConfig fields a resumed sweep may change: where and how it runs, not what its trials compute
RESUME_MAY_CHANGE = ("ray_address", "num_cpus", "max_concurrent_trials", "max_failures", "report",
                     "report_group_by", "tracking_uri")
TRIAL_MEMORY_TOKEN = 2**20                 # bytes a trial with cpus/gpus_per_trial 0 reserves instead
RANGES = ("uniform", "loguniform", "randint", "choice")
# DistillConfig fields a sweep sets itself (per trial): not allowed in the `distill:` section or the space
DISTILL_SET_BY_SWEEP = ("trajectories", "student", "teacher", "tokenizer", "out", "experiment", "run_name",
                        "tracking_uri", "resume", "storage", "ray_address", "num_cpus")
EVAL_SET_BY_SWEEP = ("env", "split", "episodes", "policy", "model", "out", "method", "student_size", "experiment",
                     "run_name", "tracking_uri", "ray_address", "num_cpus")
PRUNE_SET_BY_SWEEP = ("model", "out", "ratio", "experiment", "run_name", "tracking_uri")
ROLLOUT_SET_BY_SWEEP = ("env", "split", "out", "experiment", "run_name", "tracking_uri", "ray_address", "num_cpus")
SFT_SET_BY_SWEEP = ("trajectories", "out", "experiment", "run_name", "tracking_uri")


@dataclass
class SweepConfig:
    name: str                                  # the MLflow experiment and the sweep folder <storage>/<name>
    envs: list[str]                            # environments: a grid axis (`env` param) of every search
    space: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)  # axis -> list | range | value;
    #                                          a list of such mappings: the union of their grids (grid search)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1                       # grid: repeats of the grid; random/optuna: trials drawn
    # where the data and the teacher come from
    trajectories: str | dict[str, str] | None = None   # a file (one env) or {env: file}; None = `rollout`
    rollout: dict[str, Any] = field(default_factory=dict)  # RolloutConfig fields: make <env>.jsonl (train split)
    teacher: str | None = None                 # HF directory: online KD (`online_teacher`), derive: students
    teacher_sft: dict[str, Any] | None = None  # SFTConfig fields: fine-tune a teacher on the trajectories first
    online_teacher: bool = False               # KD from the teacher's full logits (else the stored top-k)
    tokenizer: str | None = None               # for tiny students; default the teacher's, else one trained here
    # the trial
    chunks: int = 1                            # distill in this many chunks, a valid evaluation after each
    asha: bool = False                         # ASHA early stopping on valid/success_rate (needs chunks >= 2)
    grace_period: int = 1                      # ASHA: chunks every trial runs before it may be stopped
    reduction_factor: float = 2.0              # ASHA: keep the best 1/reduction_factor at each rung
    valid_episodes: int = 0                    # valid-split episodes per chunk evaluation (0 = none)
    test_episodes: int | None = 20             # test episodes at the end (None = the whole split)
    test_split: str = "test"
    distill: dict[str, Any] = field(default_factory=dict)    # DistillConfig fields shared by every trial
    prune: dict[str, Any] = field(default_factory=dict)      # PruneConfig fields (ratio is the space's)
    evaluate: dict[str, Any] = field(default_factory=dict)   # EvalConfig fields (max_steps, few_shot ...)
    # resources and bookkeeping
    cpus_per_trial: float = 1.0                # the trial's own process (fractional is fine)
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0             # 0 = as many as the resources allow
    max_failures: int = 1                      # retries of a failing trial (from its last chunk)
    storage: str = "runs/tune"                 # the sweep folder is <storage>/<name>
    experiment: str | None = None              # MLflow experiment (default: name)
    tracking_uri: str | None = None            # default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    ray_address: str | None = None             # "auto" or host:port; None = $RAY_ADDRESS or a local Ray
    num_cpus: int | None = None                # CPUs of a local Ray (None = all)
    report: bool = True                        # print (and log) `raysad report` of the sweep at the end
    report_group_by: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    sweep_dir: Path
    run_id: str | None                         # the sweep's MLflow run
    trials: list[dict]                         # per trial: trial_id, status, config, last metrics
    table: Any = None                          # the report's table (pandas), None without report
    wall_s: float = 0.0
    interrupted: bool = False                  # Ctrl-C / SIGINT stopped the Tuner with trials unfinished

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


def _fail(source: str, name: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: field '{name}': {why}")


def _check_section(cls, values: dict, section: str, set_by_sweep: tuple, source: str) -> dict:
    """Check a section's keys and types against a stage config dataclass; returns the coerced values."""
    import typing

    from raysad.config import _coerce

    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in (values or {}).items():
        key = key.replace("-", "_")
        if key in set_by_sweep:
            raise _fail(source, f"{section}.{key}", f"set by the sweep for each trial, not in `{section}:`")
        if key not in fields:
            raise _fail(source, f"{section}.{key}", f"unknown {cls.__name__} field; known: "
                        + ", ".join(sorted(fields - set(set_by_sweep))))
        out[key] = _coerce(value, hints[key], f"{source}: field '{section}.{key}'")
    return out


def _distill_hints() -> dict:
    import typing

    from raysad.distill import DistillConfig

    return typing.get_type_hints(DistillConfig)


def axis_values(name: str, spec: Any) -> list:
    """The values an axis may take (a range gives its bounds)."""
    if isinstance(spec, dict):
        kind = next(iter(spec))
        return list(spec[kind])
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def check_sweep(sweep: SweepConfig, source: str = "sweep") -> None:
    """Cross-field checks of a sweep (types were checked by build_config); ConfigError names the field."""
    import raysad_envs

    from raysad.distill import DistillConfig
    from raysad.evaluate import EvalConfig
    from raysad.prune import PruneConfig
    from raysad.rollout import RolloutConfig
    from raysad.sft import SFTConfig

    if not re.fullmatch(r"[\w.\-]+", sweep.name):
        raise _fail(source, "name", f"letters, digits, '.', '-', '_' only (it names a folder), got {sweep.name!r}")
    if not sweep.envs:
        raise _fail(source, "envs", "name at least one environment")
    for i, env in enumerate(sweep.envs):
        try:
            raysad_envs.canonical(env)
        except ValueError as err:
            raise _fail(source, f"envs[{i}]", str(err)) from None
    for name in ("num_samples", "chunks", "grace_period"):
        if getattr(sweep, name) < 1:
            raise _fail(source, name, f"must be >= 1, got {getattr(sweep, name)}")
    for name in ("valid_episodes", "max_concurrent_trials", "max_failures",
                 "cpus_per_trial", "gpus_per_trial"):
        if getattr(sweep, name) < 0:
            raise _fail(source, name, f"must be >= 0, got {getattr(sweep, name)}")
    if sweep.test_episodes is not None and sweep.test_episodes < 1:
        raise _fail(source, "test_episodes", "must be >= 1 (or null for the whole split)")
    sweep.distill = _check_section(DistillConfig, sweep.distill, "distill", DISTILL_SET_BY_SWEEP, source)
    if sweep.distill.get("workers", 1) < 1:
        raise _fail(source, "distill.workers", "must be >= 1 in a sweep: workers 0 runs Ray Train's local mode in "
                    "the calling process, which Ray Train refuses inside a Tune trial")
    sweep.prune = _check_section(PruneConfig, sweep.prune, "prune", PRUNE_SET_BY_SWEEP, source)
    sweep.evaluate = _check_section(EvalConfig, sweep.evaluate, "evaluate", EVAL_SET_BY_SWEEP, source)
    sweep.rollout = _check_section(RolloutConfig, sweep.rollout, "rollout", ROLLOUT_SET_BY_SWEEP, source)
    if sweep.teacher_sft is not None:
        sweep.teacher_sft = _check_section(SFTConfig, sweep.teacher_sft, "teacher_sft", SFT_SET_BY_SWEEP, source)

    # the search space
    if isinstance(sweep.space, dict):
        sweep.space = dict(sweep.space)
    elif sweep.search != "grid":
        raise _fail(source, "space", "a list of spaces (a union of grids) needs search: grid")
    for i, space in enumerate(spaces(sweep)):
        check_space(space, sweep, "space" if isinstance(sweep.space, dict) else f"space[{i}]", source)

    # data, teacher, tokenizer
    if isinstance(sweep.trajectories, dict):
        missing = [e for e in sweep.envs if e not in sweep.trajectories]
        if missing:
            raise _fail(source, "trajectories", f"no file for env(s) {', '.join(missing)}")
    elif isinstance(sweep.trajectories, str) and len(sweep.envs) > 1:
        raise _fail(source, "trajectories", "several envs need {env: file}")
    if sweep.trajectories is not None and sweep.rollout:
        raise _fail(source, "rollout", "give trajectories or a rollout section, not both")
    if sweep.teacher and sweep.teacher_sft is not None:
        raise _fail(source, "teacher_sft", "give a teacher directory or teacher_sft, not both")
    policy = sweep.rollout.get("policy", "expert")
    if sweep.trajectories is None and policy != "expert" and not (sweep.rollout.get("model") or sweep.teacher):
        raise _fail(source, "rollout.model", f"rollout policy {policy} needs a model (or a top-level teacher)")
    if sweep.teacher_sft is not None and policy != "expert":
        raise _fail(source, "teacher_sft", "the teacher is fine-tuned on the rollout's trajectories, so the rollout "
                    "must be the expert's (rollout.policy: expert)")
    has_teacher = bool(sweep.teacher) or sweep.teacher_sft is not None
    if sweep.online_teacher and not has_teacher:
        raise _fail(source, "online_teacher", "needs teacher (an HF directory) or teacher_sft")
    flat = [m for m in sweep_methods(sweep) if DISTILL_METHODS[m].flat]
    if flat and not has_teacher:
        raise _fail(source, "space.method", f"{', '.join(flat)} distils observation tokens too, from the online "
                    "teacher: set teacher (an HF directory) or teacher_sft")
    kd = kd_methods(sweep)
    stored_topk = sweep.trajectories is not None or sweep.rollout.get("topk", 0) > 0
    if kd and not sweep.online_teacher and not stored_topk:
        raise _fail(source, "space.method", f"{', '.join(kd)} need a teacher signal: online_teacher: true with "
                    "a teacher, trajectories with stored top-k, or rollout.topk > 0")

    # chunks and ASHA
    if sweep.chunks > 1:
        steps = min(int(v) for space in spaces(sweep)
                    for v in axis_values("max_steps", space.get("max_steps", sweep.distill.get("max_steps", 0))))
        if steps < sweep.chunks:
            raise _fail(source, "chunks", f"chunks need distill.max_steps >= chunks (got max_steps {steps}): "
                        "the steps are what is cut into chunks")
    if sweep.asha and sweep.valid_episodes == 0:
        raise _fail(source, "asha", "ASHA stops on valid/success_rate: set valid_episodes > 0")
    if sweep.asha and sweep.chunks < 2:
        raise _fail(source, "asha", "with chunks: 1 a trial reports once and ASHA has nothing to stop; "
                    "set chunks >= 2")


def kd_methods(sweep: SweepConfig) -> list[str]:
    """The sweep's methods that distil from the stored or online teacher signal (sad, token_kd): not sft, and not
    flat_kd (always from the online teacher: no top-k is stored at observation tokens)."""
    return [m for m in sweep_methods(sweep) if DISTILL_METHODS[m].uses_teacher and not DISTILL_METHODS[m].flat]


def sweep_methods(sweep: SweepConfig) -> list[str]:
    methods = [m for space in spaces(sweep)
               for m in axis_values("method", space.get("method", sweep.distill.get("method", "sad")))]
    return list(dict.fromkeys(methods))


def check_stored_topk(sweep: SweepConfig) -> None:
    """Pre-flight, before Ray or any trial starts: KD methods without an online teacher learn from the top-k
    stored in the trajectories, so a file that stores none would fail every such trial. Raises distill's own
    message (check_teacher_signal) naming the file. A file with top-k is read only up to its first such turn."""
    from types import SimpleNamespace

    from raysad.data import check_teacher_signal
    from raysad.trajectory import read_trajectories

    kd = kd_methods(sweep)
    if not kd or sweep.online_teacher or sweep.trajectories is None:
        return
    files = ({sweep.envs[0]: sweep.trajectories} if isinstance(sweep.trajectories, str)
             else {env: sweep.trajectories[env] for env in sweep.envs})
    for env, path in files.items():
        path = str(Path(path).expanduser().resolve())
        if not Path(path).is_file():
            raise ConfigError(f"trajectories for {env}: {path}: file not found")
        if any(turn.topk_ids for traj in read_trajectories(path) for turn in traj.turns):
            continue
        try:  # no example has a top-k row: distill's check says so, naming the file
            check_teacher_signal(None, SimpleNamespace(method=kd[0], teacher=None, trajectories=path))
        except ValueError as err:
            raise ConfigError(f"sweep {sweep.name!r} (method {', '.join(kd)}, online_teacher: false): {err}; "
                              "in a sweep: online_teacher: true with a teacher") from None


def spaces(sweep: SweepConfig) -> list[dict]:
    """The sweep's search space(s): `space` is one mapping, or a list of them (grid: the union of their grids)."""
    return [sweep.space] if isinstance(sweep.space, dict) else list(sweep.space)


def check_space(space: Any, sweep: SweepConfig, prefix: str, source: str) -> None:
    """Axes, ranges and every listed value of one search space."""
    from raysad.config import _coerce

    if not isinstance(space, dict):
        raise _fail(source, prefix, f"expected a mapping of axis: values, got {space!r}")
    hints = _distill_hints()
    allowed = {"student", "prune_ratio"} | (set(hints) - set(DISTILL_SET_BY_SWEEP))
    for axis, spec in space.items():
        where = f"{prefix}.{axis}"
        if axis not in allowed:
            raise _fail(source, where, "not a search axis; axes: student, prune_ratio, "
                        + ", ".join(sorted(allowed - {"student", "prune_ratio"})))
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in RANGES:
                raise _fail(source, where, f"a range is one of {{{'|'.join(RANGES)}: [...]}}, got {spec!r}")
            kind, bounds = next(iter(spec.items()))
            if kind != "choice" and sweep.search == "grid":
                raise _fail(source, where, f"a {kind} range needs search: random or optuna (grid takes lists)")
            if kind != "choice" and (not isinstance(bounds, list) or len(bounds) != 2):
                raise _fail(source, where, f"{kind} takes [low, high], got {bounds!r}")
            if kind == "loguniform" and min(bounds) <= 0:
                raise _fail(source, where, "loguniform bounds must be > 0")
        values = axis_values(axis, spec)
        if not values:
            raise _fail(source, where, "empty list")
        for j, value in enumerate(values):
            at = f"{source}: field '{where}[{j}]'"
            if axis == "student":
                check_student_spec(str(value), sweep, f"{where}[{j}]", source)
            elif axis == "prune_ratio":
                if _coerce(value, float, at) < 0 or float(value) >= 1:
                    raise _fail(source, f"{where}[{j}]", f"a pruning ratio is in [0, 1), got {value!r}")
            else:
                _coerce(value, hints[axis], at)
        if axis == "method":
            bad = [m for m in values if m not in DISTILL_METHODS]
            if bad:
                raise _fail(source, where, f"methods are {', '.join(DISTILL_METHODS)}; got {bad}")
    if "student" not in space:
        raise _fail(source, f"{prefix}.student", "name the student(s): tiny-1m, tiny-5m, tiny-20m, "
                    "derive:keep_every=2 or an HF directory")


def check_student_spec(spec: str, sweep: SweepConfig, where: str, source: str) -> None:
    from raysad import models

    if spec in models.TINY_SIZES:
        return
    if spec.startswith("derive:"):
        if not (sweep.teacher or sweep.teacher_sft is not None):
            raise _fail(source, where, f"{spec!r} is cut from the teacher: set teacher (or teacher_sft)")
        try:
            models.parse_derive_spec(spec)
        except ValueError as err:
            raise _fail(source, where, str(err)) from None
        return
    if not re.search(r"[/\\]", spec):  # not a size name, not derive:, not a path: most likely a typo
        raise _fail(source, where, f"{spec!r}: neither a tiny size ({', '.join(models.TINY_SIZES)}), "
                    "derive:keep_every=K or derive:first=A,last=B [,width_factor=F], nor a path to an HF model directory")


def student_size(spec: str) -> str:
    """The `student_size` param of a student spec: the tiny name, 'derived-k2[-w0.5]' (models.derive_name), or the
    directory name."""
    from raysad import models

    if spec in models.TINY_SIZES:
        return spec
    if spec.startswith("derive:"):
        return f"derived-{models.derive_name(models.parse_derive_spec(spec))}"
    return Path(spec).name


# ----------------------------------------------------------------------------------- the search space ----
def grid_points(sweep: SweepConfig) -> list[dict]:
    """Every trial config of a grid sweep: the product of each space's lists (with env), spaces one after another."""
    import itertools

    points = []
    for space in spaces(sweep):
        axes = {"env": list(sweep.envs), **space}
        lists = [axis_values(a, v) if not isinstance(v, dict) else list(v["choice"]) for a, v in axes.items()]
        points += [dict(zip(axes, combo)) for combo in itertools.product(*lists)]
    return points


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space. grid: one grid_search over the configs of grid_points (so a list of spaces is their
    union); random/optuna: lists are choices, ranges samplers, scalars fixed."""
    from ray import tune

    if sweep.search == "grid":
        return {"params": tune.grid_search(grid_points(sweep))}
    samplers = {"uniform": lambda b: tune.uniform(*b), "loguniform": lambda b: tune.loguniform(*b),
                "randint": lambda b: tune.randint(b[0], b[1] + 1), "choice": tune.choice}
    space: dict[str, Any] = {}
    for axis, spec in {"env": list(sweep.envs), **sweep.space}.items():
        if isinstance(spec, dict):
            kind, bounds = next(iter(spec.items()))
            space[axis] = samplers[kind](bounds)
        elif isinstance(spec, (list, tuple)):
            space[axis] = tune.choice(list(spec))
        else:
            space[axis] = spec
    return space


def tune_metric(sweep: SweepConfig) -> str:
    return "valid/success_rate" if sweep.valid_episodes else names.M_SUCCESS


# ------------------------------------------------------------------------------------- shared inputs ----
def _say(text: str) -> None:
    from raysad import ui

    ui.console().print(f"[cyan]tune[/cyan] {text}")


def prepare_inputs(sweep: SweepConfig, sweep_dir: Path, uri: str) -> dict[str, Any]:
    """Everything the trials share, made once (and reused by a resumed sweep): trajectories per env, the
    teacher, the tokenizer and derived students. Returns absolute paths."""
    from raysad import models

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
                teacher_model = models.load_model(teacher, device="cpu")
                derived = models.derive_student(teacher_model, **models.parse_derive_spec(spec))
                derived.save_pretrained(out)
                models.save_tokenizer(models.load_tokenizer(teacher), out)
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
    from raysad.trajectory import TrajectoryWriter, read_trajectories

    merged = data_dir / "all.train.jsonl"
    if not merged.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        with TrajectoryWriter(merged) as out:
            for path in trajectories.values():
                for traj in read_trajectories(path):
                    out.write(traj)
    return str(merged)


# ------------------------------------------------------------------------------------------ a trial ----
def trial_params(config: dict, sweep: SweepConfig) -> dict[str, Any]:
    """The distill settings of one trial: the sweep's `distill:` section, then the trial's axes."""
    return {**sweep.distill, **{k: v for k, v in config.items() if k not in ("student", "prune_ratio", "env")}}


def trial_distill_config(config: dict, sweep: SweepConfig, inputs: dict, work: Path):
    from raysad.distill import DistillConfig

    spec = str(config["student"])
    online = sweep.online_teacher or DISTILL_METHODS[config.get("method", sweep.distill.get("method", "sad"))].flat
    teacher = inputs["teacher"] if online else None
    return DistillConfig(**trial_params(config, sweep), trajectories=inputs["trajectories"][config["env"]],
                         student=inputs["students"][spec], teacher=teacher, tokenizer=inputs["tokenizer"],
                         out=str(work / "student"), experiment=inputs["experiment"],
                         tracking_uri=inputs["tracking_uri"], resume=True)


def chunk_config(dcfg, chunk: int, chunks: int, student: str, out: Path):
    """The DistillConfig of chunk `chunk`: its share of max_steps, its piece of the run's LR schedule."""
    from raysad.train_loop import lr_at

    if chunks == 1:
        return dataclasses.replace(dcfg, student=student, out=str(out))
    total = dcfg.max_steps
    start, end = total * chunk // chunks, total * (chunk + 1) // chunks
    steps = end - start
    lr_end = lr_at(end - 1, total, dcfg)
    if dcfg.schedule == "constant":
        lr, schedule, ratio = dcfg.lr, "constant", dcfg.min_lr_ratio
    else:  # linear from the run's LR at the chunk's first step to (at its last step) the run's LR there
        lr = dcfg.lr if chunk == 0 else lr_at(start, total, dcfg)
        warmup = min(dcfg.warmup_steps, steps - 1) if chunk == 0 else 0
        n = steps - warmup  # distill's linear schedule reaches lr·(r + (1 - r)/n) at the last step
        target = lr_end / lr if lr > 0 else 1.0
        schedule, ratio = "linear", min(1.0, max(0.0, (target - 1 / n) / (1 - 1 / n))) if n > 1 else target
    return dataclasses.replace(
        dcfg, student=student, out=str(out), max_steps=steps, epochs=max(dcfg.epochs, 1), lr=lr,
        schedule=schedule, min_lr_ratio=ratio, warmup_steps=min(dcfg.warmup_steps, steps - 1) if chunk == 0 else 0,
        seed=dcfg.seed if chunk == 0 else dcfg.seed * 1000 + chunk)


def _events(work: Path, event: str, **fields: Any) -> None:
    """work/events.jsonl: what ran in this trial, when (a resumed trial shows what it did not redo)."""
    with open(work / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def _evaluate(sweep: SweepConfig, inputs: dict, env: str, split: str, model: str, episodes: int | None,
              out: Path, student: dict[str, str]) -> dict[str, float]:
    from raysad.evaluate import EvalConfig, run_evaluate

    cfg = EvalConfig(**{"seed": 0, **sweep.evaluate}, env=env, split=split, episodes=episodes, policy="hf",
                     model=model, out=str(out), method=student.get(names.P_METHOD),
                     student_size=student.get(names.P_STUDENT_SIZE), experiment=inputs["experiment"],
                     tracking_uri=inputs["tracking_uri"])
    # A Tune trial's placement group captures the actors its process creates; the evaluation's engine and env
    # actors reserve their own resources, so the evaluation runs as a task outside that placement group.
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0)(run_evaluate).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    metrics = ray.get(task.remote(cfg, progress=False, track=False))
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _log_curve(client, run_id: str, rows: list[dict], offset: int) -> None:
    """train_log.jsonl rows as distill/* metrics at global steps (one batched call per 1000 values)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(f"distill/{k}", float(v), now, offset + int(row["step"]))
             for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def _plot_trial(client, run_id: str, path: Path) -> Path | None:
    """The trial's curves: reason/act loss by step, and valid success after each chunk."""
    from raysad.report import _pyplot, _save, metric_history

    curves = {k: metric_history(client, run_id, k) for k in (names.CURVE_REASON, names.CURVE_ACT,
                                                              "valid/success_rate")}
    if not any(curves.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in (names.CURVE_REASON, names.CURVE_ACT):
        if curves[key]:
            axes[0].plot(*zip(*curves[key]), label=key, linewidth=1.2)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    if curves["valid/success_rate"]:
        axes[1].plot(*zip(*curves["valid/success_rate"]), marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_title("valid/success_rate")
    return _save(fig, path)


def run_trial(config: dict, sweep: dict, inputs: dict, parent_run_id: str | None) -> None:
    """One trial (Tune function trainable): distill in chunks (valid evaluation and a Tune report after each),
    prune, evaluate on the test split; everything logged to the trial's MLflow run."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from raysad.distill import run_params

    sweep = SweepConfig(**sweep)
    config = config.get("params", config)  # grid sweeps put the whole trial config under "params"
    trial_id = tune.get_context().get_trial_id()
    work = Path(inputs["sweep_dir"]) / "trials" / trial_id
    work.mkdir(parents=True, exist_ok=True)
    state = {"chunk": 0, "step": 0, "valid": {}}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / "state.json").read_text())
    spec = str(config["student"])
    dcfg = trial_distill_config(config, sweep, inputs, work)
    prune_ratio = float(config.get("prune_ratio", 0.0))
    student = {**names.student_labels(dcfg), names.P_STUDENT_SIZE: student_size(spec),
               names.P_PRUNE_RATIO: prune_ratio, names.P_ENV: config["env"]}
    params = {**student, "lr": dcfg.lr, "temperature": dcfg.temperature, "student": spec, "trial_id": trial_id,
              "sweep": sweep.name, "chunks": sweep.chunks,
              **{f"distill.{k}": v for k, v in run_params(dcfg).items() if v is not None}}
    tags = {names.STAGE_TAG: "trial", "sweep": sweep.name, "trial_id": trial_id, "method": student[names.P_METHOD],
            "student_size": student_size(spec), "env": config["env"]}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
        tags["sweep_run_id"] = parent_run_id

    client = MlflowClient(inputs["tracking_uri"])
    with _mlflow_run(work / "mlflow_run_id", inputs["experiment"], inputs["tracking_uri"],
                     f"{student[names.P_METHOD]}-{student_size(spec)}-{trial_id}", params, tags) as run:
        _trial_body(sweep, inputs, config, dcfg, student, prune_ratio, state, work, client, run.info.run_id)


def _mlflow_run(id_file: Path, experiment: str, uri: str, name: str, params: dict, tags: dict):
    """A new MLflow run whose id is kept in `id_file`, or, when that file exists (a resumed sweep or a retried
    trial), the same run reopened. Ended FINISHED, or FAILED if the body raises."""
    import mlflow

    from raysad import tracking

    mlflow.set_tracking_uri(uri)
    if id_file.is_file():
        mlflow.set_experiment(experiment)
        return mlflow.start_run(run_id=id_file.read_text().strip(), nested=mlflow.active_run() is not None)

    @contextlib.contextmanager
    def new_run():
        with tracking.start_run(experiment, name, params, tags=tags, uri=uri) as run:
            id_file.write_text(run.info.run_id)
            yield run
    return new_run()


def _trial_body(sweep, inputs, config, dcfg, student, prune_ratio, state, work, client, run_id) -> None:
    import mlflow

    from raysad import tracking
    from raysad.distill import run_distill

    env = config["env"]
    model = state.get("model") or dcfg.student
    for chunk in range(state["chunk"], sweep.chunks):
        out = work / (f"student_chunk{chunk}" if sweep.chunks > 1 else "student")
        ccfg = chunk_config(dcfg, chunk, sweep.chunks, model, out)
        _events(work, "distill", chunk=chunk, steps=ccfg.max_steps)
        result = run_distill(ccfg, track=False)
        _log_curve(client, run_id, result.log, state["step"])
        state["step"] += result.steps
        tracking.log_metrics({k: v for k, v in result.metrics.items()
                              if k in ("distill/train_seconds", "distill/peak_rss_mb", "distill/peak_gpu_mb")},
                             step=state["step"])
        if model != dcfg.student and Path(model).parent == work:  # the previous chunk's student is used up
            shutil.rmtree(model, ignore_errors=True)
        model = str(out)
        report: dict[str, float] = {"distill/step": state["step"], "chunk": chunk + 1,
                                    **{k: v for k, v in result.metrics.items() if k == "distill/loss"}}
        if sweep.valid_episodes:
            _events(work, "evaluate", split="valid", chunk=chunk)
            valid = _evaluate(sweep, inputs, env, "valid", model, sweep.valid_episodes, work / f"valid_chunk{chunk}",
                              student)
            state["valid"] = {k.replace("eval/", "valid/", 1): v for k, v in valid.items()}
            tracking.log_metrics(state["valid"], step=state["step"])
            report |= state["valid"]
        state.update(chunk=chunk + 1, model=model)
        if chunk + 1 < sweep.chunks:
            _report(report, state)

    final = model
    if prune_ratio > 0:
        from raysad.prune import PruneConfig, run_prune

        _events(work, "prune", ratio=prune_ratio)
        # Ray Train's in-process mode (workers 0) is refused inside Tune: recovery gets the trial's workers
        pruned = run_prune(PruneConfig(**{"trajectories": dcfg.trajectories, "seed": dcfg.seed,
                                          "recover_workers": dcfg.workers, **sweep.prune},
                                       model=model, out=str(work / "pruned"), ratio=prune_ratio,
                                       experiment=inputs["experiment"], tracking_uri=inputs["tracking_uri"]),
                           track=False, progress=False)
        tracking.log_metrics({f"prune/{k}": v for k, v in pruned.items()
                              if k in ("params_before", "params_after", "fraction_removed", "ppl_before",
                                       "ppl_after", "ppl_recovered", "seconds")})
        final = pruned["out"]
    (Path(final) / names.STUDENT_LABELS).write_text(json.dumps({k: str(v) for k, v in student.items()}, indent=2) + "\n")
    _events(work, "evaluate", split=sweep.test_split)
    metrics = _evaluate(sweep, inputs, env, sweep.test_split, final, sweep.test_episodes, work / "test", student)
    tracking.log_metrics(metrics)
    mlflow.set_tag("model_path", final)
    eval_json = work / "test" / "eval.json"
    if eval_json.is_file():
        mlflow.log_artifact(str(eval_json))
    plot = _plot_trial(client, run_id, work / "trial.png")
    if plot is not None:
        mlflow.log_artifact(str(plot))
    summary = {"trial_id": work.name, "config": config, "student": student, "model": final, **metrics}
    (work / "trial.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    mlflow.log_artifact(str(work / "trial.json"))
    _events(work, "done")
    _report({"distill/step": state["step"], "chunk": sweep.chunks, **state["valid"], **metrics, "trial_done": 1.0},
            state)


def _report(metrics: dict[str, float], state: dict) -> None:
    """tune.report with a checkpoint holding the trial's state (which chunk is done, where its student is)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "state.json").write_text(json.dumps(state))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


# ------------------------------------------------------------------------------------------ the sweep ----
def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default spells out the config: too long a path for a grid point


def _trainable(sweep: SweepConfig, inputs: dict, parent_run_id: str | None):
    from ray import tune

    fn = tune.with_parameters(run_trial, sweep=dataclasses.asdict(sweep), inputs=inputs, parent_run_id=parent_run_id)
    resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    if not sweep.cpus_per_trial and not sweep.gpus_per_trial:  # Tune refuses an empty request: a token of memory
        resources["memory"] = TRIAL_MEMORY_TOKEN
    return tune.with_resources(fn, resources)


def _settings(sweep: SweepConfig) -> dict:
    """The sweep's settings as SETTINGS_FILE holds them (secrets such as an engine's api_key redacted)."""
    from raysad.config import redact

    return redact(dataclasses.asdict(sweep))


def check_resume(sweep: SweepConfig, sweep_dir: Path) -> None:
    """A sweep resumes the Tune experiment it finds, with the grid it was started with: when this sweep's settings
    differ from those (a new space, other distill settings), resuming would silently run the old sweep, so refuse
    and say what changed. A sweep folder from before SETTINGS_FILE existed resumes unchecked."""
    from raysad.config import changed_settings

    changed = changed_settings(sweep_dir / SETTINGS_FILE, _settings(sweep), ignore=RESUME_MAY_CHANGE)
    if changed:
        raise ConfigError(f"{sweep_dir} holds sweep {sweep.name!r} started with other settings (changed: "
                          f"{', '.join(k.split(':')[0] for k in changed)}); resuming would run the old one. Rerun with "
                          "--no-resume to start it again, or give the new sweep another `name`")


def _tuner(sweep: SweepConfig, trainable, tune_dir: Path, restore: bool):
    from ray import tune

    if restore:
        _say(f"resuming the sweep in {tune_dir}")
        return tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    metric = tune_metric(sweep)
    search_alg = None
    if sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise ConfigError(f"search: optuna needs the optuna package (pip install optuna): {err}") from None
        search_alg = OptunaSearch(metric=metric, mode="max", seed=0)
    scheduler = None
    if sweep.asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.chunks,
                                  grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=metric, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials or None,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(tune_dir.parent),
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
    are; the sweep run gets the counts."""
    from raysad import tracking

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
    done = sum(t["done"] for t in trials)
    errors = sum(t["error"] is not None for t in trials)
    tracking.log_metrics({"tune/trials": len(trials), "tune/finished": done, "tune/errors": errors,
                          "tune/stopped_early": len(trials) - done - errors})
    scores = [t["metrics"].get(names.M_SUCCESS) for t in trials if t["done"]]
    if any(s is not None for s in scores):
        tracking.log_metrics({"tune/best_success_rate": max(s for s in scores if s is not None)})
    return trials


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
    if resuming:
        check_resume(sweep, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        record_settings(sweep_dir / SETTINGS_FILE, _settings(sweep))
    uri = tracking.absolute_uri(sweep.tracking_uri)
    experiment = sweep.experiment or sweep.name
    started_ray = init_ray(sweep.ray_address, sweep.num_cpus)
    try:
        with _mlflow_run(sweep_dir / PARENT_RUN_FILE, experiment, uri, f"sweep-{sweep.name}", flatten(sweep),
                         {names.STAGE_TAG: "tune", "sweep": sweep.name}) as parent:
            run_id = parent.info.run_id
            inputs = prepare_inputs(sweep, sweep_dir, uri)
            tuner = _tuner(sweep, _trainable(sweep, inputs, run_id), tune_dir, resuming)
            _say(f"sweep {sweep.name!r}: trials in {sweep_dir / 'trials'}, MLflow experiment {experiment!r} at {uri}")
            trials = _summarize(tuner.fit(), sweep_dir)
            # Tune catches Ctrl-C / SIGINT itself: fit() returns with trials neither finished nor errored
            interrupted = any(t["status"] in ("PENDING", "RUNNING", "PAUSED") for t in trials)
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
    finally:
        if started_ray:
            ray.shutdown()
    result = SweepResult(sweep_dir=sweep_dir, run_id=run_id, trials=trials, table=table, wall_s=wall,
                         interrupted=interrupted)
    say_failures(result)
    return result


def say_failures(result: SweepResult) -> None:
    """One line per errored trial (its id, the last line of its error, where its logs are) on stderr, and
    one if the sweep was interrupted: what `raysad tune` exits non-zero for."""
    import sys

    for t in result.failed:
        print(f"tune: trial {t['trial_id']} failed: {t['error']} (logs: {', '.join(t['logs'])})", file=sys.stderr)
    if result.interrupted:
        unfinished = sum(t["status"] in ("PENDING", "RUNNING", "PAUSED") for t in result.trials)
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
