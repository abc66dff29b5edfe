"""One trial of a sweep: a Ray Tune function trainable (raysad.tune runs the sweep, raysad.sweep reads its file).

Where it runs: the trial reserves only its own driver's resources (cpus/gpus_per_trial: pruning runs here), as
Ray Train V2 inside Tune wants it: run_distill launches its TorchTrainer from the trial and its `workers` reserve
their own CPUs/GPUs; evaluation's engine and env actors (raysad.evaluate on the rollout pool) reserve theirs. So
on a small CPU box, give trials cpus_per_trial 0 and max_concurrent_trials 1: the evaluation engine asks for
every CPU of the cluster.

What it does: distill in `chunks` of steps -> after each chunk evaluate on the valid split and report
`valid/success_rate` to Tune (ASHA stops weak trials there) -> optional prune -> evaluate on the test split
(`eval/*`, the metrics `raysad report` reads). With chunks = 1 there is one report per trial, so ASHA has
nothing to stop early: use chunks >= 2 with asha.
Chunks: a chunk continues from the previous chunk's student with a fresh optimizer; its learning rate runs
linearly along the whole run's schedule (warm-up in the first chunk only) and its data order is reseeded, so
the chunks together approximate one run of distill.max_steps steps.

MLflow: the trial's run is nested under the sweep's (tags stage=trial, sweep, method, student_size, env) with
the report's params (docs/metrics.md), the distill config as distill.* params, per-step `distill/*` curves,
`valid/*` after each chunk, `prune/*`, the test `eval/*`, and artifacts eval.json, the trial's plot and
trial.json. The stages run untracked inside a trial (track=False): the trial run holds everything, so
`raysad report --experiment NAME` has one row per trial.

Resume: a trial cut short continues from its last finished chunk (Tune checkpoint) and inside the chunk from
distill's own checkpoint; its MLflow run is reopened. A trial that finished just before the driver died (Tune
had not recorded it) redoes nothing: it reports its final_report.json again (event `reported_again`).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from raysad import report as names
from raysad.config import coerce, write_json
from raysad.losses import METHODS as DISTILL_METHODS
from raysad.sweep import SweepConfig, flat_kd_online, student_size

TRIAL_MEMORY_TOKEN = 2**20                 # bytes a trial with cpus/gpus_per_trial 0 reserves instead
FINAL_REPORT = "final_report.json"         # a finished trial's last Tune report: a resumed trial sends it again


def trainable(sweep: SweepConfig, inputs: dict, parent_run_id: str | None):
    """run_trial bound to the sweep, its shared inputs and its MLflow run, with the trial's resources."""
    from ray import tune

    fn = tune.with_parameters(run_trial, sweep=dataclasses.asdict(sweep), inputs=inputs, parent_run_id=parent_run_id)
    resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    if not sweep.cpus_per_trial and not sweep.gpus_per_trial:  # Tune refuses an empty request: a token of memory
        resources["memory"] = TRIAL_MEMORY_TOKEN
    return tune.with_resources(fn, resources)


def trial_params(config: dict, sweep: SweepConfig) -> dict[str, Any]:
    """The distill settings of one trial: the sweep's `distill:` section, then the trial's axes."""
    return {**sweep.distill, **{k: v for k, v in config.items()
                                if k not in ("student", "prune_ratio", "env", "distill", "onpolicy")
                                and not k.startswith("onpolicy.")}}


def onpolicy_config(config: dict, sweep: SweepConfig, inputs: dict, dcfg, work: Path):
    """The trial's on-policy stage (None: off): the sweep's `onpolicy:` section with the trial's `onpolicy.<field>`
    axes on the distilled student, with the sweep's teacher, unless the trial's `onpolicy` axis says false."""
    from raysad.onpolicy import OnPolicyConfig

    if not sweep.onpolicy or not coerce(config.get("onpolicy", True), bool, "onpolicy"):
        return None
    axes = {k.partition(".")[2]: v for k, v in config.items() if k.startswith("onpolicy.")}
    # the sweep's teacher trajectories, unless the section names others: the off-policy examples a teacher_share
    # mixes in, and where b2f's depth curriculum starts (the teacher's median episode length)
    settings = {"seed": dcfg.seed, "teacher_trajectories": inputs["trajectories"][config["env"]], **sweep.onpolicy,
                **axes}
    return OnPolicyConfig(**settings, env=config["env"], student=dcfg.out,
                          teacher=inputs["teacher"], out=str(work / "onpolicy"), experiment=inputs["experiment"],
                          tracking_uri=inputs["tracking_uri"])


