"""Distillation stage: train a student from teacher trajectories on Ray Train (`raysad distill`).

    from raysad.distill import DistillConfig, run_distill
    result = run_distill(DistillConfig(trajectories="trajs.jsonl", student="tiny-5m", tokenizer="runs/teacher",
                                       method="sad", lambda_reason=1.0, lambda_act=2.0, workers=2))
    result.out, result.metrics

Placement (who runs where) is the Ray Train part at the bottom; the math is raysad.losses. One training
step on one worker:
  1. its slice of the global batch (rank r takes examples r, r+W, ...), split into micro-batches
     (gradient accumulation; every rank runs the same number, padded with zero-weight micro-batches);
  2. student forward to its final hidden states (the logits are never materialised: the losses take
     `HiddenStates(hidden, lm_head)` and work chunk by chunk); teacher signal from the trajectories' stored
     top-k (offline) or a teacher model on the same worker (online, full distribution);
  3. loss sums are normalised by the *global* token counts of the step divided by the number of workers,
     so N workers and gradient accumulation give the same update as one worker on the whole batch.
     Every worker holds the step's global batch indices and the per-example token counts, so it knows
     those counts without communication (what an all_reduce of the local counts would give).

Methods: `sad` (λ_r·KD over [REASON] tokens + λ_a·KD over [ACT] tokens), `token_kd` (one KD over
reason ∪ act tokens), `flat_kd` (one KD over every token after the prompt, observations included: the
trajectory as a flat sequence, the paper's token-KD baseline as described; needs an online --teacher, since
stored top-k exists only at generated tokens), `sft` (cross-entropy on the teacher's tokens: imitation learning). `ce_weight` adds
CE to the KD methods. The CE on reason ∪ act is always logged (it is the teacher-token NLL).

Workers: `workers >= 1` runs a Ray Train TorchTrainer (DDP by default, FSDP2 `fully_shard` with
strategy=fsdp); `workers = 0` runs the same loop in this process (Ray Train's local mode: no cluster,
no fault tolerance; checkpoints and --resume still work).
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
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

METHODS = ("sad", "token_kd", "flat_kd", "sft")
RUN_NAME = "distill"            # Ray Train run name under the storage folder: same --out, same run -> resume
CHECKPOINTS_KEPT = 2
TRAIN_LOG = "train_log.jsonl"
WORKERS_FILE = "workers.json"   # where each rank ran: [{rank, node_id, host, pid, device}]
FAIL_MARKER = ".injected_failure"  # written by the fail_once_at_step test hook
# fields that decide the maths and the batch sequence: a checkpoint only resumes a run that agrees on them
RESUME_FIELDS = ("trajectories", "trajectories_sha256", "student", "teacher", "method", "lambda_reason", "lambda_act", "divergence",
                 "beta", "temperature", "ce_weight", "curriculum", "curriculum_start", "epochs", "max_steps",
                 "batch_size", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "max_grad_norm",
                 "max_length", "seed")


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
        if self.method not in METHODS:
            raise ValueError(f"field 'method': must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "flat_kd" and not self.teacher:
            raise ValueError("field 'method': flat_kd distils the observation tokens too, where no teacher top-k is "
                             "stored; it needs an online teacher (--teacher DIR)")
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


# --------------------------------------------------------------------------------------------- data ----
def load_examples(config, tokenizer, stats: dict | None = None) -> list[dict]:
    """Encode every trajectory to ids + masks (+ teacher top-k when stored). Any config with
    `trajectories` and `max_length` (the sft stage uses it too).

    Nothing is lost in silence: `stats` (when given) receives the counts of what the data holds and what the
    length limit dropped (data/... metrics: trajectories, examples, skipped_no_loss_tokens, reason_tokens,
    act_tokens, empty_thoughts, truncated_turns, truncated_examples, dropped_prompt_tokens, dropped_loss_tokens,
    dropped_turns, loss_tokens_without_teacher), and each loss is also a warning. A run whose examples hold no
    reason token, or no act token, fails: its loss would be meaningless.
    """
    from raysad.segments import encode_trajectory, get_format
    from raysad.trajectory import read_trajectories
    import raysad_envs

    examples = []
    formats: dict[str, object] = {}
    counts = dict.fromkeys(DATA_COUNTS, 0)
    for traj in read_trajectories(config.trajectories):
        if traj.env not in formats:
            formats[traj.env] = get_format(_format_name(traj.env, raysad_envs))
        example = encode_trajectory(traj, tokenizer, formats[traj.env], max_length=config.max_length)
        counts["trajectories"] += 1
        counts["empty_thoughts"] += sum(1 for t in traj.turns if t.token_ids is not None and not t.thought.strip())
        counts["truncated_turns"] += sum(1 for t in traj.turns if t.extra.get("truncated"))
        counts["truncated_examples"] += bool(example["truncated"])
        for key in ("dropped_prompt_tokens", "dropped_loss_tokens", "dropped_turns"):
            counts[key] += int(example[key])
        n_reason, n_act = int(example["reason_mask"].sum()), int(example["act_mask"].sum())
        if n_reason + n_act == 0:
            counts["skipped_no_loss_tokens"] += 1
            continue
        counts["reason_tokens"] += n_reason
        counts["act_tokens"] += n_act
        if example.get("topk_mask") is not None:
            loss = example["reason_mask"] | example["act_mask"]
            counts["loss_tokens_without_teacher"] += int((loss & ~example["topk_mask"]).sum())
        examples.append(example)
    counts["examples"] = len(examples)
    if stats is not None:
        stats.update({f"data/{k}": v for k, v in counts.items()})
    where = config.trajectories
    if not examples:
        raise ValueError(f"{where}: no trajectory with reason/act tokens to train on")
    if counts["reason_tokens"] == 0 or counts["act_tokens"] == 0:
        raise ValueError(f"{where}: {counts['reason_tokens']} reason and {counts['act_tokens']} act tokens after "
                         f"encoding (max_length {config.max_length}): a segment with no tokens makes the loss "
                         "meaningless; check the trajectories' thoughts/actions and --max-length")
    _warn_data(counts, where, config.max_length)
    return examples


DATA_COUNTS = ("trajectories", "examples", "skipped_no_loss_tokens", "reason_tokens", "act_tokens", "empty_thoughts",
               "truncated_turns", "truncated_examples", "dropped_prompt_tokens", "dropped_loss_tokens",
               "dropped_turns", "loss_tokens_without_teacher")


def _warn_data(counts: dict, where: str, max_length: int | None) -> None:
    import logging

    log = logging.getLogger(__name__)
    n = counts["trajectories"]
    if counts["skipped_no_loss_tokens"]:
        log.warning("%s: %d of %d trajectories have no reason/act token (after --max-length %s) and are skipped",
                    where, counts["skipped_no_loss_tokens"], n, max_length)
    if counts["truncated_examples"]:
        log.warning("%s: %d of %d trajectories exceed --max-length %s: %d prompt tokens cut from the left, "
                    "%d loss tokens (%d whole turns) dropped from the end", where, counts["truncated_examples"], n,
                    max_length, counts["dropped_prompt_tokens"], counts["dropped_loss_tokens"],
                    counts["dropped_turns"])
    if counts["empty_thoughts"]:
        log.warning("%s: %d model turns have an empty thought (their reason segment is only the delimiter)",
                    where, counts["empty_thoughts"])
    if counts["truncated_turns"]:
        log.warning("%s: %d turns were cut by the rollout's token budget (closed with their delimiter)",
                    where, counts["truncated_turns"])
    if counts["loss_tokens_without_teacher"]:
        log.warning("%s: %d reason/act tokens have no stored teacher top-k (text-only turns): sad/token_kd skip "
                    "them while sft trains on them", where, counts["loss_tokens_without_teacher"])


def _format_name(env: str, raysad_envs) -> str:
    try:
        return raysad_envs.canonical(env)
    except ValueError:
        return env


def epoch_order(examples: list[dict], config: DistillConfig, epoch: int) -> list[int]:
    """The example order of an epoch: a seeded shuffle, or easy -> hard with pacing under --curriculum."""
    if not config.curriculum:
        order = list(range(len(examples)))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        return order
    from raysad.curriculum import order_easy_to_hard, unlocked

    ranked = order_easy_to_hard(examples)
    n = unlocked(len(ranked), epoch, config.curriculum_start, max(config.epochs - 1, 1))
    return list(ranked[:n])


def step_batches(examples: list[dict], config: DistillConfig) -> list[list[int]]:
    """All global batches of the run, in order (a pure function of the data and the config: resumable)."""
    batches = []
    for epoch in range(config.epochs):
        order = epoch_order(examples, config, epoch)
        batches += [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if config.max_steps:
        while len(batches) < config.max_steps:  # cycle when asked for more steps than the epochs give
            batches += batches[:config.max_steps - len(batches)]
        batches = batches[:config.max_steps]
    return batches


def collate(items: list[dict], pad_id: int):
    """Right-pad a micro-batch. Returns tensors aligned for next-token prediction (position t predicts t+1)."""
    import torch

    length = max(len(x["input_ids"]) for x in items)
    batch = len(items)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    reason = torch.zeros((batch, length), dtype=torch.bool)
    act = torch.zeros((batch, length), dtype=torch.bool)
    k = max((len(x["topk_ids"][0]) for x in items if x.get("topk_ids") is not None and len(x["topk_ids"])),
            default=0)
    topk_ids = torch.zeros((batch, length, k), dtype=torch.long) if k else None
    topk_logprobs = torch.full((batch, length, k), -1e4, dtype=torch.float32) if k else None
    has_topk = torch.zeros((batch, length), dtype=torch.bool)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.as_tensor(x["input_ids"])
        attention[i, :n] = 1
        reason[i, :n] = torch.as_tensor(x["reason_mask"], dtype=torch.bool)
        act[i, :n] = torch.as_tensor(x["act_mask"], dtype=torch.bool)
        if k and x.get("topk_ids") is not None:
            kk = len(x["topk_ids"][0])
            topk_ids[i, :n, :kk] = torch.as_tensor(x["topk_ids"])
            topk_logprobs[i, :n, :kk] = torch.as_tensor(x["topk_logprobs"], dtype=torch.float32)
            has_topk[i, :n] = torch.as_tensor(x["topk_mask"], dtype=torch.bool)
    shifted = {
        "input_ids": ids, "attention_mask": attention,
        "labels": ids[:, 1:], "reason_mask": reason[:, 1:], "act_mask": act[:, 1:], "has_topk": has_topk[:, 1:],
    }
    if k:
        shifted["topk_ids"] = topk_ids[:, 1:]
        shifted["topk_logprobs"] = topk_logprobs[:, 1:]
    return shifted


def uses_stored_topk(config: DistillConfig) -> bool:
    """Offline KD: the teacher signal is the trajectories' top-k (only tokens that have it carry loss)."""
    return config.method != "sft" and not config.teacher


