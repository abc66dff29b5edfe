"""Ray Train's per-worker function for distillation (`train_worker`), run on every rank of the TorchTrainer
that raysad.distill starts (and in-process for workers=0): where the rank runs (device, DDP), the checkpoint
Ray Train restores, the rank's stream of examples (Ray Data shard `rank_<r>`, or the driver's list), and the
report/checkpoint callbacks; then the plain-torch loop raysad.train_loop.train. The Ray glue of training
lives here and nowhere else: train_loop imports no Ray.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from raysad.configs import DistillConfig

RUN_NAME = "distill"            # Ray Train run name under the storage folder: same --out, same run -> resume
CHECKPOINTS_KEPT = 2


def train_worker(args: dict) -> None:
    """Ray Train's per-worker function (also run in-process for workers=0): the rank's placement, its
    restored checkpoint and its examples, then raysad.train_loop.train."""
    import functools

    import ray.train
    import torch
    import torch.distributed as dist

    from raysad import checkpoints, train_loop

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
            state = checkpoints.load_state(path)
    # Ray's run snapshot can lag the checkpoints on disk (a driver killed after a checkpoint was written, before
    # the snapshot listing it was): the driver planned the data streams from the newest checkpoint it found, so
    # a worker never starts before that one
    if args.get("resume_from") and (state is None or state["step"] < args["data_start"]):
        state = checkpoints.load_state(args["resume_from"])
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
    from raysad.data import rank_rows, rank_sequence, take
    from raysad.data_stream import stream_examples

    batches = args["batches"]
    if args.get("examples") is not None:
        examples = args["examples"]
        return iter([examples[i] for i in rank_sequence(batches, rank, world, start)])
    import ray.train

    from raysad.data_stream import quiet_ray_data

    quiet_ray_data()
    if start < args["data_start"]:  # the stream starts later: its first rows are not this step's
        raise RuntimeError(f"rank {rank}: resuming at step {start}, but its data stream starts at step "
                           f"{args['data_start']}")
    stream = stream_examples(ray.train.get_dataset_shard(f"rank_{rank}"))
    skipped = sum(len(rank_rows(batches[step], rank, world)[0]) for step in range(args["data_start"], start))
    take(stream, skipped, f"rank {rank}, resuming at step {start}", keep=False)
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
