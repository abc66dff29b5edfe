"""Distillation stage: train a student from teacher trajectories on Ray Train (`raysad distill`).

    from raysad.distill import DistillConfig, run_distill
    result = run_distill(DistillConfig(trajectories="trajs.jsonl", student="tiny-5m", tokenizer="runs/teacher",
                                       method="sad", lambda_reason=1.0, lambda_act=2.0, workers=2))
    result.out, result.metrics

The driver checks everything, has Ray Data encode the trajectories on the cluster (raysad.data: the
driver keeps per-example token counts, never the examples), plans every step's global batch and starts a
TorchTrainer; each worker restores its checkpoint, reads its own stream of examples and runs
raysad.train_loop.train (plain torch: the step, DDP/FSDP, checkpoint state), the method's loss looked up in
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
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raysad.train_loop import (TRAIN_LOG, WORKERS_FILE, CheckpointError, check_resumable, latest_checkpoint,
                               load_tokenizer, reads_teacher, tokenizer_source)
from raysad.trajectory import content_sha256

RUN_NAME = "distill"            # Ray Train run name under the storage folder: same --out, same run -> resume
CHECKPOINTS_KEPT = 2
# fields that decide the maths and the batch sequence: a checkpoint only resumes a run that agrees on them
@dataclass
class DistillConfig:
    trajectories: str                      # JSONL/Parquet from `raysad rollout`
    student: str                           # HF model dir, or a tiny size name (tiny-1m, tiny-5m, tiny-20m)
    out: str = "runs/student"
    teacher: str | None = None             # HF model dir: online teacher (full logits); None = stored top-k
    tokenizer: str | None = None           # tokenizer dir when --student is a size name (default: teacher's)
    trajectories_sha256: str | None = None  # set by the driver: the content a run trained on (a resume over other
    #                                         content under the same path is refused)
    method: Literal["sad", "token_kd", "flat_kd", "sft"] = "sad"
    lambda_reason: float = 1.0
    lambda_act: float = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5                      # generalised JSD mixing weight
    temperature: float = 1.0
    ce_weight: float = 0.0                 # extra cross-entropy on teacher tokens (sad / token_kd)
    curriculum: bool = False               # order easy -> hard by trajectory complexity
    curriculum_start: float = 0.3          # fraction of the (sorted) data unlocked in the first epoch
    epochs: int = 1
    max_steps: int = 0                     # 0 = as many as the epochs give
    batch_size: int = 8                    # global batch (examples per optimizer step, all workers)
    micro_batch_size: int = 4              # per worker forward pass; gradient accumulation fills the rest
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0             # 0 = no clipping
    max_length: int = 1024
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    seed: int = 0
    workers: int = 1                       # Ray Train workers; 0 = run in this process (no Ray cluster)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom resources per worker:
    #                                        pins workers to a node type, e.g. {trainer: 1} (cluster.yaml)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int = 50             # steps; a checkpoint is also written at the end
    resume: bool = True                    # continue from the last checkpoint of a run with the same --out
    max_failures: int = 2                  # worker failures Ray Train recovers from (from the last checkpoint)
    log_every: int = 10                    # print a progress line every this many steps (rank 0)
    experiment: str = "raysad"
    run_name: str | None = None            # MLflow run name (default distill-<method>)
    stage: str = "distill"                 # MLflow `stage` tag (`raysad sft` runs this trainer as "sft")
    tracking_uri: str | None = None        # MLflow; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    log_model_weights: bool = False        # upload the weights as MLflow artifacts too (small files always)
    storage: str | None = None             # Ray Train storage for checkpoints (default: <out>/checkpoints)
    ray_address: str | None = None         # "auto" or host:port; None = $RAY_ADDRESS or a local Ray
    num_cpus: int | None = None            # CPUs of a local Ray (None = all)
    loss_chunk_size: int = 512             # sequence positions per chunk in the loss
    fail_once_at_step: int = 0             # test hook: the last rank raises once after this many steps
    #                                        (before that step's log line and checkpoint; <out>/.injected_failure
    #                                        records it so the replacement worker goes on); 0 = never

    def __post_init__(self) -> None:
        from raysad.losses import METHODS

        if self.method not in METHODS:
            raise ValueError(f"field 'method': must be one of {', '.join(METHODS)}, got {self.method!r}")
        if METHODS[self.method].flat and not self.teacher:
            raise ValueError(f"field 'method': {self.method} distils the observation tokens too, where no teacher "
                             "top-k is stored; it needs an online teacher (--teacher DIR)")
        from raysad.config import SEED_MAX, check_range

        # Every number is range-checked here, on the driver, before Ray starts or anything is written (a bad
        # one used to fail only inside the workers, after their retries). Upper bounds sit where a bigger value
        # would only exhaust memory: max_length <= 1_048_576 tokens, batch sizes <= 65_536 trajectories.
        # lambdas: >= 0. Both 0 is allowed on purpose: tune_configs/loss_weights.yaml sweeps the 4x4 grid
        # including (0, 0), the heat map's no-distillation corner.
        check_range("lambda_reason", self.lambda_reason, 0)
        check_range("lambda_act", self.lambda_act, 0)
        check_range("beta", self.beta, 0, 1)
        check_range("temperature", self.temperature, 0, low_inclusive=False)
        check_range("ce_weight", self.ce_weight, 0)
        check_range("curriculum_start", self.curriculum_start, 0, 1, low_inclusive=False)
        check_range("epochs", self.epochs, 1)
        check_range("max_steps", self.max_steps, 0, why="0 = the epochs decide")
        check_range("batch_size", self.batch_size, 1, 65_536)
        check_range("micro_batch_size", self.micro_batch_size, 1, 65_536)
        check_range("lr", self.lr, 0, low_inclusive=False)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("max_grad_norm", self.max_grad_norm, 0, why="0 = no clipping")
        check_range("max_length", self.max_length, 2, 1_048_576)
        check_range("seed", self.seed, 0, SEED_MAX)
        check_range("workers", self.workers, 0, 4_096, why="0 = run in this process")
        check_range("gpus_per_worker", self.gpus_per_worker, 0, 1_024)
        check_range("cpus_per_worker", self.cpus_per_worker, 0, 100_000)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        check_range("max_failures", self.max_failures, 0, 1_000)
        check_range("log_every", self.log_every, 1)
        check_range("num_cpus", self.num_cpus, 1, optional=True)
        check_range("loss_chunk_size", self.loss_chunk_size, 1, 1_048_576)
        check_range("fail_once_at_step", self.fail_once_at_step, 0, why="0 = never")
        if self.workers == 0 and self.strategy == "fsdp":
            raise ValueError("strategy fsdp needs workers >= 1 (workers 0 runs in this process)")
        from raysad.cluster import check_custom_resources

        check_custom_resources("worker_resources", self.worker_resources)


@dataclass
class DistillResult:
    out: Path                              # the student's HF directory
    metrics: dict[str, float]              # the last step's metrics and the run's totals (distill/...)
    steps: int
    checkpoint: str | None                 # the last checkpoint's directory
    run_id: str | None                     # MLflow run id (None without tracking)
    log: list[dict]                        # train_log.jsonl, one dict per step
    workers: list[dict] = dataclasses.field(default_factory=list)  # workers.json: where each rank ran


# ------------------------------------------------------------------------------------ the worker loop --
def train_worker(args: dict) -> None:
    """Ray Train's per-worker function (also run in-process for workers=0): the rank's placement, its
    restored checkpoint and its examples, then raysad.train_loop.train."""
    import functools

    import ray.train
    import torch
    import torch.distributed as dist

    from raysad import train_loop

    config = DistillConfig(**args["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    if config.gpus_per_worker > 0 and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device() if config.workers else torch.device("cuda")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # restore: the checkpoint Ray Train hands back (worker restart, or a run restarted with the same
    # name + storage), else (in-process runs) the one the driver found
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = train_loop.load_state(path)
    elif args.get("resume_from"):
        state = train_loop.load_state(args["resume_from"])
    place = train_loop.Placement(
        rank=rank, world=world, distributed=distributed, device=device,
        report=functools.partial(_report, args, config.workers, rank),
        checkpoint_folder=functools.partial(_checkpoint_folder, args, config.workers),
        places=_worker_places(rank, world, distributed, device), tracking=args.get("mlflow"))
    train_loop.train(config, args["batches"], args["normalizers"],
                     functools.partial(_rank_examples, args, rank, world), state, place)


def _checkpoint_folder(args: dict, workers: int, step: int) -> Path:
    """In-process runs write straight into the run folder (Ray does not copy there); Ray workers write a
    temporary folder that ray.train.report copies into storage."""
    if not workers:
        return Path(args["run_dir"]) / f"checkpoint_{step:06d}"
    return Path(tempfile.mkdtemp(prefix="raysad-ckpt-"))


def _report(args: dict, workers: int, rank: int, step: int, metrics: dict, folder: Path | None) -> str:
    """Every rank reports (Ray Train syncs on it); rank 0 hands over the checkpoint folder it wrote."""
    import ray.train

    name = f"checkpoint_{step:06d}"
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
    ray.train.report({"distill/step": step, **metrics}, checkpoint=checkpoint, checkpoint_dir_name=name)
    if folder is not None and not workers:
        kept = sorted(Path(args["run_dir"]).glob("checkpoint_*"))
        for old in kept[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    elif folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return str(Path(args["run_dir"]) / name)


def _rank_examples(args: dict, rank: int, world: int, start: int):
    """This rank's examples from step `start` on, in step order: from the driver's list (in-process runs) or
    streamed by Ray Data (`rank_<r>` dataset shard, built from step `data_start`; a worker restored at a
    later step skips the rows of the steps in between)."""
    from raysad.data import rank_rows, rank_sequence, stream_examples

    batches = args["batches"]
    if args.get("examples") is not None:
        examples = args["examples"]
        return iter([examples[i] for i in rank_sequence(batches, rank, world, start)])
    import ray.train

    from raysad.data import quiet_ray_data

    quiet_ray_data()
    stream = stream_examples(ray.train.get_dataset_shard(f"rank_{rank}"))
    for step in range(args["data_start"], start):
        for _ in rank_rows(batches[step], rank, world)[0]:
            next(stream)
    return stream


def _worker_places(rank: int, world: int, distributed: bool, device) -> list[dict] | None:
    """Where every rank runs (Ray node id, host, pid, device), gathered on rank 0 (None on the other ranks)."""
    import socket

    import ray
    import torch.distributed as dist

    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(device)}
    if not distributed:
        return [here]
    places = [None] * world if rank == 0 else None
    dist.gather_object(here, places, dst=0)
    return places


# ---------------------------------------------------------------------------------------- the driver ----
def run_params(config: DistillConfig) -> dict[str, Any]:
    """The config as MLflow params, without the test hook (fail_once_at_step is no setting of the run)."""
    from raysad.config import flatten

    return {k: v for k, v in flatten(config).items() if k != "fail_once_at_step"}


def derive_student(config: DistillConfig) -> DistillConfig:
    """A `derive:...` student is cut from --teacher once, into <out>/derived-student (with the teacher's
    tokenizer), and trained from there; a rerun (resume) reuses it."""
    from raysad import models

    if not models.is_derive_spec(config.student):
        return config
    if not config.teacher:
        raise ValueError(f"--student {config.student}: a derived student is cut from --teacher DIR; give it")
    models.parse_derive_spec(config.student)  # a bad spec fails here, in one line
    out = Path(config.out) / "derived-student"
    if not (out / "config.json").is_file():
        models.derive_student_dir(config.teacher, out, config.student)
    return dataclasses.replace(config, student=str(out))


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
    config = derive_student(config)
    config = dataclasses.replace(config, trajectories_sha256=content_sha256(config.trajectories))
    tokenizer = load_tokenizer(config)
    if config.teacher and reads_teacher(config):  # fail here, not in every worker
        from raysad import models

        models.check_same_tokenizer(models.load_tokenizer(config.teacher), tokenizer)
    from raysad import data

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
        examples, cluster = None, data.encode_on_cluster(config, tokenizer_source(config))
        stats = cluster.stats
    else:
        examples, stats = data.load_examples_and_stats(config, tokenizer)
    data.check_teacher_signal(stats, config)
    batches = data.step_batches(stats, config)
    args = {"examples": examples, "batches": batches, "normalizers": data.step_normalizers(batches, stats),
            "data_start": min(start, len(batches)), "storage": storage, "run_dir": run_dir,
            "resume_from": resume_from if not config.workers else None, "data_stats": stats.metrics()}
    datasets = data.rank_datasets(cluster, batches, config.workers, args["data_start"]) if config.workers else {}
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
        run = tracking.start_run(config.experiment, config.run_name or f"distill-{config.method}",
                                 {**run_params(config), "student": spec},
                                 tags={"stage": config.stage, "method": config.method, "student_size": student_size},
                                 uri=uri)
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
    return DistillResult(out=Path(config.out), metrics=metrics, steps=len(args["batches"]),
                         checkpoint=summary.get("checkpoint") or checkpoint,
                         run_id=active.info.run_id if active is not None else None, log=log, workers=workers)


def _fit(config: DistillConfig, args: dict, datasets: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysad.data import ingest_options

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
        return trainer.fit()
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