def flat_mask(reason, act, valid):
    """Every real target position from the first thought/action token on (the flat sequence after the
    prompt: thoughts, actions, observations, the format's labels); works on torch [B, T] and numpy [T]."""
    loss = reason | act
    return (loss.cumsum(-1) > 0) & (valid != 0)


def loss_masks(batch: dict, config: DistillConfig):
    """(reason, act) target masks [B, T-1] of a collated batch: with a stored top-k teacher, only the tokens
    that have a teacher row. flat_kd: the act mask is every target after the prompt that is not a thought."""
    reason, act = batch["reason_mask"], batch["act_mask"]
    if config.method == "flat_kd":
        return reason, flat_mask(reason, act, batch["attention_mask"][:, 1:]) & ~reason
    if uses_stored_topk(config):
        reason, act = reason & batch["has_topk"], act & batch["has_topk"]
    return reason, act


def example_counts(example: dict, config: DistillConfig) -> tuple[int, int, int]:
    """(reason targets, act targets, tokens) of one example, as loss_masks counts them after collate."""
    import numpy as np

    reason, act = np.asarray(example["reason_mask"][1:]), np.asarray(example["act_mask"][1:])
    if config.method == "flat_kd":
        act = flat_mask(reason, act, np.ones_like(reason)) & ~reason
    if uses_stored_topk(config):
        has = (np.asarray(example["topk_mask"][1:]) if example.get("topk_mask") is not None
               else np.zeros_like(reason))
        reason, act = reason & has, act & has
    return int(reason.sum()), int(act.sum()), len(example["input_ids"])