def trial_distill_config(config: dict, sweep: SweepConfig, inputs: dict, work: Path):
    from raysad.distill import DistillConfig

    spec = str(config["student"])
    method = config.get("method", sweep.distill.get("method", "sad"))
    online = sweep.online_teacher or (DISTILL_METHODS[method].flat and flat_kd_online(sweep, config["env"]))
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
    metrics = _outside_trial_group(run_evaluate, cfg, progress=False, track=False)
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
    from raysad.plots import pyplot, save
    from raysad.report import metric_history

    curves = {k: metric_history(client, run_id, k) for k in (names.CURVE_REASON, names.CURVE_ACT,
                                                              "valid/success_rate")}
    if not any(curves.values()):
        return None
    plt = pyplot()
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
    return save(fig, path)


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
    ocfg = onpolicy_config(config, sweep, inputs, dcfg, work)
    student = {**names.student_labels(dcfg, ocfg), names.P_STUDENT_SIZE: student_size(spec),
               names.P_PRUNE_RATIO: prune_ratio, names.P_ENV: config["env"]}
    distilled = coerce(config.get("distill", True), bool, "distill")
    params = {**student, "lr": dcfg.lr, "temperature": dcfg.temperature, "student": spec, "trial_id": trial_id,
              "sweep": sweep.name, "chunks": sweep.chunks, "distill": distilled,
              **({f"distill.{k}": v for k, v in run_params(dcfg).items() if v is not None} if distilled else {}),
              **({f"onpolicy.{k}": v for k, v in run_params(ocfg).items() if k in sweep.onpolicy
                  or f"onpolicy.{k}" in config} if ocfg else {})}
    tags = {names.STAGE_TAG: "trial", "sweep": sweep.name, "trial_id": trial_id, "method": student[names.P_METHOD],
            "student_size": student_size(spec), "env": config["env"]}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
        tags["sweep_run_id"] = parent_run_id

    from raysad import tracking

    client = MlflowClient(inputs["tracking_uri"])
    with tracking.resumable_run(work / "mlflow_run_id", inputs["experiment"], inputs["tracking_uri"],
                                f"{student[names.P_METHOD]}-{student_size(spec)}-{trial_id}", params, tags) as run:
        _trial_body(sweep, inputs, config, dcfg, ocfg, student, prune_ratio, state, work, client, run.info.run_id)


def _trial_body(sweep, inputs, config, dcfg, ocfg, student, prune_ratio, state, work, client, run_id) -> None:
    """Distill in chunks, prune, evaluate on the test split; log it all to the trial's run and report to Tune."""
    import mlflow

    from raysad import tracking

    finished = work / FINAL_REPORT
    if finished.is_file():  # done before the sweep's driver died, but Tune had not recorded it: report it again
        _events(work, "reported_again")
        _report(json.loads(finished.read_text()), state)
        return
    env = config["env"]
    if coerce(config.get("distill", True), bool, "distill"):
        model = _distill_chunks(sweep, inputs, env, dcfg, student, state, work, client, run_id)
    else:  # the student as given goes on (e.g. on-policy from an already distilled student)
        model = dcfg.student
        _events(work, "distill_skipped")
    if ocfg is not None:
        model = _onpolicy(dataclasses.replace(ocfg, student=model), work, state)
    final = _prune(sweep, inputs, dcfg, model, prune_ratio, work) if prune_ratio > 0 else model
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
    final_report = {"distill/step": state["step"], "chunk": sweep.chunks, **state["valid"], **metrics,
                    "trial_done": 1.0}
    write_json(work / FINAL_REPORT, final_report)
    _events(work, "done")
    _report(final_report, state)


def _distill_chunks(sweep, inputs, env, dcfg, student, state, work, client, run_id) -> str:
    """The chunks `state` has not done yet, each followed by its valid evaluation and (but the last) a Tune
    report; returns the last chunk's student."""
    from raysad import tracking
    from raysad.distill import run_distill

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
    return model


def _outside_trial_group(fn, *args, **kwargs):
    """fn(*args, **kwargs) as a Ray task outside the trial's placement group, which captures the actors its
    process creates: a stage whose engine/env actors and Train workers reserve their own resources."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0)(fn).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(*args, **kwargs))


def _onpolicy(ocfg, work: Path, state: dict) -> str:
    """The on-policy stage on the distilled student (it resumes per iteration on its own); its per-iteration
    onpolicy/* metrics go to the trial's run at steps after distill's. Returns its last student."""
    from raysad import tracking
    from raysad.onpolicy import run_onpolicy

    _events(work, "onpolicy", iterations=ocfg.iterations)
    result = _outside_trial_group(run_onpolicy, ocfg, track=False, progress=False)
    for k, metrics in enumerate(result.iterations):
        tracking.log_metrics(metrics, step=state["step"] + k)
    return str(result.student)


def _prune(sweep, inputs, dcfg, model: str, ratio: float, work: Path) -> str:
    """Prune the distilled student by `ratio` (with recovery); returns the pruned model's folder."""
    from raysad import tracking
    from raysad.prune import PruneConfig, run_prune

    _events(work, "prune", ratio=ratio)
    # Ray Train's in-process mode (workers 0) is refused inside Tune: recovery gets the trial's workers
    pruned = run_prune(PruneConfig(**{"trajectories": dcfg.trajectories, "seed": dcfg.seed,
                                      "recover_workers": dcfg.workers, **sweep.prune},
                                   model=model, out=str(work / "pruned"), ratio=ratio,
                                   experiment=inputs["experiment"], tracking_uri=inputs["tracking_uri"]),
                       track=False, progress=False)
    tracking.log_metrics({f"prune/{k}": v for k, v in pruned.items()
                          if k in ("params_before", "params_after", "fraction_removed", "ppl_before",
                                   "ppl_after", "ppl_recovered", "seconds")})
    return pruned["out"]


def _report(metrics: dict[str, float], state: dict) -> None:
    """tune.report with a checkpoint holding the trial's state (which chunk is done, where its student is)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "state.json").write_text(json.dumps(state))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

