"""Supervised fine-tuning of a teacher on expert trajectories (`raysad sft`): one process, plain torch.

Cross-entropy on the [REASON] and [ACT] tokens only (masks from raysad.segments), AdamW, warm-up + cosine
schedule, gradient clipping, right-padded batches. The data pieces (encoding, collation, schedule) are the
distill stage's, so a teacher fine-tuned here sees its data exactly as a student distilled there does.
The result is an HF directory (model + tokenizer) that every engine loads.

    from raysad.sft import SFTConfig, run_sft
    run_sft(SFTConfig(trajectories="expert.jsonl", model="tiny-5m", out="runs/teacher"))
"""
from __future__ import annotations

import math
import random
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
    grad_clip: float = 1.0
    batch_size: int = 8
    max_length: int = 1024                 # tokens per trajectory (longer ones are cut by encode_trajectory)
    vocab_size: int = 4096                 # when a tokenizer is trained here
    seed: int = 0
    device: str | None = None              # default: cuda if available
    experiment: str = "raysad"             # MLflow experiment
    run_name: str = "sft"
    tracking_uri: str | None = None        # default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db


# ------------------------------------------------------------------------------------------ tokenizer --
def trajectory_texts(trajectories: Iterable[Any]) -> Iterable[str]:
    """The full agent text of each trajectory (prompt, then every turn rendered in its env's format)."""
    from raysad.segments import get_format, render_context

    formats: dict[str, Any] = {}
    for traj in trajectories:
        if traj.env not in formats:
            formats[traj.env] = get_format(_format_name(traj.env))
        yield render_context(traj.prompt, traj.turns, formats[traj.env])


def train_tokenizer_from_trajectories(trajectories: str | Path | Iterable[Any], vocab_size: int = 4096,
                                      out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on the text of trajectories (a file path or Trajectory objects):
    the quickstart's tokenizer, fitted to the environments' prompts, thoughts, actions and observations."""
    from raysad.models import train_tokenizer

    if isinstance(trajectories, (str, Path)):
        from raysad.trajectory import read_trajectories

        trajectories = read_trajectories(trajectories)
    return train_tokenizer(trajectory_texts(trajectories), vocab_size=vocab_size, out_dir=out_dir)


def _format_name(env: str) -> str:
    import raysad_envs

    try:
        return raysad_envs.canonical(env)
    except ValueError:
        return env


# ------------------------------------------------------------------------------------------- training --
def load_model_and_tokenizer(config: SFTConfig):
    """(model, tokenizer) for training, float32 on the config's device."""
    from raysad import models

    device = config.device or models.default_device()
    if Path(config.model).is_dir():
        tokenizer = models.load_tokenizer(config.tokenizer or config.model)
        model = models.load_model(config.model, dtype="float32", device=device)
    elif config.model in models.TINY_SIZES:
        if config.tokenizer:
            tokenizer = models.load_tokenizer(config.tokenizer)
        else:
            tokenizer = train_tokenizer_from_trajectories(config.trajectories, vocab_size=config.vocab_size)
        model = models.build_tiny_model(config.model, tokenizer, seed=config.seed).to(device)
    else:
        raise ValueError(f"--model {config.model!r}: neither a model directory nor a tiny size name "
                         f"({', '.join(models.TINY_SIZES)})")
    return model, tokenizer


def run_sft(config: SFTConfig, track: bool = True, progress: bool = True) -> Path:
    """Fine-tune, save model + tokenizer to config.out, return that path. Logs to MLflow when `track`."""
    if not track:
        return _train(config, progress, log=lambda metrics, step=None: None)
    from raysad import tracking
    from raysad.config import flatten

    with tracking.start_run(config.experiment, config.run_name, flatten(config), uri=config.tracking_uri,
                            tags={"stage": "sft"}):
        return _train(config, progress, log=tracking.log_metrics)


def _train(config: SFTConfig, progress: bool, log) -> Path:
    import torch

    from raysad.distill import collate, load_examples, lr_at
    from raysad.losses import ce_loss
    from raysad.models import parameter_count, save_tokenizer

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config)
    examples = load_examples(config, tokenizer)
    device = next(model.parameters()).device
    order_rng = random.Random(config.seed)
    batches = []
    for _ in range(config.epochs):
        order = list(range(len(examples)))
        order_rng.shuffle(order)
        batches += [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if config.max_steps:
        batches = (batches * math.ceil(config.max_steps / max(len(batches), 1)))[:config.max_steps]
    total = len(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    log({"sft/params": parameter_count(model), "sft/examples": len(examples)})
    model.train()
    losses = []
    with _progress(progress, total, "sft") as advance:
        for step, batch_ids in enumerate(batches):
            batch = collate([examples[i] for i in batch_ids], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            mask = batch["reason_mask"] | batch["act_mask"]
            loss = ce_loss(logits, batch["labels"], mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            log({"sft/loss": losses[-1], "sft/lr": lr, "sft/grad_norm": float(grad_norm),
                 "sft/tokens": int(mask.sum())}, step=step)
            advance(f"loss {losses[-1]:.3f}")
    model.eval()
    out = Path(config.out)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    log({"sft/final_loss": sum(losses[-5:]) / max(len(losses[-5:]), 1), "sft/steps": total})
    return out


class _progress:
    """A rich progress bar (or nothing): `advance(description)` once per step."""

    def __init__(self, enabled: bool, total: int, name: str):
        self.enabled, self.total, self.name = enabled, total, name

    def __enter__(self):
        if not self.enabled:
            return lambda text="": None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        task = self.bar.add_task(self.name, total=self.total)
        return lambda text="": self.bar.update(task, advance=1, description=f"{self.name} {text}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False


def main(config_path: str | Path | None = None, **flags: Any) -> Path:
    """`raysad sft`: build the config (defaults < YAML < flags), train, print where the model went."""
    from rich.console import Console

    from raysad.config import build_config

    config = build_config(SFTConfig, config_path, **flags)
    if not Path(config.trajectories).is_file():
        raise ValueError(f"--trajectories {config.trajectories}: file not found")
    from raysad.models import TINY_SIZES

    if not Path(config.model).is_dir() and config.model not in TINY_SIZES:
        raise ValueError(f"--model {config.model}: neither a model directory nor a tiny size name "
                         f"({', '.join(TINY_SIZES)})")
    out = run_sft(config)
    Console().print(f"[green]sft[/green]: fine-tuned model and tokenizer saved to [bold]{out}[/bold]")
    return out
