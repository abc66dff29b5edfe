"""One rank's training loop in plain torch: set-up -> loss step -> loop (checkpoints: raysad.checkpoints). No Ray.

    train(config, batches, normalizers, examples_from, state, place)

Whoever places the ranks (Ray Train, in raysad.distill) hands each one a `Placement` (rank, world, device,
how to report a checkpoint), its restored checkpoint state (or None) and `examples_from(step)`: its examples
from that step on, in step order. One optimizer step on one rank:
  1. its examples of the step's global batch (rank r takes r, r+W, ...), split into micro-batches (gradient
     accumulation; every rank runs the same number, padded with zero-weight micro-batches);
  2. student forward to its final hidden states (the logits are never materialised: the losses take
     `HiddenStates(hidden, lm_head)` and work chunk by chunk); teacher signal from the examples' stored top-k
     (offline) or a teacher model on the same device (online, full distribution);
  3. the method's loss (raysad.losses.METHODS), its sums normalised by the *global* token counts of the step
     divided by the number of ranks, so N ranks and gradient accumulation give the same update as one rank
     on the whole batch (the counts come with the plan: no communication needed).
Random numbers are reseeded per step from (seed, step, rank), so a resumed run draws the same ones without
saving RNG state. Checkpoints hold tensors and plain containers only (loaded with weights_only=True).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from raysad.checkpoints import fingerprint, full_state, load_optimizer, write_checkpoint

TRAIN_LOG = "train_log.jsonl"
WORKERS_FILE = "workers.json"   # where each rank ran: [{rank, node_id, host, pid, device}]
FAIL_MARKER = ".injected_failure"  # written by the fail_once_at_step test hook


# ------------------------------------------------------------------------------------------- set-up ----
def tokenizer_source(config) -> str:
    """Where the student's tokenizer is: --tokenizer, else the student directory, else the teacher."""
    source = config.tokenizer or (config.student if Path(config.student).is_dir() else None) or config.teacher
    if source is None:
        raise ValueError(f"--student {config.student!r} is a size name: give --tokenizer (or --teacher) "
                         "so the student shares the teacher's tokenizer")
    return source


def reads_teacher(config) -> bool:
    from raysad.losses import get_method

    return get_method(config.method).uses_teacher


def load_tokenizer(config):
    """The student's tokenizer (tokenizer_source)."""
    from raysad import models

    return models.load_tokenizer(tokenizer_source(config))


def load_student(config, device: str | None = None):
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


def load_teacher(config, tokenizer, student, device):
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


def batch_loss(student, teacher, batch: dict, config, normalizers: dict | None = None):
    """The method's loss on one (micro-)batch: (total with grad, detached sums for logging).

    `student` is HiddenStates (or logits) aligned with batch["labels"]; `teacher` is HiddenStates/logits
    (online), None (offline: batch's stored top-k is used; sft: unused). `normalizers` (reason, act, used)
    replace the local token counts as divisors of total (global count / workers); None = local means.
    Sums: reason, act (divergence, or CE for sft), ce (CE over reason ∪ act) and their token counts.
    """
    import torch

    from raysad.data import loss_masks
    from raysad.losses import TopK, get_method

    method = get_method(config.method)
    reason, act = loss_masks(batch, config)
    n_reason, n_act = int(reason.sum()), int(act.sum())
    norms = normalizers or {"reason": max(n_reason, 1), "act": max(n_act, 1), "used": max(n_reason + n_act, 1)}
    labels = batch["labels"]
    if method.uses_teacher and teacher is None:  # offline: the batch's stored top-k rows
        if "topk_ids" in batch:
            teacher = TopK(batch["topk_ids"], batch["topk_logprobs"])
        else:  # no stored rows in this batch: its masks are empty
            empty = torch.zeros((*labels.shape, 1), dtype=torch.long, device=labels.device)
            teacher = TopK(empty, empty.float())
    out = method.loss(student, teacher, labels, reason, act, config, norms)
    sums = torch.tensor([float(out.total.detach()), float(out.reason_sum), float(out.act_sum), float(out.ce_sum),
                         float(n_reason), float(n_act)], dtype=torch.float64)
    return out.total, sums


def step_loss(sums, config, world: int) -> dict[str, float]:
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


