"""Supervised fine-tuning of a teacher on expert trajectories (`raysad sft`).

The distillation trainer with method "sft" (cross-entropy on the [REASON] and [ACT] tokens only, see
raysad.distill): the same data pieces, schedule, checkpoints/resume, Ray Train workers and MLflow metrics
(`distill/loss`, `distill/reason_loss`, ...; the run is named "sft"). What this stage adds is the start:
for a tiny size name it trains a tokenizer on the trajectories' text (unless --tokenizer is given) and
writes the randomly initialised model with that tokenizer to `<out>/checkpoints/init/<size>`, an ordinary
HF directory that distill then trains. The result in `out` is an HF directory (model + tokenizer) that
every engine loads.

    from raysad.sft import SFTConfig, run_sft
    run_sft(SFTConfig(trajectories="expert.jsonl", model="tiny-5m", out="runs/teacher"))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal


@dataclass
class SFTConfig:
    trajectories: str                      # JSONL/Parquet of (expert) trajectories
    model: str = "tiny-5m"                 # HF model dir, or a tiny size name (tiny-1m, tiny-5m, tiny-20m)
    tokenizer: str | None = None           # tokenizer dir; default: the model dir's, or (size name) one
                                           # trained here on the trajectories' text
    out: str = "runs/teacher"
    epochs: int = 3
    max_steps: int = 0                     # 0 = as many as the epochs give
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0                 # 0 = no clipping
    batch_size: int = 8
    max_length: int = 1024                 # tokens per trajectory (longer ones are cut by encode_trajectory)
    vocab_size: int = 4096                 # when a tokenizer is trained here
    seed: int = 0
    device: str | None = None              # cpu or cuda (one GPU per worker); default: cuda if available
    workers: int = 0                       # 0 = train in this process; >= 1 = Ray Train workers
    experiment: str = "raysad"             # MLflow experiment
    run_name: str = "sft"
    tracking_uri: str | None = None        # default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db

    def __post_init__(self) -> None:
        from raysad.config import SEED_MAX, check_range

        # Range-checked on the driver, before a tokenizer is trained, Ray starts or <out> is written; the same
        # ranges as DistillConfig's (this stage runs the distill trainer). vocab_size: 256 bytes + EOS + PAD at
        # least, at most 1_048_576 (the embedding matrix would exhaust memory).
        check_range("epochs", self.epochs, 1)
        check_range("max_steps", self.max_steps, 0, why="0 = the epochs decide")
        check_range("lr", self.lr, 0, low_inclusive=False)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("grad_clip", self.grad_clip, 0, why="0 = no clipping")
        check_range("batch_size", self.batch_size, 1, 65_536)
        check_range("max_length", self.max_length, 2, 1_048_576)
        check_range("vocab_size", self.vocab_size, 258, 1_048_576)
        check_range("seed", self.seed, 0, SEED_MAX)
        check_range("workers", self.workers, 0, 4_096, why="0 = train in this process")


# ------------------------------------------------------------------------------------------ tokenizer --
def trajectory_texts(trajectories: Iterable[Any]) -> Iterable[str]:
    """The full agent text of each trajectory (prompt, then every turn rendered in its env's format)."""
    from raysad.segments import render_context, trajectory_format

    for traj in trajectories:
        yield render_context(traj.prompt, traj.turns, trajectory_format(traj))


def train_tokenizer_from_trajectories(trajectories: str | Path | Iterable[Any], vocab_size: int = 4096,
                                      out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on the text of trajectories (a file path or Trajectory objects):
    the quickstart's tokenizer, fitted to the environments' prompts, thoughts, actions and observations."""
    from raysad.models import train_tokenizer

    if isinstance(trajectories, (str, Path)):
        from raysad.trajectory import read_trajectories

        trajectories = read_trajectories(trajectories)
    return train_tokenizer(trajectory_texts(trajectories), vocab_size=vocab_size, out_dir=out_dir)


# ------------------------------------------------------------------------------------------- training --
def build_init(config: SFTConfig) -> Path:
    """The tiny model named by config.model, randomly initialised (seeded) with its tokenizer, as an HF dir
    `<out>/checkpoints/init/<size>`: next to distill's checkpoints, named like the size (distill tags it as
    student_size), and at a fixed path, so a rerun resumes the same run. The tokenizer is --tokenizer's, or
    one trained on the trajectories' text (deterministic, so a rerun rebuilds the same one)."""
    from raysad import models
    from raysad.distill import RUN_NAME
    from raysad.train_loop import latest_checkpoint

    out = Path(config.out) / "checkpoints" / "init" / config.model
    tokenizer = (models.load_tokenizer(config.tokenizer) if config.tokenizer else
                 train_tokenizer_from_trajectories(config.trajectories, vocab_size=config.vocab_size))
    run_dir = Path(config.out) / "checkpoints" / RUN_NAME
    if ((out / "tokenizer.json").is_file() and latest_checkpoint(run_dir) is not None
            and models.load_tokenizer(out).get_vocab() != tokenizer.get_vocab()):
        raise ValueError(f"--out {config.out}: its checkpoints were trained with another tokenizer (vocab_size or "
                         f"--tokenizer changed): use another --out, or delete {run_dir} to start again")
    models.save_tokenizer(tokenizer, out)
    return models.init_model_dir(config.model, out, out, seed=config.seed)


def gpus_per_worker(config: SFTConfig) -> float:
    """--device as distill's gpus_per_worker: cpu -> 0, cuda -> 1, default: 1 if this machine has CUDA."""
    import torch

    if config.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {config.device!r}: use cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES)")
    if config.device == "cuda" and not config.workers and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    if config.device is None:
        return 1.0 if torch.cuda.is_available() else 0.0
    return 1.0 if config.device == "cuda" else 0.0