def check_teacher_signal(examples: list[dict], config: DistillConfig) -> None:
    """sad / token_kd need a teacher: --teacher, or top-k log-probs stored in the trajectories."""
    if not uses_stored_topk(config):
        return
    if not any(e.get("topk_mask") is not None and bool(e["topk_mask"].any()) for e in examples):
        raise ValueError(
            f"--method {config.method} needs a teacher signal, but {config.trajectories} stores no teacher top-k "
            "log-probs: give --teacher MODEL_DIR (online teacher, same tokenizer), or roll out with "
            "`raysad rollout --topk K`, or use --method sft (imitation, needs no teacher)")
    if not any(sum(example_counts(e, config)[:2]) for e in examples):
        raise ValueError(f"{config.trajectories}: no reason/act token has a stored teacher top-k row")


# ---------------------------------------------------------------------------------------- models -----
def load_tokenizer(config: DistillConfig):
    """The student's tokenizer: --tokenizer, else the student directory's, else the teacher's."""
    from raysad import models

    source = config.tokenizer or (config.student if Path(config.student).is_dir() else None) or config.teacher
    if source is None:
        raise ValueError(f"--student {config.student!r} is a size name: give --tokenizer (or --teacher) "
                         "so the student shares the teacher's tokenizer")
    return models.load_tokenizer(source)


