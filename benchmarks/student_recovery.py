"""How fast does a student cut from a real teacher recover, and under which recipe? Trains cut students in this
process (no Ray) and prints the cross-entropy of held-out teacher thought/action tokens against steps and
seconds, one block per (cut, loss, lr).

    python benchmarks/student_recovery.py --teacher runs/quickstart/teacher \
        --trajectories runs/quickstart/data/teacher_all.jsonl --cuts derive:keep_every=4 derive:first=2,last=6 \
        --losses generated all --steps 40

Losses: `generated` is CE on the teacher's thought + action tokens only (what sft trains; sad and token_kd
start the same way from a student this far off); `all` is CE on every token after the first (prompt,
observations too): the same forward pass, ~3x the supervised tokens, a language-model "healing" signal;
`context` is CE on the prompt and observation tokens only (healing that never sees the teacher's own tokens). The
last `--held-out` trajectories are never trained on; the CE is measured on their thought + action tokens.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def batch_loss(model, batch, loss: str):
    """Mean CE over the batch's target tokens (right-padded batch, one forward)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    target = torch.zeros(len(batch), width, dtype=torch.bool)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.as_tensor(ex["input_ids"])
        attention[row, :n] = 1
        generated = torch.as_tensor(ex["reason_mask"] | ex["act_mask"])
        if loss == "generated":
            target[row, :n] = generated
        else:
            target[row, 1:n] = True
            if loss == "context":
                target[row, :n] &= ~generated
    # logits only where the loss is (as raysad's chunked loss): `all` pays the vocabulary projection on ~3x
    # the positions, so its seconds per step are higher
    hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    labels, mask = ids[:, 1:], target[:, 1:]
    logits = model.get_output_embeddings()(hidden[mask])
    return torch.nn.functional.cross_entropy(logits.float(), labels[mask])


def main(argv: list[str] | None = None) -> None:
    import torch

    from raysad import models, students
    from raysad.encoding import encode_trajectory
    from raysad.evaluate import examples_ce
    from raysad.policies.hf import HFEngine
    from raysad.trajectory_reader import read_trajectories

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="HF folder of the (fine-tuned) teacher")
    parser.add_argument("--trajectories", required=True, help="its trajectories (JSONL/Parquet)")
    parser.add_argument("--cuts", nargs="+", default=["derive:keep_every=4"])
    parser.add_argument("--losses", nargs="+", default=["generated", "all"], choices=["generated", "all", "context"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = models.load_tokenizer(args.teacher)
    teacher = models.load_model(args.teacher, device="cpu")
    examples = [encode_trajectory(t, tokenizer, max_length=args.max_length)
                for t in read_trajectories(args.trajectories)]
    train, held = examples[:-args.held_out], examples[-args.held_out:]

    def held_out_ce(model) -> float:  # the model stays in eval mode: callers set train() again
        return examples_ce(HFEngine(model, tokenizer, prefix_cache=0), held)
    print(f"{len(train)} train / {len(held)} held-out trajectories; teacher CE on the held-out "
          f"{held_out_ce(teacher):.3f} (uniform {math.log(len(tokenizer)):.1f}); "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"{'cut':26s} {'loss':9s} {'lr':>7s} {'step':>4s} {'s':>6s} {'held-out CE':>11s}", flush=True)
    for spec in args.cuts:
        for loss in args.losses:
            for lr in args.lrs:
                torch.manual_seed(args.seed)
                rng = random.Random(args.seed)
                model = students.derive_student(teacher, **students.parse_derive_spec(spec))
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
                warm = max(1, min(10, args.steps // 5))
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
                seconds = 0.0
                row = f"{spec.removeprefix('derive:'):26s} {loss:9s} {lr:7.0e}"
                print(f"{row} {0:4d} {0.0:6.0f} {held_out_ce(model):11.3f}", flush=True)
                model.train()
                for step in range(1, args.steps + 1):
                    t0 = time.perf_counter()
                    value = batch_loss(model, rng.sample(train, min(args.batch_size, len(train))), loss)
                    value.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    seconds += time.perf_counter() - t0
                    if step % args.eval_every == 0 or step == args.steps:
                        ce = held_out_ce(model)
                        model.train()
                        print(f"{row} {step:4d} {seconds:6.0f} {ce:11.3f}", flush=True)


if __name__ == "__main__":
    main()
