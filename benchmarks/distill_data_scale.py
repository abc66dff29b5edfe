"""Does the distill driver hold the dataset? Driver and worker peak RSS and tokens/s of `raysad distill`
(1 Ray Train worker, Ray Data streaming its examples) on 1k, 10k and 100k generated trajectories with
top-16 teacher rows, and at the smallest size the path it replaced, side by side.

    python benchmarks/distill_data_scale.py                                  # 1k, 10k, 100k (~1.5 GB of JSONL)
    python benchmarks/distill_data_scale.py --sizes 1000,3000 --steps 20     # a quick look
    python benchmarks/distill_data_scale.py --baseline-src /path/to/older/checkout   # old code as the baseline

Data: 200 scripted-expert HotPotQA episodes (prompt, thoughts, actions, observations) with the ids of every
thought/action (tokenizer trained here) and 16 seeded random teacher rows per generated token, repeated with
fresh ids up to each size. Student: tiny-1m, batch 8, max_length 512, `--steps` optimizer steps (the data
path's cost is per run and per example, so a few steps show it; training speed per step does not depend on N).

Each run is its own subprocess (its peak RSS is its own): the driver's peak is ru_maxrss of the process that
called run_distill (Ray's own daemons and the Ray Data tasks are other processes); the worker's is rank 0's
ru_maxrss (distill_summary.json). tokens/s: the median over steps 3.. of non-padding tokens per second.
The baseline at the smallest size: by default the same code with workers=0 (every example encoded into a list
in the training process, the pre-Ray-Data way); with --baseline-src, that checkout's raysad with 1 worker.
Sides alternate over --repeats; medians and spreads are printed, with the load average before each run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, episodes: int = 200) -> list[str]:
    """Tokenizer + student under root; returns the pool of JSONL lines (one trajectory each, `{id}` marked)."""
    from raysad import models
    from raysad.policies.expert import expert_episodes
    from raysad.agent_formats import get_format
    from raysad.sft import trajectory_texts

    trajs = expert_episodes("hotpotqa", episodes, max_turns=6, prompt_chars=300, observation_chars=200)
    models.train_tokenizer(trajectory_texts(trajs), vocab_size=1000, out_dir=root / "tok")
    models.init_model_dir("tiny-1m", root / "tok", root / "student", seed=0)
    tokenizer = models.load_tokenizer(root / "tok")
    fmt = get_format("hotpotqa")
    rng = random.Random(0)
    pool = []
    for traj in trajs:
        for turn in traj.turns:
            thought = tokenizer(turn.thought + fmt.reason_end, add_special_tokens=False)["input_ids"]
            action = tokenizer(turn.action + fmt.act_end, add_special_tokens=False)["input_ids"]
            turn.token_ids, turn.num_thought_tokens = thought + action, len(thought)
            turn.topk_ids = [[tok] + rng.sample(range(len(tokenizer)), 15) for tok in turn.token_ids]
            turn.topk_logprobs = [sorted((round(-rng.expovariate(0.5), 4) for _ in range(16)), reverse=True)
                                  for _ in turn.token_ids]
        pool.append(json.dumps({**traj.to_dict(), "id": "{id}"}))
    return pool


def write(path: Path, pool: list[str], n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(pool[i % len(pool)].replace("{id}", f"t{i}", 1) + "\n")


def one(args) -> None:
    """Child: one distill run; prints a JSON line of its figures."""
    import torch

    from raysad.distill import DistillConfig, run_distill

    if args.workers == 0:
        torch.set_num_threads(1)  # as a Ray worker with cpus_per_worker 1 runs
    began = time.perf_counter()
    result = run_distill(DistillConfig(
        trajectories=args.path, student=str(Path(args.root) / "student"), out=args.out, workers=args.workers,
        cpus_per_worker=1, batch_size=8, micro_batch_size=8, max_length=512, max_steps=args.steps, lr=1e-3,
        warmup_steps=2, checkpoint_every=10_000, log_every=10_000, resume=False, num_cpus=2), track=False)
    wall = time.perf_counter() - began
    summary = json.loads((Path(args.out) / "distill_summary.json").read_text())
    speeds = [line["tokens_per_s"] for line in result.log[3:]] or [line["tokens_per_s"] for line in result.log]
    print("RESULT " + json.dumps({
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": summary.get("distill/peak_rss_mb"), "tokens_per_s": statistics.median(speeds),
        "train_s": summary.get("distill/train_seconds"), "wall_s": wall}), flush=True)


def run_child(args, path: Path, n: int, workers: int, src: str | None, out: Path) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--one", "--path", str(path), "--root", str(args.root), "--out", str(out),
           "--workers", str(workers), "--steps", str(args.steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"run failed (n={n}, workers={workers}, src={src}):\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "load": load, "n": n}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="trajectory counts (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side at the smallest size")
    parser.add_argument("--baseline-src", help="an older checkout whose raysad is the baseline (1 worker)")
    parser.add_argument("--root", help="work folder (default: a temporary one, deleted)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    with tempfile.TemporaryDirectory(prefix="raysad-data-scale-") as tmp:
        args.root = Path(args.root or tmp)
        args.root.mkdir(parents=True, exist_ok=True)
        sizes = [int(s) for s in args.sizes.split(",")]
        pool = build(args.root)
        print(f"load before: {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; {args.steps} steps per run", flush=True)
        rows = []
        for n in sizes:
            path = args.root / f"trajs-{n}.jsonl"
            write(path, pool, n)
            mb = path.stat().st_size / 2**20
            if n == sizes[0]:  # side by side, alternating: the baseline, then the streamed path
                base, new = [], []
                for r in range(args.repeats):
                    base.append(run_child(args, path, n, 1 if args.baseline_src else 0, args.baseline_src,
                                          args.root / f"base-{r}"))
                    new.append(run_child(args, path, n, 1, None, args.root / f"new-{r}"))
                label = f"baseline ({args.baseline_src} 1 worker)" if args.baseline_src else "baseline (list, workers 0)"
                print(f"\n{n:,} trajectories ({mb:,.0f} MB), {args.repeats} alternating repeats, median [min-max]:")
                print(f"  {'':34} {'driver peak MB':>22} {'worker peak MB':>22} {'tokens/s':>22}")
                for name, runs in ((label, base), ("Ray Data stream, 1 worker", new)):
                    print(f"  {name:34} {spread([r['driver_peak_mb'] for r in runs]):>22} "
                          f"{spread([r['worker_peak_mb'] or 0 for r in runs]):>22} "
                          f"{spread([r['tokens_per_s'] for r in runs]):>22}")
                ratio = statistics.median(r["tokens_per_s"] for r in new) / statistics.median(
                    r["tokens_per_s"] for r in base)
                print(f"  tokens/s stream / baseline: x{ratio:.2f}; loads {[round(r['load'], 2) for r in base + new]}",
                      flush=True)
                rows.append(new[len(new) // 2] | {"n": n, "mb": mb})
            else:
                rows.append(run_child(args, path, n, 1, None, args.root / f"new-{n}") | {"mb": mb})
            path.unlink()
        print(f"\nRay Data stream, 1 worker ({args.steps} steps):")
        print(f"  {'trajectories':>12} {'JSONL MB':>9} {'driver peak MB':>15} {'worker peak MB':>15} "
              f"{'tokens/s':>9} {'wall s':>7} {'load':>5}")
        for r in rows:
            print(f"  {r['n']:>12,} {r['mb']:>9,.0f} {r['driver_peak_mb']:>15,.0f} {r['worker_peak_mb'] or 0:>15,.0f} "
                  f"{r['tokens_per_s']:>9,.0f} {r['wall_s']:>7,.0f} {r['load']:>5.2f}")
        growth = rows[-1]["driver_peak_mb"] / rows[0]["driver_peak_mb"] - 1
        print(f"  driver peak growth {rows[0]['n']:,} -> {rows[-1]['n']:,}: {growth:+.1%} (goal <= +10%)")


if __name__ == "__main__":
    main()
