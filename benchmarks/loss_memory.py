"""Peak memory and time (forward + backward) of raysad's chunked distillation loss vs a plain full-tensor one.

Each variant runs in a fresh subprocess (CPU), so its peak is measured honestly: the process's peak resident
set (ru_maxrss) minus its resident set once the inputs exist. The workers run with glibc's
MALLOC_MMAP_THRESHOLD_=1 MiB, so every tensor of 1 MiB or more is its own mapping and goes back to the OS
when freed: the resident set then follows the live tensors (as a GPU caching allocator's peak would),
instead of heap fragmentation, which otherwise moves the figures by hundreds of MiB from run to run.

"plain" materialises the student logits [B, T, V] = hidden @ lm_head.T and evaluates the same per-token
divergence on whole tensors with autograd; "chunked" passes HiddenStates(hidden, lm_head) to token_kd_loss,
which never holds more than one chunk of logits; "chunked-logits" materialises the logits but evaluates the
loss in chunks (the path for callers that already have logits). Loss and gradients of hidden and lm_head
are compared with the plain variant's.

    python benchmarks/loss_memory.py                          # V=32k, T=2k, H=512, B=1: under a minute
    python benchmarks/loss_memory.py --seq 512 --vocab 8000   # quick look
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

VARIANTS = [  # (name, student form, teacher form)
    ("plain", "plain", "full"),
    ("chunked-logits", "logits", "full"),
    ("chunked", "hidden", "full"),
    ("plain", "plain", "topk"),
    ("chunked", "hidden", "topk"),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> None:
    """One variant in this (fresh) process: build inputs, measure one forward + backward, save results."""
    import gc

    import torch

    from raysad.losses import HiddenStates, TopK, divergence, token_kd_loss

    torch.manual_seed(args.seed)
    B, T, H, V = args.batch, args.seq, args.hidden, args.vocab
    hidden = torch.randn(B, T, H, requires_grad=True)
    lm_head = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    teacher_hidden = torch.randn(B, T, H)
    teacher_head = torch.randn(V, H) / H**0.5 * 1.5
    mask = torch.rand(B, T) < 0.8  # generated tokens; the rest is prompt/observation
    if args.teacher == "full":
        teacher = teacher_hidden @ teacher_head.T  # the caller holds these anyway: part of the baseline
    else:  # top-k built row block by row block, so no [B, T, V] tensor ever exists in this process
        ids, logprobs = [], []
        for start in range(0, T, 256):
            top = (teacher_hidden[:, start:start + 256] @ teacher_head.T).log_softmax(-1).topk(args.topk, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
        teacher = TopK(torch.cat(ids, 1), torch.cat(logprobs, 1))
    del teacher_hidden, teacher_head
    gc.collect()

    baseline = rss_bytes()
    peak_before = peak_rss_bytes()
    times = []
    for _ in range(args.repeats):  # the same tensors each time, so the peak is one run's; time: the best run
        hidden.grad = lm_head.grad = None
        start = time.perf_counter()
        if args.student == "plain":
            logits = hidden @ lm_head.T
            per_token = divergence(logits, teacher, args.kind, args.beta, args.temperature)
            loss = per_token[mask].mean()
            del logits, per_token
        elif args.student == "logits":
            loss = token_kd_loss(hidden @ lm_head.T, teacher, mask, kind=args.kind, beta=args.beta,
                                 temperature=args.temperature, chunk_size=args.chunk_size)
        else:
            loss = token_kd_loss(HiddenStates(hidden, lm_head), teacher, mask, kind=args.kind, beta=args.beta,
                                 temperature=args.temperature, chunk_size=args.chunk_size)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    torch.save({"hidden": hidden.grad, "lm_head": lm_head.grad}, args.out + ".grads.pt")
    Path(args.out).write_text(json.dumps({
        "loss": loss.item(), "seconds": min(times), "peak_increase": peak - baseline,
        # if the run never rose above a transient of the setup, its own peak is hidden: say so, don't guess
        "peak_hidden_by_setup": peak <= peak_before,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: automatic)")
    parser.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="forward+backward runs per variant (time: best)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("worker", "student", "teacher", "out") and v is not None]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, student, teacher in VARIANTS:
            out = str(Path(tmp) / f"{name}-{teacher}.json")
            with console.status(f"{name} / teacher {teacher} ..."):
                subprocess.run([sys.executable, __file__, "--worker", f"--student={student}",
                                f"--teacher={teacher}", f"--out={out}", *shared], check=True, env=env)
            results[name, teacher] = json.loads(Path(out).read_text())
            results[name, teacher]["grads"] = torch.load(out + ".grads.pt", weights_only=True)

    mib = 2**20
    table = Table(title=f"KD loss, forward+backward: B={args.batch} T={args.seq} V={args.vocab} H={args.hidden} "
                        f"kind={args.kind} τ={args.temperature} chunk={args.chunk_size or 'auto'} top-k={args.topk}")
    for column in ("teacher", "variant", "peak MiB", "vs plain", "time s", "loss", "|Δloss|", "max|Δ grad|"):
        table.add_column(column, justify="left" if column in ("teacher", "variant") else "right")
    for (name, teacher), r in results.items():
        plain = results["plain", teacher]
        grad_diff = max((r["grads"][k] - plain["grads"][k]).abs().max().item() for k in ("hidden", "lm_head"))
        ratio = r["peak_increase"] / plain["peak_increase"]
        table.add_row(teacher, name, f"{r['peak_increase'] / mib:.0f}", f"{ratio:.2f}", f"{r['seconds']:.2f}",
                      f"{r['loss']:.6f}", f"{abs(r['loss'] - plain['loss']):.1e}", f"{grad_diff:.1e}")
    console.print(table)
    full_teacher = args.batch * args.seq * args.vocab * 4 / mib
    console.print(f"Inputs (in the baseline, not in the peaks): full teacher logits {full_teacher:.0f} MiB; "
                  f"one float32 [B, T, V] copy is {full_teacher:.0f} MiB.")
    hidden = [k for k, r in results.items() if r["peak_hidden_by_setup"]]
    if hidden:
        console.print(f"[yellow]peak not measured (below a setup transient) for: {hidden}")


if __name__ == "__main__":
    main()