def load_student(config: DistillConfig, device: str | None = None):
    """(model, tokenizer): an HF directory, or a tiny model built from a size name and a tokenizer dir.
    Float32 weights (bf16 is applied by autocast), on `device`."""
    from raysad import models

    tokenizer = load_tokenizer(config)
    device = device or "cpu"
    if Path(config.student).is_dir():
        return models.load_model(config.student, dtype="float32", device=device), tokenizer
    if config.student not in models.TINY_SIZES:
        raise ValueError(f"--student {config.student!r}: neither a model directory nor a tiny size name "
                         f"({', '.join(models.TINY_SIZES)})")
    return models.build_tiny_model(config.student, tokenizer, seed=config.seed).to(device), tokenizer


def load_teacher(config: DistillConfig, tokenizer, student, device):
    """The online teacher (eval, no grad), after checking it shares the student's tokenizer."""
    from raysad import models

    teacher = models.load_model(config.teacher, device=str(device))
    teacher.requires_grad_(False)
    models.check_same_tokenizer(models.load_tokenizer(config.teacher), tokenizer, teacher, student)
    return teacher


def lr_at(step: int, total: int, config) -> float:
    """Warm-up then cosine/linear decay to min_lr_ratio·lr (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) if config.schedule == "cosine" else 1 - progress
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * max(shape, 0.0))


def hidden_states(model, input_ids, attention_mask, vocab: int):
    """HiddenStates(final hidden [B, T, H], lm_head [V, H]) of a causal LM: the decoder's output (final norm
    included) and the output embedding's first `vocab` rows (padded rows carry no token)."""
    from raysad.losses import HiddenStates

    head_module = model.get_output_embeddings()
    if getattr(head_module, "bias", None) is not None or getattr(model.config, "final_logit_softcapping", None) \
            or getattr(model.config, "logit_scale", None) not in (None, 1.0):
        raise ValueError(f"{type(model).__name__}: logits are not hidden @ lm_head.T (bias, soft-capping or "
                         "scaling); raysad.distill supports plain LM heads (Llama, Qwen2, Mistral, SmolLM ...)")
    body = model.base_model  # the decoder under the LM head (model.model for Llama, Qwen2, Mistral ...)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = head_module.weight
    return HiddenStates(hidden, head if head.shape[0] == vocab else head[:vocab])


def batch_loss(student, teacher, batch: dict, config: DistillConfig, normalizers: dict | None = None):
    """The method's loss on one (micro-)batch: (total with grad, detached sums for logging).

    `student` is HiddenStates (or logits) aligned with batch["labels"]; `teacher` is HiddenStates/logits
    (online), None (offline: batch's stored top-k is used; sft: unused). `normalizers` (reason, act, used)
    replace the local token counts as divisors of total (global count / workers); None = local means.
    Sums: reason, act (divergence, or CE for sft), ce (CE over reason ∪ act) and their token counts.
    """
    import torch

    from raysad.losses import TopK, ce_loss, sad_loss

    reason, act = loss_masks(batch, config)
    n_reason, n_act = int(reason.sum()), int(act.sum())
    norms = normalizers or {"reason": max(n_reason, 1), "act": max(n_act, 1), "used": max(n_reason + n_act, 1)}
    labels = batch["labels"]
    if config.method == "sft":
        # two passes over disjoint masks, so reason and act CE are logged apart; their sum is CE over the union
        parts = [ce_loss(student, labels, mask, chunk_size=config.loss_chunk_size, normalizer=norms["used"])
                 for mask in (reason, act)]
        total = parts[0] + parts[1]
        reason_sum, act_sum = (p.detach() * norms["used"] for p in parts)
        ce_sum = reason_sum + act_sum
    else:
        if teacher is None and "topk_ids" not in batch:  # no stored rows in this batch: masks are empty
            empty = torch.zeros((*labels.shape, 1), dtype=torch.long, device=labels.device)
            teacher = TopK(empty, empty.float())
        elif teacher is None:
            teacher = TopK(batch["topk_ids"], batch["topk_logprobs"])
        # token_kd / flat_kd: one divergence over reason ∪ act (flat: ∪ the rest), both normalised by |used|
        token_kd = config.method in ("token_kd", "flat_kd")
        out = sad_loss(student, teacher, reason, act,
                       lambda_reason=1.0 if token_kd else config.lambda_reason,
                       lambda_act=1.0 if token_kd else config.lambda_act,
                       kind=config.divergence, beta=config.beta, temperature=config.temperature,
                       ce_weight=config.ce_weight, labels=labels, chunk_size=config.loss_chunk_size,
                       reason_normalizer=norms["used"] if token_kd else norms["reason"],
                       act_normalizer=norms["used"] if token_kd else norms["act"],
                       ce_normalizer=norms["used"])
        total = out.total
        reason_sum, act_sum = out.reason_loss * n_reason, out.act_loss * n_act
        ce_sum = out.ce_loss * (n_reason + n_act)
    sums = torch.tensor([float(total.detach()), float(reason_sum), float(act_sum), float(ce_sum),
                         float(n_reason), float(n_act)], dtype=torch.float64)
    return total, sums


