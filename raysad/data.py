"""Training data: trajectories -> encoded examples (`Example`) -> the run's order -> micro-batches (`Batch`).

    examples, stats = load_examples_and_stats(config, tokenizer)  # in this process (workers 0, prune, tests)
    source = data_stream.encode_on_cluster(config, tok)          # Ray Data: the driver holds no example
    batches = step_batches(source.stats, config)                 # [step] -> example positions
    datasets = data_stream.rank_datasets(source, batches, 2)     # {"rank_0": Dataset, "rank_1": Dataset}

An *example* is one trajectory encoded for the student (raysad.encoding.encode_trajectory): input_ids, the
reason/act masks and, when the rollout stored them, the teacher's top-k rows. Examples are numbered by their
position among the trajectories that have a loss token (the file's order), and every later step refers to them
by that position, so the run's batch sequence is a pure function of (data, config): resume and "N workers ==
one worker" hold by construction.

On a cluster (raysad.data_stream) the file is cut into shards (raysad.trajectory_reader.shards: JSONL byte ranges,
Parquet row groups); Ray Data reads and encodes them in tasks and keeps the examples as blocks in the object
store (spilled to disk when they outgrow it). The driver keeps only per-example statistics (a few numbers each:
the token counts the loss normalisers need, the curriculum's complexity) and the block references. Each Train
rank then reads, through `ray.train.get_dataset_shard`, a stream of exactly its examples in step order:
Ray Data tasks gather them from the blocks (zero-copy on the node that holds a block). The tasks reserve no
CPU, so they run while the Train workers hold every CPU (a 2-core machine, a Tune trial) instead of waiting.

Nothing is lost in silence: the counts of what the data holds and what the length limit dropped become
data/... metrics and warnings; a run whose examples hold no reason token, or no act token, fails.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypedDict

import numpy as np

log = logging.getLogger(__name__)

DATA_COUNTS = ("trajectories", "examples", "skipped_no_loss_tokens", "reason_tokens", "act_tokens", "empty_thoughts",
               "truncated_turns", "truncated_examples", "dropped_prompt_tokens", "dropped_loss_tokens",
               "dropped_turns", "loss_tokens_without_teacher", "context_scored")


class Example(TypedDict, total=False):
    """One trajectory encoded for the student (encoding.encode_trajectory); arrays of one length T."""
    id: str                         # the trajectory's id
    input_ids: np.ndarray           # [T] int64
    reason_mask: np.ndarray         # [T] bool: thought tokens (with their end delimiter): [REASON]
    act_mask: np.ndarray            # [T] bool: action tokens (with their end delimiter): [ACT]
    topk_ids: np.ndarray | None     # [T, k] int64: the teacher's top-k at each generated token (rollout --topk)
    topk_logprobs: np.ndarray | None  # [T, k] float32
    topk_mask: np.ndarray | None    # [T] bool: the tokens that have a teacher row
    truncated: bool                 # cut by max_length (what was dropped: dropped_prompt_tokens, ...)


class Batch(TypedDict, total=False):
    """A collated micro-batch of examples (torch tensors, right-padded), aligned for next-token prediction:
    position t of the model's output predicts `labels[t]` (= input_ids[t + 1])."""
    input_ids: Any                  # [B, T]
    attention_mask: Any             # [B, T]
    labels: Any                     # [B, T-1]
    reason_mask: Any                # [B, T-1] bool, over the labels
    act_mask: Any                   # [B, T-1] bool
    has_topk: Any                   # [B, T-1] bool
    topk_ids: Any                   # [B, T-1, k] (only when an example has stored top-k)
    topk_logprobs: Any              # [B, T-1, k]


# ------------------------------------------------------------------------------ which tokens carry loss ----
def uses_stored_topk(config) -> bool:
    """Offline KD: the teacher signal is the trajectories' top-k (only tokens that have it carry loss)."""
    from raysad.losses import get_method

    return get_method(config.method).uses_teacher and not getattr(config, "teacher", None)


def flat_mask(reason, act, valid):
    """Every real target position from the first thought/action token on (the flat sequence after the
    prompt: thoughts, actions, observations, the format's labels); works on torch [B, T] and numpy [T]."""
    loss = reason | act
    return (loss.cumsum(-1) > 0) & (valid != 0)


def method_masks(reason, act, valid, config):
    """(reason, act) loss masks under config's method, before any teacher-row filter: flat_kd's act mask is every
    real position after the prompt that is not a thought (torch [B, T] or numpy [T])."""
    from raysad.losses import get_method

    if get_method(config.method).flat:
        act = flat_mask(reason, act, valid) & ~reason
    return reason, act


