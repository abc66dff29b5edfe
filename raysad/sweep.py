"""A sweep file (tune_configs/*.yaml) and its checks; its search space as Ray Tune's param_space.

The file's fields are SweepConfig's below. It names the environments, where the teacher trajectories come from
(a file per env, or a `rollout:` section that makes them), the teacher (an HF directory, or `teacher_sft:` to
fine-tune a tiny one on the trajectories first) and the search `space`:
student (tiny size names, `derive:keep_every=2[,width_factor=0.5]` students cut from the teacher, or HF
directories), method (sad / token_kd / flat_kd / sft), lambda_reason, lambda_act, divergence, temperature, lr, seed,
prune_ratio, or any other DistillConfig field. A list is a grid axis (`search: grid`) or a choice (`random`,
`optuna`); `{uniform|loguniform|randint: [lo, hi]}` is a range (random / optuna only); a scalar is fixed.

raysad.tune reads the file (load_sweep) and runs the sweep; raysad.trial runs each of its trials.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raysad import report as names
from raysad.config import ConfigError
from raysad.losses import METHODS as DISTILL_METHODS

RANGES = ("uniform", "loguniform", "randint", "choice")
# DistillConfig fields a sweep sets itself (per trial): not allowed in the `distill:` section or the space
DISTILL_SET_BY_SWEEP = ("trajectories", "student", "teacher", "tokenizer", "out", "experiment", "run_name",
                        "tracking_uri", "resume", "storage", "ray_address", "num_cpus")
EVAL_SET_BY_SWEEP = ("env", "split", "episodes", "policy", "model", "out", "method", "student_size", "experiment",
                     "run_name", "tracking_uri", "ray_address", "num_cpus")
PRUNE_SET_BY_SWEEP = ("model", "out", "ratio", "experiment", "run_name", "tracking_uri")
ROLLOUT_SET_BY_SWEEP = ("env", "split", "out", "experiment", "run_name", "tracking_uri", "ray_address", "num_cpus")
SFT_SET_BY_SWEEP = ("trajectories", "out", "experiment", "run_name", "tracking_uri")
ONPOLICY_SET_BY_SWEEP = ("student", "teacher", "tokenizer", "env", "split", "out", "experiment", "run_name",
                         "tracking_uri", "ray_address", "num_cpus")


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
    onpolicy: dict[str, Any] = field(default_factory=dict)   # OnPolicyConfig fields: given, each trial (the
    #                                          space's `onpolicy: [false, true]` picks which) continues its
    #                                          distilled student on-policy with the teacher, before prune/test;
    #                                          axes `onpolicy.<field>` vary its fields per trial
    evaluate: dict[str, Any] = field(default_factory=dict)   # EvalConfig fields (max_turns, few_shot ...)
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


# ---------------------------------------------------------------------------------------- the checks ----
def _fail(source: str, name: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: field '{name}': {why}")


def _check_section(cls, values: dict, section: str, set_by_sweep: tuple, source: str) -> dict:
    """Check a section's keys and types against a stage config dataclass; returns the coerced values."""
    import typing

    from raysad.config import coerce

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
        out[key] = coerce(value, hints[key], f"{source}: field '{section}.{key}'")
    return out


def _onpolicy_hints() -> dict:
    """The OnPolicyConfig fields a sweep's `onpolicy.<field>` axes may set (the others the sweep sets itself)."""
    import typing

    from raysad.onpolicy import OnPolicyConfig

    hints = typing.get_type_hints(OnPolicyConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(OnPolicyConfig) if f.name not in ONPOLICY_SET_BY_SWEEP}


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
    _check_scalars(sweep, source)
    _check_sections(sweep, source)
    _check_spaces(sweep, source)
    _check_data_and_teacher(sweep, source)
    _check_chunks(sweep, source)


def _check_scalars(sweep: SweepConfig, source: str) -> None:
    """The name, the envs and the numbers."""
    import raysad_envs

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


