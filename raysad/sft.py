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
from pathlib import Path
from typing import Any, Iterable

from raysad.config import values_of
from raysad.configs import DistillConfig, Optimizer, RayCluster, SFTConfig, Tracking, Training


# ------------------------------------------------------------------------------------------ tokenizer --
def trajectory_texts(trajectories: Iterable[Any]) -> Iterable[str]:
    """The full agent text of each trajectory (prompt, then every turn rendered in its env's format)."""
    from raysad.agent_formats import trajectory_format
    from raysad.segments import render_context

    for traj in trajectories:
        yield render_context(traj.prompt, traj.turns, trajectory_format(traj))


def train_tokenizer_from_trajectories(trajectories: str | Path | Iterable[Any], vocab_size: int = 4096,
                                      out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on the text of trajectories (a file path or Trajectory objects):
    the quickstart's tokenizer, fitted to the environments' prompts, thoughts, actions and observations."""
    from raysad.models import train_tokenizer

    if isinstance(trajectories, (str, Path)):
        from raysad.trajectory_reader import read_trajectories

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
    from raysad.checkpoints import latest_checkpoint

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


def distill_config(config: SFTConfig, progress: bool = True) -> DistillConfig:
    """The DistillConfig that runs this fine-tuning (method sft), student = config.model as given."""
    return DistillConfig(
        **values_of(config, Training, Optimizer, Tracking, RayCluster), method="sft", stage="sft",
        trajectories=config.trajectories, student=config.model, gpus_per_worker=gpus_per_worker(config),
        precision=config.precision,
        log_every=10 if progress else 10**9)  # without progress: the first and the last step's lines only


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