def loss_masks(batch: Batch, config):
    """(reason, act) target masks [B, T-1] of a collated batch: with a stored top-k teacher, only the tokens
    that have a teacher row. flat_kd: the act mask is every target after the prompt that is not a thought
    (stored: those with a row, which rollout --context-topk keeps at observation tokens too)."""
    reason, act = method_masks(batch["reason_mask"], batch["act_mask"], batch["attention_mask"][:, 1:], config)
    if uses_stored_topk(config):
        reason, act = reason & batch["has_topk"], act & batch["has_topk"]
    return reason, act


def example_counts(example: Example, config) -> tuple[int, int, int]:
    """(reason targets, act targets, tokens) of one example, as loss_masks counts them after collate."""
    reason, act = np.asarray(example["reason_mask"][1:]), np.asarray(example["act_mask"][1:])
    reason, act = method_masks(reason, act, np.ones_like(reason), config)
    if uses_stored_topk(config):
        has = (np.asarray(example["topk_mask"][1:]) if example.get("topk_mask") is not None
               else np.zeros_like(reason))
        reason, act = reason & has, act & has
    return int(reason.sum()), int(act.sum()), len(example["input_ids"])


# ----------------------------------------------------------------------------------------- encoding ----
def encode_all(trajectories: Iterable, tokenizer, config, first_index: int = 0) -> Iterator[tuple[Example, dict]]:
    """(example, its statistics) per trajectory, in order. Statistics: `index` (the trajectory's number in
    the file), the data counts (DATA_COUNTS' per-trajectory parts), the loss token counts under config's
    method (`loss_reason`, `loss_act`, `tokens`), `complexity` (the curriculum's score) and `has_topk`.
    An example without any reason/act token has `skipped` set (it is not trained on)."""
    from raysad.curriculum import complexity
    from raysad.agent_formats import trajectory_format
    from raysad.encoding import encode_trajectory
    from raysad.scoring import CONTEXT_TOPK

    for index, traj in enumerate(trajectories, first_index):
        example = encode_trajectory(traj, tokenizer, trajectory_format(traj), max_length=config.max_length)
        n_reason, n_act = int(example["reason_mask"].sum()), int(example["act_mask"].sum())
        has_topk = example.get("topk_mask") is not None
        reason, act = method_masks(example["reason_mask"], example["act_mask"], np.ones_like(example["act_mask"]),
                                   config)
        without_teacher = int(((reason | act) & ~example["topk_mask"]).sum()) if has_topk else 0
        loss_reason, loss_act, tokens = example_counts(example, config)
        stats = {"index": index, "skipped": n_reason + n_act == 0,
                 "empty_thoughts": sum(1 for t in traj.turns if t.token_ids is not None and not t.thought.strip()),
                 "truncated_turns": sum(1 for t in traj.turns if t.extra.get("truncated")),
                 "truncated_examples": int(bool(example["truncated"])),
                 "dropped_prompt_tokens": int(example["dropped_prompt_tokens"]),
                 "dropped_loss_tokens": int(example["dropped_loss_tokens"]),
                 "dropped_turns": int(example["dropped_turns"]),
                 "reason_tokens": n_reason, "act_tokens": n_act, "loss_tokens_without_teacher": without_teacher,
                 "loss_reason": loss_reason, "loss_act": loss_act, "tokens": tokens,
                 "complexity": float(complexity(example)),
                 "has_topk": bool(has_topk and example["topk_mask"].any()),
                 "context_scored": int(traj.extra.get(CONTEXT_TOPK) is not None)}
        yield example, stats


@dataclass
class DataStats:
    """What the driver knows of the examples: one entry per trained-on example, in example order, plus the
    run's data counts (data/... metrics)."""
    loss_reason: np.ndarray   # reason targets per example (after the method's masks)
    loss_act: np.ndarray
    tokens: np.ndarray
    complexity: np.ndarray
    has_topk: np.ndarray
    counts: dict[str, int]

    @property
    def examples(self) -> int:
        return len(self.tokens)

    def metrics(self) -> dict[str, int]:
        return {f"data/{k}": v for k, v in self.counts.items()}


STAT_FIELDS = ("index", "skipped", *DATA_COUNTS[3:], "loss_reason", "loss_act", "tokens", "complexity", "has_topk")


def columns_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """encode_all's per-example statistics as columns (one numpy array per field)."""
    return {name: np.asarray([row[name] for row in rows]) for name in STAT_FIELDS}