def step_loss(sums, config: DistillConfig, world: int) -> dict[str, float]:
    """Metrics of a step from the summed `batch_loss` sums of all micro-batches and workers."""
    total, reason_sum, act_sum, ce_sum, n_reason, n_act = (float(x) for x in sums)
    return {"distill/loss": total / world,
            "distill/reason_loss": reason_sum / max(n_reason, 1.0),
            "distill/act_loss": act_sum / max(n_act, 1.0),
            "distill/ce_loss": ce_sum / max(n_reason + n_act, 1.0),
            "distill/reason_tokens": n_reason, "distill/act_tokens": n_act}


def _as_dtype(states, dtype):
    """HiddenStates with hidden and lm_head in one dtype (None: the lm_head's), as the loss's matmul needs."""
    if states is None:
        return None
    dtype = dtype or states.lm_head.dtype
    return type(states)(states.hidden.to(dtype), states.lm_head.to(dtype))


def student_with_loss(student, config: DistillConfig, vocab: int):
    """A torch module whose forward runs the student *and* its loss, so DDP / FSDP see every parameter used
    inside their forward (calling model.model directly would bypass DDP's hooks)."""
    import torch

    class StudentWithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, batch, teacher_hidden, normalizers, low_precision: bool):
            with torch.autocast(batch["input_ids"].device.type, torch.bfloat16, enabled=low_precision):
                hidden = hidden_states(self.student, batch["input_ids"], batch["attention_mask"], vocab)
            hidden = type(hidden)(hidden.hidden[:, :-1], hidden.lm_head)  # position t predicts t+1
            # the chunked loss runs outside autocast, on explicit dtypes: bf16 matmuls (softmax maths in
            # float32 inside raysad.losses); gradients reach the float32 lm_head through the cast
            return batch_loss(_as_dtype(hidden, torch.bfloat16 if low_precision else None), teacher_hidden,
                              batch, config, normalizers)

    return StudentWithLoss()


# -------------------------------------------------------------------------------------- checkpoints ----
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


def _fingerprint(config: DistillConfig) -> dict[str, Any]:
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


