"""Peak memory and time of one forward + backward of the distillation loss: raysad's chunked loss against TRL's
formula, at the scale of a real student (SmolLM2-135M: V=49,152, H=576).

What is compared. The student is its final hidden states [B, T, H] and lm_head [V, H], both with grad; the
teacher is full logits [B, T, V] or its top-16; a target mask picks the positions that are distilled (in agent
trajectories about half of the tokens are the agent's thoughts and actions, the rest prompt and observations:
`--targets 0.5`, in spans of 32 tokens). The divergence is forward KL(teacher ‖ student), τ=1, the mean over
the target tokens; float32, on the CPU. Variants (every one gets the same seeded inputs):
- `raysad-chunked`: token_kd_loss(HiddenStates(hidden, lm_head), teacher, mask): logits exist one chunk of
  target rows at a time (automatic size: a [chunk, V] float32 tensor is about 32 MiB; the chunk's maths holds
  several of them), their gradients are computed in the same pass. Full and top-16 teacher.
- `raysad-plain`: raysad's own unchunked path: logits = hidden @ lm_head.T [B, T, V], then
  losses.divergence on the whole tensor, masked mean. Full and top-16 teacher.
- `trl`: TRL's GKDTrainer.generalized_jsd_loss as shipped (trl 1.16.0; imported when trl is installed, else the
  verbatim copy below) on student logits hidden @ lm_head.T [B, T, V] and the teacher logits, labels=-100 off
  the targets, beta=0 (TRL's forward KL), reduction batchmean (= sum / number of target tokens). Full teacher.
- `trl-targets`: the same formula on logits computed only at the target rows, hidden[mask] @ lm_head.T
  [N, V], the teacher's logits at those rows given as an input (what a careful TRL user could do; the most
  favourable reading for TRL: gathering them is not counted).
Losses are all means over the target tokens, so they are compared as they are; each variant's loss and
gradients (hidden, lm_head) are compared with raysad-chunked's on the same teacher form (relative: |Δ loss| /
|loss|, max |Δ grad| / max |grad|; "ok" up to 1e-4, float32 sums in other orders; else the script fails).

How it is measured. Each run is one fresh subprocess (bench_common.run_child, torch threads pinned,
`--threads`, default 1), the runs alternate (A B C, C B A, ...) for `--repeats` rounds. In a run the inputs
are built first (the teacher logits row block by row block, so no setup transient exceeds them); then two
forward + backward passes, the first a warm-up. Figures are of the second (the first's are in the JSON):
- peak MiB: the process's peak resident set during the pass minus its resident set once the inputs exist,
  before the warm-up pass (the inputs: hidden, lm_head, the teacher, are not counted; everything the pass
  allocates, logits, intermediates, the saved graph, the gradients of hidden and lm_head, is). The peak is
  reset before each pass through /proc/self/clear_refs (VmHWM); where the kernel refuses that, ru_maxrss is
  used and a pass whose peak stays below the setup's is flagged. glibc runs with MALLOC_MMAP_THRESHOLD_=1 MiB,
  so every tensor of 1 MiB or more is its own mapping and goes back to the OS when freed: the resident set
  follows the live tensors (as a GPU caching allocator's peak would) instead of heap fragmentation.
- time s: wall time of the pass (forward, backward, loss.item()).
Shown: median [min–max] over the repeats; ratios are of medians (peak / TRL's peak at the same T).

How to read it. `× TRL` below 1 is memory saved against TRL's formula as shipped; `× TRL@targets` against the
best one can do with that formula without chunking. The top-16 rows carry TRL's ratios for reference only (TRL
has no top-k path; its teacher input is [B, T, V] and not counted). Peaks count no model (no transformer
layers): in training the activations come on top of these figures, and equally for every variant.

    python benchmarks/loss_memory.py                       # V=49,152, H=576, T=1024,2048, 3 repeats (~10 min)
    python benchmarks/loss_memory.py --out runs/bench/loss_memory          # + .md and .json
    python benchmarks/loss_memory.py --quick                               # ~20 s: a small shape, 1 repeat
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (Machine, Spread, alternate, child_result, markdown_table, pin_threads,  # noqa: E402
                          ratio, run_child, write_report)

# name -> (student form, teacher form)
VARIANTS = {
    "raysad-chunked": ("chunked", "full"),
    "raysad-plain": ("plain", "full"),
    "trl": ("trl", "full"),
    "trl-targets": ("trl-targets", "full"),
    "raysad-chunked-top": ("chunked", "topk"),
    "raysad-plain-top": ("plain", "topk"),
}
REFERENCE = {"full": "raysad-chunked", "topk": "raysad-chunked-top"}
TOLERANCE = 1e-4  # largest relative |Δ| of loss or gradients still called agreement (float32, other sum orders)
MIB = 2**20


# ------------------------------------------------------------------------------------------- TRL's loss ---
# A verbatim copy of GKDTrainer.generalized_jsd_loss (a @staticmethod there) from trl 1.16.0,
# trl/experimental/gkd/gkd_trainer.py, Copyright 2020-2026 The HuggingFace Team, Apache License 2.0
# (http://www.apache.org/licenses/LICENSE-2.0). Used only when trl is not installed.
def _trl_generalized_jsd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    num_items_in_batch=None,
):
    import torch
    import torch.nn.functional as F

    # Apply temperature scaling
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature

    # Compute log probabilities for student and probabilities for teacher
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)

    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        # Compute the log of the mixture distribution
        # log(a + b) = log(exp(log(a)) + exp(log(b))) -> for mixture
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )

        # Compute KL divergences using F.kl_div
        # PyTorch differs from the standard mathematical definition, so the order of the probability distributions is swapped compared to that defined in the paper.
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)

        # Compute the Generalized Jensen-Shannon Divergence
        jsd = beta * kl_teacher + (1 - beta) * kl_student

    # Masking
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]

    # Apply reduction
    if num_items_in_batch is not None:
        # Normalize by the global number of valid tokens for gradient-accumulation-correct loss (see issue #4719).
        jsd_sum = jsd.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd_sum.device)
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        # clamp_min(1) avoids 0/0 -> nan when a sample has no unmasked positions
        # (e.g. completion fully truncated). jsd[mask] is empty -> jsd.sum() == 0,
        # so 0/1 == 0 with a valid grad path.
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


def trl_loss_function(prefer_installed: bool = True):
    """(TRL's generalized_jsd_loss, where it came from): the installed trl's, else the verbatim copy above."""
    if prefer_installed:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            import trl
            from trl.experimental.gkd.gkd_trainer import GKDTrainer

            return GKDTrainer.generalized_jsd_loss, f"trl {trl.__version__} (installed)"
        except Exception:  # noqa: BLE001 - not installed, or a version without it: the copy
            pass
    return _trl_generalized_jsd_loss, "verbatim copy of trl 1.16.0"


# --------------------------------------------------------------------------------------------- one run ---
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> bool:
    """Reset the kernel's peak resident set (VmHWM) to the current one; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(resettable: bool) -> int:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def target_mask(batch: int, seq: int, fraction: float, generator):
    """[B, T] bool: spans of 32 tokens, round(fraction x spans) of them targets, chosen at random in each row
    (at least one target)."""
    import torch

    spans = -(-seq // 32)
    chosen = torch.zeros(batch, spans, dtype=torch.bool)
    for row in range(batch):
        chosen[row, torch.randperm(spans, generator=generator)[:max(1, round(fraction * spans))]] = True
    return chosen.repeat_interleave(32, dim=1)[:, :seq]


def build_inputs(args, teacher_form: str, student: str):
    """The seeded inputs of a run: the same values in every variant (the teacher logits block by block)."""
    import torch

    from raysad.losses import TopK

    generator = torch.Generator().manual_seed(args.seed)
    B, T, H, V = args.batch, args.seq, args.hidden, args.vocab
    hidden = torch.randn(B, T, H, generator=generator).requires_grad_(True)
    lm_head = (torch.randn(V, H, generator=generator) / H**0.5).requires_grad_(True)
    teacher_hidden = torch.randn(B, T, H, generator=generator)
    teacher_head = torch.randn(V, H, generator=generator) / H**0.5 * 1.5
    mask = target_mask(B, T, args.targets, generator)
    labels = torch.where(mask, torch.randint(0, V, (B, T), generator=generator), -100)
    block = 256
    if teacher_form == "topk":
        ids, logprobs = [], []
        for start in range(0, T, block):
            top = (teacher_hidden[:, start:start + block] @ teacher_head.T).log_softmax(-1).topk(args.topk, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
        teacher = TopK(torch.cat(ids, 1), torch.cat(logprobs, 1))
    elif student == "trl-targets":  # only the target rows: [N, V]
        rows = []
        for start in range(0, T, block):
            logits = teacher_hidden[:, start:start + block] @ teacher_head.T
            rows.append(logits[mask[:, start:start + block]])
        teacher = torch.cat(rows)
    else:
        teacher = torch.empty(B, T, V)
        for start in range(0, T, block):
            teacher[:, start:start + block] = teacher_hidden[:, start:start + block] @ teacher_head.T
    return hidden, lm_head, teacher, mask, labels


def forward_backward(student: str, hidden, lm_head, teacher, mask, labels, args, trl_loss) -> float:
    """One forward + backward of the variant's loss; returns the loss."""
    from raysad.losses import HiddenStates, divergence, token_kd_loss

    if student == "chunked":
        loss = token_kd_loss(HiddenStates(hidden, lm_head), teacher, mask, kind="forward_kl",
                             chunk_size=args.chunk_size)
    elif student == "plain":
        logits = hidden @ lm_head.T
        per_token = divergence(logits, teacher, "forward_kl")
        loss = per_token[mask].mean()
        del logits, per_token
    elif student == "trl":
        loss = trl_loss(student_logits=hidden @ lm_head.T, teacher_logits=teacher, labels=labels, beta=0.0)
    elif student == "trl-targets":
        logits = (hidden[mask] @ lm_head.T)[None]  # [1, N, V]
        loss = trl_loss(student_logits=logits, teacher_logits=teacher[None], labels=labels[mask][None], beta=0.0)
        del logits
    else:
        raise ValueError(student)
    loss.backward()
    return loss.item()


def worker(args) -> None:
    """One variant in this fresh process: inputs, a warm-up pass, the measured pass; prints its RESULT."""
    import torch

    pin_threads(args.threads)
    student, teacher_form = VARIANTS[args.variant]
    trl_loss, trl_source = trl_loss_function(not args.trl_copy) if student.startswith("trl") else (None, None)
    hidden, lm_head, teacher, mask, labels = build_inputs(args, teacher_form, student)
    gc.collect()
    baseline = rss_bytes()
    passes = []
    for _ in range(2):  # warm-up, then the measured pass
        hidden.grad = lm_head.grad = None
        gc.collect()
        start_rss = rss_bytes()
        resettable = reset_peak()
        peak_before = peak_bytes(resettable)
        began = time.perf_counter()
        loss = forward_backward(student, hidden, lm_head, teacher, mask, labels, args, trl_loss)
        seconds = time.perf_counter() - began
        peak = peak_bytes(resettable)
        passes.append({"seconds": seconds, "loss": loss, "peak_mib": (peak - baseline) / MIB,
                       "rss_before_mib": (start_rss - baseline) / MIB, "peak_resettable": resettable,
                       # ru_maxrss cannot be reset: a pass below the setup's peak is not measured
                       "peak_hidden_by_setup": not resettable and peak <= peak_before})
    if args.grads:
        torch.save({"hidden": hidden.grad, "lm_head": lm_head.grad}, args.grads)
    teacher_bytes = (teacher.ids.nbytes + teacher.logprobs.nbytes if teacher_form == "topk" else teacher.nbytes)
    child_result({"variant": args.variant, "seq": args.seq, "targets": int(mask.sum()), "warmup": passes[0],
                  **passes[1], "trl_source": trl_source, "teacher_mib": teacher_bytes / MIB,
                  "threads": torch.get_num_threads()})


# ------------------------------------------------------------------------------------------------ main ---
def compare(grads_path: Path, reference_path: Path) -> float:
    """max |Δ| / max |ref| over the gradients of hidden and lm_head."""
    import torch

    mine, ref = torch.load(grads_path, weights_only=True), torch.load(reference_path, weights_only=True)
    return max(((mine[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)).item() for k in ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default=None, help="sequence lengths T, comma-separated (default 1024,2048)")
    parser.add_argument("--vocab", type=int, default=None, help="V (default 49,152: SmolLM2-135M's vocabulary)")
    parser.add_argument("--hidden", type=int, default=None, help="H (default 576: SmolLM2-135M's hidden size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--targets", type=float, default=0.5, help="share of positions that are targets")
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=None, help="raysad's tokens per chunk (default: auto)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds, each variant once per round "
                                                                   "(default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-copy", action="store_true", help="use the verbatim copy of TRL's loss even when "
                                                                 "trl is installed")
    parser.add_argument("--quick", action="store_true", help="defaults for a smoke run: V=4096, H=64, T=256, "
                                                              "1 repeat (flags given still win)")
    parser.add_argument("--out", default=None, help="also write the table to OUT.md and the figures to OUT.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.seq = int(args.seq)
        return worker(args)
    defaults = dict(vocab=4096, hidden=64, seq="256", repeats=1) if args.quick else dict(
        vocab=49152, hidden=576, seq="1024,2048", repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    seqs = [int(s) for s in args.seq.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    import tempfile

    machine = Machine(args.threads)
    shared = [f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--batch={args.batch}",
              f"--targets={args.targets}", f"--topk={args.topk}", f"--seed={args.seed}", f"--threads={args.threads}",
              *([f"--chunk-size={args.chunk_size}"] if args.chunk_size else []),
              *(["--trl-copy"] if args.trl_copy else [])]
    runs: dict[tuple[str, int], list[dict]] = {}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        grads = {}
        for seq in seqs:
            for repeat, variant in alternate(variants, args.repeats):
                path = Path(tmp) / f"{variant}-{seq}.pt"
                label = f"{variant} T={seq} repeat {repeat + 1}/{args.repeats}"
                print(f"{label} ...", file=sys.stderr, flush=True)
                result = run_child([sys.executable, __file__, "--worker", f"--variant={variant}", f"--seq={seq}",
                                    *shared, *([f"--grads={path}"] if repeat == 0 else [])],
                                   args.threads, label, extra_env={"MALLOC_MMAP_THRESHOLD_": str(MIB)})
                machine.record(result)
                runs.setdefault((variant, seq), []).append(result)
                if repeat == 0:
                    grads[variant, seq] = path
        # agreement with raysad-chunked on the same teacher form (same seed: the same inputs)
        agreement = {}
        for (variant, seq), results in runs.items():
            ref_name = REFERENCE[VARIANTS[variant][1]]
            if (ref_name, seq) not in runs:
                continue
            ref_loss = runs[ref_name, seq][0]["loss"]
            losses = [r["loss"] for r in results]
            d_loss = max(abs(x - ref_loss) for x in losses) / max(abs(ref_loss), 1e-30)
            d_grad = compare(grads[variant, seq], grads[ref_name, seq])
            agreement[variant, seq] = {"reference": ref_name, "loss_rel": d_loss, "grad_rel": d_grad,
                                       "ok": d_loss <= TOLERANCE and d_grad <= TOLERANCE}
    elapsed = time.perf_counter() - began

    columns = ["variant", "teacher", "T", "peak MiB", "time s", "× TRL", "× TRL@targets", "loss",
               "agreement (rel. Δ loss, Δ grad)"]
    rows = []
    for seq in seqs:
        peaks = {v: Spread([r["peak_mib"] for r in runs[v, seq]]) for v in variants}
        for variant in variants:
            results = runs[variant, seq]
            times = Spread([r["seconds"] for r in results])
            teacher = "full" if VARIANTS[variant][1] == "full" else f"top-{args.topk}"
            agree = agreement.get((variant, seq))
            if agree is None:
                verdict = "- (no reference run)"
            elif agree["reference"] == variant:
                verdict = "reference"
            else:
                verdict = (f"{'ok' if agree['ok'] else 'DIFFERS'} ({agree['loss_rel']:.0e}, {agree['grad_rel']:.0e}"
                           f" vs {agree['reference']})")
            rows.append([variant, teacher, str(seq), peaks[variant].show(0), times.show(2),
                         ratio(peaks[variant], peaks["trl"]) if "trl" in peaks else "-",
                         ratio(peaks[variant], peaks["trl-targets"]) if "trl-targets" in peaks else "-",
                         f"{Spread([r['loss'] for r in results]).median:.6f}", verdict])
    trl_sources = sorted({r["trl_source"] for rs in runs.values() for r in rs if r["trl_source"]})
    title = (f"KD loss (forward KL), one forward + backward after a warm-up one: B={args.batch}, V={args.vocab:,}, "
             f"H={args.hidden}, targets {args.targets:.0%} of positions (in spans of 32), top-k={args.topk}, "
             f"chunk={args.chunk_size or 'auto'}; {args.repeats} alternating repeat(s), median [min–max]; "
             f"peak = resident set above the inputs; × = ratio of median peaks")
    notes = ["Targets: " + ", ".join(f"T={s}: {runs[variants[0], s][0]['targets']}" for s in seqs)
             + ". Inputs not in the peaks: full teacher logits "
             f"{args.batch * seqs[-1] * args.vocab * 4 / MIB:,.0f} MiB at T={seqs[-1]}; "
             f"lm_head {args.vocab * args.hidden * 4 / MIB:,.0f} MiB.",
             f"TRL's loss: {', '.join(trl_sources) or 'not run'}. {sum(len(r) for r in runs.values())} runs "
             f"(fresh processes) in {elapsed:.0f} s."]
    flagged = sorted({k for k, rs in runs.items() for r in rs if r["peak_hidden_by_setup"]})
    if flagged:
        notes.append(f"peak not measured (below a setup transient, no VmHWM reset) for: {flagged}")
    text = "\n".join([title, "", markdown_table(columns, rows), "", *notes, machine.describe()])
    print(text)
    write_report(args.out, text, {"args": vars(args), "runs": {f"{v}@{s}": rs for (v, s), rs in runs.items()},
                                  "agreement": {f"{v}@{s}": a for (v, s), a in agreement.items()},
                                  "machine": machine.describe()})
    if any(not a["ok"] for a in agreement.values()):
        raise SystemExit("some variants disagree with raysad's loss or gradients (see the table)")


if __name__ == "__main__":
    main()
