"""Distillation stage: train a student from teacher trajectories on Ray Train (`raysad distill`).

    from raysad.distill import DistillConfig, run_distill
    result = run_distill(DistillConfig(trajectories="trajs.jsonl", student="tiny-5m", tokenizer="runs/teacher",
                                       method="sad", lambda_reason=1.0, lambda_act=2.0, workers=2))
    result.out, result.metrics

The driver checks everything, has Ray Data encode the trajectories on the cluster (raysad.data: the
driver keeps per-example token counts, never the examples), plans every step's global batch and starts a
TorchTrainer; each worker (raysad.train_worker) restores its checkpoint, reads its own stream of examples
and runs raysad.train_loop.train (plain torch: the step, DDP/FSDP, checkpoint state), the method's loss looked up in
raysad.losses.METHODS.

Methods: `sad` (λ_r·KD over [REASON] tokens + λ_a·KD over [ACT] tokens), `token_kd` (one KD over
reason ∪ act tokens), `flat_kd` (one KD over every token after the prompt, observations included: the
trajectory as a flat sequence, the paper's token-KD baseline as described; needs an online --teacher, since
stored top-k exists only at generated tokens), `sft` (cross-entropy on the teacher's tokens: imitation learning). `ce_weight` adds
CE to the KD methods. The CE on reason ∪ act is always logged (it is the teacher-token NLL).

Workers: `workers >= 1` runs a Ray Train TorchTrainer (DDP by default, FSDP2 `fully_shard` with
strategy=fsdp); `workers = 0` encodes the data into a list in this process and runs the same loop here (Ray
Train's local mode: no cluster, no fault tolerance; checkpoints and --resume still work).
Checkpoints (model, optimizer, step) go to `<storage>/<run>/checkpoint_<step>` every `checkpoint_every`
steps and at the end; a run started again with the same --out continues from the last one (the batch
sequence is a pure function of data + config, `step_batches`), and a worker that dies is replaced and
training continues from the last checkpoint (`max_failures`). Random numbers are reseeded per step from
(seed, step, rank), so a resumed run draws the same ones without saving RNG state.
The final student is an HF directory in `out` (save_pretrained model + tokenizer), with `train_log.jsonl`
(one line per step) and `workers.json` (the Ray node, host and device of each rank) next to it.
`worker_resources` (custom resources, e.g. {"trainer": 1}) pins the workers to the node type holding them.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysad.checkpoints import CheckpointError, check_resumable, latest_checkpoint
from raysad.configs import DistillConfig
from raysad.train_loop import TRAIN_LOG, WORKERS_FILE, load_tokenizer, reads_teacher, tokenizer_source
from raysad.train_worker import CHECKPOINTS_KEPT, RUN_NAME, train_worker
from raysad.trajectory_files import content_sha256

RUN_ID_FILE = "mlflow_run_id"   # in --out: the MLflow run a resumed distillation continues


@dataclass
class DistillResult:
    out: Path                              # the student's HF directory
    metrics: dict[str, float]              # the last step's metrics and the run's totals (distill/...)
    steps: int
    checkpoint: str | None                 # the last checkpoint's directory
    run_id: str | None                     # MLflow run id (None without tracking)
    log: list[dict]                        # train_log.jsonl, one dict per step
    workers: list[dict] = dataclasses.field(default_factory=list)  # workers.json: where each rank ran


# ---------------------------------------------------------------------------------------- the driver ----
def run_params(config: DistillConfig) -> dict[str, Any]:
    """The config as MLflow params, without the test hook (fail_once_at_step is no setting of the run)."""
    from raysad.config import flatten

    return {k: v for k, v in flatten(config).items() if k != "fail_once_at_step"}


def _absolute(config: DistillConfig) -> DistillConfig:
    """Workers run in their own folder: every path in the config becomes absolute."""
    fix = {}
    for name in ("trajectories", "out", "teacher", "tokenizer", "storage"):
        value = getattr(config, name)
        if value and "://" not in value:
            fix[name] = str(Path(value).expanduser().resolve())
    if Path(config.student).is_dir():
        fix["student"] = str(Path(config.student).resolve())
    return dataclasses.replace(config, **fix)


def prepare(config: DistillConfig) -> tuple[DistillConfig, dict, dict]:
    """Check everything and encode the data (clear errors before any worker starts): the worker args and, with
    Ray Train workers, each rank's Ray Data stream."""
    config = _absolute(config)
    if not Path(config.trajectories).is_file():
        raise ValueError(f"--trajectories {config.trajectories}: file not found")
    if config.teacher and not reads_teacher(config):
        print("distill: --method sft imitates the trajectories' tokens; --teacher is not used")
    from raysad.students import student_dir

    config = dataclasses.replace(config, student=student_dir(config.student, config.teacher, config.out),
                                 trajectories_sha256=content_sha256(config.trajectories))
    tokenizer = load_tokenizer(config)
    if config.teacher and reads_teacher(config):  # fail here, not in every worker
        from raysad import models

        models.check_same_tokenizer(models.load_tokenizer(config.teacher), tokenizer)
    from raysad import data, data_stream

    storage = config.storage or str(Path(config.out) / "checkpoints")
    run_dir = storage.rstrip("/") + "/" + RUN_NAME
    resume_from, start = None, 0
    if "://" not in run_dir:
        if not config.resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif (found := latest_checkpoint(run_dir)) is not None:
            start = check_resumable(found, config)
            resume_from = str(found)
    if config.workers:  # Ray Data encodes on the cluster and streams to the workers: this process holds no example
        from raysad.cluster import init_ray

        init_ray(config.ray_address, config.num_cpus)
        examples, cluster = None, data_stream.encode_on_cluster(config, tokenizer_source(config))
        stats = cluster.stats
    else:
        examples, stats = data.load_examples_and_stats(config, tokenizer)
    data.check_teacher_signal(stats, config)
    data.check_curriculum(stats, config)
    batches = data.step_batches(stats, config)
    args = {"examples": examples, "batches": batches, "normalizers": data.step_normalizers(batches, stats),
            "data_start": min(start, len(batches)), "storage": storage, "run_dir": run_dir,
            "resume_from": resume_from, "data_stats": stats.metrics()}
    datasets = data_stream.rank_datasets(cluster, batches, config.workers, args["data_start"]) if config.workers else {}
    return config, args, datasets


