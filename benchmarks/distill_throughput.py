"""Throughput and peak memory of `raysad distill` (1 worker) against TRL's GKDTrainer, same teacher/student/data.

    python benchmarks/distill_throughput.py                      # tiny-5m teacher -> tiny-1m student, CPU
    python benchmarks/distill_throughput.py --teacher-size tiny-20m --student-size tiny-5m --steps 40

What is compared (one run each, each in its own subprocess, one after the other):
- the same tokenizer, teacher and student (built from the same seed), the same encoded examples (expert
  HotPotQA trajectories: prompt, thoughts, actions, observations), the same batch size and steps, AdamW,
  same lr schedule shape, fp32 on CPU (bf16 autocast for both on a GPU);
- the same objective: token-level forward KL(teacher ‖ student) on the thought + action tokens with the
  teacher's full distribution computed online: raysad `--method token_kd --teacher T --divergence
  forward_kl`, TRL `GKDTrainer(lmbda=0, beta=0, seq_kd=False)` (lmbda=0: no on-policy generation, pure
  offline distillation on the given sequences; beta=0: forward KL), its loss masked to the same tokens
  through labels=-100 elsewhere;
- tokens/s counts every non-padding token of each batch (the same count for both), per optimizer step,
  from step 3 on (the first steps warm up allocators); peak memory is each process's ru_maxrss (whole
  process: Python, imports, both models, training), also shown minus the RSS after imports (models + data + training).
Differences, honestly: raysad runs with workers=0 (Ray Train's in-process mode, the same loop as a Ray
worker, so ru_maxrss covers the training; a Ray worker adds process start-up, not per-step cost); TRL
computes full [B, T, V] logits for student and teacher, raysad never materialises them (chunked
hidden-state loss); TRL shuffles with its own sampler, raysad with its seeded order (same batch size,
padding per batch for both); TRL's logging/callback machinery runs every step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ data ----
def build(root: Path, args) -> None:
    """Trajectories, tokenizer, teacher and student directories under root (done once, in the parent)."""
    from raysad import models
    from raysad.policies.expert import expert_episodes
    from raysad.sft import trajectory_texts
    from raysad.trajectory_writer import TrajectoryWriter

    # more episodes than are trained on, for the tokenizer: a vocabulary of a few thousand tokens needs text
    trajs = expert_episodes("hotpotqa", max(args.examples, args.tokenizer_examples), max_turns=8,
                            prompt_chars=400, observation_chars=300, id_prefix="h")
    with TrajectoryWriter(root / "trajs.jsonl") as out:
        for t in trajs[:args.examples]:
            out.write(t)
    models.train_tokenizer(trajectory_texts(trajs), vocab_size=args.vocab, out_dir=root / "tok")
    models.init_model_dir(args.teacher_size, root / "tok", root / "teacher", seed=1)
    models.init_model_dir(args.student_size, root / "tok", root / "student", seed=0)


# ------------------------------------------------------------------------------------------------ runs ----
def run_raysad(root: Path, args) -> dict:
    import torch

    from raysad.distill import DistillConfig, run_distill

    config = DistillConfig(trajectories=str(root / "trajs.jsonl"), student=str(root / "student"),
                           teacher=str(root / "teacher"), method="token_kd", divergence="forward_kl",
                           out=str(root / "raysad_out"), workers=0, batch_size=args.batch_size,
                           micro_batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
                           warmup_steps=2, max_length=args.max_length, checkpoint_every=10_000,
                           log_every=10_000, resume=False, max_grad_norm=1.0,
                           gpus_per_worker=1.0 if torch.cuda.is_available() else 0.0)
    import ray.train.torch  # noqa: F401  (imported by run_distill anyway: counted in the baseline)
    import raysad_envs  # noqa: F401  (as in the TRL run, whose baseline comes after encoding the data)
    import raysad.encoding  # noqa: F401

    before = rss_mb()  # after imports, before models and data
    result = run_distill(config, track=False)
    steps = result.log[args.skip:]
    tokens = sum(s["tokens"] for s in steps)
    seconds = sum(s["tokens"] / s["tokens_per_s"] for s in steps)
    return {"tokens": tokens, "seconds": seconds, "rss_after_imports_mb": before, "peak_rss_mb": rss_mb(),
            "final_loss": result.log[-1]["loss"], **_gpu_peak()}


def run_trl(root: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from raysad import models
    from raysad.data import load_examples
    from raysad.distill import DistillConfig

    tokenizer = models.load_tokenizer(root / "tok")
    examples = load_examples(DistillConfig(trajectories=str(root / "trajs.jsonl"), student="unused",
                                           max_length=args.max_length), tokenizer)
    rows = []
    for e in examples:
        target = e["reason_mask"] | e["act_mask"]
        rows.append({"input_ids": e["input_ids"].tolist(),
                     "labels": [int(t) if m else -100 for t, m in zip(e["input_ids"], target)]})
    dataset = Dataset.from_list(rows)

    def collate(items):
        length = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), length), tokenizer.pad_token_id)
        labels = torch.full((len(items), length), -100)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], attention[i, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    timing = {"tokens": [], "seconds": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.began = time.perf_counter()

        def on_step_end(self, *a, **k):
            timing["seconds"].append(time.perf_counter() - self.began)

    class CountingGKD(GKDTrainer):  # counts the tokens of each batch; the loss is GKD's own
        def compute_loss(self, model, inputs, *a, **k):
            timing["tokens"].append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **k)

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    before = rss_mb()  # after imports, before models (the data is already encoded here: small)
    student = models.load_model(root / "student", dtype="float32", device=device)
    teacher = models.load_model(root / "teacher", device=device)
    config = GKDConfig(output_dir=str(root / "trl_out"), per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
                       lr_scheduler_type="cosine", warmup_steps=2, lmbda=0.0, beta=0.0, seq_kd=False,
                       temperature=1.0, max_grad_norm=1.0, bf16=gpu, fp16=False, logging_steps=1,
                       save_strategy="no", report_to=[], gradient_checkpointing=False,
                       dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not gpu,
                       max_length=args.max_length, disable_tqdm=True, seed=0)
    trainer = CountingGKD(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, data_collator=collate, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens, seconds = timing["tokens"][args.skip:], timing["seconds"][args.skip:]
    return {"tokens": sum(tokens), "seconds": sum(seconds), "rss_after_imports_mb": before,
            "peak_rss_mb": rss_mb(), "final_loss": losses[-1] if losses else float("nan"), **_gpu_peak()}


def _gpu_peak() -> dict:
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}


def child(which: str, root: Path, args) -> None:
    result = (run_raysad if which == "raysad" else run_trl)(root, args)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-size", default="tiny-5m")
    parser.add_argument("--student-size", default="tiny-1m")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary asked for (the text decides "
                        "how many merges exist)")
    parser.add_argument("--tokenizer-examples", type=int, default=400, help="episodes the tokenizer is trained on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (alternating); the fastest is shown")
    parser.add_argument("--root", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--child", choices=["raysad", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, Path(args.root), args)
        return

    root = Path(args.root or tempfile.mkdtemp(prefix="raysad-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    if (root / "student" / "config.json").is_file():
        print(f"reusing the data and models in {root}", flush=True)
    else:
        print(f"building data and models in {root} ...", flush=True)
        build(root, args)
    results: dict[str, dict] = {}
    for repeat in range(args.repeats):  # alternate the two, so a busy moment of the machine hits both
        for which in ("raysad", "trl"):
            print(f"running {which} ({args.steps} steps, batch {args.batch_size}) ...", flush=True)
            command = [sys.executable, __file__, "--child", which, "--root", str(root)] + sys.argv[1:]
            run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                print(run.stdout[-3000:], run.stderr[-5000:], sep="\n")
                raise SystemExit(f"{which} failed (exit {run.returncode})")
            r = json.loads(lines[-1].removeprefix("RESULT "))
            print(f"  {r['tokens'] / r['seconds']:.0f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            best = results.get(which)
            if best is None or r["tokens"] / r["seconds"] > best["tokens"] / best["seconds"]:
                results[which] = r
    from raysad import models

    vocab = len(models.load_tokenizer(root / "tok"))
    print(f"\nteacher {args.teacher_size}, student {args.student_size}, vocab {vocab}, batch {args.batch_size}, "
          f"max_length {args.max_length}, {args.steps} steps (timing from step {args.skip}), torch threads {args.threads or 'default'}, best of {args.repeats}")
    print(f"{'':8} {'tokens/s':>10} {'peak RSS MB':>12} {'RSS after imports':>17} {'models+train MB':>15} "
          f"{'final loss':>11}" + (f" {'peak GPU MB':>12}" if "peak_gpu_mb" in results["raysad"] else ""))
    for which, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        gpu = f" {r['peak_gpu_mb']:12.0f}" if "peak_gpu_mb" in r else ""
        print(f"{which:8} {r['tokens_per_s']:10.0f} {r['peak_rss_mb']:12.0f} {r['rss_after_imports_mb']:17.0f} "
              f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:15.0f} {r['final_loss']:11.4f}{gpu}")
    ray_, trl_ = results["raysad"], results["trl"]
    print(f"raysad / TRL: tokens/s x{ray_['tokens_per_s'] / trl_['tokens_per_s']:.2f}, peak RSS "
          f"x{ray_['peak_rss_mb'] / trl_['peak_rss_mb']:.2f}, models+training RSS "
          f"x{(ray_['peak_rss_mb'] - ray_['rss_after_imports_mb']) / max(trl_['peak_rss_mb'] - trl_['rss_after_imports_mb'], 1):.2f}")


if __name__ == "__main__":
    main()
