"""Checkpoints of a distill run: what a checkpoint holds and how it is written, found, checked and loaded.

A checkpoint is a folder `checkpoint_<step>/` with `state.pt` (model + optimizer state dicts, the step and the
run's fingerprint: tensors and plain containers only, loaded with weights_only=True) and `meta.json`, written
last (a folder without it is incomplete). Under FSDP, gathering the full state is a collective: every rank
calls `write_checkpoint`, rank 0 writes. Plain torch, no Ray.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

# the config fields a checkpoint must agree on to be resumed
RESUME_FIELDS = ("trajectories", "trajectories_sha256", "student", "teacher", "method", "lambda_reason", "lambda_act", "divergence",
                 "beta", "temperature", "ce_weight", "curriculum", "curriculum_start", "curriculum_pace", "epochs", "max_steps",
                 "batch_size", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "max_grad_norm",
                 "max_length", "seed")

STATE_FILE = "state.pt"  # model + optimizer state dicts (tensors and plain containers only) + step + fingerprint


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely (tampered, truncated, not ours); the message names it."""


def load_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's `state.pt`, loaded with `weights_only=True`: tensors and plain containers only, so a
    planted or tampered file can never run code; anything else fails with a one-line CheckpointError."""
    import torch

    path = Path(folder) / STATE_FILE
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and I/O errors alike: one clear line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # the weights-only unpickler's reason ("... unsupported GLOBAL posix.system ...") without its preamble
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reason = next((line for line in lines if not line.startswith(boilerplate)), lines[0] if lines else "")
        raise CheckpointError(f"{path}: not a loadable raysad checkpoint ({type(err).__name__}: {reason[:200]}); "
                              "delete that checkpoint folder or rerun with --no-resume") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "fingerprint"} <= state.keys():
        raise CheckpointError(f"{path}: not a raysad checkpoint (expected model, optimizer, step and "
                              "fingerprint); delete that checkpoint folder or rerun with --no-resume")
    return state


def fingerprint(config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in RESUME_FIELDS}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory with the highest step under a run folder (None if there is none)."""
    run_dir = Path(run_dir)
    found = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            found.append((json.loads(meta.read_text())["step"], meta.parent))
        except (ValueError, KeyError):
            continue  # a checkpoint being written when the run died
    return max(found)[1] if found else None


def check_resumable(checkpoint: Path, config) -> int:
    """The step a checkpoint resumes at, after checking it comes from a run with the same data and maths."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    saved, now = meta["fingerprint"], fingerprint(config)
    differ = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if differ:
        raise ValueError(f"{checkpoint}: cannot resume, the run changed ({'; '.join(differ)}). "
                         "Rerun with --no-resume to start again, or use another --out")
    return int(meta["step"])


def full_state(module, student, optimizer, config, distributed: bool):
    """(model, optimizer) state dicts as full tensors on CPU (a collective under FSDP: every rank calls it)."""
    if distributed and config.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = {k.removeprefix("student."): v
                       for k, v in get_model_state_dict(module, options=options).items()}
        optim_state = get_optimizer_state_dict(module, optimizer, options=options) if optimizer else None
        return model_state, optim_state
    return student.state_dict(), optimizer.state_dict() if optimizer else None


def load_optimizer(optimizer, module, optim_state, config, distributed: bool) -> None:
    """A checkpoint's (full) optimizer state into `optimizer` (sharded again under FSDP)."""
    if distributed and config.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_state)


def write_checkpoint(step: int, module, student, optimizer, config, rank: int, distributed: bool,
                     folder: Path | None) -> None:
    """Model + optimizer + step into `folder` (rank 0; every rank joins the FSDP gather of the state)."""
    import torch

    model_state, optim_state = full_state(module, student, optimizer, config, distributed)
    if rank != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    # tensors and plain containers only (no RNG states or other objects): loadable with weights_only=True
    torch.save({"model": model_state, "optimizer": optim_state, "step": int(step),
                "fingerprint": fingerprint(config)}, folder / STATE_FILE)
    # meta.json last: a checkpoint without it is incomplete (latest_checkpoint skips it)
    (folder / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint(config)}))
