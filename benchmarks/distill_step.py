"""Seconds per distillation step under different settings, on the same batches, side by side.

    python benchmarks/distill_step.py --student runs/replicate-smollm2/hotpotqa/tune/replicate-smollm2-hotpotqa-main/students/derived-k4 \\
        --trajectories runs/replicate-smollm2/hotpotqa/teacher.jsonl \\
        --variants micro_batch_size=8 micro_batch_size=2 precision=bf16 precision=bf16,micro_batch_size=2

`raysad distill` (run_distill, in-process Ray Train worker, the stored top-k, --method) trains the same global
batches of --batch-size trajectories under each variant: `field=value[,field=value]` over DistillConfig (the
first variant is the baseline the others are compared to). A step's micro-batches are its trajectories longest
first (raysad.data.micro_batches), so smaller micro-batches pad less for the same gradient; `precision=bf16`
runs the forward and backward under bf16 autocast (fast where the CPU has AMX or on a GPU), float32 weights and
optimizer. Each run is its own subprocess with pinned threads; variants alternate over --repeats. Timed: the
logged per-step time (batch taken from the stream, collated, forward, backward, optimizer) of the steps after
--warmup. The last column is the loss of the last timed step: the variants train the same batches from the same
start, so it shows how far a variant's arithmetic moves the result.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from statistics import fmean as mean

import bench_common as bench


def overrides(variant: str) -> dict:
    """`micro_batch_size=2,precision=bf16` -> the DistillConfig fields it sets (typed as the field is)."""
    from raysad.distill import DistillConfig

    types = {f.name: type(f.default) for f in dataclasses.fields(DistillConfig)}
    out = {}
    for part in variant.split(","):
        name, _, value = part.partition("=")
        if name not in types:
            raise SystemExit(f"--variants {variant!r}: DistillConfig has no field {name!r}")
        if types[name] is bool:
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"--variants {variant!r}: {name} is true or false, not {value!r}")
            out[name] = value.lower() == "true"
        else:
            out[name] = types[name](value) if types[name] in (int, float) else value
    return out


def child(args) -> None:
    from raysad.distill import DistillConfig, run_distill

    bench.pin_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        settings = dict(trajectories=args.trajectories, student=args.student, out=out, workers=0,
                        method=args.method, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                        max_length=args.max_length, lr=1e-4, warmup_steps=0, max_steps=args.warmup + args.steps,
                        checkpoint_every=10_000, log_every=1, resume=False, seed=0)
        log = run_distill(DistillConfig(**{**settings, **overrides(args.child)}), track=False).log[args.warmup:]
    bench.child_result({"step_s": [line["tokens"] / line["tokens_per_s"] for line in log],
                        "pad_frac": [line["pad_frac"] for line in log], "tokens": [line["tokens"] for line in log],
                        "loss": [line["loss"] for line in log]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="HF folder of the student (e.g. a sweep's derived one)")
    parser.add_argument("--trajectories", required=True, help="trajectories with stored top-k (JSONL/Parquet)")
    parser.add_argument("--variants", nargs="+", default=["micro_batch_size=8", "micro_batch_size=2"],
                        help="settings to compare, each field=value[,field=value]; the first is the baseline")
    parser.add_argument("--method", default="sad")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table to OUT.md and the figures to OUT.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    for variant in args.variants:
        overrides(variant)  # a typo fails here, not after the first runs
    machine, runs = bench.Machine(args.threads), {variant: [] for variant in args.variants}
    for repeat, variant in bench.alternate(args.variants, args.repeats):
        result = bench.run_child([sys.executable, __file__, *sys.argv[1:], "--child", variant], args.threads, variant)
        machine.record(result)
        runs[variant].append(result)
        print(f"repeat {repeat}, {variant}: {mean(result['step_s']):.2f} s/step (pad {mean(result['pad_frac']):.1%}, "
              f"load {result['load_before']:.2f})", flush=True)
    base = args.variants[0]
    spreads = {variant: bench.Spread([mean(r["step_s"]) for r in rs]) for variant, rs in runs.items()}
    rows = [[variant, spreads[variant].show(2), f"{mean([mean(r['pad_frac']) for r in rs]):.1%}",
             bench.ratio(spreads[base], spreads[variant]), f"{rs[0]['loss'][-1]:.4f}"]
            for variant, rs in runs.items()]
    same = all(r["tokens"] == runs[base][0]["tokens"] for rs in runs.values() for r in rs)
    text = "\n".join([f"Distillation steps of {args.batch_size} trajectories (--method {args.method} from the "
                      "stored top-k, unless a variant sets them), "
                      f"{args.steps} timed step(s) per run after {args.warmup}, {args.repeats} run(s) per variant",
                      bench.markdown_table(["variant", "s per step (median [range])", "padded positions",
                                            f"speed-up vs {base}", "last loss"], rows),
                      f"same real tokens per step in every run: {same}", machine.describe()])
    print(text)
    bench.write_report(args.out, text, {"args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