def summarize(columns: dict[str, np.ndarray], where: str, max_length: int | None) -> DataStats:
    """DataStats from the per-example statistics (columns, in example order; skipped examples counted, not
    kept). Fails when nothing, or no reason / no act token, is left to train on; warns about every loss."""
    skipped = columns["skipped"].astype(bool)
    kept = ~skipped
    counts = {"trajectories": len(skipped), "examples": int(kept.sum()),
              "skipped_no_loss_tokens": int(skipped.sum())}
    for key in ("empty_thoughts", "truncated_turns", "truncated_examples", "dropped_prompt_tokens",
                "dropped_loss_tokens", "dropped_turns"):
        counts[key] = int(columns[key].sum())
    for key in ("reason_tokens", "act_tokens", "loss_tokens_without_teacher", "context_scored"):
        counts[key] = int(columns[key][kept].sum())
    counts = {key: counts[key] for key in DATA_COUNTS}
    if not counts["examples"]:
        raise ValueError(f"{where}: no trajectory with reason/act tokens to train on")
    if counts["reason_tokens"] == 0 or counts["act_tokens"] == 0:
        raise ValueError(f"{where}: {counts['reason_tokens']} reason and {counts['act_tokens']} act tokens after "
                         f"encoding (max_length {max_length}): a segment with no tokens makes the loss "
                         "meaningless; check the trajectories' thoughts/actions and --max-length")
    _warn_data(counts, where, max_length)
    return DataStats(**{name: columns[name][kept] for name in ("loss_reason", "loss_act", "tokens", "complexity",
                                                               "has_topk")}, counts=counts)


def _warn_data(counts: dict, where: str, max_length: int | None) -> None:
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
        log.warning("%s: %d loss tokens have no stored teacher top-k (text-only turns; flat_kd: observation "
                    "tokens of trajectories not rolled out with --context-topk): stored-top-k KD skips them while "
                    "sft trains on them", where, counts["loss_tokens_without_teacher"])


def load_examples(config, tokenizer, stats: dict | None = None) -> list[Example]:
    """Every trajectory of config.trajectories encoded, in this process (any config with `trajectories`,
    `max_length` and `method`). `stats` (when given) receives the data/... counts."""
    examples, data = load_examples_and_stats(config, tokenizer)
    if stats is not None:
        stats.update(data.metrics())
    return examples


def load_examples_and_stats(config, tokenizer) -> tuple[list[Example], DataStats]:
    from raysad.trajectory_reader import read_trajectories

    examples, rows = [], []
    for example, row in encode_all(read_trajectories(config.trajectories), tokenizer, config):
        rows.append(row)
        if not row["skipped"]:
            examples.append(example)
    return examples, summarize(columns_of(rows), config.trajectories, config.max_length)


def check_teacher_signal(stats: DataStats | None, config) -> None:
    """sad / token_kd / flat_kd need a teacher: --teacher, or top-k log-probs stored in the trajectories (flat_kd:
    also at observation tokens)."""
    from raysad.losses import get_method

    if not uses_stored_topk(config):
        return
    if stats is None or not stats.has_topk.any():
        raise ValueError(
            f"--method {config.method} needs a teacher signal, but {config.trajectories} stores no teacher top-k "
            "log-probs: give --teacher MODEL_DIR (online teacher, same tokenizer), or roll out with "
            "`raysad rollout --topk K`, or use --method sft (imitation, needs no teacher)")
    if not (stats.loss_reason + stats.loss_act).any():
        raise ValueError(f"{config.trajectories}: no reason/act token has a stored teacher top-k row")
    if get_method(config.method).flat and not stats.counts["context_scored"]:
        raise ValueError(
            f"--method {config.method} distils observation tokens too, but {config.trajectories} stores the "
            "teacher's top-k only at generated tokens (flat KD would be token KD): give --teacher MODEL_DIR "
            "(online teacher), or roll out with `raysad rollout --topk K --context-topk`")


# ----------------------------------------------------------------------------------------- the order ----
def epoch_order(stats: DataStats, config, epoch: int, epochs_to_full: int = 0) -> list[int]:
    """The example order of an epoch: a seeded shuffle of all the data, or, under --curriculum, of its easiest
    share, which grows linearly from curriculum_start at epoch 0 to all of it at `epochs_to_full` (0: all of it).
    Shuffled within the share: batches of alike examples in sorted order gave each step a biased gradient."""
    n = stats.examples
    keep = list(range(n))
    if config.curriculum and epochs_to_full:
        from raysad.curriculum import unlocked

        ranked = sorted(range(n), key=lambda i: stats.complexity[i])  # stable: ties keep the file's order
        keep = ranked[:unlocked(n, epoch, config.curriculum_start, epochs_to_full)]
    random.Random(config.seed * 1_000_003 + epoch).shuffle(keep)
    return keep


