"""One student training step with the SAD loss at real sizes: tokens/s, MFU and peak memory, chunked vs plain.

Pure torch + transformers (no Ray, no vLLM): the student is built from a config (random weights, nothing is
downloaded), the teacher is what `raysad rollout --topk 20` stores (top-20 log-probs per token), the masks mark
~70% of the tokens as [REASON] and ~10% as [ACT]. "plain" computes the logits [B, T, V] and the loss on them;
"chunked" passes the final hidden states and the lm_head to raysad.losses (HiddenStates), which never holds
more than one chunk of logits. Each variant: `--warmup` steps, then `--steps` timed steps (AdamW, bf16 autocast).

    python benchmarks/gpu_distill.py                                   # Qwen2.5-0.5B shape, V=151,936, cuda
    python benchmarks/gpu_distill.py --shape tiny --device cpu --seq 256 --steps 2   # a CPU smoke run

MFU = model FLOPs per token (6·N for the matmuls + 12·layers·hidden·T for attention, the usual estimate)
x tokens/s / the chip's peak (--peak-tflops; default: H100/H200 dense bf16, 989 TFLOPS).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # raysad.losses without installing raysad

SHAPES = {
    # Qwen2.5-0.5B's config (tied embeddings, GQA 14/2)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}


def build_student(shape: str, device, seq: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=max(seq, 32768))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)


def batch_inputs(batch: int, seq: int, vocab: int, k: int, device):
    import torch

    from raysad.losses import TopK

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    position = torch.arange(seq).expand(batch, seq)
    reason = (position % 10) < 7                         # 70% [REASON] tokens
    act = (position % 10) == 7                           # 10% [ACT] tokens, the rest prompt/observation
    topk_ids = torch.randint(0, vocab, (batch, seq, k), generator=g)
    topk_logprobs = torch.log_softmax(torch.randn(batch, seq, k, generator=g), -1) - 0.1
    return ids.to(device), reason.to(device), act.to(device), TopK(topk_ids.to(device), topk_logprobs.to(device))


def step(model, variant: str, ids, reason, act, teacher, autocast):
    from raysad.losses import HiddenStates, sad_loss

    with autocast():
        if variant == "plain":
            student = model(input_ids=ids).logits.float()
        else:
            hidden = model.model(input_ids=ids).last_hidden_state
            student = HiddenStates(hidden, model.lm_head.weight)
    loss = sad_loss(student, teacher, reason, act).total
    loss.backward()
    return float(loss.detach())


def measure(args, variant: str) -> dict:
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build_student(args.shape, device, args.seq)
    model.gradient_checkpointing_enable() if args.checkpointing else None
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ids, reason, act, teacher = batch_inputs(args.batch, args.seq, model.config.vocab_size, args.topk, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step(model, variant, ids, reason, act, teacher, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        losses.append(step(model, variant, ids, reason, act, teacher, autocast))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - began
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    cfg = model.config
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq
    result = {"variant": variant, "shape": args.shape, "params": n_params, "batch": args.batch, "seq": args.seq,
              "dtype": args.dtype, "tokens_per_s": tokens_per_s, "step_s": seconds / args.steps,
              "mfu": flops_per_token * tokens_per_s / (args.peak_tflops * 1e12) if cuda else None,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": losses[-1],
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    del model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the student")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak")
    parser.add_argument("--variants", default="chunked,plain")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for variant in args.variants.split(","):
        try:
            results.append(measure(args, variant))
        except torch.OutOfMemoryError as err:  # the plain variant is the one expected to run out
            results.append({"variant": variant, "error": f"out of memory: {str(err).splitlines()[0]}"})
            gc.collect()
            torch.cuda.empty_cache()
        r = results[-1]
        if "error" in r:
            print(f"{variant:8s} {r['error']}", flush=True)
            continue
        mem = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{variant:8s} {r['shape']} ({r['params'] / 1e6:.1f}M params) B={r['batch']} T={r['seq']} "
              f"{r['dtype']} on {r['device']}: {r['tokens_per_s']:,.0f} tok/s, {r['step_s'] * 1000:.0f} ms/step, "
              f"MFU {mfu}, peak memory {mem}, loss {r['loss']:.4f}", flush=True)
    ok = {r["variant"]: r for r in results if "error" not in r}
    if {"chunked", "plain"} <= set(ok) and ok["plain"]["peak_mem_gib"]:
        print(f"chunked / plain: peak memory x{ok['chunked']['peak_mem_gib'] / ok['plain']['peak_mem_gib']:.2f}, "
              f"tokens/s x{ok['chunked']['tokens_per_s'] / ok['plain']['tokens_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