def student_with_loss(student, config, vocab: int):
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


# ------------------------------------------------------------------------------------------ the loop ----
@dataclass
class Placement:
    """Where one rank runs and how it reports (Ray Train's side lives in raysad.distill)."""
    rank: int
    world: int
    distributed: bool                 # torch.distributed is initialised over `world` ranks (DDP / FSDP)
    device: Any
    # every rank calls report(step, metrics, folder) after a checkpoint (folder: what rank 0 wrote, else None)
    # and once at the end of a resumed finished run (folder None); it returns the checkpoint's lasting path
    report: Callable[[int, dict, Path | None], str]
    checkpoint_folder: Callable[[int], Path]  # where rank 0 writes the checkpoint of a step
    places: list[dict] | None = None          # where every rank runs (rank 0 writes workers.json)
    tracking: dict | None = None              # {"uri", "run_id"}: rank 0 logs its metrics to that MLflow run


def train(config, batches: list[list[int]], normalizers: list[tuple[int, int]],
          examples_from: Callable[[int], Iterator[dict]], state: dict | None, place: Placement) -> None:
    """Train config.student on `batches` (global example positions per step, from raysad.data.step_batches),
    from the restored `state` on; rank 0 saves the student to config.out with its train_log.jsonl."""
    model = _set_up(config, state, place)
    del state
    start, total_steps = model.start, len(batches)
    out = Path(config.out)
    if place.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / WORKERS_FILE).write_text(json.dumps(place.places, indent=1) + "\n")
    examples = examples_from(start)
    log = _RankZeroLog(place.tracking, config, start, model.student) if place.rank == 0 else None
    last_checkpoint = None
    try:
        for step in range(start, total_steps):
            metrics = _train_step(config, model, place, step, total_steps, batches[step], normalizers[step], examples)
            if config.fail_once_at_step and step + 1 == config.fail_once_at_step and place.rank == place.world - 1:
                _fail_once(out)
            if log is not None:
                log.step(step, total_steps, metrics)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == total_steps:
                folder = place.checkpoint_folder(step + 1) if place.rank == 0 else None
                write_checkpoint(step + 1, model.module, model.student, model.optimizer, config, place.rank,
                                 place.distributed, folder)
                last_checkpoint = place.report(step + 1, metrics, folder)
        if start >= total_steps:  # resumed a finished run: report once so the run has a result
            place.report(total_steps, {}, None)
        _save_final(model.module, model.student, model.tokenizer, config, place.rank, place.distributed)
        if log is not None:
            log.finish(total_steps, last_checkpoint)
    finally:
        if log is not None:
            log.close()


@dataclass
class _Model:
    student: Any
    tokenizer: Any
    teacher: Any
    module: Any        # the student with its loss, wrapped by DDP / FSDP when distributed
    optimizer: Any
    start: int         # the step training continues from
    autocast: bool


def _set_up(config, state: dict | None, place: Placement) -> _Model:
    import torch

    device = place.device
    autocast = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    torch.manual_seed(config.seed)
    student, tokenizer = load_student(config, device=str(device))
    teacher = load_teacher(config, tokenizer, student, device) if config.teacher and reads_teacher(config) else None
    start = 0
    if state is not None:
        if state["fingerprint"] != fingerprint(config):
            raise ValueError("checkpoint from a run with other data or settings; rerun with --no-resume")
        student.load_state_dict(state["model"])
        start = state["step"]
    module = student_with_loss(student, config, len(tokenizer))
    student.train()
    if place.distributed and config.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(student.base_model, "layers", []):
            fully_shard(layer)
        fully_shard(module)
    elif place.distributed:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    if state is not None:
        load_optimizer(optimizer, module, state["optimizer"], config, place.distributed)
    return _Model(student, tokenizer, teacher, module, optimizer, start, autocast)