def _check_sections(sweep: SweepConfig, source: str) -> None:
    """The stage sections (distill, prune, evaluate, rollout, teacher_sft) against their stage's config; each is
    replaced by its coerced values."""
    from raysad.distill import DistillConfig
    from raysad.evaluate import EvalConfig
    from raysad.prune import PruneConfig
    from raysad.rollout import RolloutConfig
    from raysad.sft import SFTConfig

    sweep.distill = _check_section(DistillConfig, sweep.distill, "distill", DISTILL_SET_BY_SWEEP, source)
    if sweep.distill.get("workers", 1) < 1:
        raise _fail(source, "distill.workers", "must be >= 1 in a sweep: workers 0 runs Ray Train's local mode in "
                    "the calling process, which Ray Train refuses inside a Tune trial")
    sweep.prune = _check_section(PruneConfig, sweep.prune, "prune", PRUNE_SET_BY_SWEEP, source)
    if sweep.onpolicy:
        from raysad.onpolicy import OnPolicyConfig

        sweep.onpolicy = _check_section(OnPolicyConfig, sweep.onpolicy, "onpolicy", ONPOLICY_SET_BY_SWEEP, source)
        if sweep.onpolicy.get("workers", 1) < 1:
            raise _fail(source, "onpolicy.workers", "must be >= 1 in a sweep (Ray Train's local mode is refused "
                        "inside a Tune trial)")
    sweep.evaluate = _check_section(EvalConfig, sweep.evaluate, "evaluate", EVAL_SET_BY_SWEEP, source)
    sweep.rollout = _check_section(RolloutConfig, sweep.rollout, "rollout", ROLLOUT_SET_BY_SWEEP, source)
    if sweep.teacher_sft is not None:
        sweep.teacher_sft = _check_section(SFTConfig, sweep.teacher_sft, "teacher_sft", SFT_SET_BY_SWEEP, source)


def _check_spaces(sweep: SweepConfig, source: str) -> None:
    """The search space: one mapping, or (grid only) a list of them."""
    if isinstance(sweep.space, dict):
        sweep.space = dict(sweep.space)
    elif sweep.search != "grid":
        raise _fail(source, "space", "a list of spaces (a union of grids) needs search: grid")
    for i, space in enumerate(spaces(sweep)):
        check_space(space, sweep, "space" if isinstance(sweep.space, dict) else f"space[{i}]", source)


def _check_data_and_teacher(sweep: SweepConfig, source: str) -> None:
    """Trajectories or a rollout, the teacher, and a teacher signal for the methods that need one."""
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
    if sweep.onpolicy and not has_teacher:
        raise _fail(source, "onpolicy", "the teacher scores the student's own tokens: set teacher (an HF "
                    "directory) or teacher_sft")
    if sweep.online_teacher and not has_teacher:
        raise _fail(source, "online_teacher", "needs teacher (an HF directory) or teacher_sft")
    flat = [m for m in sweep_methods(sweep) if DISTILL_METHODS[m].flat]
    # without a given file (read before the trials: check_stored_topk), the sweep's own rollout decides
    no_stored_context = sweep.trajectories is None and not sweep.rollout.get("context_topk")
    if flat and not has_teacher and no_stored_context:
        raise _fail(source, "space.method", f"{', '.join(flat)} distils observation tokens too: set teacher (an HF "
                    "directory) or teacher_sft for the online teacher, or rollout.context_topk: true")
    # (flat_kd with a teacher and no rows stored at observations reads the online teacher: no stored top-k needed)
    kd = [m for m in kd_methods(sweep) if not (DISTILL_METHODS[m].flat and has_teacher and no_stored_context)]
    stored_topk = sweep.trajectories is not None or sweep.rollout.get("topk", 0) > 0
    if kd and not sweep.online_teacher and not stored_topk:
        raise _fail(source, "space.method", f"{', '.join(kd)} need a teacher signal: online_teacher: true with "
                    "a teacher, trajectories with stored top-k, or rollout.topk > 0")