def run_distill(config: DistillConfig, track: bool = True) -> DistillResult:
    """Distil: prepare the data, train on Ray Train (or in-process for workers=0), save the student to
    config.out. Logs params, per-step metrics and small artifacts to MLflow when `track`."""
    from raysad.locks import lock_path, output_lock

    # one writer per output (taken before prepare, which clears old checkpoints under out): a second distill
    # into this --out would interleave train_log.jsonl and overwrite the weights
    with output_lock(lock_path(config.out), f"distill --out {config.out}"):
        return _run_distill(config, track)


def _run_distill(config: DistillConfig, track: bool) -> DistillResult:
    import contextlib

    spec = config.student  # a size name, a folder, or a derive: spec (prepare cuts that one into a folder)
    config, args, datasets = prepare(config)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    run = contextlib.nullcontext()
    if track:
        from raysad import tracking

        uri = tracking.absolute_uri(config.tracking_uri)
        student_size = spec if not Path(spec).is_dir() else Path(spec).name
        # a resumed run (same --out) continues its MLflow run: one run per student, not one per attempt
        run_id_file = Path(config.out) / RUN_ID_FILE
        if not config.resume:
            run_id_file.unlink(missing_ok=True)
        run = tracking.resumable_run(run_id_file, config.experiment, uri, config.run_name or f"distill-{config.method}",
                                     {**run_params(config), "student": spec},
                                     {"stage": config.stage, "method": config.method, "student_size": student_size})
    data_stats = args.pop("data_stats")
    with run as active:
        if active is not None:
            args["mlflow"] = {"run_id": active.info.run_id, "uri": uri}
            tracking.log_metrics(data_stats)
        result = _fit(config, args, datasets)
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        out = Path(config.out)
        # rank 0 wrote these into out; on a cluster without a shared filesystem only Ray's last metrics come back
        summary_path, log_path = out / "distill_summary.json", out / TRAIN_LOG
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else dict(result.metrics or {})
        metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        log = ([json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
               if log_path.exists() else [])
        workers = json.loads((out / WORKERS_FILE).read_text()) if (out / WORKERS_FILE).exists() else []
        if active is not None:
            _log_artifacts(out, config)
    metrics.update(data_stats)
    if not config.workers:
        return_freed_memory()
    return DistillResult(out=Path(config.out), metrics=metrics, steps=len(args["batches"]),
                         checkpoint=summary.get("checkpoint") or checkpoint,
                         run_id=active.info.run_id if active is not None else None, log=log, workers=workers)


def return_freed_memory() -> None:
    """Hand the memory a training in this process freed back to the system. glibc keeps freed heap pages: the
    replicate driver's SFT of SmolLM2 (workers 0) left 9.7 GB resident while it went on to evaluate, beside
    the evaluation's own actors, on a 24 GB box; malloc_trim returns them (benchmarks/inprocess_memory.py)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to trim there
        pass


def _fit(config: DistillConfig, args: dict, datasets: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysad.data_stream import ingest_options

    worker_args = {**args, "config": dataclasses.asdict(config)}
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {}),
                 **config.worker_resources}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_args,
        datasets=datasets or None,
        dataset_config=ingest_options(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources if config.workers else None),
        run_config=RunConfig(name=RUN_NAME, storage_path=args["storage"],
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
    )
    try:
        return _fit_in_thread(trainer)
    except Exception as err:
        cause, seen = err, set()
        while cause is not None and not isinstance(cause, CheckpointError) and id(cause) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        cause = cause if isinstance(cause, CheckpointError) else None
        if cause is not None:  # a bad checkpoint: rerunning would fail the same way, say which file instead
            raise CheckpointError(str(cause)) from None
        raise RuntimeError(f"distillation failed after {config.max_failures} recovered failure(s): {err}\n"
                           f"Run the same command again to continue from the last checkpoint "
                           f"(in {args['run_dir']}).") from err


def _fit_in_thread(trainer):
    """trainer.fit() in a thread of its own, so that Ctrl-C reaches this process as KeyboardInterrupt (the CLI:
    one line, exit 130). From the main thread, Ray Train installs its own SIGINT handler, which aborts the run
    and exits 1 without a word. The run's actors belong to this driver and end with it; its checkpoints stay."""
    import threading

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 -- handed to the caller as is
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="raysad-distill-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a short wait, so that a signal is handled at once
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _log_artifacts(out: Path, config: DistillConfig) -> None:
    """Tag the model path; upload the small files of the model dir (weights only with log_model_weights)."""
    import mlflow

    mlflow.set_tag("model_path", str(out))
    mlflow.log_param("model_path", str(out))
    weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    for path in sorted(out.iterdir()):
        if path.is_file() and (config.log_model_weights or not path.name.endswith(weights)):
            mlflow.log_artifact(str(path), artifact_path="model")


def main(config_path: str | Path | None = None, **flags: Any) -> DistillResult:
    """`raysad distill`: build the config (defaults < YAML < flags), train, print where the student went."""
    from raysad import ui

    from raysad.config import build_config

    config = build_config(DistillConfig, config_path, **flags)
    result = run_distill(config)
    m = result.metrics
    ui.console().print(f"[green]distill[/green] ({config.method}): {result.steps} steps, final loss "
                    f"{m.get('distill/loss', float('nan')):.4f}, student saved to [bold]{result.out}[/bold]")
    ui.console().print(f"data: {m.get('data/examples', 0):.0f} examples, {m.get('data/reason_tokens', 0):.0f} reason "
                    f"and {m.get('data/act_tokens', 0):.0f} act tokens; dropped by --max-length "
                    f"{config.max_length}: {m.get('data/dropped_loss_tokens', 0):.0f} loss tokens, "
                    f"{m.get('data/dropped_prompt_tokens', 0):.0f} prompt tokens")
    return result