def check_resumable(checkpoint: Path, config: DistillConfig) -> int:
    """The step a checkpoint resumes at, after checking it comes from a run with the same data and maths."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    saved, now = meta["fingerprint"], _fingerprint(config)
    differ = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if differ:
        raise ValueError(f"{checkpoint}: cannot resume, the run changed ({'; '.join(differ)}). "
                         "Rerun with --no-resume to start again, or use another --out")
    return int(meta["step"])


# ------------------------------------------------------------------------------------ the worker loop --
def train_worker(args: dict) -> None:
    """Ray Train's per-worker function (also run in-process for workers=0)."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    config = DistillConfig(**args["config"])
    examples = args["examples"]
    if isinstance(examples, ray.ObjectRef):
        examples = ray.get(examples)
    batches, counts = args["batches"], args["counts"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    if config.gpus_per_worker > 0 and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device() if config.workers else torch.device("cuda")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    autocast = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    torch.manual_seed(config.seed)
    student, tokenizer = load_student(config, device=str(device))
    vocab = len(tokenizer)
    teacher = load_teacher(config, tokenizer, student, device) if config.teacher and config.method != "sft" else None
    out, total_steps = Path(config.out), len(batches)

    # restore: the checkpoint Ray Train hands back (worker restart, or a run restarted with the same
    # name + storage), else (in-process runs) the one the driver found
    start = 0
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = load_state(path)
    elif args.get("resume_from"):
        state = load_state(args["resume_from"])
    if state is not None:
        if state["fingerprint"] != _fingerprint(config):
            raise ValueError("checkpoint from a run with other data or settings; rerun with --no-resume")
        student.load_state_dict(state["model"])
        start = state["step"]

    module = student_with_loss(student, config, vocab)
    student.train()
    if distributed and config.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(student.base_model, "layers", []):
            fully_shard(layer)
        fully_shard(module)
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    if state is not None:
        _load_optimizer(optimizer, module, state["optimizer"], config, distributed)
    del state

    places = _worker_places(rank, world, distributed, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / WORKERS_FILE).write_text(json.dumps(places, indent=1) + "\n")
    log = _RankZeroLog(args, config, rank, start, student) if rank == 0 else None
    last_checkpoint = None
    try:
        for step in range(start, total_steps):
            began = time.perf_counter()
            torch.manual_seed(config.seed * 1_000_003 + step * 1009 + rank)  # dropout etc.: a function of the step
            batch_ids = batches[step]
            step_counts = [counts[i] for i in batch_ids]
            n_reason, n_act = sum(c[0] for c in step_counts), sum(c[1] for c in step_counts)
            normalizers = {"reason": max(n_reason, 1) / world, "act": max(n_act, 1) / world,
                           "used": max(n_reason + n_act, 1) / world}
            mine = batch_ids[rank::world]
            n_micro = math.ceil(math.ceil(len(batch_ids) / world) / config.micro_batch_size)  # same on every rank
            lr = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(7, dtype=torch.float64)
            for m in range(n_micro):
                ids = mine[m * config.micro_batch_size:(m + 1) * config.micro_batch_size]
                items = [examples[i] for i in ids] or [examples[batch_ids[0]]]
                batch = collate(items, tokenizer.pad_token_id)
                if not ids:  # a rank with less data still joins every gradient sync, with zero weight
                    for key in ("reason_mask", "act_mask", "has_topk"):
                        batch[key] = torch.zeros_like(batch[key])
                batch = {k: v.to(device) for k, v in batch.items()}
                teacher_hidden = None
                if teacher is not None:
                    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                        t = hidden_states(teacher, batch["input_ids"], batch["attention_mask"], vocab)
                    teacher_hidden = _as_dtype(type(t)(t.hidden[:, :-1], t.lm_head),
                                               torch.bfloat16 if autocast else None)
                with _no_sync(module, distributed, config, last=m == n_micro - 1):
                    total, micro_sums = module(batch, teacher_hidden, normalizers, autocast)
                total.backward()
                sums[:6] += micro_sums
                sums[6] += float(batch["attention_mask"].sum()) if ids else 0.0
            if distributed:
                dist.all_reduce(sums)
            grad_norm = _clip(student, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if config.fail_once_at_step and step + 1 == config.fail_once_at_step and rank == world - 1:
                _fail_once(out)
            metrics = step_loss(sums[:6].tolist(), config, world)
            seconds = time.perf_counter() - began
            metrics.update({"distill/lr": lr, "distill/grad_norm": grad_norm,
                            "distill/tokens_per_s": float(sums[6]) / seconds, "distill/tokens": float(sums[6])})
            if log is not None:
                log.step(step, total_steps, metrics)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == total_steps:
                last_checkpoint = _save_checkpoint(step + 1, module, student, optimizer, config, args, rank,
                                                   distributed, metrics)
        if start >= total_steps:  # resumed a finished run: report once so the run has a result
            ray.train.report({"distill/step": total_steps})
        _save_final(module, student, tokenizer, config, rank, distributed)
        if log is not None:
            log.finish(total_steps, last_checkpoint)
    finally:
        if log is not None:
            log.close()


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


def _no_sync(module, distributed: bool, config: DistillConfig, last: bool):
    """Gradient accumulation: sync gradients across workers on the last micro-batch only."""
    import contextlib

    if not distributed or last:
        if distributed and config.strategy == "fsdp":
            module.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if config.strategy == "fsdp":
        module.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return module.no_sync()


def _clip(student, max_norm: float) -> float:
    import torch

    params = [p for p in student.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    return float(norm)


def _fail_once(out: Path) -> None:
    marker = out / FAIL_MARKER
    if marker.exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"injected failure, pid {os.getpid()}\n")
    raise RuntimeError("raysad.distill: injected failure (fail_once_at_step test hook)")


def _full_state(module, student, optimizer, config: DistillConfig, distributed: bool):
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


def _load_optimizer(optimizer, module, optim_state, config: DistillConfig, distributed: bool) -> None:
    if distributed and config.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_state)


def _save_checkpoint(step, module, student, optimizer, config, args, rank, distributed, metrics) -> str | None:
    """Rank 0 writes model + optimizer + step; every rank reports (Ray Train syncs on it)."""
    import ray.train
    import torch

    model_state, optim_state = _full_state(module, student, optimizer, config, distributed)
    name = f"checkpoint_{step:06d}"
    local = not config.workers  # in-process: write straight into the run folder (Ray does not copy there)
    folder = Path(args["run_dir"]) / name if local else Path(tempfile.mkdtemp(prefix="raysad-ckpt-"))
    checkpoint = None
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        # tensors and plain containers only (no RNG states or other objects): loadable with weights_only=True
        torch.save({"model": model_state, "optimizer": optim_state, "step": int(step),
                    "fingerprint": _fingerprint(config)}, folder / STATE_FILE)
        # meta.json last: a checkpoint without it is incomplete (latest_checkpoint skips it)
        (folder / "meta.json").write_text(json.dumps({"step": step, "fingerprint": _fingerprint(config)}))
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report({"distill/step": step, **metrics}, checkpoint=checkpoint, checkpoint_dir_name=name)
    if local and rank == 0:
        kept = sorted(Path(args["run_dir"]).glob("checkpoint_*"))
        for old in kept[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
    elif rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return str(Path(args["run_dir"]) / name)


def _save_final(module, student, tokenizer, config, rank, distributed) -> None:
    """The student as an HF directory (model + tokenizer) in `out`, written by rank 0."""
    from raysad.models import save_tokenizer
    from raysad.report import STUDENT_LABELS, student_labels

    model_state, _ = _full_state(module, student, None, config, distributed)
    if rank != 0:
        return
    out = Path(config.out)
    student.eval()
    student.save_pretrained(out, state_dict=model_state)
    save_tokenizer(tokenizer, out)
    # the labels evaluate reads (raysad.json), so a hand-run distill -> evaluate -> report names the method
    (out / STUDENT_LABELS).write_text(json.dumps(student_labels(config), indent=1) + "\n")


def _say(line: str) -> None:
    """A progress line from a worker. Straight to the process's stdout (Ray forwards it to the driver):
    Ray Train's patched print would show it twice (once through its logger)."""
    import sys

    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


class _RankZeroLog:
    """Rank 0's outputs: train_log.jsonl (truncated to the restored step), MLflow metrics, progress lines."""

    def __init__(self, args: dict, config: DistillConfig, rank: int, start: int, student):
        from raysad.models import parameter_count

        self.config = config
        self.path = Path(config.out) / TRAIN_LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():  # steps after the restored checkpoint are done again: drop their old lines
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < start]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.mlflow = None
        self.started_run = False
        self.began = time.perf_counter()
        self.last: dict[str, float] = {}
        tracking = args.get("mlflow")
        if tracking:
            import mlflow

            mlflow.set_tracking_uri(tracking["uri"])
            active = mlflow.active_run()
            if active is None or active.info.run_id != tracking["run_id"]:
                mlflow.start_run(run_id=tracking["run_id"])
                self.started_run = True
            self.mlflow = mlflow
            params = parameter_count(student)
            mlflow.set_tag("student_params", str(params))
            mlflow.log_metric("distill/params", params)
        if start:
            _say(f"distill: resumed at step {start}")

    def step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.last = metrics
        self.file.write(json.dumps({"step": step, **{k.removeprefix("distill/"): v for k, v in metrics.items()}})
                        + "\n")
        self.file.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
        if (step + 1) % self.config.log_every == 0 or step == 0 or step + 1 == total:
            m = metrics
            _say(f"distill step {step + 1}/{total}  loss {m['distill/loss']:.4f}  "
                 f"reason {m['distill/reason_loss']:.4f}  act {m['distill/act_loss']:.4f}  "
                 f"ce {m['distill/ce_loss']:.4f}  lr {m['distill/lr']:.2e}  "
                 f"tok/s {m['distill/tokens_per_s']:.0f}")

    def finish(self, total: int, checkpoint: str | None) -> None:
        import resource

        import torch

        final = {"distill/steps": total, "distill/train_seconds": time.perf_counter() - self.began,
                 "distill/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            final["distill/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        summary = {**self.last, **final, "checkpoint": checkpoint}
        (Path(self.config.out) / "distill_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.mlflow is not None:
            self.mlflow.log_metrics(final)

    def close(self) -> None:
        self.file.close()
        if self.started_run:
            self.mlflow.end_run()


# ---------------------------------------------------------------------------------------- the driver ----
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


def _tracking_uri(config: DistillConfig) -> str:
    from raysad import tracking

    uri = tracking.tracking_uri(config.tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:
        uri = str(Path(uri).resolve())
    return uri


def content_sha256(path: str | Path) -> str:
    """SHA-256 of a trajectories file's bytes (and of a Parquet output's unmerged parts, `<path>.parts/`)."""
    import hashlib

    digest = hashlib.sha256()
    parts = Path(str(path) + ".parts")
    for file in [Path(path), *(sorted(p for p in parts.iterdir() if p.is_file()) if parts.is_dir() else [])]:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def prepare(config: DistillConfig) -> tuple[DistillConfig, dict]:
    """Check and encode everything on the driver (clear errors before any worker starts): the worker args."""
    config = _absolute(config)
    if not Path(config.trajectories).is_file():
        raise ValueError(f"--trajectories {config.trajectories}: file not found")
    if config.method == "sft" and config.teacher:
        print("distill: --method sft imitates the trajectories' tokens; --teacher is not used")
    config = derive_student(config)
    config = dataclasses.replace(config, trajectories_sha256=content_sha256(config.trajectories))
    tokenizer = load_tokenizer(config)
    if config.teacher and config.method != "sft":  # fail here, not in every worker
        from raysad import models

        models.check_same_tokenizer(models.load_tokenizer(config.teacher), tokenizer)
    data_stats: dict = {}
    examples = load_examples(config, tokenizer, data_stats)
    check_teacher_signal(examples, config)
    storage = config.storage or str(Path(config.out) / "checkpoints")
    run_dir = storage.rstrip("/") + "/" + RUN_NAME
    resume_from = None
    if "://" not in run_dir:
        if not config.resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif (found := latest_checkpoint(run_dir)) is not None:
            check_resumable(found, config)
            resume_from = str(found)
    batches = step_batches(examples, config)
    args = {"examples": examples, "batches": batches, "counts": [example_counts(e, config) for e in examples],
            "storage": storage, "run_dir": run_dir, "resume_from": resume_from if not config.workers else None,
            "data_stats": data_stats}
    return config, args


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
    config, args = prepare(config)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    run = contextlib.nullcontext()
    if track:
        from raysad import tracking
        from raysad.config import flatten

        uri = _tracking_uri(config)
        student_size = spec if not Path(spec).is_dir() else Path(spec).name
        run = tracking.start_run(config.experiment, config.run_name or f"distill-{config.method}",
                                 {**flatten(config), "student": spec},
                                 tags={"stage": config.stage, "method": config.method, "student_size": student_size},
                                 uri=uri)
    data_stats = args.pop("data_stats")
    with run as active:
        if active is not None:
            args["mlflow"] = {"run_id": active.info.run_id, "uri": uri}
            tracking.log_metrics(data_stats)
        result = _fit(config, args)
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


def _fit(config: DistillConfig, args: dict):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raysad.cluster import init_ray

    worker_args = {**args, "config": dataclasses.asdict(config)}
    if config.workers:
        init_ray(config.ray_address, config.num_cpus)
        worker_args["examples"] = ray.put(args["examples"])
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {}),
                 **config.worker_resources}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_args,
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
    from rich.console import Console

    from raysad.config import build_config

    config = build_config(DistillConfig, config_path, **flags)
    result = run_distill(config)
    m = result.metrics
    Console().print(f"[green]distill[/green] ({config.method}): {result.steps} steps, final loss "
                    f"{m.get('distill/loss', float('nan')):.4f}, student saved to [bold]{result.out}[/bold]")
    Console().print(f"data: {m.get('data/examples', 0):.0f} examples, {m.get('data/reason_tokens', 0):.0f} reason "
                    f"and {m.get('data/act_tokens', 0):.0f} act tokens; dropped by --max-length "
                    f"{config.max_length}: {m.get('data/dropped_loss_tokens', 0):.0f} loss tokens, "
                    f"{m.get('data/dropped_prompt_tokens', 0):.0f} prompt tokens")
    return result