def _check_chunks(sweep: SweepConfig, source: str) -> None:
    """Chunks and ASHA."""
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
    """The sweep's methods that distil from the stored or online teacher signal (sad, token_kd, flat_kd): not
    sft."""
    return [m for m in sweep_methods(sweep) if DISTILL_METHODS[m].uses_teacher]


def trajectory_files(sweep: SweepConfig) -> dict[str, str]:
    """{env: the given trajectory file} ({} when the sweep rolls its teacher out itself)."""
    if sweep.trajectories is None:
        return {}
    return ({sweep.envs[0]: sweep.trajectories} if isinstance(sweep.trajectories, str)
            else {env: sweep.trajectories[env] for env in sweep.envs})


def flat_kd_online(sweep: SweepConfig, env: str) -> bool:
    """Whether flat_kd's trials read the online teacher: yes unless the env's trajectories carry the teacher's
    rows at observation tokens too (rolled out with context_topk; a given file: its first trajectory with
    generated ids and no error says, read up to there)."""
    from raysad.scoring import CONTEXT_TOPK
    from raysad.trajectory_reader import read_trajectories

    if sweep.online_teacher:
        return True
    path = trajectory_files(sweep).get(env)
    if path is None:
        return not sweep.rollout.get("context_topk", False)
    if not Path(path).expanduser().is_file():
        return True
    with read_trajectories(Path(path).expanduser()) as reader:
        first = next((t for t in reader if "error" not in t.extra and any(turn.token_ids for turn in t.turns)), None)
    return first is None or CONTEXT_TOPK not in first.extra


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
    from raysad.trajectory_reader import read_trajectories

    kd = kd_methods(sweep)
    if not kd or sweep.online_teacher or sweep.trajectories is None:
        return
    has_teacher = bool(sweep.teacher) or sweep.teacher_sft is not None
    for env, path in trajectory_files(sweep).items():
        path = str(Path(path).expanduser().resolve())
        if not Path(path).is_file():
            raise ConfigError(f"trajectories for {env}: {path}: file not found")
        stored = kd
        if any(DISTILL_METHODS[m].flat for m in kd) and flat_kd_online(sweep, env):
            if not has_teacher:
                raise ConfigError(f"sweep {sweep.name!r} (method flat_kd): {path} holds no teacher top-k at "
                                  "observation tokens (roll out with --context-topk), and the sweep has no teacher "
                                  "to distil them online: set teacher (an HF directory)")
            stored = [m for m in kd if not DISTILL_METHODS[m].flat]  # flat_kd reads the online teacher
        if not stored or any(turn.topk_ids for traj in read_trajectories(path) for turn in traj.turns):
            continue
        try:  # no example has a top-k row: distill's check says so, naming the file
            check_teacher_signal(None, SimpleNamespace(method=stored[0], teacher=None, trajectories=path))
        except ValueError as err:
            raise ConfigError(f"sweep {sweep.name!r} (method {', '.join(stored)}, online_teacher: false): {err}; "
                              "in a sweep: online_teacher: true with a teacher") from None


def spaces(sweep: SweepConfig) -> list[dict]:
    """The sweep's search space(s): `space` is one mapping, or a list of them (grid: the union of their grids)."""
    return [sweep.space] if isinstance(sweep.space, dict) else list(sweep.space)