def _train_step(config, model: _Model, place: Placement, step: int, total_steps: int, batch_ids: list[int],
                counts: tuple[int, int], examples: Iterator[dict]) -> dict[str, float]:
    """One optimizer step on this rank (all ranks together: the gradient sync): its metrics."""
    import torch
    import torch.distributed as dist

    from raysad.data import collate, micro_batches, padded_positions, rank_rows, take

    began = time.perf_counter()
    rank, world, device = place.rank, place.world, place.device
    torch.manual_seed(config.seed * 1_000_003 + step * 1009 + rank)  # dropout etc.: a function of the step
    n_reason, n_act = counts
    normalizers = {"reason": max(n_reason, 1) / world, "act": max(n_act, 1) / world,
                   "used": max(n_reason + n_act, 1) / world}
    mine, filler = rank_rows(batch_ids, rank, world)
    step_examples = take(examples, len(mine), f"rank {rank}, step {step}")
    n_micro = math.ceil(math.ceil(len(batch_ids) / world) / config.micro_batch_size)  # the same on every rank
    lr = lr_at(step, total_steps, config)
    for group in model.optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(8, dtype=torch.float64)
    for m, items in enumerate(micro_batches(step_examples, config.micro_batch_size, n_micro)):
        real = bool(items) and not filler
        batch = collate(items or step_examples[:1], model.tokenizer.pad_token_id)
        if not real:  # a rank with less data still joins every gradient sync, with zero weight
            for key in ("reason_mask", "act_mask", "has_topk"):
                batch[key] = torch.zeros_like(batch[key])
        batch = {k: v.to(device) for k, v in batch.items()}
        teacher_hidden = None
        if model.teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=model.autocast):
                t = hidden_states(model.teacher, batch["input_ids"], batch["attention_mask"], len(model.tokenizer))
            teacher_hidden = _as_dtype(type(t)(t.hidden[:, :-1], t.lm_head),
                                       torch.bfloat16 if model.autocast else None)
        with _no_sync(model.module, place.distributed, config, last=m == n_micro - 1):
            total, micro_sums = model.module(batch, teacher_hidden, normalizers, model.autocast)
        total.backward()
        sums[:6] += micro_sums
        sums[6] += float(batch["attention_mask"].sum()) if real else 0.0
        sums[7] += padded_positions(items) if real else 0.0
    if place.distributed:
        dist.all_reduce(sums)
    grad_norm = _clip(model.student, config.max_grad_norm)
    model.optimizer.step()
    model.optimizer.zero_grad(set_to_none=True)
    metrics = step_loss(sums[:6].tolist(), config, world)
    seconds = time.perf_counter() - began
    metrics.update({"distill/lr": lr, "distill/grad_norm": grad_norm,
                    "distill/tokens_per_s": float(sums[6]) / seconds, "distill/tokens": float(sums[6]),
                    "distill/pad_frac": 1.0 - float(sums[6]) / max(float(sums[7]), 1.0)})
    return metrics



def _no_sync(module, distributed: bool, config, last: bool):
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


def _save_final(module, student, tokenizer, config, rank, distributed) -> None:
    """The student as an HF directory (model + tokenizer) in `out`, written by rank 0."""
    from raysad.models import save_tokenizer
    from raysad.report import STUDENT_LABELS, student_labels

    model_state, _ = full_state(module, student, None, config, distributed)
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

    def __init__(self, tracking: dict | None, config, start: int, student):
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
        self.client, self.run_id = None, None  # MLflow: rank 0 logs to the driver's run without making it active
        self.logged_through = -1  # the last step already in the MLflow run (a resumed run's redone steps)
        self.began = time.perf_counter()
        self.last: dict[str, float] = {}
        if tracking:
            from mlflow.tracking import MlflowClient

            # a client, not mlflow.start_run: an active run in a Train worker would be ended FINISHED by MLflow's
            # exit hook when the worker is stopped, e.g. because its driver was killed mid-run
            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]
            if start:  # the steps after the checkpoint are redone with the same values (the resume is exact):
                # those logged before the interruption are not logged twice
                history = self.client.get_metric_history(self.run_id, "distill/loss")
                self.logged_through = max((m.step for m in history), default=-1)
            params = parameter_count(student)
            self.client.set_tag(self.run_id, "student_params", str(params))
            self._log({"distill/params": params})
        if start:
            _say(f"distill: resumed at step {start}")

    def step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.last = metrics
        self.file.write(json.dumps({"step": step, **{k.removeprefix("distill/"): v for k, v in metrics.items()}})
                        + "\n")
        self.file.flush()
        if step > self.logged_through:
            self._log(metrics, step)
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
        self._log(final)

    def _log(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.file.close()