def curriculum_pacing(stats: DataStats, config) -> tuple[int, int]:
    """(epochs over which a curriculum unlocks the data, epochs of the run). The share grows over the first
    curriculum_pace of the run: of its epochs, or, under max_steps, of its steps (as many paced epochs as fit);
    the rest trains on all of the data. Pacing over the whole run starved the hardest examples: a 300-step run
    saw its hardest tenth 1.8 times each and its easiest 19 times (a plain run: 12), and scored 5.3% against
    plain SAD's 19.3% (docs/RESULTS.md)."""
    from raysad.curriculum import unlocked

    if not config.max_steps:
        epochs = max(config.epochs, 1)
        return min(math.ceil(config.curriculum_pace * (epochs - 1)), epochs - 1), epochs
    full_epoch = math.ceil(stats.examples / config.batch_size)
    budget = config.curriculum_pace * config.max_steps
    if config.max_steps >= full_epoch:  # room for one whole epoch after the pacing: every example is trained on
        budget = min(budget, config.max_steps - full_epoch)

    def steps(paced: int) -> int:  # steps of epochs 0 .. paced - 1 while the share grows
        return sum(math.ceil(unlocked(stats.examples, e, config.curriculum_start, paced) / config.batch_size)
                   for e in range(paced))

    paced = 0
    while paced < config.max_steps and steps(paced + 1) <= budget:
        paced += 1
    return paced, paced + max(math.ceil((config.max_steps - steps(paced)) / full_epoch), 1)


def check_curriculum(stats: DataStats, config) -> None:
    """--curriculum on a run too short to pace (one epoch, or fewer steps than its first share takes) would train
    as a plain run without a word: refuse instead."""
    if config.curriculum and config.curriculum_pace > 0 and not curriculum_pacing(stats, config)[0]:
        span = (f"--max-steps {config.max_steps} x --curriculum-pace {config.curriculum_pace}" if config.max_steps
                else f"--epochs {config.epochs}")
        raise ValueError(f"--curriculum has nothing to pace over: {span} leaves no epoch for a growing share of the "
                         f"{stats.examples} trajectories; give more --max-steps or --epochs, or drop --curriculum")


def step_batches(stats: DataStats, config) -> list[list[int]]:
    """All global batches of the run, in order (a pure function of the data and the config: resumable).
    When max_steps asks for more than the epochs give, a plain run cycles its batches from the start (a
    curriculum run's epochs already fill the budget: curriculum_pacing)."""
    paced, epochs = curriculum_pacing(stats, config) if config.curriculum else (0, config.epochs)
    batches = []
    for epoch in range(epochs):
        order = epoch_order(stats, config, epoch, paced)
        batches += [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if config.max_steps:
        cycle = list(batches)
        while len(batches) < config.max_steps:
            batches += cycle[:config.max_steps - len(batches)]
        batches = batches[:config.max_steps]
    return batches


def step_normalizers(batches: list[list[int]], stats: DataStats) -> list[tuple[int, int]]:
    """(reason, act) loss targets of each step's global batch: the divisors every rank uses."""
    return [(int(stats.loss_reason[b].sum()), int(stats.loss_act[b].sum())) for b in batches]


def rank_rows(batch: list[int], rank: int, world: int) -> tuple[list[int], bool]:
    """The examples rank `rank` trains on in a step (r, r+W, ...), and whether they are only a filler: a rank
    with no example still joins every gradient sync, on the batch's first example with zero weight."""
    mine = batch[rank::world]
    return (mine, False) if mine else ([batch[0]], True)


def rank_sequence(batches: list[list[int]], rank: int, world: int, start: int = 0) -> list[int]:
    """The examples rank `rank` reads from step `start` on, in order (fillers included)."""
    return [i for step in batches[start:] for i in rank_rows(step, rank, world)[0]]


def take(examples: Iterator[Example], n: int, where: str, keep: bool = True) -> list[Example]:
    """The next `n` examples of a rank's stream (`keep=False`: passed over, none held). A stream that ends
    early (shorter than the run's plan) is an error that says where, not a bare StopIteration."""
    got, seen = [], 0
    for example in itertools.islice(examples, n):
        seen += 1
        if keep:
            got.append(example)
    if seen < n:
        raise RuntimeError(f"{where}: the rank's example stream ended {n - seen} example(s) early; its dataset "
                           "shard is shorter than the run's plan (was the data changed under the run?)")
    return got


def micro_batches(items: list[Example], size: int, count: int) -> list[list[Example]]:
    """A rank's step examples split into `count` micro-batches of at most `size`, longest first: grouping
    similar lengths pads less (the sum over micro-batches, hence the gradient, does not depend on the split),
    and the largest micro-batch comes first, so a run that cannot fit it fails at its first step. Micro-batches
    past the rank's examples are empty (the caller trains them with zero weight)."""
    ordered = sorted(items, key=lambda x: len(x["input_ids"]), reverse=True)
    return [ordered[m * size:(m + 1) * size] for m in range(count)]


def padded_positions(items: list[Example]) -> int:
    """Positions a collated micro-batch computes: rows x its longest example (pads included)."""
    return len(items) * max((len(x["input_ids"]) for x in items), default=0)


def collate(items: list[Example], pad_id: int) -> Batch:
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