def check_space(space: Any, sweep: SweepConfig, prefix: str, source: str) -> None:
    """Axes, ranges and every listed value of one search space."""
    from raysad.config import coerce

    if not isinstance(space, dict):
        raise _fail(source, prefix, f"expected a mapping of axis: values, got {space!r}")
    hints = _distill_hints()
    allowed = {"student", "prune_ratio", "distill"} | (set(hints) - set(DISTILL_SET_BY_SWEEP))
    onpolicy_hints = _onpolicy_hints() if sweep.onpolicy else {}
    allowed |= {"onpolicy"} | {f"onpolicy.{f}" for f in onpolicy_hints} if sweep.onpolicy else set()
    for axis, spec in space.items():
        where = f"{prefix}.{axis}"
        if axis not in allowed:
            raise _fail(source, where, "not a search axis; axes: student, prune_ratio, distill, "
                        + ("onpolicy, onpolicy.<field>, " if sweep.onpolicy else "")
                        + ", ".join(sorted(a for a in allowed - {"student", "prune_ratio", "distill", "onpolicy"}
                                           if not a.startswith("onpolicy."))))
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
                if coerce(value, float, at) < 0 or float(value) >= 1:
                    raise _fail(source, f"{where}[{j}]", f"a pruning ratio is in [0, 1), got {value!r}")
            elif axis in ("onpolicy", "distill"):  # distill false: the student as given goes on (on-policy, test)
                coerce(value, bool, at)
            elif axis.startswith("onpolicy."):
                coerce(value, onpolicy_hints[axis.partition(".")[2]], at)
            else:
                coerce(value, hints[axis], at)
        if axis == "method":
            bad = [m for m in values if m not in DISTILL_METHODS]
            if bad:
                raise _fail(source, where, f"methods are {', '.join(DISTILL_METHODS)}; got {bad}")
    if "student" not in space:
        raise _fail(source, f"{prefix}.student", "name the student(s): tiny-1m, tiny-5m, tiny-20m, "
                    "derive:keep_every=2 or an HF directory")
    from raysad import models

    if "distill" in space and not all(coerce(v, bool, "distill") for v in axis_values("distill", space["distill"])):
        tiny = [v for v in axis_values("student", space["student"]) if v in models.TINY_SIZES]
        if tiny:
            raise _fail(source, f"{prefix}.distill", f"false takes the student as given, and {tiny[0]} is a size to "
                        "build and train: give an HF directory (or derive:...)")


def check_student_spec(spec: str, sweep: SweepConfig, where: str, source: str) -> None:
    from raysad import models, students

    if spec in models.TINY_SIZES:
        return
    if spec.startswith("derive:"):
        if not (sweep.teacher or sweep.teacher_sft is not None):
            raise _fail(source, where, f"{spec!r} is cut from the teacher: set teacher (or teacher_sft)")
        try:
            students.parse_derive_spec(spec)
        except ValueError as err:
            raise _fail(source, where, str(err)) from None
        return
    if not re.search(r"[/\\]", spec):  # not a size name, not derive:, not a path: most likely a typo
        raise _fail(source, where, f"{spec!r}: neither a tiny size ({', '.join(models.TINY_SIZES)}), "
                    "derive:keep_every=K or derive:first=A,last=B [,width_factor=F], nor a path to an HF model directory")


def student_size(spec: str) -> str:
    """The `student_size` param of a student spec: the tiny name, 'derived-k2[-w0.5]' (students.derive_name), or the
    directory name."""
    from raysad import models, students

    if spec in models.TINY_SIZES:
        return spec
    if spec.startswith("derive:"):
        return f"derived-{students.derive_name(students.parse_derive_spec(spec))}"
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


def trial_count(sweep: SweepConfig) -> int:
    """How many trials the sweep runs in all (Tune creates them as it goes: an interrupted fit knows fewer)."""
    return sweep.num_samples * (len(grid_points(sweep)) if sweep.search == "grid" else 1)


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


def search_algorithm(sweep: SweepConfig, metric: str):
    """Tune's search_alg: OptunaSearch for `search: optuna`, else None (Tune's own grid / random search)."""
    if sweep.search != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:
        raise ConfigError(f"search: optuna needs the optuna package (pip install optuna): {err}") from None
    return OptunaSearch(metric=metric, mode="max", seed=0)


def tune_metric(sweep: SweepConfig) -> str:
    return "valid/success_rate" if sweep.valid_episodes else names.M_SUCCESS