def distill_config(config: SFTConfig, progress: bool = True):
    """The DistillConfig that runs this fine-tuning (method sft), student = config.model as given."""
    from raysad.distill import DistillConfig

    return DistillConfig(
        method="sft", stage="sft", student=config.model, tokenizer=config.tokenizer, trajectories=config.trajectories,
        out=config.out, epochs=config.epochs, max_steps=config.max_steps, lr=config.lr,
        min_lr_ratio=config.min_lr_ratio, warmup_steps=config.warmup_steps, schedule=config.schedule,
        weight_decay=config.weight_decay, max_grad_norm=config.grad_clip, batch_size=config.batch_size,
        micro_batch_size=config.batch_size, max_length=config.max_length, seed=config.seed,
        workers=config.workers, gpus_per_worker=gpus_per_worker(config),
        log_every=10 if progress else 10**9,  # without progress: the first and the last step's lines only
        experiment=config.experiment, run_name=config.run_name, tracking_uri=config.tracking_uri)


def run_sft(config: SFTConfig, track: bool = True, progress: bool = True) -> Path:
    """Fine-tune with raysad.distill (method sft), save model + tokenizer to config.out, return that path.
    Logs to MLflow when `track`; prints a progress line every 10 steps when `progress`."""
    from raysad.distill import run_distill
    from raysad.models import TINY_SIZES

    if not Path(config.trajectories).is_file():
        raise ValueError(f"--trajectories {config.trajectories}: file not found")
    if not Path(config.model).is_dir() and config.model not in TINY_SIZES:
        raise ValueError(f"--model {config.model}: neither a model directory nor a tiny size name "
                         f"({', '.join(TINY_SIZES)})")
    distill = distill_config(config, progress)  # checks the fields before a tokenizer is trained
    if config.model in TINY_SIZES and not Path(config.model).is_dir():
        distill = dataclasses.replace(distill, student=str(build_init(config)), tokenizer=None)
    return run_distill(distill, track=track).out


def main(config_path: str | Path | None = None, **flags: Any) -> Path:
    """`raysad sft`: build the config (defaults < YAML < flags), train, print where the model went."""
    from raysad import ui

    from raysad.config import build_config

    config = build_config(SFTConfig, config_path, **flags)
    out = run_sft(config)
    ui.console().print(f"[green]sft[/green]: fine-tuned model and tokenizer saved to [bold]{out}[/bold]")
    return out
